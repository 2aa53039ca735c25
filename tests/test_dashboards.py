"""Feature dashboards (circuits.dashboards): data against exact computations, escaping, files,
the index, Neuronpedia JSON, graph links and the real latent cache. Browser checks are in
test_dashboards_browser.py."""
import json
import math
import random
import re
from html.parser import HTMLParser

import networkx as nx
import pytest
import torch

from circuits.autointerp.examples import FeatureExamples, Window
from circuits.dashboards import (dashboard_links, feature_page, graph_features, feature_view, logit_effects, neuron_alignment,
                                 neuronpedia_feature, page_path, render_dashboards, site_dir, unembedding)
from circuits.dashboards.data import to_residual
from circuits.dashboards.text import esc, script_json, visible
from sae.architectures import TopKSAE
from sae.models import tiny_model

# Token texts a hostile corpus (or a hostile tokenizer vocabulary) can produce.
HOSTILE = ["<script>window.__pwned=1</script>", '"><img src=x onerror="window.__pwned=1">',
           "javascript:window.__pwned=1", "\u202eevil\u202c", "\u2066iso\u2069", "a\x00b", "\ud800",
           "</script><script>window.__pwned=1</script>", "' onmouseover='window.__pwned=1", "<!--",
           "<svg onload=window.__pwned=1>", "<style>body{display:none}</style>", "&amp;", "\n", " plain",
           b"\xff\xfe bad".decode("utf-8", errors="replace"), "<a href=\"javascript:window.__pwned=1\">x</a>"]


class FakeTokenizer:
    """A vocabulary of whole-string tokens (as large BPE vocabularies have)."""

    def __init__(self, vocab):
        self.vocab = list(vocab)

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, ids):
        return ["".join(self.vocab[i] for i in row) for row in ids]


class FakeCache:
    """The LatentCache interface (sites, features(site), examples(site, i)) over given examples."""

    def __init__(self, examples):
        self._ex = {(e.site, e.feature): e for e in examples}
        self.sites = sorted({e.site for e in examples})

    def features(self, site):
        return sorted(f for s, f in self._ex if s == site)

    def examples(self, site, feature):
        return self._ex[(site, feature)]


def make_examples(site, feature, vocab_size, *, n_top=20, n_bins=10, per_bin=10, window=32, seed=0,
                  correlated=((1, 0.5), (2, -0.25))):
    """Realistic-size FeatureExamples: top windows sorted by max activation, equal-count bins."""
    rng = random.Random(seed * 100003 + feature)

    def win(i, peak):
        toks = tuple(rng.randrange(vocab_size) for _ in range(window))
        acts = [0.0] * window
        for p in rng.sample(range(window), 4):
            acts[p] = round(peak * rng.uniform(0.1, 1.0), 4)
        acts[rng.randrange(window)] = peak
        return Window(tokens=toks, acts=tuple(acts), row=i, start=1 + i % 7)

    peaks = sorted((rng.uniform(0.1, 5.0) for _ in range(n_bins * per_bin)))
    quantiles = [[win(1000 + b * per_bin + j, peaks[b * per_bin + j]) for j in range(per_bin)] for b in range(n_bins)]
    top = [win(i, 5.0 + 2.0 * (n_top - i) / n_top) for i in range(n_top)]
    return FeatureExamples(site=site, feature=feature, top=top, quantiles=quantiles, n_tokens=100_000,
                           density=0.0123, max_act=top[0].max_act if top else 0.0, mean_active=1.5,
                           hist_edges=[0.1, 1.0, 2.0, 4.0, 7.0], hist_counts=[40, 20, 9, 3],
                           correlated=list(correlated))


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text, as the browser's parser sees them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text):
    p = Tags()
    p.feed(html_text)
    return p


