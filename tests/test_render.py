"""Rendering circuit graphs (graphviz) and labelling nodes with top activating tokens."""
import struct
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch

from circuits.rendering import GraphvizNotFound, render, show_token, to_dot
from circuits.top_tokens import annotate_top_tokens, label_graph, top_activating_tokens
from sae.architectures import TopKSAE
from sae.harvesting import harvest
from sae.models import tiny_model

SVG = "{http://www.w3.org/2000/svg}"


def circuit(per_position=True):
    """A hand-built graph in the attribute spec of circuits.graph."""
    g = nx.DiGraph(method="atp", per_position=per_position, n_layers=2, sites=["resid.0", "attn.1", "resid.1"])
    order = {"resid.0": 1, "attn.1": 2, "resid.1": 3}
    toks = ["When", " Mary", " and", " John", " went", "\n"]
    for q, t in enumerate(toks):
        g.add_node(f"input/{q}", kind="input", site="input", layer=-1, order=0, feature=None, position=q,
                   effect=0.0, label=f"input/{q} {t!r}", activation=0.0, frequency=1.0, token=t)

    def node(site, f, q, effect, **extra):
        nid = (f"{site}/err" if f == "error" else f"{site}/f{f}") + (f"@{q}" if per_position else "")
        g.add_node(nid, kind="error" if f == "error" else "feature", site=site, layer=int(site[-1]),
                   order=order[site], feature=f, position=q if per_position else None, effect=effect,
                   label=nid, activation=1.0, frequency=0.5, **extra)
        return nid

    a = node("resid.0", 12, 1, 0.8, top_tokens=[" Mary", " Anna", " she"])
    b = node("resid.0", 40, 3, -0.3, top_tokens=[" John", "\n", '\\"<b>&'])
    c = node("resid.1", 7, 5, 1.2, explanation="names that appeared earlier in the sentence")
    e = node("resid.1", "error", 5, 0.1)
    h = node("attn.1", 3, 5, -0.6, top_tokens=["to"])
    g.add_node("metric", kind="metric", site="metric", layer=2, order=4, feature=None, position=None,
               effect=0.4, label="metric", activation=2.0, frequency=1.0)
    for u, v, w in [("input/1", a, 0.5), ("input/3", b, -0.2), (a, c, 0.9), (b, c, -0.4), (b, h, 0.05),
                    (h, c, -0.3), (c, "metric", 1.1), (e, "metric", 0.1)]:
        g.add_edge(u, v, weight=w)
    return g


def svg_nodes(path):
    """{graph node id: <g> element} of a rendered SVG (ids are the graph's node ids)."""
    root = ET.parse(path).getroot()
    return root, {el.get("id"): el for el in root.iter(f"{SVG}g") if el.get("class") in ("node", "edge")}


def first(el, tag):
    """The first descendant <tag> of el (shapes sit inside the tooltip's <a>), or None."""
    return next(el.iter(f"{SVG}{tag}"), None)


def centre(el):
    """(x, y) of a node: the mean anchor of its text lines (centred labels)."""
    texts = list(el.iter(f"{SVG}text"))
    return (sum(float(t.get("x")) for t in texts) / len(texts), sum(float(t.get("y")) for t in texts) / len(texts))


def polygon_points(el):
    poly = first(el, "polygon")
    return poly, [tuple(map(float, p.split(","))) for p in poly.get("points").split()]


def test_svg_is_valid_and_labelled(tmp_path):
    out = render(circuit(), tmp_path / "c.svg")
    assert out == tmp_path / "c.svg" and out.stat().st_size > 0
    root, els = svg_nodes(out)
    text = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    for label in ("resid.0/f12@1", "resid.1/f7@5", "‘␣Mary’", "names that appeared", "ε resid.1 @5", "metric"):
        assert label in text
    assert '\\"<b>&' in text                                  # odd token text survives escaping
    # error nodes are triangles (3 vertices + closing point), features boxes (4 + 1)
    _, tri = polygon_points(els["resid.1/err@5"])
    _, box = polygon_points(els["resid.1/f7@5"])
    assert len(tri) == 4 and len(box) == 5
    # colour: red for positive, blue for negative, stronger for larger |effect|
    fill = {n: polygon_points(els[n])[0].get("fill") for n in ("resid.1/f7@5", "resid.0/f12@1", "resid.0/f40@3")}
    rgb = {n: tuple(int(f[i:i + 2], 16) for i in (1, 3, 5)) for n, f in fill.items()}
    assert rgb["resid.1/f7@5"][0] > rgb["resid.1/f7@5"][2]            # red
    assert rgb["resid.0/f40@3"][2] > rgb["resid.0/f40@3"][0]          # blue
    assert rgb["resid.1/f7@5"][1] < rgb["resid.0/f12@1"][1]            # 1.2 more saturated than 0.8


