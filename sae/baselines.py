"""Non-learned dictionaries under the `Dictionary` interface: the baselines of Cunningham et al.
2023 ("Sparse Autoencoders Find Highly Interpretable Features in Language Models", arXiv
2309.08600, §3-4: PCA, ICA, the neuron basis and random directions), so every benchmark runs them
on the same code path as the SAEs. Each is fitted with the classmethod `fit(x [n, d], ...)` and
saved/loaded like any dictionary. All are linear with a centring offset mu:

    encode(x) = (x - mu) W_enc^T            decode(c) = c W_dec + mu

- `PCADictionary` ("pca"): rows of W_enc = W_dec = the top n_latents eigenvectors of the sample
  covariance (n_latents <= d), signs fixed so each row's largest entry is positive. At
  n_latents = d, W_dec is orthogonal and decode(encode(x)) = x.
- `ICADictionary` ("ica"): FastICA (Hyvärinen & Oja 2000, "Independent component analysis:
  algorithms and applications", Neural Networks 13) with PCA whitening z = K (x - mu),
  K = D^{-1/2} E^T (top n_latents eigenpairs), the logcosh contrast G(u) = log cosh u,
  g = tanh, g' = 1 - tanh^2, and the symmetric fixed-point update

      W <- E[g(W z) z^T] - diag(E[g'(W z)]) W,     W <- (W W^T)^{-1/2} W

  until max_i | |<w_i_new, w_i_old>| - 1 | < tol. Unmixing W_enc = W K (sources have unit
  variance); mixing W_dec = pinv(W_enc)^T, so reconstruction projects onto the top-n_latents
  principal subspace, and is exact at n_latents = d.
- `IdentityDictionary` ("identity"): the neuron basis, W_dec = I, codes = x exactly.
- `RandomDictionary` ("random"): random unit rows W_dec (any n_latents), codes by least squares,
  W_enc = pinv(W_dec)^T (minimum-norm codes when overcomplete; exact for n_latents >= d).
- `TopKNeuronDictionary` ("topk_neurons"): the neuron basis sparsified per token, codes = x with
  all but its k largest entries set to 0 (Paulo et al. 2024, "Automatically Interpreting Millions
  of Features in LLMs": neurons "sparsified using top-k postprocessing"); W_dec = I.

Fits run in float64 and store float32 (the dtype of x when it is floating).
"""
from __future__ import annotations

import warnings
from typing import Any

import torch

from .dictionary import Dictionary, TrainState, check_x, random_unit_rows, register


