"""Task datasets (IOI, gendered pronouns) and their metrics.

Fast tests use an in-memory word-level tokenizer (every vocabulary word is one token, so the
single-token filter, word positions and alignment checks can be tested exactly) and the real
SmolLM2 tokenizer when its cache exists; slow tests check that SmolLM2 solves the prompts."""
import glob
import json
import warnings

import pytest
import torch

from interventions.tasks import (IOIDataset, PronounDataset, accuracy, kl_to_target, logit_diff,
                                 make_ioi, make_pronouns, two_way_probability)
from interventions.tasks import ioi as ioi_module
from interventions.tasks import pronouns as pronoun_module
from sae.io import cache_dir
from sae.models import byte_tokenizer

NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "Tom", "Emma", "James", "Anna", "Peter"]
MALE = ["John", "Bob", "Tom", "James", "Peter"]
FEMALE = ["Mary", "Alice", "Sarah", "Emma", "Anna"]
PLACES = ["store", "park", "school"]
OBJECTS = ["drink", "book", "ring"]


def _word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def wtok():
    """Word-level tokenizer: the template words, the test names/places/objects, he/she, and '-'
    (so "Mary-Ann" is three tokens)."""
    import re

    template_words = []
    for t in ioi_module.TEMPLATES + pronoun_module.TEMPLATES:
        template_words += re.findall(r"\w+|[^\w\s]+", re.sub(r"\{\w+\}", " ", t))
    return _word_tokenizer(template_words + NAMES + PLACES + OBJECTS + ["he", "she", "-", "Then"])


