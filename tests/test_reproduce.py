"""The reproduction report (circuits.runners.reproduce): every section end to end on tiny random
models, report.md's claims and numbers against the section tables, the verdict rules on
constructed tables, attribution's exact effects against node_effects(method="exact"), failures
with and without keep_going, and the CLI's section parsing; (slow) one section on SmolLM2."""
import math

import pandas as pd
import pytest
import torch

from circuits.runners import reproduce as rep
from circuits.runners import universality as uni
from interventions.runners import fit_baselines, report as rp
from interventions.spliced import run_spliced
from sae.baselines import IdentityDictionary
from sae.models import tiny_model
from test_runners import ToyIOI, ToyPronouns  # the IOI / pronoun dataset interfaces on byte tokens

TINY = rep.Settings(corpus="embedded", sae_tokens=512, k=4, expansion=2, baseline_tokens=256, ica_components=8,
                    ioi_depths=(0.0, 1.0), ioi_prompts=3, ioi_candidates=6, ioi_taus=(1e-3, 1e-1, 10.0),
                    erasure_depths=(0.0,), erasure_ks=(1, 4), neutral_contexts=1, neutral_len=16,
                    attribution_depths=(0.0, 1.0), attribution_prompts=3, ig_steps=2, top_nodes=3, random_nodes=3,
                    layers=(0, 1), layer_sae_tokens=512)
UNI = uni.Settings(tokens=2048, eval_contexts=4, expansions=(2, 4), k=4, batch_size=256, min_active=1)


