"""The one interface every dictionary shares: SAEs of every architecture and every baseline.

A dictionary maps an activation x [..., d_in] to codes c [..., n_latents] and back:

    x_hat = decode(encode(x)) = c @ W_dec + b_dec

`W_dec` [n_latents, d_in] holds one feature direction per row. Every architecture (ReLU+L1,
TopK, BatchTopK, JumpReLU, Gated; `sae.architectures`) and every baseline (PCA, ICA, neurons,
random; `sae.baselines`) is a `Dictionary`, so benchmarks compare them on one code path. Files:
`cfg.json` + `model.safetensors` in a directory, written atomically; loading never unpickles.

Shared conventions of the SAE architectures (the papers' notation, our storage):

    W_enc [n_latents, d_in]   row i = encoder direction of latent i  (pre = W_enc (x - b_dec) + b_enc)
    W_dec [n_latents, d_in]   row i = decoder direction of latent i  (x_hat = c W_dec + b_dec)

Initialisation helpers shared by the architectures live here:

- tied init (Gao et al. 2024 §A.1; Anthropic April-2024 update): random decoder rows scaled to
  norm 1 (or 0.1), W_enc = W_dec^T (in our storage: the same [n_latents, d_in] matrix);
- `init_from_data`: b_dec := mean or geometric median of a sample (Weiszfeld iterations), the
  "b_pre" initialisation of Gao et al. 2024 and Bricken et al. 2023;
- activation normalisation (Anthropic April-2024 update): train on s*x with
  s = sqrt(d_in / E||x||^2) (`activation_scale`), then `fold_scale(s)` rewrites the weights so
  the folded model on raw x gives the same codes and x_hat/s:

      W_enc <- s W_enc,   b_dec <- b_dec / s,   W_dec <- W_dec / s     (codes, b_enc, thresholds unchanged)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from . import metrics
from .metrics import fvu  # noqa: F401 - the package's one FVU, importable from here as before

ARCHITECTURES: dict[str, type["Dictionary"]] = {}

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class TrainState:
    """What the trainer tells a dictionary's training objective about the run so far."""

    step: int = 0
    total_steps: int = 1
    dead_mask: torch.Tensor | None = None  # [n_latents] bool: no activation within the dead window
    #: data parallel training: sums a tensor over ranks (in place, returns it); None in one process.
    #: Objectives with batch-level statistics (TopK's FVU and AuxK normalisers) reduce them with it,
    #: so every rank's loss is its slice of the single-process loss of the global batch.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def progress(self) -> float:  # in [0, 1], for warmups of sparsity coefficients
        return min(1.0, self.step / max(1, self.total_steps))


def register(cls: type["Dictionary"]) -> type["Dictionary"]:
    """Class decorator: make an architecture loadable by its `architecture` name."""
    name = cls.architecture
    if name in ARCHITECTURES and ARCHITECTURES[name] is not cls:
        existing = ARCHITECTURES[name]
        if (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"architecture name {name!r} is already registered by "
                             f"{existing.__module__}.{existing.__qualname__}")
    ARCHITECTURES[name] = cls
    return cls


def _ensure_registered() -> None:
    """Import the modules that register the built-in architectures and baselines."""
    import importlib

    for mod in ("sae.architectures", "sae.baselines"):
        importlib.import_module(mod)


