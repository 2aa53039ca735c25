"""Planted features and a keyword stub client for the explainer and scorer tests."""
from __future__ import annotations

import math
import re

from circuits.autointerp.clients import TokenLogprob
from circuits.autointerp.examples import FeatureExamples, Window

POSITIVE = ["The dog ran across the yard.", "My neighbor walks her dog every morning.",
            "A small dog barked at the mailman.", "We adopted a dog from the shelter.",
            "The dog slept by the warm fire.", "He threw a ball and the dog chased it.",
            "Every dog in the park wore a collar.", "Her dog loves to swim in the lake.",
            "The old dog could not climb the stairs.", "They bought food for the dog yesterday.",
            "A dog sat quietly near the door.", "The farmer's dog guarded the sheep."]
NEGATIVE = ["The train left the station at noon.", "She wrote a long letter to her aunt.",
            "The soup was too hot to eat.", "He fixed the roof before the storm.",
            "We watched a movie about space.", "The library closes at six tonight.",
            "My brother plays the piano well.", "The bank raised its interest rates.",
            "Rain fell on the quiet town.", "They painted the kitchen bright yellow.",
            "The price of bread went up again.", "A bus stopped at the corner."]


def planted_window(tokenizer, text: str, row: int, word: str = "dog", act: float = 5.0) -> Window:
    """Token ids of `text`; activation `act` on every token that is part of `word`, else 0."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end()) for m in re.finditer(re.escape(word), text)]
    acts = tuple(act if any(a < e and b > s for s, e in spans) and b > a else 0.0
                 for a, b in enc["offset_mapping"])
    return Window(tuple(enc["input_ids"]), acts, row, 0)


def planted_examples(tokenizer, word: str = "dog") -> FeatureExamples:
    """A feature firing on `word` in simple English sentences (activations 5, or 2.5 in the
    lower quantile bin), with non-activating sentences as negatives."""
    act = [planted_window(tokenizer, s, i, word, 5.0 if i % 2 else 2.5) for i, s in enumerate(POSITIVE)]
    neg = [planted_window(tokenizer, s, 100 + i, word) for i, s in enumerate(NEGATIVE)]
    assert all(w.max_act > 0 for w in act) and all(w.max_act == 0 for w in neg)
    low = [w for w in act if w.max_act < 5]
    high = [w for w in act if w.max_act == 5]
    return FeatureExamples("resid.3", 7, top=high[:3], quantiles=[low, high], random=act[:2], negatives=neg,
                           max_act=5.0, density=0.02, n_tokens=1000)


def _words(explanation: str) -> set[str]:
    stop = {"the", "word", "words", "and", "about", "mentions", "various", "unrelated", "sentences"}
    return {w for w in re.findall(r"[a-z]+", explanation.lower()) if len(w) >= 3 and w not in stop}


class KeywordClient:
    """A scorer that 'understands' an explanation as a set of words: Yes when one of them is in
    the (marked part of the) text; simulated activation 10 on tokens that are such a word; lower
    surprisal for sentences that contain one. Character-level tokens."""

    def __init__(self):
        self.calls = 0

    def next_token_logprobs_batch(self, batch, candidates):
        out = []
        for messages in batch:
            self.calls += 1
            m = re.search(r"Explanation: (.*)\nText: (.*)\n", messages[-1]["content"])
            words, text = _words(m.group(1)), m.group(2)
            if "<<" in text:
                text = " ".join(re.findall(r"<<(.*?)>>", text))
            yes = any(w in text.lower() for w in words)
            out.append({"Yes": math.log(0.9 if yes else 0.1), "No": math.log(0.1 if yes else 0.9)})
        return out

    def prompt_logprobs_batch(self, texts, *, candidates=None):
        out = []
        for text in texts:
            self.calls += 1
            explanations = re.findall(r"Explanation: (.*)\n", text) or re.findall(r"Description: (.*)\n", text)
            words = _words(explanations[-1]) if explanations else set()
            sent = text.rfind("Sentence:")
            sentence = text[sent:].lower() if sent >= 0 else ""
            lp_sentence = -1.0 if any(w in sentence for w in words) else -2.0
            hot = _hot_tabs(text, words) if candidates else set()
            rows = []
            for i, ch in enumerate(text):
                cands = {}
                if candidates and ch == "\t":
                    cands = {c: (0.0 if (c == "10") == (i in hot) else -6.0) for c in candidates}
                lp = math.nan if i == 0 else (lp_sentence if sent >= 0 and i > sent else -3.0)
                rows.append(TokenLogprob(ch, i, lp, cands))
            out.append(rows)
        return out


def _hot_tabs(text: str, words: set[str]) -> set[int]:
    """Offsets of the TABs of the simulation lines whose token is part of one of `words` in the
    text the lines spell out (so it works for any tokenizer)."""
    body = text[text.rfind("Activations:\n") + len("Activations:\n"):]
    base = len(text) - len(body)
    spelled, spans, pos = "", [], base
    for line in body.split("\n"):
        if "\t" in line:
            tok = line[:line.rindex("\t")]
            spans.append((len(spelled), len(spelled) + len(tok), pos + len(tok)))
            spelled += tok
        pos += len(line) + 1
    hits = [(m.start(), m.end()) for w in words for m in re.finditer(re.escape(w), spelled.lower())]
    return {tab for a, b, tab in spans if b > a and any(a < e and b > s for s, e in hits)}
