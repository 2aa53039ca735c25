"""sae-circuits, circuits half: node and edge attribution through spliced dictionaries, and circuit
graphs (imports `interventions` and `sae`). Public names are imported lazily so that
`import circuits` stays cheap.

    node_effects(model, {site: Dictionary}, clean, cf, metric, method=...) -> NodeEffects   (circuits.attribution)
    edge_effects(model, {site: Dictionary}, clean, cf, metric, ...) -> EdgeEffects          (circuits.edges)
    build_graph(nodes, edges, ...) -> networkx.DiGraph; save_graph / load_graph            (circuits.graph)
    render(graph, "circuit.svg")                                                          (circuits.rendering)
    faithfulness / faithfulness_curve / check_edges / check_nodes                          (circuits.evaluate)
    parse_node("resid.3/f12@4") -> Node(site, feature, position)                        (circuits.nodes)
    trace_feature(model, dicts, inputs, (site, feature)) -> networkx.DiGraph               (circuits.trace)
    annotate_top_tokens(graph, model, dicts, corpus)                                      (circuits.top_tokens)
"""
from __future__ import annotations

from sae._lazy import lazy_exports

_EXPORTS = {
    "node_effects": "circuits.attribution",
    "NodeEffects": "circuits.attribution",
    "edge_effects": "circuits.edges",
    "edge_effects_reference": "circuits.edges",
    "EdgeEffects": "circuits.edges",
    "build_graph": "circuits.graph",
    "aggregate_graphs": "circuits.graph",
    "save_graph": "circuits.graph",
    "load_graph": "circuits.graph",
    "to_json": "circuits.graph",
    "from_json": "circuits.graph",
    "node_id": "circuits.graph",
    "render": "circuits.rendering",
    "to_dot": "circuits.rendering",
    "GraphvizNotFound": "circuits.rendering",
    "faithfulness": "circuits.evaluate",
    "faithfulness_curve": "circuits.evaluate",
    "CircuitScores": "circuits.evaluate",
    "ablation_effects": "circuits.evaluate",
    "check_nodes": "circuits.evaluate",
    "check_edges": "circuits.evaluate",
    "ranking_agreement": "circuits.evaluate",
    "parse_node": "circuits.nodes",
    "Node": "circuits.nodes",
    "circuit_nodes": "circuits.nodes",
    "trace_feature": "circuits.trace",
    "top_activating_tokens": "circuits.top_tokens",
    "annotate_top_tokens": "circuits.top_tokens",
    "label_graph": "circuits.top_tokens",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
