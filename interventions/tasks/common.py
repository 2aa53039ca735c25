"""What every task shares: single-token word filtering, template filling with word positions,
alignment checks, the answer metrics and JSON files.

A task prompt is a template with named slots (``"When {IO} and {S} went to the {PLACE}, ..."``)
filled with words that are each ONE token (with a leading space) in the model's tokenizer. That
makes every prompt of a dataset the same number of tokens with its words at the same positions,
so prompts batch without padding and a position index (IO, S2, END, ...) means the same thing in
every row -- the property patching experiments rely on (Wang et al. 2022, arXiv 2211.00593, build
their IOI dataset the same way; Cunningham et al. 2023, arXiv 2309.08600, patch all positions
of aligned clean/counterfactual pairs). Words that are not a single token are skipped and
reported, never silently dropped; prompts that do not tokenize as the template requires raise.

Metrics are pure torch functions of logits ``[batch, pos, vocab]`` and a dataset that gives,
per prompt, the END position and a correct and a wrong answer token:

    logit_diff = logit[END, correct] - logit[END, wrong]                       # [batch]
    two_way_probability = softmax over {correct, wrong} = sigmoid(logit_diff)  # [batch]
    kl_to_target = KL(softmax(target) || softmax(run)) at given positions

`two_way_probability` is the "Prediction Ability" of Cunningham et al.'s pronoun-erasure
experiments (probability of the correct pronoun among the two).
"""
from __future__ import annotations

import operator
from dataclasses import replace

import json
import string
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from sae.io import atomic_path

Tokenizer = Any  # a `transformers` fast tokenizer (anything callable with return_offsets_mapping)


# --- words --------------------------------------------------------------------------------------

def clean_words(words: Iterable[str], what: str) -> list[str]:
    """Strip, drop empties and duplicates (keeping first-seen order); raise on non-strings."""
    out: dict[str, None] = {}
    for w in words:
        if not isinstance(w, str):
            raise TypeError(f"{what} must be strings, got {w!r} ({type(w).__name__})")
        w = w.strip()
        if w:
            out[w] = None
    return list(out)


def single_token_id(tokenizer: Tokenizer, word: str) -> int | None:
    """The id of `" " + word` when that is exactly one known token that decodes back to `word`,
    else None (several tokens, the unknown token, or a lossy round trip)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        return None
    (tid,) = ids
    if tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id and word != tokenizer.unk_token:
        return None
    if tokenizer.decode([tid]).strip() != word:
        return None
    return int(tid)


def single_token_words(tokenizer: Tokenizer, words: Iterable[str], what: str
                       ) -> tuple[dict[str, int], list[str]]:
    """Split `words` into those that are one token with a leading space ({word: id}) and those
    skipped. Warns with the count and examples of skipped words (never a silent drop)."""
    words = clean_words(words, what)
    kept: dict[str, int] = {}
    skipped: list[str] = []
    for w in words:
        tid = single_token_id(tokenizer, w)
        if tid is None:
            skipped.append(w)
        else:
            kept[w] = tid
    if skipped:
        examples = ", ".join(skipped[:8]) + (", ..." if len(skipped) > 8 else "")
        warnings.warn(f"skipped {len(skipped)} of {len(words)} {what} that are not a single token "
                      f"(with a leading space) in this tokenizer: {examples}", stacklevel=3)
    return kept, skipped


def require_single_token(tokenizer: Tokenizer, text: str) -> int:
    """The single token id of `text` (e.g. " he"); a clear error when it is several tokens, the
    unknown token, or does not decode back to `text`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id) \
            or tokenizer.decode(ids).strip() != text.strip():
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"{text!r} must be a single token in this tokenizer, but it tokenizes "
                         f"as {pieces}")
    return int(ids[0])


# --- templates ----------------------------------------------------------------------------------

