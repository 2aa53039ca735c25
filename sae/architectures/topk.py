"""TopK SAEs with the AuxK loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
arXiv 2406.04093) and BatchTopK SAEs (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse
Autoencoders", arXiv 2412.06410).

TopK (Gao et al. §2.3):

    c = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))        # [.., n_latents], k nonzeros per token
    x_hat = c W_dec + b_dec
    L = FVU(x, x_hat) + alpha * L_aux                  # FVU = sum||x - x_hat||^2 / sum||x - mean x||^2

AuxK (§A.2): with the detached residual e = x - x_hat and the k_aux largest ReLU'd
pre-activations among the *dead* latents (state.dead_mask), e_hat = c_aux W_dec (no bias) and

    L_aux = sum ||e - e_hat||^2 / sum ||e - mean(e)||^2,    alpha = 1/32, k_aux = d_in / 2

(normalised by the residual's variance as in OpenAI's `normalized_mse`; k_aux = d_in/2 is the
sparsify / dictionary_learning / SAELens default, capped at the number of dead latents).
Both denominators are batch statistics: under data parallel training they are taken over the
global batch (`TrainState.all_reduce`), so the averaged update equals the single-process one.
FVU and the variances are `sae.metrics`' definitions.
Initialisation (§A.1): unit-norm random decoder rows, W_enc = W_dec^T, b_dec from
`init_from_data` (geometric median); the trainer keeps decoder rows at unit norm. `init_from_data`
also rescales the encoder by the least-squares scale of the first reconstruction,
s = sum<x - b_dec, x_hat - b_dec> / sum||x_hat - b_dec||^2 (x_hat at W_enc = W_dec^T overshoots:
the k selected directions overlap), so training starts at the best reconstruction along that ray.

BatchTopK (Bussmann et al. §3): during training keep the k*B largest ReLU'd pre-activations of
the whole batch of B tokens (a variable number per token). At inference a single threshold
theta replaces the batch selection, c = z * 1[z > theta] with z the pre-activation; theta is a
running estimate of the smallest kept activation (theta <- (1-eta) theta + eta * min kept,
eta = 1 - threshold_decay). `export_jumprelu()` returns the equivalent JumpReLU SAE.

Both train through the sparse kernels of `_sparse` (dense encoder matmul; sparse decoder and
sparse weight gradients), so a step costs one dense [B, d] x [d, n] product plus O(B k d).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics as _metrics
from ..dictionary import Dictionary, TrainState, check_x, random_unit_rows, register
from . import _sparse


def _scalar(t: torch.Tensor) -> "float | torch.Tensor":
    """A metric value: a float on CPU (free), the detached 0-d tensor on accelerators (reading it
    would wait for the device every step; the trainer averages tensors between log steps)."""
    return t.item() if t.device.type == "cpu" else t.detach()


class _KSparseSAE(Dictionary):
    """Parameters, initialisation and the AuxK objective shared by TopK and BatchTopK."""

    unit_norm_decoder = True

    def __init__(self, d_in: int, n_latents: int, k: int, k_aux: int | None = None,
                 aux_coefficient: float = 1 / 32):
        super().__init__(d_in, n_latents)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < self.n_latents:
            raise ValueError(f"k must be an integer with 1 <= k < n_latents={self.n_latents}, got k={k!r}")
        if k_aux is None:
            k_aux = max(1, self.d_in // 2)
        if isinstance(k_aux, bool) or not isinstance(k_aux, int) or k_aux < 0:
            raise ValueError(f"k_aux must be a non-negative integer (0 disables AuxK), got {k_aux!r}")
        if not aux_coefficient >= 0:
            raise ValueError(f"aux_coefficient must be >= 0, got {aux_coefficient!r}")
        self.k = k
        self.k_aux = k_aux
        self.aux_coefficient = float(aux_coefficient)
        W = random_unit_rows(self.n_latents, self.d_in)
        self.W_enc = nn.Parameter(W.clone())  # [n_latents, d_in]
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))  # [n_latents]
        self.W_dec = nn.Parameter(W)  # [n_latents, d_in]
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))  # [d_in]

    @torch.no_grad()
    def init_from_data(self, x_sample: torch.Tensor, method: str = "geometric_median") -> "_KSparseSAE":
        """b_dec from x_sample [n, d_in] (see `Dictionary.init_from_data`), then W_enc *= s with s
        the least-squares scale of the reconstruction (module docstring). Returns self."""
        super().init_from_data(x_sample, method)
        x = x_sample.reshape(-1, self.d_in)[:4096].to(self.W_enc)  # a scalar needs few tokens
        values, indices = self.pre_activations(x).relu().topk(self.k, dim=-1)  # [n, k]
        codes = torch.zeros(x.shape[0], self.n_latents, dtype=x.dtype, device=x.device)
        h = codes.scatter_(-1, indices, values) @ self.W_dec  # x_hat - b_dec  [n, d_in]
        s = (x - self.b_dec).double().mul(h).sum() / h.double().pow(2).sum()
        if s > 0:  # (nan when nothing fired: keep the unit-norm init)
            self.W_enc.mul_(float(s))
        return self

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "k_aux": self.k_aux, "aux_coefficient": self.aux_coefficient}

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., n_latents]
        check_x(x, self.d_in, type(self).__name__)
        return F.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # [..., n_latents] -> [..., d_in]
        return codes @ self.W_dec + self.b_dec

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x_hat from k-sparse codes: values, indices [..., m] -> [..., d_in]. Differentiable, with a
        sparse backward (only the m referenced decoder rows get gradient entries)."""
        if values.shape != indices.shape:
            raise ValueError(f"values and indices must have the same shape, got {tuple(values.shape)} "
                             f"and {tuple(indices.shape)}")
        lead, m = values.shape[:-1], values.shape[-1]
        B = math.prod(lead)
        rows = torch.arange(B, device=values.device).repeat_interleave(m)
        out = _sparse.decode_coo(values.reshape(-1), rows, indices.reshape(-1), self.W_dec, B)
        return (out + self.b_dec).reshape(*lead, self.d_in)

    # --- training -----------------------------------------------------------------------
    def _select(self, pre: torch.Tensor) -> _sparse.Active:
        """The training-time selection on pre [B, n] (may modify it in place)."""
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        check_x(x, self.d_in, f"{type(self).__name__}.training_loss")
        x = x.reshape(-1, self.d_in)
        B = x.shape[0]
        use_aux = self.aux_coefficient > 0 and self.k_aux > 0 and state.dead_mask is not None
        dead, k_eff, dense_aux = _sparse.dead_latents(state.dead_mask if use_aux else None,
                                                     self.k_aux, x.device)
        def selector(pre: torch.Tensor):
            main = self._select(pre)
            return main, (None if dense_aux else _sparse.select_aux(pre, dead, k_eff))

        by_latent = _sparse.LatentOrder()  # one by-latent sort for both weight gradients
        block_cols = _sparse.pad_columns(dead) if dense_aux else None  # dead latents, -1 padded
        main, aux, block = _sparse.sparse_encode(x, self.W_enc, self.b_enc, self.b_dec, selector,
                                                 block_cols, by_latent)
        x_hat = _sparse.decode_coo(main.values, main.rows, main.cols, self.W_dec, B, by_latent) + self.b_dec
        # FVU over the global batch: the per-token variance of every rank's rows together
        # (state.all_reduce), so the mean of the ranks' losses is the single-process loss
        x_var = _metrics.token_variance(x, state.all_reduce)
        loss_fvu = _metrics.fvu(x, x_hat, x_var)
        loss = loss_fvu
        metrics: dict[str, Any] = {}
        if k_eff > 0:
            # AuxK: the top-k_aux dead latents reconstruct the detached residual (no b_dec)
            e = (x - x_hat).detach()  # [B, d_in]
            if dense_aux:  # block = ReLU(pre[:, dead]) [B, n_dead + padding (zero columns)]
                if k_eff < dead.numel():
                    vals, j = block.topk(k_eff, dim=-1, sorted=False)
                    block = torch.zeros_like(block).scatter(-1, j, vals)
                e_hat = block @ self.W_dec.index_select(0, block_cols.clamp_min(0))
            else:
                e_hat = _sparse.decode_coo(aux.values, aux.rows, aux.cols, self.W_dec, B)
            # the FVU of e by e_hat, normalised by the residual's variance over the global batch
            aux_loss = _metrics.fvu(e, e_hat, _metrics.token_variance(e, state.all_reduce)).nan_to_num(0.0)
            loss = loss + self.aux_coefficient * aux_loss
            metrics["auxk"] = _scalar(aux_loss)
        with torch.no_grad():
            active = main.values > 0
            fired = torch.zeros(self.n_latents, dtype=torch.bool, device=x.device)
            fired[main.cols[active]] = True
            self.last_fired = fired
            self._after_step(main)
            metrics.update(fvu=_scalar(loss_fvu), sq_err_per_token=_scalar(loss_fvu.detach() * x_var),
                           l0=_scalar(active.sum() / B))
            if use_aux:
                metrics["dead"] = float(dead.numel())
        return loss, metrics

    def _after_step(self, main: _sparse.Active) -> None:
        """Hook run (without grad) after each training_loss on the selected entries."""


