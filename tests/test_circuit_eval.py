"""Circuit evaluation: faithfulness/completeness, threshold curves, edge and node checks, rankings.

Reference computations use plain PyTorch forward hooks on the transformers model (no nnsight,
no run_spliced), so they check the spliced machinery independently."""
import math

import networkx as nx
import numpy as np
import pandas as pd
import pytest
import torch

from circuits.evaluate import (Node, ablation_effects, check_edges, check_nodes, faithfulness, faithfulness_curve,
                               parse_node, ranking_agreement)
from sae.architectures import TopKSAE
from sae.dictionary import activation_scale
from sae.models import tiny_model

SITES = ["resid.0", "resid.1", "resid.2"]
N_LATENTS = 48
A, B = 70, 80            # metric tokens


# --- fixtures and references ---------------------------------------------------------------------
def hooked(model, ids, edits=None, record=()):
    """(logits, {site: activation}) of a plain forward where edits[site](x) replaces the site's
    activation [batch, pos, d] and the activations of `record` sites (after edits) are saved."""
    edits, saved, handles = dict(edits or {}), {}, []
    for name in set(edits) | set(record):
        site = model.sites[name]
        module = model.hf.get_submodule(site.module)
        fn = edits.get(name)

        def change(x, name=name, fn=fn):
            y = fn(x) if fn is not None else x
            saved[name] = y.detach()
            return y

        if site.io == "input":
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, change=change: (change(args[0]),) + tuple(args[1:])))
        elif site.tuple_index is None:
            handles.append(module.register_forward_hook(lambda mod, args, out, change=change: change(out)))
        else:
            handles.append(module.register_forward_hook(
                lambda mod, args, out, change=change: (change(out[0]),) + tuple(out[1:])))
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, saved


def metric(logits):
    return logits[:, -1, A] - logits[:, -1, B]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", n_layers=3, d_model=32, initializer_range=0.2)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, 250, (6, 8), generator=g)
    cf = torch.randint(2, 250, (6, 8), generator=g)
    _, acts = hooked(model, torch.randint(2, 250, (32, 8), generator=g), record=SITES)
    dicts = {}
    for i, s in enumerate(SITES):
        torch.manual_seed(10 + i)
        x = acts[s][:, 1:].reshape(-1, 32)
        scale = activation_scale(x)
        d = TopKSAE(32, N_LATENTS, k=6).init_from_data(x * scale).fold_scale(scale)
        dicts[s] = d.eval()
    return model, dicts, ids, cf


def all_nodes(dicts, positions=None):
    out = []
    for s, d in dicts.items():
        for p in (positions or [None]):
            out += [Node(s, f, p) for f in range(d.n_latents)] + [Node(s, "error", p)]
    return out


def means(dicts, acts):
    """Per-position mean codes [p, n] and errors [p, d] of each site over the batch."""
    out = {}
    for s, d in dicts.items():
        with torch.no_grad():
            c = d.encode(acts[s])
            e = acts[s] - d.decode(c)
        out[s] = (c.mean(0), e.mean(0))
    return out


# --- an independent ablation engine: explicit hooks, explicit node loops ------------------------------
def reference_values(model, dicts, ids, ablation="mean", per_position=True, cf=None):
    """{site: (codes [b, p, n], errors [b, p, d])} that ablated nodes take, from a plain forward of
    the inputs (mean: over the batch, per position or over all tokens), zeros, or the
    counterfactual's own values (patch)."""
    _, acts = hooked(model, cf if ablation == "patch" else ids, record=list(dicts))
    out = {}
    for s, d in dicts.items():
        with torch.no_grad():
            c = d.encode(acts[s])
            e = acts[s] - d.decode(c)
        if ablation == "zero":
            c, e = torch.zeros_like(c), torch.zeros_like(e)
        elif ablation == "mean":
            dims = (0,) if per_position else (0, 1)
            c, e = c.mean(dims, keepdim=True).expand_as(c), e.mean(dims, keepdim=True).expand_as(e)
        out[s] = (c, e)
    return out


def expand(nodes, dicts, p):
    """{(site, feature or "error", position)} with position None spelled out as every position."""
    out = set()
    for site, feature, position in nodes:
        for q in (range(p) if position is None else [position]):
            out.add((site, feature, q))
    return out


