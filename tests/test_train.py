"""The trainer: learning on synthetic data, ground-truth recovery, exact resume after SIGKILL,
data-parallel equivalence, NaN handling, normalisation folding, metrics and checkpoints."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sae.dictionary import Dictionary
from sae.synthetic import BLOCK, SyntheticActivations
from sae.training import (NonFiniteError, TrainConfig, _decoder_rows, _remove_parallel_grad, latest_checkpoint,
                       lr_at, train)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
D, N, K, BS = 16, 48, 3, 64


class TinyTopK(Dictionary):
    """A minimal TopK SAE (dense decode) using the base class's training_loss (plain MSE)."""

    architecture = "tiny_topk_test"

    def __init__(self, d_in: int, n_latents: int, k: int = 3):
        super().__init__(d_in, n_latents)
        self.k = k
        w = F.normalize(torch.randn(n_latents, d_in), dim=1)
        self.W_enc = nn.Parameter(w.clone())                # [n_latents, d_in]
        self.W_dec = nn.Parameter(w.clone())                # [n_latents, d_in]
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def config(self):
        return {**super().config(), "k": self.k}

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc  # [batch, n_latents]
        v, i = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, v.relu())

    def decode(self, c):
        return c @ self.W_dec + self.b_dec


class SilentTopK(TinyTopK):
    """Reports neither last_fired nor l0: the trainer must fall back to encoding."""

    def training_loss(self, x, state):
        sq_err = (self(x) - x).pow(2).sum(-1).mean()
        return sq_err, {"sq_err_per_token": sq_err.detach()}


class RecordingTopK(TinyTopK):
    """Remembers how many rows its last training batch had (data-parallel slices)."""

    rows_seen = 0

    def training_loss(self, x, state):
        self.rows_seen = x.shape[0]
        return super().training_loss(x, state)


def make_data(**kw):
    args = dict(d=D, n_features=N, k_candidates=K, keep_prob=1.0, seed=1, calibration_tokens=BLOCK)
    args.update(kw)
    return SyntheticActivations(**args)


def make_dict(seed=0, cls=TinyTopK, **kw):
    torch.manual_seed(seed)
    return cls(kw.pop("d_in", D), kw.pop("n_latents", N), kw.pop("k", K))


def cfg(**kw):
    args = dict(total_tokens=BS * 20, batch_size=BS, lr=1e-2, warmup_steps=2, log_every=5, progress=False,
                device="cpu", calibration_tokens=2 * BS)
    args.update(kw)
    return TrainConfig(**args)