@register
class TopKSAE(_KSparseSAE):
    """TopK SAE with AuxK (Gao et al. 2024). Registered as "topk".

    Args: d_in, n_latents; k (active latents per token, 1 <= k < n_latents); k_aux (dead latents
    used by AuxK, default d_in // 2, 0 disables); aux_coefficient alpha (default 1/32).

    Sparse API: `encode_topk(x) -> (values, indices) [..., k]` and `decode_sparse(values, indices)`;
    `forward` uses them. `encode` returns the dense codes [..., n_latents] (k nonzeros)."""

    architecture = "topk"

    def encode_topk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The k active codes of each token: values, indices [..., k] (values >= 0, unsorted).

        Differentiable through the sparse backward (no dense [.., n_latents] gradient)."""
        check_x(x, self.d_in, "TopKSAE.encode_topk")
        lead = x.shape[:-1]
        k = self.k
        main, _, _ = _sparse.sparse_encode(x.reshape(-1, self.d_in), self.W_enc, self.b_enc, self.b_dec,
                                           lambda pre: (_sparse.select_topk(pre, k), None))
        return main.values.reshape(*lead, k), main.cols.reshape(*lead, k)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., n_latents] (k nonzeros)
        values, indices = self.encode_topk(x)
        return torch.zeros(*values.shape[:-1], self.n_latents, dtype=values.dtype,
                           device=values.device).scatter(-1, indices, values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.encode_topk(x))

    def _select(self, pre: torch.Tensor) -> _sparse.Active:
        return _sparse.select_topk(pre, self.k)


@register
class BatchTopKSAE(_KSparseSAE):
    """BatchTopK SAE (Bussmann et al. 2024). Registered as "batchtopk".

    Args as TopKSAE (k = average active latents per token), plus threshold_decay (EMA decay of the
    inference threshold theta, default 0.99, i.e. SAELens' rate 0.01). Buffer `threshold`: theta,
    -1 until the first training step (encode then behaves as ReLU)."""

    architecture = "batchtopk"

    def __init__(self, d_in: int, n_latents: int, k: int, k_aux: int | None = None,
                 aux_coefficient: float = 1 / 32, threshold_decay: float = 0.99):
        super().__init__(d_in, n_latents, k, k_aux, aux_coefficient)
        if not 0.0 <= threshold_decay < 1.0:
            raise ValueError(f"threshold_decay must be in [0, 1), got {threshold_decay!r}")
        self.threshold_decay = float(threshold_decay)
        self.register_buffer("threshold", torch.tensor(-1.0))  # scalar theta; < 0: not estimated yet

    def config(self) -> dict[str, Any]:
        return {**super().config(), "threshold_decay": self.threshold_decay}

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # inference: one global threshold
        z = self.pre_activations(x)
        return z * (z > self.threshold.clamp_min(0))

    def _select(self, pre: torch.Tensor) -> _sparse.Active:
        return _sparse.select_batch_topk(pre, self.k)[0]

    def _after_step(self, main: _sparse.Active) -> None:
        pos = main.values[main.values > 0]
        if pos.numel() == 0:
            return
        smallest = pos.min().to(self.threshold.dtype)
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            d = self.threshold_decay
            self.threshold.mul_(d).add_((1 - d) * smallest)

    def export_jumprelu(self) -> Dictionary:
        """The inference model as a JumpReLU SAE with threshold theta for every latent (same
        encode and decode)."""
        from .jumprelu import JumpReLUSAE

        out = JumpReLUSAE(self.d_in, self.n_latents).to(self.W_dec.device, self.W_dec.dtype)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(out, name).copy_(getattr(self, name))
            out.threshold.fill_(float(self.threshold.clamp_min(0)))
        return out