@pytest.fixture(scope="module")
def smol_tok():
    dirs = sorted(glob.glob(str(cache_dir("models") / "SmolLM2-135M-Instruct-*")))
    if not dirs:
        pytest.skip("no cached SmolLM2 tokenizer (run sae.models.load_model() once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dirs[0])


def _ioi(tok, **kw):
    kw.setdefault("names", NAMES)
    kw.setdefault("places", PLACES)
    kw.setdefault("objects", OBJECTS)
    return make_ioi(tok, **kw)


def _pronouns(tok, **kw):
    kw.setdefault("male_names", MALE)
    kw.setdefault("female_names", FEMALE)
    return make_pronouns(tok, **kw)


def _word(tok, token_id):
    return tok.decode([int(token_id)]).strip()


# --- IOI --------------------------------------------------------------------------------------

def test_only_single_token_names_and_skips_are_counted(wtok):
    names = NAMES + ["Zebedee", "Mary-Ann"]  # unknown to the vocabulary; three tokens
    with pytest.warns(UserWarning) as caught:
        ds = _ioi(wtok, n=40, names=names, places=PLACES + ["moon"])
    messages = [str(w.message) for w in caught]
    assert any("skipped 2 of 12 names" in m and "Zebedee, Mary-Ann" in m for m in messages)
    assert any("skipped 1 of 4 places" in m and "moon" in m for m in messages)
    assert ds.skipped["names"] == ["Zebedee", "Mary-Ann"]
    assert ds.skipped["places"] == ["moon"]
    assert ds.skipped_counts == {"names": 2, "places": 1, "objects": 0, "templates": 0}
    used = {p.io for p in ds.prompts} | {p.s for p in ds.prompts}
    assert used <= set(NAMES) and len(used) > 5
    assert {p.place for p in ds.prompts} <= set(PLACES)


def test_default_lists_with_smollm2_skip_multi_token_words(smol_tok):
    with pytest.warns(UserWarning) as caught:
        ds = make_ioi(smol_tok, n=16)
    assert any("names that are not a single token" in str(w.message) for w in caught)
    assert ds.skipped_counts["names"] > 0 and "Brandon" in ds.skipped["names"]
    for p in ds.prompts:
        for name in (p.io, p.s):
            assert len(smol_tok(" " + name, add_special_tokens=False)["input_ids"]) == 1
    assert ds.skipped["templates"] == []  # the embedded templates all align in SmolLM2


@pytest.mark.parametrize("which", ["word", "smol"])
def test_prompts_align_and_word_indices_point_at_the_words(which, wtok, request):
    tok = wtok if which == "word" else request.getfixturevalue("smol_tok")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_ioi(tok, n=24) if which == "smol" else _ioi(tok, n=24)
    ids = ds.input_ids
    assert ids.shape == (24, ds.seq_len)
    for k, p in enumerate(ds.prompts):
        assert tok(p.text)["input_ids"] == p.input_ids
        w = p.word_idx
        assert _word(tok, ids[k, w["IO"]]) == p.io and _word(tok, ids[k, w["S1"]]) == p.s
        assert _word(tok, ids[k, w["S2"]]) == p.s
        assert _word(tok, ids[k, w["PLACE"]]) == p.place and _word(tok, ids[k, w["OBJECT"]]) == p.object
        assert w["END"] == ds.seq_len - 1 and p.text.endswith(_word(tok, ids[k, w["END"]]))
        assert ids[k, w["IO"]] == p.io_id and ids[k, w["S2"]] == p.s_id and p.io != p.s
    # S2 and END sit at the same position in every prompt; IO/S1 swap between ABBA and BABA
    assert ds.word_idx["S2"].unique().numel() == 1 and ds.end_pos.unique().numel() == 1


def test_abba_and_baba_structure(wtok):
    abba = _ioi(wtok, n=10, templates="ABBA")
    baba = _ioi(wtok, n=10, templates="BABA")
    both = _ioi(wtok, n=10, templates="both")
    assert all(p.order == "ABBA" and p.word_idx["IO"] < p.word_idx["S1"] for p in abba.prompts)
    assert all(p.order == "BABA" and p.word_idx["S1"] < p.word_idx["IO"] for p in baba.prompts)
    assert [p.order for p in both.prompts] == ["ABBA", "BABA"] * 5
    p = baba[0]
    assert p.text.index(" " + p.s) < p.text.index(" " + p.io) < p.text.rindex(" " + p.s)


@pytest.mark.parametrize("kind,changed", [("ABC", {"IO", "S1", "S2"}), ("replace_io", {"IO"}),
                                          ("replace_s2", {"S2"})])
def test_counterfactuals_align_token_for_token(wtok, kind, changed):
    ds = _ioi(wtok, n=20, counterfactual=kind)
    clean, cf = ds.input_ids, ds.cf_input_ids
    assert cf.shape == clean.shape
    for k, p in enumerate(ds.prompts):
        diff = {slot for slot in ("IO", "S1", "S2") if clean[k, p.word_idx[slot]] != cf[k, p.word_idx[slot]]}
        assert diff == changed, p.cf_text
        other = [i for i in range(ds.seq_len) if i not in {p.word_idx[s] for s in changed}]
        assert torch.equal(clean[k, other], cf[k, other])  # template, place, object untouched
        for slot in ("IO", "S1", "S2"):
            assert _word(wtok, cf[k, p.word_idx[slot]]) == p.cf_names[slot]
        new = {p.cf_names[s] for s in changed}
        assert not new & {p.io, p.s} and len(new) == len(changed)  # fresh, distinct names
    if kind == "replace_io":
        correct, wrong = ds.answer_ids(counterfactual=True)
        assert correct.tolist() == [wtok.convert_tokens_to_ids(p.cf_io) for p in ds.prompts]
        assert torch.equal(wrong, ds.s_ids)
    else:
        with pytest.raises(ValueError, match="no indirect object"):
            ds.answer_ids(counterfactual=True)


def test_no_counterfactual(wtok):
    ds = _ioi(wtok, n=4, counterfactual=None)
    assert ds.prompts[0].cf_text is None
    with pytest.raises(ValueError, match="no counterfactuals"):
        ds.cf_input_ids


def test_json_round_trip(wtok, smol_tok, tmp_path):
    ds = _ioi(wtok, n=12, counterfactual="replace_io", seed=3)
    path = ds.save(tmp_path / "ioi.json")
    assert json.loads(path.read_text())["prompts"][0]["word_idx"]["END"] == ds.seq_len - 1
    back = IOIDataset.load(path, tokenizer=wtok)
    assert back == ds and torch.equal(back.cf_input_ids, ds.cf_input_ids)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind
    with pytest.raises(ValueError, match="made for another tokenizer"):
        IOIDataset.load(path, tokenizer=smol_tok)
    pr = _pronouns(wtok, n=8)
    pr_path = pr.save(tmp_path / "pronouns.json")
    assert PronounDataset.load(pr_path, tokenizer=wtok) == pr
    with pytest.raises(ValueError, match="is not a 'sae-circuits/ioi' file"):
        IOIDataset.load(pr_path)
    with pytest.raises(FileNotFoundError):
        IOIDataset.load(tmp_path / "missing.json")


def test_determinism_by_seed(wtok):
    a, b = _ioi(wtok, n=16, seed=5), _ioi(wtok, n=16, seed=5)
    assert a.texts == b.texts and a.cf_texts == b.cf_texts
    assert _ioi(wtok, n=16, seed=6).texts != a.texts
    p, q = _pronouns(wtok, n=16, seed=1), _pronouns(wtok, n=16, seed=1)
    assert p.texts == q.texts and p.names == q.names
    assert _pronouns(wtok, n=16, seed=2).texts != p.texts


def test_slicing_keeps_metadata(wtok):
    ds = _ioi(wtok, n=10)
    assert len(ds[2:5]) == 3 and ds[2:5].prompts[0] is ds.prompts[2]
    assert ds[[0, 9]].texts == [ds.texts[0], ds.texts[9]]
    assert ds[torch.tensor([9, 0])].texts == [ds.texts[9], ds.texts[0]]
    assert ds[torch.tensor(3)] is ds.prompts[3]
    assert ds[2:5].counterfactual == ds.counterfactual


# --- bad input --------------------------------------------------------------------------------

def test_untokenizable_template_names_the_prompt(wtok):
    glued = "When {IO}x and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
    with pytest.raises(ValueError, match=r"cannot be tokenized as its template requires.*IO word"):
        _ioi(wtok, n=4, template_strings=[glued])


def test_templates_of_different_lengths_raise(wtok):
    short = "When {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
    long = "Then , {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
    with pytest.raises(ValueError, match=r"does not align with.*15 vs 14 tokens"):
        _ioi(wtok, n=4, template_strings=[short, long])


def test_misaligned_default_templates_are_skipped_and_reported(wtok, monkeypatch):
    odd = "Then , {IO} and {S} went to the {PLACE}, {S} gave a {OBJECT} to"
    monkeypatch.setattr(ioi_module, "TEMPLATES", ioi_module.TEMPLATES + (odd,))
    with pytest.warns(UserWarning, match="skipped 1 of 11 IOI templates"):
        ds = _ioi(wtok, n=30)
    assert ds.skipped["templates"] == [odd] and odd not in ds.templates
    assert all(not p.text.startswith("Then") for p in ds.prompts)


def test_bad_template_fields_and_forms(wtok):
    with pytest.raises(ValueError, match="unknown field"):
        _ioi(wtok, n=2, template_strings=["When {IO} and {X}, {S} gave {S} to"])
    with pytest.raises(ValueError, match="exactly 2"):
        _ioi(wtok, n=2, template_strings=["When {IO} and {S} went, Bob gave it to"])
    with pytest.raises(ValueError, match="ABBA form"):
        _ioi(wtok, n=2, template_strings=["When {S} and {S} saw {IO}, she gave it to"])
    with pytest.raises(ValueError, match="at most 1 time"):  # the answer is not part of the prompt
        _ioi(wtok, n=2, template_strings=["When {IO} and {S} went, {S} gave it to {IO}"])
    with pytest.raises(ValueError, match="end with literal text"):
        _ioi(wtok, n=2, template_strings=["When {IO} and {S} went, {S} gave it at the {PLACE}"])
    with pytest.raises(ValueError, match="templates must be"):
        _ioi(wtok, n=2, templates="AB")
    with pytest.raises(ValueError, match="counterfactual must be"):
        _ioi(wtok, n=2, counterfactual="swap")


def test_byte_tokenizer_has_no_single_token_names():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="at least 5 names that are single tokens"):
            make_ioi(byte_tokenizer(), n=4)