def every_node(dicts, p):
    return {(s, f, q) for s, d in dicts.items() for q in range(p) for f in [*range(d.n_latents), "error"]}


def hooked_metric(model, dicts, ids, keep, ref):
    """mean_b m with every (site, feature, position) outside `keep` set to its reference value,
    sites rewritten in forward order by hooks: x -> decode(c') + e' with c = encode(x) computed
    from the already-ablated upstream run."""
    p = ids.shape[1]
    keep = expand(keep, dicts, p)

    def edit_for(s):
        d = dicts[s]
        kc = torch.zeros(p, d.n_latents, dtype=torch.bool)
        ke = torch.zeros(p, dtype=torch.bool)
        for site, feature, q in keep:
            if site != s:
                continue
            if feature == "error":
                ke[q] = True
            else:
                kc[q, feature] = True

        def edit(x):
            with torch.no_grad():
                c = d.encode(x)
                e = x - d.decode(c)
                rc, re_ = ref[s]
                return d.decode(torch.where(kc, c, rc)) + torch.where(ke[:, None], e, re_)
        return edit
    logits, _ = hooked(model, ids, {s: edit_for(s) for s in dicts})
    return float(metric(logits).mean())


def random_circuit(dicts, p, n, seed):
    """n nodes: features and errors, at one position or at all (None)."""
    rng = np.random.default_rng(seed)
    sites = list(dicts)
    out = set()
    while len(out) < n:
        s = sites[rng.integers(len(sites))]
        f = "error" if rng.random() < 0.15 else int(rng.integers(dicts[s].n_latents))
        out.add((s, f, None if rng.random() < 0.5 else int(rng.integers(p))))
    return sorted(out, key=str)


# --- faithfulness and completeness ---------------------------------------------------------------
@pytest.mark.parametrize("ablation,per_position", [("mean", True), ("mean", False), ("zero", True), ("patch", True)])
def test_faithfulness_and_completeness_match_a_hooked_reference(setup, ablation, per_position):
    """m(C), m(M \\ C), m(M) and m(∅) for M, ∅ and a random three-site circuit (features and errors,
    per position and aggregated) against `hooked_metric`, and the ratios from those."""
    model, dicts, ids, cf = setup
    p = ids.shape[1]
    ref = reference_values(model, dicts, ids, ablation, per_position, cf)
    m_full = float(metric(hooked(model, ids)[0]).mean())
    m_empty = hooked_metric(model, dicts, ids, [], ref)
    options = dict(ablation=ablation, per_position=per_position, reference=cf if ablation == "patch" else None)
    everything = every_node(dicts, p)
    chosen = random_circuit(dicts, p, 40, seed=0)
    for circuit in ([], sorted(everything, key=str), chosen):
        score = faithfulness(model, dicts, ids, metric, [Node(*n).id for n in circuit], **options)
        m_c = hooked_metric(model, dicts, ids, circuit, ref)
        m_comp = hooked_metric(model, dicts, ids, everything - expand(circuit, dicts, p), ref)
        for got, want in ((score.m_circuit, m_c), (score.m_complement, m_comp), (score.m_full, m_full),
                          (score.m_empty, m_empty)):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert score.faithfulness == pytest.approx((m_c - m_empty) / (m_full - m_empty), rel=1e-3, abs=1e-4)
        assert score.completeness == pytest.approx((m_comp - m_empty) / (m_full - m_empty), rel=1e-3, abs=1e-4)
        assert score.n_nodes == len(circuit)
    # the random circuit is neither M nor ∅ for the metric, so the comparison above can fail
    assert abs(m_full - m_empty) > 1e-3
    m_c = hooked_metric(model, dicts, ids, chosen, ref)
    assert min(abs(m_c - m_empty), abs(m_c - m_full)) > 1e-3 * abs(m_full - m_empty)


