"""ReLU SAEs with an L1 penalty: Cunningham, Ewart, Riggs, Huben, Sharkey 2023, "Sparse
Autoencoders Find Highly Interpretable Features in Language Models" (arXiv 2309.08600), and
Bricken et al. 2023, "Towards Monosemanticity" (transformer-circuits.pub), with the
decoder-norm-weighted penalty of Anthropic's April-2024 update.

    c = ReLU(W_enc (x - b_dec) + b_enc)                  # [.., n_latents]
    x_hat = c W_dec + b_dec
    L = ||x - x_hat||^2 + lambda * w(t) * sum_i c_i ||W_dec,i||

with w(t) = min(1, t / sparsity_warmup) a linear warm-up of lambda over the first fraction of
training (t = state.progress). Two recipes:

- untied (default; Anthropic April 2024 / SAELens "standard"): no norm constraint, decoder rows
  initialised at norm 0.1 and W_enc = W_dec^T; the ||W_dec,i|| factor keeps the penalty from being
  gamed by shrinking codes and growing rows.
- `tied=True` (Cunningham et al.): one matrix W_dec serves as both encoder and decoder
  (c = ReLU(W_dec (x - b_dec) + b_enc), x_hat = c W_dec + b_dec) with unit-norm rows kept by the
  trainer; projecting out the row-parallel gradient and renormalising is exactly gradient descent
  on the row-normalised dictionary of Cunningham et al., whose loss is then L with ||W_dec,i|| = 1.

`resample_dead` implements the neuron resampling of Towards Monosemanticity (Bricken et al.
2023, "Neuron Resampling" appendix).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics as _metrics
from ..dictionary import Dictionary, TrainState, check_x, random_unit_rows, register


@register
class ReLUSAE(Dictionary):
    """ReLU + L1 SAE. Registered as "relu".

    Args: d_in, n_latents; l1_coefficient lambda (default 5, for inputs normalised to
    E||x||^2 = d_in); sparsity_warmup (fraction of training, default 0.05); tied (share encoder and
    decoder); unit_norm_decoder (default: True when tied, else False; tied requires True);
    decoder_init_norm (default 1.0 with unit-norm decoders, else 0.1)."""

    architecture = "relu"
    #: parameters indexed by latent along dim 0 (the trainer resets their optimizer rows on resampling)
    latent_parameters = ("W_enc", "W_dec", "b_enc")

    def __init__(self, d_in: int, n_latents: int, l1_coefficient: float = 5.0,
                 sparsity_warmup: float = 0.05, tied: bool = False,
                 unit_norm_decoder: bool | None = None, decoder_init_norm: float | None = None):
        super().__init__(d_in, n_latents)
        if not l1_coefficient >= 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {l1_coefficient!r}")
        if not 0 <= sparsity_warmup <= 1:
            raise ValueError(f"sparsity_warmup is a fraction of training in [0, 1], got {sparsity_warmup!r}")
        if unit_norm_decoder is None:
            unit_norm_decoder = bool(tied)
        if tied and not unit_norm_decoder:
            raise ValueError("tied=True needs unit_norm_decoder=True: the tied dictionary is the "
                             "row-normalised matrix (Cunningham et al. 2023)")
        if decoder_init_norm is None:
            decoder_init_norm = 1.0 if unit_norm_decoder else 0.1
        if not decoder_init_norm > 0:
            raise ValueError(f"decoder_init_norm must be > 0, got {decoder_init_norm!r}")
        self.l1_coefficient = float(l1_coefficient)
        self.sparsity_warmup = float(sparsity_warmup)
        self.tied = bool(tied)
        self.unit_norm_decoder = bool(unit_norm_decoder)
        self.decoder_init_norm = float(decoder_init_norm)
        W = random_unit_rows(self.n_latents, self.d_in, self.decoder_init_norm)
        if not self.tied:
            self.W_enc = nn.Parameter(W.clone())  # [n_latents, d_in]
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.W_dec = nn.Parameter(W)  # [n_latents, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "l1_coefficient": self.l1_coefficient,
                "sparsity_warmup": self.sparsity_warmup, "tied": self.tied,
                "unit_norm_decoder": self.unit_norm_decoder, "decoder_init_norm": self.decoder_init_norm}

    @property
    def encoder_weight(self) -> torch.Tensor:  # [n_latents, d_in]
        return self.W_dec if self.tied else self.W_enc

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        check_x(x, self.d_in, "ReLUSAE")
        return F.linear(x - self.b_dec, self.encoder_weight, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def training_loss(self, x: torch.Tensor, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        x = x.reshape(-1, self.d_in)
        c = self.encode(x)  # [B, n]
        x_hat = self.decode(c)
        sq_err = _metrics.sq_err_per_token(x, x_hat)  # mean over tokens of ||x - x_hat||^2
        l1 = (c * self.W_dec.norm(dim=1)).sum(-1).mean()
        warm = min(1.0, state.progress / self.sparsity_warmup) if self.sparsity_warmup > 0 else 1.0
        loss = sq_err + self.l1_coefficient * warm * l1
        with torch.no_grad():
            active = c > 0
            self.last_fired = active.any(0)
            metrics = {"sq_err_per_token": sq_err.item(), "fvu": _metrics.fvu(x, x_hat).item(), "l1": l1.item(),
                       "l0": active.sum().item() / x.shape[0]}
        return loss, metrics

    @torch.no_grad()
    def fold_scale(self, s: float) -> "ReLUSAE":
        """As `Dictionary.fold_scale`; a tied model is untied first (the folded encoder is s*W and
        the folded decoder W/s, which one matrix cannot hold). Folding s = 1 is a no-op that keeps
        the model tied."""
        if self.tied:
            if not (math.isfinite(float(s)) and float(s) > 0):
                raise ValueError(f"fold_scale needs a finite positive scale, got {s}")
            if float(s) == 1.0:
                return self
            self.W_enc = nn.Parameter(self.W_dec.detach().clone())
            self.tied = False
        return super().fold_scale(s)

    @torch.no_grad()
    def resample_dead(self, x_sample: torch.Tensor, dead_mask: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Neuron resampling (Bricken et al. 2023): re-initialise dead latents on inputs the
        model reconstructs badly. Returns the resampled latent indices [n_resampled] (long).

        Inputs are drawn with probability proportional to the square of their loss
        ||x - x_hat||^2; for each dead latent i with drawn input v (centred: v = x - b_dec):
        W_dec,i = v/||v|| * (mean alive decoder norm), W_enc,i = v/||v|| * 0.2 * (mean alive
        encoder norm), b_enc,i = 0. The caller resets the optimizer state of those rows (Adam
        moments) and may re-warm the learning rate, as the recipe prescribes."""
        check_x(x_sample, self.d_in, "ReLUSAE.resample_dead")
        x = x_sample.reshape(-1, self.d_in).to(self.W_dec)
        dead_mask = dead_mask.to(self.W_dec.device, torch.bool)
        if dead_mask.shape != (self.n_latents,):
            raise ValueError(f"dead_mask must have shape [{self.n_latents}], got {tuple(dead_mask.shape)}")
        dead = torch.nonzero(dead_mask).flatten()
        if dead.numel() == 0 or x.shape[0] == 0:
            return dead[:0]
        loss = (self(x) - x).pow(2).sum(-1)  # [n]
        p = loss.double().square()
        if not bool(p.sum() > 0):
            p = torch.ones_like(p)
        replacement = x.shape[0] < dead.numel()
        pick = torch.multinomial(p, dead.numel(), replacement=replacement, generator=generator)
        v = x[pick] - self.b_dec  # [n_dead, d_in]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        alive = ~dead_mask
        dec_norm = float(self.W_dec[alive].norm(dim=1).mean()) if alive.any() else self.decoder_init_norm
        self.W_dec[dead] = v * dec_norm
        if not self.tied:
            enc_norm = float(self.W_enc[alive].norm(dim=1).mean()) if alive.any() else 1.0
            self.W_enc[dead] = v * 0.2 * enc_norm
        self.b_enc[dead] = 0.0
        return dead