# --- pronouns ---------------------------------------------------------------------------------

def test_pronouns_balanced_with_disjoint_heldout_names(wtok):
    ds = _pronouns(wtok, n=40, heldout_fraction=0.4)
    train, held = ds.split("train"), ds.split("heldout")
    assert (len(train), len(held)) == (24, 16)
    for part in (train, held):
        assert sum(p.label == 1 for p in part.prompts) == sum(p.label == -1 for p in part.prompts)
    train_names = {p.name for p in train.prompts}
    held_names = {p.name for p in held.prompts}
    assert train_names and held_names and not train_names & held_names
    for split in ("train", "heldout"):
        listed = ds.names[split]
        assert not set(listed["male"]) & set(ds.names["train" if split == "heldout" else "heldout"]["male"])
        assert {p.name for p in ds.split(split).prompts} <= set(listed["male"]) | set(listed["female"])
    for k, p in enumerate(ds.prompts):
        assert (p.gender == "male") == (p.name in MALE) and p.label == (1 if p.name in MALE else -1)
        assert _word(wtok, ds.input_ids[k, p.word_idx["NAME"]]) == p.name
        assert p.word_idx["END"] == ds.seq_len - 1
    assert _word(wtok, ds.he_id) == "he" and _word(wtok, ds.she_id) == "she"