def fvu(model, x):
    with torch.no_grad():
        return ((model(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


try:
    from sae.similarity import mmcs  # mean over rows of a of the max cosine to any row of b
except ImportError:  # pragma: no cover - the module is written in parallel with this one
    def mmcs(truth, learned):
        a, b = F.normalize(truth, dim=1), F.normalize(learned, dim=1)
        return (a @ b.T).max(1).values.mean().item()


def read_metrics(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def one_thread(fn):
    """Run fn with one intra-op thread (subprocesses use one too: bit-exact comparisons)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- small pieces --------------------------------------------------------------------------------
def test_lr_schedule():
    T = 100
    lrs = [lr_at(t, 1.0, T, warmup=10, decay_fraction=0.2) for t in range(T)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[50] == 1.0 and lrs[79] == 1.0
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert TrainConfig(total_tokens=4096 * 200, batch_size=4096).warmup == 10
    c = TrainConfig(total_tokens=10 ** 6, dead_window_fraction=0.05, dead_window_min_tokens=100_000)
    assert c.dead_window_tokens == 100_000           # floor applies to short runs


class LRProbe(Dictionary):
    """One float64 parameter p with loss p (gradient 1 at every step): Adam's bias-corrected update
    is then exactly lr_t / (1 + eps), so the values of p read out the learning rates applied."""

    architecture = "lr_probe_test"
    unit_norm_decoder = False

    def __init__(self):
        super().__init__(D, 1)
        self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.seen = []

    @property
    def W_dec(self):
        return torch.zeros(1, D)

    def encode(self, x):
        return torch.zeros(*x.shape[:-1], 1, dtype=x.dtype)

    def decode(self, c):
        return torch.zeros(*c.shape[:-1], D, dtype=c.dtype)

    def training_loss(self, x, state):
        self.seen.append(self.p.item())
        self.last_fired = torch.ones(1, dtype=torch.bool)
        return self.p * 1.0, {"l0": 1.0, "fvu": 1.0}


def test_lr_schedule_overlapping_warmup_and_decay_multiply(tmp_path):
    """10 steps, warm-up 8, decay over the last 6 (from step 4): lr(t) = w(t) d(t) with
    w = min(1, (t+1)/8), d = min(1, (10-t)/6). The minimum of the two (the code before) gives
    3/4 at step 5, the product 5/8."""
    want = [1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8 * 5 / 6, 7 / 8 * 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    assert [lr_at(t, 1.0, 10, warmup=8, decay_fraction=0.6) for t in range(10)] == pytest.approx(want, rel=1e-12)
    # the same rates are what the optimizer applies in a run (and what the metrics report)
    probe = LRProbe()
    c = cfg(total_tokens=BS * 10, lr=0.1, warmup_steps=8, decay_fraction=0.6, grad_clip=None, normalize=False,
            init_from_data=False, log_every=1, metrics_file=str(tmp_path / "m.jsonl"))
    train(probe, make_data().stream(BS), c)
    p = probe.seen + [probe.p.item()]
    applied = [(a - b) * (1 + c.eps) for a, b in zip(p, p[1:])]
    assert applied == pytest.approx([0.1 * w for w in want], rel=1e-9)
    assert [r["lr"] for r in read_metrics(tmp_path / "m.jsonl")] == pytest.approx([0.1 * w for w in want], rel=1e-12)


def test_config_validation():
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(total_tokens=10, batch_size=64)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="decay_fraction"):
        TrainConfig(decay_fraction=1.5)


def test_parallel_gradient_removal_plain_and_transposed():
    torch.manual_seed(0)

    class T(TinyTopK):  # decoder stored transposed, exposed as a view
        def __init__(self):
            super().__init__(D, N, K)
            w = self.W_dec.data.T.clone()
            del self.W_dec
            self.W_dec_t = nn.Parameter(w)                   # [d_in, n_latents]

        @property
        def W_dec(self):
            return self.W_dec_t.T

    for model in (TinyTopK(D, N, K), T()):
        rows = _decoder_rows(model, "m")
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        _remove_parallel_grad(rows)
        w, g = rows()
        assert w.shape == g.shape == (N, D)
        assert (g * w).sum(1).abs().max().item() < 1e-5
        assert g.abs().max().item() > 0.1                    # the rest of the gradient is kept


# --- training ----------------------------------------------------------------------------------
def test_trains_reduces_fvu_writes_metrics_keeps_unit_decoder(tmp_path):
    data = make_data()
    x_eval = data.sample(2048, stream=1)
    model = make_dict()
    before = fvu(model, x_eval)
    out = train(model, data.stream(BS), cfg(total_tokens=BS * 60, metrics_file=str(tmp_path / "m.jsonl"),
                                            normalize=False))
    assert set(out) == {"sae"} and out["sae"] is model
    after = fvu(model, x_eval)
    assert after < 0.5 * before
    norms = model.W_dec.detach().norm(dim=1)
    assert torch.allclose(norms, torch.ones(N), atol=1e-5)
    rows = read_metrics(tmp_path / "m.jsonl")
    assert [r["step"] for r in rows] == [5 * i for i in range(1, 13)]
    for key in ("step", "tokens", "loss", "sq_err_per_token", "fvu", "l0", "dead_fraction", "lr", "tokens_per_s",
                "grad_norm"):
        assert key in rows[0], key
    assert "mse" not in rows[0]                              # "mse" means the per-element mean only
    assert rows[-1]["tokens"] == 60 * BS
    assert rows[0]["l0"] == pytest.approx(K)
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    assert rows[-1]["lr"] < 1e-2                             # decaying at the end


def test_fallback_without_last_fired(tmp_path):
    """A training_loss that reports no l0 / last_fired: the trainer encodes to get them."""
    data = make_data()
    model = make_dict(cls=SilentTopK)
    train(model, data.stream(BS), cfg(total_tokens=BS * 10, metrics_file=str(tmp_path / "m.jsonl"),
                                      progress=True))
    rows = read_metrics(tmp_path / "m.jsonl")
    assert rows[-1]["l0"] == pytest.approx(K)
    assert 0 < rows[-1]["fvu"] < 1


def test_wandb_requested_but_missing_is_an_error():
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install wandb"):
        train(make_dict(), make_data().stream(BS), cfg(total_tokens=BS * 2, wandb="proj"))


def test_deterministic_two_runs_equal():
    data = make_data()
    a = one_thread(lambda: train(make_dict(), data.stream(BS), cfg(seed=7)))["sae"]
    b = one_thread(lambda: train(make_dict(), data.stream(BS), cfg(seed=7)))["sae"]
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = one_thread(lambda: train(make_dict(), data.stream(BS), cfg(seed=7, lr=3e-3)))["sae"]
    assert not torch.equal(state(c)["W_dec"], sa["W_dec"])


def topk_factories():
    yield "tiny", lambda: make_dict(seed=0, n_latents=96, k=4, d_in=32)
    try:
        from sae.architectures.topk import TopKSAE  # the real architecture (sparse kernels, AuxK)
    except ImportError:
        return
    yield "topk", lambda: (torch.manual_seed(0), TopKSAE(d_in=32, n_latents=96, k=4))[1]


@pytest.mark.parametrize("name,factory", list(topk_factories()), ids=[n for n, _ in topk_factories()])
def test_ground_truth_recovery(name, factory):
    """TopK at the true k on superposed data (48 features in 32 dims) finds the true directions."""
    data = SyntheticActivations(d=32, n_features=48, k_candidates=4, keep_prob=1.0, seed=2,
                                calibration_tokens=BLOCK)
    model = factory()
    x_eval = data.sample(4096, stream=1)
    out = one_thread(lambda: train(model, data.stream(256), cfg(total_tokens=256 * 300, batch_size=256,
                                                                  lr=1e-2, warmup_steps=10)))["sae"]
    score = mmcs(data.directions, out.W_dec.detach())
    assert score >= 0.9, f"{name}: MMCS {score:.3f}"
    assert fvu(out, x_eval) < 0.15


def test_normalisation_is_folded_on_export(tmp_path):
    data = make_data()
    raw = lambda s: (10.0 * b for b in data.batches(BS, start_step=s))  # noqa: E731 - far from E||x||^2 = d
    model = train(make_dict(), raw, cfg(checkpoint_dir=str(tmp_path / "ck")))["sae"]
    ck = latest_checkpoint(tmp_path / "ck")
    meta = json.loads((ck / "trainer.json").read_text())
    s = meta["scales"]["<batch>"]
    first = 10.0 * data.sample(2 * BS).double()                      # the calibration tokens
    assert s == pytest.approx((D / first.pow(2).sum(1).mean().item()) ** 0.5, rel=1e-9)
    assert s == pytest.approx(0.1, rel=0.2)
    unfolded = make_dict()
    tensors = load_file(str(ck / "state.safetensors"))
    unfolded.load_state_dict({k[len("model/sae/"):]: v for k, v in tensors.items() if k.startswith("model/sae/")})
    x = 10.0 * data.sample(512, stream=1)
    with torch.no_grad():
        assert torch.allclose(model(x), unfolded(s * x) / s, atol=1e-4, rtol=1e-4)
        assert torch.allclose(model.encode(x), unfolded.encode(s * x), atol=1e-4, rtol=1e-4)
    exported = load_file(str(tmp_path / "ck" / "dictionaries" / "sae" / "model.safetensors"))
    assert torch.equal(exported["W_dec"], model.W_dec.detach())
    assert fvu(model, x) < 0.6


ARCHS = {"topk": {"k": K}, "batchtopk": {"k": K}, "relu": {"l1_coefficient": 0.1}, "jumprelu": {},
         "gated": {"l1_coefficient": 0.1}}


def registered_archs():
    try:
        from sae.dictionary import ARCHITECTURES, _ensure_registered
        _ensure_registered()
    except ImportError:
        return []
    return [a for a in ARCHS if a in ARCHITECTURES]


@pytest.mark.parametrize("arch", registered_archs())
def test_every_architecture_trains_and_exports_folded(tmp_path, arch):
    """Each real architecture trains through the trainer on unnormalised inputs; the exported
    (folded) dictionary on raw x equals the checkpointed (unfolded) one on s*x, rescaled by 1/s."""
    from sae.dictionary import build, load

    data = make_data()
    raw = lambda s: (10.0 * b for b in data.batches(BS, start_step=s))  # noqa: E731
    torch.manual_seed(0)
    model = build(arch, d_in=D, n_latents=N, **ARCHS[arch])
    out = train(model, raw, cfg(checkpoint_dir=str(tmp_path / "ck"), log_every=2))["sae"]
    rows = read_metrics(tmp_path / "ck" / "metrics.jsonl")
    assert rows[-1]["fvu"] < rows[0]["fvu"]
    ck = latest_checkpoint(tmp_path / "ck")
    meta = json.loads((ck / "trainer.json").read_text())
    s = meta["scales"]["<batch>"]
    unfolded = build(arch, **meta["dictionaries"]["sae"]["config"])
    tensors = load_file(str(ck / "state.safetensors"))
    unfolded.load_state_dict({k[len("model/sae/"):]: v for k, v in tensors.items() if k.startswith("model/sae/")})
    unfolded.eval()
    exported = load(tmp_path / "ck" / "dictionaries" / "sae")
    x = 10.0 * data.sample(256, stream=1)
    with torch.no_grad():
        want = unfolded(s * x) / s
        assert torch.allclose(out(x), want, atol=1e-4, rtol=1e-3)
        assert torch.allclose(exported(x), want, atol=1e-4, rtol=1e-3)


def test_sites_and_sweep(tmp_path):
    """Dict batches: one dictionary per site plus a second one on site b (a sweep)."""
    da, db = make_data(seed=1), make_data(seed=2)

    def stream(start):
        for xa, xb in zip(da.batches(BS, start_step=start), db.batches(BS, start_step=start)):
            yield {"a": xa, "b": 5.0 * xb}

    dicts = {"a": make_dict(0), "b": make_dict(1), "b_k1": make_dict(2, k=1)}
    out = train(dicts, stream, cfg(checkpoint_dir=str(tmp_path / "ck")), sites={"b_k1": "b"})
    assert set(out) == {"a", "b", "b_k1"} and out["b_k1"].k == 1
    meta = json.loads((latest_checkpoint(tmp_path / "ck") / "trainer.json").read_text())
    assert meta["sites"] == {"a": "a", "b": "b", "b_k1": "b"}
    assert meta["scales"]["a"] == pytest.approx(5 * meta["scales"]["b"], rel=0.25)
    rows = read_metrics(tmp_path / "ck" / "metrics.jsonl")
    assert {r["dictionary"] for r in rows} == {"a", "b", "b_k1"}
    last = {r["dictionary"]: r for r in rows if r["step"] == 20}
    assert last["b_k1"]["l0"] == pytest.approx(1) and last["b"]["l0"] == pytest.approx(K)
    for name in ("a", "b"):
        first = next(r for r in rows if r["dictionary"] == name)
        assert last[name]["fvu"] < first["fvu"]
    with pytest.raises(KeyError, match="sites="):
        train({"c": make_dict()}, stream, cfg())


def test_dead_latents_tracked():
    seen = []

    class Blocked(TinyTopK):  # latents 0..9 can never fire
        def encode(self, x):
            pre = (x - self.b_dec) @ self.W_enc.T + self.b_enc
            pre = torch.cat([torch.full_like(pre[:, :10], -1e9), pre[:, 10:]], dim=1)
            v, i = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, i, v.relu())

        def training_loss(self, x, state):
            seen.append(state.dead_mask.clone())
            return super().training_loss(x, state)

    data = make_data()
    train(make_dict(cls=Blocked), data.stream(BS), cfg(total_tokens=BS * 12, dead_window_min_tokens=4 * BS,
                                                        dead_window_fraction=0.0))
    assert not seen[0].any()                                 # nobody is dead before the window passes
    assert seen[-1][:10].all()                               # never-firing latents are dead after it
    assert seen[-1].float().mean() < 0.9


def test_dead_latents_are_resampled_during_train(tmp_path):
    """ReLU SAE with latents 0..3 unable to fire (b_enc = -1e4): with the default config the
    trainer resamples them (Bricken et al. 2023) once they have been dead for a window, and they
    fire again; with resample_dead=False they stay dead."""
    from sae.architectures import ReLUSAE

    data = make_data()
    x_eval = data.sample(1024, stream=1)

    def run(**kw):
        torch.manual_seed(0)
        model = ReLUSAE(D, N, l1_coefficient=0.1)
        with torch.no_grad():
            model.b_enc[:4] = -1e4
        c = cfg(total_tokens=BS * 20, dead_window_min_tokens=4 * BS, dead_window_fraction=0.0, log_every=1,
                metrics_file=str(tmp_path / "m.jsonl"), **kw)
        out = train(model, data.stream(BS), c)["sae"]
        with torch.no_grad():
            fires = (out.encode(x_eval) > 0).any(0)
        return out, fires, read_metrics(tmp_path / "m.jsonl")

    out, fires, rows = run()
    assert fires[:4].all() and (out.b_enc[:4] > -1.0).all()
    resampled = {r["step"]: r["resampled"] for r in rows if "resampled" in r}
    assert set(resampled) <= {4, 8} and resampled.get(4, 0) >= 4     # every dead window, first half only
    stuck, fires, rows = run(resample_dead=False)
    assert not fires[:4].any() and (stuck.b_enc[:4] < -1e3).all()
    assert not any("resampled" in r for r in rows)


# --- failures --------------------------------------------------------------------------------------
def test_nan_activation_stops_with_step_and_site(tmp_path):
    data = make_data()

    def stream(start):
        for i, x in enumerate(data.batches(BS, start_step=start), start):
            b = x.clone()
            if i == 7:
                b[3, 2] = float("nan")
            yield {"a": x, "b": b}

    with pytest.raises(NonFiniteError, match=r"site 'b' at step 7") as err:
        train({"a": make_dict(), "b": make_dict()}, stream, cfg(checkpoint_dir=str(tmp_path / "ck"),
                                                                   checkpoint_every=3))
    e = err.value
    assert (e.step, e.site) == (7, "b")
    assert e.checkpoint == tmp_path / "ck" / "step_000000006"
    assert latest_checkpoint(tmp_path / "ck") == e.checkpoint      # kept, and nothing newer written
    assert "step_000000006" in str(e)
    assert load_file(str(e.checkpoint / "state.safetensors"))["model/b/W_dec"].isfinite().all()


def test_nan_loss_names_dictionary(tmp_path):
    class Diverges(TinyTopK):
        def training_loss(self, x, state):
            loss, m = super().training_loss(x, state)
            return (loss * float("inf") if state.step == 4 else loss), m

    data = make_data()
    good = make_dict(1)
    with pytest.raises(NonFiniteError, match="dictionary 'bad'") as err:
        train({"ok": good, "bad": make_dict(cls=Diverges)}, data.stream(BS), cfg())
    assert err.value.step == 4 and err.value.dictionary == "bad"
    assert all(p.isfinite().all() for p in good.parameters())


def test_bad_batches_and_existing_checkpoints(tmp_path):
    data = make_data()
    with pytest.raises(ValueError, match="rebatch"):
        train(make_dict(), data.stream(BS // 2), cfg())
    with pytest.raises(ValueError, match="d_in=16"):
        train(make_dict(), [torch.zeros(BS, D + 1)] * 20, cfg())
    c = cfg(total_tokens=BS * 4, checkpoint_dir=str(tmp_path / "ck"))
    train(make_dict(), data.stream(BS), c)
    with pytest.raises(FileExistsError, match="resume=True"):
        train(make_dict(), data.stream(BS), c)
    with pytest.raises(ValueError, match="lr"):
        train(make_dict(), data.stream(BS), cfg(total_tokens=BS * 4, checkpoint_dir=str(tmp_path / "ck"),
                                                resume=True, lr=1e-3))


def test_incomplete_checkpoints_are_ignored_and_cleaned(tmp_path):
    ck = tmp_path / "ck"
    (ck / ".step_000000004.tmp-1234").mkdir(parents=True)     # a save killed half-way
    (ck / "step_000000008").mkdir()                             # no trainer.json: not a checkpoint
    assert latest_checkpoint(ck) is None
    train(make_dict(), make_data().stream(BS), cfg(total_tokens=BS * 4, checkpoint_dir=str(ck)))
    assert not (ck / ".step_000000004.tmp-1234").exists()
    assert latest_checkpoint(ck).name == "step_000000004"


# --- exact resume --------------------------------------------------------------------------------
def small_factories():
    yield "tiny", lambda seed=0: make_dict(seed)
    try:
        from sae.architectures.topk import TopKSAE
    except ImportError:
        return
    # wide enough that some latents go dead within the short window below, so AuxK is exercised
    yield "topk", lambda seed=0: (torch.manual_seed(seed), TopKSAE(D, 256, K))[1]


@pytest.mark.parametrize("name,factory", list(small_factories()), ids=[n for n, _ in small_factories()])
def test_resume_from_iterable_after_crash_equals_uninterrupted(tmp_path, name, factory):
    """Plain (re-creatable) iterables: the trainer skips the batches consumed before the checkpoint.
    The dead window is short so that the real TopK's AuxK term is active across the resume."""
    data = make_data()
    batches = list(data.batches(BS, n_batches=20))

    def crashing():
        for i, b in enumerate(batches):
            if i == 11:
                raise RuntimeError("simulated crash")
            yield b

    short = dict(dead_window_min_tokens=2 * BS, dead_window_fraction=0.0, log_every=2)
    c = cfg(checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4, resume=True, **short)
    with pytest.raises(RuntimeError, match="simulated"):
        one_thread(lambda: train(factory(), crashing(), c))
    assert latest_checkpoint(tmp_path / "ck").name == "step_000000008"
    resumed = one_thread(lambda: train(factory(seed=99), iter(batches), c))["sae"]
    ref = one_thread(lambda: train(factory(), iter(batches), cfg(**short)))["sae"]
    sr, sf = state(resumed), state(ref)
    assert all(torch.equal(sr[k], sf[k]) for k in sf)


SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from safetensors.torch import save_file
    from test_train import BS, D, K, N, RecordingTopK, make_data, make_dict
    from sae.training import TrainConfig, train

    out, cfg = sys.argv[1], TrainConfig(**json.loads(sys.argv[2]))
    kill_at = int(os.environ.get("KILL_AT_STEP", "-1"))
    data = make_data()

    def stream(start):
        for i, b in enumerate(data.batches(BS, start_step=start), start):
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no atexit, no flush
            yield b

    if os.environ.get("TEST_MODEL") == "topk":  # the real TopK SAE with AuxK
        from sae.architectures import TopKSAE
        torch.manual_seed(0)
        model = TopKSAE(d_in=D, n_latents=N, k=K)
    else:
        model = make_dict(cls=RecordingTopK)
    model = train(model, stream, cfg)["sae"]
    if int(os.environ.get("RANK", "0")) == 0:
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, out,
                  metadata={{"world": str(world), "rows": str(getattr(model, "rows_seen", 0))}})
""")


def _script(tmp_path):
    path = tmp_path / "run_train.py"
    path.write_text(SCRIPT.format(tests=str(TESTS)))
    return path


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    script = _script(tmp_path)
    kw = dict(total_tokens=BS * 20, batch_size=BS, lr=1e-2, warmup_steps=2, log_every=2, progress=False,
              device="cpu", calibration_tokens=2 * BS, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=4,
              resume=True)
    out = tmp_path / "resumed.safetensors"
    killed = subprocess.run([sys.executable, str(script), str(out), json.dumps(kw)], env=_env(KILL_AT_STEP="10"),
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert latest_checkpoint(tmp_path / "ck").name == "step_000000008"
    assert not out.exists()
    done = subprocess.run([sys.executable, str(script), str(out), json.dumps(kw)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    data = make_data()                                         # the same data the script trained on
    ref_cfg = TrainConfig(**{**kw, "checkpoint_dir": str(tmp_path / "ref"), "resume": False})
    ref = one_thread(lambda: train(make_dict(), data.stream(BS), ref_cfg))["sae"]
    got = load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in state(ref).items())
    # the metrics file of the resumed run matches the uninterrupted one (lines after the last
    # checkpoint that the killed run wrote were dropped, not duplicated)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "ck" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "ref" / "metrics.jsonl"))


def test_data_parallel_two_processes_equals_single(tmp_path):
    script = _script(tmp_path)
    kw = dict(total_tokens=BS * 12, batch_size=BS, lr=1e-2, warmup_steps=2, log_every=4, progress=False,
              device="cpu", calibration_tokens=2 * BS)
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), json.dumps(kw)]
    res = subprocess.run(cmd, env=_env(GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    data = make_data()
    ref = one_thread(lambda: train(make_dict(), data.stream(BS), TrainConfig(**kw)))["sae"]
    got = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["world"] == "2" and f.metadata()["rows"] == str(BS // 2)  # each rank: half
    for k, v in state(ref).items():
        assert torch.allclose(got[k], v, atol=1e-5, rtol=1e-4), (k, (got[k] - v).abs().max())
    moved = (got["W_dec"] - state(make_dict())["W_dec"]).abs().max()
    assert moved > 1e-2                                      # it did train


def test_data_parallel_topk_with_auxk_two_processes_equals_single(tmp_path):
    """The real TopKSAE (FVU loss + AuxK, both normalised by batch variances) under torchrun with
    2 gloo processes ends with the parameters of the single-process run, to float rounding
    (atol 1e-6 + rtol 1e-5 on every parameter after 12 Adam steps; measured max difference 9e-8).
    Before the fix each rank normalised by its own half batch: W_enc differed by 0.05."""
    from sae.architectures import TopKSAE

    script = _script(tmp_path)
    kw = dict(total_tokens=BS * 12, batch_size=BS, lr=1e-2, warmup_steps=2, log_every=1, progress=False,
              device="cpu", calibration_tokens=2 * BS, dead_window_min_tokens=2 * BS, dead_window_fraction=0.0)
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), json.dumps(kw)]
    res = subprocess.run(cmd, env=_env(GLOO_SOCKET_IFNAME="lo", TEST_MODEL="topk"), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    torch.manual_seed(0)
    init = TopKSAE(d_in=D, n_latents=N, k=K)
    start = state(init)
    ref_cfg = TrainConfig(**kw, metrics_file=str(tmp_path / "ref.jsonl"))
    ref = one_thread(lambda: train(init, make_data().stream(BS), ref_cfg))["sae"]
    assert max(r.get("auxk", 0.0) for r in read_metrics(tmp_path / "ref.jsonl")) > 0   # AuxK was active
    got = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["world"] == "2"
    for k, v in state(ref).items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=1e-5), (k, (got[k] - v).abs().max())
    assert (got["W_dec"] - start["W_dec"]).abs().max() > 1e-2     # it did train


def test_schedule_free_sign_descent_recovers_ground_truth_and_resumes_exactly(tmp_path):
    """optimizer="signsgd": trains (ground truth recovered), exports the averaged weights, and a
    run resumed from a mid-run checkpoint ends bit-identical to an uninterrupted one."""
    from sae.architectures.topk import TopKSAE

    data = SyntheticActivations(d=32, n_features=48, k_candidates=4, keep_prob=1.0, seed=2, calibration_tokens=BLOCK)

    def run(directory, total):
        torch.manual_seed(0)
        model = TopKSAE(d_in=32, n_latents=96, k=4)
        c = cfg(total_tokens=256 * total, batch_size=256, lr=None, warmup_steps=10, optimizer="signsgd",
                checkpoint_dir=str(directory), checkpoint_every=100, resume=True)
        return one_thread(lambda: train(model, data.stream(256), c))["sae"]

    full = run(tmp_path / "full", 300)
    assert mmcs(data.directions, full.W_dec.detach()) >= 0.9
    assert fvu(full, data.sample(4096, stream=1)) < 0.15
    assert torch.get_float32_matmul_precision() == "highest"  # the trainer restores the global setting
    run(tmp_path / "cut", 300)  # same settings; then delete the last checkpoint and the export and resume
    import shutil

    for step_dir in sorted((tmp_path / "cut").glob("step_*"))[1:]:
        shutil.rmtree(step_dir)
    shutil.rmtree(tmp_path / "cut" / "dictionaries", ignore_errors=True)
    left = [p.name for p in (tmp_path / "cut").glob("step_*")]
    assert len(left) == 1 and left[0] != "step_000000300", left  # resume from mid-run
    resumed = run(tmp_path / "cut", 300)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