def parse_template(template: str, slot_names: dict[str, Sequence[str]],
                   optional: Sequence[str] = ()) -> list[str | tuple[str]]:
    """Split a ``str.format``-style template into literal strings and slots.

    slot_names maps a field name to the slot names of its successive occurrences, e.g.
    ``{"S": ("S1", "S2")}`` names the first ``{S}`` "S1" and the second "S2". A slot is returned
    as a 1-tuple ``(slot,)`` so it can't be confused with literal text. Fields in `optional` may
    also be absent."""
    parts: list[str | tuple[str]] = []
    seen: dict[str, int] = {}
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string: {e}") from None
    for literal, field, spec, conv in parsed:
        if literal:
            parts.append(literal)
        if field is None:
            continue
        if field not in slot_names or spec or conv:
            raise ValueError(f"template {template!r}: unknown field {{{field}}}; allowed fields are "
                             + ", ".join("{" + f + "}" for f in slot_names))
        k = seen.get(field, 0)
        if k >= len(slot_names[field]):
            raise ValueError(f"template {template!r}: {{{field}}} may appear at most "
                             f"{len(slot_names[field])} time(s)")
        seen[field] = k + 1
        parts.append((slot_names[field][k],))
    for field, names in slot_names.items():
        if seen.get(field, 0) != len(names) and not (field in optional and field not in seen):
            raise ValueError(f"template {template!r} must contain {{{field}}} exactly {len(names)} "
                             f"time(s), found {seen.get(field, 0)}")
    if parts and isinstance(parts[-1], tuple):
        raise ValueError(f"template {template!r} must end with literal text (the END token), "
                         f"not with a slot")
    return parts


def render(parts: Sequence[str | tuple[str]], values: dict[str, str]
           ) -> tuple[str, dict[str, tuple[int, int]]]:
    """Fill parsed template parts; returns the text and each slot's character span."""
    text, spans = "", {}
    for part in parts:
        if isinstance(part, tuple):
            (slot,) = part
            spans[slot] = (len(text), len(text) + len(values[slot]))
            text += values[slot]
        else:
            text += part
    return text, spans


def locate(tokenizer: Tokenizer, texts: Sequence[str], spans: Sequence[dict[str, tuple[int, int]]],
           expected: Sequence[dict[str, int]]) -> tuple[list[list[int]], list[dict[str, int]]]:
    """Tokenize `texts` (with the tokenizer's usual special tokens, as the model sees them) and
    find the token position of every slot, plus END (the last token of the text).

    Each slot must be exactly one token whose id is `expected[i][slot]` (the word's id on its
    own); anything else means the tokenizer merges or splits the word in context, and raises
    naming the prompt."""
    try:
        enc = tokenizer(list(texts), return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as e:
        raise TypeError(f"tasks need a fast tokenizer that returns character offsets "
                        f"(return_offsets_mapping=True); {type(tokenizer).__name__} failed: {e}") from None
    all_ids, all_idx = [], []
    for i, text in enumerate(texts):
        ids, offsets = enc["input_ids"][i], enc["offset_mapping"][i]
        real = [j for j, (a, b) in enumerate(offsets) if b > a]
        if not real:
            raise ValueError(f"prompt {text!r} tokenizes to no text tokens")
        idx: dict[str, int] = {}
        for slot, (start, end) in spans[i].items():
            hit = [j for j in real if offsets[j][1] > start and offsets[j][0] < end]
            if len(hit) != 1 or ids[hit[0]] != expected[i][slot]:
                pieces = tokenizer.convert_ids_to_tokens([ids[j] for j in hit])
                want = tokenizer.convert_ids_to_tokens([expected[i][slot]])
                raise ValueError(
                    f"prompt {text!r} cannot be tokenized as its template requires: the {slot} word "
                    f"{text[start:end]!r} becomes {pieces} in context, not the single token {want} it "
                    f"is on its own. Put a space before every slot and punctuation or a space after it.")
            idx[slot] = hit[0]
        idx["END"] = real[-1]
        all_ids.append([int(t) for t in ids])
        all_idx.append(idx)
    return all_ids, all_idx


def signature(ids: Sequence[int], idx: dict[str, int], swappable: Sequence[str] = ()) -> tuple:
    """What must agree between prompts of one dataset: length and word positions (positions of
    `swappable` slots compared as a set, since ABBA and BABA swap IO and S1)."""
    fixed = tuple(sorted((k, v) for k, v in idx.items() if k not in swappable))
    return len(ids), fixed, tuple(sorted(idx[k] for k in swappable))


def check_aligned(texts: Sequence[str], sigs: Sequence[tuple], what: str) -> None:
    """Raise naming the first prompt whose length/word positions differ from the first prompt's."""
    for text, sig in zip(texts, sigs):
        if sig != sigs[0]:
            raise ValueError(
                f"{what} {text!r} does not align with {texts[0]!r}: {sig[0]} vs {sigs[0][0]} tokens, "
                f"word positions {dict(sig[1])} vs {dict(sigs[0][1])}. Every prompt of a dataset must "
                f"tokenize to the same length with the same word positions; use templates and "
                f"words that tokenize uniformly in this tokenizer.")


def uniform_templates(templates: Sequence[str], texts: Sequence[str], sigs: Sequence[tuple],
                      explicit: bool, what: str, stacklevel: int) -> tuple[list[int], list[str]]:
    """Which templates to keep so every prompt aligns: explicitly given templates must all share
    one signature (else ValueError naming the odd one); for the embedded defaults keep the
    largest group with one signature (ties: the group met first) and warn about the rest.
    Returns (kept indices, dropped templates)."""
    if explicit:
        check_aligned(texts, sigs, f"{what} template")
        return list(range(len(templates))), []
    groups: dict[tuple, list[int]] = {}
    for i, sig in enumerate(sigs):
        groups.setdefault(sig, []).append(i)
    keep = max(groups.values(), key=len)
    dropped = [t for i, t in enumerate(templates) if i not in keep]
    if dropped:
        warnings.warn(f"skipped {len(dropped)} of {len(templates)} {what} templates that tokenize to "
                      f"a different length or word positions than the others in this tokenizer: "
                      f"{dropped}", stacklevel=stacklevel + 1)
    return keep, dropped


def tokenizer_name(tokenizer: Tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# --- metrics ------------------------------------------------------------------------------------

class PromptDataset:
    """What the IOI and pronoun datasets share: a list of aligned prompts (same length, same word
    positions) with token ids, word indices and the words skipped while building them."""

    prompts: list
    skipped: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, key):
        """int -> one prompt; slice, index list or LongTensor -> a sub-dataset."""
        if isinstance(key, slice):
            return replace(self, prompts=self.prompts[key])
        try:
            return self.prompts[operator.index(key)]
        except TypeError:
            return replace(self, prompts=[self.prompts[int(i)] for i in key])

    @property
    def skipped_counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.skipped.items()}

    @property
    def seq_len(self) -> int:
        return len(self.prompts[0].input_ids) if self.prompts else 0

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def input_ids(self) -> torch.Tensor:  # [n, seq]
        return torch.tensor([p.input_ids for p in self.prompts], dtype=torch.long)

    @property
    def word_idx(self) -> dict[str, torch.Tensor]:
        """word name -> LongTensor [n] of token positions."""
        keys = self.prompts[0].word_idx if self.prompts else {}
        return {k: torch.tensor([p.word_idx[k] for p in self.prompts], dtype=torch.long) for k in keys}

    @property
    def end_pos(self) -> torch.Tensor:  # [n]
        return torch.tensor([p.word_idx["END"] for p in self.prompts], dtype=torch.long)


