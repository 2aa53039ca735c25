"""Dead-latent resampling inside the training loop (Bricken et al. 2023, "Towards
Monosemanticity", appendix "Neuron resampling"), for the ReLU + L1 SAEs of Cunningham et al. 2023
and Bricken et al. 2023 (`ReLUSAE.resample_dead`); TopK-family SAEs use AuxK instead.

Every `TrainConfig.resample_interval` steps (default: one dead window, so a latent is only judged
after it has had a full window to fire) while step < resample_until · total_steps, for each
dictionary that defines `resample_dead(x_sample, dead_mask, generator)` (`ReLUSAE`):

    dead   = latents that have not fired for dead_window tokens
    D.resample_dead(x, dead)        # new encoder/decoder rows from badly reconstructed inputs of x
    optimizer history of the rows of `D.latent_parameters` at the dead latents is reset
    dead-window counters of the resampled latents restart at 0

x is the step's scaled global batch (the same on every rank, and every rank holds the same
weights, so all ranks resample identically; no extra communication); the draw uses a generator
seeded by (seed, step), so runs and resumed runs resample the same way. The learning rate is not
re-warmed (its schedule stays a function of the step alone).
"""
from __future__ import annotations

from typing import Any

import torch

from .optim import reset_rows


def can_resample(d: Any) -> bool:
    return callable(getattr(d, "resample_dead", None))


def due(step: int, total_steps: int, interval: int, until: float) -> bool:
    """Whether resampling runs after step `step` (0-based): every `interval` steps, not at step 0,
    and only while step < until * total_steps."""
    done = step + 1
    return done % interval == 0 and step < until * total_steps


@torch.no_grad()
def resample(d: Any, opt: torch.optim.Optimizer, x: torch.Tensor, dead: torch.Tensor, seed: int,
             step: int) -> torch.Tensor:
    """Resample the dead latents (`dead` [n_latents] bool) of d on inputs x [batch, d_in] and reset
    their optimizer history; returns the resampled latent ids [m] (long)."""
    if not bool(dead.any()):
        return torch.zeros(0, dtype=torch.long, device=dead.device)
    gen = torch.Generator(device=x.device)
    gen.manual_seed((int(seed) * 1_000_003 + int(step)) % 2 ** 63)
    ids = d.resample_dead(x, dead, generator=gen)
    params = dict(d.named_parameters())
    for name in getattr(d, "latent_parameters", ()):
        p = params.get(name)
        if p is not None:
            reset_rows(opt, p, ids.to(p.device))
    return ids