def test_edge_width_and_layers(tmp_path):
    g = circuit()
    out = render(g, tmp_path / "c.svg")
    _, els = svg_nodes(out)
    width = {}
    for u, v in g.edges:
        path = first(els[f"{u}->{v}"], "path")
        width[(u, v)] = float(path.get("stroke-width", "1"))
    by_weight = sorted(g.edges, key=lambda e: abs(g.edges[e]["weight"]))
    widths = [width[e] for e in by_weight]
    assert widths == sorted(widths) and widths[-1] > 3 * widths[0]
    colour = {e: first(els[f"{e[0]}->{e[1]}"], "path").get("stroke") for e in g.edges}
    neg = colour[("resid.0/f40@3", "resid.1/f7@5")]
    assert int(neg[5:7], 16) > int(neg[1:3], 16)                        # negative weight: blue

    def y(n):  # SVG y grows downwards
        return centre(els[n])[1]
    assert y("input/1") > y("resid.0/f12@1") > y("attn.1/f3@5") > y("resid.1/f7@5") > y("metric")


def test_png_and_positions_layout(tmp_path):
    out = render(circuit(), tmp_path / "c", format="png")
    assert out.name == "c.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert w > 200 and h > 200
    pos = render(circuit(), tmp_path / "pos.svg", layout="positions")
    _, els = svg_nodes(pos)

    def x(n):
        return centre(els[n])[0]
    xs = [x(f"input/{q}") for q in range(6)]
    assert xs == sorted(xs)                                              # columns by position
    assert x("resid.0/f12@1") < x("resid.0/f40@3") < x("resid.1/f7@5")
    assert abs(x("resid.0/f40@3") - xs[3]) < abs(x("resid.0/f40@3") - xs[1])
    with pytest.raises(ValueError, match="positions kept"):
        to_dot(circuit(per_position=False).subgraph([n for n in circuit(False) if not n.startswith("input")]),
               layout="positions")
    agg = render(circuit(per_position=False), tmp_path / "agg.png", layout="positions")   # inputs give columns
    assert agg.stat().st_size > 0


def test_missing_dot_binary_raises_a_specific_error_and_the_json_survives(tmp_path, monkeypatch):
    from circuits.graph import load_graph, save_graph

    g = circuit()
    source = to_dot(g).source                                          # no binary needed for DOT text
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    saved = save_graph(g, tmp_path / "c.json")                          # the main job writes JSON first
    with pytest.raises(GraphvizNotFound, match="apt-get install graphviz") as err:
        render(g, tmp_path / "c.svg")
    assert "brew install graphviz" in str(err.value) and "conda" in str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert not (tmp_path / "c.svg").exists()
    assert set(load_graph(saved).nodes) == set(g.nodes)
    assert "resid.1/f7@5" in source


def test_options_and_bad_input(tmp_path):
    g = circuit()
    src = to_dot(g, node_threshold=0.5, edge_threshold=0.25).source
    assert "resid.0/f40@3" not in src and "resid.0/f12@1" in src and "input/3" in src
    assert "ε" in to_dot(g).source
    with pytest.raises(ValueError, match="unknown format"):
        render(g, tmp_path / "c.svg", format="jpg")
    with pytest.raises(ValueError, match="agree"):
        render(g, tmp_path / "c.svg", format="png")
    with pytest.raises(ValueError, match="unknown layout"):
        to_dot(g, layout="circle")
    with pytest.raises(ValueError, match="no nodes"):
        to_dot(nx.DiGraph())
    with pytest.raises(TypeError, match="DiGraph"):
        to_dot({"a": 1})
    assert show_token(" the\n") == "␣the↵" and show_token("  ") == "␣␣"
    assert show_token("\x00a\u200b") == "\\x00a\\u200b" and show_token("x" * 30) == "x" * 15 + "…"


