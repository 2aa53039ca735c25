"""JumpReLU SAEs (Rajamanoharan, Lieberum, Sonnerat, Conmy, Varma, Kramár, Nanda 2024, "Jumping
Ahead: Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders", arXiv 2407.14435).

    z = W_enc (x - b_dec) + b_enc                        # [.., n_latents]
    c = JumpReLU_theta(z) = z * H(z - theta)              # per-latent threshold theta > 0
    x_hat = c W_dec + b_dec
    L = ||x - x_hat||^2 + lambda * sum_i H(z_i - theta_i)  # "step" (L0) sparsity, the paper's eq. (9)

H has zero derivative almost everywhere, so theta is trained with straight-through
pseudo-derivatives using the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth eps (§4):

    d/dtheta JumpReLU_theta(z) := -(theta / eps) K((z - theta) / eps)
    d/dtheta H(z - theta)      := -(1 / eps)     K((z - theta) / eps)
    d/dz JumpReLU_theta(z)      = H(z - theta),   d/dz H(z - theta) := 0

Options from later recipes: the "tanh" sparsity penalty lambda * sum_i tanh(c * f_i ||W_dec,i||)
(Anthropic, Jan-2025 update), the pre-activation loss lambda_P * sum_{i dead} ReLU(theta_i - z_i)
||W_dec,i|| that pulls dead latents back towards their threshold, and a linear warm-up of lambda
over the first `sparsity_warmup` fraction of training. theta is stored raw (not as log theta;
SAELens PR #718) and codes are additionally gated by z > 0, so a threshold pushed below zero acts
as a ReLU. Defaults assume activations normalised to E||x||^2 = d_in (bandwidth 0.05, theta_0
0.01, the SAELens v6 defaults).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics as _metrics
from ..dictionary import Dictionary, TrainState, check_x, random_unit_rows, register


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * ((z > theta) & (z > 0))

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_z = g * ((z > theta) & (z > 0))
        grad_theta = -(theta / eps) * _rectangle((z - theta) / eps) * g
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0)
        return grad_z, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta, eps):  # type: ignore[override]
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return ((z > theta) & (z > 0)).to(z.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = -(1.0 / eps) * _rectangle((z - theta) / eps) * g
        return torch.zeros_like(z), grad_theta.reshape(-1, theta.shape[-1]).sum(0), None


def jumprelu(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """z * H(z - theta) (and z > 0) with the straight-through threshold gradient."""
    return _JumpReLU.apply(z, theta, bandwidth)


def step(z: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """H(z - theta) (and z > 0) with the straight-through threshold gradient."""
    return _Step.apply(z, theta, bandwidth)


@register
class JumpReLUSAE(Dictionary):
    """JumpReLU SAE (Rajamanoharan et al. 2024b). Registered as "jumprelu".

    Args: d_in, n_latents; sparsity_coefficient lambda; sparsity_loss "step" (L0, the paper) or
    "tanh" (Anthropic); tanh_scale c; bandwidth eps; threshold_init theta_0; pre_act_coefficient
    lambda_P (0 disables); sparsity_warmup (fraction of training over which lambda ramps up);
    unit_norm_decoder (default True: the trainer keeps decoder rows at unit norm)."""

    architecture = "jumprelu"

    def __init__(self, d_in: int, n_latents: int, sparsity_coefficient: float = 1.0,
                 sparsity_loss: str = "step", tanh_scale: float = 4.0, bandwidth: float = 0.05,
                 threshold_init: float = 0.01, pre_act_coefficient: float = 0.0,
                 sparsity_warmup: float = 0.1, unit_norm_decoder: bool = True):
        super().__init__(d_in, n_latents)
        if sparsity_loss not in ("step", "tanh"):
            raise ValueError(f"sparsity_loss must be 'step' or 'tanh', got {sparsity_loss!r}")
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
        if not threshold_init >= 0:
            raise ValueError(f"threshold_init must be >= 0, got {threshold_init!r}")
        for name, v in (("sparsity_coefficient", sparsity_coefficient), ("tanh_scale", tanh_scale),
                        ("pre_act_coefficient", pre_act_coefficient)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if not 0 <= sparsity_warmup <= 1:
            raise ValueError(f"sparsity_warmup is a fraction of training in [0, 1], got {sparsity_warmup!r}")
        self.sparsity_coefficient = float(sparsity_coefficient)
        self.sparsity_loss = sparsity_loss
        self.tanh_scale = float(tanh_scale)
        self.bandwidth = float(bandwidth)
        self.threshold_init = float(threshold_init)
        self.pre_act_coefficient = float(pre_act_coefficient)
        self.sparsity_warmup = float(sparsity_warmup)
        self.unit_norm_decoder = bool(unit_norm_decoder)
        W = random_unit_rows(self.n_latents, self.d_in)
        self.W_enc = nn.Parameter(W.clone())  # [n_latents, d_in]
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.W_dec = nn.Parameter(W)  # [n_latents, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self.threshold = nn.Parameter(torch.full((self.n_latents,), self.threshold_init))  # theta [n_latents]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "sparsity_coefficient": self.sparsity_coefficient,
                "sparsity_loss": self.sparsity_loss, "tanh_scale": self.tanh_scale,
                "bandwidth": self.bandwidth, "threshold_init": self.threshold_init,
                "pre_act_coefficient": self.pre_act_coefficient,
                "sparsity_warmup": self.sparsity_warmup, "unit_norm_decoder": self.unit_norm_decoder}

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., n_latents]
        check_x(x, self.d_in, "JumpReLUSAE")
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pre_activations(x)
        return z * ((z > self.threshold) & (z > 0))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W_dec + self.b_dec

    def training_loss(self, x: torch.Tensor, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        x = x.reshape(-1, self.d_in)
        z = self.pre_activations(x)  # [B, n]
        c = jumprelu(z, self.threshold, self.bandwidth)
        x_hat = c @ self.W_dec + self.b_dec
        sq_err = _metrics.sq_err_per_token(x, x_hat)  # mean over tokens of ||x - x_hat||^2
        warm = min(1.0, state.progress / self.sparsity_warmup) if self.sparsity_warmup > 0 else 1.0
        if self.sparsity_loss == "step":
            sparsity = step(z, self.threshold, self.bandwidth).sum(-1).mean()
        else:
            norms = self.W_dec.norm(dim=1)
            sparsity = torch.tanh(self.tanh_scale * c * norms).sum(-1).mean()
        loss = sq_err + self.sparsity_coefficient * warm * sparsity
        metrics: dict[str, float] = {}
        if self.pre_act_coefficient > 0 and state.dead_mask is not None and bool(state.dead_mask.any()):
            dead = state.dead_mask.to(z.device)
            gap = F.relu(self.threshold - z)[:, dead] * self.W_dec.norm(dim=1)[dead]
            pre_act = gap.sum(-1).mean()
            loss = loss + self.pre_act_coefficient * pre_act
            metrics["pre_act"] = pre_act.item()
        with torch.no_grad():
            active = c != 0
            self.last_fired = active.any(0)
            metrics.update(sq_err_per_token=sq_err.item(), fvu=_metrics.fvu(x, x_hat).item(), sparsity=sparsity.item(),
                           l0=active.sum().item() / x.shape[0])
        return loss, metrics
