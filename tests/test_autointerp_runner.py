"""The autointerp runner end to end on a tiny model with a stub explainer/scorer client: every
family gets the same number of features, the tables agree with the per-feature CSV, Spearman is
what scipy computes, and unparseable explanations are recorded, not dropped."""
import math
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from circuits.runners import autointerp_bench as ab
from interventions.runners import report as rp
from sae.baselines import IdentityDictionary
from sae.models import tiny_model


class StubClient:
    """Explains with the first marked span; says Yes (p = 0.9) when the text contains the
    explanation's span, else p = 0.2. Spans that are not all letters get an unparseable reply."""

    def generate(self, messages, *, max_tokens=64, temperature=0.0):
        spans = re.findall(r"<<(.+?)>>", messages[-1]["content"])
        span = spans[0].strip() if spans else ""
        if not span.isalpha():
            return "Explanation:"
        return f"Explanation: the text {span}"

    def next_token_logprobs(self, messages, candidates):
        content = messages[-1]["content"]
        explanation = content.split("Explanation: ", 1)[1].split("\nText:", 1)[0]
        text = content.split("\nText:", 1)[1].rsplit("\n", 1)[0].replace("<<", "").replace(">>", "")
        p = 0.9 if explanation.removeprefix("the text ") in text else 0.2
        return {"Yes": math.log(p), "No": math.log(1 - p)}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    model = tiny_model("llama", n_layers=2, d_model=32)
    corpus = ab.load_bench_corpus(model, 2048, 16, 1024)
    df = ab.run_autointerp_bench(model, StubClient(), layers=[0, 1], scorers=["detection", "fuzzing", "embedding"],
                                 features=3, sae_tokens=2048, k=4, expansion=2, sae_dir=out / "saes",
                                 baseline_tokens=1024, n_examples=4, n_score=4, out_dir=out / "report",
                                 corpus=corpus, progress=False)
    return model, df, out


def test_same_number_of_features_per_family_and_layer(result):
    model, df, out = result
    counts = df.groupby(["family", "layer"]).size()
    assert set(counts.index) == {(f, l) for f in ab.FAMILIES for l in (0, 1)}
    assert (counts == 3).all(), counts
    for _, r in df.iterrows():
        if r.explanation_ok:
            assert r.explanation.startswith("the text ") and all(0 <= r[s] <= 1 for s in ("detection", "fuzzing"))
        else:
            assert r.explanation == "" and r.raw == "Explanation:" and math.isnan(r.detection)
    assert df.attrs["info"]["densities"]["mlp_hidden.0"] > 0


def test_tables_agree_with_the_csv(result):
    model, df, out = result
    files = df.attrs["files"]
    csv = pd.read_csv(files["csv"])
    assert len(csv) == len(df) == 30
    for s in ("detection", "fuzzing", "embedding"):
        assert csv[s].fillna(-1).tolist() == pytest.approx(df[s].fillna(-1).tolist())
    summary = pd.read_csv(files["summary_csv"])
    for (fam, layer), part in csv.groupby(["family", "layer"]):
        row = summary[(summary.family == fam) & (summary.layer.astype(str) == str(layer))].iloc[0]
        for s in ("detection", "fuzzing"):
            v = part[s].dropna()
            if len(v):
                assert row[s] == pytest.approx(v.mean())
            assert row[f"{s}_n"] == len(v)
        assert row.explained == pytest.approx(part.explanation_ok.mean())
    md = files["md"].read_text()
    tables = rp.read_markdown_tables(md)
    means = tables[0]
    assert len(means) == len(summary)
    for _, r in means.iterrows():
        ref = summary[(summary.family == r.family) & (summary.layer.astype(str) == r.layer)].iloc[0]
        assert r.detection.split(" ± ")[0] == rp.fmt(ref.detection)
    sp = tables[1]
    for _, r in sp.iterrows():
        both = csv[[r.scorer_a, r.scorer_b]].dropna()
        assert int(r.n) == len(both)
        assert r.spearman == rp.fmt(float(spearmanr(both[r.scorer_a], both[r.scorer_b]).statistic))
    assert "## SAE features vs neurons" in md and "- detection: SAE " in md
    assert files["png"].stat().st_size > 1000
    assert pd.read_csv(files["spearman_csv"]).shape[0] == 3


