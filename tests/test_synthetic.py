"""The synthetic superposition generator: shapes, determinism, streaming, L0 and scale."""
import pytest
import torch

from sae.synthetic import BLOCK, SyntheticActivations


@pytest.fixture(scope="module")
def data():
    return SyntheticActivations(d=48, n_features=192, k_candidates=8, keep_prob=0.5, seed=3,
                                calibration_tokens=4 * BLOCK)


def test_shapes_and_ground_truth(data):
    x = data.sample(1500)
    assert x.shape == (1500, 48) and x.dtype == torch.float32
    assert data.directions.shape == (192, 48)
    assert torch.allclose(data.directions.norm(dim=1), torch.ones(192), atol=1e-5)
    assert data.probabilities.shape == (192,)
    assert abs(float(data.probabilities.sum()) - 1) < 1e-5
    assert bool((data.probabilities[:-1] >= data.probabilities[1:]).all())  # Zipf: decreasing
    b = next(data.batches(100))
    assert b.shape == (100, 48)


def test_deterministic_by_seed():
    kw = dict(d=16, n_features=40, k_candidates=4, calibration_tokens=BLOCK)
    a, b = SyntheticActivations(seed=5, **kw), SyntheticActivations(seed=5, **kw)
    c = SyntheticActivations(seed=6, **kw)
    assert torch.equal(a.directions, b.directions)
    assert torch.equal(a.sample(700), b.sample(700))
    assert not torch.allclose(a.directions, c.directions)
    assert not torch.allclose(a.sample(700), c.sample(700))


def test_stream_is_batch_size_independent_and_skippable(data):
    n = 2 * BLOCK + 300
    x = data.sample(n)
    for bs in (100, 700, BLOCK + 1):
        got = torch.cat(list(data.batches(bs, n_batches=n // bs)))
        assert torch.equal(got, x[: (n // bs) * bs])
    # starting at batch 3 gives tokens 3*bs onwards without producing the earlier ones
    assert torch.equal(next(data.batches(250, start_step=3)), x[750:1000])
    assert torch.equal(next(data.stream(250)(5)), x[1250:1500])
    assert torch.equal(data.sample(200, start=1000), x[1000:1200])
    # another stream: same dictionary, different tokens
    assert not torch.allclose(data.sample(200, stream=1), x[:200])


def test_l0_and_codes_reconstruct(data):
    x, idx, mags = data.sample(3 * BLOCK, return_codes=True)
    assert idx.shape == mags.shape == (3 * BLOCK, 8)
    l0 = (mags > 0).sum(1).float()
    assert abs(l0.mean().item() - data.expected_l0) < 0.1 * data.expected_l0
    # candidates are distinct features within a token (drawn without replacement)
    assert bool((idx.sort(1).values.diff(dim=1) > 0).all())
    # x = sum of magnitudes * directions + offset + small noise
    clean = torch.einsum("nk,nkd->nd", mags, data.directions[idx]) + data.mean_offset
    resid = (x - clean).pow(2).sum(1).mean() / x.pow(2).sum(1).mean()
    assert resid.item() < 0.01                      # noise_fraction = 0.25% of the energy
    # frequent features fire more often than rare ones
    counts = torch.bincount(idx[mags > 0], minlength=192)
    assert counts[:20].sum() > 3 * counts[-20:].sum()


def test_scale_and_offset(data):
    x = data.sample(8 * BLOCK, stream=2)
    assert abs(x.pow(2).sum(1).mean().item() / data.d - 1) < 0.05   # E||x||^2 = d
    no_offset = SyntheticActivations(d=48, n_features=192, k_candidates=8, mean_fraction=0.0,
                                     seed=3, calibration_tokens=BLOCK)
    assert float(no_offset.mean_offset.norm()) == 0.0
    assert data.mean_offset.norm().item() > 1.0


def test_keep_prob_one_gives_exact_l0():
    data = SyntheticActivations(d=16, n_features=64, k_candidates=5, keep_prob=1.0, seed=0,
                                calibration_tokens=BLOCK)
    _, _, mags = data.sample(500, return_codes=True)
    assert bool(((mags > 0).sum(1) == 5).all())


@pytest.mark.parametrize("kw", [dict(k_candidates=0), dict(k_candidates=100), dict(keep_prob=0.0),
                                dict(mean_fraction=0.6, noise_fraction=0.5), dict(d=0)])
def test_bad_arguments(kw):
    args = dict(d=16, n_features=64, k_candidates=4, calibration_tokens=BLOCK)
    args.update(kw)
    with pytest.raises(ValueError):
        SyntheticActivations(**args)
