"""Circuit graphs (circuits.graph): attributes, pruning, aggregation, JSON/GraphML round trips."""
import networkx as nx
import pytest
import torch

from circuits.attribution import NodeEffects, node_effects
from circuits.edges import EdgeEffects, edge_effects
from circuits.graph import aggregate_graphs, build_graph, load_graph, node_id, save_graph
from sae.architectures import TopKSAE
from sae.models import tiny_model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on loaded shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic(per_position=False):
    """Two sites: resid.0 (3 features + error) and resid.1 (2 features + error), 3 positions.

        resid.0: f0 0.5, f1 -0.2, f2 0 (no effect), err 0.05      resid.1: f0 0.4, f1 0.01, err -0.3
        edges:  r0/f0 -> r1/f0 0.3, r0/f1 -> r1/f0 -0.1, r0/f0 -> r1/f1 0.005, r0/err -> r1/err 0.02,
                input/1 -> r0/f0 0.2, input/1 -> r0/f1 -0.1, r1/* -> metric (= their effects)
    With per_position, everything sits at position 2."""
    e0 = torch.tensor([0.5, -0.2, 0.0, 0.05])
    e1 = torch.tensor([0.4, 0.01, -0.3])
    at = (lambda t: torch.zeros(3, *t.shape).index_copy(0, torch.tensor([2]), t[None])) if per_position else (lambda t: t)
    nodes = NodeEffects(effects={"resid.0": at(e0), "resid.1": at(e1)}, inputs=torch.tensor([0.0, 0.3, 0.1]),
                        metric_clean=torch.tensor([1.0, 2.0]), metric_cf=torch.tensor([0.5, 1.0]),
                        activation={"resid.0": at(torch.tensor([1.0, 2.0, 0.0, 3.0])),
                                    "resid.1": at(torch.tensor([0.5, 0.25, 4.0]))},
                        frequency={"resid.0": at(torch.tensor([0.5, 0.25, 0.0, 1.0])),
                                   "resid.1": at(torch.tensor([0.75, 0.5, 1.0]))},
                        method="atp", per_position=per_position, tokens=["a", " b", "c"],
                        layers={"resid.0": 0, "resid.1": 1}, n_layers=2)
    down, up, val = [0, 0, 1, 2], [0, 1, 0, 3], [0.3, -0.1, 0.005, 0.02]
    if per_position:
        idx = torch.tensor([[2] * 4, down, [2] * 4, up])
        size, fi = (3, 3, 3, 4), torch.zeros(3, 4, 3)
        fi[2, 0, 1], fi[2, 1, 1] = 0.2, -0.1
    else:
        idx, size, fi = torch.tensor([down, up]), (3, 4), torch.zeros(4, 3)
        fi[0, 1], fi[1, 1] = 0.2, -0.1
    w = torch.sparse_coo_tensor(idx, torch.tensor(val), size, check_invariants=True).coalesce()
    edges = EdgeEffects(weights={("resid.0", "resid.1"): w}, from_input={"resid.0": fi},
                        to_metric={"resid.0": torch.zeros_like(at(e0)), "resid.1": at(e1)},
                        input_to_metric=torch.zeros(3), per_position=per_position, n_backwards=3,
                        n_examples=2, sizes={"resid.0": 4, "resid.1": 3})
    return nodes, edges


def features(g):
    return {v for v, k in g.nodes(data="kind") if k in ("feature", "error")}


