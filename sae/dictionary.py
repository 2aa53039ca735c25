"""The one interface every dictionary shares: SAEs of every architecture and every baseline.

A dictionary maps an activation x [..., d_in] to codes c [..., n_latents] and back:

    x_hat = decode(encode(x)) = c @ W_dec + b_dec

`W_dec` [n_latents, d_in] holds one feature direction per row. Every architecture (ReLU+L1,
TopK, BatchTopK, JumpReLU, Gated) and every baseline (PCA, ICA, neurons, random) is a
`Dictionary`, so benchmarks compare them on one code path. Files: `cfg.json` + `model.safetensors`
in a directory, written atomically; loading never unpickles.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

ARCHITECTURES: dict[str, type["Dictionary"]] = {}

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class TrainState:
    """What the trainer tells a dictionary's training objective about the run so far."""

    step: int = 0
    total_steps: int = 1
    dead_mask: torch.Tensor | None = None  # [n_latents] bool: no activation within the dead window

    @property
    def progress(self) -> float:  # in [0, 1], for warmups of sparsity coefficients
        return min(1.0, self.step / max(1, self.total_steps))


def register(cls: type["Dictionary"]) -> type["Dictionary"]:
    """Class decorator: make an architecture loadable by its `architecture` name."""
    ARCHITECTURES[cls.architecture] = cls
    return cls


class Dictionary(nn.Module):
    """Base class. Subclasses set `architecture`, implement `encode`/`decode`, and list their
    constructor keyword arguments in `config()` so that `cls(**config())` rebuilds them."""

    architecture: ClassVar[str] = "base"

    def __init__(self, d_in: int, n_latents: int):
        super().__init__()
        if d_in <= 0 or n_latents <= 0:
            raise ValueError(f"d_in and n_latents must be positive, got d_in={d_in}, n_latents={n_latents}")
        self.d_in = int(d_in)
        self.n_latents = int(n_latents)

    # --- the interface -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., n_latents]
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # [..., n_latents] -> [..., d_in]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @property
    def W_dec(self) -> torch.Tensor:  # [n_latents, d_in]
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "n_latents": self.n_latents}

    # --- training contract (used by sae.train) ----------------------------------------------
    #: True when decoder rows are kept at unit norm: the trainer removes the gradient component
    #: parallel to each row before the step and renormalises the rows after it.
    unit_norm_decoder: ClassVar[bool] = True

    def training_loss(self, x: torch.Tensor, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        """Objective on a batch x [batch, d_in]: (scalar loss, metrics to log).

        Default: squared error summed over d_in, averaged over the batch. Architectures add
        their sparsity or auxiliary terms."""
        mse = (self(x) - x).pow(2).sum(-1).mean()
        return mse, {"mse": mse.item()}

    # --- files ---------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write `cfg.json` and `model.safetensors` into `directory` (each written atomically)."""
        from safetensors.torch import save_file

        from .io import atomic_path

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp))
        cfg = {"architecture": self.architecture, **self.config()}
        with atomic_path(directory / CONFIG_FILE) as tmp:
            tmp.write_text(json.dumps(cfg, indent=2))
        return directory


def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a dictionary saved by `Dictionary.save` (safetensors only, never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: a saved dictionary is a directory holding "
                                    f"{CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is corrupted") from None
    name = cfg.pop("architecture", None)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} in {cfg_path}; known: {sorted(ARCHITECTURES)}")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is truncated or corrupted ({e}); retrain or re-save it") from None
    model = ARCHITECTURES[name](**cfg)
    model.load_state_dict(state)
    return model.to(device)
