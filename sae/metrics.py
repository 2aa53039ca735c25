"""Reconstruction metrics with one definition each, used by training, evaluation and the runners.

For activations x [n, d] and reconstructions x̂ [n, d] (x̄ = the mean row of x):

    sq_err_per_token  (1/n) Σ_b ||x_b - x̂_b||²               squared error summed over d, mean over tokens
    mse               (1/(n d)) Σ_b ||x_b - x̂_b||²           mean over elements (= sq_err_per_token / d)
    token_variance    (1/n) Σ_b ||x_b - x̄||²                 the per-token variance of x (summed over d)
    fvu               Σ_b ||x_b - x̂_b||² / Σ_b ||x_b - x̄||²  fraction of variance unexplained
                      = sq_err_per_token / token_variance     (Gao et al. 2024; SAELens, sparsify)

"mse" always means the mean over elements; the per-token sum is always `sq_err_per_token`.
`fvu` is the one FVU of the package: a differentiable batch value (the TopK training loss, the
metrics of every architecture and runner); `ReconstructionSums` accumulates the same quantities in
float64 over a stream of batches (`sae.evaluation`), and equals `fvu` on the concatenated stream.

Data parallel training: pass `all_reduce` (a function summing a tensor over ranks in place) to
`token_variance` and the variance is that of the rows of all ranks together, so that
`fvu(x_rank, x̂_rank, variance=token_variance(x_rank, all_reduce))` averaged over equal-sized
ranks is the single-process FVU of the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

AllReduce = Callable[[torch.Tensor], torch.Tensor]

#: the share of E||x||² carried by the mean above which the variance is computed in centred form
_MEAN_SHARE_LIMIT = 0.9


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        raise ValueError("reconstruction metrics need activations [..., d], got a scalar")
    return x.reshape(-1, x.shape[-1])


#: elements per partial sum of `fixed_sum`: below the 32,768 at which torch's CPU reductions split
#: one sum across threads, so each partial sum runs in one fixed order
_FIXED_CHUNK = 4096


def fixed_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ of all elements of t (0-d, differentiable) in an order that does not depend on the
    number of threads: sums of 4,096-element chunks (zero-padded), then sums of those, and so on.

    A plain full `.sum()` (or `torch.dot`, `F.mse_loss(reduction="sum")`) on CPU splits large
    inputs across threads and combines the partial sums in a thread-count-dependent order, so the
    same float32 data gives a different last bit with 1 and 2 threads; a training loss computed so
    makes two machines' runs drift apart from the first step."""
    flat = t.reshape(-1)
    while flat.numel() > _FIXED_CHUNK:
        pad = (-flat.numel()) % _FIXED_CHUNK
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        flat = flat.view(-1, _FIXED_CHUNK).sum(-1)  # one chunk per output: each summed in one thread
    return flat.sum()


@torch.no_grad()
def token_variance(x: torch.Tensor, all_reduce: AllReduce | None = None) -> torch.Tensor:
    """(1/n) Σ_b ||x_b - x̄||² over the rows of x [..., d] (of every rank's x when `all_reduce`
    sums over ranks): a 0-d tensor of x's dtype, at least the smallest positive normal number.

    From the moments n, Σx, Σ||x||² (two fast reductions; for float32 on CPU the sums run in
    float32, elsewhere in float64), so one all_reduce of d + 2 numbers covers all ranks; when the
    mean carries over 90% of the energy that subtraction would lose digits and the centred sum
    Σ||x - x̄||² is taken instead (one more all_reduce). On CPU every sum has a fixed order
    (`fixed_sum`), so the result does not depend on the thread count."""
    x2 = _rows(x)
    fast = x2.device.type == "cpu" and x2.dtype == torch.float32
    if fast:
        s2 = fixed_sum(x2.square()).double().reshape(1)
        s1 = x2.sum(0).double()
    else:
        s2 = x2.double().pow(2).sum().reshape(1)
        s1 = x2.sum(0, dtype=torch.float64)
    n = torch.full((1,), float(x2.shape[0]), dtype=torch.float64, device=x2.device)  # a fill, no host copy
    moments = torch.cat([n, s2, s1])  # [d + 2]
    if all_reduce is not None:
        moments = all_reduce(moments)
    n, s2, s1 = moments[0], moments[1], moments[2:]
    n = n.clamp_min(1.0)
    mean = s1 / n  # [d]
    m2 = s1.dot(mean)  # ||Σx||² / n
    if fast and float(m2) > _MEAN_SHARE_LIMIT * float(s2):
        centred = fixed_sum((x2 - mean.to(x2.dtype)).double().pow(2)).reshape(1)
        if all_reduce is not None:
            centred = all_reduce(centred)
        var = centred[0] / n
    else:
        var = (s2 - m2) / n
    return var.to(x2.dtype).clamp_min(torch.finfo(x2.dtype).tiny)


