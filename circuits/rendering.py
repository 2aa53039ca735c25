"""Draw a circuit graph with graphviz (SVG, PNG or PDF).

Reads only the documented node and edge attributes of the circuit `networkx.DiGraph`
(`circuits.graph`): node `kind` ("feature" | "error" | "input" | "metric"), `site`, `layer`,
`order`, `feature`, `position`, `effect`, `label`, `token` (inputs), `activation` (the metric's
value), optional `top_tokens` / `explanation`; edge `weight`. Missing optional attributes are
tolerated, so hand-built graphs render too.
The conventions follow the plots of Marks et al. 2024 ("Sparse Feature Circuits", arXiv
2403.19647, `circuit_plotting.py`), with the colours of the sign swapped to the usual red = +:

    fill(v)      = white blended towards red (effect > 0) or blue (effect < 0) by
                   s(v) = |effect(v)| / max_u |effect(u)|      (max over drawn feature/error nodes)
    penwidth(e)  = w_min + (w_max - w_min) * |weight(e)| / max_f |weight(f)|
    colour(e)    = red (weight > 0) or blue (weight < 0), blended from light to full by the same ratio

Feature nodes are boxes labelled with their id and the feature's top activating tokens (or its
explanation, when one is given); error nodes are triangles ("ε site"); input tokens are grey
boxes at the bottom and the metric a double octagon at the top.

Layouts:
    "layered"    dot, bottom to top (rankdir=BT). One rank per site, in the order of the nodes'
                 `order` attribute (input 0, sites in forward order, metric last), or when a node
                 lacks it by (layer, kind) with kinds input < embed < attn < mlp_hidden < mlp <
                 resid < metric; so inputs are at the bottom and the metric at the top.
    "positions"  neato with pinned coordinates: one column per token position (columns as wide
                 as their busiest site), one row per site as above. Nodes without a position
                 (aggregated over positions) go in a last column marked "Σ pos".

Rendering needs Graphviz's `dot` binary; without it `render` raises `GraphvizNotFound`, which
says how to install it. Write the graph's JSON first: `to_dot(...)` and `to_dot(...).source`
work without the binary.
"""
from __future__ import annotations

import math
import os
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import graphviz
import networkx as nx

from sae.io import atomic_path

FORMATS = ("svg", "png", "pdf")
LAYOUTS = ("layered", "positions")
#: Order of site kinds inside one layer (lower is drawn lower).
KIND_ORDER = {"input": 0, "embed": 1, "attn": 2, "mlp_hidden": 3, "mlp": 4, "resid": 5}
_RED = (214, 39, 40)
_BLUE = (31, 119, 180)
_INSTALL = ("install Graphviz, which provides the `dot` binary: `apt-get install graphviz` "
            "(Debian/Ubuntu), `brew install graphviz` (macOS), or `conda install -c conda-forge "
            "graphviz`; then check that `dot -V` runs in the same shell")


class GraphvizNotFound(RuntimeError):
    """The Graphviz layout binary (`dot` or `neato`) is not on PATH. Nothing was written; the
    graph itself is untouched, so save its JSON and render again after installing Graphviz."""


# --- helpers ------------------------------------------------------------------------------------
def _blend(rgb: tuple[int, int, int], s: float) -> str:
    """White blended towards `rgb` by s in [0, 1], as #rrggbb."""
    s = min(1.0, max(0.0, s))
    return "#" + "".join(f"{round(255 + (c - 255) * s):02x}" for c in rgb)


