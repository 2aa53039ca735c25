"""Shared fixtures: tiny random models of four architectures, and the real SmolLM2 (slow)."""
import os

# Tests never reach a model or dataset hub: fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from sae.models import tiny_model

# Tiny models are latency-bound: one thread avoids oversubscription on small (and shared) machines.
torch.set_num_threads(1)

ARCHS = ["llama", "gpt2", "neox", "gemma"]


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    """A 2-layer, 32-wide random model of each architecture."""
    torch.manual_seed(0)
    return tiny_model(request.param, n_layers=2, d_model=32)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama", n_layers=3, d_model=32)


@pytest.fixture(scope="module")
def loud_llama():
    """A 2-layer llama with a larger init scale, so feature edits move the logits visibly."""
    return tiny_model("llama", n_layers=2, d_model=32, initializer_range=0.3)


@pytest.fixture(scope="module")
def random_topk():
    """TopK SAE on 32 dims: 24 latents, k = 6, random biases (fresh per test module)."""
    from sae.architectures import TopKSAE

    torch.manual_seed(0)
    d = TopKSAE(32, 24, k=6)
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1)
        d.b_dec.normal_(0, 0.1)
    return d


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (first load builds the fast-reload cache, ~25 s)."""
    from sae.models import load_model

    return load_model()
