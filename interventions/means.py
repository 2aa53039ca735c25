"""The mean-ablation reference: the mean of an activation (codes, errors, site vectors) over the
real tokens of a reference batch. Every mean ablation in the toolkit (`ablate_features`,
`circuits.evaluate`, `circuits.trace`, erasure) takes its values from `token_mean`.

With w[b, p] = 1 for a real token and 0 for padding (all ones without a mask):

    per_position=False:  mean[*]    = Σ_{b,p} w[b,p] x[b,p,*] / Σ_{b,p} w[b,p]
    per_position=True:   mean[p, *] = Σ_b w[b,p] x[b,p,*] / Σ_b w[b,p]

(Marks et al. 2024 mean-ablate per position; Cunningham et al. 2023 over all tokens.) A position
where no row has a real token takes the all-token mean; with no real token at all the mean is 0.
"""
from __future__ import annotations

import torch


def token_mean(x: torch.Tensor, mask: torch.Tensor | None = None, *, per_position: bool = False) -> torch.Tensor:
    """Mean of x [batch, pos, *width] over real tokens (mask [batch, pos], nonzero = real):
    [*width], or [pos, *width] with per_position=True (module docstring). Computed in x's dtype."""
    if x.dim() < 2:
        raise ValueError(f"token_mean needs x of shape [batch, pos, ...], got {tuple(x.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"the mask must have shape [batch, pos] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else \
        (mask.to(x.device) != 0).to(x.dtype)                                   # [b, p]
    wx = x * w.reshape(*w.shape, *([1] * (x.dim() - 2)))                       # [b, p, *width]
    overall = wx.sum((0, 1)) / w.sum().clamp_min(1)                            # [*width]
    if not per_position:
        return overall
    count = w.sum(0)                                                           # [p]
    mean = wx.sum(0) / count.clamp_min(1).reshape(-1, *([1] * (x.dim() - 2)))  # [p, *width]
    empty = count == 0
    if bool(empty.any()):
        mean[empty] = overall
    return mean


__all__ = ["token_mean"]
