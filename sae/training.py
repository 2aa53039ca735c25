"""Train dictionaries on a stream of activation batches: one loop for one SAE, one SAE per site,
or a sweep of SAEs on the same site, on CPU, one GPU or many processes (torchrun).

Per step t, for every dictionary D reading site s (the recipe of Gao et al. 2024, "Scaling and
evaluating sparse autoencoders", and of the peers in the training notes §3.4, §3.8, §3.9):

    x      = s_site · batch[site]                        # [batch, d_in], E‖x‖² = d_in
    L, m   = D.training_loss(x, TrainState(t, T, dead))  # architecture's objective and metrics
    g      = ∇L                                          # averaged over ranks (data parallel)
    g_i   -= (g_i·w_i / ‖w_i‖²) w_i                      # if D.unit_norm_decoder: rows w_i of W_dec
    g     *= min(1, clip / ‖g‖)                          # gradient clipping, per dictionary
    θ      = Adam(θ, g, lr(t)),   w_i ← w_i / ‖w_i‖       # renormalise decoder rows after the step

- Normalisation: s_site = sqrt(d_in / E‖x‖²), estimated from the first `calibration_tokens`
  tokens of the stream, so the same hyper-parameters work at every site (SAELens'
  `expected_average_only_in`). It is folded into the weights when a dictionary is exported
  (`D.fold_scale(s)`: W_enc·s, W_dec/s, b_dec/s), so saved and returned dictionaries read raw
  activations. b_dec is initialised from the *scaled* calibration sample (`D.init_from_data`).
- Learning rate: lr(t) = lr · min(1, (t+1)/warmup) · min(1, (T−t)/decay_steps): linear warm-up,
  constant, then linear decay to 0 over the last `decay_fraction` of training. Default lr per
  dictionary: `D.default_lr()` if the class defines it, else the TopK scaling law
  2e-4 / sqrt(n_latents / 2^14) (Gao et al. Fig. 3, as in dictionary_learning's TopKTrainer).
- Optimizer (`TrainConfig.optimizer`): "adam" (default; the fused kernel where PyTorch has one),
  or "signsgd": schedule-free sign descent, `ScheduleFreeSignSGD` (sparsify's default; notes §3.9),
  default lr 5e-3 / sqrt(n_latents / 2^14), warm-up but no decay (the averaging replaces the
  schedule). It trains on y = (1-β) z + β x and returns/exports the average x. On the benchmark's
  synthetic data at 819k tokens it reaches a much lower FVU than Adam (benchmarks/README.md).
- Matmul precision (`TrainConfig.matmul_precision`, PyTorch's float32 matmul precision while
  training): "highest" (default, exact float32), "high" (TF32 on CUDA), "medium" (bfloat16
  products with float32 accumulation: on CPUs with AMX, such as the benchmark machine, the
  encoder's dense matmul runs ~2x faster; pre-activations then carry ~0.3% relative error, so
  the top-k choice can differ on near-ties). Weights, optimizer state and the sparse parts stay
  float32.
- Dead latents: a latent is dead when it has not fired for `dead_window` tokens, with
  dead_window = clamp(dead_window_fraction · total_tokens, min, max) so the window also triggers
  in short runs (notes §9.6; the published 10M-token window never triggers below 10M tokens).
  The mask is passed to `training_loss` (AuxK uses it) and logged as `dead_fraction`.

The data stream. `batches` is either
  (a) a callable `start_step -> iterator of batches` whose first batch is batch number
      `start_step` (resumable without re-reading anything; e.g. `SyntheticActivations.stream`), or
  (b) any iterable of batches; on resume the trainer discards the first `start_step` batches, so
      the iterable must yield the same sequence when re-created (a seeded, deterministic source).
Every batch is the *global* batch: a Tensor [batch_size, d_in] (all dictionaries read it) or a
dict {site: Tensor[batch_size, d_site]} (each dictionary reads its site: `sites[name]`, else the
key equal to its name). Use `sae.buffer.rebatch` to cut chunks of another size.

Checkpoints (`checkpoint_dir`, every `checkpoint_every` steps and at the end) hold everything a
resumed run needs to continue bit-exactly (same batches, same thread count, CPU): unfolded
weights, Adam moments, RNG states, dead-latent counters, step, scales, the config. Each
checkpoint is a directory `step_NNNNNNNNN/` with `state.safetensors` + `trainer.json` (the
learning-rate schedule is a pure function of the step, so the step restores it), built
under a temporary name and renamed into place, so a run killed at any moment (SIGKILL included)
leaves only complete checkpoints; it also holds folded exports `dictionaries/<name>/` loadable
with `sae.load`. `resume=True` continues from the newest one, or starts fresh when there is none,
so the same command starts a run and restarts it after a crash or preemption. Non-finite activations, losses
or gradients stop the run with `NonFiniteError` naming the step, site and dictionary, before
anything is written, so the last checkpoint on disk is the last good one.

Data parallel: launch the same script with `torchrun --nproc_per_node N script.py`. Every rank
reads every global batch and trains on its slice of rows (batch_size must be divisible by N);
gradients (plus losses and fired-latent masks) are summed with one all_reduce per step and
divided by N, so all ranks apply the same update. gloo on CPU, nccl on GPU. Rank 0 writes
checkpoints, metrics and the progress bar. Losses that are means over rows (MSE, L1, TopK)
give the single-process update up to float rounding; batch-level statistics (BatchTopK's
threshold, AuxK's normaliser) are computed per rank.

Memory: one batch per site in flight plus running sums of scalar metrics between log steps;
nothing grows with the number of steps.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .dictionary import Dictionary, TrainState
from .io import atomic_path

__all__ = ["TrainConfig", "train", "NonFiniteError", "default_lr", "lr_at", "latest_checkpoint",
           "load_checkpoint_dictionaries", "ScheduleFreeSignSGD"]

Batch = Union[torch.Tensor, Mapping[str, torch.Tensor]]
BatchStream = Union[Callable[[int], Iterable[Batch]], Iterable[Batch]]

_TENSOR = "<batch>"  # internal site key for plain-Tensor batches
STATE_FILE, TRAINER_FILE, EXPORT_DIR = "state.safetensors", "trainer.json", "dictionaries"
_FORMAT = 1
OPTIMIZERS = ("adam", "signsgd")

# Config fields that change the training trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = ("total_tokens", "batch_size", "lr", "warmup_steps", "decay_fraction", "optimizer",
                      "betas", "eps", "momentum", "matmul_precision", "grad_clip", "dead_window_fraction",
                      "dead_window_min_tokens", "dead_window_max_tokens", "normalize", "calibration_tokens",
                      "init_from_data", "seed")


@dataclass
class TrainConfig:
    """Training hyper-parameters and run plumbing (flat, simple types: usable as CLI arguments)."""

    total_tokens: int = 10_000_000        # training length; steps = total_tokens // batch_size
    batch_size: int = 4096                # global batch (all ranks together), tokens
    lr: float | None = None               # None: per dictionary, default_lr(D)
    warmup_steps: int | None = None       # None: min(1000, 5% of steps)
    decay_fraction: float = 0.2           # linear decay to 0 over this final fraction of steps
    optimizer: str = "adam"               # "adam" | "signsgd" (schedule-free sign descent)
    betas: tuple[float, float] = (0.9, 0.999)   # adam
    eps: float = 1e-8                     # adam
    momentum: float = 0.95                # signsgd: schedule-free interpolation beta
    matmul_precision: str = "highest"     # torch.set_float32_matmul_precision while training:
                                          # "high" (TF32 on CUDA), "medium" (bf16 products: AMX CPUs, GPUs)
    grad_clip: float | None = 1.0         # max gradient norm per dictionary; None: no clipping
    dead_window_fraction: float = 0.05    # dead = no firing in this fraction of total_tokens ...
    dead_window_min_tokens: int = 100_000     # ... but at least this many tokens
    dead_window_max_tokens: int = 10_000_000  # ... and at most this many
    normalize: bool = True                # scale inputs so E‖x‖² = d_in (folded back on export)
    calibration_tokens: int = 32_768      # tokens for the scale estimate and init_from_data
    init_from_data: bool = True           # call D.init_from_data(scaled sample) when defined
    seed: int = 0
    device: str = "auto"                  # "auto": cuda (cuda:LOCAL_RANK under torchrun) if present
    checkpoint_dir: str | None = None
    checkpoint_every: int = 1000          # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2             # newest step_* directories kept
    resume: bool = False                  # continue from the newest checkpoint (fresh start if none)
    log_every: int = 100                  # steps between metric lines
    metrics_file: str | None = None       # JSONL; None: <checkpoint_dir>/metrics.jsonl if any
    progress: bool = True                 # tqdm bar (rank 0)
    wandb: str | None = None              # wandb project name (requires `pip install wandb`)
    dist_backend: str | None = None       # None: nccl on CUDA, gloo on CPU

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        positive = {"total_tokens": self.total_tokens, "batch_size": self.batch_size,
                    "log_every": self.log_every, "keep_checkpoints": self.keep_checkpoints,
                    "dead_window_min_tokens": self.dead_window_min_tokens}
        for name, v in positive.items():
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if self.total_tokens < self.batch_size:
            raise ValueError(f"total_tokens={self.total_tokens} is less than one batch "
                             f"(batch_size={self.batch_size}): nothing to train")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive or None, got {self.lr}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"TrainConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0 or None, got {self.warmup_steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"TrainConfig.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip}")
        if self.dead_window_max_tokens < self.dead_window_min_tokens:
            raise ValueError("TrainConfig.dead_window_max_tokens must be >= dead_window_min_tokens")
        if self.resume and not self.checkpoint_dir:
            raise ValueError("TrainConfig.resume=True needs checkpoint_dir")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 < self.momentum < 1.0:
            raise ValueError(f"TrainConfig.momentum must be in (0, 1), got {self.momentum}")
        if self.matmul_precision not in ("highest", "high", "medium"):
            raise ValueError("TrainConfig.matmul_precision must be 'highest', 'high' or 'medium', got "
                             f"{self.matmul_precision!r}")

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_size

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(1000, math.ceil(0.05 * self.total_steps))

    @property
    def lr_decay_fraction(self) -> float:
        """The decay fraction in effect: schedule-free signsgd averages instead of decaying."""
        return 0.0 if self.optimizer == "signsgd" else self.decay_fraction

    @property
    def dead_window_tokens(self) -> int:
        w = round(self.dead_window_fraction * self.total_tokens)
        return int(min(max(w, self.dead_window_min_tokens), self.dead_window_max_tokens))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


class NonFiniteError(FloatingPointError):
    """NaN or inf in activations, a loss or gradients; `step`, `site`, `dictionary` and
    `checkpoint` (the last good checkpoint directory, or None) say where."""

    def __init__(self, message: str, step: int, site: str | None, dictionary: str | None,
                 checkpoint: Path | None):
        super().__init__(message)
        self.step, self.site, self.dictionary, self.checkpoint = step, site, dictionary, checkpoint


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
    """Learning rate of step `step` (0-based): linear warm-up, constant, linear decay to 0."""
    f = 1.0
    if warmup > 0 and step < warmup:
        f = (step + 1) / warmup
    decay_steps = round(decay_fraction * total_steps)
    if decay_steps > 0 and step >= total_steps - decay_steps:
        f = min(f, (total_steps - step) / decay_steps)
    return base * f


# ---------------------------------------------------------------------------------------------
# optimizers
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


# ---------------------------------------------------------------------------------------------
# distributed plumbing
class _Dist:
    def __init__(self, cfg: TrainConfig):
        self.owner = False
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        initialised = dist.is_available() and dist.is_initialized()
        want_cuda = cfg.device == "auto" and torch.cuda.is_available() or cfg.device.startswith("cuda")
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and (initialised or world_env > 1) and self.device.index is None:
            self.device = torch.device(f"cuda:{local_rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not initialised and world_env > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is unavailable in this torch build")
            backend = cfg.dist_backend or ("nccl" if self.device.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend)
            self.owner = True
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.on else 1
        self.rank = dist.get_rank() if self.on else 0
        self.main = self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor) -> None:
        if self.on:
            dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def close(self) -> None:
        if self.owner and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# helpers on dictionaries
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


def _metric_value(v: Any, key: str, name: str) -> torch.Tensor | float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"dictionary {name!r}: training_loss metric {key!r} has shape "
                             f"{tuple(v.shape)}; metrics must be scalars")
        return v.detach().reshape(()).float()
    return float(v)


# ---------------------------------------------------------------------------------------------
# checkpoints
def _checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under root, oldest first."""
    if not root.is_dir():
        return []
    out = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
           and p.name[5:].isdigit() and (p / TRAINER_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(out, key=lambda p: int(p.name[5:]))


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory in checkpoint_dir, or None."""
    found = _checkpoints(Path(checkpoint_dir))
    return found[-1] if found else None


def load_checkpoint_dictionaries(checkpoint: str | os.PathLike, device="cpu") -> dict[str, Dictionary]:
    """The folded dictionaries exported in a checkpoint directory (by name)."""
    from .dictionary import load

    root = Path(checkpoint) / EXPORT_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: not a checkpoint directory written by sae.training")
    return {p.name: load(p, device) for p in sorted(root.iterdir()) if p.is_dir()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return tensors, {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                     "python": [py[0], list(py[1]), py[2]]}


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["rng/numpy"].numpy().astype(np.uint32), n[1], n[2], n[3]))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---------------------------------------------------------------------------------------------
class _Trainer:
    def __init__(self, dictionaries, batches: BatchStream, cfg: TrainConfig, sites: Mapping[str, str] | None):
        if isinstance(dictionaries, nn.Module):
            dictionaries = {"sae": dictionaries}
        if not isinstance(dictionaries, Mapping) or not dictionaries:
            raise TypeError("train() takes a Dictionary or a non-empty dict {name: Dictionary}")
        self.dicts: dict[str, Dictionary] = dict(dictionaries)
        self.cfg, self.stream_src = cfg, batches
        self.sites_arg = dict(sites or {})
        unknown = set(self.sites_arg) - set(self.dicts)
        if unknown:
            raise KeyError(f"sites names dictionaries {sorted(unknown)} that are not being trained "
                           f"(dictionaries: {sorted(self.dicts)})")
        for name, d in self.dicts.items():
            if not hasattr(d, "training_loss"):
                raise TypeError(f"{name!r} is a {type(d).__name__}, not a sae Dictionary (no training_loss)")
            if cfg.normalize:
                # fail now rather than after training: folding s = 1 is an exact no-op (x*1 == x)
                try:
                    with torch.no_grad():
                        d.fold_scale(1.0)
                except (AttributeError, NotImplementedError, TypeError) as e:
                    raise TypeError(
                        f"dictionary {name!r} ({type(d).__name__}) cannot fold an input scale ({e}), so "
                        "input normalisation could not be undone on export; set "
                        "TrainConfig(normalize=False)") from None
        self.dist = _Dist(cfg)
        self.device = self.dist.device
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the world size "
                             f"{self.dist.world}: every rank trains on an equal slice")
        self.local = cfg.batch_size // self.dist.world
        self.T = cfg.total_steps
        self.window = cfg.dead_window_tokens
        self.rows = {n: _decoder_rows(d, n) for n, d in self.dicts.items()
                     if getattr(d, "unit_norm_decoder", False)}
        for d in self.dicts.values():
            d.to(self.device)
            d.train()
        self.base_lr = {n: (cfg.lr if cfg.lr is not None else default_lr(d, cfg.optimizer))
                        for n, d in self.dicts.items()}
        self.opts = {n: _make_optimizer(d, cfg, self.base_lr[n], self.device)
                     for n, d in self.dicts.items()}
        self.since_fired = {n: torch.zeros(d.n_latents, dtype=torch.long, device=self.device)
                            for n, d in self.dicts.items()}
        self.scales: dict[str, float] = {}
        self.site_of: dict[str, str] | None = None  # dictionary name -> site key, set at first batch
        self.step = 0
        self.ckpt_root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.last_ckpt: Path | None = None
        mf = cfg.metrics_file or (str(self.ckpt_root / "metrics.jsonl") if self.ckpt_root else None)
        self.metrics_path = Path(mf) if mf else None
        self._acc: dict[str, dict[str, Any]] = {}
        self._acc_steps = 0
        self._t_last, self._step_last = time.perf_counter(), 0

    # --- batches ---------------------------------------------------------------------------
    def _resolve_sites(self, batch: Batch) -> None:
        if isinstance(batch, torch.Tensor):
            if self.sites_arg:
                raise TypeError("sites= was given but the batches are plain tensors; pass dict "
                                "batches {site: Tensor} to train on several sites")
            self.site_of = {n: _TENSOR for n in self.dicts}
            return
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch is a {type(batch).__name__}; expected a Tensor [batch, d_in] or a dict "
                            "{site: Tensor[batch, d_in]}")
        keys = list(batch)
        site_of = {}
        for n in self.dicts:
            if n in self.sites_arg:
                s = self.sites_arg[n]
            elif n in batch:
                s = n
            elif len(keys) == 1:
                s = keys[0]
            else:
                raise KeyError(f"dictionary {n!r}: no batch entry named {n!r} (batch sites: {keys}); "
                               "pass sites={dictionary_name: site} to train()")
            if s not in batch:
                raise KeyError(f"dictionary {n!r} reads site {s!r}, which is not in the batch (sites: {keys})")
            site_of[n] = s
        self.site_of = site_of

    def _site_tensors(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Validated full (global) batch per site: {site: Tensor[batch_size, d_in]}."""
        if self.site_of is None:
            self._resolve_sites(batch)
        out = {}
        for n, s in self.site_of.items():
            if s in out:
                continue
            if s == _TENSOR:
                if not isinstance(batch, torch.Tensor):
                    raise TypeError(f"step {step}: batch is a {type(batch).__name__}; earlier batches were tensors")
                x = batch
            else:
                if not isinstance(batch, Mapping) or s not in batch:
                    raise KeyError(f"step {step}: site {s!r} is missing from the batch")
                x = batch[s]
            d_in = self.dicts[n].d_in
            if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != d_in:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"step {step}: site {self._site_name(s)} batch has shape {shape}; "
                                 f"dictionary {n!r} expects [batch_size={self.cfg.batch_size}, d_in={d_in}]")
            if x.shape[0] != self.cfg.batch_size:
                raise ValueError(f"step {step}: site {self._site_name(s)} batch has {x.shape[0]} rows, "
                                 f"TrainConfig.batch_size is {self.cfg.batch_size}; cut the stream with "
                                 "sae.buffer.rebatch(chunks, batch_size, drop_last=True)")
            # one reduction (NaN and inf propagate through a sum); per-row check only if it fails
            if not bool(torch.isfinite(x.sum(dtype=torch.float32))) and \
                    not bool((finite := torch.isfinite(x).all(dim=1)).all()):
                bad = (~finite).nonzero().flatten()[:5].tolist()
                raise self._nonfinite(
                    f"non-finite values (NaN/inf) in the activations of site {self._site_name(s)} at step "
                    f"{step} (batch rows {bad}{' ...' if (~finite).sum() > 5 else ''})", step, s, None)
            out[s] = x
        return out

    def _site_name(self, s: str) -> str:
        return "(plain tensor batches)" if s == _TENSOR else repr(s)

    def _nonfinite(self, what: str, step: int, site: str | None, name: str | None) -> NonFiniteError:
        keep = (f"the last good checkpoint is {self.last_ckpt} (resume=True continues from it)"
                if self.last_ckpt else "no checkpoint was written before this step")
        return NonFiniteError(f"{what}. Training stopped; {keep}. Check the data for this step, or "
                              "lower the learning rate if the loss diverged.", step,
                              None if site in (None, _TENSOR) else site, name, self.last_ckpt)

    def _is_factory(self) -> bool:
        src = self.stream_src
        return callable(src) and not hasattr(src, "__iter__")

    def _open(self, start: int) -> Iterator[Batch]:
        src = self.stream_src
        if self._is_factory():
            try:
                opened = src(start)
            except TypeError as e:
                raise TypeError(f"batches is callable, so it is called as batches(start_step) -> iterator "
                                f"of batches, and that call failed ({e}); pass an iterable, or a function "
                                "of the first step to produce") from None
            return iter(opened)
        it = iter(src)
        for i in range(start):
            try:
                next(it)
            except StopIteration:
                raise ValueError(f"the batch stream ended after {i} batches while skipping to step {start} "
                                 "to resume; pass a callable start_step -> iterator, or a stream that "
                                 "replays the same batches") from None
        return it

    # --- calibration: input scale and b_dec init -------------------------------------------
    def _calibrate(self) -> Iterator[Batch]:
        cfg = self.cfg
        need_init = cfg.init_from_data and any(callable(getattr(d, "init_from_data", None))
                                               for d in self.dicts.values())
        it = self._open(0)
        if not (cfg.normalize or need_init):
            return it
        n_batches = min(self.T, math.ceil(cfg.calibration_tokens / cfg.batch_size))
        held: deque[Batch] = deque()
        per_site: dict[str, list[torch.Tensor]] = {}
        for i in range(n_batches):
            try:
                b = next(it)
            except StopIteration:
                break
            for s, x in self._site_tensors(b, i).items():
                per_site.setdefault(s, []).append(x)
            held.append(b)
        if not held:
            raise ValueError("the batch stream is empty")
        samples = {s: torch.cat(xs)[:cfg.calibration_tokens] for s, xs in per_site.items()}
        for s, x in samples.items():
            sq = x.double().pow(2).sum(1).mean().item()
            if not sq > 0:
                raise ValueError(f"site {self._site_name(s)}: the calibration sample is all zeros; cannot "
                                 "normalise (set normalize=False)")
            self.scales[s] = math.sqrt(x.shape[1] / sq) if cfg.normalize else 1.0
        if need_init:
            for n, d in self.dicts.items():
                fn = getattr(d, "init_from_data", None)
                if callable(fn):
                    s = self.site_of[n]
                    dtype = next(d.parameters()).dtype
                    try:
                        with torch.no_grad():
                            fn((samples[s].to(self.device, torch.float32) * self.scales[s]).to(dtype))
                    except (NotImplementedError, TypeError) as e:
                        raise TypeError(f"dictionary {n!r}: init_from_data failed ({e}); set "
                                        "TrainConfig(init_from_data=False) for this dictionary type") from None
        del samples, per_site
        if self._is_factory():
            if hasattr(it, "close"):
                it.close()
            return self._open(0)  # re-open: nothing held in memory

        def replay():
            while held:
                yield held.popleft()
            yield from it
        return replay()

    # --- checkpoints -------------------------------------------------------------------------
    def _save(self, step: int) -> None:
        if self.ckpt_root is None:
            return
        root = self.ckpt_root
        final = root / f"step_{step:09d}"
        if not self.dist.main:
            self.last_ckpt = final  # rank 0 writes it
            return
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".step_{step:09d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        opt_meta: dict[str, Any] = {}
        for n, d in self.dicts.items():
            for k, v in d.state_dict().items():
                tensors[f"model/{n}/{k}"] = v.detach().cpu().clone().contiguous()
            sd = self.opts[n].state_dict()
            scalars = {}
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optim/{n}/{pid}/{k}"] = v.detach().cpu().contiguous()
                    else:
                        scalars[f"{pid}/{k}"] = v
            opt_meta[n] = {"param_groups": sd["param_groups"], "scalars": scalars}
            tensors[f"since_fired/{n}"] = self.since_fired[n].cpu()
        rng_t, rng_meta = _rng_state()
        tensors.update(rng_t)
        from safetensors.torch import save_file

        with atomic_path(tmp / STATE_FILE) as p:
            save_file(tensors, str(p))
        for n, d in self.dicts.items():
            self._export(n, d, self.site_of[n], tmp / EXPORT_DIR / n)
        meta = {
            "format": _FORMAT, "step": step, "tokens": step * self.cfg.batch_size, "total_steps": self.T,
            "world_size": self.dist.world, "config": self.cfg.to_dict(),
            "scales": self.scales, "sites": self.site_of,
            "dictionaries": {n: {"architecture": getattr(d, "architecture", type(d).__name__),
                                 "config": d.config() if hasattr(d, "config") else {}}
                             for n, d in self.dicts.items()},
            "optimizer": opt_meta, "rng": rng_meta,
        }
        with atomic_path(tmp / TRAINER_FILE) as p:
            p.write_text(json.dumps(meta, indent=1, default=_json_default))
        _fsync_dir(tmp)
        if final.exists():  # a stale directory from an earlier, abandoned attempt at this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        self.last_ckpt = final
        for old in _checkpoints(root)[:-self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _use_averaged(self, name: str, d: Dictionary) -> None:
        """Schedule-free optimizers: put the averaged weights x into d (the exported model)."""
        opt = self.opts[name]
        if isinstance(opt, ScheduleFreeSignSGD):
            with torch.no_grad():
                for p in d.parameters():
                    p.copy_(opt.averaged(p))

    def _export(self, name: str, d: Dictionary, site: str, directory: Path) -> None:
        """Save a folded copy of d (reads raw activations) with Dictionary.save."""
        out = copy.deepcopy(d)
        opt = self.opts[name]
        if isinstance(opt, ScheduleFreeSignSGD):
            with torch.no_grad():
                for q, p in zip(out.parameters(), d.parameters()):
                    q.copy_(opt.averaged(p))
        s = self.scales.get(site, 1.0)
        if self.cfg.normalize and s != 1.0:
            with torch.no_grad():
                out.fold_scale(s)
        out.save(directory)

    def _load(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        try:
            meta = json.loads((ckpt / TRAINER_FILE).read_text())
            tensors = load_file(str(ckpt / STATE_FILE), device="cpu")
        except Exception as e:  # noqa: BLE001 - report any corruption the same way
            raise ValueError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from an older one") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"checkpoint {ckpt} has format {meta.get('format')}, expected {_FORMAT}")
        saved, now = meta["config"], self.cfg.to_dict()
        defaults = TrainConfig().to_dict()  # fields added after a checkpoint was written
        saved = {k: saved.get(k, defaults[k]) for k in _TRAJECTORY_FIELDS}
        diff = [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in _TRAJECTORY_FIELDS
                if saved[k] != now[k]]
        if diff:
            raise ValueError(f"cannot resume from {ckpt}: the config differs in fields that change training "
                             f"({'; '.join(diff)}); use the original values or a new checkpoint_dir")
        if sorted(meta["dictionaries"]) != sorted(self.dicts):
            raise ValueError(f"cannot resume from {ckpt}: it trained dictionaries {sorted(meta['dictionaries'])}, "
                             f"this run has {sorted(self.dicts)}")
        for n, d in self.dicts.items():
            arch = getattr(d, "architecture", type(d).__name__)
            if meta["dictionaries"][n]["architecture"] != arch:
                raise ValueError(f"cannot resume {n!r} from {ckpt}: architecture "
                                 f"{meta['dictionaries'][n]['architecture']!r} there, {arch!r} here")
            prefix = f"model/{n}/"
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            d.load_state_dict(state)
            om = meta["optimizer"][n]
            opt_state: dict[int, dict[str, Any]] = {}
            oprefix = f"optim/{n}/"
            for k, v in tensors.items():
                if k.startswith(oprefix):
                    pid, key = k[len(oprefix):].split("/", 1)
                    opt_state.setdefault(int(pid), {})[key] = v
            for k, v in om["scalars"].items():
                pid, key = k.split("/", 1)
                opt_state.setdefault(int(pid), {})[key] = v
            self.opts[n].load_state_dict({"state": opt_state, "param_groups": om["param_groups"]})
            self.since_fired[n] = tensors[f"since_fired/{n}"].to(self.device)
        self.scales = {k: float(v) for k, v in meta["scales"].items()}
        self.site_of = dict(meta["sites"])
        self.step = int(meta["step"])
        _set_rng_state(tensors, meta["rng"])
        self.last_ckpt = ckpt

    # --- metrics -----------------------------------------------------------------------------
    def _accumulate(self, name: str, metrics: dict[str, Any]) -> None:
        """Add to the running (sum, count) of each metric since the last log line."""
        acc = self._acc.setdefault(name, {})
        for k, v in metrics.items():
            total, count = acc.get(k, (0.0, 0))
            acc[k] = (total + v, count + 1)

    def _flush(self, step: int, writer, bar, run) -> None:
        """Average the accumulated metrics over the interval and ranks; rank 0 writes them."""
        now = time.perf_counter()
        tok_s = (step - self._step_last) * self.cfg.batch_size / max(now - self._t_last, 1e-9)
        records = []
        for n in self.dicts:
            acc = self._acc.get(n, {})
            keys = sorted(acc)
            vals = torch.stack([torch.as_tensor(acc[k][0], dtype=torch.float64).to(self.device).reshape(())
                                / acc[k][1] for k in keys]) if keys \
                else torch.zeros(0, dtype=torch.float64, device=self.device)
            vals = self.dist.all_reduce_(vals) / self.dist.world
            rec = {"step": step, "tokens": step * self.cfg.batch_size, "dictionary": n,
                   "site": None if self.site_of[n] == _TENSOR else self.site_of[n],
                   "lr": lr_at(step - 1, self.base_lr[n], self.T, self.cfg.warmup, self.cfg.lr_decay_fraction),
                   "tokens_per_s": tok_s}
            rec.update({k: float(v) for k, v in zip(keys, vals.tolist())})
            rec["dead_fraction"] = float((self.since_fired[n] >= self.window).float().mean())
            records.append(rec)
        self._acc, self._acc_steps = {}, 0
        self._t_last, self._step_last = now, step
        if not self.dist.main:
            return
        if writer is not None:
            for rec in records:
                writer.write(json.dumps(rec) + "\n")
            writer.flush()
        if bar is not None and records:
            r = records[0]
            bar.set_postfix({k: f"{r[k]:.4g}" for k in ("loss", "fvu", "l0", "dead_fraction") if k in r})
        if run is not None:
            run.log({f"{r['dictionary']}/{k}": v for r in records for k, v in r.items()
                     if isinstance(v, (int, float)) and k not in ("step", "tokens")}, step=step)

    def _open_metrics(self, start: int):
        if not self.dist.main or self.metrics_path is None:
            return None
        path = self.metrics_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if start > 0 and path.exists():
            # drop lines a killed run wrote after its last checkpoint; they are recomputed
            kept = [ln for ln in path.read_text().splitlines() if ln.strip()
                    and json.loads(ln).get("step", 0) <= start]
            with atomic_path(path) as p:
                p.write_text("".join(ln + "\n" for ln in kept))
        elif path.exists():
            path.unlink()
        return open(path, "a", buffering=1)

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> dict[str, Dictionary]:
        """Train (with cfg.matmul_precision in force, restored afterwards)."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.cfg.matmul_precision)
        try:
            return self._run()
        finally:
            torch.set_float32_matmul_precision(previous)

    def _run(self) -> dict[str, Dictionary]:
        cfg = self.cfg
        resumed = False
        if self.ckpt_root is not None:
            if self.dist.main and self.ckpt_root.is_dir():  # leftovers of runs killed while saving
                for tmp in self.ckpt_root.glob(".step_*.tmp-*"):
                    shutil.rmtree(tmp, ignore_errors=True)
            ckpt = latest_checkpoint(self.ckpt_root)
            if ckpt is not None and not cfg.resume:
                raise FileExistsError(f"{self.ckpt_root} already holds checkpoints (newest: {ckpt.name}); pass "
                                      "TrainConfig(resume=True) to continue that run, or use another checkpoint_dir")
            if ckpt is not None:
                self._load(ckpt)
                resumed = True
        if resumed:
            stream = self._open(self.step)
        else:
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed % 2 ** 32)
            random.seed(cfg.seed)
            stream = self._calibrate()
            for d in self.dicts.values():  # every rank starts from rank 0's weights
                for t in list(d.parameters()) + list(d.buffers()):
                    self.dist.broadcast_(t.data)
        writer = self._open_metrics(self.step)
        bar = run = None
        if self.dist.main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.T * cfg.batch_size, initial=self.step * cfg.batch_size, unit="tok",
                       unit_scale=True, dynamic_ncols=True, desc="train")
        if self.dist.main and cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("TrainConfig.wandb is set but wandb is not installed: pip install wandb, "
                                  "or leave wandb=None") from None
            run = wandb.init(project=cfg.wandb, config=cfg.to_dict(), resume="allow")
        self._t_last, self._step_last = time.perf_counter(), self.step
        try:
            while self.step < self.T:
                try:
                    batch = next(stream)
                except StopIteration:
                    if self.step == 0:
                        raise ValueError("the batch stream is empty") from None
                    warnings.warn(f"the batch stream ended after {self.step} of {self.T} steps; stopping early "
                                  "(the learning-rate schedule assumed the full length)")
                    break
                done = self.step + 1
                ckpt_now = self.ckpt_root is not None and cfg.checkpoint_every > 0 \
                    and done % cfg.checkpoint_every == 0 and done < self.T
                log_now = done % cfg.log_every == 0 or ckpt_now or done == self.T
                self._train_step(batch, log_now)
                self.step = done
                if bar is not None:
                    bar.update(cfg.batch_size)
                if log_now:
                    self._flush(self.step, writer, bar, run)
                if ckpt_now:
                    self._save(self.step)
            if self._acc_steps:
                self._flush(self.step, writer, bar, run)
            if self.ckpt_root is not None and (self.last_ckpt is None
                                               or int(self.last_ckpt.name[5:]) != self.step):
                self._save(self.step)
            self._finish()
            self.dist.barrier()  # rank 0 has written everything before any rank returns
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            if run is not None:
                run.finish()
            self.dist.close()
        return self.dicts

    def _finish(self) -> None:
        """Fold the input scales into the returned dictionaries; export them next to the checkpoints."""
        for n, d in self.dicts.items():
            self._use_averaged(n, d)
            s = self.scales.get(self.site_of[n], 1.0) if self.site_of else 1.0
            if self.cfg.normalize and s != 1.0:
                with torch.no_grad():
                    d.fold_scale(s)
            if self.dist.main and self.ckpt_root is not None:
                d.save(self.ckpt_root / EXPORT_DIR / n)
            d.eval()

    def _train_step(self, batch: Batch, log_now: bool) -> None:
        cfg, t = self.cfg, self.step
        xs_full = self._site_tensors(batch, t)
        lo, hi = self.dist.rank * self.local, (self.dist.rank + 1) * self.local
        xs, var = {}, {}
        for s, x in xs_full.items():
            xs[s] = x[lo:hi].to(self.device, torch.float32, non_blocking=True) * self.scales.get(s, 1.0)
        losses, fired = {}, {}
        for n, d in self.dicts.items():
            x = xs[self.site_of[n]]
            dtype = next(d.parameters()).dtype
            if x.dtype != dtype:
                x = x.to(dtype)
            state = TrainState(step=t, total_steps=self.T, dead_mask=self.since_fired[n] >= self.window)
            d.last_fired = None
            loss, metrics = d.training_loss(x, state)
            metrics = dict(metrics)
            f = getattr(d, "last_fired", None)  # [n_latents] bool, set by training_loss
            if f is None or ("l0" not in metrics and log_now):
                # fallback for objectives that do not report them: one more (no-grad) encode
                with torch.no_grad():
                    active = d.encode(x) != 0                                   # [batch, n_latents]
                if f is None:
                    f = active.any(0)
                if "l0" not in metrics and log_now:
                    metrics["l0"] = active.sum(1).float().mean()
            fired[n] = f.reshape(-1).to(self.device)
            m = {k: _metric_value(v, k, n) for k, v in metrics.items()}
            if "mse" in m and "fvu" not in m:  # FVU = E||x - x_hat||^2 / E||x - mean x||^2 on the batch
                s = self.site_of[n]
                if s not in var:
                    xv = xs[s]
                    var[s] = (xv - xv.mean(0)).pow(2).sum(1).mean().clamp_min(1e-30)
                m["fvu"] = m["mse"] / var[s]
            m["loss"] = loss.detach().float()
            self._accumulate(n, m)
            losses[n] = loss
        total = sum(losses.values())
        total.backward()

        params = {n: [p for p in d.parameters() if p.requires_grad] for n, d in self.dicts.items()}
        if self.dist.on:
            self._all_reduce_grads(params, losses, fired)
        else:
            self._loss_now = {n: l.detach() for n, l in losses.items()}
        norms = {}
        for n, d in self.dicts.items():
            if n in self.rows:
                _remove_parallel_grad(self.rows[n])
            grads = [p for p in params[n] if p.grad is not None]
            norms[n] = torch.nn.utils.clip_grad_norm_(grads, cfg.grad_clip if cfg.grad_clip else float("inf"))
            self._accumulate(n, {"grad_norm": norms[n].detach().float()})
        # one host sync per step: are all losses and gradient norms finite?
        checks = torch.stack([torch.stack([self._loss_now[n].float(), norms[n].float()]) for n in self.dicts])
        ok = torch.isfinite(checks).tolist()
        for (n, (loss_ok, grad_ok)) in zip(self.dicts, ok):
            if not (loss_ok and grad_ok):
                what = "loss" if not loss_ok else "gradient norm"
                raise self._nonfinite(f"non-finite {what} of dictionary {n!r} (site "
                                      f"{self._site_name(self.site_of[n])}) at step {t}", t, self.site_of[n], n)
        for n, d in self.dicts.items():
            lr = lr_at(t, self.base_lr[n], self.T, cfg.warmup, cfg.lr_decay_fraction)
            opt = self.opts[n]
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            if n in self.rows:
                _renormalise(self.rows[n])
            sf = self.since_fired[n]
            sf += cfg.batch_size
            sf[fired[n].bool()] = 0
        self._acc_steps += 1

    def _all_reduce_grads(self, params, losses, fired) -> None:
        """Sum grads, has-grad flags, losses and fired masks over ranks in one all_reduce; average."""
        parts = []
        for n in self.dicts:
            for p in params[n]:
                parts.append(p.grad.reshape(-1).float() if p.grad is not None
                             else torch.zeros(p.numel(), device=self.device))
            parts.append(torch.tensor([float(p.grad is not None) for p in params[n]], device=self.device))
            parts.append(losses[n].detach().float().reshape(1))
            parts.append(fired[n].float().reshape(-1))
        flat = self.dist.all_reduce_(torch.cat(parts))
        W, i = float(self.dist.world), 0
        self._loss_now = {}
        for n in self.dicts:
            sizes = [p.numel() for p in params[n]]
            grads = []
            for p, k in zip(params[n], sizes):
                grads.append(flat[i:i + k])
                i += k
            has = flat[i:i + len(sizes)]
            i += len(sizes)
            for p, g, h in zip(params[n], grads, has.tolist()):
                if h > 0:
                    p.grad = (g / W).view_as(p).to(p.dtype).clone()
                else:
                    p.grad = None
            self._loss_now[n] = flat[i] / W
            i += 1
            k = fired[n].numel()
            fired[n] = flat[i:i + k] > 0
            i += k


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} to a checkpoint's JSON")


def train(dictionaries: Dictionary | Mapping[str, Dictionary], batches: BatchStream,
          cfg: TrainConfig | None = None, *, sites: Mapping[str, str] | None = None) -> dict[str, Dictionary]:
    """Train `dictionaries` on `batches`; return them ({name: Dictionary}, trained, scales folded in).

    dictionaries: one Dictionary (returned under the name "sae") or {name: Dictionary}: one per
        site, or several on one site (a sweep); all see every batch, each has its own Adam.
    batches: a callable `start_step -> iterator` (resumable) or an iterable of global batches,
        Tensor [batch_size, d_in] or {site: Tensor[batch_size, d_site]} (module docstring).
    sites: {dictionary name: site key} when names differ from the batch's site keys.

    The dictionaries are modified in place (trained, moved to cfg.device, folded, eval mode).
    Raises NonFiniteError on NaN/inf, FileExistsError when checkpoint_dir holds another run and
    resume is False, ValueError on batches of the wrong shape or a config that does not match the
    checkpoint being resumed."""
    return _Trainer(dictionaries, batches, cfg or TrainConfig(), sites).run()
