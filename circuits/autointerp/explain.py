"""Explain a feature from its activating windows (Bills et al. 2023; Paulo et al. 2024).

Each window is shown as text with the tokens where the feature fires strongly marked,

    marked(t)  <=>  c_t > threshold * max_t' c_t'   (the window's max; threshold 0.3)

consecutive marked tokens forming one <<span>>, as delphi's default explainer does. With
`show_activations` each window is followed by its marked tokens and their activations on the
integer scale a_t = ceil(10 c_t / m), clamped to 0..10, m the feature's max activation
(OpenAI's normalisation). The client
answers with a short phrase; `parse_explanation` takes the text after the last
"Explanation:" marker (or the first line), drops a restatement of the question and
everything after the first sentence, strips quotes and markup, and reports an empty or overlong
answer as `Explanation(ok=False, raw=...)`, never dropping it silently.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .examples import FeatureExamples, Window, token_strings

SYSTEM = ("You study a feature of a language model. You see text excerpts; the tokens where the "
          "feature is active are marked like <<this>>. Say in a few words what the marked tokens "
          "have in common. Answer with one short line that starts with 'Explanation:'.")

QUESTION = "What do the marked tokens have in common?"
FEW_SHOT_USER = ("Example 1: the <<dog>> barked at the mail carrier\n"
                 "Example 2: she fed her <<cat>> and two <<rabbits>>\n"
                 "Example 3: a <<horse>> stood in the field\n" + QUESTION)
FEW_SHOT_ANSWER = "Explanation: names of animals"

MAX_CHARS = 200


@dataclass(frozen=True)
class Explanation:
    """An explainer's answer: `text` the parsed explanation ("" when `ok` is False), `raw` the
    model's full reply."""

    text: str
    ok: bool
    raw: str


def _visible(s: str) -> str:
    return s.replace("\n", "\\n").replace("\t", "\\t")


def activation_scale(acts: Sequence[float], max_act: float) -> list[int]:
    """a_t = ceil(10 c_t / m), clamped to 0..10 (0 where c_t <= 0)."""
    if max_act <= 0:
        return [0 for _ in acts]
    return [0 if a <= 0 else min(10, max(0, math.ceil(10 * a / max_act))) for a in acts]


def mark_tokens(strings: Sequence[str], marked: Sequence[bool]) -> str:
    """The text with each run of marked tokens wrapped in << >> (leading spaces kept outside)."""
    out, i = [], 0
    while i < len(strings):
        if not marked[i]:
            out.append(_visible(strings[i]))
            i += 1
            continue
        j = i
        while j < len(strings) and marked[j]:
            j += 1
        span = "".join(strings[i:j])
        lead = span[:len(span) - len(span.lstrip())]
        out.append(f"{_visible(lead)}<<{_visible(span.lstrip())}>>")
        i = j
    return "".join(out)


def format_window(window: Window, tokenizer: Any, *, max_act: float | None = None, threshold: float = 0.3,
                  show_activations: bool = False, marked: Sequence[bool] | None = None) -> str:
    """One window as marked text: tokens above `threshold` times the window's own max are marked
    (`marked` overrides that rule); activation values are scaled by `max_act` (default: the
    window's max)."""
    strings = token_strings(tokenizer, window.tokens)
    wmax = window.max_act
    m = wmax if max_act is None else max_act
    if marked is None:
        marked = [wmax > 0 and a > threshold * wmax for a in window.acts]
    text = mark_tokens(strings, marked)
    if show_activations:
        scale = activation_scale(window.acts, m)
        pairs = [f'("{_visible(s.strip()) or _visible(s)}", {v})' for s, v, k in zip(strings, scale, marked) if k]
        text += "\nActivations: " + (", ".join(pairs[:10]) if pairs else "none")
    return text


def choose_windows(examples: FeatureExamples, n: int, seed: int = 0) -> list[Window]:
    """n activating windows spread over the quantile bins (Paulo et al.: explanations from top
    examples alone are too specific), topped up from `top`; strongest first."""
    rng = random.Random(seed)
    bins = [list(q) for q in examples.quantiles if q]
    chosen, seen = [], set()
    while bins and len(chosen) < n:
        for q in reversed(bins):  # strongest bin first in each round
            if q and len(chosen) < n:
                w = q.pop(rng.randrange(len(q)))
                if (w.row, w.start) not in seen:
                    seen.add((w.row, w.start))
                    chosen.append(w)
        bins = [q for q in bins if q]
    for w in [*examples.top, *examples.random]:
        if len(chosen) >= n:
            break
        if (w.row, w.start) not in seen:
            seen.add((w.row, w.start))
            chosen.append(w)
    return sorted(chosen, key=lambda w: -w.max_act)