# --- text --------------------------------------------------------------------------------------
def test_visible_and_esc():
    assert visible("a\x00b") == "a\\x00b"
    assert visible("\u202eevil\u202c \u2066x\u2069 \u200f") == "\\u202eevil\\u202c \\u2066x\\u2069 \\u200f"
    assert visible("\ud800x") == "\\ud800x"
    assert visible(b"ok \xff\xfe") == "ok \ufffd\ufffd"                  # invalid UTF-8 -> U+FFFD
    assert visible("line\nnext\ttab") == "line\nnext\ttab"
    assert visible("line\nnext\ttab", token=True) == "line↵next⇥tab"
    assert visible("é 日本 🙂 \u200d") == "é 日本 🙂 \u200d"                # ordinary text untouched
    assert esc('<a href="x" onclick=\'y\'>&') == "&lt;a href=&quot;x&quot; onclick=&#x27;y&#x27;&gt;&amp;"
    for s in HOSTILE:
        out = esc(s, token=True)
        assert not re.search(r"[<>\"'\x00\u202a-\u202e\u2066-\u2069\ud800-\udfff]", out), (s, out)
        out.encode("utf-8")                                               # always writable


def test_script_json_cannot_end_its_block():
    doc = {"rows": [[0, 1, HOSTILE]], "k\u2028": "x\u2029"}
    text = script_json(doc)
    assert not re.search(r"[<>&\u2028\u2029]", text)
    back = json.loads(text)
    assert back["rows"][0][2][0] == "<script>window.__pwned=1</script>"
    assert back["rows"][0][2][3] == "\\u202eevil\\u202c"                    # bidi made visible


# --- data against exact computations ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_final_norm_scale_is_probed_exactly(arch):
    model = tiny_model(arch, n_layers=2, d_model=32)
    hf = model.hf
    norm = {"llama": lambda: hf.model.norm, "gpt2": lambda: hf.transformer.ln_f, "gemma": lambda: hf.model.norm}[arch]()
    torch.manual_seed(1)
    with torch.no_grad():
        norm.weight.normal_()
    W_U, gamma = unembedding(model)
    expected = norm.weight + 1 if arch == "gemma" else norm.weight          # Gemma's RMSNorm scales by 1 + w
    assert torch.allclose(W_U, hf.get_output_embeddings().weight)
    assert torch.allclose(gamma, expected.float(), atol=1e-4)


def test_logit_effects_equal_the_models_own_head_on_the_direction():
    """For RMSNorm, lm_head(norm(v)) = W_U (γ ⊙ v) / rms(v): our effect up to one positive scale."""
    model = tiny_model("llama", n_layers=2, d_model=32)
    hf = model.hf
    with torch.no_grad():
        hf.model.norm.weight.normal_()
    d = TopKSAE(32, 16, k=4)
    feats = [0, 3, 15]
    eff = logit_effects(model, d, "resid.1", feats, k=5, bins=20, chunk=2)
    V = hf.get_output_embeddings().weight.shape[0]
    for f in feats:
        v = d.W_dec[f].detach()
        with torch.no_grad():
            exact = hf.lm_head(hf.model.norm(v[None, None]))[0, 0]             # [V]
        ids = [t for t, _ in eff[f].top]
        ours_top = torch.tensor([x for _, x in eff[f].top])
        scale = exact[ids] / ours_top
        assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4) and scale[0] > 0
        assert ids == exact.topk(5).indices.tolist()
        assert [t for t, _ in eff[f].bottom] == exact.topk(5, largest=False).indices.tolist()
        assert sum(eff[f].hist_counts) == V and len(eff[f].hist_edges) == 21
        full = (hf.lm_head.weight @ (hf.model.norm.weight * v))
        assert math.isclose(eff[f].hist_edges[0], float(full.min()), rel_tol=1e-4, abs_tol=1e-6)
        assert math.isclose(eff[f].hist_edges[-1], float(full.max()), rel_tol=1e-4, abs_tol=1e-6)


def test_mlp_hidden_directions_go_through_the_output_projection():
    model = tiny_model("llama", n_layers=2, d_model=32)
    width = model.sites["mlp_hidden.0"].width
    d = TopKSAE(width, 8, k=2)
    v = to_residual(model, "mlp_hidden.0", d.W_dec.detach())
    assert v.shape == (8, 32)
    assert torch.allclose(v, d.W_dec.detach() @ model.hf.model.layers[0].mlp.down_proj.weight.T, atol=1e-6)
    eff = logit_effects(model, d, "mlp_hidden.0", [1], k=3)
    _, gamma = unembedding(model)
    exact = model.hf.lm_head.weight @ (gamma * v[1])
    assert [t for t, _ in eff[1].top] == exact.topk(3).indices.tolist()


