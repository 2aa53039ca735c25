"""Closed-form linear concept erasure: LEACE and the orthogonal (class-mean-difference) baseline.

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form", NeurIPS,
arXiv 2306.03819, Theorem 4.3). Given samples x [n, d] and a concept z [n, k] (one-hot classes,
or any real-valued concept), with

    mu    = E[x]                               [d]
    S_xx  = Cov(x)                             [d, d]
    S_xz  = Cov(x, z)                          [d, k]
    W     = S_xx^{-1/2}  (pseudo-inverse on the eigenvectors with eigenvalue above the
            numerical-rank threshold: rank-deficient S_xx is fine)
    W^+   = S_xx^{1/2}   (on the same eigenvectors)
    U     = orthonormal basis [d, r] of the column space of W S_xz  (its left singular vectors
            with singular value above `svd_tol`)

the eraser is the affine map

    r(x) = x - W^+ U U^T W (x - mu)          = mu + P (x - mu),   P = I - W^+ U U^T W

r is "linearly guarded": Cov(r(x), z) = P S_xz = 0, i.e. every class has the same mean after
erasure, so no linear classifier does better than a constant under any convex loss (the
gradient of the loss at w = 0 vanishes). Among all affine maps with that property it moves the
data least, E ||r(x) - x||_M^2 minimal for every PSD norm M, in particular the Euclidean one.
P is an oblique projection of rank d - r (r <= k), stored as the two factors
proj_left = W^+ U [d, r] and proj_right = U^T W [r, d], so applying it costs O(d r).

method="orth" replaces W by I: r(x) = x - U U^T (x - mu) with U spanning S_xz. For a binary
concept S_xz is proportional to the difference of the class means, so this is the
"class-mean-difference nullspace projection" baseline of Cunningham et al. 2023 (arXiv
2309.08600, erasure experiments) and EleutherAI's concept-erasure `method="orth"`. It also
equalises the class means, but with a larger edit than LEACE whenever S_xx is not isotropic.

Differences from the `concept-erasure` package (EleutherAI): statistics are fitted in one pass in
float64 with Bessel's correction and no covariance shrinkage; `svd_tol` defaults to a
relative 1e-8 (the package truncates singular values below an absolute 0.01), so
erasure is exact on the fitting sample; there is no covariance-trace constraint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("leace", "orth")


def concept_matrix(z: torch.Tensor, n: int) -> torch.Tensor:
    """The concept as a float matrix [n, k]: integer labels [n] become one-hot columns (one per
    class present), float z [n] one column, float z [n, k] is used as is."""
    if not isinstance(z, torch.Tensor):
        z = torch.as_tensor(z)
    if z.shape[0] != n:
        raise ValueError(f"the concept has {z.shape[0]} rows but x has {n}: pass one label per sample")
    if z.dim() == 1 and not z.is_floating_point():
        classes = z.unique()
        if classes.numel() < 2:
            raise ValueError(f"the labels take a single value ({classes.tolist()}): a concept needs at "
                             f"least two classes to erase")
        return (z[:, None] == classes[None, :]).double()            # [n, n_classes]
    if z.dim() == 1:
        return z.double()[:, None]
    if z.dim() != 2:
        raise ValueError(f"the concept must be labels [n] or a matrix [n, k], got {tuple(z.shape)}")
    return z.double()


@dataclass
class LeaceEraser:
    """An affine eraser r(x) = x - ((x - bias) @ proj_right.T) @ proj_left.T (module docstring).

    proj_left [d, r], proj_right [r, d], bias [d]. Call it on any tensor [..., d]."""

    proj_left: torch.Tensor     # [d, r]   W^+ U
    proj_right: torch.Tensor    # [r, d]   U^T W
    bias: torch.Tensor          # [d]      mu
    method: str = "leace"

    @classmethod
    def fit(cls, x: torch.Tensor, z: torch.Tensor, *, method: str = "leace",
            svd_tol: float | None = None) -> "LeaceEraser":
        """Fit on activations x [n, d] (or [..., d], flattened) and a concept z: integer labels
        [n], a real value per sample [n], or a matrix [n, k] (one-hot or continuous).

        svd_tol: drop directions of W S_xz with singular value <= svd_tol (absolute); default
        1e-8 * s_max, which drops only directions that are zero up to float64 round-off
        amplified by the whitening (e.g. the sum of one-hot columns, always uncorrelated)."""
        if method not in METHODS:
            raise ValueError(f"unknown erasure method {method!r}; valid methods: {METHODS}")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"x must be a float tensor of samples [n, d], got "
                             f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
        xs = x.detach().reshape(-1, x.shape[-1]).double()            # [n, d]
        n, d = xs.shape
        if n < 2:
            raise ValueError(f"LEACE needs at least 2 samples, got {n}")
        if not torch.isfinite(xs).all():
            raise ValueError("x contains NaN or inf")
        z = torch.as_tensor(z)
        lead = tuple(x.shape[:-1])
        if tuple(z.shape[:len(lead)]) != lead:
            raise ValueError(f"the concept must have one value (or row) per sample: x is {tuple(x.shape)} "
                             f"so z must start with {lead}, got {tuple(z.shape)}")
        zs = concept_matrix(z.reshape(n, *z.shape[len(lead):]), n).to(xs.device)   # [n, k]
        mu = xs.mean(0)
        xc = xs - mu                                                  # [n, d]
        zc = zs - zs.mean(0)                                          # [n, k]
        s_xz = xc.T @ zc / (n - 1)                                    # [d, k]
        if method == "leace":
            s_xx = xc.T @ xc / (n - 1)                                # [d, d]
            evals, evecs = torch.linalg.eigh((s_xx + s_xx.T) / 2)     # ascending
            keep = evals > evals[-1].clamp_min(0) * d * torch.finfo(evals.dtype).eps
            root = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
            inv_root = torch.where(keep, 1 / root.clamp_min(torch.finfo(evals.dtype).tiny), 0)
            W = (evecs * inv_root) @ evecs.T                          # S_xx^{-1/2}  [d, d]
            W_pinv = (evecs * root) @ evecs.T                         # S_xx^{1/2}   [d, d]
        else:
            W = W_pinv = torch.eye(d, dtype=xs.dtype, device=xs.device)
        u, s, _ = torch.linalg.svd(W @ s_xz, full_matrices=False)     # u [d, min(d, k)]
        tol = s.max() * 1e-8 if svd_tol is None else svd_tol
        u = u[:, s > tol]                                             # [d, r]
        out = x.dtype
        return cls((W_pinv @ u).to(out), (u.T @ W).to(out), mu.to(out), method)

    @property
    def rank(self) -> int:
        """r: the number of directions erased."""
        return self.proj_left.shape[1]

    @property
    def P(self) -> torch.Tensor:
        """The projection matrix P = I - W^+ U U^T W [d, d] (r(x) = mu + P (x - mu))."""
        d = self.bias.shape[0]
        return torch.eye(d, dtype=self.bias.dtype, device=self.bias.device) - self.proj_left @ self.proj_right

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The edit r(x) - x [..., d] = -W^+ U U^T W (x - mu)."""
        if x.shape[-1] != self.bias.shape[0]:
            raise ValueError(f"this eraser was fitted on {self.bias.shape[0]}-dimensional activations, "
                             f"got {tuple(x.shape)}")
        left, right, bias = (t.to(device=x.device, dtype=x.dtype)
                             for t in (self.proj_left, self.proj_right, self.bias))
        return -((x - bias) @ right.T) @ left.T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) [..., d]."""
        return x + self.delta(x)

    def to(self, *args, **kwargs) -> "LeaceEraser":
        return LeaceEraser(self.proj_left.to(*args, **kwargs), self.proj_right.to(*args, **kwargs),
                           self.bias.to(*args, **kwargs), self.method)


def fit_leace(x: torch.Tensor, z: torch.Tensor, **kwargs) -> LeaceEraser:
    """`LeaceEraser.fit(x, z, method="leace", ...)`."""
    return LeaceEraser.fit(x, z, method="leace", **kwargs)


def fit_mean_difference(x: torch.Tensor, z: torch.Tensor, **kwargs) -> LeaceEraser:
    """The orthogonal projection off the class-mean differences: `LeaceEraser.fit(x, z,
    method="orth", ...)`."""
    return LeaceEraser.fit(x, z, method="orth", **kwargs)