def _as_samples(x: torch.Tensor, who: str, min_rows: int = 2) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError(f"{who}.fit expects a tensor of samples [n, d], got "
                         f"{type(x).__name__} with shape {tuple(getattr(x, 'shape', ()))}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] < min_rows:
        raise ValueError(f"{who}.fit needs at least {min_rows} samples, got {x2.shape[0]}")
    if not torch.isfinite(x2).all():
        raise ValueError(f"{who}.fit: the samples contain NaN or inf")
    return x2


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.float32


def _covariance_eigh(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the sample covariance of centred xc [n, d], largest first:
    (eigenvalues [d], eigenvectors as rows [d, d])."""
    cov = xc.T @ xc / max(1, xc.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    return evals.flip(0), evecs.flip(1).T.contiguous()


def _fix_signs(rows: torch.Tensor) -> torch.Tensor:
    """+-1 per row so that each row's largest-magnitude entry is positive -> [n]."""
    idx = rows.abs().argmax(dim=1)
    s = torch.sign(rows.gather(1, idx[:, None]).squeeze(1))
    return torch.where(s == 0, torch.ones_like(s), s)


class _LinearBaseline(Dictionary):
    """encode = (x - mean) W_enc^T, decode = c W_dec + mean, all three stored as buffers."""

    unit_norm_decoder = False

    def __init__(self, d_in: int, n_latents: int):
        super().__init__(d_in, n_latents)
        self.register_buffer("mean", torch.zeros(self.d_in))  # mu [d_in]
        self.register_buffer("W_enc", torch.zeros(self.n_latents, self.d_in))  # [n_latents, d_in]
        self.register_buffer("W_dec", torch.zeros(self.n_latents, self.d_in))  # [n_latents, d_in]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_x(x, self.d_in, type(self).__name__)
        return (x - self.mean) @ self.W_enc.T

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.mean

    def _set(self, mean: torch.Tensor, W_enc: torch.Tensor, W_dec: torch.Tensor, dtype: torch.dtype) -> None:
        self.mean = mean.to(dtype)
        self.W_enc = W_enc.to(dtype).contiguous()
        self.W_dec = W_dec.to(dtype).contiguous()

    def training_loss(self, x: torch.Tensor, state: TrainState):
        raise TypeError(f"{type(self).__name__} is a fitted baseline: build it with "
                        f"{type(self).__name__}.fit(x), it has nothing to train")

    def fold_scale(self, s: float):
        raise NotImplementedError(f"{type(self).__name__} is fitted on the data it is given: fit it "
                                  "on raw activations instead of folding a scale")


@register
class PCADictionary(_LinearBaseline):
    """Principal components as a dictionary. Registered as "pca". Buffer `explained_variance`
    [n_latents] holds the covariance eigenvalues of the components."""

    architecture = "pca"

    def __init__(self, d_in: int, n_latents: int):
        if n_latents > d_in:
            raise ValueError(f"PCA has at most d_in={d_in} components, got n_latents={n_latents}")
        super().__init__(d_in, n_latents)
        self.register_buffer("explained_variance", torch.zeros(self.n_latents))

    @classmethod
    def fit(cls, x: torch.Tensor, n_latents: int | None = None) -> "PCADictionary":
        x2 = _as_samples(x, "PCADictionary")
        d = x2.shape[1]
        n_latents = d if n_latents is None else int(n_latents)
        model = cls(d, n_latents)
        x64 = x2.double()
        mu = x64.mean(0)
        evals, comps = _covariance_eigh(x64 - mu)
        comps = comps[:n_latents]
        comps = comps * _fix_signs(comps)[:, None]
        dtype = _out_dtype(x)
        model._set(mu, comps, comps, dtype)
        model.explained_variance = evals[:n_latents].clamp_min(0).to(dtype)
        return model.to(x.device)


@register
class ICADictionary(_LinearBaseline):
    """FastICA (symmetric, logcosh) as a dictionary. Registered as "ica"."""

    architecture = "ica"

    def __init__(self, d_in: int, n_latents: int):
        if n_latents > d_in:
            raise ValueError(f"ICA has at most d_in={d_in} components, got n_latents={n_latents}")
        super().__init__(d_in, n_latents)

    @classmethod
    def fit(cls, x: torch.Tensor, n_latents: int | None = None, max_iter: int = 200,
            tol: float = 1e-4, seed: int = 0) -> "ICADictionary":
        x2 = _as_samples(x, "ICADictionary", min_rows=3)
        d = x2.shape[1]
        n = d if n_latents is None else int(n_latents)
        model = cls(d, n)
        x64 = x2.double()
        mu = x64.mean(0)
        xc = x64 - mu
        evals, evecs = _covariance_eigh(xc)
        evals, evecs = evals[:n], evecs[:n]  # [n], [n, d]
        if not bool(evals[-1] > 1e-12 * max(float(evals[0]), 1e-300)):
            raise ValueError(f"ICADictionary.fit: the data has rank < n_latents={n} (eigenvalue "
                             f"{float(evals[-1]):.3g}); use fewer components or more varied samples")
        K = evecs / evals.sqrt()[:, None]  # whitening [n, d]
        z = xc @ K.T  # [N, n], identity covariance
        N = z.shape[0]
        g = torch.Generator().manual_seed(int(seed))
        W = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]  # orthogonal init

        def decorrelate(w: torch.Tensor) -> torch.Tensor:  # (W W^T)^{-1/2} W
            s, u = torch.linalg.eigh(w @ w.T)
            return (u / s.clamp_min(1e-300).sqrt()) @ u.T @ w

        W = decorrelate(W)
        change = float("inf")
        for _ in range(max_iter):
            t = torch.tanh(z @ W.T)  # g(W z) [N, n]
            W_new = (t.T @ z) / N - (1 - t * t).mean(0)[:, None] * W
            W_new = decorrelate(W_new)
            change = float(((W_new * W).sum(1).abs() - 1).abs().max())
            W = W_new
            if change < tol:
                break
        else:
            warnings.warn(f"FastICA did not converge in {max_iter} iterations (last change {change:.2e} "
                          f"> tol {tol:g}); raise max_iter or tol", RuntimeWarning, stacklevel=2)
        unmix = W @ K  # [n, d]
        mix = torch.linalg.pinv(unmix).T  # [n, d]: decoder rows
        sign = _fix_signs(mix)
        unmix, mix = unmix * sign[:, None], mix * sign[:, None]
        order = torch.argsort(mix.norm(dim=1), descending=True)
        model._set(mu, unmix[order], mix[order], _out_dtype(x))
        return model.to(x.device)


@register
class RandomDictionary(_LinearBaseline):
    """Random unit directions with least-squares codes. Registered as "random"."""

    architecture = "random"

    @classmethod
    def fit(cls, x: torch.Tensor, n_latents: int | None = None, seed: int = 0,
            center: bool = True) -> "RandomDictionary":
        x2 = _as_samples(x, "RandomDictionary", min_rows=1)
        d = x2.shape[1]
        n = d if n_latents is None else int(n_latents)
        model = cls(d, n)
        g = torch.Generator().manual_seed(int(seed))
        R = random_unit_rows(n, d, generator=g).double()  # [n, d]
        mu = x2.double().mean(0) if center else torch.zeros(d, dtype=torch.float64)
        model._set(mu, torch.linalg.pinv(R).T, R, _out_dtype(x))
        return model.to(x.device)


@register
class IdentityDictionary(Dictionary):
    """The neuron basis: W_dec = I, encode(x) = x, decode(c) = c. Registered as "identity"."""

    architecture = "identity"
    unit_norm_decoder = False

    def __init__(self, d_in: int, n_latents: int | None = None):
        if n_latents is not None and int(n_latents) != int(d_in):
            raise ValueError(f"the identity dictionary has n_latents = d_in = {d_in}, got n_latents={n_latents}")
        super().__init__(d_in, d_in)

    @classmethod
    def fit(cls, x: torch.Tensor, n_latents: int | None = None) -> "IdentityDictionary":
        x2 = _as_samples(x, "IdentityDictionary", min_rows=1)
        return cls(x2.shape[1], n_latents)

    @property
    def W_dec(self) -> torch.Tensor:  # [d_in, d_in]
        return torch.eye(self.d_in)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_x(x, self.d_in, "IdentityDictionary")
        return x.clone()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        check_x(codes, self.d_in, "IdentityDictionary.decode")
        return codes.clone()

    def training_loss(self, x: torch.Tensor, state: TrainState):
        raise TypeError("IdentityDictionary is the neuron basis: it has nothing to train")

    def fold_scale(self, s: float):
        raise NotImplementedError("IdentityDictionary codes are the raw activations: there is no scale to fold")


@register
class TopKNeuronDictionary(IdentityDictionary):
    """Top-k sparsified neurons: encode(x) keeps the k largest entries of x per token, zeros the
    rest; decode(c) = c. Registered as "topk_neurons"."""

    architecture = "topk_neurons"

    def __init__(self, d_in: int, n_latents: int | None = None, k: int = 32):
        super().__init__(d_in, n_latents)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.d_in:
            raise ValueError(f"k must be an int in 1..d_in={self.d_in}, got {k!r}")
        self.k = k

    @classmethod
    def fit(cls, x: torch.Tensor, n_latents: int | None = None, k: int = 32) -> "TopKNeuronDictionary":
        x2 = _as_samples(x, "TopKNeuronDictionary", min_rows=1)
        return cls(x2.shape[1], n_latents, k=k)

    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "k": self.k}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_x(x, self.d_in, "TopKNeuronDictionary")
        values, indices = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter_(-1, indices, values)


def fit_baseline(name: str, x: torch.Tensor, n_latents: int | None = None, **kwargs: Any) -> Dictionary:
    """Fit a baseline by registry name ("pca", "ica", "random", "identity", "topk_neurons")."""
    classes = {c.architecture: c for c in (PCADictionary, ICADictionary, RandomDictionary, IdentityDictionary,
                                              TopKNeuronDictionary)}
    if name not in classes:
        raise ValueError(f"unknown baseline {name!r}; known: {sorted(classes)}")
    return classes[name].fit(x, n_latents, **kwargs)
