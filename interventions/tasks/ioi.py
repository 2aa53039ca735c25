"""Indirect object identification (IOI) prompts with aligned counterfactuals.

Wang et al. 2022, "Interpretability in the Wild: a Circuit for Indirect Object Identification in
GPT-2 small" (arXiv 2211.00593): in "When Mary and John went to the store, John gave a drink to",
the model should continue with the indirect object " Mary" (IO), not the repeated subject
" John" (S). Mentions: IO, S1 (first S), S2 (second S), END (last token, where the answer is
predicted). Orders: ABBA (IO before S1: "Mary and John ... John") and BABA (S1 before IO: "John
and Mary ... John"). The metric is

    logit_diff = logit(IO) - logit(S)   at END                           (Wang et al. §3)

Counterfactuals are the same template with the same place and object, aligned token for token:

- "ABC": all three mentions replaced by three fresh distinct names, "When A and B went to the
  store, C gave a drink to" -- Wang et al.'s p_ABC distribution, the usual corruption for path
  patching and ACDC; it carries no IO information.
- "replace_io": the IO replaced by a third name C (S kept) -- Cunningham et al. 2023 (arXiv
  2309.08600, §5) patch features from this counterfactual; its own answer is C, so
  `logit_diff(..., counterfactual=True)` = logit(C) - logit(S).
- "replace_s2": only S2 replaced by a third name C ("... A and B ..., C gave ...").

Templates are written here in ABBA form with fields {IO}, {S} (twice), {PLACE}, {OBJECT};
BABA swaps the first {IO} and {S}. Names, places and objects are filtered to words that are a
single token with a leading space; the skipped ones are counted in `IOIDataset.skipped` and
warned about. The embedded lists and templates are our own (in the style of Wang et al.'s).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from . import common
from .common import Tokenizer

FORMAT = "sae-circuits/ioi"
VERSION = 1
ORDERS = ("ABBA", "BABA")
COUNTERFACTUALS = ("ABC", "replace_io", "replace_s2")

# ABBA form. All of these are 14 tokens in SmolLM2 (and the same positions: IO 1, S1 3, S2 9,
# END 13), so a dataset may mix them; tokenizers where they differ keep the largest uniform group.
TEMPLATES: tuple[str, ...] = (
    "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
    "After {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to",
    "While {IO} and {S} were at the {PLACE}, {S} gave a {OBJECT} to",
    "When {IO} and {S} arrived at the {PLACE}, {S} handed a {OBJECT} to",
    "Once {IO} and {S} got to the {PLACE}, {S} passed a {OBJECT} to",
    "As {IO} and {S} walked to the {PLACE}, {S} gave a {OBJECT} to",
    "Since {IO} and {S} were at the {PLACE}, {S} gave a {OBJECT} to",
    "When {IO} and {S} got to the {PLACE}, {S} gave a {OBJECT} to",
    "After {IO} and {S} arrived at the {PLACE}, {S} gave a {OBJECT} to",
    "While {IO} and {S} walked to the {PLACE}, {S} handed a {OBJECT} to",
)

MALE_NAMES: tuple[str, ...] = tuple("""
James John Robert Michael William David Richard Joseph Thomas Charles Daniel Matthew Anthony Mark
Paul Steven Andrew Kenneth Joshua Kevin Brian George Edward Ronald Timothy Jason Jeffrey Ryan Jacob
Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Benjamin Samuel Frank Gregory Raymond
Alexander Patrick Jack Dennis Jerry Tyler Aaron Henry Adam Peter Nathan Zachary Kyle Walter Harold
Carl Arthur Roger Joe Albert Bruce Ralph Roy Eugene Louis Philip Tom Mike Bob Jim Steve Fred Tony
Harry Luke Ben Dan Ian Simon Martin Victor Oscar Hugo Ethan Noah Liam Owen Isaac Connor Neil Vincent
Howard Douglas Russell Wayne Keith Gordon Jeremy Sean Craig Todd Dylan
""".split())

FEMALE_NAMES: tuple[str, ...] = tuple("""
Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Margaret
Sandra Ashley Kimberly Emily Donna Michelle Carol Amanda Dorothy Melissa Deborah Stephanie Rebecca
Sharon Laura Cynthia Kathleen Amy Angela Shirley Anna Brenda Pamela Emma Nicole Helen Samantha
Katherine Christine Rachel Carolyn Janet Catherine Maria Heather Diane Ruth Julie Olivia Joyce
Virginia Victoria Lauren Christina Joan Evelyn Judith Megan Andrea Cheryl Hannah Martha Gloria
Teresa Ann Sara Madison Kathryn Abigail Alice Julia Judy Sophia Grace Denise Amber Doris Marilyn
Danielle Isabella Diana Natalie Charlotte Marie Lucy Sophie Ellen Anne Claire Rose Lily Ella Mia
Sally Molly Wendy Jenny Eva Nina Monica Erin Jane Kate
""".split())

NAMES: tuple[str, ...] = MALE_NAMES + FEMALE_NAMES

PLACES: tuple[str, ...] = tuple("""
store school park hospital restaurant office station market garden house library beach church
museum airport bank cafe hotel theater zoo farm mall gym stadium bakery bar club kitchen river lake
city village castle forest pool shop hall lab
""".split())

# Consonant-initial, so "gave a {OBJECT}" reads correctly.
OBJECTS: tuple[str, ...] = tuple("""
ring book drink snack bone basketball computer necklace pen letter ball cake gift card bag box key
phone watch hat coat flower bottle cup map ticket toy camera guitar kiss candle pencil shirt
sandwich cookie pie note present bracelet picture painting doll game
""".split())

_SLOTS = {"IO": ("IO",), "S": ("S1", "S2"), "PLACE": ("PLACE",), "OBJECT": ("OBJECT",)}
_NAME_SLOTS = ("IO", "S1", "S2")


@dataclass
class IOIPrompt:
    """One IOI prompt and its counterfactual (same template, place and object).

    word_idx: token positions of "IO", "S1", "S2", "PLACE", "OBJECT" and "END" (the last token),
    valid for both `input_ids` and `cf_input_ids`. cf_names: the names at the IO/S1/S2 slots of
    the counterfactual. cf_io / cf_s: the counterfactual's own answer and wrong answer where it
    has one ("replace_io": C and S), else None."""

    text: str
    input_ids: list[int]
    io: str
    s: str
    io_id: int
    s_id: int
    place: str
    object: str
    template: int  # index into IOIDataset.templates
    order: str  # "ABBA" or "BABA"
    word_idx: dict[str, int]
    cf_text: str | None = None
    cf_input_ids: list[int] | None = None
    cf_names: dict[str, str] | None = None
    cf_io: str | None = None
    cf_s: str | None = None
    cf_io_id: int | None = None
    cf_s_id: int | None = None


@dataclass
class IOIDataset(common.PromptDataset):
    """IOI prompts that all tokenize to the same length (see `make_ioi`).

    Index with an int for one `IOIPrompt`, with a slice or index list for a sub-dataset (e.g.
    a batch whose logits go to `logit_diff`). Tensor views (`input_ids`, `io_ids`, `end_pos`,
    ...) are built on the CPU; move them with `.to(device)`.

    skipped: the names, places, objects and templates left out because they are not single
    tokens / don't tokenize like the others in this tokenizer."""

    prompts: list[IOIPrompt]
    templates: list[str]
    counterfactual: str | None
    seed: int
    tokenizer: str
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:
        orders = {o: sum(p.order == o for p in self.prompts) for o in ORDERS}
        return (f"IOIDataset({len(self)} prompts of {self.seq_len} tokens, {orders}, "
                f"{len(self.templates)} templates, counterfactual={self.counterfactual!r}, "
                f"skipped={self.skipped_counts})")

    @property
    def cf_texts(self) -> list[str]:
        self._need_cf()
        return [p.cf_text for p in self.prompts]

    @property
    def cf_input_ids(self) -> torch.Tensor:  # [n, seq]
        self._need_cf()
        return torch.tensor([p.cf_input_ids for p in self.prompts], dtype=torch.long)

    @property
    def io_ids(self) -> torch.Tensor:  # [n]
        return torch.tensor([p.io_id for p in self.prompts], dtype=torch.long)

    @property
    def s_ids(self) -> torch.Tensor:  # [n]
        return torch.tensor([p.s_id for p in self.prompts], dtype=torch.long)

    def answer_ids(self, counterfactual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(correct, wrong) token ids [n] each: (IO, S), or the counterfactual's (C, S)."""
        if not counterfactual:
            return self.io_ids, self.s_ids
        self._need_cf()
        if self.counterfactual != "replace_io":
            raise ValueError(f"the {self.counterfactual!r} counterfactual has no indirect object to "
                             f"score; use counterfactual=False (clean IO vs S on the counterfactual "
                             f"run) or build the dataset with counterfactual='replace_io'")
        return (torch.tensor([p.cf_io_id for p in self.prompts], dtype=torch.long),
                torch.tensor([p.cf_s_id for p in self.prompts], dtype=torch.long))

    def _need_cf(self) -> None:
        if self.counterfactual is None:
            raise ValueError("this IOI dataset has no counterfactuals; build it with "
                             f"counterfactual= one of {COUNTERFACTUALS}")

    # --- files ---

    def save(self, path: str | Path) -> Path:
        """Write the dataset as JSON (atomically): texts, token ids, names, word indices."""
        return common.write_json(path, {
            "format": FORMAT, "version": VERSION, "tokenizer": self.tokenizer, "seed": self.seed,
            "counterfactual": self.counterfactual, "templates": self.templates,
            "skipped": self.skipped, "prompts": [asdict(p) for p in self.prompts]})

    @classmethod
    def load(cls, path: str | Path, tokenizer: Tokenizer | None = None) -> "IOIDataset":
        """Read a dataset written by `save`. With `tokenizer`, also check that it reproduces the
        stored token ids (raises for a file made with another tokenizer)."""
        payload = common.read_json(path, FORMAT, VERSION)
        try:
            prompts = [IOIPrompt(**p) for p in payload["prompts"]]
            ds = cls(prompts=prompts, templates=list(payload["templates"]),
                     counterfactual=payload["counterfactual"], seed=int(payload["seed"]),
                     tokenizer=str(payload["tokenizer"]), skipped=dict(payload["skipped"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is a damaged IOI file ({type(e).__name__}: {e})") from None
        if tokenizer is not None:
            common.check_retokenizes(tokenizer, ds.texts, [p.input_ids for p in prompts], path)
            if ds.counterfactual is not None:
                common.check_retokenizes(tokenizer, ds.cf_texts, [p.cf_input_ids for p in prompts], path)
        return ds


def make_ioi(tokenizer: Tokenizer, n: int = 64, *, templates: str = "both", seed: int = 0,
             counterfactual: str | None = "ABC", names: Sequence[str] | None = None,
             places: Sequence[str] | None = None, objects: Sequence[str] | None = None,
             template_strings: Sequence[str] | None = None) -> IOIDataset:
    """Generate `n` IOI prompts (Wang et al. 2022) for `tokenizer`, with counterfactuals.

    templates: "ABBA", "BABA", or "both" (alternating, so exactly half each when n is even).
    counterfactual: "ABC", "replace_io", "replace_s2" (see the module docstring) or None.
    names / places / objects: word lists (default: the embedded NAMES, PLACES, OBJECTS); words
    that are not one token with a leading space are skipped, counted in `.skipped` and warned
    about. template_strings: ABBA-form templates with {IO}, {S} twice, and optionally {PLACE}
    and {OBJECT}, ending before the answer (default: the embedded TEMPLATES, of which the largest group that tokenizes to the same
    length and positions is kept, the rest recorded in `.skipped["templates"]`); explicitly
    given templates must all align, else ValueError.

    Deterministic in `seed`. Every prompt (and counterfactual) is checked to tokenize to the
    same length with its words at the same positions; a prompt that doesn't raises ValueError
    naming it."""
    if templates not in ("ABBA", "BABA", "both"):
        raise ValueError(f"templates must be 'ABBA', 'BABA' or 'both', got {templates!r}")
    if counterfactual is not None and counterfactual not in COUNTERFACTUALS:
        raise ValueError(f"counterfactual must be one of {COUNTERFACTUALS} or None, got {counterfactual!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")

    pick = lambda given, default: default if given is None else given  # noqa: E731
    name_ids, skipped_names = common.single_token_words(tokenizer, pick(names, NAMES), "names")
    place_ids, skipped_places = common.single_token_words(tokenizer, pick(places, PLACES), "places")
    object_ids, skipped_objects = common.single_token_words(tokenizer, pick(objects, OBJECTS), "objects")
    need = 2 if counterfactual is None else 3 if counterfactual != "ABC" else 5
    for what, kept, skipped, k in (("names", name_ids, skipped_names, need),
                                   ("places", place_ids, skipped_places, 1),
                                   ("objects", object_ids, skipped_objects, 1)):
        if len(kept) < k:
            raise ValueError(f"IOI needs at least {k} {what} that are single tokens in this tokenizer "
                             f"(counterfactual={counterfactual!r}); only {len(kept)} of "
                             f"{len(kept) + len(skipped)} are ({sorted(kept)}). The tokenizer splits "
                             f"the rest into several tokens; pass {what}= with words in its vocabulary.")
    words = {"names": list(name_ids), "places": list(place_ids), "objects": list(object_ids)}
    ids = {**name_ids, **place_ids, **object_ids}

    explicit = template_strings is not None
    tpl_list = [str(t) for t in (template_strings if explicit else TEMPLATES)]
    if not tpl_list:
        raise ValueError("template_strings is empty")
    parsed = [_parse_abba(t) for t in tpl_list]
    tpl_list, parsed, skipped_templates = _uniform_templates(tokenizer, tpl_list, parsed, words, ids, explicit)

    rng = random.Random(seed)
    orders = {"ABBA": ["ABBA"], "BABA": ["BABA"], "both": ["ABBA", "BABA"]}[templates]
    specs = []
    for i in range(n):
        t = rng.randrange(len(tpl_list))
        order = orders[i % len(orders)]
        io, s = rng.sample(words["names"], 2)
        place, obj = rng.choice(words["places"]), rng.choice(words["objects"])
        cf = None
        if counterfactual is not None:
            others = [x for x in words["names"] if x not in (io, s)]
            if counterfactual == "ABC":
                a, b, c = rng.sample(others, 3)
                cf = {"IO": a, "S1": b, "S2": c}
            elif counterfactual == "replace_io":
                cf = {"IO": rng.choice(others), "S1": s, "S2": s}
            else:  # replace_s2
                cf = {"IO": io, "S1": s, "S2": rng.choice(others)}
        specs.append((t, order, io, s, place, obj, cf))

    texts, spans, expect, cf_texts, cf_spans, cf_expect = [], [], [], [], [], []
    for t, order, io, s, place, obj, cf in specs:
        parts = parsed[t] if order == "ABBA" else _to_baba(parsed[t])
        for names3, out in (({"IO": io, "S1": s, "S2": s}, (texts, spans, expect)),
                            (cf, (cf_texts, cf_spans, cf_expect))):
            if names3 is not None:
                values = {**names3, "PLACE": place, "OBJECT": obj}
                text, sp = common.render(parts, values)
                out[0].append(text), out[1].append(sp), out[2].append({k: ids[v] for k, v in values.items()})

    all_ids, all_idx = common.locate(tokenizer, texts, spans, expect)
    sigs = [common.signature(i, x, ("IO", "S1")) for i, x in zip(all_ids, all_idx)]
    common.check_aligned(texts, sigs, "IOI prompt")
    if cf_texts:
        cf_ids, cf_idx = common.locate(tokenizer, cf_texts, cf_spans, cf_expect)
        for k, (clean_idx, c_ids, c_idx) in enumerate(zip(all_idx, cf_ids, cf_idx)):
            if c_idx != clean_idx or len(c_ids) != len(all_ids[k]):
                raise ValueError(f"counterfactual {cf_texts[k]!r} does not align token for token with "
                                 f"{texts[k]!r}: positions {c_idx} vs {clean_idx}")

    prompts = []
    for k, (t, order, io, s, place, obj, cf) in enumerate(specs):
        p = IOIPrompt(text=texts[k], input_ids=all_ids[k], io=io, s=s, io_id=ids[io], s_id=ids[s],
                      place=place, object=obj, template=t, order=order, word_idx=all_idx[k])
        if cf is not None:
            p.cf_text, p.cf_input_ids, p.cf_names = cf_texts[k], cf_ids[k], dict(cf)
            if counterfactual == "replace_io":
                p.cf_io, p.cf_s, p.cf_io_id, p.cf_s_id = cf["IO"], s, ids[cf["IO"]], ids[s]
        prompts.append(p)
    return IOIDataset(prompts=prompts, templates=tpl_list, counterfactual=counterfactual, seed=seed,
                      tokenizer=common.tokenizer_name(tokenizer),
                      skipped={"names": skipped_names, "places": skipped_places,
                               "objects": skipped_objects, "templates": skipped_templates})


def _parse_abba(template: str) -> list:
    parts = common.parse_template(template, _SLOTS, optional=("PLACE", "OBJECT"))
    order = [p[0] for p in parts if isinstance(p, tuple) and p[0] in _NAME_SLOTS]
    if order != ["IO", "S1", "S2"]:
        raise ValueError(f"template {template!r} must be in ABBA form: {{IO}} first, then {{S}} "
                         f"twice (the prompt ends before the answer, the IO)")
    return parts


def _to_baba(parts: list) -> list:
    """Swap the IO and S1 slots: "When {IO} and {S}, {S} ..." -> "When {S} and {IO}, {S} ..."."""
    swap = {("IO",): ("S1",), ("S1",): ("IO",)}
    return [swap.get(p, p) if isinstance(p, tuple) else p for p in parts]


def _uniform_templates(tokenizer, tpl_list, parsed, words, ids, explicit):
    """Keep the templates that tokenize to the same length and positions (probed with the first
    name pair, place and object). Defaults: keep the largest such group and record the rest;
    explicit templates must all agree."""
    io, s = words["names"][:2]
    fill = {"IO": io, "S1": s, "S2": s, "PLACE": words["places"][0], "OBJECT": words["objects"][0]}
    texts, spans, expect = [], [], []
    for parts in parsed:
        text, sp = common.render(parts, fill)
        texts.append(text), spans.append(sp), expect.append({k: ids[v] for k, v in fill.items()})
    all_ids, all_idx = common.locate(tokenizer, texts, spans, expect)
    sigs = [common.signature(i, x, ("IO", "S1")) for i, x in zip(all_ids, all_idx)]
    keep, dropped = common.uniform_templates(tpl_list, texts, sigs, explicit, "IOI", 3)
    return [tpl_list[i] for i in keep], [parsed[i] for i in keep], dropped