def sq_err_per_token(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_b ||x_b - x̂_b||² over the rows of x, x̂ [..., d] (0-d tensor, differentiable)."""
    x2, h2 = _rows(x), _rows(x_hat)
    if x2.device.type == "cpu":  # thread-count-independent order (`fixed_sum`)
        return fixed_sum((h2 - x2).square()) / x2.shape[0]
    return F.mse_loss(h2, x2, reduction="sum") / x2.shape[0]


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(1/(n d)) Σ_b ||x_b - x̂_b||²: the mean over elements (0-d tensor, differentiable)."""
    return F.mse_loss(x_hat, x, reduction="mean")


def fvu(x: torch.Tensor, x_hat: torch.Tensor, variance: torch.Tensor | float | None = None) -> torch.Tensor:
    """Fraction of variance unexplained: Σ ||x - x̂||² / Σ ||x - x̄||² over the rows of x, x̂ [..., d].

    Differentiable in x̂ (the denominator is a constant of the data). `variance`: the per-token
    variance to divide by (default `token_variance(x)`); the trainer passes that of the global
    batch so that every rank's loss is a slice of the single-process one."""
    x2, h2 = _rows(x), _rows(x_hat)
    if x2.shape != h2.shape:
        raise ValueError(f"fvu needs x and x_hat of the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if variance is None:
        variance = token_variance(x2)
    if x2.device.type == "cpu":  # Σ ||x - x̂||² in a thread-count-independent order (`fixed_sum`)
        err = fixed_sum((h2 - x2).square())
    else:
        err = F.mse_loss(h2, x2, reduction="sum")  # fused forward and backward
    return err / (x2.shape[0] * variance)


@dataclass
class ReconstructionSums:
    """Float64 running sums over a stream of (x, x̂) batches [n_b, d]; the properties give the
    module's metrics over everything added (`fvu` with x̄ the mean over the whole stream)."""

    tokens: int = 0
    sq_err: float = 0.0  # Σ ||x - x̂||²
    x_sq: float = 0.0  # Σ ||x||²
    x_sum: torch.Tensor | None = None  # Σ x  [d] float64
    width: int = 0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        x, x_hat = _rows(x).double(), _rows(x_hat).double()
        self.tokens += x.shape[0]
        self.width = x.shape[1]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.x_sq += float(x.pow(2).sum())
        s = x.sum(0).cpu()
        self.x_sum = s if self.x_sum is None else self.x_sum + s

    @property
    def total_variance(self) -> float:  # Σ ||x - x̄||²
        if not self.tokens:
            return float("nan")
        return self.x_sq - float(self.x_sum.pow(2).sum()) / self.tokens

    @property
    def fvu(self) -> float:
        tv = self.total_variance
        return self.sq_err / tv if tv > 0 else float("nan")

    @property
    def sq_err_per_token(self) -> float:
        return self.sq_err / self.tokens if self.tokens else float("nan")

    @property
    def mse(self) -> float:
        return self.sq_err / (self.tokens * self.width) if self.tokens else float("nan")
