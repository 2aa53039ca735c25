"""Gendered-pronoun prediction: name-based prompts whose next token is " he" or " she".

Cunningham et al. 2023 (arXiv 2309.08600, v1 and their `erasure.py`) erase the model's ability
to predict the gendered pronoun that follows a name and compare SAE-feature ablation with LEACE;
their score, "Prediction Ability", is the probability of the correct pronoun under a softmax
restricted to the two pronoun tokens. Here a prompt is a template such as
"When {NAME} woke up this morning," filled with a clearly gendered first name; the label is
+1 for " he" and -1 for " she", and

    logit_diff = label * (logit(" he") - logit(" she"))   at END
    two_way_probability = sigmoid(logit_diff)             (Prediction Ability)
    accuracy = mean(logit_diff > 0)

Datasets are balanced (equal numbers of male and female prompts in each split), and split into
train and held-out by NAME: held-out names never appear in train, so an erasure or probe fit on
train is tested on names it never saw. The embedded templates were chosen because SmolLM2-135M
continues them with a pronoun (accuracy >= 0.94 on 32-48 prompts each); the name lists are our own.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from . import common
from .common import Tokenizer
from .ioi import FEMALE_NAMES, MALE_NAMES

FORMAT = "sae-circuits/pronouns"
VERSION = 1
PRONOUNS = {"male": " he", "female": " she"}
SPLITS = ("train", "heldout")

# All 7 tokens in SmolLM2, the name at position 1 and END at 6.
TEMPLATES: tuple[str, ...] = (
    "When {NAME} woke up this morning,",
    "Then {NAME} felt very tired, so",
    "Later {NAME} was very hungry, so",
    "Today {NAME} went to the market because",
    "When {NAME} got home from work,",
    "When {NAME} came back from school,",
    "Once {NAME} had finished the book,",
)

_SLOTS = {"NAME": ("NAME",)}


@dataclass
class PronounPrompt:
    """One prompt. label: +1 when the answer is " he", -1 for " she". word_idx: "NAME", "END"."""

    text: str
    input_ids: list[int]
    name: str
    gender: str  # "male" or "female"
    label: int
    split: str  # "train" or "heldout"
    template: int  # index into PronounDataset.templates
    word_idx: dict[str, int]


@dataclass
class PronounDataset(common.PromptDataset):
    """Balanced pronoun prompts of one token length (see `make_pronouns`).

    names: {"train": {"male": [...], "female": [...]}, "heldout": {...}}, disjoint by
    construction. he_id / she_id: the pronoun token ids. Index like a list (int -> prompt,
    slice or index list -> sub-dataset); `split("heldout")` selects one split."""

    prompts: list[PronounPrompt]
    templates: list[str]
    names: dict[str, dict[str, list[str]]]
    he_id: int
    she_id: int
    seed: int
    tokenizer: str
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        counts = {s: sum(p.split == s for p in self.prompts) for s in SPLITS}
        return (f"PronounDataset({len(self)} prompts of {self.seq_len} tokens, {counts}, "
                f"{len(self.templates)} templates, skipped={self.skipped_counts})")

    def split(self, which: str) -> "PronounDataset":
        """The prompts of one split, "train" or "heldout"."""
        if which not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {which!r}")
        return replace(self, prompts=[p for p in self.prompts if p.split == which])

    @property
    def labels(self) -> torch.Tensor:  # [n], +1 he / -1 she
        return torch.tensor([p.label for p in self.prompts], dtype=torch.long)

    def answer_ids(self, counterfactual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct, wrong) pronoun ids [n] each, so `logit_diff` is the label-signed he - she."""
        if counterfactual:
            raise ValueError("pronoun datasets have no counterfactual prompts; use counterfactual=False")
        he = torch.tensor([p.label > 0 for p in self.prompts])
        correct = torch.where(he, self.he_id, self.she_id)
        wrong = torch.where(he, self.she_id, self.he_id)
        return correct.long(), wrong.long()

    # --- files ---

    def save(self, path: str | Path) -> Path:
        """Write the dataset as JSON (atomically)."""
        return common.write_json(path, {
            "format": FORMAT, "version": VERSION, "tokenizer": self.tokenizer, "seed": self.seed,
            "templates": self.templates, "names": self.names, "he_id": self.he_id,
            "she_id": self.she_id, "skipped": self.skipped,
            "prompts": [asdict(p) for p in self.prompts]})

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer | None = None) -> "PronounDataset":
        """Read a dataset written by `save`; with `tokenizer`, check it reproduces the ids."""
        payload = common.read_json(path, FORMAT, VERSION)
        try:
            prompts = [PronounPrompt(**p) for p in payload["prompts"]]
            ds = cls(prompts=prompts, templates=list(payload["templates"]), names=payload["names"],
                     he_id=int(payload["he_id"]), she_id=int(payload["she_id"]),
                     seed=int(payload["seed"]), tokenizer=str(payload["tokenizer"]),
                     skipped=dict(payload["skipped"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is a damaged pronoun file ({type(e).__name__}: {e})") from None
        if tokenizer is not None:
            common.check_retokenizes(tokenizer, ds.texts, [p.input_ids for p in prompts], path)
        return ds


def make_pronouns(tokenizer: Tokenizer, n: int = 64, *, seed: int = 0, heldout_fraction: float = 0.25,
                  male_names: Sequence[str] | None = None, female_names: Sequence[str] | None = None,
                  templates: Sequence[str] | None = None) -> PronounDataset:
    """Generate `n` balanced pronoun prompts, split into train / held-out by name.

    n must be even. The held-out split gets ``2 * round(n * heldout_fraction / 2)`` prompts and a
    `heldout_fraction` share of each gender's names (at least one each when the fraction is > 0);
    each split has as many " he" as " she" prompts. Within a split, (name, template) pairs are
    drawn without repetition until all are used. Names that are not one token with a leading
    space are skipped, counted in `.skipped` and warned about. templates: strings with one
    {NAME} (default: the embedded TEMPLATES, whose largest uniform group is kept as in
    `make_ioi`; explicitly given ones must all tokenize alike). Deterministic in `seed`."""
    if not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"n must be a positive even int (half ' he', half ' she'), got {n!r}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    he_id = common.require_single_token(tokenizer, PRONOUNS["male"])
    she_id = common.require_single_token(tokenizer, PRONOUNS["female"])

    kept, skipped = {}, {}
    for gender, given in (("male", male_names), ("female", female_names)):
        default = MALE_NAMES if gender == "male" else FEMALE_NAMES
        kept[gender], skipped[f"{gender}_names"] = common.single_token_words(
            tokenizer, default if given is None else given, f"{gender} names")
    both = set(kept["male"]) & set(kept["female"])
    if both:
        raise ValueError(f"names given as both male and female: {sorted(both)}")
    n_held = 2 * round(n * heldout_fraction / 2)
    n_train = n - n_held
    need = 2 if n_held else 1
    for gender in kept:
        if len(kept[gender]) < need:
            raise ValueError(f"need at least {need} {gender} names that are single tokens in this "
                             f"tokenizer (one for train, one held out); only {len(kept[gender])} are. "
                             f"Skipped: {skipped[f'{gender}_names'][:10]}")

    explicit = templates is not None
    tpl_list = [str(t) for t in (templates if explicit else TEMPLATES)]
    if not tpl_list:
        raise ValueError("templates is empty")
    parsed = [common.parse_template(t, _SLOTS) for t in tpl_list]
    probe = next(iter(kept["male"]))
    texts, spans = zip(*(common.render(p, {"NAME": probe}) for p in parsed))
    ids, idx = common.locate(tokenizer, texts, spans, [{"NAME": kept["male"][probe]}] * len(texts))
    sigs = [common.signature(i, x) for i, x in zip(ids, idx)]
    keep, skipped["templates"] = common.uniform_templates(tpl_list, texts, sigs, explicit, "pronoun", 2)
    tpl_list, parsed = [tpl_list[i] for i in keep], [parsed[i] for i in keep]

    rng = random.Random(seed)
    names: dict[str, dict[str, list[str]]] = {"train": {}, "heldout": {}}
    for gender in ("male", "female"):
        pool = list(kept[gender])
        rng.shuffle(pool)
        k = max(1, round(len(pool) * heldout_fraction)) if n_held else 0
        k = min(k, len(pool) - 1)
        names["heldout"][gender], names["train"][gender] = sorted(pool[:k]), sorted(pool[k:])

    specs = []  # (split, gender, name, template)
    for split, count in (("train", n_train), ("heldout", n_held)):
        rows = []
        for gender in ("male", "female"):
            pairs = [(nm, t) for nm in names[split][gender] for t in range(len(tpl_list))]
            drawn: list[tuple[str, int]] = []
            while len(drawn) < count // 2:
                rng.shuffle(pairs)
                drawn += pairs[:count // 2 - len(drawn)]
            rows += [(split, gender, nm, t) for nm, t in drawn]
        rng.shuffle(rows)
        specs += rows

    texts, spans, expect = [], [], []
    for split, gender, nm, t in specs:
        text, sp = common.render(parsed[t], {"NAME": nm})
        texts.append(text), spans.append(sp), expect.append({"NAME": kept[gender][nm]})
    all_ids, all_idx = common.locate(tokenizer, texts, spans, expect)
    common.check_aligned(texts, [common.signature(i, x) for i, x in zip(all_ids, all_idx)], "pronoun prompt")
    prompts = [PronounPrompt(text=texts[k], input_ids=all_ids[k], name=nm, gender=gender,
                             label=1 if gender == "male" else -1, split=split, template=t,
                             word_idx=all_idx[k])
               for k, (split, gender, nm, t) in enumerate(specs)]
    return PronounDataset(prompts=prompts, templates=tpl_list, names=names, he_id=he_id,
                          she_id=she_id, seed=seed, tokenizer=common.tokenizer_name(tokenizer),
                          skipped=skipped)
