"""SAE architectures: registry and files, objectives, the TopK sparse kernels against dense
references, AuxK, BatchTopK -> JumpReLU export, normalisation folding, initialisation helpers."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

from sae.architectures import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from sae.architectures import _sparse
from sae.architectures.jumprelu import jumprelu, step
from sae.dictionary import (ARCHITECTURES, TrainState, activation_scale, build, fvu,
                            geometric_median, load)

D, N = 24, 64
CASES = {
    "relu": dict(l1_coefficient=0.5),
    "relu_tied": dict(l1_coefficient=0.5, tied=True),
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(sparsity_coefficient=0.05),
    "gated": dict(l1_coefficient=0.5),
}


def make(case: str, d: int = D, n: int = N, seed: int = 0):
    torch.manual_seed(seed)
    name = case.split("_")[0]
    return build(name, d_in=d, n_latents=n, **CASES[case])


def sparse_data(n_tokens: int, d: int = D, n_feat: int = 48, active: int = 3, seed: int = 0):
    """Ground-truth sparse superposition: each token is a sum of `active` random unit features
    with positive magnitudes, plus a constant offset; scaled so E||x||^2 = d."""
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_feat, generator=g)[:active] for _ in range(n_tokens)])
    mags = 0.5 + torch.rand(n_tokens, active, generator=g)
    codes = torch.zeros(n_tokens, n_feat).scatter_(1, idx, mags)
    x = codes @ feats + 0.3 * torch.randn(d, generator=g)
    return x * activation_scale(x)


def train(model, x, steps=40, lr=1e-2, batch=256, dead_mask=None):
    """A minimal stand-in for sae.training: Adam, parallel-gradient removal and renormalisation."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for t in range(steps):
        xb = x[(t * batch) % len(x):][:batch]
        loss, _ = model.training_loss(xb, TrainState(t, steps, dead_mask))
        opt.zero_grad()
        loss.backward()
        if model.unit_norm_decoder:
            with torch.no_grad():
                W, g = model.W_dec, model.W_dec.grad
                g -= (g * W).sum(1, keepdim=True) * W
        opt.step()
        if model.unit_norm_decoder:
            with torch.no_grad():
                model.W_dec /= model.W_dec.norm(dim=1, keepdim=True)
    return model