def _answer_logits(logits: torch.Tensor, dataset, counterfactual: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, pos, vocab], got shape {tuple(logits.shape)}")
    correct, wrong = dataset.answer_ids(counterfactual=counterfactual)  # [n], [n]
    end = dataset.end_pos  # [n]
    if logits.shape[0] != len(end):
        raise ValueError(f"logits have batch {logits.shape[0]} but the dataset has {len(end)} prompts; "
                         f"slice the dataset (dataset[i:j]) to match the batch")
    if int(end.max()) >= logits.shape[1]:
        raise ValueError(f"logits have {logits.shape[1]} positions but the END position is "
                         f"{int(end.max())}: run the model on dataset.input_ids")
    rows = torch.arange(len(end), device=logits.device)
    at_end = logits[rows, end.to(logits.device)]  # [batch, vocab]
    return (at_end.gather(1, correct.to(logits.device)[:, None])[:, 0],
            at_end.gather(1, wrong.to(logits.device)[:, None])[:, 0])


def logit_diff(logits: torch.Tensor, dataset, *, counterfactual: bool = False) -> torch.Tensor:
    """logit(correct) - logit(wrong) at each prompt's END position -> [batch].

    IOI: logit(IO) - logit(S) (Wang et al. 2022). Pronouns: logit(right pronoun) - logit(other),
    i.e. the label-signed logit(" he") - logit(" she"). counterfactual=True uses the answers of
    the counterfactual prompts (IOI "replace_io": logit(C) - logit(S)); datasets without
    counterfactual answers raise."""
    good, bad = _answer_logits(logits, dataset, counterfactual)
    return good.float() - bad.float()