def test_neuron_alignment_matches_brute_force():
    d = TopKSAE(12, 6, k=2)
    al = neuron_alignment(d, [2, 5], k=3)
    for f in (2, 5):
        row = d.W_dec[f].detach()
        order = sorted(range(12), key=lambda j: -abs(float(row[j])))[:3]
        assert [j for j, _, _ in al[f]] == order
        for j, w, frac in al[f]:
            assert math.isclose(w, float(row[j]), rel_tol=1e-6)
            assert math.isclose(frac, abs(float(row[j])) / float(row.abs().sum()), rel_tol=1e-5)


# --- pages ----------------------------------------------------------------------------------------
def hostile_view(explanation="<img src=x onerror=\"window.__pwned=1\"> \u202ereversed"):
    vocab = HOSTILE
    ex = make_examples("resid.0", 7, len(vocab), n_top=6, n_bins=3, per_bin=4)
    return feature_view(ex, vocab, explanation={"explanation": explanation, "scores": {"detection": 0.75,
                                                                                         "<b>fuzz</b>": 0.5}},
                        per_quantile=2)


def test_page_escapes_every_corpus_string():
    view = hostile_view()
    text = feature_page(view, feature_href=lambda j: f"f{j}.html")
    p = parse(text)
    tags = {t for t, _ in p.tags}
    assert not tags & {"script", "img", "iframe", "object", "embed", "base", "form", "link"}
    assert [t for t, _ in p.tags].count("style") == 1                     # only our own stylesheet
    assert [t for t, _ in p.tags].count("svg") == 1                       # the activation histogram only
    for tag, attrs in p.tags:
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        assert not str(attrs.get("href", "")).lower().startswith("javascript:")
    body = "".join(p.text)
    assert "<script>window.__pwned=1</script>" in body                    # shown as text
    assert "\\u202eevil\\u202c" in body and "a\\x00b" in body and "\\ud800" in body
    assert not re.search(r"[\x00\u202a-\u202e\u2066-\u2069]", text)
    text.encode("utf-8")
    # highlighted tokens carry their activation as hover text
    spans = [a for t, a in p.tags if t == "span" and "title" in a]
    assert spans and all(re.search(r": [0-9.e+-]+$", a["title"]) for a in spans)
    assert len([1 for t, a in p.tags if t == "div" and a.get("class") == "ctx"]) == view.n_contexts == 6 + 3 * 2
    assert 'id="explanation"' in text and "&lt;b&gt;fuzz&lt;/b&gt;" in text


def test_neuronpedia_json_is_always_utf8():
    from circuits.dashboards.neuronpedia import neuronpedia_json

    view = hostile_view()
    text = neuronpedia_json(view)
    text.encode("utf-8")
    back = json.loads(text)
    assert back["activations"][0]["tokens"] == view.groups[0].contexts[0].tokens     # raw texts, exactly
    assert "\ud800" in {t for a in back["activations"] for t in a["tokens"]}
    assert back["explanation"].startswith("<img src=x")


