"""Gated SAEs (Rajamanoharan, Conmy, Smith, Lieberum, Varma, Kramár, Shah, Nanda 2024,
"Improving Dictionary Learning with Gated Sparse Autoencoders", arXiv 2404.16014).

Which latents fire and how strongly are estimated by two paths sharing one matrix W_gate
(stored as `W_enc` [n_latents, d_in]) and a per-latent rescaling r_mag (§3.1, eq. 6-8):

    h      = W_gate (x - b_dec)
    pi_gate = h + b_gate                    pi_mag = exp(r_mag) * h + b_mag
    c = 1[pi_gate > 0] * ReLU(pi_mag)       x_hat = c W_dec + b_dec

The Heaviside gate passes no gradient, so the gate path learns through the sparsity penalty and
an auxiliary reconstruction through a frozen (detached) copy of the decoder (§3.2, eq. 9):

    L = ||x - x_hat||^2 + lambda * sum_i ReLU(pi_gate)_i ||W_dec,i||
        + ||x - (ReLU(pi_gate) W_dec.detach() + b_dec.detach())||^2

Decoder rows are kept at unit norm by the trainer (the paper's constraint) unless
`unit_norm_decoder=False`, in which case the ||W_dec,i|| factor of the penalty stands in for it
(Anthropic April-2024 style). Initialisation: unit decoder rows, W_gate = W_dec^T, zero biases and
r_mag.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics as _metrics
from ..dictionary import Dictionary, TrainState, check_x, random_unit_rows, register


@register
class GatedSAE(Dictionary):
    """Gated SAE (Rajamanoharan et al. 2024a). Registered as "gated".

    Args: d_in, n_latents; l1_coefficient lambda; sparsity_warmup (fraction of training over
    which lambda ramps up linearly); unit_norm_decoder (default True)."""

    architecture = "gated"

    def __init__(self, d_in: int, n_latents: int, l1_coefficient: float = 5.0,
                 sparsity_warmup: float = 0.05, unit_norm_decoder: bool = True):
        super().__init__(d_in, n_latents)
        if not l1_coefficient >= 0:
            raise ValueError(f"l1_coefficient must be >= 0, got {l1_coefficient!r}")
        if not 0 <= sparsity_warmup <= 1:
            raise ValueError(f"sparsity_warmup is a fraction of training in [0, 1], got {sparsity_warmup!r}")
        self.l1_coefficient = float(l1_coefficient)
        self.sparsity_warmup = float(sparsity_warmup)
        self.unit_norm_decoder = bool(unit_norm_decoder)
        W = random_unit_rows(self.n_latents, self.d_in)
        self.W_enc = nn.Parameter(W.clone())  # W_gate [n_latents, d_in]
        self.b_gate = nn.Parameter(torch.zeros(self.n_latents))
        self.r_mag = nn.Parameter(torch.zeros(self.n_latents))
        self.b_mag = nn.Parameter(torch.zeros(self.n_latents))
        self.W_dec = nn.Parameter(W)  # [n_latents, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "l1_coefficient": self.l1_coefficient,
                "sparsity_warmup": self.sparsity_warmup, "unit_norm_decoder": self.unit_norm_decoder}

    def _paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_x(x, self.d_in, "GatedSAE")
        h = F.linear(x - self.b_dec, self.W_enc)  # [..., n_latents]
        return h + self.b_gate, h * self.r_mag.exp() + self.b_mag  # pi_gate, pi_mag

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def training_loss(self, x: torch.Tensor, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        x = x.reshape(-1, self.d_in)
        pi_gate, pi_mag = self._paths(x)  # [B, n]
        c = (pi_gate > 0).to(pi_mag.dtype) * F.relu(pi_mag)
        x_hat = c @ self.W_dec + self.b_dec
        sq_err = _metrics.sq_err_per_token(x, x_hat)  # mean over tokens of ||x - x_hat||^2
        gate = F.relu(pi_gate)
        l1 = (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
        x_aux = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = (x - x_aux).pow(2).sum(-1).mean()
        warm = min(1.0, state.progress / self.sparsity_warmup) if self.sparsity_warmup > 0 else 1.0
        loss = sq_err + self.l1_coefficient * warm * l1 + aux
        with torch.no_grad():
            active = c != 0
            self.last_fired = active.any(0)
            metrics = {"sq_err_per_token": sq_err.item(), "fvu": _metrics.fvu(x, x_hat).item(), "l1": l1.item(),
                       "aux": aux.item(), "l0": active.sum().item() / x.shape[0]}
        return loss, metrics
