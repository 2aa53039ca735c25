"""Score an explanation of a feature against held-out windows (Paulo et al. 2024, arXiv 2410.13928,
§3; Bills et al. 2023 for simulation). Each scorer returns a `ScoreResult(scorer, score, details)`.

    detection     the scorer LM sees the explanation and an unmarked window and answers Yes/No
                  ("does the text contain it?", after one Yes and one No worked example);
                  p = P(Yes) / (P(Yes) + P(No)), prediction p >= 1/2. details: balanced accuracy
                  (TPR + TNR) / 2, F1, AUC of p, TPR, TNR; score = AUC by default (`metric=`):
                  threshold-free, so a small scorer's bias towards one answer does not flatten it
                  to 1/2 (SmolLM2-135M puts P(Yes) < 1/2 on nearly every window).
    fuzzing       the same with tokens marked << >>: activating windows marked where the feature
                  fires (c_t > 0.3 max), non-activating windows with k random tokens marked,
                  k = ceil(mean number of marked tokens per activating window); "are the marked
                  tokens examples of it?". Same metrics.
    simulation    all at once: one raw prompt per window lists its tokens as "token<TAB>n"; the
                  expected activation at each token is E[n] = Σ_n n P(n) / Σ_n P(n) over the
                  single-token values "0".."10" read from the next-token distribution after the
                  TAB. score = Pearson r over all tokens between E[n] and the true activations
                  on the 0..10 scale ceil(10 c_t / max c) (0 for non-activating windows).
    embedding     cosine similarity between the explanation's and each window's sentence
                  embedding (all-MiniLM-L6-v2); score = AUROC, activating vs non-activating.
    surprisal     per-window mean NLL of the window's tokens after "Description: <explanation>"
                  vs after an uninformative description; reduction r = NLL_uninf - NLL_expl;
                  score = AUROC of r, activating vs non-activating.
    intervention  steer the feature, x' = x + alpha f_i at every position, with alpha found by a
                  bounded search so that the mean KL(clean || steered) of the next-token
                  distribution at the prompts' last position is target_kl; generate greedy
                  continuations with and without steering; score =
                  mean_prompts(log P(expl | steered text) - log P(expl | clean text)) / (KL + 1e-6)
                  (the normalisation of delphi's intervention scorer, Paulo et al. §3.3.5).

AUROC = P(s_pos > s_neg) + P(s_pos = s_neg) / 2 (Mann-Whitney). The scorer LM is any client of
`circuits.autointerp.clients`; `split_examples` keeps the explainer's windows and the scorers'
disjoint.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from .examples import FeatureExamples, Window, token_strings
from .explain import activation_scale, choose_windows, format_window


@dataclass
class ScoreResult:
    scorer: str
    score: float
    details: dict = field(default_factory=dict)


# --- metrics ------------------------------------------------------------------------------------

def confusion(labels: Sequence[bool], preds: Sequence[bool]) -> dict[str, int]:
    tp = sum(1 for y, p in zip(labels, preds) if y and p)
    fn = sum(1 for y, p in zip(labels, preds) if y and not p)
    fp = sum(1 for y, p in zip(labels, preds) if not y and p)
    tn = sum(1 for y, p in zip(labels, preds) if not y and not p)
    return {"tp": tp, "fn": fn, "fp": fp, "tn": tn}


def balanced_accuracy(labels: Sequence[bool], preds: Sequence[bool]) -> float:
    """(TPR + TNR) / 2; needs both classes."""
    c = confusion(labels, preds)
    if not (c["tp"] + c["fn"]) or not (c["tn"] + c["fp"]):
        raise ValueError("balanced accuracy needs positive and negative examples")
    return 0.5 * (c["tp"] / (c["tp"] + c["fn"]) + c["tn"] / (c["tn"] + c["fp"]))


def f1_score(labels: Sequence[bool], preds: Sequence[bool]) -> float:
    """2 TP / (2 TP + FP + FN) (0 when there is nothing to find or predict)."""
    c = confusion(labels, preds)
    d = 2 * c["tp"] + c["fp"] + c["fn"]
    return 2 * c["tp"] / d if d else 0.0


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float:
    """AUROC = P(s_pos > s_neg) + P(s_pos = s_neg) / 2, by ranks (average ranks for ties)."""
    s = torch.as_tensor(list(scores), dtype=torch.float64)
    y = torch.as_tensor([bool(v) for v in labels])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if len(s) != len(y) or not n_pos or not n_neg:
        raise ValueError(f"AUC needs equal-length labels and scores with both classes, got "
                         f"{n_pos} positive, {n_neg} negative, {len(s)} scores")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average rank over each run of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson r; 0 when either side is constant (no linear information)."""
    a = torch.as_tensor(list(x), dtype=torch.float64)
    b = torch.as_tensor(list(y), dtype=torch.float64)
    if a.shape != b.shape or a.numel() < 2:
        raise ValueError(f"pearson needs two equal-length sequences of >= 2 values, got {a.shape}, {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    d = a.norm() * b.norm()
    return float((a @ b) / d) if d > 0 else 0.0


CLASSIFICATION_METRICS = ("auc", "balanced_accuracy", "f1")


def _classification(name: str, labels: list[bool], probs: list[float], extra: dict, metric: str) -> ScoreResult:
    if metric not in CLASSIFICATION_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {CLASSIFICATION_METRICS}")
    preds = [p >= 0.5 for p in probs]
    c = confusion(labels, preds)
    details = {"balanced_accuracy": balanced_accuracy(labels, preds), "f1": f1_score(labels, preds),
               "auc": roc_auc(labels, probs), "tpr": c["tp"] / max(1, c["tp"] + c["fn"]),
               "tnr": c["tn"] / max(1, c["tn"] + c["fp"]), **c, "labels": labels, "p_yes": probs, **extra}
    return ScoreResult(name, details[metric], details)


# --- windows ------------------------------------------------------------------------------------

def _key(w: Window) -> tuple[int, int]:
    return (w.row, w.start)


def split_examples(examples: FeatureExamples, seed: int = 0) -> tuple[FeatureExamples, FeatureExamples]:
    """(train, test): disjoint halves of the activating windows, every quantile bin split in
    half (so both halves span all strengths; a window listed in several groups lands on one
    side), and of the random and hard negatives. Statistics are copied to both."""
    rng = random.Random(seed)
    side: dict[tuple[int, int], int] = {}
    for group in [*examples.quantiles, examples.top, examples.random]:
        new = [w for w in group if _key(w) not in side]
        rng.shuffle(new)
        counts = [sum(1 for w in group if side.get(_key(w)) == s) for s in (0, 1)]
        for w in new:  # fill the smaller side first
            s = 0 if counts[0] <= counts[1] else 1
            side[_key(w)] = s
            counts[s] += 1

    def half(ws: list[Window], s: int) -> list[Window]:
        return [w for w in ws if side[_key(w)] == s]

    def split_neg(ws: list[Window]) -> tuple[list[Window], list[Window]]:
        idx = list(range(len(ws)))
        rng.shuffle(idx)
        a = set(idx[:len(ws) // 2])
        return [w for i, w in enumerate(ws) if i in a], [w for i, w in enumerate(ws) if i not in a]

    neg = split_neg(examples.negatives)
    hard = split_neg(examples.hard_negatives)
    out = []
    for s in (0, 1):
        out.append(replace(examples, top=half(examples.top, s), random=half(examples.random, s),
                           quantiles=[half(q, s) for q in examples.quantiles],
                           negatives=neg[s], hard_negatives=hard[s]))
    return out[0], out[1]


def scoring_windows(examples: FeatureExamples, n_activating: int, n_negatives: int, *, seed: int = 0,
                    hard_negatives: bool = False) -> tuple[list[Window], list[Window]]:
    """(activating, non-activating) windows to score on: activating spread over quantiles,
    negatives from `negatives` (or `hard_negatives` first when asked)."""
    act = choose_windows(examples, n_activating, seed)
    pool = [*examples.hard_negatives, *examples.negatives] if hard_negatives else list(examples.negatives)
    rng = random.Random(seed + 1)
    neg = pool if len(pool) <= n_negatives else rng.sample(pool, n_negatives)
    if not act or not neg:
        raise ValueError(f"feature {examples.feature} at {examples.site}: scoring needs activating and "
                         f"non-activating windows, got {len(act)} and {len(neg)}; build the cache with "
                         "more examples (n_top, n_negatives)")
    return act, neg


def window_text(window: Window, tokenizer: Any) -> str:
    return tokenizer.decode(list(window.tokens))


def _p_yes(lp: dict[str, float]) -> float:
    """P(Yes) / (P(Yes) + P(No)); 1/2 when the client saw neither."""
    a, b = lp["Yes"], lp["No"]
    if a == -math.inf and b == -math.inf:
        return 0.5
    return 1.0 / (1.0 + math.exp(min(700.0, b - a)))


def _batch(client: Any, method: str, items: list, *args, **kwargs) -> list:
    many = getattr(client, method + "_batch", None)
    if many is not None:
        return many(items, *args, **kwargs)
    return [getattr(client, method)(i, *args, **kwargs) for i in items]


# --- detection and fuzzing ----------------------------------------------------------------------

CLASSIFY_SYSTEM = ("You check texts against an explanation of a language-model feature. "
                   "Answer with one word: Yes or No.")


DETECTION_QUESTION = "Does the text contain what the explanation describes?"
FUZZING_QUESTION = "Are the tokens marked with << >> examples of what the explanation describes?"
# one Yes and one No worked example per task (a small scorer needs them to answer in form)
FEW_SHOT = {
    DETECTION_QUESTION: [("It rained all day and the wind was cold.", "Yes"), ("He sold his old car to a friend.", "No")],
    FUZZING_QUESTION: [("It <<rained>> all day and the <<wind>> was cold.", "Yes"),
                       ("He sold his <<old>> car to a <<friend>>.", "No")],
}


def _user(explanation: str, text: str, question: str) -> dict:
    return {"role": "user", "content": f"Explanation: {explanation}\nText: {text}\n{question} Answer Yes or No."}


def _ask(explanation: str, text: str, question: str) -> list[dict]:
    shots = []
    for t, answer in FEW_SHOT.get(question, []):
        shots += [_user("words about the weather", t, question), {"role": "assistant", "content": answer}]
    return [{"role": "system", "content": CLASSIFY_SYSTEM}, *shots, _user(explanation, text, question)]


def score_detection(explanation: str, examples: FeatureExamples, client: Any, tokenizer: Any, *,
                    n_activating: int = 10, n_negatives: int = 10, hard_negatives: bool = False,
                    seed: int = 0, metric: str = "auc") -> ScoreResult:
    """Detection (module docstring): one unmarked window per prompt; `metric` picks the headline
    score among CLASSIFICATION_METRICS (all are in details)."""
    act, neg = scoring_windows(examples, n_activating, n_negatives, seed=seed, hard_negatives=hard_negatives)
    windows, labels = [*act, *neg], [True] * len(act) + [False] * len(neg)
    prompts = [_ask(explanation, window_text(w, tokenizer), DETECTION_QUESTION) for w in windows]
    probs = [_p_yes(lp) for lp in _batch(client, "next_token_logprobs", prompts, ["Yes", "No"])]
    return _classification("detection", labels, probs, {}, metric)


def fuzz_marks(windows: Sequence[Window], n_marks: int, seed: int = 0) -> list[list[bool]]:
    """n_marks random token positions marked per (non-activating) window."""
    rng = random.Random(seed)
    out = []
    for w in windows:
        k = min(n_marks, len(w.tokens))
        chosen = set(rng.sample(range(len(w.tokens)), k))
        out.append([i in chosen for i in range(len(w.tokens))])
    return out


def score_fuzzing(explanation: str, examples: FeatureExamples, client: Any, tokenizer: Any, *,
                  n_activating: int = 10, n_negatives: int = 10, threshold: float = 0.3,
                  hard_negatives: bool = False, seed: int = 0, metric: str = "auc") -> ScoreResult:
    """Fuzzing (module docstring): correctly marked activating windows vs randomly marked
    non-activating ones; `metric` as for detection."""
    act, neg = scoring_windows(examples, n_activating, n_negatives, seed=seed, hard_negatives=hard_negatives)
    true_marks = [[a > threshold * w.max_act for a in w.acts] for w in act]
    n_marks = max(1, math.ceil(sum(map(sum, true_marks)) / len(act)))
    texts = ([format_window(w, tokenizer, marked=m) for w, m in zip(act, true_marks)]
             + [format_window(w, tokenizer, marked=m) for w, m in zip(neg, fuzz_marks(neg, n_marks, seed))])
    labels = [True] * len(act) + [False] * len(neg)
    prompts = [_ask(explanation, t, FUZZING_QUESTION) for t in texts]
    probs = [_p_yes(lp) for lp in _batch(client, "next_token_logprobs", prompts, ["Yes", "No"])]
    return _classification("fuzzing", labels, probs, {"n_marks": n_marks}, metric)


# --- simulation ---------------------------------------------------------------------------------

SIM_HEADER = ("A feature of a language model is described by an explanation. For each token of a text, "
              "its activation is listed on a scale from 0 (inactive) to 10 (most active).\n\n"
              "Explanation: the word \"cat\"\nActivations:\nThe\t0\n cat\t10\n sat\t0\n on\t0\n the\t0\n"
              " mat\t0\n\n")
VALUES = [str(n) for n in range(11)]


def simulation_prompt(explanation: str, strings: Sequence[str]) -> tuple[str, list[int]]:
    """(prompt, character offset of each token's placeholder value)."""
    text = SIM_HEADER + f"Explanation: {explanation}\nActivations:\n"
    offsets = []
    for s in strings:
        text += s.replace("\n", "\\n").replace("\t", "\\t") + "\t"
        offsets.append(len(text))
        text += "0\n"
    return text, offsets


def expected_value(logprobs: dict[str, float]) -> float | None:
    """Σ n P(n) / Σ P(n) over the values the client could score; None if it scored none."""
    finite = {int(k): v for k, v in logprobs.items() if v > -math.inf and k.isdigit()}
    if not finite:
        return None
    m = max(finite.values())
    w = {n: math.exp(v - m) for n, v in finite.items()}
    return sum(n * p for n, p in w.items()) / sum(w.values())


def score_simulation(explanation: str, examples: FeatureExamples, client: Any, tokenizer: Any, *,
                     n_activating: int = 10, n_negatives: int = 5, seed: int = 0) -> ScoreResult:
    """Simulation, all at once (module docstring)."""
    act, neg = scoring_windows(examples, n_activating, n_negatives, seed=seed)
    m = examples.max_act or max(w.max_act for w in act)
    windows = [*act, *neg]
    prompts = [simulation_prompt(explanation, token_strings(tokenizer, w.tokens)) for w in windows]
    rows = _batch(client, "prompt_logprobs", [p for p, _ in prompts], candidates=VALUES)
    sim, true, missing = [], [], 0
    for w, (text, offsets), toks in zip(windows, prompts, rows):
        at = {t.offset: i for i, t in enumerate(toks)}
        for off, a in zip(offsets, activation_scale(w.acts, m) if w.max_act > 0 else [0] * len(w.acts)):
            i = at.get(off)
            if i is None or i == 0:
                raise ValueError(f"the scorer's tokenizer does not start a token at a simulated value "
                                 f"(offset {off}); simulation needs values tokenized on their own")
            e = expected_value(toks[i - 1].candidates)
            missing += e is None
            sim.append(0.0 if e is None else e)
            true.append(float(a))
    n_act = sum(len(w.tokens) for w in act)
    details = {"pearson_activating": pearson(sim[:n_act], true[:n_act]), "n_tokens": len(sim),
               "unscored_tokens": missing, "simulated": sim, "true": true}
    return ScoreResult("simulation", pearson(sim, true), details)


# --- embedding ----------------------------------------------------------------------------------

def score_embedding(explanation: str, examples: FeatureExamples, client: Any = None, tokenizer: Any = None, *,
                    n_activating: int = 10, n_negatives: int = 10, hard_negatives: bool = False, seed: int = 0,
                    embed: Callable[[list[str]], torch.Tensor] | None = None) -> ScoreResult:
    """Embedding (module docstring). `client` is unused (kept for the common signature);
    `embed` defaults to `circuits.autointerp.embedding.embed`."""
    if embed is None:
        from .embedding import embed
    act, neg = scoring_windows(examples, n_activating, n_negatives, seed=seed, hard_negatives=hard_negatives)
    vecs = embed([explanation, *(window_text(w, tokenizer) for w in [*act, *neg])])  # [1 + n, dim]
    sims = (vecs[1:] @ vecs[0]).tolist()
    labels = [True] * len(act) + [False] * len(neg)
    return ScoreResult("embedding", roc_auc(labels, sims), {"similarity": sims, "labels": labels})


# --- surprisal ----------------------------------------------------------------------------------

SURPRISAL_PREFIX = ("Description: weather\nSentence: It rained all morning and the wind was cold.\n\n"
                    "Description: numbers\nSentence: She bought 3 apples and 12 pears.\n\n")
UNINFORMATIVE = "various unrelated sentences"


def _sentence_prompt(description: str, text: str) -> tuple[str, int]:
    head = SURPRISAL_PREFIX + f"Description: {description}\nSentence:" + ("" if text[:1].isspace() else " ")
    return head + text, len(head)


def _mean_nll(rows: Sequence[Any], start: int) -> float:
    vals = [-r.logprob for r in rows if r.offset >= start and not math.isnan(r.logprob)]
    return sum(vals) / len(vals) if vals else 0.0


def score_surprisal(explanation: str, examples: FeatureExamples, client: Any, tokenizer: Any, *,
                    n_activating: int = 10, n_negatives: int = 10, hard_negatives: bool = False,
                    seed: int = 0) -> ScoreResult:
    """Surprisal (module docstring)."""
    act, neg = scoring_windows(examples, n_activating, n_negatives, seed=seed, hard_negatives=hard_negatives)
    texts = [window_text(w, tokenizer) for w in [*act, *neg]]
    prompts = [_sentence_prompt(d, t) for d in (explanation, UNINFORMATIVE) for t in texts]
    rows = _batch(client, "prompt_logprobs", [p for p, _ in prompts])
    nll = [_mean_nll(r, start) for r, (_, start) in zip(rows, prompts)]
    n = len(texts)
    reduction = [nll[n + i] - nll[i] for i in range(n)]
    labels = [True] * len(act) + [False] * len(neg)
    return ScoreResult("surprisal", roc_auc(labels, reduction),
                       {"loss_reduction": reduction, "labels": labels, "nll_explained": nll[:n],
                        "nll_uninformative": nll[n:]})


# --- intervention -------------------------------------------------------------------------------

PROMPTS = ("The", "I think that", "Once upon a time,", "Here is a short story:")
EXPLANATION_TEMPLATE = "{text}\n\nThe text above is about"


def _last_logprobs(model: Any, dictionary: Any, site: str, feature: int, batch: dict, alpha: float) -> torch.Tensor:
    """log-softmax of the next-token logits at each prompt's last real token [n_prompts, vocab]."""
    from interventions.steering import steer

    run = steer(model, {site: dictionary}, batch, {site: [feature]}, alpha=alpha)
    last = batch["attention_mask"].sum(1) - 1
    logits = run.logits[torch.arange(len(last)), last.to(run.logits.device)]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def find_alpha(kl_of: Callable[[float], float], target_kl: float, *, start: float = 1.0, tol: float = 0.1,
               max_steps: int = 15) -> tuple[float, float, int]:
    """(alpha, KL(alpha), steps): double alpha until KL >= target, then bisect (log scale) until
    |KL - target| <= tol * target or max_steps forwards were spent. KL is assumed to grow with alpha."""
    if start <= 0 or target_kl <= 0 or max_steps < 1:
        raise ValueError(f"need start > 0, target_kl > 0, max_steps >= 1; got {start}, {target_kl}, {max_steps}")
    lo, hi, steps = 0.0, None, 0
    a = start
    best = (a, math.inf)
    while steps < max_steps:
        kl = kl_of(a)
        steps += 1
        if abs(kl - target_kl) < abs(best[1] - target_kl):
            best = (a, kl)
        if abs(kl - target_kl) <= tol * target_kl:
            break
        if kl < target_kl:
            lo = a
            a = a * 2 if hi is None else math.sqrt(lo * hi)
        else:
            hi = a
            a = math.sqrt(lo * hi) if lo > 0 else a / 2
    return best[0], best[1], steps


def _explanation_logprob(client: Any, texts: list[str], explanation: str) -> list[float]:
    prompts = []
    for t in texts:
        head = EXPLANATION_TEMPLATE.format(text=t.strip())
        prompts.append((head + " " + explanation, len(head)))
    rows = _batch(client, "prompt_logprobs", [p for p, _ in prompts])
    return [sum(r.logprob for r in rs if r.offset >= start and not math.isnan(r.logprob))
            for rs, (_, start) in zip(rows, prompts)]


def score_intervention(explanation: str, examples: FeatureExamples, model: Any, tokenizer: Any = None, *,
                       dictionary: Any, client: Any = None, prompts: Sequence[str] = PROMPTS,
                       target_kl: float = 1.0, kl_tol: float = 0.1, max_steps: int = 15,
                       max_new_tokens: int = 8) -> ScoreResult:
    """Intervention scoring (module docstring). `model`: the `sae.Model` the feature lives in;
    `dictionary`: the Dictionary at `examples.site`; `client`: the LM that scores the explanation
    (default: a `LocalClient` of `model`)."""
    from interventions.steering import steer_generate

    site, feature = examples.site, int(examples.feature)
    tokenizer = tokenizer or model.tokenizer
    if client is None:
        from .clients import LocalClient

        client = LocalClient(model)
    if not prompts:
        raise ValueError("intervention scoring needs at least one prompt")
    batch = model.tokenize(list(prompts))
    clean = _last_logprobs(model, dictionary, site, feature, batch, 0.0)

    def kl_of(alpha: float) -> float:
        steered = _last_logprobs(model, dictionary, site, feature, batch, alpha)
        return float((clean.exp() * (clean - steered)).sum(-1).mean())  # KL(clean || steered)

    scale = float(examples.max_act) if examples.max_act > 0 else 1.0
    alpha, kl, steps = find_alpha(kl_of, target_kl, start=scale, tol=kl_tol, max_steps=max_steps)
    texts = {}
    for name, a in (("clean", 0.0), ("steered", alpha)):
        texts[name] = []
        for p in prompts:
            ids = model.tokenize(p)
            out = steer_generate(model, {site: dictionary}, ids, {site: [feature]}, alpha=a,
                                 max_new_tokens=max_new_tokens)
            texts[name].append(p + tokenizer.decode(out[0, ids["input_ids"].shape[1]:].tolist(),
                                                    skip_special_tokens=True))
    lp_clean = _explanation_logprob(client, texts["clean"], explanation)
    lp_steered = _explanation_logprob(client, texts["steered"], explanation)
    gain = sum(s - c for s, c in zip(lp_steered, lp_clean)) / len(prompts)
    return ScoreResult("intervention", gain / (kl + 1e-6),
                       {"alpha": alpha, "kl": kl, "search_steps": steps, "logp_gain": gain,
                        "logp_steered": lp_steered, "logp_clean": lp_clean,
                        "steered_texts": texts["steered"], "clean_texts": texts["clean"]})


SCORERS: dict[str, Callable[..., ScoreResult]] = {
    "detection": score_detection,
    "fuzzing": score_fuzzing,
    "simulation": score_simulation,
    "embedding": score_embedding,
    "surprisal": score_surprisal,
    "intervention": score_intervention,
}