def test_neuronpedia_fields():
    model = tiny_model("llama", n_layers=2, d_model=32)
    d = TopKSAE(32, 16, k=4)
    ex = make_examples("resid.1", 3, len(model.tokenizer), n_top=5, n_bins=2, per_bin=3,
                       correlated=[(4, 0.6), (9, -0.2)])
    from circuits.dashboards.data import decoder_cosines, unit_rows, vocab_strings
    vocab = vocab_strings(model.tokenizer)
    view = feature_view(ex, vocab, logits=logit_effects(model, d, "resid.1", [3], k=4)[3],
                        alignment=neuron_alignment(d, [3], k=3)[3],
                        cosines=decoder_cosines(unit_rows(d.W_dec), 3, [4, 9]), per_quantile=None)
    np_ = neuronpedia_feature(view)
    for key in ("activations", "pos_str", "pos_values", "neg_str", "neg_values", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_values", "logits_hist_data_bar_heights",
                "frac_nonzero", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_features_indices", "correlated_features_pearson", "correlated_features_l1",
                "correlated_neurons_indices", "feature_index", "num_tokens_for_dashboard"):
        assert key in np_, key
    assert np_["feature_index"] == 3 and np_["frac_nonzero"] == pytest.approx(0.0123)
    assert len(np_["activations"]) == 5 + 2 * 3
    top = np_["activations"][0]
    assert top["bin_min"] == -1 and top["bin_contains"] == -1 and top["bin_max"] == pytest.approx(ex.max_act, abs=1e-3)
    assert top["tokens"] == [vocab[t] for t in ex.top[0].tokens]
    assert top["values"] == [round(a, 3) for a in ex.top[0].acts]
    q = np_["activations"][5]                                             # highest quantile bin first
    assert q["bin_contains"] == 0.5 and q["bin_max"] == pytest.approx(max(w.max_act for w in ex.quantiles[1]), abs=1e-3)
    assert np_["freq_hist_data_bar_values"] == [0.55, 1.5, 3.0, 5.5] and np_["freq_hist_data_bar_heights"] == [40, 20, 9, 3]
    assert len(np_["pos_str"]) == 4 and np_["pos_values"] == sorted(np_["pos_values"], reverse=True)
    assert np_["correlated_features_indices"] == [4, 9] and np_["correlated_features_pearson"] == [0.6, -0.2]
    cos = torch.nn.functional.cosine_similarity(d.W_dec[3].detach(), d.W_dec[4].detach(), dim=0)
    assert np_["correlated_features_l1"][0] == pytest.approx(float(cos), abs=1e-3)
    assert sum(np_["logits_hist_data_bar_heights"]) == len(vocab)
    json.dumps(np_, allow_nan=False)


# --- render_dashboards -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", n_layers=2, d_model=32)
    d = TopKSAE(32, 64, k=4)
    V = len(model.tokenizer)
    cache = FakeCache([make_examples("resid.0", f, V) for f in (0, 1, 2, 5)]
                      + [make_examples("resid.1", f, V) for f in (0, 3)])
    return model, d, cache


def index_data(path):
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', path.read_text(), re.S)
    return json.loads(m.group(1))


def test_render_dashboards_writes_pages_json_and_index(setup, tmp_path):
    model, d, cache = setup
    expl = {("resid.0", 1): {"explanation": "the word <em>", "scores": {"detection": 0.9, "fuzzing": 0.7}}}
    pages = render_dashboards(model, d, cache, tmp_path, site="resid.0", explanations=expl, progress=False)
    assert sorted(pages) == [0, 1, 2, 5]
    for f, path in pages.items():
        assert path == tmp_path / "resid.0" / f"f{f}.html" and path.is_file()
        p = parse(path.read_text())
        rows = [a for t, a in p.tags if t == "div" and a.get("class") == "ctx"]
        assert len(rows) == 20 + 10 * 5                                   # top 20 + 5 per decile
        np_ = json.loads((tmp_path / "resid.0" / f"f{f}.json").read_text())
        assert np_["feature_index"] == f and len(np_["activations"]) == 70
    text = pages[1].read_text()
    assert "the word &lt;em&gt;" in text and 'href="f2.html"' in text      # correlated feature 2 is linked
    assert not list(tmp_path.rglob(".*tmp*"))                              # atomic writes left nothing behind
    data = index_data(tmp_path / "index.html")
    assert data["sites"] == [["resid.0", "resid.0/"]] and data["scorers"] == ["detection", "fuzzing"]
    rows = {r[1]: r for r in data["rows"]}
    assert sorted(rows) == [0, 1, 2, 5]
    assert rows[1][5] == "the word <em>" and rows[1][6:] == [0.9, 0.7] and rows[0][6:] == [None, None]
    assert rows[0][2] == 0.0123 and rows[0][3] == pytest.approx(7.0, abs=1e-3)

    # a second site joins the same index; the first site's rows stay
    render_dashboards(model, d, cache, tmp_path, site="resid.1", progress=False, write_json=False)
    data = index_data(tmp_path / "index.html")
    assert [s for s, _ in data["sites"]] == ["resid.0", "resid.1"] and len(data["rows"]) == 6
    assert not (tmp_path / "resid.1" / "f0.json").exists()


