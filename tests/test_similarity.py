"""Dictionary similarity: mean max cosine similarity and Hungarian matching."""
import pytest
import torch

from sae.architectures import TopKSAE
from sae.similarity import match, max_cosine, mmcs


def test_mmcs_of_identical_permuted_and_rescaled_dictionaries_is_one():
    torch.manual_seed(0)
    a = torch.randn(20, 8)
    b = a[torch.randperm(20)] * (torch.rand(20, 1) + 0.5)
    assert mmcs(a, a) == pytest.approx(1.0, abs=1e-6)
    assert mmcs(a, b) == pytest.approx(1.0, abs=1e-6)


def test_mmcs_hand_computed_and_asymmetric():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # rows of a: e1 -> 1 (exact), e2 -> cos(e2, (1,1)) = 1/sqrt2
    assert mmcs(a, b) == pytest.approx((1 + 2 ** -0.5) / 2, abs=1e-6)
    # rows of b: (1,0) -> 1, (1,1) -> 1/sqrt2 as well; a subset is recovered perfectly
    assert mmcs(a[:1], b) == pytest.approx(1.0)
    assert mmcs(b, a[:1]) == pytest.approx((1 + 2 ** -0.5) / 2, abs=1e-6)
    assert mmcs(torch.eye(3)[:1], torch.eye(3)[1:]) == pytest.approx(0.0)
    # sign: a flipped direction scores -1 unless absolute=True
    assert mmcs(-a, a) == pytest.approx(0.0, abs=1e-6)
    assert mmcs(-a, a, absolute=True) == pytest.approx(1.0)


def test_max_cosine_returns_best_indices_with_chunking():
    torch.manual_seed(1)
    b = torch.randn(30, 6)
    perm = torch.randperm(30)
    best, idx = max_cosine(b[perm], b, chunk=7)
    assert torch.equal(idx, perm) and torch.allclose(best, torch.ones(30))


def test_match_recovers_a_permutation_with_sign_flips():
    torch.manual_seed(2)
    a = torch.randn(15, 10)
    perm = torch.randperm(15)
    signs = torch.where(torch.rand(15) < 0.5, -1.0, 1.0)
    b = (a * signs[:, None])[perm]  # b[j] = ±a[perm[j]]
    pairs, cos = match(a, b, absolute=True)
    assert pairs.shape == (15, 2) and torch.equal(pairs[:, 0], torch.arange(15))
    assert torch.equal(perm[pairs[:, 1]], pairs[:, 0])
    assert torch.allclose(cos, torch.ones(15), atol=1e-6)
    _, signed = match(a, b)
    assert float(signed.mean()) < 1.0 - 1e-3  # flipped rows cannot all match at +1


def test_match_is_one_to_one_where_greedy_max_is_not():
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    _, idx = max_cosine(a, b)
    assert idx.tolist() == [0, 0]  # both rows prefer b[0]
    pairs, cos = match(a, b)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    assert cos[1] == pytest.approx(0.1 / (0.81 + 0.01) ** 0.5, rel=1e-5)


def test_rectangular_and_dictionary_inputs():
    torch.manual_seed(3)
    sae = TopKSAE(8, 32, k=2)
    truth = sae.W_dec.detach()[:10] * 3
    assert mmcs(truth, sae) == pytest.approx(1.0, abs=1e-6)
    pairs, cos = match(sae, truth)
    assert pairs.shape == (10, 2) and torch.allclose(cos, torch.ones(10), atol=1e-6)
    with pytest.raises(ValueError, match="different spaces"):
        mmcs(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[n, d\] matrix"):
        mmcs(torch.randn(4), torch.randn(3, 4))
