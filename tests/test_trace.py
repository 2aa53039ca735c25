"""Greedy tracing from one feature (Cunningham et al. 2023): the traced upstream nodes matter."""
import networkx as nx
import numpy as np
import pytest
import torch

from circuits.evaluate import ablation_effects, check_edges, ranking_agreement
from circuits.rendering import to_dot
from circuits.trace import trace_feature
from interventions.spliced import run_spliced
from sae.architectures import TopKSAE
from sae.baselines import IdentityDictionary
from sae.dictionary import activation_scale
from sae.models import tiny_model

SITES = ["resid.0", "resid.1", "resid.2"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", n_layers=3, d_model=32, initializer_range=0.2)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, 250, (6, 8), generator=g)
    sample = run_spliced(model, {s: IdentityDictionary(32) for s in SITES},
                         torch.randint(2, 250, (32, 8), generator=g), logits=False)
    dicts = {}
    for i, s in enumerate(SITES):
        torch.manual_seed(20 + i)
        x = sample.acts[s][:, 1:].reshape(-1, 32)
        scale = activation_scale(x)
        dicts[s] = TopKSAE(32, 48, k=6).init_from_data(x * scale).fold_scale(scale).eval()
    codes = run_spliced(model, dicts, ids, logits=False).codes["resid.2"]
    target = int(codes.sum((0, 1)).argmax())          # the most active feature at the last site
    return model, dicts, ids, target


def test_trace_returns_a_circuit_graph(setup):
    model, dicts, ids, target = setup
    tid = f"resid.2/f{target}"
    g = trace_feature(model, dicts, ids, tid, k=3)
    assert isinstance(g, nx.DiGraph) and nx.is_directed_acyclic_graph(g)
    assert g.graph["target"] == tid and g.graph["method"] == "trace" and g.graph["sites"] == SITES
    assert g.nodes[tid]["effect"] > 0                                    # its mean summed activation
    sites = {d["site"] for n, d in g.nodes(data=True) if n != tid}
    assert sites == {"resid.0", "resid.1"}
    for n, d in g.nodes(data=True):
        assert {"kind", "site", "layer", "order", "feature", "position", "effect", "label", "activation",
                "frequency"} <= set(d)
        assert d["kind"] in ("feature", "error") and d["label"] == n and d["position"] is None
        assert d["layer"] == int(d["site"].split(".")[1]) and d["order"] == SITES.index(d["site"]) + 1
        assert (d["feature"] == "error") == (d["kind"] == "error") == n.endswith("/err")
        if n != tid:
            assert "ablation_effect" in d
    # edges go one traced site up; at most k into each downstream node; every node reaches the target
    for u, v, w in g.edges(data="weight"):
        assert SITES.index(g.nodes[v]["site"]) == SITES.index(g.nodes[u]["site"]) + 1 and w != 0
    assert all(g.in_degree(n) <= 3 for n in g.nodes)
    assert g.in_degree(tid) == 3
    assert all(nx.has_path(g, n, tid) for n in g.nodes)
    # error nodes are not expanded
    assert all(g.in_degree(n) == 0 for n, d in g.nodes(data=True) if d["kind"] == "error")
    # it renders
    assert tid in to_dot(g).source


def test_top_traced_feature_matters_more_than_random_ones(setup):
    model, dicts, ids, target = setup
    tid = f"resid.2/f{target}"
    g = trace_feature(model, dicts, ids, tid, k=3, include_errors=False, verify=False)
    feats = [u for u in g.predecessors(tid)]
    top = max(feats, key=lambda u: abs(g.edges[u, tid]["weight"]))
    clean = run_spliced(model, dicts, ids, logits=False).codes["resid.1"]
    active = [f for f in range(48) if clean[..., f].abs().sum() > 0 and f"resid.1/f{f}" not in g]
    rng = np.random.default_rng(0)
    randoms = [f"resid.1/f{f}" for f in rng.choice(active, size=min(8, len(active)), replace=False)]
    eff = ablation_effects(model, {s: dicts[s] for s in ("resid.1", "resid.2")}, ids, tid, [top] + randoms,
                           ablation="zero")
    assert abs(eff[top]) > 0.05 * abs(g.nodes[tid]["effect"])             # ablating it moves the target
    assert abs(eff[top]) > np.abs(eff[randoms].values).max()                # more than any random one


def test_verified_effects_follow_the_attributions(setup):
    model, dicts, ids, target = setup
    tid = f"resid.2/f{target}"
    g = trace_feature(model, dicts, ids, tid, k=4, ablation="zero")
    others = [n for n in g.nodes if n != tid]
    measured = {n: g.nodes[n]["ablation_effect"] for n in others}
    # the stored verification is the exact ablation effect on the target's activation
    direct = ablation_effects(model, dicts, ids, tid, others[:3], ablation="zero")
    for n in others[:3]:
        assert measured[n] == pytest.approx(direct[n], rel=1e-5, abs=1e-6)
    agree = ranking_agreement({n: g.nodes[n]["effect"] for n in others}, measured, k=3)
    assert agree["spearman"] > 0.5
    # edge weights into the target: first-order estimates of the exact direct edge ablations
    edges = [(u, tid) for u in g.predecessors(tid)]
    df = check_edges(model, dicts, ids, tid, g, edges, ablation="zero")
    assert df["measured"].notna().all()
    top = df.iloc[df["weight"].abs().argmax()]
    assert np.sign(top["weight"]) == np.sign(top["measured"])


def test_positions_and_mean_ablation(setup):
    model, dicts, ids, target = setup
    tid = f"resid.2/f{target}@7"
    g = trace_feature(model, dicts, ids, tid, k=2, keep_positions=True, ablation="mean", depth=1,
                      verify=False)
    assert g.graph["per_position"] is True and g.graph["sites"] == ["resid.1", "resid.2"]
    ups = [n for n in g.nodes if n != tid]
    assert ups and all("@" in n and g.nodes[n]["position"] <= 7 for n in ups)
    assert {g.nodes[n]["site"] for n in ups} == {"resid.1"}                 # depth=1: one site up
    # sites= picks the traced sites; non-adjacent sites are joined through the model
    g2 = trace_feature(model, dicts, ids, f"resid.2/f{target}", sites=["resid.0"], k=2, verify=False)
    assert {d["site"] for n, d in g2.nodes(data=True)} == {"resid.0", "resid.2"}


def test_trace_errors(setup):
    model, dicts, ids, target = setup
    with pytest.raises(ValueError, match="feature node"):
        trace_feature(model, dicts, ids, "resid.2/err")
    with pytest.raises(ValueError, match="no dictionary"):
        trace_feature(model, dicts, ids, "mlp.2/f3")
    with pytest.raises(ValueError, match="not upstream"):
        trace_feature(model, dicts, ids, "resid.1/f3", sites=["resid.2"])
    with pytest.raises(ValueError, match="nothing to trace"):
        trace_feature(model, dicts, ids, "resid.0/f3")
    with pytest.raises(ValueError, match="unknown ablation"):
        trace_feature(model, dicts, ids, "resid.2/f3", ablation="patch")
    with pytest.raises(ValueError, match="out of range"):
        trace_feature(model, dicts, ids, "resid.2/f3@40")
    with pytest.raises(ValueError, match="out of range"):
        trace_feature(model, dicts, ids, "resid.2/f300")
    codes = run_spliced(model, dicts, ids, logits=False).codes["resid.2"]
    dead = int((codes != 0).sum((0, 1)).argmin())
    if not (codes[..., dead] != 0).any():
        with pytest.raises(ValueError, match="zero on every input"):
            trace_feature(model, dicts, ids, f"resid.2/f{dead}")