# --- top activating tokens -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus_setup():
    model = tiny_model("llama", n_layers=2, d_model=32, initializer_range=0.2)
    torch.manual_seed(0)
    d = TopKSAE(32, 40, k=5)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 250, (10, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[3, 9:] = 0                                                    # some padding
    return model, {"resid.1": d}, {"input_ids": ids, "attention_mask": mask}


def test_top_tokens_match_brute_force(corpus_setup):
    model, dicts, corpus = corpus_setup
    d = dicts["resid.1"]
    feats = [0, 7, 13]
    tops = top_activating_tokens(model, dicts, corpus, {"resid.1": feats}, n=4, batch_size=3, context=(2, 1))
    rows = list(harvest(model, corpus, ["resid.1"], batch_size=100, with_tokens=True, progress=False))[0]
    with torch.no_grad():
        codes = d.encode(rows["resid.1"])                            # [n_tokens, n_latents]
    for f in feats:
        res = tops[("resid.1", f)]
        expected = codes[:, f][codes[:, f] > 0].sort(descending=True).values[:4]
        assert torch.allclose(torch.tensor([e.activation for e in res.examples]), expected, atol=1e-5)
        assert res.n_tokens == codes.shape[0] == int(corpus["attention_mask"][:, 1:].sum())
        assert res.frequency == pytest.approx(float((codes[:, f] > 0).float().mean()))
        assert res.mean_activation == pytest.approx(float(codes[:, f].mean()), rel=1e-5)
        for ex in res.examples:
            assert ex.position >= 1 and corpus["attention_mask"][ex.row, ex.position] == 1
            assert f"«{ex.token}»" in ex.context
            assert ex.token == model.tokenizer.decode([int(corpus["input_ids"][ex.row, ex.position])])
    # streaming in small batches keeps the same top-n as one big batch
    big = top_activating_tokens(model, dicts, corpus, {"resid.1": feats}, n=4, batch_size=100)
    assert [e.activation for e in big[("resid.1", 7)].examples] == pytest.approx(
        [e.activation for e in tops[("resid.1", 7)].examples])


def test_label_graph_with_top_tokens(corpus_setup, tmp_path):
    model, dicts, corpus = corpus_setup
    g = nx.DiGraph()
    g.add_node("resid.1/f7", kind="feature", site="resid.1", layer=1, order=1, feature=7, position=None,
               effect=0.5, label="resid.1/f7", activation=0.1, frequency=0.2)
    g.add_node("resid.1/err", kind="error", site="resid.1", layer=1, order=1, feature="error", position=None,
               effect=-0.2, label="resid.1/err", activation=0.1, frequency=1.0)
    tops = annotate_top_tokens(g, model, dicts, corpus, n=3)
    assert set(tops) == {("resid.1", 7)}
    assert g.nodes["resid.1/f7"]["top_tokens"] == tops[("resid.1", 7)].tokens[:3]
    assert len(g.nodes["resid.1/f7"]["top_tokens"]) == 3
    assert "top_tokens" not in g.nodes["resid.1/err"]
    assert g.nodes["resid.1/f7"]["frequency"] == 0.2                    # the graph's own stats are kept
    shown = to_dot(g).source
    assert show_token(g.nodes["resid.1/f7"]["top_tokens"][0]).strip() in shown or "‘" in shown
    label_graph(g, {}, n=2)                                             # nothing known: unchanged
    assert len(g.nodes["resid.1/f7"]["top_tokens"]) == 3
    errors_only = g.subgraph(["resid.1/err"]).copy()                   # e.g. a circuit of error nodes
    assert annotate_top_tokens(errors_only, model, dicts, corpus) == {}
    with pytest.raises(ValueError, match="no dictionary"):
        top_activating_tokens(model, dicts, corpus, [("resid.0", 1)])
    with pytest.raises(ValueError, match="out of range"):
        top_activating_tokens(model, dicts, corpus, [("resid.1", 99)])


def test_links_make_feature_nodes_hyperlinks(tmp_path):
    from circuits.dashboards import dashboard_links

    g = circuit()
    links = dashboard_links(g, "dashboards")
    assert links == {"resid.0/f12@1": "dashboards/resid.0/f12.html", "resid.0/f40@3": "dashboards/resid.0/f40.html",
                     "resid.1/f7@5": "dashboards/resid.1/f7.html", "attn.1/f3@5": "dashboards/attn.1/f3.html"}
    out = render(g, tmp_path / "c.svg", links=links)
    _, els = svg_nodes(out)
    XLINK = "{http://www.w3.org/1999/xlink}"
    for node, url in links.items():
        anchors = [a for a in els[node].iter(f"{SVG}a") if a.get(f"{XLINK}href")]
        assert [a.get(f"{XLINK}href") for a in anchors] == [url]
        assert anchors[0].get("target") == "_top"
    for node in ("resid.1/err@5", "metric", "input/1"):       # only feature nodes are linked
        assert not any(a.get(f"{XLINK}href") for a in els[node].iter(f"{SVG}a"))
    plain = render(g, tmp_path / "plain.svg")                  # no links: no hrefs at all
    assert "xlink:href" not in plain.read_text()