def accuracy(logits: torch.Tensor, dataset, *, counterfactual: bool = False) -> torch.Tensor:
    """Fraction of prompts whose correct answer beats the wrong one (logit_diff > 0) -> scalar."""
    return (logit_diff(logits, dataset, counterfactual=counterfactual) > 0).float().mean()


def two_way_probability(logits: torch.Tensor, dataset, *, counterfactual: bool = False) -> torch.Tensor:
    """Probability of the correct answer under a softmax restricted to {correct, wrong} ->
    [batch]; equals sigmoid(logit_diff). Cunningham et al. 2023's "Prediction Ability"."""
    return torch.sigmoid(logit_diff(logits, dataset, counterfactual=counterfactual))


def kl_to_target(logits: torch.Tensor, target_logits: torch.Tensor,
                 positions: int | torch.Tensor | None = None, *, reverse: bool = False) -> torch.Tensor:
    """KL divergence between the next-token distributions of a run and a target run.

    Default ``KL(softmax(target) || softmax(logits))``: how much the run loses in explaining the
    target run (the faithfulness direction of ACDC/Marks et al.). ``reverse=True`` gives
    ``KL(softmax(logits) || softmax(target))``, the direction of Cunningham et al.'s IOI patching
    score (edited run vs counterfactual run).

    logits, target_logits: [batch, pos, vocab] (same shape). positions: None for every position
    (-> [batch, pos]); an int for one position in every row (-> [batch]); a LongTensor [batch]
    of one position per row (e.g. dataset.end_pos, -> [batch]) or [batch, k] (-> [batch, k]).
    Computed in float32."""
    if logits.shape != target_logits.shape or logits.ndim != 3:
        raise ValueError(f"logits and target_logits must both be [batch, pos, vocab] with the same "
                         f"shape, got {tuple(logits.shape)} and {tuple(target_logits.shape)}")
    b, p, _ = logits.shape
    if positions is None:
        pos = torch.arange(p, device=logits.device).expand(b, p)
    elif isinstance(positions, int):
        pos = torch.full((b,), positions, device=logits.device)
    else:
        pos = torch.as_tensor(positions, device=logits.device).long()
        if pos.ndim not in (1, 2) or pos.shape[0] != b:
            raise ValueError(f"positions must be an int, [batch] or [batch, k]; got shape "
                             f"{tuple(pos.shape)} for batch {b}")
    squeeze = pos.ndim == 1
    pos = pos[:, None] if squeeze else pos  # [batch, k]
    if int(pos.min()) < -p or int(pos.max()) >= p:
        raise ValueError(f"positions out of range for sequence length {p}: {pos.tolist()}")
    pos = pos % p
    rows = torch.arange(b, device=logits.device)[:, None]
    run = torch.log_softmax(logits[rows, pos].float(), dim=-1)  # [batch, k, vocab]
    tgt = torch.log_softmax(target_logits[rows, pos].float(), dim=-1)
    p_log, q_log = (run, tgt) if reverse else (tgt, run)
    prob = p_log.exp()
    kl = torch.where(prob > 0, prob * (p_log - q_log), torch.zeros_like(prob)).sum(-1)  # [batch, k]
    return kl[:, 0] if squeeze else kl


# --- files --------------------------------------------------------------------------------------

def write_json(path: str | Path, payload: dict) -> Path:
    """Write `payload` as JSON atomically (a failed write leaves no half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))
    return path


def read_json(path: str | Path, fmt: str, version: int) -> dict:
    """Read a task file, checking its format tag and version."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task file at {path}")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); was it written by save()?") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a {fmt!r} file (format: {found!r})")
    if payload.get("version") != version:
        raise ValueError(f"{path} has {fmt} version {payload.get('version')!r}; this sae-circuits "
                         f"reads version {version}. Regenerate it.")
    return payload


def check_retokenizes(tokenizer: Tokenizer, texts: Sequence[str], ids: Sequence[Sequence[int]],
                      path: str | Path) -> None:
    """Raise when `tokenizer` does not reproduce the stored token ids (a different tokenizer)."""
    if not texts:
        return
    enc = tokenizer(list(texts))["input_ids"]
    for text, got, want in zip(texts, enc, ids):
        if list(got) != list(want):
            raise ValueError(f"{path}: this tokenizer ({tokenizer_name(tokenizer)}) tokenizes {text!r} "
                             f"differently from the stored ids; the file was made for another tokenizer")
