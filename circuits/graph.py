"""Circuit graphs: node and edge effects -> a pruned `networkx.DiGraph`, saved as JSON or GraphML.

The graph is the interface between attribution and everything after it (rendering, circuit
evaluation): those read ONLY the attributes documented here.

Node ids (str)
    "<site>/f<i>"      feature i of a spliced site, e.g. "resid.3/f123"
    "<site>/err"       the site's error node (Marks et al. 2024, "Sparse Feature Circuits",
                       arXiv 2403.19647: epsilon = x - decode(encode(x)))
    ... + "@<pos>"     when positions are kept (per_position effects), e.g. "resid.3/f123@4"
    "input/<pos>"      the input token at position pos (always per position)
    "metric"           the metric m (e.g. the IOI logit difference)

Node attributes (every node has kind ... frequency; None is stored as JSON null, left out of
GraphML, and restored by load_graph)
    kind        str    "feature" | "error" | "input" | "metric"
    site        str    "resid.3", ...; "input" for input nodes; "metric" for the metric node
    layer       int    the site's block (the "embed" site is -1); input -1; metric n_layers
    order       int    rank for drawing bottom-up: input 0, spliced sites 1..S in forward
                       order, metric S + 1
    feature     int | "error" | None   feature id, "error" for error nodes, None for input/metric
    position    int | None             token position (None when positions are summed, and for
                                       the metric)
    effect      float  mean over prompts of the node's indirect effect on the metric,
                       m(clean | node := cf) - m(clean), as estimated by graph.graph["method"];
                       input: the effect of swapping that token; metric: mean m(cf) - m(clean)
    label       str    "resid.3/f123" (annotations may override it), "resid.3/err",
                       "input/2 ' Mary'", "metric"
    activation  float  mean clean activation: features the mean code, error nodes the mean
                       ||epsilon|| (over prompts, and over positions when summed); input 0.0;
                       metric the mean m(clean)
    frequency   float  fraction of clean tokens where the node is nonzero; input, metric 1.0
    token       str    input nodes only: the clean token text at that position ("a|b" when the
                       prompts differ there)
    top_tokens  list[str]  optional, from annotations
    explanation str        optional, from annotations or autointerp (`circuits.interpret`)
    detection   float      optional, autointerp detection AUC of the explanation (`circuits.interpret`)

Edge attributes
    weight      float  mean over prompts of the direct edge effect
                       e(u -> d) = grad_d m . (dd/du) . (u_cf - u_clean)   (`circuits.edges`);
                       into "metric": the node's direct effect on m

Graph attributes (graph.graph)
    method str ("atp" | "ig" | "ig-input" | "exact"), per_position bool, n_layers int, n_prompts int,
    sites list[str] (forward order), metric_clean float, metric_cf float (means), and the
    pruning arguments used: node_threshold, top_k, node_fraction, edge_threshold,
    edge_fraction (None when unused; left out of GraphML when None).

Pruning (`build_graph`), in this order:
1. node selection among feature and error nodes: |effect| >= node_threshold; the top_k of each
   site by |effect|; node_fraction: the smallest set of nodes, largest |effect| first, whose
   |effect| sums to >= node_fraction of the total |effect| over all nodes (the cumulative
   criterion of circuit-tracer's pruning, with |effect| as the influence). All given criteria
   must hold. Nothing left -> ValueError that names a threshold that would keep nodes.
2. input nodes (include_inputs) and the metric node are always kept.
3. edges between kept nodes with |weight| >= edge_threshold (exact zeros never become edges),
   then edge_fraction: the smallest edge set, largest |weight| first, covering that fraction of
   the total |weight| of those edges.
4. dead ends (prune_dead_ends, when edges are given): feature and error nodes without a
   directed path to "metric" are removed.

Aggregation over prompts: effects are means over the prompts given to attribution;
`aggregate_graphs` averages several graphs (e.g. one per prompt template): effect and weight are
means with 0 where a graph lacks the node or edge, activation and frequency means over the graphs
that have the node.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import networkx as nx
import torch

from sae.io import atomic_path

from .attribution import NodeEffects
from .edges import EdgeEffects

METRIC = "metric"
_GRAPH_LISTS = ("sites",)
_NODE_LISTS = ("top_tokens",)


def node_id(site: str, index: int, n_latents: int, position: int | None = None) -> str:
    """The id of node `index` (n_latents = the error node) of `site`, e.g. "resid.3/f12@4"."""
    base = f"{site}/err" if index == n_latents else f"{site}/f{index}"
    return base if position is None else f"{base}@{position}"


def input_id(position: int) -> str:
    return f"input/{position}"


def _select(nodes: NodeEffects, node_threshold, top_k, node_fraction) -> dict[str, torch.Tensor]:
    """{site: bool mask like its effects} after step 1 of the module docstring."""
    keep = {s: torch.ones_like(e, dtype=torch.bool) for s, e in nodes.effects.items()}
    if node_threshold is not None or top_k is not None:
        for s, m in nodes.select(node_threshold, top_k).items():
            keep[s] &= m
    if node_fraction is not None:
        if not 0 < node_fraction <= 1:
            raise ValueError(f"node_fraction must be in (0, 1], got {node_fraction!r}")
        flat = torch.cat([e.abs().flatten().double() for e in nodes.effects.values()])
        order = flat.argsort(descending=True)
        cum = flat[order].cumsum(0)
        n_keep = int((cum < node_fraction * flat.sum() * (1 - 1e-12)).sum()) + 1
        mask = torch.zeros_like(flat, dtype=torch.bool)
        mask[order[:n_keep]] = True
        mask &= flat > 0
        start = 0
        for s, e in nodes.effects.items():
            keep[s] &= mask[start:start + e.numel()].view_as(e)
            start += e.numel()
    for s, e in nodes.effects.items():
        keep[s] &= e != 0  # a node without effect is never part of a circuit
    return keep


def _empty_error(nodes: NodeEffects, node_threshold, top_k, node_fraction) -> ValueError:
    flat = torch.cat([e.abs().flatten() for e in nodes.effects.values()]).sort(descending=True).values
    k = min(10, int((flat > 0).sum()))
    hint = (f"e.g. node_threshold={float(flat[k - 1]):.3g} (the {k}-th largest |effect|) keeps {k} nodes"
            if k else "every node effect is 0: check that clean and counterfactual inputs differ and "
                      "that the metric depends on them")
    return ValueError(f"no feature or error node passes the pruning (node_threshold={node_threshold}, "
                      f"top_k={top_k}, node_fraction={node_fraction}): the graph would be empty; {hint}")


def _add_site_nodes(g: nx.DiGraph, nodes: NodeEffects, keep, order, annotations) -> dict[str, dict]:
    """Add kept nodes; return {site: {(pos, index): node id}}."""
    ids: dict[str, dict] = {}
    for s, e in nodes.effects.items():
        n = e.shape[-1] - 1
        ids[s] = {}
        for idx in keep[s].nonzero().tolist():
            pos, j = (idx[0], idx[1]) if nodes.per_position else (None, idx[0])
            nid = node_id(s, j, n, pos)
            base = node_id(s, j, n)
            ann = dict((annotations or {}).get(base, {}))
            at = tuple(idx)
            attrs = dict(kind="error" if j == n else "feature", site=s, layer=nodes.layers.get(s, -1),
                         order=order[s], feature="error" if j == n else j, position=pos,
                         effect=float(e[at]), label=str(ann.pop("label", base if pos is None else nid)),
                         activation=float(nodes.activation[s][at]), frequency=float(nodes.frequency[s][at]))
            for key in ("top_tokens", "explanation"):
                if key in ann:
                    attrs[key] = list(ann[key]) if key == "top_tokens" else str(ann[key])
            g.add_node(nid, **attrs)
            ids[s][(pos, j)] = nid
    return ids


def _candidate_edges(nodes: NodeEffects, edges: EdgeEffects, ids: dict, keep: dict, include_inputs: bool,
                     edge_threshold: float):
    """(source, target, weight) for every nonzero edge between kept nodes with |weight| >= edge_threshold."""
    out = []
    pp = nodes.per_position

    def down_key(idx):  # index tuple into [(pos,) n + 1] -> (pos or None, j)
        return (idx[0], idx[1]) if pp else (None, idx[0])

    for (u, d), w in edges.weights.items():
        if u not in ids or d not in ids:
            continue
        nd = 2 if pp else 1
        idx, val = w.indices(), w.values()
        sel = keep[d][tuple(idx[:nd])] & keep[u][tuple(idx[nd:])] & (val.abs() >= edge_threshold) & (val != 0)
        for index, value in zip(idx[:, sel].T.tolist(), val[sel].tolist()):
            out.append((ids[u][down_key(index[nd:])], ids[d][down_key(index[:nd])], value))
    if include_inputs:
        for d, w in edges.from_input.items():
            if d not in ids:
                continue
            for index in w.nonzero().tolist():
                dst = ids[d].get(down_key(index[:-1]))
                if dst is not None:
                    out.append((input_id(index[-1]), dst, float(w[tuple(index)])))
        out += [(input_id(q), METRIC, float(v)) for q, v in enumerate(edges.input_to_metric.tolist()) if v != 0]
    for s, w in edges.to_metric.items():
        if s not in ids:
            continue
        for index in w.nonzero().tolist():
            src = ids[s].get(down_key(index))
            if src is not None:
                out.append((src, METRIC, float(w[tuple(index)])))
    return out


def build_graph(nodes: NodeEffects, edges: EdgeEffects | None = None, *, node_threshold: float | None = None,
                top_k: int | None = None, node_fraction: float | None = None, edge_threshold: float = 0.0,
                edge_fraction: float | None = None, prune_dead_ends: bool = True, include_inputs: bool = True,
                annotations: Mapping[str, Mapping[str, Any]] | None = None) -> nx.DiGraph:
    """The circuit as a DiGraph with the attributes of the module docstring, pruned as described
    there. annotations: {"resid.3/f123": {"label": ..., "top_tokens": [...], "explanation": ...}}
    (position-free ids). Without `edges` the graph has nodes only and no dead-end pruning."""
    if not isinstance(nodes, NodeEffects):
        raise TypeError(f"nodes must be the NodeEffects of circuits.node_effects, got {type(nodes).__name__}")
    if edges is not None and edges.per_position != nodes.per_position:
        raise ValueError(f"node effects have per_position={nodes.per_position} but edge effects have "
                         f"per_position={edges.per_position}: compute both the same way")
    keep = _select(nodes, node_threshold, top_k, node_fraction)
    if not any(bool(m.any()) for m in keep.values()):
        raise _empty_error(nodes, node_threshold, top_k, node_fraction)
    order = {s: i + 1 for i, s in enumerate(nodes.sites)}
    g = nx.DiGraph(method=nodes.method, per_position=nodes.per_position, n_layers=nodes.n_layers,
                   n_prompts=nodes.n_examples, sites=list(nodes.sites),
                   metric_clean=float(nodes.metric_clean.mean()), metric_cf=float(nodes.metric_cf.mean()),
                   node_threshold=node_threshold, top_k=top_k, node_fraction=node_fraction,
                   edge_threshold=edge_threshold, edge_fraction=edge_fraction)
    if include_inputs:
        for q, eff in enumerate(nodes.inputs.tolist()):
            tok = nodes.tokens[q] if q < len(nodes.tokens) else ""
            g.add_node(input_id(q), kind="input", site="input", layer=-1, order=0, feature=None, position=q,
                       effect=float(eff), label=f"{input_id(q)} {tok!r}", activation=0.0, frequency=1.0,
                       token=tok)
    ids = _add_site_nodes(g, nodes, keep, order, annotations)
    g.add_node(METRIC, kind="metric", site="metric", layer=nodes.n_layers, order=len(order) + 1, feature=None,
               position=None, effect=nodes.delta_metric, label="metric",
               activation=float(nodes.metric_clean.mean()), frequency=1.0)
    if edges is None:
        return g
    cand = [e for e in _candidate_edges(nodes, edges, ids, keep, include_inputs, edge_threshold)
            if abs(e[2]) >= edge_threshold and e[2] != 0]
    if edge_fraction is not None:
        if not 0 < edge_fraction <= 1:
            raise ValueError(f"edge_fraction must be in (0, 1], got {edge_fraction!r}")
        cand.sort(key=lambda e: -abs(e[2]))
        total, run, kept = sum(abs(e[2]) for e in cand), 0.0, []
        for e in cand:
            if run >= edge_fraction * total * (1 - 1e-12):
                break
            kept.append(e)
            run += abs(e[2])
        cand = kept
    g.add_weighted_edges_from(cand, weight="weight")
    if prune_dead_ends:
        alive = nx.ancestors(g, METRIC)
        g.remove_nodes_from([v for v, k in g.nodes(data="kind") if k in ("feature", "error") and v not in alive])
        if not any(k in ("feature", "error") for _, k in g.nodes(data="kind")):
            raise ValueError(f"no feature or error node has a path to the metric after edge pruning "
                             f"(edge_threshold={edge_threshold}, edge_fraction={edge_fraction}): lower "
                             f"them, or pass prune_dead_ends=False")
    return g


# --- aggregation ---------------------------------------------------------------------------------
def aggregate_graphs(graphs: Iterable[nx.DiGraph]) -> nx.DiGraph:
    """The mean of several circuit graphs (module docstring, "Aggregation over prompts")."""
    graphs = list(graphs)
    if not graphs or not all(isinstance(g, nx.DiGraph) for g in graphs):
        raise ValueError("aggregate_graphs needs a non-empty list of networkx.DiGraph circuits")
    n = len(graphs)
    out = nx.DiGraph(**graphs[0].graph)
    for key in ("metric_clean", "metric_cf"):
        out.graph[key] = sum(g.graph.get(key, 0.0) for g in graphs) / n
    out.graph["n_prompts"] = sum(g.graph.get("n_prompts", 0) for g in graphs)
    for g in graphs:
        for v, attrs in g.nodes(data=True):
            if v not in out:
                out.add_node(v, **{**attrs, "effect": 0.0, "activation": 0.0, "frequency": 0.0, "_seen": 0})
            a = out.nodes[v]
            a["effect"] += attrs["effect"] / n
            a["activation"] += attrs["activation"]
            a["frequency"] += attrs["frequency"]
            a["_seen"] += 1
        for u, v, w in g.edges(data="weight"):
            prev = out.edges[u, v]["weight"] if out.has_edge(u, v) else 0.0
            out.add_edge(u, v, weight=prev + w / n)
    for _, a in out.nodes(data=True):
        seen = a.pop("_seen")
        a["activation"] /= seen
        a["frequency"] /= seen
    return out


# --- files ---------------------------------------------------------------------------------------
def to_json(graph: nx.DiGraph) -> dict:
    """Node-link data (JSON-serialisable dict) with "nodes" and "edges"."""
    return nx.node_link_data(graph, edges="edges")


def from_json(data: Mapping[str, Any]) -> nx.DiGraph:
    return nx.node_link_graph(dict(data), directed=True, multigraph=False, edges="edges")


def save_graph(graph: nx.DiGraph, path: str | Path) -> Path:
    """Write `graph` as node-link JSON (".json") or GraphML (".graphml"), by suffix, atomically
    (an existing file is replaced only by a complete new one)."""
    path = Path(path)
    if path.suffix not in (".json", ".graphml"):
        raise ValueError(f"unknown graph file type {path.suffix!r} for {path}: use .json or .graphml")
    with atomic_path(path) as tmp:
        if path.suffix == ".json":
            tmp.write_text(json.dumps(to_json(graph), indent=1))
        else:
            nx.write_graphml(_graphml_safe(graph), tmp)
    return path


def load_graph(path: str | Path) -> nx.DiGraph:
    """Read a graph written by `save_graph`, with the attribute types of the module docstring."""
    path = Path(path)
    if path.suffix == ".json":
        return from_json(json.loads(path.read_text()))
    if path.suffix == ".graphml":
        return _graphml_restore(nx.read_graphml(path))
    raise ValueError(f"unknown graph file type {path.suffix!r} for {path}: use .json or .graphml")


def _graphml_safe(graph: nx.DiGraph) -> nx.DiGraph:
    """GraphML keeps scalars of one type per key: drop None, JSON-encode lists, feature as str."""
    g = nx.DiGraph()
    g.graph.update({k: json.dumps(v) if k in _GRAPH_LISTS else v for k, v in graph.graph.items() if v is not None})
    for v, attrs in graph.nodes(data=True):
        clean = {k: json.dumps(x) if k in _NODE_LISTS else x for k, x in attrs.items() if x is not None}
        if "feature" in clean:
            clean["feature"] = str(clean["feature"])
        g.add_node(v, **clean)
    g.add_edges_from(graph.edges(data=True))
    return g


def _graphml_restore(g: nx.DiGraph) -> nx.DiGraph:
    out = nx.DiGraph()
    out.graph.update({k: json.loads(v) if k in _GRAPH_LISTS else v for k, v in g.graph.items()
                      if k not in ("node_default", "edge_default")})  # added by networkx's reader
    for key in ("node_threshold", "top_k", "node_fraction", "edge_threshold", "edge_fraction"):
        out.graph.setdefault(key, None)
    for v, attrs in g.nodes(data=True):
        a = {k: json.loads(x) if k in _NODE_LISTS else x for k, x in attrs.items()}
        f = a.get("feature")
        a["feature"] = None if f is None else f if f == "error" else int(f)
        a.setdefault("position", None)
        a["position"] = None if a["position"] is None else int(a["position"])
        for key in ("layer", "order"):
            a[key] = int(a[key])
        for key in ("effect", "activation", "frequency"):
            a[key] = float(a[key])
        out.add_node(v, **a)
    out.add_edges_from((u, v, {"weight": float(w)}) for u, v, w in g.edges(data="weight"))
    return out