def toy_ioi(n=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(2, 250, (n, 7), generator=g)
    cf = clean.clone()
    cf[:, 2:] = torch.randint(2, 250, (n, 5), generator=g)
    return ToyIOI(clean, cf, torch.randint(2, 250, (n,), generator=g), torch.randint(2, 250, (n,), generator=g))


def toy_pronouns(n=48):
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([1, -1] * (n // 2))
    ids = torch.randint(2, 250, (n, 6), generator=g)
    male, female = torch.randint(30, 33, (n, 5), generator=g), torch.randint(60, 63, (n, 5), generator=g)
    ids[:, 1:] = torch.where(labels[:, None] > 0, male, female)
    return ToyPronouns(ids, labels, ["train"] * (2 * n // 3) + ["heldout"] * (n - 2 * n // 3))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("SAE_CIRCUITS_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", n_layers=2, d_model=32, initializer_range=0.3)


def options(tmp):
    return {"a": {"dataset": toy_ioi()}, "b": {"dataset": toy_pronouns()}, "c": {"dataset": toy_ioi(seed=4)},
            "e": {"other": tiny_model("gemma", n_layers=3, d_model=48, seed=1), "universality_settings": UNI,
                  "sae_root": tmp / "runs"}}


@pytest.fixture(scope="module")
def result(model, cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reproduce")
    out = rep.run_reproduce(model, tmp / "out", settings=TINY, options=options(tmp), progress=False)
    return out, tmp / "out"


def _num(cell):
    return math.nan if cell == rp.MISSING else float(cell)


def section_tables(text, key):
    """The markdown tables of section `key` of report.md."""
    start = text.index(f"## ({key}) ")
    nxt = [text.index(f"## ({k}) ") for k in rep.SECTIONS if f"## ({k}) " in text and text.index(f"## ({k}) ") > start]
    return rp.read_markdown_tables(text[start:min(nxt) if nxt else len(text)])


# --- end to end ---------------------------------------------------------------------------------
def test_every_section_runs_and_the_report_lists_its_claims(result):
    out, path = result
    assert out["status"] == {k: "ok" for k in "abcde"}
    text = out["report"].read_text()
    claims, times = rp.read_markdown_tables(text)[:2]
    expected = rep.claims_table(out["sections"])
    assert claims.columns.tolist() == ["section", "claim", "paper", "ours", "verdict"]
    assert claims.astype(str).values.tolist() == expected.astype(str).values.tolist()
    assert set(claims.section) == set("abcde") and set(claims.verdict) <= set(rep.VERDICTS)
    assert times.section.tolist() == list("abcde")
    assert [float(x) for x in times.seconds] == pytest.approx([round(out["timings"][k]) for k in "abcde"], abs=0.51)
    for key, sec in out["sections"].items():
        assert f"## ({key}) {sec.title}" in text
        for fig in sec.figures:
            assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"({fig.name})" in text
    for name in ("ioi_patching.csv", "erasure_bench.csv", "attribution_vs_exact.csv", "attribution_nodes.csv",
                 "layer_similarity.csv", "universality_decoder.csv"):
        assert (path / name).is_file(), name


def test_claims_quote_the_section_tables(result):
    out, _ = result
    text = out["report"].read_text()
    ours = {k: [c.ours for c in out["sections"][k].claims] for k in "abcd"}
    # (a) one table per site: "min F: KL<=50%" etc. per family
    for table in section_tables(text, "a"):
        for lvl in (50, 20, 10):
            cells = dict(zip(table.family, table[f"min F: KL<={lvl}%"]))
            quoted = ", ".join(f"{f} {cells[f]}" for f in ("sae", "pca", "ica", "neurons"))
            assert f"KL<={lvl}%: {quoted}" in ours["a"][0]
    # (b) the summary table: min KL with acc<=0.75 per method
    summary = [t for t in section_tables(text, "b") if "min KL with acc<=0.75" in t.columns][0]
    cells = dict(zip(summary.method, summary["min KL with acc<=0.75"]))
    assert f"sae {cells['sae']}, pca {cells['pca']}" in ours["b"][0]
    assert f"sae {cells['sae']}, leace {cells['leace']}, mean_diff {cells['mean_diff']}" in ours["b"][1]
    # (c) Pearson r per site and estimator
    (corr,) = [t for t in section_tables(text, "c") if "Pearson r" in t.columns]
    for site, g in corr.groupby("site"):
        r = dict(zip(g.method, g["Pearson r"]))
        assert f"{site}: ig {r['ig']}, atp {r['atp']}" in ours["c"][0]
    assert corr["Pearson r"][corr.method == "atp"].map(_num).tolist() == pytest.approx(
        out["sections"]["c"].tables["attribution_vs_exact"].query("method == 'atp'").pearson.round(
            3).tolist(), abs=1e-3, nan_ok=True)
    nodes = out["sections"]["c"].tables["attribution_nodes"]
    errors = [t for t in section_tables(text, "c") if list(t.columns) == ["site", "exact", "atp", "ig", "ig-input"]][0]
    want = nodes[nodes.node == "error"]
    assert errors.site.tolist() == want.site.tolist() and errors.exact.tolist() == [rp.fmt(x) for x in want.exact]
    # (d) matched decoder cosine per pair
    pairs = [t for t in section_tables(text, "d") if "decoder cos" in t.columns][0]
    for _, row in pairs[pairs.kind == "resid"].iterrows():
        assert f"{row['site_a']}→{row['site_b']} {row['decoder cos']}" in ours["d"][0]


def test_verdicts_follow_from_the_section_tables(result):
    out, _ = result
    from interventions.runners.ioi_patching import KL_LEVELS

    secs = out["sections"]
    again = {"a": rep.ioi_claims(secs["a"].tables["ioi_patching_summary"], KL_LEVELS),
             "b": rep.erasure_claims(secs["b"].tables["erasure_bench_summary"], TINY.accuracy_level),
             "c": rep.attribution_claims(secs["c"].tables["attribution_vs_exact"].query("method != 'exact'")),
             "d": rep.layer_claims(secs["d"].tables["layer_similarity"])}
    for key, claims in again.items():
        assert [c.verdict for c in claims] == [c.verdict for c in secs[key].claims]
        assert all("rule:" in c.ours for c in claims)


# --- verdict rules on constructed tables -----------------------------------------------------------
def ioi_summary(sae, pca, ica, neurons):
    rows = []
    for fam, n in (("sae", sae), ("pca", pca), ("ica", ica), ("neurons", neurons)):
        rows.append(dict(site="resid.3", family=fam, min_f_kl_50=n, min_f_kl_20=n, min_f_kl_10=n))
    return pd.DataFrame(rows)


def test_ioi_rule():
    levels = (0.5, 0.2, 0.1)
    assert rep.ioi_claims(ioi_summary(2.0, 5.0, 6.0, math.nan), levels)[0].verdict == "reproduced"
    assert rep.ioi_claims(ioi_summary(9.0, 5.0, 6.0, 7.0), levels)[0].verdict == "not reproduced"
    assert rep.ioi_claims(ioi_summary(math.nan, 5.0, 6.0, 7.0), levels)[0].verdict == "not reproduced"
    assert rep.ioi_claims(ioi_summary(5.5, 5.0, 6.0, 7.0), levels)[0].verdict == "partly"
    # nothing reaches any level: no comparison, so nothing is reproduced
    assert rep.ioi_claims(ioi_summary(*[math.nan] * 4), levels)[0].verdict == "not reproduced"
    c = rep.ioi_claims(ioi_summary(2.0, 5.0, 6.0, math.nan), levels)[0]
    assert "KL<=50%: sae 2, pca 5, ica 6, neurons —" in c.ours


def test_erasure_rule():
    def summary(**kl):
        return pd.DataFrame([dict(site="resid.9", method=m, min_kl_at_level=v) for m, v in kl.items()])

    pca, linear = rep.erasure_claims(summary(sae=0.01, pca=0.05, leace=0.02, mean_diff=math.nan), 0.75)
    assert pca.verdict == "reproduced" and linear.verdict == "reproduced"
    pca, linear = rep.erasure_claims(summary(sae=math.nan, pca=0.05, leace=0.02, mean_diff=0.03), 0.75)
    assert pca.verdict == "not reproduced" and linear.verdict == "not reproduced"
    _, linear = rep.erasure_claims(summary(sae=0.025, pca=0.05, leace=0.02, mean_diff=0.03), 0.75)
    assert linear.verdict == "not reproduced"                        # one win, one loss
    assert "sae 0.025, leace 0.02, mean_diff 0.03" in linear.ours


def test_attribution_rule():
    def table(**gaps):  # {site: (layer, atp r, ig r)}
        return pd.DataFrame([dict(site=s, layer=l, method=m, pearson=r) for s, (l, a, i) in gaps.items()
                             for m, r in (("atp", a), ("ig", i), ("ig-input", 0.0))])

    assert rep.attribution_claims(table(**{"resid.1": (1, 0.3, 0.9), "resid.9": (9, 0.8, 0.9)}))[0].verdict \
        == "reproduced"
    # IG better everywhere but the gain grows with depth: only partly
    assert rep.attribution_claims(table(**{"resid.1": (1, 0.8, 0.85), "resid.9": (9, 0.3, 0.9)}))[0].verdict \
        == "partly"
    assert rep.attribution_claims(table(**{"resid.1": (1, 0.9, 0.3), "resid.9": (9, 0.9, 0.8)}))[0].verdict \
        == "not reproduced"
    assert rep.attribution_claims(table(**{"resid.1": (1, 0.5, math.nan)}))[0].verdict == "not reproduced"
    with pytest.raises(ValueError, match="atp"):
        rep.attribution_claims(pd.DataFrame([dict(site="resid.1", layer=1, method="ig", pearson=0.5)]))


def test_layer_rule():
    def df(resid, mlp, rand=0.1):
        return pd.DataFrame([dict(kind=k, site_a=f"{k}.{l}", site_b=f"{k}.{l + 1}", layer_a=l, decoder_mean_cos=c,
                                  decoder_random_mean_cos=rand) for k, cs in (("resid", resid), ("mlp", mlp))
                             for l, c in zip((3, 4), cs)])

    high, contrast = rep.layer_claims(df((0.8, 0.7), (0.3, 0.4)))
    assert high.verdict == "reproduced" and contrast.verdict == "reproduced"
    high, contrast = rep.layer_claims(df((0.15, 0.2), (0.3, 0.4)))
    assert high.verdict == "not reproduced" and contrast.verdict == "not reproduced"
    high, contrast = rep.layer_claims(df((0.35, 0.3), (0.2, 0.4)))
    assert high.verdict == "partly" and contrast.verdict == "partly"


# --- attribution pieces ------------------------------------------------------------------------------
def test_exact_effects_equal_node_effects_exact(model):
    from circuits.attribution import node_effects
    from circuits.evaluate import ablation_effects
    from interventions.tasks import logit_diff

    torch.manual_seed(0)
    data = toy_ioi(seed=7)
    ids = torch.randint(2, 250, (16, 8), generator=torch.Generator().manual_seed(2))
    run = run_spliced(model, {"resid.0": IdentityDictionary(32)}, ids, logits=False)
    sample = {"resid.0": run.acts["resid.0"][:, 1:].reshape(-1, 32)}
    dicts = {"resid.0": fit_baselines(sample, ["pca"])["pca"]["resid.0"]}
    metric = lambda logits: logit_diff(logits, data)  # noqa: E731
    exact = node_effects(model, dicts, data.input_ids, data.cf_input_ids, metric, method="exact")
    nodes = [("resid.0", 0), ("resid.0", 5), ("resid.0", "error")]
    got = ablation_effects(model, dicts, data.input_ids, metric, nodes, ablation="patch", reference=data.cf_input_ids,
                           per_position=False)
    want = [float(exact.effects["resid.0"][i]) for i in (0, 5, 32)]
    assert got.tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert max(abs(w) for w in want) > 1e-4


def test_choose_nodes_takes_each_estimators_top_and_random_others():
    a = torch.tensor([0.0, 5.0, -4.0, 0.1, 0.2, 0.0, 0.3])
    b = torch.tensor([0.0, 0.1, 0.0, 0.2, 6.0, 0.0, 0.3])
    picked = rep.choose_nodes({"atp": a, "ig": b}, top=2, n_random=1, seed=0)
    assert {1, 2, 4} <= set(picked) and len(picked) == 5 and not {0, 5} & set(picked)
    assert picked == sorted(picked) == rep.choose_nodes({"atp": a, "ig": b}, top=2, n_random=1, seed=0)
    assert rep.choose_nodes({"atp": a}, top=2, n_random=100, seed=0) == [1, 2, 3, 4, 6]


# --- failures and the command line -----------------------------------------------------------------
def test_a_failing_section_stops_the_run_unless_keep_going(model, cache, tmp_path):
    bad = {"c": {"dataset": toy_ioi(), "dictionaries": {}}}
    with pytest.raises(ValueError, match="no dictionary at"):
        rep.run_reproduce(model, tmp_path / "stop", sections=["c"], settings=TINY, options=bad, progress=False)
    out = rep.run_reproduce(model, tmp_path / "go", sections=["attribution", "d"], settings=TINY, options=bad,
                            keep_going=True, progress=False)
    assert out["status"] == {"c": "failed", "d": "ok"}
    text = out["report"].read_text()
    assert "**This section failed**: `ValueError: no dictionary at" in text and "Traceback" in text
    times = rp.read_markdown_tables(text)[1]
    assert times.status.tolist() == ["failed", "ok"]
    with pytest.raises(ValueError, match="not being run"):
        rep.run_reproduce(model, tmp_path / "x", sections=["d"], settings=TINY, options=bad, progress=False)


def test_cli_parses_sections_and_rejects_unknown_ones(capsys):
    assert [rep.section_key(x) for x in ("a", "IOI", "erasure", "c", "layers", "universality")] == list("aabcde")
    with pytest.raises(SystemExit) as e:
        rep.main(["--sections", "a", "zz", "--out", "/nonexistent"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown section 'zz'" in err and "a (ioi)" in err and "e (universality)" in err
    with pytest.raises(ValueError, match="unknown section"):
        rep.section_key("f")
    with pytest.raises(ValueError, match="relative depths"):
        rep.Settings(ioi_depths=(1.5,))


# --- SmolLM2 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_attribution_section_on_smollm2(smollm2, tmp_path):
    from interventions.runners import harvest_sample, load_corpus_for

    corpus = load_corpus_for(smollm2, 512)
    site = rep.sites_at(smollm2, (0.1,))[0]
    pca = fit_baselines(harvest_sample(smollm2, corpus.train, [site], 512), ["pca"])["pca"]
    s = rep.Settings.quick(attribution_depths=(0.1,), ig_steps=2, top_nodes=3, random_nodes=2)
    sec = rep.attribution_section(smollm2, tmp_path, settings=s, dictionaries=pca, progress=False)
    table = sec.tables["attribution_vs_exact"]
    assert set(table.method) == {"atp", "ig", "ig-input", "exact"} and (table.n_nodes >= 3).all()
    nodes = sec.tables["attribution_nodes"]
    assert nodes.exact.abs().max() > 0 and sec.claims[0].verdict in rep.VERDICTS
