"""Node attribution (circuits.attribution) against exact activation patching on tiny models."""
import pytest
import torch
from torch import nn

from circuits.attribution import NodeEffects, node_effects
from sae.architectures import TopKSAE
from sae.baselines import PCADictionary, RandomDictionary
from sae.models import load_model, tiny_model
from circuit_helpers import pair, topk_dicts

SITES = ["resid.0", "attn.1", "mlp.1", "resid.1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on loaded shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metric(logits):  # [batch, pos, vocab] -> [batch]
    return logits[:, -1, 5] - logits[:, -1, 11]


def float64(small):
    return load_model(small.hf, tokenizer=small.tokenizer, dtype=torch.float64)


@pytest.fixture(scope="module")
def gpt2_64():
    """A float64 tiny GPT-2 (Llama's RMSNorm computes in float32 whatever the model dtype)."""
    return float64(tiny_model("gpt2", n_layers=2, d_model=32))


@pytest.fixture(scope="module")
def linear_gpt2():
    """A tiny GPT-2 that is affine in its input embeddings: identity MLP activation, identity
    norms, and zero query/key weights (so attention patterns are uniform and constant)."""
    small = tiny_model("gpt2", n_layers=2, d_model=32, activation_function="linear", initializer_range=0.3)
    hf = small.hf
    for block in hf.transformer.h:
        block.ln_1, block.ln_2 = nn.Identity(), nn.Identity()
        with torch.no_grad():
            block.attn.c_attn.weight[:, :64] = 0  # columns of q and k
            block.attn.c_attn.bias[:64] = 0
    hf.transformer.ln_f = nn.Identity()
    return float64(small)




def corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


# --- estimates against exact patching -----------------------------------------------------------
@pytest.mark.parametrize("per_position", [False, True])
def test_atp_equals_exact_patching_on_a_linear_model(linear_gpt2, per_position):
    torch.manual_seed(0)
    sample = torch.randn(256, 32, dtype=torch.float64)
    dicts = {"embed": PCADictionary.fit(sample, 12), "resid.0": RandomDictionary.fit(sample, 20),
             "attn.1": RandomDictionary.fit(sample, 40), "mlp.1": PCADictionary.fit(sample, 16),
             "resid.1": PCADictionary.fit(sample * torch.linspace(0.2, 3, 32, dtype=torch.float64), 8)}
    ids, cf = pair()
    atp = node_effects(linear_gpt2, dicts, ids, cf, metric, method="atp", per_position=per_position)
    exact = node_effects(linear_gpt2, dicts, ids, cf, metric, method="exact", per_position=per_position)
    ig = node_effects(linear_gpt2, dicts, ids, cf, metric, method="ig", steps=2, per_position=per_position)
    ig_input = node_effects(linear_gpt2, dicts, ids, cf, metric, method="ig-input", steps=2,
                            per_position=per_position)
    assert abs(exact.delta_metric) > 1e-3
    for s in dicts:
        assert atp.effects[s].shape == ((5, dicts[s].n_latents + 1) if per_position else (dicts[s].n_latents + 1,))
        assert exact.effects[s].abs().max() > 1e-6
        torch.testing.assert_close(atp.effects[s], exact.effects[s], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(ig.effects[s], exact.effects[s], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(ig_input.effects[s], exact.effects[s], rtol=1e-7, atol=1e-10)
    assert exact.effects["mlp.1"][..., -1].abs().max() > 1e-6  # the error node is patched too
    torch.testing.assert_close(atp.inputs, exact.inputs, rtol=1e-7, atol=1e-10)
    # a linear model is additive: the effects at a resid site sum to the whole change
    assert atp.total("resid.1") == pytest.approx(atp.delta_metric, rel=1e-7)


def test_atp_correlates_with_exact_patching_for_small_deltas(gpt2_64):
    """Counterfactual tokens whose embeddings are a small perturbation of the clean ones."""
    small = tiny_model("gpt2", n_layers=2, d_model=32)
    model = float64(small)
    ids, cf = pair(batch=2, pos=6, swap=(1, 4))
    with torch.no_grad():
        wte = model.hf.transformer.wte.weight
        g = torch.Generator().manual_seed(3)
        for row in range(2):
            for q in (1, 4):
                wte[cf[row, q]] = wte[ids[row, q]] + 0.05 * wte.std() * torch.randn(32, generator=g).double()
    dicts = topk_dicts(SITES)
    atp = node_effects(model, dicts, ids, cf, metric, method="atp", per_position=True)
    exact = node_effects(model, dicts, ids, cf, metric, method="exact", per_position=True)
    for s in SITES:
        assert exact.effects[s].abs().max() > 0
        assert corr(atp.effects[s], exact.effects[s]) >= 0.9, s
    assert corr(atp.inputs, exact.inputs) >= 0.9


def test_integrated_gradients_are_complete(gpt2_64):
    """At a site every path crosses (resid.L, the input), IG effects sum to m(cf) - m(clean)."""
    dicts = topk_dicts(["resid.0", "mlp.1", "resid.1"])
    ids, cf = pair(batch=2, pos=5, swap=(2, 4))
    ig = node_effects(gpt2_64, dicts, ids, cf, metric, method="ig")
    dm = ig.delta_metric
    assert abs(dm) > 1e-4
    for s in ("resid.0", "resid.1"):
        assert ig.total(s) == pytest.approx(dm, rel=0.05), s
    assert float(ig.inputs.sum()) == pytest.approx(dm, rel=0.05)
    # more steps converge further; AtP (one gradient) is not complete
    fine = node_effects(gpt2_64, dicts, ids, cf, metric, method="ig", steps=30)
    assert abs(fine.total("resid.0") - dm) <= abs(ig.total("resid.0") - dm) + 1e-12
    atp = node_effects(gpt2_64, dicts, ids, cf, metric, method="atp")
    assert abs(atp.total("resid.0") - dm) > abs(fine.total("resid.0") - dm)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the counting hook itself
def test_input_path_integrated_gradients(gpt2_64):
    """"ig-input": N + 1 forwards and backwards for all sites at once (counted with a hook on the
    first block), complete at the input and at every resid site (its exactness on an affine
    model is checked with atp above)."""
    sites = ["resid.0", "attn.1", "mlp.1", "resid.1"]
    dicts = topk_dicts(sites)
    ids, cf = pair(batch=2, pos=5, swap=(2, 4))
    calls = {"forward": 0, "backward": 0}
    block = gpt2_64.hf.transformer.h[0]
    hooks = [block.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1)),
             block.register_full_backward_hook(lambda *a: calls.__setitem__("backward", calls["backward"] + 1))]
    try:
        joint = node_effects(gpt2_64, dicts, ids, cf, metric, method="ig-input", steps=10, max_rows=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"forward": 2 + 6, "backward": 6}  # clean, cf + 11 points in passes of 2 copies
    dm = joint.delta_metric
    assert abs(dm) > 1e-4
    assert float(joint.inputs.sum()) == pytest.approx(dm, rel=0.05)
    for s in ("resid.0", "resid.1"):
        assert joint.total(s) == pytest.approx(dm, rel=0.05), s
    atp = node_effects(gpt2_64, dicts, ids, cf, metric, method="atp")
    assert abs(atp.total("resid.1") - dm) > 10 * abs(joint.total("resid.1") - dm)


def test_exact_patching_batches_nodes_without_changing_results(gpt2_64):
    dicts = topk_dicts(["mlp.1"])
    ids, cf = pair()
    one = node_effects(gpt2_64, dicts, ids, cf, metric, method="exact", max_rows=2)  # a forward per node
    many = node_effects(gpt2_64, dicts, ids, cf, metric, method="exact", max_rows=512)
    for s in dicts:
        torch.testing.assert_close(one.effects[s], many.effects[s], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(one.inputs, many.inputs)
    # a token that is the same in both inputs has no effect
    assert torch.all(many.inputs[[0, 2, 4]] == 0) and many.inputs[[1, 3]].abs().min() > 0


def test_example_chunks_average_like_one_batch(gpt2_64):
    dicts = topk_dicts(["resid.0", "resid.1"])
    ids, cf = pair(batch=5)
    whole = node_effects(gpt2_64, dicts, ids, cf, metric)
    seen = []

    def rows_metric(logits, rows):  # a metric that needs to know which examples it scores
        seen.append(rows)
        return metric(logits)

    chunked = node_effects(gpt2_64, dicts, ids, cf, rows_metric, batch_size=2)
    assert slice(4, 5) in seen
    for s in dicts:
        torch.testing.assert_close(chunked.effects[s], whole.effects[s], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(chunked.metric_clean, whole.metric_clean)
    assert whole.n_examples == 5


def test_node_effects_container(gpt2_64):
    dicts = topk_dicts(["resid.0", "mlp.1"])
    ids, cf = pair()
    ne = node_effects(gpt2_64, dicts, ids, cf, metric)
    assert isinstance(ne, NodeEffects) and ne.sites == ["resid.0", "mlp.1"]
    assert ne.layers == {"resid.0": 0, "mlp.1": 1} and ne.n_layers == 2 and len(ne.tokens) == 5
    assert ne.frequency["resid.0"][:-1].sum() == pytest.approx(6.0)  # TopK: k = 6 active per token
    assert ne.frequency["resid.0"][-1] == 1.0 and ne.activation["resid.0"][-1] > 0  # error: mean ||e||
    sel = ne.select(top_k=3)
    assert all(int(m.sum()) == 3 for m in sel.values())
    assert ne.metric_clean.shape == (2,) and "atp" in repr(ne)


# --- bad inputs -----------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(gpt2_64):
    dicts = topk_dicts(["resid.0"])
    ids, cf = pair()
    with pytest.raises(ValueError, match=r"one value per example.*\(2,\).*shape \(\)"):
        node_effects(gpt2_64, dicts, ids, cf, lambda lg: metric(lg).mean())
    with pytest.raises(ValueError, match=r"one value per example.*\(2, 258\)"):
        node_effects(gpt2_64, dicts, ids, cf, lambda lg: lg[:, -1])
    with pytest.raises(ValueError, match="one value per example"):
        node_effects(gpt2_64, dicts, ids, cf, lambda lg: 1.0)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 5\).*\(2, 6\)"):
        node_effects(gpt2_64, dicts, ids, torch.cat([cf, cf[:, :1]], 1), metric)
    with pytest.raises(ValueError, match="does not depend on the logits"):
        node_effects(gpt2_64, dicts, ids, cf, lambda lg: torch.zeros(lg.shape[0], dtype=lg.dtype))
    with pytest.raises(ValueError, match="unknown method"):
        node_effects(gpt2_64, dicts, ids, cf, metric, method="acdc")
    with pytest.raises(ValueError, match="steps"):
        node_effects(gpt2_64, dicts, ids, cf, metric, method="ig", steps=0)
    with pytest.raises(TypeError, match="metric must be a function"):
        node_effects(gpt2_64, dicts, ids, cf, "logit_diff")
    with pytest.raises(ValueError, match="d_in=16"):
        node_effects(gpt2_64, {"resid.0": TopKSAE(16, 32, k=4)}, ids, cf, metric)


# --- the per-position mean reference --------------------------------------------------------------
def test_mean_reference_effects_are_exact_mean_ablations(gpt2_64):
    """counterfactual="mean": exact effects equal circuits.evaluate's single-node mean ablations,
    IG is complete at the last residual site. (On an affine model every mean-reference effect
    averages to 0 over the examples, so there is no linear-model check.)"""
    from circuits.evaluate import ablation_effects
    from interventions.means import token_mean
    from interventions.spliced import run_spliced

    dicts = topk_dicts(["resid.0", "mlp.1", "resid.1"])
    ids, _ = pair(batch=3, pos=5)
    exact = node_effects(gpt2_64, dicts, ids, "mean", metric, method="exact", per_position=True)
    nodes = ["resid.0/f3@1", "mlp.1/f7@4", "resid.1/f0@2", "resid.1/err@3", "mlp.1/err@0"]
    ablated = ablation_effects(gpt2_64, dicts, ids, metric, nodes, ablation="mean")
    run = run_spliced(gpt2_64, dicts, ids)
    for name, want in ablated.items():
        site, rest = name.split("/")
        node, q = rest.split("@")
        j = dicts[site].n_latents if node == "err" else int(node[1:])
        assert exact.effects[site][int(q), j] == pytest.approx(want, rel=1e-6, abs=1e-9), name
    assert ablated.abs().max() > 1e-4
    # the reference is the per-position mean clean value: AtP's delta at a code is mean - clean
    c = run.codes["resid.1"]
    assert exact.activation["resid.1"][:, :-1] == pytest.approx(token_mean(c, per_position=True), abs=1e-9)
    ig = node_effects(gpt2_64, dicts, ids, "mean", metric, method="ig", steps=20, per_position=True)
    assert ig.total("resid.1") == pytest.approx(ig.delta_metric, rel=0.02)   # m(resid.1 := mean) - m(clean)
    assert abs(ig.delta_metric) > 1e-3
    # input nodes: the token embedding at each position set to its mean over the examples
    assert ig.inputs.abs().max() > 0 and corr(ig.inputs, exact.inputs) >= 0.9


def test_mean_reference_edges_use_mean_deltas(gpt2_64):
    """Edge weights with the mean reference equal those with an explicit counterfactual whose
    every site already sits at the mean: checked through the node effects they sum to."""
    from circuits.edges import edge_effects

    dicts = topk_dicts(["resid.0", "resid.1"])
    ids, _ = pair(batch=3, pos=5)
    nodes = node_effects(gpt2_64, dicts, ids, "mean", metric, method="atp", per_position=True)
    edges = edge_effects(gpt2_64, dicts, ids, "mean", metric, per_position=True)
    # resid.0 -> resid.1 plus resid.0 -> metric is resid.0's total AtP effect (every path crosses
    # resid.1 or goes straight to the metric): the edges carry the same mean deltas
    w = edges.weights[("resid.0", "resid.1")].to_dense()          # [p, n1+1, p, n0+1]
    into = w.sum((0, 1)) + edges.to_metric["resid.0"]
    torch.testing.assert_close(into, nodes.effects["resid.0"], rtol=1e-6, atol=1e-9)
