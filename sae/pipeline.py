"""Train dictionaries at many sites of a model in one harvest pass, cached and resumable.

    dicts = train_at_sites(model, corpus, ["resid.*"], architecture="topk", expansion=4, k=32,
                           cfg=TrainConfig(total_tokens=262_144, batch_size=1024), directory=...)

Each batch of contexts is harvested once for every site (one traced forward that stops after the
deepest site), rows go through a `ShufflingBuffer` (bounded memory: `buffer_tokens` rows per
site), and `sae.train` trains every site's dictionary on the same global batches. `directory`
holds the run: trainer checkpoints (a killed run resumes from the newest one; the stream is
re-harvested deterministically up to that step) and, when done, one saved dictionary per site
plus `run.json` describing the run. A later call with the same model, corpus and settings loads
the saved dictionaries instead of training again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .buffer import ShufflingBuffer
from .dictionary import Dictionary, build, load
from .harvesting import as_token_batch, harvest
from .io import atomic_path
from .sites import Site, resolve_sites
from .training import TrainConfig, train

RUN_FILE = "run.json"
# TrainConfig fields that do not change the result: left out of the cache key.
_PLUMBING = {"device", "checkpoint_dir", "checkpoint_every", "keep_checkpoints", "resume", "log_every",
             "metrics_file", "progress", "wandb", "dist_backend"}
# fields that only act on architectures with dead-latent resampling (ReLU): left out otherwise, so
# the runs of other architectures keep their keys
_RESAMPLING = {"resample_dead", "resample_every", "resample_until"}


def _dirname(site: str) -> str:
    return site.replace(".", "_")


def run_key(model: Any, ids: torch.Tensor, sites: list[Site], architecture: str, dict_kwargs: dict,
            cfg: TrainConfig, buffer_tokens: int, exclude_first: bool) -> dict[str, Any]:
    """Everything that determines the trained dictionaries (compared to reuse a finished run)."""
    return {"model": model.name, "corpus_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "corpus_shape": list(ids.shape), "sites": [s.name for s in sites], "architecture": architecture,
            "dictionary": dict_kwargs, "buffer_tokens": buffer_tokens, "exclude_first": exclude_first,
            "train": {k: v for k, v in cfg.to_dict().items()
                      if k not in _PLUMBING and (k not in _RESAMPLING or _resamples(architecture))}}


def _resamples(architecture: str) -> bool:
    from .dictionary import ARCHITECTURES, _ensure_registered

    _ensure_registered()
    return callable(getattr(ARCHITECTURES.get(architecture), "resample_dead", None))


def train_at_sites(model: Any, corpus: Any, sites: str | Iterable[str], *, architecture: str = "topk",
                   expansion: int = 4, cfg: TrainConfig | None = None, directory: str | os.PathLike | None = None,
                   harvest_batch_size: int = 8, buffer_tokens: int = 16_384, exclude_first: bool = True,
                   progress: bool = True, **dict_kwargs: Any) -> dict[str, Dictionary]:
    """{site: trained Dictionary} for every site (names or globs), `expansion` x width latents.

    dict_kwargs go to the architecture (e.g. k=32 for TopK). With `directory`, a finished run with
    the same settings is loaded instead of retrained, and an interrupted one resumes."""
    cfg = cfg or TrainConfig()
    chosen = resolve_sites(model, sites)
    ids, mask = as_token_batch(model, corpus)
    usable = int(mask.sum()) - (ids.shape[0] if exclude_first else 0)
    if usable < cfg.total_tokens:
        raise ValueError(f"the corpus has {usable:,} usable tokens but total_tokens={cfg.total_tokens:,}; "
                         f"load more (load_corpus(..., max_tokens=...)) or lower total_tokens")
    key = run_key(model, ids, chosen, architecture, dict_kwargs | {"expansion": expansion}, cfg,
                  buffer_tokens, exclude_first)
    root = Path(directory) if directory is not None else None
    if root is not None:
        if _recorded_run(root, key):
            return {site: load(root / _dirname(site)) for site in key["sites"]}
        _write_run(root, key, complete=False)
        cfg = dataclasses.replace(cfg, checkpoint_dir=str(root / "checkpoints"), resume=True)
    with torch.random.fork_rng(devices=[]):  # initialisation is deterministic given cfg.seed
        torch.manual_seed(cfg.seed)
        dicts = {s.name: build(architecture, d_in=s.width, n_latents=expansion * s.width, **dict_kwargs)
                 for s in chosen}

    def stream(start_step: int) -> Iterator[dict[str, torch.Tensor]]:
        rows = harvest(model, {"input_ids": ids, "attention_mask": mask}, chosen, batch_size=harvest_batch_size,
                       exclude_first=exclude_first, progress=False)
        batches = iter(ShufflingBuffer(rows, cfg.batch_size, capacity=buffer_tokens, seed=cfg.seed, drop_last=True))
        for _ in range(start_step):  # deterministic: the same batches as the interrupted run
            next(batches)
        yield from batches

    trained = train(dicts, stream, dataclasses.replace(cfg, progress=progress))
    if root is not None:
        for name, d in trained.items():
            d.save(root / _dirname(name))
        _write_run(root, key, complete=True)
    return trained


def _write_run(root: Path, key: dict[str, Any], complete: bool) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / RUN_FILE) as tmp:
        tmp.write_text(json.dumps({"complete": complete, "key": key}, indent=1))


def _recorded_run(root: Path, key: dict[str, Any]) -> bool:
    """True when `root` holds this run finished; False when it holds nothing or this run
    unfinished (resume); a different run there is refused rather than resumed or overwritten."""
    try:
        recorded = json.loads((root / RUN_FILE).read_text())
    except FileNotFoundError:
        return False
    except json.JSONDecodeError:
        raise ValueError(f"{root / RUN_FILE} is corrupted; delete {root} to retrain") from None
    if recorded.get("key") != json.loads(json.dumps(key)):
        theirs = recorded.get("key", {})
        diff = sorted(k for k in set(theirs) | set(key) if theirs.get(k) != json.loads(json.dumps(key)).get(k))
        raise ValueError(f"{root} holds dictionaries trained with other settings (differs in: {', '.join(diff)}); "
                         f"use another directory or delete it to retrain")
    return bool(recorded.get("complete"))
