"""LEACE (Belrose et al. 2023) and the class-mean-difference projection: defining properties,
and agreement with EleutherAI's concept-erasure package when it is installed."""
import pytest
import torch
import torch.nn.functional as F

from interventions.erasure import fit_probe
from interventions.leace import LeaceEraser, fit_leace, fit_mean_difference


def planted(n=2000, d=16, classes=2, seed=0, rank=None):
    """Anisotropic Gaussian activations [n, d] (float64) with class-dependent means, labels [n]."""
    g = torch.Generator().manual_seed(seed)
    r = d if rank is None else rank
    mix = torch.randn(r, d, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, r, dtype=torch.float64)[:, None]
    z = torch.randint(0, classes, (n,), generator=g)
    shifts = torch.randn(classes, r, generator=g, dtype=torch.float64)
    x = (torch.randn(n, r, generator=g, dtype=torch.float64) + shifts[z]) @ mix + 3.0
    return x, z


def class_means(x, z):
    return torch.stack([x[z == c].mean(0) for c in z.unique()])


@pytest.mark.parametrize("classes", [2, 3])
@pytest.mark.parametrize("method", ["leace", "orth"])
def test_erasure_equalises_class_means(classes, method):
    x, z = planted(classes=classes)
    before = class_means(x, z)
    assert (before - before[0]).abs().max() > 0.1               # the concept is there
    eraser = LeaceEraser.fit(x, z, method=method)
    assert eraser.rank == classes - 1
    xe = eraser(x)
    means = class_means(xe, z)
    assert (means - means[0]).abs().max() < 1e-9
    zc = F.one_hot(z).double() - F.one_hot(z).double().mean(0)
    cross = (xe - xe.mean(0)).T @ zc / len(z)                   # Cov(r(x), z) [d, k]
    assert cross.abs().max() < 1e-9


def test_continuous_concept_is_uncorrelated_after_erasure():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    z = x @ torch.randn(8, 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    xe = fit_leace(x, z)(x)
    cross = (xe - xe.mean(0)).T @ (z - z.mean(0)) / len(z)
    assert cross.abs().max() < 1e-9 * z.abs().max()


def test_P_is_an_oblique_projection_and_matches_call():
    x, z = planted(classes=3)
    eraser = fit_leace(x, z)
    P = eraser.P
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert not torch.allclose(P, P.T, atol=1e-6)                 # oblique, unlike the orthogonal baseline
    assert torch.allclose(eraser(x), eraser.bias + (x - eraser.bias) @ P.T, atol=1e-9)
    Q = fit_mean_difference(x, z).P
    assert torch.allclose(Q, Q.T, atol=1e-12) and torch.allclose(Q @ Q, Q, atol=1e-12)


def test_leace_drives_a_linear_probe_to_chance_on_held_out_data():
    x, z = planted(n=4000, classes=2, seed=2)
    tr, te = slice(0, 2000), slice(2000, None)
    probe = fit_probe(x[tr], z[tr])
    assert probe.accuracy(x[te], z[te]) > 0.9
    eraser = fit_leace(x[tr], z[tr])
    retrained = fit_probe(eraser(x[tr]), z[tr])
    chance = float(torch.bincount(z[te]).max()) / len(z[te])
    assert retrained.accuracy(eraser(x[te]), z[te]) <= chance + 0.03
    # on the fitting sample the guarantee is exact: the optimal probe is a constant
    assert retrained.weight.abs().max() < 1e-6


def test_leace_edit_is_smaller_than_the_mean_difference_projection():
    x, z = planted(classes=2, seed=3)
    d_leace = (fit_leace(x, z)(x) - x).pow(2).sum(-1).mean()
    d_orth = (fit_mean_difference(x, z)(x) - x).pow(2).sum(-1).mean()
    assert d_leace < 0.9 * d_orth                                # strictly better on anisotropic data


def test_rank_deficient_covariance():
    x, z = planted(d=12, rank=5, classes=2, seed=4)                # x lies in a 5-dim affine subspace
    eraser = fit_leace(x, z)
    assert eraser.rank == 1
    xe = eraser(x)
    means = class_means(xe, z)
    assert (means[1] - means[0]).abs().max() < 1e-8
    # the edit stays inside the data's 5-dim subspace and removes exactly one direction of it
    both = torch.cat([x - x.mean(0), xe - x.mean(0)])
    assert torch.linalg.matrix_rank(both) == 5
    assert torch.linalg.matrix_rank(xe - xe.mean(0)) == 4
    assert torch.isfinite(xe).all()


def test_float32_inputs_and_leading_dims():
    x, z = planted(n=600, classes=2, seed=5)
    x32 = x.float().reshape(20, 30, -1)
    eraser = fit_leace(x32, z.reshape(20, 30))
    assert eraser.proj_left.dtype == torch.float32
    xe = eraser(x32).reshape(600, -1).double()
    assert (xe[z == 1].mean(0) - xe[z == 0].mean(0)).abs().max() < 1e-4


def test_errors_are_actionable():
    x, z = planted(n=50)
    with pytest.raises(ValueError, match="single value"):
        fit_leace(x, torch.zeros(50, dtype=torch.long))
    with pytest.raises(ValueError, match="one value"):
        fit_leace(x, z[:40])
    with pytest.raises(ValueError, match="unknown erasure method"):
        LeaceEraser.fit(x, z, method="inlp")
    with pytest.raises(ValueError, match="fitted on 16"):
        fit_leace(x, z)(torch.zeros(3, 8, dtype=torch.float64))


@pytest.mark.parametrize("classes", [2, 4])
def test_matches_the_concept_erasure_package(classes):
    ref = pytest.importorskip("concept_erasure")
    x, z = planted(classes=classes, seed=6)
    ours = fit_leace(x, z)
    zz = z if classes == 2 else F.one_hot(z)
    theirs = ref.LeaceEraser.fit(x, zz, shrinkage=False, constrain_cov_trace=False, svd_tol=1e-10)
    assert torch.allclose(ours(x), theirs(x), atol=1e-9)
    assert torch.allclose(ours.P, theirs.P, atol=1e-9)
    orth = ref.LeaceEraser.fit(x, zz, method="orth", svd_tol=1e-10)
    assert torch.allclose(fit_mean_difference(x, z)(x), orth(x), atol=1e-9)
