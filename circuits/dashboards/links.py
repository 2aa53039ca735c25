"""Links from a circuit graph's feature nodes to their dashboards, for `circuits.rendering.render(
graph, path, links=...)`: the SVG then opens a feature's page when its node is clicked."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import networkx as nx

from .render import page_path


def graph_features(graph: nx.DiGraph) -> dict[str, list[int]]:
    """{site: sorted feature ids} of the graph's feature nodes: what to cache (`build_latent_cache(
    ..., features=...)`) and render (`render_dashboards(..., site=s, features=ids)`) for a circuit."""
    out: dict[str, set[int]] = {}
    for _, d in graph.nodes(data=True):
        if d.get("kind") == "feature" and d.get("site") is not None and isinstance(d.get("feature"), int):
            out.setdefault(str(d["site"]), set()).add(int(d["feature"]))
    return {s: sorted(ids) for s, ids in out.items()}


def dashboard_links(graph: nx.DiGraph, base: str = "", *, root: str | os.PathLike | None = None) -> dict[Any, str]:
    """{node id: base + "<site>/f<i>.html"} for every node with kind == "feature" (attributes of
    `circuits.graph`: site, feature). base: the dashboard directory relative to where the SVG is
    written (e.g. "dashboards/"). root: when given, the dashboard directory on disk; only nodes
    whose page exists there are linked."""
    if not isinstance(graph, nx.Graph):
        raise TypeError(f"need a circuit networkx graph, got {type(graph).__name__}")
    if base and not base.endswith("/"):
        base += "/"
    out = {}
    for node, d in graph.nodes(data=True):
        if d.get("kind") != "feature" or d.get("site") is None or not isinstance(d.get("feature"), int):
            continue
        rel = page_path(d["site"], d["feature"])
        if root is not None and not (Path(root) / rel).is_file():
            continue
        out[node] = base + rel
    return out
