"""Node ids of circuits: parsing them into (site, feature, position) and back.

A node of the model M at the spliced sites is (site, feature id or "error", position or None =
every position). Its graph id (`circuits.graph`) is "resid.3/f12" or "resid.3/err", plus "@4"
when it sits at one position; "input/<pos>" (token embeddings) and "metric" are pseudo-nodes,
which `parse_node` maps to None.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple, Union

import networkx as nx


class Node(NamedTuple):
    """A node of M: (site, feature id or "error", position or None = every position)."""

    site: str
    feature: Union[int, str]
    position: Union[int, None] = None

    @property
    def id(self) -> str:
        """The graph id (`circuits.graph`): "resid.3/f12", "resid.3/err", + "@pos" when it has one."""
        base = f"{self.site}/err" if self.feature == "error" else f"{self.site}/f{int(self.feature)}"
        return base if self.position is None else f"{base}@{int(self.position)}"


_ID = re.compile(r"^(?P<site>[^/@]+)/(?:f(?P<feat>\d+)|(?P<err>err(?:or)?))(?:@(?P<pos>\d+))?$")


def parse_node(node: Any, graph: nx.DiGraph | None = None) -> Node | None:
    """A `Node` from a graph node (by its attributes), an id string or a (site, feature[,
    position]) tuple; None for input and metric nodes."""
    if graph is not None and node in graph:
        d = graph.nodes[node]
        kind = d.get("kind")
        if kind in ("input", "metric"):
            return None
        if kind not in ("feature", "error"):
            raise ValueError(f"graph node {node!r} has kind {kind!r}; expected feature, error, input or metric")
        feat = "error" if kind == "error" else int(d["feature"])
        pos = d.get("position")
        return Node(str(d["site"]), feat, None if pos is None else int(pos))
    if isinstance(node, Node):
        return node
    if isinstance(node, tuple) and len(node) in (2, 3) and isinstance(node[0], str):
        feat = node[1]
        if not (feat == "error" or (isinstance(feat, int) and not isinstance(feat, bool))):
            raise ValueError(f"node {node!r}: the feature must be an int or 'error'")
        return Node(node[0], feat, node[2] if len(node) == 3 else None)
    if isinstance(node, str):
        if node == "metric" or node.startswith("input/"):
            return None
        m = _ID.match(node)
        if not m:
            raise ValueError(f"cannot parse node id {node!r}: expected 'site/f<id>' or 'site/err', "
                             f"optionally with '@<pos>' (e.g. 'resid.3/f12@4')")
        feat = "error" if m["err"] else int(m["feat"])
        return Node(m["site"], feat, None if m["pos"] is None else int(m["pos"]))
    raise TypeError(f"a node is a graph node id, an id string or a (site, feature[, position]) tuple; "
                    f"got {node!r}")


def circuit_nodes(circuit: Any) -> dict[Any, Node]:
    """{original key: Node} for a circuit graph (its feature and error nodes) or an iterable of
    node ids / tuples."""
    if isinstance(circuit, nx.Graph):
        out = {n: parse_node(n, circuit) for n in circuit.nodes}
    elif isinstance(circuit, (str, tuple)) and not isinstance(circuit, Node):
        raise TypeError("pass a circuit as a graph or a collection of nodes, not a single node")
    else:
        out = {n: parse_node(n) for n in circuit}
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["Node", "parse_node", "circuit_nodes"]