def test_circuit_metric_matches_a_hooked_forward(setup):
    model, dicts, ids, _ = setup
    one = {"resid.1": dicts["resid.1"]}
    d = dicts["resid.1"]
    keep = [3, 7, 11, 20]
    circuit = [f"resid.1/f{i}" for i in keep] + ["resid.1/err@7"]   # the error kept at the last position only
    score = faithfulness(model, one, ids, metric, circuit)
    _, acts = hooked(model, ids, record=["resid.1"])
    mc, me = means(one, acts)["resid.1"]                                 # [p, n], [p, d]

    def edit(x):
        with torch.no_grad():
            c = d.encode(x)
            e = x - d.decode(c)
            mask = torch.zeros_like(c, dtype=torch.bool)
            mask[..., keep] = True
            c2 = torch.where(mask, c, mc)
            e2 = me.expand_as(e).clone()
            e2[:, 7] = e[:, 7]
            return d.decode(c2) + e2
    logits, _ = hooked(model, ids, {"resid.1": edit})
    assert score.m_circuit == pytest.approx(float(metric(logits).mean()), rel=1e-4, abs=1e-5)
    # and the empty circuit replaces the whole site by its per-position mean
    logits, _ = hooked(model, ids, {"resid.1": lambda x: x.mean(0, keepdim=True).expand_as(x)})
    assert score.m_empty == pytest.approx(float(metric(logits).mean()), rel=1e-4, abs=1e-5)


def test_patching_every_node_that_differs_restores_the_clean_run(setup):
    """Patch ablation: nodes whose clean and counterfactual values agree need not be in C. The
    circuit of all (site, feature, position) nodes that differ keeps m(M) exactly, although
    every node outside it is set to the counterfactual's value at every site; drop one of its
    strongest nodes and the metric moves."""
    from interventions.spliced import run_spliced

    model, dicts, ids, cf = setup
    a, b = run_spliced(model, dicts, ids, logits=False), run_spliced(model, dicts, cf, logits=False)
    differ = []
    for s in dicts:
        for q, j in (a.codes[s] != b.codes[s]).any(0).nonzero().tolist():
            differ.append(Node(s, j, q))
        differ += [Node(s, "error", q) for q in (a.errors[s] != b.errors[s]).any(-1).any(0).nonzero()[:, 0].tolist()]
    total = sum(d.n_latents + 1 for d in dicts.values()) * ids.shape[1]
    assert 0 < len(differ) < total
    kept = faithfulness(model, dicts, ids, metric, differ, ablation="patch", reference=cf)
    assert kept.faithfulness == pytest.approx(1.0, abs=1e-9) and kept.m_circuit == pytest.approx(kept.m_full, abs=1e-9)
    last_error = Node(list(dicts)[-1], "error", ids.shape[1] - 1)
    assert last_error in differ
    dropped = faithfulness(model, dicts, ids, metric, [n for n in differ if n != last_error], ablation="patch",
                           reference=cf)
    assert abs(dropped.m_circuit - kept.m_full) > 1e-4


def test_zero_and_patch_ablations(setup):
    model, dicts, ids, cf = setup
    one = {"resid.1": dicts["resid.1"]}
    zero = faithfulness(model, one, ids, metric, [], ablation="zero")    # codes 0, error 0: x := b_dec
    logits, _ = hooked(model, ids, {"resid.1": lambda x: dicts["resid.1"].b_dec.detach().expand_as(x)})
    assert zero.m_empty == pytest.approx(float(metric(logits).mean()), rel=1e-4, abs=1e-5)
    # patching every node of a residual site with the counterfactual's gives the counterfactual run
    patch = faithfulness(model, one, ids, metric, [], ablation="patch", reference=cf)
    cf_logits, _ = hooked(model, cf)
    assert patch.m_empty == pytest.approx(float(metric(cf_logits).mean()), rel=1e-4, abs=1e-5)
    # one mean over all tokens differs from per-position means
    token = faithfulness(model, one, ids, metric, [], per_position=False)
    assert token.m_empty != pytest.approx(faithfulness(model, one, ids, metric, []).m_empty, abs=1e-6)


def graph_of(nodes_effects, edges=()):
    g = nx.DiGraph()
    for nid, eff in nodes_effects.items():
        n = parse_node(nid)
        g.add_node(nid, kind="error" if n.feature == "error" else "feature", site=n.site,
                   layer=int(n.site.split(".")[1]), feature=n.feature, position=n.position, effect=eff,
                   label=nid)
    g.add_node("metric", kind="metric", site="metric", layer=3, feature=None, position=None, effect=0.0,
               label="metric")
    for u, v, w in edges:
        g.add_edge(u, v, weight=w)
    return g


