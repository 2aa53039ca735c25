"""Learning-rate rules: the default base rate per dictionary and the warm-up / decay schedule."""
from __future__ import annotations

import math

from ..dictionary import Dictionary

def default_lr(d: Dictionary, optimizer: str = "adam") -> float:
    """Adam: `d.default_lr()` when the architecture defines it, else 2e-4 / sqrt(n_latents / 2^14)
    (Gao et al. Fig. 3). signsgd: 5e-3 / sqrt(n_latents / 2^14) (sparsify's rule for its default
    schedule-free sign descent)."""
    if optimizer == "signsgd":
        return 5e-3 / math.sqrt(d.n_latents / 2 ** 14)
    rule = getattr(d, "default_lr", None)
    if callable(rule):
        return float(rule())
    return 2e-4 / math.sqrt(d.n_latents / 2 ** 14)


def lr_at(step: int, base: float, total_steps: int, warmup: int, decay_fraction: float) -> float:
    """Learning rate of step `step` (0-based, of `total_steps`):

        lr(t) = base · w(t) · d(t),   w(t) = min(1, (t + 1) / warmup),
                                      d(t) = min(1, (T − t) / decay_steps),  decay_steps = round(decay_fraction · T)

    a linear warm-up, constant, then a linear decay to 0 over the last decay_steps. Where the
    warm-up and the decay overlap (short runs) the two factors multiply. warmup = 0 or
    decay_steps = 0 turns that factor off."""
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay_steps = round(decay_fraction * total_steps)
    d = min(1.0, (total_steps - step) / decay_steps) if decay_steps > 0 else 1.0
    return base * w * d