def test_pronoun_names_filtered_and_errors(wtok):
    with pytest.warns(UserWarning, match="skipped 1 of 6 female names"):
        ds = _pronouns(wtok, n=8, female_names=FEMALE + ["Zelda"])
    assert ds.skipped["female_names"] == ["Zelda"] and ds.skipped["male_names"] == []
    with pytest.raises(ValueError, match="even"):
        _pronouns(wtok, n=7)
    with pytest.raises(ValueError, match="both male and female"):
        _pronouns(wtok, n=8, female_names=FEMALE + ["John"])
    with pytest.raises(ValueError, match="heldout_fraction"):
        _pronouns(wtok, n=8, heldout_fraction=1.0)
    no_she = _word_tokenizer(["When", "woke", "up", "this", "morning", ",", "he"] + MALE + FEMALE)
    with pytest.raises(ValueError, match="' she' must be a single token"):
        _pronouns(no_she, n=8)


def test_pronouns_with_smollm2_tokenizer(smol_tok):
    with pytest.warns(UserWarning) as caught:
        ds = make_pronouns(smol_tok, n=32)
    assert sum("names that are not a single token" in str(w.message) for w in caught) == 2
    assert ds.skipped["templates"] == [] and len(ds.templates) == len(pronoun_module.TEMPLATES)
    assert len(ds.split("heldout")) == 8
    assert smol_tok.decode([ds.he_id]) == " he" and smol_tok.decode([ds.she_id]) == " she"


# --- metrics ----------------------------------------------------------------------------------

