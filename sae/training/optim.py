"""The update of one dictionary: the optimizers (Adam, schedule-free sign descent) and the
unit-norm decoder constraint (remove the gradient parallel to each decoder row before the step,
renormalise the rows after it; Gao et al. 2024 §A.1, Bricken et al. 2023)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..dictionary import Dictionary

if TYPE_CHECKING:
    from .config import TrainConfig


class ScheduleFreeSignSGD(torch.optim.Optimizer):
    """Schedule-free sign descent: signSGD (Bernstein et al. 2018, arXiv 1802.04434) as the base
    step of schedule-free SGD (Defazio et al. 2024, "The Road Less Scheduled", arXiv 2405.15682).
    EleutherAI's sparsify trains SAEs with this combination by default.

    Three sequences per parameter: z (the sign-descent iterate), x (a weighted running average of
    the z's: the weights to evaluate and export) and y = (1 - beta) z + beta x, where gradients
    are taken; the module's parameters hold y while training. One step, gradient g = dL/dy:

        x <- (y - (1 - beta) z) / beta            # x as the parameters imply it (see below)
        z <- z - lr_t sign(g)
        c  = lr_t^2 / sum_{i<=t} lr_i^2           # 1/t for a constant lr; warm-up steps weigh less
        x <- (1 - c) x + c z
        y <- (1 - beta) z + beta x

    Reading x back from y makes constraints simple: whoever projects the parameters between steps
    (the trainer renormalises decoder rows after each step) moves x along with y. sparsify's
    wrapper keeps the same state and renormalises the same way. `averaged(p)` gives x (as of the
    last step, before any projection that followed it), e.g. for export."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.95):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        if closure is not None:
            raise ValueError("ScheduleFreeSignSGD.step takes no closure")
        for group in self.param_groups:
            lr, beta = float(group["lr"]), float(group["momentum"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["z"] = p.detach().clone()
                    st["x"] = p.detach().clone()
                    st["weight_sum"] = 0.0
                z, x = st["z"], st["x"]
                y = p.data
                torch.lerp(y, z, 1.0 - 1.0 / beta, out=x)  # x = (y - (1 - beta) z) / beta
                z.add_(p.grad.sign(), alpha=-lr)
                st["weight_sum"] = float(st["weight_sum"]) + lr * lr
                x.lerp_(z, lr * lr / st["weight_sum"])
                torch.lerp(z, x, beta, out=y)  # y = (1 - beta) z + beta x
        return None

    def averaged(self, p: torch.Tensor) -> torch.Tensor:
        """The averaged weights x of parameter p (p itself before its first step)."""
        st = self.state.get(p)
        return st["x"] if st else p.detach()


def _make_optimizer(d: Dictionary, cfg: "TrainConfig", lr: float, device: torch.device) -> torch.optim.Optimizer:
    params = list(d.parameters())
    if cfg.optimizer == "signsgd":
        return ScheduleFreeSignSGD(params, lr=lr, momentum=cfg.momentum)
    # the fused (single-kernel) Adam: ~10x faster than the per-parameter loop on CPU
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float64) for p in params)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, betas=cfg.betas, eps=cfg.eps)


def _decoder_rows(d: nn.Module, name: str) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
    """Find the parameter behind `d.W_dec` ([n_latents, d_in], the parameter itself or its
    transpose) and return a function giving (rows view of the weights, rows view of the grad)."""
    W = d.W_dec
    for p in d.parameters():
        if W is p or (W.data_ptr() == p.data_ptr() and tuple(W.shape) == tuple(p.shape)
                      and W.stride() == p.stride()):
            return lambda p=p: (p.data, p.grad)
        if W.dim() == 2 and W.data_ptr() == p.data_ptr() and tuple(W.shape) == tuple(p.shape)[::-1] \
                and W.stride() == p.stride()[::-1]:
            return lambda p=p: (p.data.T, None if p.grad is None else p.grad.T)
    raise TypeError(
        f"dictionary {name!r} ({type(d).__name__}) has unit_norm_decoder=True but its W_dec is not a "
        "parameter (or the transpose of one): the trainer needs W_dec to return the decoder "
        "nn.Parameter [n_latents, d_in] to constrain its rows")


@torch.no_grad()
def _remove_parallel_grad(rows: Callable) -> None:
    w, g = rows()
    if g is None:
        return
    coef = (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(1e-12)  # [n, 1]
    g.sub_(coef * w)


@torch.no_grad()
def _renormalise(rows: Callable) -> None:
    w, _ = rows()
    w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))



@torch.no_grad()
def reset_rows(opt: torch.optim.Optimizer, param: torch.Tensor, index: torch.Tensor) -> None:
    """Forget the optimizer's history of the slices param[index] (dim 0), e.g. after resampling
    latents: Adam's moments there are zeroed; schedule-free sign descent restarts its sequences
    z and x there from the parameter's new value."""
    st = opt.state.get(param)
    if not st:
        return
    if isinstance(opt, ScheduleFreeSignSGD):
        for key in ("z", "x"):
            st[key][index] = param.data[index]
        return
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        t = st.get(key)
        if isinstance(t, torch.Tensor) and t.shape == param.shape:
            t[index] = 0
