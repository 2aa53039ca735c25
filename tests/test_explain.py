"""Explainer prompts and the tolerant explanation parser (stub clients; one slow SmolLM2 run)."""
import pytest

from circuits.autointerp.examples import FeatureExamples, Window
from circuits.autointerp.explain import (Explanation, activation_scale, choose_windows, explain, explain_messages,
                                         format_window, mark_tokens, parse_explanation)
from sae.models import byte_tokenizer
from autointerp_helpers import planted_examples


def test_mark_tokens_merges_runs_and_keeps_spaces_outside():
    assert mark_tokens(["The", " big", " dog", " ran"], [False, True, True, False]) == "The <<big dog>> ran"
    assert mark_tokens(["a", "\n", "b"], [True, False, True]) == "<<a>>\\n<<b>>"


def test_activation_scale_is_ceil_of_tenths_clamped():
    assert activation_scale([0.0, 0.01, 2.5, 5.0, 7.0, -1.0], 5.0) == [0, 1, 5, 10, 10, 0]
    assert activation_scale([1.0], 0.0) == [0]


def test_format_window_marks_above_threshold_of_window_max():
    tok = byte_tokenizer()
    ids = tok("abcd", add_special_tokens=False)["input_ids"]
    w = Window(tuple(ids), (0.0, 1.0, 0.2, 0.31), 0, 0)
    assert format_window(w, tok) == "a<<b>>c<<d>>"          # 0.3 * 1.0: 0.31 marked, 0.2 not
    text = format_window(w, tok, max_act=2.0, show_activations=True)
    assert text.splitlines()[1] == 'Activations: ("b", 5), ("d", 2)'


def test_choose_windows_spans_quantiles_without_duplicates():
    ex = planted_examples(byte_tokenizer())
    chosen = choose_windows(ex, 4, seed=0)
    assert len({(w.row, w.start) for w in chosen}) == 4
    assert {w.max_act for w in chosen} == {2.5, 5.0}        # both bins represented
    assert [w.max_act for w in chosen] == sorted((w.max_act for w in chosen), reverse=True)


@pytest.mark.parametrize("raw, text", [
    ("Explanation: names of animals", "names of animals"),
    ("Sure! [EXPLANATION]: the word <<dog>>.\nExample 9: ...", "the word dog"),
    ('explanation - "pet animals"', "pet animals"),
    ("Explanation: first\nExplanation: **dogs and cats**", "dogs and cats"),
    ("  mentions of dogs  \nmore text", "mentions of dogs"),
    # small explainers restate the question and ramble on (SmolLM2-135M replies, shortened)
    ("The marked tokens have in common that they are a list of names", "they are a list of names"),
    ("Explanation: The marked tokens have the following characteristics:\n- female first names\n- other",
     "female first names"),
    ("The marked tokens have the following common attributes:\n\n1. **nouns**", "nouns"),
    ("The marked tokens have the following common features:\n1.   The tokens are marked", "The tokens are marked"),
    ("Explanation: the word to. The tokens are the same as the original sentence. The", "the word to"),
    ("Explanation: version numbers e.g. 3.11 and 2.7", "version numbers e.g. 3.11 and 2.7"),
])
def test_parse_explanation_tolerant(raw, text):
    assert parse_explanation(raw) == Explanation(text, True, raw)


@pytest.mark.parametrize("raw", ["", "   \n ", "Explanation:", "The marked tokens have in common:",
                                 "The marked tokens have the following similarities:", "Explanation: 1.", "Explanation: " + "x" * 300, None])
def test_unparseable_explanation_is_recorded_not_dropped(raw):
    e = parse_explanation(raw)
    assert e.ok is False and e.text == "" and e.raw == (raw if isinstance(raw, str) else repr(raw))


class EchoClient:
    def __init__(self, reply):
        self.reply, self.messages = reply, None

    def generate(self, messages, *, max_tokens, temperature=0.0):
        self.messages = messages
        return self.reply


def test_explain_prompt_shows_marked_windows_and_parses_reply():
    tok = byte_tokenizer()
    ex = planted_examples(tok)
    client = EchoClient("Explanation: the word dog")
    e = explain(ex, client, tok, n_examples=3)
    assert e == Explanation("the word dog", True, "Explanation: the word dog")
    last = client.messages[-1]["content"]
    assert last.count("<<dog>>") == 3 and last.count("Example ") == 3
    assert client.messages[0]["role"] == "system" and client.messages[2]["role"] == "assistant"


def test_explain_records_failures():
    tok = byte_tokenizer()
    assert explain(planted_examples(tok), EchoClient("   "), tok).ok is False
    empty = explain(FeatureExamples("resid.0", 3), EchoClient("x"), tok)
    assert not empty.ok and "no activating windows" in empty.raw
    with pytest.raises(ValueError, match="threshold"):
        explain(planted_examples(tok), EchoClient("x"), tok, threshold=1.5)


def test_explain_messages_fit_the_chat_format():
    tok = byte_tokenizer()
    ex = planted_examples(tok)
    msgs = explain_messages(ex.top, tok, max_act=5.0, show_activations=True)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "Activations: (" in msgs[-1]["content"]


@pytest.mark.slow
def test_smollm2_explains_planted_feature(smollm2_client):
    client, tok = smollm2_client
    e = explain(planted_examples(tok), client, tok, n_examples=6, max_tokens=24)
    assert e.raw  # the reply is kept whatever it says
    assert e.ok, e.raw
    assert client.usage["completion_tokens"] > 0


@pytest.fixture(scope="module")
def smollm2_client(smollm2):
    from circuits.autointerp.clients import LocalClient

    return LocalClient(smollm2), smollm2.tokenizer