def test_workers_write_the_same_files(setup, tmp_path):
    model, d, cache = setup
    render_dashboards(model, d, cache, tmp_path / "a", site="resid.0", progress=False)
    render_dashboards(model, d, cache, tmp_path / "b", site="resid.0", progress=False, workers=2)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(names) == 4 * 2 + 2
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def _parallel_op(_):
    return float(torch.randn(4_000_000).exp().sum() > 0)


def test_forked_workers_survive_the_parents_openmp_pool():
    """A forked child whose first torch op runs a parallel region waits forever on the parent's
    OpenMP threads unless it drops to one thread first (seen: the 2,304-page benchmark hung)."""
    import multiprocessing as mp

    from circuits.dashboards.render import _init_worker

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform (workers are spawned)")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(4_000_000).exp().sum()              # the parent's OpenMP pool is up
        with mp.get_context("fork").Pool(2, initializer=_init_worker, initargs=(None,)) as pool:
            assert pool.map_async(_parallel_op, range(2)).get(timeout=60) == [1.0, 1.0]
    finally:
        torch.set_num_threads(before)


def test_without_model_or_dictionary(setup, tmp_path):
    model, d, cache = setup
    pages = render_dashboards(None, None, cache, tmp_path, site="resid.1", tokenizer=model.tokenizer, progress=False)
    text = pages[0].read_text()
    assert 'id="contexts"' in text and 'id="logits"' not in text and 'id="alignment"' not in text


def test_dead_feature_page(setup, tmp_path):
    model, d, _ = setup
    dead = FeatureExamples(site="resid.0", feature=9, n_tokens=5000, quantiles=[[] for _ in range(10)])
    pages = render_dashboards(model, d, FakeCache([dead]), tmp_path, site="resid.0", progress=False)
    text = pages[9].read_text()
    assert "0 (never fired)" in text and 'data-rows="0"' in text and "no data" in text
    np_ = json.loads((tmp_path / "resid.0" / "f9.json").read_text())
    assert np_["activations"] == [] and np_["frac_nonzero"] == 0 and len(np_["pos_str"]) == 10
    assert index_data(tmp_path / "index.html")["rows"] == [[0, 9, 0.0, 0.0, "", ""]]


def test_bad_input(setup, tmp_path):
    model, d, cache = setup
    with pytest.raises(ValueError, match="not in the latent cache"):
        render_dashboards(model, d, cache, tmp_path, site="mlp.0")
    with pytest.raises(ValueError, match=r"features \[4\] are not in the cache"):
        render_dashboards(model, d, cache, tmp_path, site="resid.0", features=[0, 4])
    with pytest.raises(ValueError, match="outside the dictionary"):
        render_dashboards(model, TopKSAE(32, 4, k=1), cache, tmp_path, site="resid.0")
    with pytest.raises(ValueError, match="tokenizer"):
        render_dashboards(None, d, cache, tmp_path, site="resid.0")
    with pytest.raises(ValueError, match="workers"):
        render_dashboards(model, d, cache, tmp_path, site="resid.0", workers=0)


def test_site_dirs_and_links(tmp_path):
    assert site_dir("resid.3") == "resid.3" and site_dir("../x") == "..~2fx" and site_dir("..") == "~.."
    assert page_path("a b", 4) == "a~20b/f4.html"
    g = nx.DiGraph()
    g.add_node("resid.0/f1@2", kind="feature", site="resid.0", feature=1)
    g.add_node("resid.0/f2", kind="feature", site="resid.0", feature=2)
    g.add_node("resid.0/err", kind="error", site="resid.0", feature="error")
    g.add_node("metric", kind="metric", site="metric", feature=None)
    g.add_node("resid.2/f5@1", kind="feature", site="resid.2", feature=5)
    g.add_node("resid.2/f5@3", kind="feature", site="resid.2", feature=5)
    assert graph_features(g) == {"resid.0": [1, 2], "resid.2": [5]}
    g.remove_nodes_from(["resid.2/f5@1", "resid.2/f5@3"])
    assert dashboard_links(g) == {"resid.0/f1@2": "resid.0/f1.html", "resid.0/f2": "resid.0/f2.html"}
    (tmp_path / "resid.0").mkdir()
    (tmp_path / "resid.0" / "f2.html").write_text("x")
    assert dashboard_links(g, "d/", root=tmp_path) == {"resid.0/f2": "d/resid.0/f2.html"}