# --- attributes -----------------------------------------------------------------------------------
def test_graph_attributes_follow_the_documented_schema():
    nodes, edges = synthetic()
    ann = {"resid.0/f0": {"label": "names", "top_tokens": [" Mary", " John"], "explanation": "person names"}}
    g = build_graph(nodes, edges, annotations=ann)
    assert features(g) == {"resid.0/f0", "resid.0/f1", "resid.0/err", "resid.1/f0", "resid.1/f1", "resid.1/err"}
    assert g.nodes["resid.0/f0"] == dict(kind="feature", site="resid.0", layer=0, order=1, feature=0, position=None,
                                         effect=0.5, label="names", activation=1.0, frequency=0.5,
                                         top_tokens=[" Mary", " John"], explanation="person names")
    err = g.nodes["resid.1/err"]
    assert (err["kind"], err["feature"], err["layer"], err["order"], err["label"]) == ("error", "error", 1, 2, "resid.1/err")
    assert err["effect"] == pytest.approx(-0.3) and err["activation"] == 4.0
    inp = g.nodes["input/1"]
    assert (inp["kind"], inp["site"], inp["layer"], inp["order"], inp["position"], inp["token"]) == \
        ("input", "input", -1, 0, 1, " b")
    assert inp["effect"] == pytest.approx(0.3) and inp["feature"] is None
    met = g.nodes["metric"]
    assert (met["kind"], met["layer"], met["order"], met["effect"], met["activation"]) == ("metric", 2, 3, -0.75, 1.5)
    assert g.edges["resid.0/f0", "resid.1/f0"]["weight"] == pytest.approx(0.3)
    assert g.edges["input/1", "resid.0/f1"]["weight"] == pytest.approx(-0.1)
    assert g.edges["resid.1/err", "metric"]["weight"] == pytest.approx(-0.3)
    assert not g.has_edge("resid.0/f0", "metric")  # zero direct effect: no edge
    assert g.graph["method"] == "atp" and g.graph["sites"] == ["resid.0", "resid.1"] and g.graph["n_prompts"] == 2
    assert g.graph["metric_clean"] == 1.5 and g.graph["metric_cf"] == 0.75
    assert node_id("resid.3", 7, 7, 4) == "resid.3/err@4" and node_id("resid.3", 2, 7) == "resid.3/f2"


def test_per_position_ids_and_attributes():
    nodes, edges = synthetic(per_position=True)
    g = build_graph(nodes, edges)
    assert features(g) == {"resid.0/f0@2", "resid.0/f1@2", "resid.0/err@2", "resid.1/f0@2", "resid.1/f1@2",
                           "resid.1/err@2"}
    assert g.nodes["resid.0/f1@2"]["position"] == 2 and g.nodes["resid.0/f1@2"]["label"] == "resid.0/f1@2"
    assert g.edges["resid.0/f0@2", "resid.1/f0@2"]["weight"] == pytest.approx(0.3)
    assert g.edges["input/1", "resid.0/f0@2"]["weight"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="per_position"):
        build_graph(nodes, synthetic(per_position=False)[1])


# --- pruning -------------------------------------------------------------------------------------
def test_node_thresholds_top_k_and_cumulative_fraction():
    nodes, edges = synthetic()
    assert features(build_graph(nodes, edges, node_threshold=0.25)) == {"resid.0/f0", "resid.1/f0", "resid.1/err"}
    assert features(build_graph(nodes, edges, top_k=1)) == {"resid.0/f0", "resid.1/f0"}
    # total |effect| = 1.46: 50% needs 0.5 + 0.4 = 0.9 >= 0.73; 80% needs also 0.3 (1.2 >= 1.168)
    assert features(build_graph(nodes, edges, node_fraction=0.5)) == {"resid.0/f0", "resid.1/f0"}
    assert features(build_graph(nodes, edges, node_fraction=0.8)) == {"resid.0/f0", "resid.1/f0", "resid.1/err"}
    g = build_graph(nodes, edges, node_fraction=1.0)
    assert len(features(g)) == 6 and "resid.0/f2" not in g  # a node without effect is never kept
    assert {"input/0", "input/1", "input/2", "metric"} <= set(g)  # always kept
    assert "input/0" not in build_graph(nodes, edges, include_inputs=False)


def test_edge_threshold_fraction_and_dead_ends():
    nodes, edges = synthetic()
    g = build_graph(nodes, edges, edge_threshold=0.05)
    # r0/err -> r1/err (0.02) and r1/f1 -> metric (0.01) fall: both nodes lose their path to the metric
    assert features(g) == {"resid.0/f0", "resid.0/f1", "resid.1/f0", "resid.1/err"}
    assert all(abs(w) >= 0.05 for _, _, w in g.edges(data="weight"))
    kept = build_graph(nodes, edges, edge_threshold=0.05, prune_dead_ends=False)
    assert "resid.0/err" in kept and kept.degree("resid.0/err") == 0
    # edge weights: 0.4, 0.3, 0.3, 0.2, 0.1, 0.1, 0.02, 0.01, 0.005 (total 1.435): 50% -> 0.4, 0.3 (one of), ...
    frac = build_graph(nodes, edges, edge_fraction=0.5, prune_dead_ends=False)
    assert frac.number_of_edges() == 3 and min(abs(w) for _, _, w in frac.edges(data="weight")) >= 0.2
    assert build_graph(nodes).number_of_edges() == 0  # nodes only, nothing pruned
    assert len(features(build_graph(nodes))) == 6


