"""Baseline dictionaries (PCA, ICA, neurons, random): exact reconstruction at full rank, the
defining property of each, files, and clear errors."""
import pytest
import torch

from sae.baselines import (ICADictionary, IdentityDictionary, PCADictionary, RandomDictionary,
                           fit_baseline)
from sae.dictionary import ARCHITECTURES, TrainState, load
from sae.similarity import match

D = 12


def data(n=600, d=D, seed=0):
    """Mixed independent Laplace sources plus an offset (non-Gaussian, so FastICA converges)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g)
    u = (torch.rand(n, d, generator=g) - 0.5).clamp(-0.4999, 0.4999)
    sources = -torch.sign(u) * torch.log1p(-2 * u.abs())
    return sources @ A + 3.0 * torch.randn(d, generator=g)


BASELINES = {"pca": PCADictionary, "ica": ICADictionary, "random": RandomDictionary, "identity": IdentityDictionary}


def test_registered_under_their_names():
    for name, cls in BASELINES.items():
        assert ARCHITECTURES[name] is cls


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_full_rank_reconstruction_is_exact(name):
    x = data()
    m = fit_baseline(name, x)
    assert m.n_latents == D and m.W_dec.shape == (D, D)
    err = (m(x) - x).abs().max() / x.abs().max()
    assert err < 1e-5, err
    assert m.encode(x).shape == (600, D)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_save_load_round_trip_is_bit_exact(name, tmp_path):
    x = data()
    m = fit_baseline(name, x, n_latents=None if name == "identity" else 7)
    m.save(tmp_path / name)
    back = load(tmp_path / name)
    assert type(back) is type(m) and back.config() == m.config()
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert torch.equal(back.encode(x), m.encode(x))
    assert torch.equal(back(x), m(x))


def test_pca_components_are_the_covariance_eigenvectors():
    x = data()
    m = PCADictionary.fit(x, n_latents=4)
    W = m.W_dec.double()
    assert torch.allclose(W @ W.T, torch.eye(4, dtype=torch.float64), atol=1e-6)
    assert torch.equal(m.W_enc, m.W_dec)
    xc = (x - x.mean(0)).double()
    cov = xc.T @ xc / (len(x) - 1)
    evals = torch.linalg.eigvalsh(cov).flip(0)
    assert torch.allclose(m.explained_variance.double(), evals[:4], rtol=1e-5)
    assert torch.allclose((W @ cov @ W.T).diagonal(), evals[:4], rtol=1e-5)
    # truncated reconstruction error = the discarded variance
    err = (m(x) - x).double().pow(2).sum(1).mean() * len(x) / (len(x) - 1)
    assert float(err) == pytest.approx(float(evals[4:].sum()), rel=1e-4)
    # codes are projections on the components after centring
    assert torch.allclose(m.encode(x), (x - x.mean(0)) @ m.W_dec.T, atol=1e-4)


def test_ica_unmixes_independent_non_gaussian_sources():
    g = torch.Generator().manual_seed(1)
    n = 4000
    S = torch.stack([torch.rand(n, generator=g) * 2 - 1,                       # uniform
                     torch.distributions.Laplace(0, 1).sample((n,)),             # heavy-tailed
                     torch.sign(torch.randn(n, generator=g)),                    # binary
                     torch.rand(n, generator=g) ** 3], dim=1)                    # skewed
    S = (S - S.mean(0)) / S.std(0)
    A = torch.randn(4, 4, generator=g)  # rows: the true mixing directions
    x = S @ A + 1.0
    m = ICADictionary.fit(x, max_iter=500, tol=1e-7)
    pairs, cos = match(A, m.W_dec, absolute=True)
    assert float(cos.min()) > 0.98, cos
    # recovered sources correlate with the true ones, up to sign and order
    c = m.encode(x)
    corr = torch.corrcoef(torch.cat([S, c], 1).T)[:4, 4:].abs()
    assert float(corr.max(1).values.min()) > 0.97
    assert torch.allclose(c.std(0), torch.ones(4), atol=0.01)  # unit-variance sources


def test_ica_warns_when_not_converged():
    with pytest.warns(RuntimeWarning, match="did not converge") as caught:
        ICADictionary.fit(data(), max_iter=1, tol=1e-12)
    assert len(caught) >= 1


def test_random_directions_and_least_squares_codes():
    x = data()
    m = RandomDictionary.fit(x, n_latents=5, seed=3)
    assert torch.allclose(m.W_dec.norm(dim=1), torch.ones(5), atol=1e-6)
    # least squares: the residual of (x - mean) is orthogonal to every direction
    resid = (x - m(x)).double()
    assert (resid @ m.W_dec.double().T).abs().max() < 1e-3 * x.abs().max()
    assert torch.equal(RandomDictionary.fit(x, 5, seed=3).W_dec, m.W_dec)
    assert not torch.equal(RandomDictionary.fit(x, 5, seed=4).W_dec, m.W_dec)
    over = RandomDictionary.fit(x, n_latents=3 * D)  # overcomplete: exact, minimum-norm codes
    assert ((over(x) - x).abs().max() / x.abs().max()) < 1e-5


def test_identity_is_the_neuron_basis():
    x = data()
    m = IdentityDictionary.fit(x)
    assert torch.equal(m.W_dec, torch.eye(D))
    c = m.encode(x)
    assert torch.equal(c, x) and c.data_ptr() != x.data_ptr()
    assert torch.equal(m.decode(c), x)


def test_bad_requests_raise_clear_errors():
    x = data()
    with pytest.raises(ValueError, match="at most d_in=12"):
        PCADictionary.fit(x, n_latents=13)
    with pytest.raises(ValueError, match="at most d_in=12"):
        ICADictionary.fit(x, n_latents=20)
    with pytest.raises(ValueError, match="n_latents = d_in"):
        IdentityDictionary(D, n_latents=5)
    with pytest.raises(ValueError, match="rank"):
        ICADictionary.fit(x[:, :1].repeat(1, D) + 0.0)
    with pytest.raises(ValueError, match="samples"):
        PCADictionary.fit(torch.randn(1, D))
    with pytest.raises(ValueError, match="NaN"):
        PCADictionary.fit(torch.full((5, D), float("nan")))
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        fit_baseline("svd", x)
    m = PCADictionary.fit(x)
    with pytest.raises(TypeError, match="fitted baseline"):
        m.training_loss(x, TrainState())
    with pytest.raises(NotImplementedError, match="raw activations"):
        m.fold_scale(2.0)
    with pytest.raises(TypeError, match="no decoder bias"):
        m.init_from_data(x)


def test_topk_neurons_keep_the_k_largest_entries(tmp_path):
    from sae.baselines import TopKNeuronDictionary

    x = data()
    m = fit_baseline("topk_neurons", x, k=3)
    assert isinstance(m, TopKNeuronDictionary) and ARCHITECTURES["topk_neurons"] is TopKNeuronDictionary
    c = m.encode(x)
    assert torch.equal((c != 0).sum(-1), torch.full((x.shape[0],), 3))
    third = x.sort(dim=-1, descending=True).values[:, 2:3]                 # [n, 1] 3rd largest per row
    assert torch.equal(c, torch.where(x >= third, x, torch.zeros_like(x)))
    assert torch.equal(m.W_dec, torch.eye(D)) and torch.equal(m.decode(c), c)
    m.save(tmp_path / "tk")
    back = load(tmp_path / "tk")
    assert type(back) is TopKNeuronDictionary and back.k == 3 and torch.equal(back.encode(x), c)
    with pytest.raises(ValueError, match="k must be an int in 1..d_in=12"):
        fit_baseline("topk_neurons", x, k=13)