# --- the real latent cache and the CLI ---------------------------------------------------------------
def test_real_latent_cache_and_cli(tmp_path):
    from circuits.autointerp.cache import LatentCache, build_latent_cache
    from circuits.dashboards.__main__ import load_explanations, main
    from sae.models import load_model

    model = tiny_model("llama", n_layers=2, d_model=32)
    torch.manual_seed(0)
    d = TopKSAE(32, 24, k=4)
    ids = torch.randint(2, len(model.tokenizer), (24, 33))
    cache = build_latent_cache(model, {"resid.1": d}, ids, tmp_path / "cache", window=16, n_top=5,
                               n_quantiles=4, per_quantile=3, n_random=4, n_negatives=4, n_hard_negatives=0,
                               batch_size=8, progress=False)
    feats = cache.features("resid.1")
    pages = render_dashboards(model, d, cache, tmp_path / "dash", site="resid.1", per_quantile=None, progress=False)
    assert sorted(pages) == sorted(feats)
    live = [f for f in feats if cache.examples("resid.1", f).top]
    assert live
    f = live[0]
    ex = cache.examples("resid.1", f)
    np_ = json.loads((tmp_path / "dash" / "resid.1" / f"f{f}.json").read_text())
    assert np_["activations"][0]["tokens"] == [model.tokenizer.decode([t]) for t in ex.top[0].tokens]
    assert np_["activations"][0]["values"] == [round(a, 3) for a in ex.top[0].acts]
    n_rows = len(ex.top) + sum(len(q) for q in ex.quantiles)
    assert len(re.findall(r'<div class="ctx">', pages[f].read_text())) == n_rows
    assert np_["frac_nonzero"] == pytest.approx(ex.density)

    # the CLI on the same cache, with a saved dictionary and model
    d.save(tmp_path / "sae")
    model.hf.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "expl.json").write_text(json.dumps({f"resid.1/f{f}": {"explanation": "cli <x>",
                                                                      "scores": {"detection": 0.6}}}))
    assert load_explanations(tmp_path / "expl.json") == {("resid.1", f): {"explanation": "cli <x>",
                                                                          "scores": {"detection": 0.6}}}
    assert main(["--cache", str(tmp_path / "cache"), "--dictionary", str(tmp_path / "sae"), "--site", "resid.1",
                 "--out", str(tmp_path / "cli"), "--model", str(tmp_path / "model"), "--features", str(f),
                 "--explanations", str(tmp_path / "expl.json")]) == 0
    text = (tmp_path / "cli" / "resid.1" / f"f{f}.html").read_text()
    assert "cli &lt;x&gt;" in text
    assert index_data(tmp_path / "cli" / "index.html")["rows"][0][1] == f
    (tmp_path / "t.csv").write_text("family,site,layer,feature,explanation,detection,fuzzing\n"
                                    "topk,resid.1,1,3,\"words, <b>\",0.8,\n"
                                    "pca,resid.1,1,3,other,0.1,0.2\n")
    assert load_explanations(tmp_path / "t.csv", "topk") == {("resid.1", 3): {"explanation": "words, <b>",
                                                                              "scores": {"detection": 0.8}}}
    with pytest.raises(ValueError, match="several dictionary families"):
        load_explanations(tmp_path / "t.csv")
    (tmp_path / "bad.json").write_text(json.dumps({"nofeature": {}}))
    with pytest.raises(ValueError, match="keys must look like"):
        load_explanations(tmp_path / "bad.json")