# --- registry, configs, files -----------------------------------------------------------------
def test_registry_holds_every_architecture():
    for name, cls in [("relu", ReLUSAE), ("topk", TopKSAE), ("batchtopk", BatchTopKSAE),
                      ("jumprelu", JumpReLUSAE), ("gated", GatedSAE)]:
        assert ARCHITECTURES[name] is cls
        assert cls.__doc__ and "Registered" in cls.__doc__


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_load_round_trip_is_bit_exact(case, tmp_path):
    m = make(case)
    x = sparse_data(128)
    m.init_from_data(x)
    train(m, x, steps=2)  # non-trivial weights (and a BatchTopK threshold)
    m.save(tmp_path / case)
    back = load(tmp_path / case)
    assert type(back) is type(m) and back.config() == m.config()
    sd, sb = m.state_dict(), back.state_dict()
    assert sd.keys() == sb.keys()
    for k in sd:
        assert torch.equal(sd[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(back.encode(x), m.encode(x))
        assert torch.equal(back(x), m(x))


def test_truncated_or_corrupted_weights_raise_clear_errors(tmp_path):
    make("topk").save(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load(tmp_path / "m")
    w.write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load(tmp_path / "m")
    (tmp_path / "m" / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load(tmp_path / "m")


def test_weights_not_matching_config_raise(tmp_path):
    make("topk").save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    cfg["n_latents"] = N + 1
    (tmp_path / "m" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the configuration"):
        load(tmp_path / "m")


def test_unknown_architecture_lists_the_known_ones(tmp_path):
    make("relu").save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    cfg["architecture"] = "wavelet"
    (tmp_path / "m" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown architecture 'wavelet'") as e:
        load(tmp_path / "m")
    for known in ("batchtopk", "gated", "jumprelu", "relu", "topk", "pca", "identity"):
        assert known in str(e.value)
    with pytest.raises(ValueError, match="known:.*topk"):
        build("wavelet", d_in=4, n_latents=8)


@pytest.mark.parametrize("name,kwargs,match", [
    ("topk", dict(k=64), "1 <= k < n_latents=64"),
    ("topk", dict(k=100), "1 <= k < n_latents"),
    ("topk", dict(k=0), "1 <= k"),
    ("topk", dict(k=2.5), "integer"),
    ("batchtopk", dict(k=64), "1 <= k < n_latents"),
    ("topk", dict(k=4, k_aux=-1), "k_aux"),
    ("topk", dict(k=4, aux_coefficient=-1.0), "aux_coefficient"),
    ("batchtopk", dict(k=4, threshold_decay=1.0), "threshold_decay"),
    ("relu", dict(tied=True, unit_norm_decoder=False), "tied=True needs unit_norm_decoder"),
    ("relu", dict(l1_coefficient=-1.0), "l1_coefficient"),
    ("relu", dict(sparsity_warmup=2.0), "sparsity_warmup"),
    ("jumprelu", dict(sparsity_loss="l2"), "'step' or 'tanh'"),
    ("jumprelu", dict(bandwidth=0.0), "bandwidth"),
    ("gated", dict(l1_coefficient=float("nan")), "l1_coefficient"),
])
def test_bad_configs_raise_clear_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build(name, d_in=D, n_latents=N, **kwargs)


def test_bad_sizes_and_inputs_raise():
    with pytest.raises(ValueError, match="positive"):
        build("topk", d_in=0, n_latents=8, k=2)
    m = make("topk")
    with pytest.raises(ValueError, match="d_in=24"):
        m.encode(torch.randn(3, D + 1))


def test_decoder_norm_flags_and_init():
    assert ReLUSAE(D, N).unit_norm_decoder is False
    assert torch.allclose(ReLUSAE(D, N).W_dec.norm(dim=1), torch.full((N,), 0.1), atol=1e-6)
    assert ReLUSAE(D, N, tied=True).unit_norm_decoder is True
    for m in (TopKSAE(D, N, k=4), BatchTopKSAE(D, N, k=4), JumpReLUSAE(D, N), GatedSAE(D, N)):
        assert m.unit_norm_decoder is True
        assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(N), atol=1e-6)
        assert torch.equal(m.W_enc, m.W_dec)  # W_enc = W_dec^T in math notation
        assert isinstance(m.W_dec, torch.nn.Parameter)
    assert JumpReLUSAE(D, N, unit_norm_decoder=False).unit_norm_decoder is False


# --- objectives -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_loss_is_finite_and_training_reduces_fvu(case):
    x = sparse_data(1024)
    m = make(case)
    m.init_from_data(x, method="mean")
    with torch.no_grad():
        before = float(fvu(x, m(x)))
    loss, metrics = m.training_loss(x[:256], TrainState(0, 40))
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(isinstance(v, float) for v in metrics.values())
    assert {"fvu", "sq_err_per_token", "l0"} <= set(metrics) and "mse" not in metrics  # "mse": per element only
    assert m.last_fired is not None and m.last_fired.shape == (N,) and m.last_fired.dtype == torch.bool
    train(m, x, steps=40)
    with torch.no_grad():
        after = float(fvu(x, m(x)))
    assert after < 0.4 * before, (before, after)


def test_leading_dimensions_are_flattened_consistently():
    x = sparse_data(30).reshape(2, 15, D)
    for case in CASES:
        m = make(case)
        with torch.no_grad():
            c = m.encode(x)
            assert c.shape == (2, 15, N)
            assert torch.allclose(c.reshape(30, N), m.encode(x.reshape(30, D)), atol=1e-6)
            assert torch.allclose(m(x).reshape(30, D), m(x.reshape(30, D)), atol=1e-5)


def test_relu_loss_matches_formula_with_warmup():
    torch.manual_seed(0)
    m = ReLUSAE(D, N, l1_coefficient=2.0, sparsity_warmup=0.5)
    x = sparse_data(64)
    with torch.no_grad():
        m.b_enc.normal_()
        c = F.relu((x - m.b_dec) @ m.W_enc.T + m.b_enc)
        xh = c @ m.W_dec + m.b_dec
        l1 = (c * m.W_dec.norm(dim=1)).sum(1).mean()
        mse = (x - xh).pow(2).sum(1).mean()
        for step_, warm in ((0, 0.0), (25, 0.5), (100, 1.0)):
            loss, _ = m.training_loss(x, TrainState(step_, 100))
            assert torch.allclose(loss, mse + 2.0 * warm * l1, rtol=1e-5)


def test_tied_relu_uses_one_matrix():
    m = ReLUSAE(D, N, tied=True)
    assert not hasattr(m, "W_enc") and "W_enc" not in m.state_dict()
    x = sparse_data(16)
    ref = F.relu((x - m.b_dec) @ m.W_dec.T + m.b_enc)
    assert torch.allclose(m.encode(x), ref)
    loss, _ = m.training_loss(x, TrainState(5, 10))
    loss.backward()
    assert m.W_dec.grad is not None and m.W_dec.grad.abs().sum() > 0
    m.fold_scale(1.0)  # the trainer checks folding with s = 1: must keep the model tied
    assert m.tied and "W_enc" not in m.state_dict()


def test_resample_dead_follows_the_anthropic_recipe():
    torch.manual_seed(0)
    m = ReLUSAE(D, N, unit_norm_decoder=True)
    x = sparse_data(200)
    m.init_from_data(x)
    dead = torch.zeros(N, dtype=torch.bool)
    dead[[3, 10, 50]] = True
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.b_enc.fill_(0.7)
    idx = m.resample_dead(x, dead, generator=torch.Generator().manual_seed(1))
    assert idx.tolist() == [3, 10, 50]
    alive = ~dead
    assert torch.equal(m.W_dec[alive], before["W_dec"][alive])
    assert torch.equal(m.W_enc[alive], before["W_enc"][alive])
    assert torch.allclose(m.W_dec[dead].norm(dim=1), before["W_dec"][alive].norm(dim=1).mean().expand(3))
    enc_norm = 0.2 * before["W_enc"][alive].norm(dim=1).mean()
    assert torch.allclose(m.W_enc[dead].norm(dim=1), enc_norm.expand(3), rtol=1e-5)
    assert torch.all(m.b_enc[dead] == 0) and torch.all(m.b_enc[alive] == 0.7)
    # each new direction is a (centred, normalised) input from the sample
    v = F.normalize(x - m.b_dec, dim=1)
    assert torch.all((F.normalize(m.W_dec[dead], dim=1) @ v.T).max(1).values > 1 - 1e-5)
    assert m.resample_dead(x, torch.zeros(N, dtype=torch.bool)).numel() == 0


def test_jumprelu_straight_through_gradients():
    eps = 0.1
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    z = torch.tensor([[0.52, 0.9, 0.2]], requires_grad=True)  # near, above, below the threshold
    f = jumprelu(z, theta, eps)
    assert torch.allclose(f, torch.tensor([[0.52, 0.9, 0.0]]))
    f.sum().backward()
    assert torch.allclose(z.grad, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(theta.grad, torch.tensor([-0.5 / eps, 0.0, 0.0]))
    theta.grad = None
    z.grad = None
    step(z, theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([-1 / eps, 0.0, 0.0]))
    assert torch.equal(z.grad, torch.zeros_like(z))  # no gradient into z through the L0 term


def test_jumprelu_loss_l0_and_pre_act_term():
    torch.manual_seed(0)
    m = JumpReLUSAE(D, N, sparsity_coefficient=0.3, sparsity_warmup=0.0, pre_act_coefficient=0.0)
    x = sparse_data(64)
    with torch.no_grad():
        z = (x - m.b_dec) @ m.W_enc.T + m.b_enc
        c = z * ((z > m.threshold) & (z > 0))
        mse = (x - (c @ m.W_dec + m.b_dec)).pow(2).sum(1).mean()
        l0 = (c != 0).float().sum(1).mean()
        loss, metrics = m.training_loss(x, TrainState(1, 10))
    assert torch.allclose(loss, mse + 0.3 * l0, rtol=1e-5)
    assert metrics["l0"] == pytest.approx(float(l0))
    m2 = JumpReLUSAE(D, N, sparsity_coefficient=0.3, sparsity_warmup=0.0, pre_act_coefficient=1.0)
    m2.load_state_dict(m.state_dict())
    dead = torch.zeros(N, dtype=torch.bool)
    dead[:5] = True
    with torch.no_grad():
        loss2, metrics2 = m2.training_loss(x, TrainState(1, 10, dead))
        gap = (F.relu(m.threshold - z)[:, :5] * m.W_dec.norm(dim=1)[:5]).sum(1).mean()
    assert torch.allclose(loss2, loss + gap, rtol=1e-5) and metrics2["pre_act"] > 0
    m3 = JumpReLUSAE(D, N, sparsity_coefficient=0.3, sparsity_warmup=0.0, sparsity_loss="tanh", tanh_scale=2.0)
    m3.load_state_dict(m.state_dict())
    with torch.no_grad():
        loss3, _ = m3.training_loss(x, TrainState(1, 10))
        tanh_pen = torch.tanh(2.0 * c * m.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(loss3, mse + 0.3 * tanh_pen, rtol=1e-5)


def test_gated_aux_term_does_not_train_the_decoder():
    torch.manual_seed(0)
    m = GatedSAE(D, N, l1_coefficient=0.0)
    x = sparse_data(64)
    with torch.no_grad():
        m.b_mag.normal_()
        m.r_mag.normal_(0, 0.1)
    loss, metrics = m.training_loss(x, TrainState(1, 10))
    loss.backward()
    got = m.W_dec.grad.clone()
    m.zero_grad()
    mse = (x - m(x)).pow(2).sum(1).mean()
    mse.backward()
    assert torch.allclose(got, m.W_dec.grad, atol=1e-5)  # the aux reconstruction adds nothing
    assert metrics["aux"] > 0


# --- TopK sparse kernels ----------------------------------------------------------------------
def dense_topk_objective(m: TopKSAE, x, dead=None):
    """Reference: dense scatter + dense matmuls + autograd, same objective as the sparse path."""
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc).relu()
    v, i = pre.topk(m.k, sorted=False)
    c = torch.zeros_like(pre).scatter(-1, i, v)
    xh = c @ m.W_dec + m.b_dec
    loss = (x - xh).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    if dead is not None and dead.any():
        e = (x - xh).detach()
        k_eff = min(m.k_aux, int(dead.sum()))
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(k_eff, sorted=False)
        eh = torch.zeros_like(pre).scatter(-1, ai, av) @ m.W_dec
        loss = loss + m.aux_coefficient * (e - eh).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    return loss


def _random_topk(d=20, n=60, k=5, k_aux=7, seed=0):
    torch.manual_seed(seed)
    m = TopKSAE(d, n, k=k, k_aux=k_aux, aux_coefficient=0.5).double()
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        m.b_dec.normal_()
        m.W_dec.mul_(torch.rand(n, 1, dtype=torch.float64) + 0.5)
    return m


@pytest.mark.parametrize("with_dead,k_aux", [(False, 7), (True, 7), (True, 1)])
def test_topk_sparse_gradients_equal_dense_reference(with_dead, k_aux):
    """k_aux=7 with 15 dead latents takes the dense-block AuxK path, k_aux=1 the sparse one."""
    m = _random_topk(k_aux=k_aux)
    x = torch.randn(96, 20, dtype=torch.float64) * 2 + 1
    dead = None
    if with_dead:
        dead = torch.zeros(60, dtype=torch.bool)
        dead[torch.randperm(60)[:15]] = True
    loss, metrics = m.training_loss(x, TrainState(3, 10, dead))
    grads = torch.autograd.grad(loss, list(m.parameters()))
    ref = dense_topk_objective(m, x, dead)
    ref_grads = torch.autograd.grad(ref, list(m.parameters()))
    assert torch.allclose(loss, ref, rtol=1e-10)
    for (name, _), g, r in zip(m.named_parameters(), grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10), name
    assert ("auxk" in metrics) == with_dead
    assert metrics["l0"] <= 5


def test_encode_topk_decode_sparse_match_dense_and_pass_input_gradients():
    m = _random_topk()
    x = (torch.randn(3, 7, 20, dtype=torch.float64)).requires_grad_()
    values, indices = m.encode_topk(x)
    assert values.shape == indices.shape == (3, 7, 5) and bool((values >= 0).all())
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc).relu()
    dense = torch.zeros_like(pre).scatter(-1, pre.topk(5).indices, pre.topk(5).values)
    assert torch.allclose(m.encode(x), dense)
    out = m.decode_sparse(values, indices)
    assert torch.allclose(out, dense @ m.W_dec + m.b_dec)
    assert torch.allclose(m(x), m.decode(m.encode(x)))
    g = torch.randn_like(out)
    gx, gW = torch.autograd.grad(out, [x, m.W_enc], g)
    rx, rW = torch.autograd.grad(dense @ m.W_dec + m.b_dec, [x, m.W_enc], g)
    assert torch.allclose(gx, rx) and torch.allclose(gW, rW)


@pytest.mark.parametrize("shape,k", [((50, 2304), 32), ((40, 96), 4), ((30, 97), 5), ((8, 16), 15), ((64, 600), 1)])
def test_blocked_topk_selection_is_exact(shape, k):
    torch.manual_seed(0)
    pre = torch.randn(*shape)
    v, i = _sparse.topk_rows(pre, k)
    rv, ri = pre.topk(k)
    assert torch.equal(v.sort(1).values, rv.sort(1).values)
    assert torch.equal(i.sort(1).values, ri.sort(1).values)
    assert torch.equal(pre.gather(1, i), v)


@pytest.mark.parametrize("k_aux", [7, 1])  # dense-block and sparse AuxK paths
def test_auxk_only_touches_dead_latents(k_aux):
    m = _random_topk(k_aux=k_aux)
    x = torch.randn(96, 20, dtype=torch.float64)
    dead = torch.zeros(60, dtype=torch.bool)
    dead[[1, 7, 8, 12, 19, 22, 30, 33, 41, 44, 50, 59]] = True  # 12 > 8 * k_aux=1: sparse path
    with_aux = torch.autograd.grad(m.training_loss(x, TrainState(1, 2, dead))[0], [m.W_enc, m.b_enc, m.W_dec])
    without = torch.autograd.grad(m.training_loss(x, TrainState(1, 2, None))[0], [m.W_enc, m.b_enc, m.W_dec])
    for a, b in zip(with_aux, without):
        diff = a - b  # the AuxK term's gradient alone (up to float64 summation order)
        assert diff[~dead].abs().max() < 1e-12
        assert diff[dead].abs().max() > 1e-4
    # and its value follows Gao et al.: sum||e - e_hat||^2 / sum||e - mean e||^2 of the detached residual
    _, metrics = m.training_loss(x, TrainState(1, 2, dead))
    with torch.no_grad():
        pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc).relu()
        e = x - m(x)
        av, ai = pre.masked_fill(~dead, float("-inf")).topk(min(12, k_aux))
        eh = torch.zeros_like(pre).scatter(-1, ai, av) @ m.W_dec
        expected = (e - eh).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert metrics["auxk"] == pytest.approx(float(expected), rel=1e-9)


def test_topk_reports_fired_latents():
    m = _random_topk()
    x = torch.randn(50, 20, dtype=torch.float64)
    m.training_loss(x, TrainState(0, 1))
    assert torch.equal(m.last_fired, (m.encode(x) > 0).any(0))


# --- BatchTopK ------------------------------------------------------------------------------
def test_batch_threshold_is_exact():
    torch.manual_seed(0)
    for shape, keep in [((512, 256), 2048), ((64, 64), 100), ((8, 8), 64), ((1000, 300), 5000)]:
        pre = torch.randn(*shape).relu()
        ref = pre.flatten().sort(descending=True).values[keep - 1]
        assert _sparse.batch_threshold(pre, keep) == float(ref)


def test_batchtopk_keeps_k_times_batch_and_tracks_threshold():
    torch.manual_seed(0)
    m = BatchTopKSAE(D, N, k=4, threshold_decay=0.5)
    x = sparse_data(256)
    m.init_from_data(x)
    assert float(m.threshold) == -1.0
    _, metrics = m.training_loss(x, TrainState(0, 10))
    assert metrics["l0"] == pytest.approx(4.0)
    pre = F.linear(x - m.b_dec, m.W_enc, m.b_enc).relu().detach()
    kth = pre.flatten().sort(descending=True).values[4 * 256 - 1]
    assert float(m.threshold) == pytest.approx(float(kth))  # first update: the smallest kept value
    m.training_loss(x, TrainState(1, 10))
    assert float(m.threshold) == pytest.approx(float(kth))  # same batch, EMA of equal values


def test_batchtopk_exports_an_equivalent_jumprelu(tmp_path):
    x = sparse_data(512)
    m = make("batchtopk")
    m.init_from_data(x)
    train(m, x, steps=8)
    assert float(m.threshold) > 0
    j = m.export_jumprelu()
    assert isinstance(j, JumpReLUSAE)
    assert torch.all(j.threshold == m.threshold)
    with torch.no_grad():
        c = m.encode(x)
        assert torch.equal(j.encode(x), c)
        assert torch.equal(j(x), m(x))
        z = F.linear(x - m.b_dec, m.W_enc, m.b_enc)
        assert torch.equal(c, z * (z > m.threshold))  # inference: one global threshold
    j.save(tmp_path / "j")
    assert torch.equal(load(tmp_path / "j").encode(x), c)


# --- normalisation folding and initialisation ---------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_scale_matches_the_unfolded_model_on_scaled_inputs(case):
    x_raw = sparse_data(256) * 37.0 + 5.0
    s = activation_scale(x_raw)
    m = make(case).double()
    train(m, (x_raw * s).double(), steps=3)  # trained on scaled inputs
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("b_enc", "b_gate", "b_mag"):
                p.add_(torch.randn_like(p) * 0.1)
        folded = copy.deepcopy(m).fold_scale(s)
        x = x_raw.double()
        codes = m.encode(x * s)
        assert torch.allclose(folded.encode(x), codes, rtol=1e-9, atol=1e-9)
        assert torch.allclose(folded.decode(codes), m.decode(codes) / s, rtol=1e-9, atol=1e-9)
        assert torch.allclose(folded(x), m(x * s) / s, rtol=1e-9, atol=1e-9)
    assert folded.config()["d_in"] == D


def test_activation_scale_and_fold_validation():
    x = torch.randn(500, 8) * 3
    s = activation_scale(x)
    assert float((x * s).pow(2).sum(1).mean()) == pytest.approx(8.0, rel=1e-6)
    with pytest.raises(ValueError, match="positive"):
        make("topk").fold_scale(0.0)
    with pytest.raises(ValueError):
        activation_scale(torch.zeros(4, 8))


def test_init_from_data_mean_and_geometric_median():
    torch.manual_seed(0)
    x = torch.randn(400, D) * 0.1 + 2.0
    x[:20] += 1000.0  # outliers drag the mean but hardly the geometric median
    m = make("topk")
    m.init_from_data(x, method="mean")
    assert torch.allclose(m.b_dec, x.mean(0), atol=1e-4)
    m.init_from_data(x)
    assert (m.b_dec - 2.0).abs().max() < 0.2
    assert (x.mean(0) - 2.0).abs().min() > 40
    gm = geometric_median(x[20:])
    assert torch.allclose(gm, x[20:].median(0).values, atol=0.05)  # close to the coordinate median here
    with pytest.raises(ValueError, match="'geometric_median', 'mean'"):
        m.init_from_data(x, method="mode")


def test_sparse_decode_fallback_kernel_matches(monkeypatch):
    """If a future PyTorch drops the per-sample-weight kernel, the gather fallback is used."""
    m = _random_topk()
    x = torch.randn(40, 20, dtype=torch.float64)
    ref = torch.autograd.grad(m.training_loss(x, TrainState(1, 2))[0], list(m.parameters()))
    monkeypatch.setattr(_sparse, "_PSW_BACKWARD", None)
    got = torch.autograd.grad(m.training_loss(x, TrainState(1, 2))[0], list(m.parameters()))
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["topk", "batchtopk"])
def test_ksparse_init_scales_the_encoder_to_the_least_squares_reconstruction(case):
    x = sparse_data(512)
    m = make(case)
    unit = m.W_enc.detach().clone()
    assert torch.allclose(unit.norm(dim=1), torch.ones(N))
    m.init_from_data(x)
    s = float(m.W_enc.norm(dim=1).mean())
    assert 0 < s < 1 and torch.allclose(m.W_enc, unit * s)  # one common factor; the overlaps overshoot
    with torch.no_grad():
        r = x - m.b_dec
        pre = F.linear(r, m.W_enc)
        vals, idx = pre.relu().topk(m.k, dim=-1)
        h = torch.zeros_like(pre).scatter(-1, idx, vals) @ m.W_dec  # x_hat - b_dec
        assert float((r * h).sum()) == pytest.approx(float(h.pow(2).sum()), rel=1e-4)  # d/ds ||r - s h||^2 = 0
        fvu_ls = (r - h).pow(2).sum()
        assert fvu_ls < (r - h / s).pow(2).sum()  # better than the unit-norm start
