"""Checkpoints: everything a resumed run needs to continue bit-exactly, written so that a run
killed at any moment leaves only complete checkpoints.

    <checkpoint_dir>/step_NNNNNNNNN/state.safetensors   unfolded weights, optimizer state, dead-latent
                                                        counters, RNG states (tensors)
    <checkpoint_dir>/step_NNNNNNNNN/trainer.json        step, config, input scales, sites, optimizer
                                                        scalars, architectures
    <checkpoint_dir>/step_NNNNNNNNN/dictionaries/<name> folded exports, loadable with `sae.load`

Each directory is built under a temporary name, fsynced and renamed into place; the newest
`keep_checkpoints` are kept. `save`, `load`, `export` and `use_averaged` act on the loop's trainer
`tr` (its dictionaries, optimizers, counters, scales and config).
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dictionary import Dictionary
from ..io import atomic_path
from .config import _TRAJECTORY_FIELDS, TrainConfig
from .optim import ScheduleFreeSignSGD

STATE_FILE, TRAINER_FILE, EXPORT_DIR = "state.safetensors", "trainer.json", "dictionaries"
_FORMAT = 1


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
    from ..dictionary import load

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


def save(tr, step: int) -> None:
    """Write checkpoint step_NNNNNNNNN of the trainer `tr` (rank 0), atomically."""
    if tr.ckpt_root is None:
        return
    root = tr.ckpt_root
    final = root / f"step_{step:09d}"
    if not tr.dist.main:
        tr.last_ckpt = final  # rank 0 writes it
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".step_{step:09d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    opt_meta: dict[str, Any] = {}
    for n, d in tr.dicts.items():
        for k, v in d.state_dict().items():
            tensors[f"model/{n}/{k}"] = v.detach().cpu().clone().contiguous()
        sd = tr.opts[n].state_dict()
        scalars = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim/{n}/{pid}/{k}"] = v.detach().cpu().contiguous()
                else:
                    scalars[f"{pid}/{k}"] = v
        opt_meta[n] = {"param_groups": sd["param_groups"], "scalars": scalars}
        tensors[f"since_fired/{n}"] = tr.since_fired[n].cpu()
    rng_t, rng_meta = _rng_state()
    tensors.update(rng_t)
    from safetensors.torch import save_file

    with atomic_path(tmp / STATE_FILE) as p:
        save_file(tensors, str(p))
    for n, d in tr.dicts.items():
        export(tr, n, d, tr.site_of[n], tmp / EXPORT_DIR / n)
    meta = {
        "format": _FORMAT, "step": step, "tokens": step * tr.cfg.batch_size, "total_steps": tr.T,
        "world_size": tr.dist.world, "config": tr.cfg.to_dict(),
        "scales": tr.scales, "sites": tr.site_of,
        "dictionaries": {n: {"architecture": getattr(d, "architecture", type(d).__name__),
                             "config": d.config() if hasattr(d, "config") else {}}
                         for n, d in tr.dicts.items()},
        "optimizer": opt_meta, "rng": rng_meta,
    }
    with atomic_path(tmp / TRAINER_FILE) as p:
        p.write_text(json.dumps(meta, indent=1, default=_json_default))
    _fsync_dir(tmp)
    if final.exists():  # a stale directory from an earlier, abandoned attempt at this step
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    tr.last_ckpt = final
    for old in _checkpoints(root)[:-tr.cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def use_averaged(tr, name: str, d: Dictionary) -> None:
    """Schedule-free optimizers: put the averaged weights x into d (the exported model)."""
    opt = tr.opts[name]
    if isinstance(opt, ScheduleFreeSignSGD):
        with torch.no_grad():
            for p in d.parameters():
                p.copy_(opt.averaged(p))


def export(tr, name: str, d: Dictionary, site: str, directory: Path) -> None:
    """Save a folded copy of d (reads raw activations) with Dictionary.save."""
    out = copy.deepcopy(d)
    opt = tr.opts[name]
    if isinstance(opt, ScheduleFreeSignSGD):
        with torch.no_grad():
            for q, p in zip(out.parameters(), d.parameters()):
                q.copy_(opt.averaged(p))
    s = tr.scales.get(site, 1.0)
    if tr.cfg.normalize and s != 1.0:
        with torch.no_grad():
            out.fold_scale(s)
    out.save(directory)


def load(tr, ckpt: Path) -> None:
    """Restore the trainer `tr` from checkpoint directory `ckpt` (checks that it is the same run)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((ckpt / TRAINER_FILE).read_text())
        tensors = load_file(str(ckpt / STATE_FILE), device="cpu")
    except Exception as e:  # noqa: BLE001 - report any corruption the same way
        raise ValueError(f"checkpoint {ckpt} is unreadable ({e}); delete it to resume from an older one") from None
    if meta.get("format") != _FORMAT:
        raise ValueError(f"checkpoint {ckpt} has format {meta.get('format')}, expected {_FORMAT}")
    saved, now = meta["config"], tr.cfg.to_dict()
    defaults = TrainConfig().to_dict()  # fields added after a checkpoint was written
    saved = {k: saved.get(k, defaults[k]) for k in _TRAJECTORY_FIELDS}
    diff = [f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in _TRAJECTORY_FIELDS
            if saved[k] != now[k]]
    if diff:
        raise ValueError(f"cannot resume from {ckpt}: the config differs in fields that change training "
                         f"({'; '.join(diff)}); use the original values or a new checkpoint_dir")
    if sorted(meta["dictionaries"]) != sorted(tr.dicts):
        raise ValueError(f"cannot resume from {ckpt}: it trained dictionaries {sorted(meta['dictionaries'])}, "
                         f"this run has {sorted(tr.dicts)}")
    for n, d in tr.dicts.items():
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
        tr.opts[n].load_state_dict({"state": opt_state, "param_groups": om["param_groups"]})
        tr.since_fired[n] = tensors[f"since_fired/{n}"].to(tr.device)
    tr.scales = {k: float(v) for k, v in meta["scales"].items()}
    tr.site_of = dict(meta["sites"])
    tr.step = int(meta["step"])
    _set_rng_state(tensors, meta["rng"])
    tr.last_ckpt = ckpt


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"cannot write {type(o).__name__} to a checkpoint's JSON")