def test_rerun_reuses_saes_and_caches(result):
    model, df, out = result
    before = sorted(p.name for p in (out / "report" / "caches").iterdir())
    again = ab.run_autointerp_bench(model, StubClient(), layers=[0, 1], families=["sae", "neurons"],
                                    scorers=["detection"], features=3, sae_tokens=2048, k=4, expansion=2,
                                    sae_dir=out / "saes", baseline_tokens=1024, n_examples=4, n_score=4,
                                    out_dir=out / "report2", corpus=ab.load_bench_corpus(model, 2048, 16, 1024),
                                    progress=False, write=False)
    assert "loaded from" in again.attrs["info"]["sae_source"]
    ref = df[df.family.isin(["sae", "neurons"])].reset_index(drop=True)
    assert again[["family", "site", "feature", "explanation"]].equals(ref[["family", "site", "feature", "explanation"]])
    assert again.detection.fillna(-1).tolist() == pytest.approx(ref.detection.fillna(-1).tolist())
    assert before == sorted(p.name for p in (out / "report" / "caches").iterdir())


def test_thresholded_dense_features_fire_at_the_target_density():
    x = torch.randn(4000, 16)
    d = ab.Thresholded(IdentityDictionary(16), ab.density_thresholds(x, 0.05))
    dens = (d.encode(x) > 0).float().mean(0)
    assert torch.allclose(dens, torch.full((16,), 0.05), atol=0.002)
    assert torch.equal(d.W_dec, torch.eye(16))


def test_bad_input(result):
    model, df, out = result
    with pytest.raises(ValueError, match="unknown families"):
        ab.run_autointerp_bench(model, StubClient(), layers=[0], families=["ica"], write=False)
    with pytest.raises(ValueError, match="unknown scorers"):
        ab.run_autointerp_bench(model, StubClient(), layers=[0], scorers=["vibes"], write=False)
    with pytest.raises(ValueError, match="layer 7 is not a layer of tiny-llama"):
        ab.run_autointerp_bench(model, StubClient(), layers=[7], write=False)
    with pytest.raises(ValueError, match="density must be in"):
        ab.density_thresholds(torch.randn(10, 2), 1.5)


def test_cli_help():
    res = subprocess.run([sys.executable, "-m", "circuits.runners.autointerp_bench", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--features" in res.stdout and "topk_neurons" in res.stdout


class NoCalls:
    def generate(self, *a, **k):
        raise AssertionError("explained again")

    next_token_logprobs = generate


def test_rerun_skips_scored_features(result):
    """Same arguments and output directory: every feature comes from scores.jsonl, no client call."""
    model, df, out = result
    NoCalls.__name__ = "StubClient"             # the client identity is part of the record key
    again = ab.run_autointerp_bench(model, NoCalls(), layers=[0, 1], scorers=["detection", "fuzzing", "embedding"],
                                    features=3, sae_tokens=2048, k=4, expansion=2, sae_dir=out / "saes",
                                    baseline_tokens=1024, n_examples=4, n_score=4, out_dir=out / "report",
                                    corpus=ab.load_bench_corpus(model, 2048, 16, 1024), progress=False)
    cols = ["family", "site", "feature", "explanation", "detection", "fuzzing", "embedding"]
    assert again[cols].fillna(-1).equals(df[cols].fillna(-1))
    assert len((out / "report" / "scores.jsonl").read_text().splitlines()) == len(df)


def test_family_comparison_calls_small_differences_noise():
    row = lambda m, e, n: pd.Series({"detection": m, "detection_sem": e, "detection_n": n})  # noqa: E731
    assert "(SAE higher, n = 30 and 30)" in ab.compare_families(row(0.8, 0.02, 30), row(0.6, 0.02, 30), "detection")
    assert "(SAE lower," in ab.compare_families(row(0.5, 0.02, 30), row(0.7, 0.02, 30), "detection")
    # 0.05 apart with standard errors of 0.1: within 2 se = 0.28
    line = ab.compare_families(row(0.55, 0.1, 6), row(0.5, 0.1, 6), "detection")
    assert "difference 0.05 ± 0.14 (within noise, n = 6 and 6)" in line
    assert "within noise" in ab.compare_families(row(0.9, float("nan"), 1), row(0.1, float("nan"), 1), "detection")