# --- shared helpers ---------------------------------------------------------------------------
@torch.no_grad()
def geometric_median(x: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of x [n, d] (Weiszfeld's algorithm, computed in float64).

    argmin_m sum_i ||x_i - m||; iterate m <- sum_i w_i x_i / sum_i w_i with w_i = 1/||x_i - m||,
    starting from the mean, until m moves less than `tol` (relative to the data scale)."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median expects a non-empty [n, d] tensor, got shape {tuple(x.shape)}")
    pts = x.detach().double()
    m = pts.mean(0)
    scale = float(pts.std()) + 1e-12
    for _ in range(max_iter):
        dist = (pts - m).norm(dim=1).clamp_min(1e-12 * scale)
        w = 1.0 / dist
        new = (w[:, None] * pts).sum(0) / w.sum()
        moved = float((new - m).norm())
        m = new
        if moved < tol * scale:
            break
    return m.to(x.dtype)


@torch.no_grad()
def activation_scale(x: torch.Tensor) -> float:
    """The scalar s with E||s x||^2 = d_in (Anthropic April-2024 update), estimated on x [..., d_in]."""
    if x.numel() == 0:
        raise ValueError("activation_scale needs a non-empty sample")
    mean_sq = float(x.detach().double().pow(2).sum(-1).mean())
    if not math.isfinite(mean_sq) or mean_sq <= 0:
        raise ValueError(f"cannot normalise activations whose mean squared norm is {mean_sq}")
    return math.sqrt(x.shape[-1] / mean_sq)


def random_unit_rows(n: int, d: int, norm: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n, d] Gaussian rows rescaled to norm `norm` (decoder initialisation)."""
    w = torch.randn(n, d, generator=generator)
    return w / w.norm(dim=1, keepdim=True) * norm


def check_x(x: torch.Tensor, d_in: int, who: str) -> None:
    if x.shape[-1] != d_in:
        raise ValueError(f"{who} expects inputs [..., d_in={d_in}], got shape {tuple(x.shape)}")


class Dictionary(nn.Module):
    """Base class. Subclasses set `architecture`, implement `encode`/`decode`, expose `W_dec`
    [n_latents, d_in] (an `nn.Parameter`/buffer named `W_dec`, or a property), and list their
    constructor keyword arguments in `config()` so that `cls(**config())` rebuilds them."""

    architecture: ClassVar[str] = "base"
    #: the decoder matrix [n_latents, d_in]: a parameter or buffer named `W_dec`, or a property.
    W_dec: torch.Tensor

    def __init__(self, d_in: int, n_latents: int):
        super().__init__()
        if int(d_in) <= 0 or int(n_latents) <= 0:
            raise ValueError(f"d_in and n_latents must be positive, got d_in={d_in}, n_latents={n_latents}")
        self.d_in = int(d_in)
        self.n_latents = int(n_latents)
        #: [n_latents] bool (detached): latents that were active on the last `training_loss` batch,
        #: so a trainer can track dead latents without a second encode. None before the first call.
        self.last_fired: torch.Tensor | None = None

    # --- the interface -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [..., d_in] -> [..., n_latents]
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:  # [..., n_latents] -> [..., d_in]
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def encode_and_reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [..., n_latents], x_hat [..., d_in]) in one pass. Dictionaries with k-sparse codes
        (`encode_topk` + `decode_sparse`) decode from the k active latents instead of a dense
        [.., n_latents] x [n_latents, d_in] product."""
        sparse_encode = getattr(self, "encode_topk", None)
        if sparse_encode is None:
            codes = self.encode(x)
            return codes, self.decode(codes)
        values, indices = sparse_encode(x)  # [..., k]
        codes = torch.zeros(*values.shape[:-1], self.n_latents, dtype=values.dtype, device=values.device)
        return codes.scatter_(-1, indices, values), self.decode_sparse(values, indices)

    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "n_latents": self.n_latents}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    # --- training contract (used by sae.training) ----------------------------------------------
    #: True when decoder rows are kept at unit norm: the trainer removes the gradient component
    #: parallel to each row of `W_dec` before the step and renormalises the rows after it.
    #: Architectures where this is a choice override it per instance.
    unit_norm_decoder: ClassVar[bool] = True

    def training_loss(self, x: torch.Tensor, state: TrainState) -> tuple[torch.Tensor, dict[str, float]]:
        """Objective on a batch x [batch, d_in]: (scalar loss, metrics to log).

        Default: the squared error summed over d_in, averaged over the batch (`sq_err_per_token`,
        `sae.metrics`). Architectures add their sparsity or auxiliary terms. Implementations set
        `self.last_fired`."""
        codes = self.encode(x)
        x_hat = self.decode(codes)
        self.last_fired = (codes != 0).any(0).detach()
        loss = metrics.sq_err_per_token(x, x_hat)
        with torch.no_grad():
            fvu = metrics.fvu(x, x_hat)
        return loss, {"sq_err_per_token": loss.item(), "fvu": fvu.item()}

    # --- initialisation and normalisation -------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x_sample: torch.Tensor, method: str = "geometric_median") -> "Dictionary":
        """Set b_dec from a sample x_sample [n, d_in]: its `"geometric_median"` (Gao et al. 2024)
        or its `"mean"` (sparsify's first-batch mean). Returns self."""
        b_dec = getattr(self, "b_dec", None)
        if not isinstance(b_dec, torch.Tensor):
            raise TypeError(f"{type(self).__name__} has no decoder bias b_dec to initialise "
                            "(baselines are fitted with .fit(x) instead)")
        check_x(x_sample, self.d_in, f"{type(self).__name__}.init_from_data")
        x2 = x_sample.reshape(-1, self.d_in)
        if method == "geometric_median":
            value = geometric_median(x2)
        elif method == "mean":
            value = x2.double().mean(0)
        else:
            raise ValueError(f"unknown b_dec init method {method!r}; valid: 'geometric_median', 'mean'")
        b_dec.copy_(value.to(b_dec))
        return self

    #: names of parameters multiplied by s (input side) and divided by s (output side) in fold_scale
    _fold_in: ClassVar[tuple[str, ...]] = ("W_enc",)
    _fold_out: ClassVar[tuple[str, ...]] = ("W_dec", "b_dec")

    @torch.no_grad()
    def fold_scale(self, s: float) -> "Dictionary":
        """Fold an input scaling x -> s*x into the weights (in place; returns self).

        Before: the model was trained on s*x. After: encode(x_raw) equals the old encode(s*x_raw)
        and decode(c) equals the old decode(c)/s, so the folded model works on raw activations."""
        s = float(s)
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"fold_scale needs a finite positive scale, got {s}")
        for name in self._fold_in + self._fold_out:
            if not isinstance(getattr(self, name, None), torch.Tensor):
                raise NotImplementedError(f"{type(self).__name__} cannot fold an input scale "
                                          f"(it has no tensor {name!r})")
        if s == 1.0:
            return self  # exact no-op
        for name in self._fold_in:
            getattr(self, name).mul_(s)
        for name in self._fold_out:
            getattr(self, name).div_(s)
        return self

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


def build(architecture: str, **config: Any) -> Dictionary:
    """Construct a registered dictionary by name, e.g. `build("topk", d_in=576, n_latents=2304, k=32)`."""
    _ensure_registered()
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**config)


def load(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Dictionary:
    """Load a dictionary saved by `Dictionary.save` (safetensors only, never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _ensure_registered()
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
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    name = cfg.pop("architecture", None)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} in {cfg_path}; known: {sorted(ARCHITECTURES)}")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights_path} is truncated or corrupted ({e}); retrain or re-save it") from None
    try:
        model = ARCHITECTURES[name](**cfg)
    except TypeError as e:
        raise ValueError(f"{cfg_path} does not match the {name!r} constructor ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{weights_path} does not match the configuration in {cfg_path}: {e}") from None
    return model.to(device)