def test_faithfulness_curve(setup):
    model, dicts, ids, _ = setup
    nodes = all_nodes(dicts)
    rng = np.random.default_rng(1)
    effects = {n.id: float(rng.lognormal()) for n in nodes}     # the graph holds every node of M
    graph = graph_of(effects)
    df = faithfulness_curve(model, dicts, ids, metric, graph, batch_size=24)
    assert list(df.columns[:4]) == ["threshold", "n_nodes", "faithfulness", "completeness"]
    assert df["threshold"].is_monotonic_decreasing
    assert df["n_nodes"].is_monotonic_increasing
    last = df.iloc[-1]
    assert last["threshold"] == 0 and last["n_nodes"] == len(nodes)
    assert last["faithfulness"] == pytest.approx(1.0, abs=1e-9)
    assert last["completeness"] == pytest.approx(0.0, abs=1e-9)
    # every row against the hooked reference on its node set
    ref = reference_values(model, dicts, ids)
    p = ids.shape[1]
    everything = every_node(dicts, p)
    m_full = float(metric(hooked(model, ids)[0]).mean())
    m_empty = hooked_metric(model, dicts, ids, [], ref)
    assert df.attrs["m_full"] == pytest.approx(m_full, rel=1e-4, abs=1e-5)
    assert df.attrs["m_empty"] == pytest.approx(m_empty, rel=1e-4, abs=1e-5)
    for i in (0, len(df) // 2, len(df) - 2):
        row = df.iloc[i]
        chosen = [tuple(parse_node(k)) for k, e in effects.items() if e >= row["threshold"]]
        assert row["n_nodes"] == len(chosen)
        m_c = hooked_metric(model, dicts, ids, chosen, ref)
        m_comp = hooked_metric(model, dicts, ids, everything - expand(chosen, dicts, p), ref)
        assert row["m_circuit"] == pytest.approx(m_c, rel=1e-4, abs=1e-5)
        assert row["m_complement"] == pytest.approx(m_comp, rel=1e-4, abs=1e-5)
        assert row["faithfulness"] == pytest.approx((m_c - m_empty) / (m_full - m_empty), rel=1e-3, abs=1e-4)
    assert len({round(f, 6) for f in df["faithfulness"]}) > 3                  # the curve does move


# --- node checks ---------------------------------------------------------------------------------
def test_ablation_effects_match_hooks_and_do_not_depend_on_batching(setup):
    model, dicts, ids, _ = setup
    nodes = ["resid.0/f5", "resid.1/f9@3", "resid.2/err", "resid.1/err@7"]
    small = ablation_effects(model, dicts, ids, metric, nodes, batch_size=1)
    big = ablation_effects(model, dicts, ids, metric, nodes, batch_size=64)
    assert list(small.index) == nodes
    np.testing.assert_allclose(small.values, big.values, atol=1e-6)
    clean_logits, acts = hooked(model, ids, record=SITES)
    m0 = metric(clean_logits)
    mc, me = means({"resid.1": dicts["resid.1"]}, acts)["resid.1"]
    d = dicts["resid.1"]

    def edit(x):                                    # feature 9 at position 3 := its mean
        with torch.no_grad():
            c = d.encode(x)
            out = x.clone()
            out[:, 3] += (mc[3, 9] - c[:, 3, 9])[:, None] * d.W_dec[9]
            return out
    logits, _ = hooked(model, ids, {"resid.1": edit})
    assert small["resid.1/f9@3"] == pytest.approx(float((metric(logits) - m0).mean()), rel=1e-3, abs=1e-6)


def test_check_nodes_against_hooked_ablations_and_scipy_ranks(setup):
    """measured(v) = m(M with v ablated) - m(M) from `hooked_metric`; the agreement statistics
    against scipy's Spearman rho and a hand-counted top-k overlap."""
    from scipy.stats import spearmanr

    model, dicts, ids, _ = setup
    p = ids.shape[1]
    nodes = ["resid.0/f1", "resid.0/f2", "resid.1/f4", "resid.1/err", "resid.2/f6", "resid.2/err@7", "resid.1/f9@3",
             "resid.0/err"]
    ref = reference_values(model, dicts, ids)
    everything = every_node(dicts, p)
    m_full = float(metric(hooked(model, ids)[0]).mean())
    exact = np.array([hooked_metric(model, dicts, ids, everything - expand([tuple(parse_node(n))], dicts, p), ref)
                      - m_full for n in nodes])
    assert np.abs(exact).max() > 1e-3 and len(set(np.round(np.abs(exact), 6))) == len(nodes)
    rng = np.random.default_rng(2)
    attributed = exact * rng.uniform(0.2, 3.0, len(nodes))                      # a different ranking
    df = check_nodes(model, dicts, ids, metric, graph_of(dict(zip(nodes, attributed))), k=3)
    np.testing.assert_allclose(df.set_index("node").loc[nodes, "measured"], exact, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(df.set_index("node").loc[nodes, "effect"], attributed)
    rho = spearmanr(np.abs(attributed), np.abs(exact)).statistic
    assert rho < 0.99 and df.attrs["spearman"] == pytest.approx(rho)
    top = lambda v: set(np.argsort(-np.abs(v), kind="stable")[:3])             # noqa: E731
    assert df.attrs["top_k_overlap"] == len(top(attributed) & top(exact)) / 3
    assert list(df["node"]) == [nodes[i] for i in np.argsort(-np.abs(exact), kind="stable")]


# --- edge checks ---------------------------------------------------------------------------------
def test_edge_check_matches_direct_path_patching(setup):
    model, dicts, ids, cf = setup
    clean_logits, acts = hooked(model, ids, record=SITES + ["embed"])
    m0 = metric(clean_logits)
    ref = means(dicts, acts)
    d0, d1, d2 = (dicts[s] for s in SITES)
    i, j = 4, 9

    def set_code(d, feature, value):       # x + (value - c_f) f_f at every position
        def edit(x):
            with torch.no_grad():
                return x + (value - d.encode(x)[..., feature])[..., None] * d.W_dec[feature]
        return edit

    # resid.0/f4 -> resid.1/f9: ablate upstream, read downstream, patch only that into a clean run
    _, a_run = hooked(model, ids, {"resid.0": set_code(d0, i, ref["resid.0"][0][:, i])}, record=["resid.1"])
    c1a = d1.encode(a_run["resid.1"])[..., j]
    logits, _ = hooked(model, ids, {"resid.1": set_code(d1, j, c1a)})
    direct_ff = float((metric(logits) - m0).mean())

    # resid.1/f9 -> resid.2/err: the error vector of run A patched into a clean run
    _, a_run = hooked(model, ids, {"resid.1": set_code(d1, j, ref["resid.1"][0][:, j])}, record=["resid.2"])
    x2a = a_run["resid.2"]
    e2a = x2a - d2.decode(d2.encode(x2a))
    logits, _ = hooked(model, ids, {"resid.2": lambda x: d2.decode(d2.encode(x)) + e2a})
    direct_fe = float((metric(logits) - m0).mean())

    # resid.2/f3 -> metric: its direct effect (nothing spliced after it) is its ablation effect
    logits, _ = hooked(model, ids, {"resid.2": set_code(d2, 3, ref["resid.2"][0][:, 3])})
    direct_fm = float((metric(logits) - m0).mean())

    graph = graph_of({"resid.0/f4": 0.1, "resid.1/f9": 0.1, "resid.2/err": 0.1, "resid.2/f3": 0.1,
                      "resid.1/f2": 0.1},
                     [("resid.0/f4", "resid.1/f9", 0.3), ("resid.1/f9", "resid.2/err", 0.2),
                      ("resid.2/f3", "metric", 0.1), ("resid.1/f2", "metric", 0.05),
                      ("resid.0/f4", "resid.2/err", 0.01)])
    df = check_edges(model, dicts, ids, metric, graph, top=None).set_index(["source", "target"])
    assert df.loc[("resid.0/f4", "resid.1/f9"), "measured"] == pytest.approx(direct_ff, rel=1e-3, abs=1e-6)
    assert df.loc[("resid.1/f9", "resid.2/err"), "measured"] == pytest.approx(direct_fe, rel=1e-3, abs=1e-6)
    assert df.loc[("resid.2/f3", "metric"), "measured"] == pytest.approx(direct_fm, rel=1e-3, abs=1e-6)
    # resid.1 reaches the logits only through resid.2, which the direct edge holds fixed; likewise
    # resid.0 reaches resid.2 only through resid.1
    assert abs(df.loc[("resid.1/f2", "metric"), "measured"]) < 1e-5
    assert abs(df.loc[("resid.0/f4", "resid.2/err"), "measured"]) < 1e-5
    assert abs(direct_ff) > 1e-4 and abs(direct_fe) > 1e-4 and abs(direct_fm) > 1e-4
    assert df.loc[("resid.0/f4", "resid.1/f9"), "weight"] == 0.3

    # an input token -> feature edge, with the counterfactual token swapped in at position 5
    _, cf_acts = hooked(model, cf, record=["embed"])

    def swap(x):
        out = x.clone()
        out[:, 5] = cf_acts["embed"][:, 5]
        return out
    _, a_run = hooked(model, ids, {"embed": swap}, record=["resid.0"])
    c0a = d0.encode(a_run["resid.0"])[..., 2]
    logits, _ = hooked(model, ids, {"resid.0": set_code(d0, 2, c0a)})
    direct_in = float((metric(logits) - m0).mean())
    graph.add_node("input/5", kind="input", site="input", layer=-1, feature=None, position=5, effect=0.0,
                   label="input/5")
    graph.add_node("resid.0/f2", **{**graph.nodes["resid.0/f4"], "feature": 2, "label": "resid.0/f2"})
    graph.add_edge("input/5", "resid.0/f2", weight=0.1)
    df = check_edges(model, dicts, ids, metric, graph, [("input/5", "resid.0/f2")], ablation="patch", reference=cf)
    assert df["measured"].iloc[0] == pytest.approx(direct_in, rel=1e-3, abs=1e-6)
    assert abs(direct_in) > 1e-5


def test_edge_check_holds_intermediate_sites(setup):
    """resid.0 -> resid.1 with mlp.1 spliced between: the edge is the path that avoids mlp.1."""
    model, dicts, ids, _ = setup
    _, acts = hooked(model, ids, record=["mlp.1"])
    torch.manual_seed(3)
    x = acts["mlp.1"].reshape(-1, 32)
    scale = activation_scale(x)
    mlp = TopKSAE(32, N_LATENTS, k=6).init_from_data(x * scale).fold_scale(scale).eval()
    sub = {"resid.0": dicts["resid.0"], "mlp.1": mlp, "resid.1": dicts["resid.1"]}
    d0, d1 = dicts["resid.0"], dicts["resid.1"]
    clean_logits, clean = hooked(model, ids, record=["resid.0", "mlp.1"])
    m0 = metric(clean_logits)
    mean4 = d0.encode(clean["resid.0"])[..., 4].mean(0)

    def ablate(x):
        with torch.no_grad():
            return x + (mean4 - d0.encode(x)[..., 4])[..., None] * d0.W_dec[4]
    results = {}
    for held in (True, False):
        edits = {"resid.0": ablate, **({"mlp.1": lambda x: clean["mlp.1"]} if held else {})}
        _, a_run = hooked(model, ids, edits, record=["resid.1"])
        c1a = d1.encode(a_run["resid.1"])[..., 9]

        def patch(x, c1a=c1a):
            with torch.no_grad():
                return x + (c1a - d1.encode(x)[..., 9])[..., None] * d1.W_dec[9]
        logits, _ = hooked(model, ids, {"resid.1": patch})
        results[held] = float((metric(logits) - m0).mean())
    graph = graph_of({"resid.0/f4": 0.1, "resid.1/f9": 0.1}, [("resid.0/f4", "resid.1/f9", 0.3)])
    df = check_edges(model, sub, ids, metric, graph)
    assert df["measured"].iloc[0] == pytest.approx(results[True], rel=1e-3, abs=1e-6)
    assert abs(results[True] - results[False]) > 1e-3 * max(abs(results[False]), 1e-3)   # holding matters


def test_edge_check_against_attributed_edge_weights(setup):
    """Graphs from circuits.graph: their AtP edge weights are first-order estimates of the exact
    edge ablations measured here (same counterfactual), so the two rank edges alike."""
    from circuits.attribution import node_effects
    from circuits.edges import edge_effects
    from circuits.graph import build_graph

    model, dicts, ids, cf = setup
    nodes = node_effects(model, dicts, ids, cf, metric, method="atp")
    edges = edge_effects(model, dicts, ids, cf, metric, nodes=nodes.select(top_k=6))
    graph = build_graph(nodes, edges, top_k=6, include_inputs=False)
    df = check_edges(model, dicts, ids, metric, graph, top=30, ablation="patch", reference=cf)
    assert len(df) == 30 and df["measured"].notna().all()
    assert df.attrs["spearman"] > 0.7  # over 30 edges (few-edge rank correlations are noisy)
    big = df.iloc[df["weight"].abs().argmax()]
    assert np.sign(big["weight"]) == np.sign(big["measured"])


# --- rankings --------------------------------------------------------------------------------------
def test_ranking_agreement():
    a = pd.Series({"x": 3.0, "y": -2.0, "z": 1.0, "w": 0.5})
    same = ranking_agreement(a, a, k=2)
    assert same["spearman"] == pytest.approx(1.0) and same["top_k_overlap"] == 1.0 and same["k"] == 2
    rev = ranking_agreement(a, {"x": 0.5, "y": 1.0, "z": 2.0, "w": 3.0}, k=2)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["top_k_overlap"] == 0.0
    signed = ranking_agreement(a, a.abs(), absolute=False)
    assert signed["spearman"] < 1.0                                     # y's sign moves it
    assert ranking_agreement(torch.tensor([1.0, 2, 3]), np.array([10.0, 20, 30]), k=9)["k"] == 3
    with pytest.raises(ValueError, match="different nodes"):
        ranking_agreement(a, a.drop("x"))
    assert math.isnan(ranking_agreement(a, {"x": 1.0, "y": 1.0, "z": 1.0, "w": 1.0})["spearman"])


# --- bad input ------------------------------------------------------------------------------------
def test_clear_errors(setup):
    model, dicts, ids, cf = setup
    with pytest.raises(ValueError, match="one value per example"):
        faithfulness(model, dicts, ids, lambda lg: metric(lg).mean(), [])
    with pytest.raises(ValueError, match="one value per example"):
        faithfulness(model, dicts, ids, lambda lg: metric(lg)[:, None], [])
    with pytest.raises(ValueError, match="same shape|inputs' shape"):
        faithfulness(model, dicts, ids, metric, [], ablation="patch", reference=cf[:3])
    with pytest.raises(ValueError, match="needs reference"):
        faithfulness(model, dicts, ids, metric, [], ablation="patch")
    with pytest.raises(ValueError, match="no dictionary"):
        faithfulness(model, dicts, ids, metric, ["mlp.1/f3"])
    with pytest.raises(ValueError, match="out of range"):
        faithfulness(model, dicts, ids, metric, ["resid.1/f3@99"])
    with pytest.raises(ValueError, match="out of range"):
        faithfulness(model, dicts, ids, metric, ["resid.1/f999"])
    with pytest.raises(ValueError, match="unknown ablation"):
        faithfulness(model, dicts, ids, metric, [], ablation="resample")
    with pytest.raises(ValueError, match="cannot parse node id"):
        faithfulness(model, dicts, ids, metric, ["resid.1:f3"])
    with pytest.raises(ValueError, match="per_position=False"):
        faithfulness(model, dicts, ids, metric, [], reference=ids[:, :5])
    with pytest.raises(ValueError, match="does not move"):
        faithfulness(model, dicts, ids, lambda lg: lg[:, -1, 0] * 0, [])
    graph = graph_of({"resid.1/f2": 1.0, "resid.0/f1": 1.0}, [("resid.1/f2", "resid.0/f1", 1.0)])
    with pytest.raises(ValueError, match="does not go forward"):
        check_edges(model, dicts, ids, metric, graph)
    with pytest.raises(ValueError, match="not an edge"):
        check_edges(model, dicts, ids, metric, graph, [("resid.0/f1", "resid.1/f2")])