def explain_messages(windows: Sequence[Window], tokenizer: Any, *, max_act: float, threshold: float = 0.3,
                     show_activations: bool = False) -> list[dict]:
    """The chat prompt: system instructions, one worked example, then the feature's windows."""
    body = "\n".join(f"Example {i + 1}: " + format_window(w, tokenizer, max_act=max_act, threshold=threshold,
                                                          show_activations=show_activations)
                     for i, w in enumerate(windows))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": FEW_SHOT_USER},
            {"role": "assistant", "content": FEW_SHOT_ANSWER},
            {"role": "user", "content": body + "\n" + QUESTION}]


_MARKER = re.compile(r"\[?\s*explanation\s*\]?\s*[:\-]", re.IGNORECASE)
# A restatement of the question before the answer ("The marked tokens have in common that ...",
# "The marked tokens have the following characteristics:"): small explainers open with it.
_PREAMBLE = re.compile(r"^(?:the\s+)?(?:marked|highlighted)\s+tokens?\s+(?:all\s+)?(?:have|share|are)"
                       r"(?:\s+in\s+common)?(?:\s+(?:the\s+following(?:\s+common)?\s+\w+|that|is))?\s*[:,]?\s*",
                       re.IGNORECASE)
# Leading quotes, markup and list markers ("1. ") of a line.
_LEAD = re.compile(r"^(?:[\s\"'`*#>\-]|\d+[.)]\s)+")
# The end of the first sentence: a period followed by a space and a capital letter.
_SENTENCE_END = re.compile(r"\.\s+(?=[A-Z])")


def parse_explanation(raw: str) -> Explanation:
    """The explanation in a reply: text after the last 'Explanation:' marker, else the first
    non-empty line, without a restatement of the question ("The marked tokens have in common
    that") and cut after its first sentence; quotes, markdown and << >> stripped. Empty or over
    200 characters or without a word of two letters ("1") -> ok=False."""
    if not isinstance(raw, str):
        return Explanation("", False, repr(raw))
    text = raw
    hits = list(_MARKER.finditer(text))
    if hits:
        text = text[hits[-1].end():]
    lines = [_LEAD.sub("", ln).strip() for ln in text.strip().splitlines()]
    lines = [rest for ln in lines if (rest := _PREAMBLE.sub("", ln, count=1).strip())]  # a bare preamble line goes
    text = _SENTENCE_END.split(lines[0], maxsplit=1)[0] if lines else ""
    text = text.replace("<<", "").replace(">>", "")
    text = re.sub(r"[\s\"'`*]+$", "", _LEAD.sub("", text)).strip()
    text = text.rstrip(".").strip()
    if not re.search(r"[^\W\d_]{2}", text) or len(text) > MAX_CHARS or _MARKER.fullmatch(text + ":"):
        return Explanation("", False, raw)
    return Explanation(text, True, raw)


def explain(examples: FeatureExamples, client: Any, tokenizer: Any, *, n_examples: int = 10,
            threshold: float = 0.3, show_activations: bool = False, max_tokens: int = 40,
            temperature: float = 0.0, seed: int = 0) -> Explanation:
    """Explain one feature from `n_examples` of its activating windows (pass the *train* half
    of `split_examples` so that scorers see other windows)."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold is a fraction of the max activation in [0, 1), got {threshold}")
    if n_examples < 1:
        raise ValueError(f"n_examples must be >= 1, got {n_examples}")
    windows = choose_windows(examples, n_examples, seed)
    if not windows:
        return Explanation("", False, f"feature {examples.feature} at {examples.site} has no activating windows")
    max_act = examples.max_act or max(w.max_act for w in windows)
    messages = explain_messages(windows, tokenizer, max_act=max_act, threshold=threshold,
                                show_activations=show_activations)
    raw = client.generate(messages, max_tokens=max_tokens, temperature=temperature)
    return parse_explanation(raw)
