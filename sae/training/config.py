"""`TrainConfig`: the trainer's hyper-parameters and run plumbing (flat, simple types, so the
fields double as CLI arguments); `to_dict()` is what checkpoints record."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("adam", "signsgd")

# Config fields that change the training trajectory: a resumed run must use the same values.
_TRAJECTORY_FIELDS = ("total_tokens", "batch_size", "lr", "warmup_steps", "decay_fraction", "optimizer",
                      "betas", "eps", "momentum", "matmul_precision", "grad_clip", "dead_window_fraction",
                      "dead_window_min_tokens", "dead_window_max_tokens", "normalize", "calibration_tokens",
                      "init_from_data", "seed", "resample_dead", "resample_every", "resample_until")


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
    resample_dead: bool = True            # re-initialise dead latents of dictionaries that define
                                          # resample_dead (ReLU SAEs: Bricken et al. 2023); see sae.training.resample
    resample_every: int | None = None     # steps between resampling checks; None: one dead window
    resample_until: float = 0.5           # no resampling after this fraction of training
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
        every = self.resample_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"TrainConfig.resample_every must be a positive int or None, got {self.resample_every!r}")
        if not 0.0 <= self.resample_until <= 1.0:
            raise ValueError(f"TrainConfig.resample_until must be in [0, 1], got {self.resample_until}")
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

    @property
    def resample_interval(self) -> int:
        """Steps between dead-latent resampling checks (`resample_every`, default one dead window)."""
        if self.resample_every is not None:
            return self.resample_every
        return max(1, self.dead_window_tokens // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