def _font_colour(fill: str) -> str:
    """Black or white, whichever reads better on `fill` (#rrggbb), by relative luminance."""
    r, g, b = (int(fill[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.45 else "white"


def show_token(token: str, max_len: int = 16) -> str:
    """A token made visible on one line: spaces at its ends as ␣, newlines ↵, tabs ⇥, carriage
    returns and other control characters as \\r, \\xNN; cut to max_len characters with "…"."""
    named = {"\n": "↵", "\t": "⇥", "\r": "\\r"}                 # (common fonts lack a glyph for ␍)

    def visible(ch: str) -> str:
        if ch in named:
            return named[ch]
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co"):
            return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
        return ch
    text = "".join(visible(ch) for ch in str(token))
    stripped = text.strip(" ")
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    text = "␣" * lead + stripped + ("␣" * trail if stripped else "")
    return text if len(text) <= max_len else text[:max_len - 1] + "…"


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    words, lines, line = str(text).split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}" if line else w
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(0, width - 1)] + "…"
    return lines


def _label(lines: Iterable[str]) -> str:
    """A DOT label from plain-text lines (backslashes and <...> disabled, lines centred)."""
    return "\\n".join(graphviz.escape(line) for line in lines)


def _site_kind(site: Any) -> str:
    return str(site).split(".", 1)[0] if site is not None else ""


def _rank_key(data: dict, use_order: bool = False) -> tuple:
    """The row of a node, bottom first: its `order` attribute (`circuits.graph`: input 0, sites
    1..S in forward order, metric S + 1) when every node has one, else (layer, kind, site)."""
    kind = data.get("kind")
    if use_order:
        return (int(data["order"]), 0, "")
    if kind == "input":
        return (-math.inf, 0, "")
    if kind == "metric":
        return (math.inf, 0, "")
    site = data.get("site")
    layer = data.get("layer")
    layer = -1 if layer is None else layer
    return (layer, KIND_ORDER.get(_site_kind(site), 6), str(site))


def _effect(data: dict) -> float:
    e = data.get("effect")
    try:
        e = float(e)
    except (TypeError, ValueError):
        return 0.0
    return e if math.isfinite(e) else 0.0


def _node_lines(node: Any, data: dict, n_tokens: int) -> list[str]:
    kind = data.get("kind")
    pos = data.get("position")
    at = f" @{pos}" if pos is not None else ""
    if kind == "input":
        token = data.get("token", data.get("label", str(node)))
        return [f"‘{show_token(token)}’", f"pos {pos}" if pos is not None else ""]
    if kind == "metric":
        lines = [str(data.get("label") or "metric")]
        if isinstance(data.get("activation"), (int, float)):   # circuits.graph: the mean m(clean)
            lines.append(f"m = {float(data['activation']):.3g}")
        return lines
    if kind == "error":
        return [f"ε {data.get('site', '')}{at}", f"{_effect(data):+.3g}"]
    header = str(data.get("label") or f"{data.get('site', '')}/{data.get('feature', node)}")
    if at and not header.endswith(at.strip()):
        header += at
    lines = [header]
    if data.get("explanation"):
        lines += _wrap(data["explanation"], 26, 2)
    elif data.get("top_tokens"):
        toks = [f"‘{show_token(t)}’" for t in list(data["top_tokens"])[:n_tokens]]
        lines += _wrap(" ".join(toks), 30, 2)
    lines.append(f"{_effect(data):+.3g}")
    return lines


def _tooltip(node: Any, data: dict) -> str:
    parts = [str(node)]
    for key in ("effect", "ablation_effect", "activation", "frequency", "explanation"):
        if data.get(key) is not None:
            parts.append(f"{key}: {data[key]}")
    if data.get("top_tokens"):
        parts.append("top tokens: " + " ".join(show_token(t) for t in data["top_tokens"]))
    return graphviz.escape("\n".join(parts))


# --- the DOT graph --------------------------------------------------------------------------------
def to_dot(graph: nx.DiGraph, *, layout: str = "layered", node_threshold: float = 0.0,
           edge_threshold: float = 0.0, n_tokens: int = 3, min_penwidth: float = 0.5,
           max_penwidth: float = 6.0, title: str | None = None, legend: bool = True,
           links: Mapping[Any, str] | None = None, link_target: str | None = "_top") -> graphviz.Digraph:
    """The circuit as a `graphviz.Digraph` (no binary needed; `.source` is the DOT text).

    node_threshold / edge_threshold: leave out feature/error nodes with |effect| below it and
    edges with |weight| below it (inputs and the metric always stay). n_tokens: top activating
    tokens shown per feature. links: {node id: URL} (e.g. `circuits.dashboards.dashboard_links`)
    makes those nodes hyperlinks in SVG output (graphviz `URL`, opened in `link_target`).
    See the module docstring for colours, shapes and layouts."""
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"render a circuit networkx.DiGraph, got {type(graph).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if not 0 < min_penwidth <= max_penwidth:
        raise ValueError(f"need 0 < min_penwidth <= max_penwidth, got {min_penwidth}, {max_penwidth}")
    if graph.number_of_nodes() == 0:
        raise ValueError("the graph has no nodes: nothing to draw (was the node threshold too high?)")

    keep = [n for n, d in graph.nodes(data=True)
            if d.get("kind") in ("input", "metric") or abs(_effect(d)) >= node_threshold]
    kept = set(keep)
    edges = [(u, v, d) for u, v, d in graph.edges(data=True)
             if u in kept and v in kept and abs(float(d.get("weight", 0.0))) >= edge_threshold]
    scale = max((abs(_effect(graph.nodes[n])) for n in keep
                 if graph.nodes[n].get("kind") in ("feature", "error")), default=0.0) or 1.0
    wscale = max((abs(float(d.get("weight", 0.0))) for _, _, d in edges), default=0.0) or 1.0
    names = {n: f"n{i}" for i, n in enumerate(keep)}       # safe DOT ids; the real id goes in `id`

    dot = graphviz.Digraph(name="circuit", engine="dot" if layout == "layered" else "neato")
    dot.attr("graph", rankdir="BT", bgcolor="white", fontname="Helvetica", fontsize="11",
             nodesep="0.25", ranksep="0.55")
    dot.attr("node", fontname="Helvetica", fontsize="10", style="filled", penwidth="0.8",
             margin="0.06,0.03")
    dot.attr("edge", arrowsize="0.5")
    caption = []
    if title or graph.graph.get("title"):
        caption.append(str(title or graph.graph.get("title")))
    if legend:
        caption.append(f"node colour: effect (red +, blue −; full at |effect| = {scale:.3g});  "
                       f"edge width: |weight| (full at {wscale:.3g})")
    if caption:
        dot.attr("graph", label=_label(caption), labelloc="b", fontsize="10")

    def attrs(node: Any) -> dict[str, str]:
        d = graph.nodes[node]
        kind = d.get("kind")
        a = {"label": _label(_node_lines(node, d, n_tokens)), "tooltip": _tooltip(node, d),
             "id": graphviz.escape(str(node))}
        if links and node in links:
            a["URL"] = graphviz.escape(str(links[node]))
            if link_target:
                a["target"] = graphviz.escape(link_target)
        if kind == "input":
            a.update(shape="box", style="rounded,filled", fillcolor="#eeeeee", color="#999999")
        elif kind == "metric":
            a.update(shape="doubleoctagon", fillcolor="#fff3c4", color="#8a6d00")
        else:
            e = _effect(d)
            fill = _blend(_RED if e >= 0 else _BLUE, abs(e) / scale)
            a.update(fillcolor=fill, fontcolor=_font_colour(fill), color="#555555",
                     shape="triangle" if kind == "error" else "box")
            if kind == "error":
                a.update(margin="0.02", fontsize="9")
        return a

    rows: dict[tuple, list] = defaultdict(list)
    use_order = all(isinstance(graph.nodes[n].get("order"), int) for n in keep)
    for n in keep:
        rows[_rank_key(graph.nodes[n], use_order)].append(n)
    order = sorted(rows)
    if layout == "layered":
        for key in order:
            members = sorted(rows[key], key=lambda n: (graph.nodes[n].get("position") is None,
                                                       graph.nodes[n].get("position") or 0,
                                                       -abs(_effect(graph.nodes[n]))))
            with dot.subgraph() as sub:
                inputs = all(graph.nodes[n].get("kind") == "input" for n in members)
                sub.attr(rank="same")
                for n in members:
                    sub.node(names[n], **attrs(n))
                if inputs:                       # input tokens left to right in position order
                    for a, b in zip(members, members[1:]):
                        sub.edge(names[a], names[b], style="invis")
        for lo, hi in zip(order, order[1:]):   # keep rows in order even where no edge joins them
            dot.edge(names[rows[lo][0]], names[rows[hi][0]], style="invis")
    else:
        _place_by_position(dot, graph, rows, order, names, attrs, n_tokens)

    for u, v, d in edges:
        w = float(d.get("weight", 0.0))
        s = abs(w) / wscale
        dot.edge(names[u], names[v], penwidth=f"{min_penwidth + (max_penwidth - min_penwidth) * s:.3f}",
                 color=_blend(_RED if w >= 0 else _BLUE, 0.3 + 0.7 * s), tooltip=f"{w:+.4g}",
                 id=graphviz.escape(f"{u}->{v}"))
    return dot


def _place_by_position(dot, graph, rows, order, names, attrs, n_tokens) -> None:
    """Pinned coordinates (inches) for the "positions" layout: column per token position."""
    positioned = [graph.nodes[n].get("position") for key in order for n in rows[key]
                  if graph.nodes[n].get("kind") != "metric"]
    cols = sorted({p for p in positioned if p is not None})
    if not cols:
        raise ValueError("layout='positions' needs nodes with a `position`: this graph aggregates "
                         "over positions; build it with positions kept or use layout='layered'")
    has_total = any(p is None for p in positioned)
    def est(n) -> float:                          # rough drawn width in inches (10 pt Helvetica)
        chars = max(len(line) for line in _node_lines(n, graph.nodes[n], n_tokens))
        w = 0.075 * chars + 0.25
        return 2 * w if graph.nodes[n].get("kind") == "error" else w

    width = defaultdict(float)                    # column width: its busiest row's total width
    for key in order:
        total = defaultdict(float)
        for n in rows[key]:
            if graph.nodes[n].get("kind") != "metric":
                total[graph.nodes[n].get("position")] += est(n) + 0.15
        for p, w in total.items():
            width[p] = max(width[p], w)
    row_h, gap = 1.1, 0.3
    x0, col_x = 0.0, {}
    for p in cols + ([None] if has_total else []):
        col_x[p] = x0
        x0 += width[p] + gap
    for r, key in enumerate(order):
        cells = defaultdict(list)
        for n in rows[key]:
            cells[graph.nodes[n].get("position") if graph.nodes[n].get("kind") != "metric" else "metric"].append(n)
        for p, members in cells.items():
            members.sort(key=lambda n: -abs(_effect(graph.nodes[n])))
            x = (x0 - gap - sum(est(n) + 0.15 for n in members)) / 2 if p == "metric" else col_x[p]
            for n in members:                      # pos is a node's centre
                w = est(n) + 0.15
                dot.node(names[n], pos=f"{x + w / 2:.2f},{r * row_h:.2f}!", **attrs(n))
                x += w
    if has_total:
        dot.node("sum_positions", label="Σ pos", shape="plaintext", style="",
                 pos=f"{col_x[None] + width[None] / 2:.2f},{-0.6:.2f}!")
    dot.attr("graph", splines="true", overlap="true", outputorder="edgesfirst")


# --- rendering ----------------------------------------------------------------------------------
def render(graph: nx.DiGraph, path: str | os.PathLike, format: str | None = None, **options: Any) -> Path:
    """Draw `graph` to `path` as SVG, PNG or PDF and return the path written.

    format: "svg" | "png" | "pdf"; default: the suffix of `path`, else "svg" (a path without a
    suffix gets ".<format>"). options: those of `to_dot` (layout="layered" | "positions",
    node_threshold, edge_threshold, n_tokens, min_penwidth, max_penwidth, title, legend, links,
    link_target).
    Raises `GraphvizNotFound` when Graphviz is not installed (nothing is written then)."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if format is None:
        format = suffix if suffix in FORMATS else "svg"
    format = str(format).lower()
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    if suffix not in FORMATS:
        path = path.with_name(path.name + f".{format}")
    elif suffix != format:
        raise ValueError(f"path {str(path)!r} ends in .{suffix} but format={format!r}; make them agree")
    dot = to_dot(graph, **options)
    try:
        data = dot.pipe(format=format, quiet=True)
    except graphviz.ExecutableNotFound as e:
        raise GraphvizNotFound(f"cannot render {path.name}: the Graphviz `{dot.engine}` binary was not "
                               f"found on PATH ({e}). To fix, {_INSTALL}. The graph is unaffected: "
                               f"save it as JSON and render later.") from None
    except graphviz.CalledProcessError as e:
        err = (e.stderr or b"").decode(errors="replace").strip() if isinstance(e.stderr, bytes) else str(e.stderr)
        raise RuntimeError(f"Graphviz `{dot.engine}` failed on this graph (exit {e.returncode}): {err}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