def test_logit_diff_on_hand_made_logits(wtok):
    ds = _ioi(wtok, n=4, counterfactual="replace_io")
    vocab = len(wtok)
    logits = torch.zeros(4, ds.seq_len, vocab)
    logits[:, :-1] = torch.randn(4, ds.seq_len - 1, vocab) * 100  # other positions are ignored
    rows = torch.arange(4)
    logits[rows, ds.end_pos, ds.io_ids] = torch.tensor([3.0, 1.0, -2.0, 0.5])
    logits[rows, ds.end_pos, ds.s_ids] = torch.tensor([1.0, 2.0, -2.5, 0.5])
    torch.testing.assert_close(logit_diff(logits, ds), torch.tensor([2.0, -1.0, 0.5, 0.0]))
    assert accuracy(logits, ds).item() == 0.5
    torch.testing.assert_close(two_way_probability(logits, ds), torch.sigmoid(torch.tensor([2.0, -1.0, 0.5, 0.0])))
    cf_io, _ = ds.answer_ids(counterfactual=True)
    logits[rows, ds.end_pos, cf_io] = 7.0
    torch.testing.assert_close(logit_diff(logits, ds, counterfactual=True),
                               7.0 - torch.tensor([1.0, 2.0, -2.5, 0.5]))
    with pytest.raises(ValueError, match="slice the dataset"):
        logit_diff(logits[:3], ds)
    with pytest.raises(ValueError, match=r"\[batch, pos, vocab\]"):
        logit_diff(logits[:, -1], ds)


def test_pronoun_logit_diff_is_label_signed(wtok):
    ds = _pronouns(wtok, n=8, heldout_fraction=0.0)
    logits = torch.zeros(8, ds.seq_len, len(wtok))
    logits[:, -1, ds.he_id] = 2.0  # the model always says " he"
    diff = logit_diff(logits, ds)
    torch.testing.assert_close(diff, 2.0 * ds.labels.float())
    assert accuracy(logits, ds).item() == 0.5  # right on exactly the male half
    with pytest.raises(ValueError, match="no counterfactual"):
        logit_diff(logits, ds, counterfactual=True)


def test_kl_to_target():
    torch.manual_seed(0)
    run, target = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    assert torch.allclose(kl_to_target(run, run, 2), torch.zeros(3), atol=1e-6)
    p, q = target.softmax(-1), run.softmax(-1)
    manual = (p * (p.log() - q.log())).sum(-1)  # [3, 5]
    torch.testing.assert_close(kl_to_target(run, target), manual)
    torch.testing.assert_close(kl_to_target(run, target, -1), manual[:, -1])
    pos = torch.tensor([0, 4, 2])
    torch.testing.assert_close(kl_to_target(run, target, pos), manual[torch.arange(3), pos])
    torch.testing.assert_close(kl_to_target(run, target, pos[:, None].expand(3, 2)),
                               manual[torch.arange(3), pos][:, None].expand(3, 2))
    reverse = (q * (q.log() - p.log())).sum(-1)
    torch.testing.assert_close(kl_to_target(run, target, reverse=True), reverse)
    assert not torch.allclose(reverse, manual)
    with pytest.raises(ValueError, match="same shape"):
        kl_to_target(run, target[:, :4])
    with pytest.raises(ValueError, match="out of range"):
        kl_to_target(run, target, 5)


# --- the real model (slow) --------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_solves_ioi(smollm2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_ioi(smollm2.tokenizer, n=32, seed=0)
    with torch.no_grad():
        logits = smollm2.hf(input_ids=ds.input_ids.to(smollm2.device)).logits
        cf_logits = smollm2.hf(input_ids=ds.cf_input_ids.to(smollm2.device)).logits
    diff = logit_diff(logits, ds)
    assert diff.mean() > 1.0 and accuracy(logits, ds) > 0.7
    # the ABC counterfactual removes the IO information: the clean logit diff collapses
    assert logit_diff(cf_logits, ds).abs().mean() < diff.mean() / 2
    assert (kl_to_target(cf_logits, logits, ds.end_pos) > 0).all()


@pytest.mark.slow
def test_smollm2_predicts_pronouns(smollm2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_pronouns(smollm2.tokenizer, n=40, seed=0, heldout_fraction=0.5)
    with torch.no_grad():
        logits = smollm2.hf(input_ids=ds.input_ids.to(smollm2.device)).logits
    assert accuracy(logits, ds) > 0.7 and logit_diff(logits, ds).mean() > 0
    held = ds.split("heldout")
    idx = [k for k, p in enumerate(ds.prompts) if p.split == "heldout"]
    assert accuracy(logits[idx], held) > 0.7