def test_empty_graphs_raise_with_a_suggestion():
    nodes, edges = synthetic()
    with pytest.raises(ValueError, match=r"empty.*node_threshold=0\.01 \(the 6-th largest \|effect\|\) keeps 6"):
        build_graph(nodes, edges, node_threshold=1.0)
    with pytest.raises(ValueError, match="no feature or error node has a path to the metric"):
        build_graph(nodes, edges, edge_threshold=10.0)
    with pytest.raises(ValueError, match="node_fraction must be in"):
        build_graph(nodes, edges, node_fraction=1.5)
    with pytest.raises(TypeError, match="NodeEffects"):
        build_graph({"resid.0": torch.ones(3)})


# --- aggregation and files ---------------------------------------------------------------------
def test_aggregate_graphs_averages_effects_and_weights():
    nodes, edges = synthetic()
    full, small = build_graph(nodes, edges), build_graph(nodes, edges, node_threshold=0.25)
    agg = aggregate_graphs([full, small])
    assert agg.nodes["resid.0/f0"]["effect"] == pytest.approx(0.5)          # in both
    assert agg.nodes["resid.0/f1"]["effect"] == pytest.approx(-0.1)         # in one: (−0.2 + 0) / 2
    assert agg.nodes["resid.0/f1"]["activation"] == pytest.approx(2.0)      # mean where present
    assert agg.edges["resid.0/f0", "resid.1/f0"]["weight"] == pytest.approx(0.3)
    assert agg.edges["resid.0/f1", "resid.1/f0"]["weight"] == pytest.approx(-0.05)
    assert agg.graph["n_prompts"] == 4
    with pytest.raises(ValueError, match="non-empty list"):
        aggregate_graphs([])


@pytest.mark.parametrize("suffix", [".json", ".graphml"])
@pytest.mark.parametrize("per_position", [False, True])
def test_files_round_trip(tmp_path, suffix, per_position):
    nodes, edges = synthetic(per_position)
    ann = {"resid.1/f0": {"top_tokens": ["x", " y"], "explanation": "an explanation"}}
    g = build_graph(nodes, edges, top_k=2, annotations=ann)
    back = load_graph(save_graph(g, tmp_path / f"circuit{suffix}"))
    assert isinstance(back, nx.DiGraph) and back.is_directed()
    assert dict(back.nodes(data=True)) == dict(g.nodes(data=True))
    assert {(u, v): w for u, v, w in back.edges(data="weight")} == {(u, v): w for u, v, w in g.edges(data="weight")}
    assert back.graph == g.graph
    with pytest.raises(ValueError, match="use .json or .graphml"):
        save_graph(g, tmp_path / "circuit.gexf")


# --- from a real (tiny) model ------------------------------------------------------------------
def test_graph_from_a_tiny_model_carries_its_effects():
    model = tiny_model("llama", n_layers=2, d_model=32)
    torch.manual_seed(0)
    dicts = {s: TopKSAE(32, 24, k=6) for s in ("resid.0", "mlp.1", "resid.1")}
    g_ = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 250, (2, 5), generator=g_)
    cf = ids.clone()
    cf[:, 2] = torch.randint(2, 250, (2,), generator=g_)

    def metric(lg):
        return lg[:, -1, 5] - lg[:, -1, 11]

    nodes = node_effects(model, dicts, ids, cf, metric)
    edges = edge_effects(model, dicts, ids, cf, metric)
    g = build_graph(nodes, edges, prune_dead_ends=False)
    for v, d in g.nodes(data=True):
        if d["kind"] in ("feature", "error"):
            idx = d["feature"] if d["kind"] == "feature" else 24
            assert d["effect"] == pytest.approx(float(nodes.effects[d["site"]][idx]))
    weights = edges.weight("resid.0", "mlp.1")
    assert g.number_of_edges() > 0
    for u, v, w in g.edges(data="weight"):
        a, b = g.nodes[u], g.nodes[v]
        if (a["site"], b["site"]) == ("resid.0", "mlp.1"):
            i = 24 if b["kind"] == "error" else b["feature"]
            j = 24 if a["kind"] == "error" else a["feature"]
            assert w == pytest.approx(float(weights[i, j]))
    assert g.graph["metric_cf"] - g.graph["metric_clean"] == pytest.approx(nodes.delta_metric)
