"""The training loop: batches in, trained (folded) dictionaries out (the algorithm is in the
package docstring, `sae.training`).

Per step: validate the global batch, take this rank's slice, scale it, call each dictionary's
`training_loss`, backward, all-reduce gradients (data parallel), apply the decoder constraint,
clip, step the optimizer at lr(t), update the dead-latent counters, resample dead latents when
due, log and checkpoint.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np
import torch
from torch import nn

from .. import metrics as _metrics
from ..dictionary import Dictionary, TrainState
from ..io import atomic_path
from . import checkpoint, resample
from .checkpoint import EXPORT_DIR, latest_checkpoint
from .config import TrainConfig
from .distributed import _Dist
from .optim import _decoder_rows, _make_optimizer, _remove_parallel_grad, _renormalise
from .schedule import default_lr, lr_at

Batch = Union[torch.Tensor, Mapping[str, torch.Tensor]]
BatchStream = Union[Callable[[int], Iterable[Batch]], Iterable[Batch]]

_TENSOR = "<batch>"  # internal site key for plain-Tensor batches


class NonFiniteError(FloatingPointError):
    """NaN or inf in activations, a loss or gradients; `step`, `site`, `dictionary` and
    `checkpoint` (the last good checkpoint directory, or None) say where."""

    def __init__(self, message: str, step: int, site: str | None, dictionary: str | None,
                 checkpoint: Path | None):
        super().__init__(message)
        self.step, self.site, self.dictionary, self.checkpoint = step, site, dictionary, checkpoint


def _metric_value(v: Any, key: str, name: str) -> torch.Tensor | float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"dictionary {name!r}: training_loss metric {key!r} has shape "
                             f"{tuple(v.shape)}; metrics must be scalars")
        return v.detach().reshape(()).float()
    return float(v)


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
        self.resampling = [n for n, d in self.dicts.items() if cfg.resample_dead and resample.can_resample(d)]
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


    # --- checkpoints (sae.training.checkpoint) -----------------------------------------------
    def _save(self, step: int) -> None:
        checkpoint.save(self, step)

    def _load(self, ckpt: Path) -> None:
        checkpoint.load(self, ckpt)

    def _use_averaged(self, name: str, d: Dictionary) -> None:
        checkpoint.use_averaged(self, name, d)

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
        xs = {}
        for s, x in xs_full.items():
            xs[s] = x[lo:hi].to(self.device, torch.float32, non_blocking=True) * self.scales.get(s, 1.0)
        losses, fired = {}, {}
        for n, d in self.dicts.items():
            x = xs[self.site_of[n]]
            dtype = next(d.parameters()).dtype
            if x.dtype != dtype:
                x = x.to(dtype)
            state = TrainState(step=t, total_steps=self.T, dead_mask=self.since_fired[n] >= self.window,
                               all_reduce=self.dist.all_reduce_ if self.dist.on else None)
            d.last_fired = None
            loss, metrics = d.training_loss(x, state)
            metrics = dict(metrics)
            f = getattr(d, "last_fired", None)  # [n_latents] bool, set by training_loss
            missing = [k for k in ("l0", "fvu") if k not in metrics] if log_now else []
            if f is None or missing:
                # fallback for objectives that do not report them: one more (no-grad) encode
                with torch.no_grad():
                    codes = d.encode(x)                                         # [batch, n_latents]
                    active = codes != 0
                    if f is None:
                        f = active.any(0)
                    if "l0" in missing:
                        metrics["l0"] = active.sum(1).float().mean()
                    if "fvu" in missing:
                        metrics["fvu"] = _metrics.fvu(x, d.decode(codes))
            fired[n] = f.reshape(-1).to(self.device)
            m = {k: _metric_value(v, k, n) for k, v in metrics.items()}
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
        if self.resampling and resample.due(t, self.T, cfg.resample_interval, cfg.resample_until):
            self._resample(xs_full, t)
        self._acc_steps += 1

    def _resample(self, xs_full: dict[str, torch.Tensor], t: int) -> None:
        """Dead-latent resampling (`sae.training.resample`) on the scaled global batch of step t."""
        for n in self.resampling:
            d, s = self.dicts[n], self.site_of[n]
            x = xs_full[s].to(self.device, torch.float32) * self.scales.get(s, 1.0)
            x = x.to(next(d.parameters()).dtype)
            ids = resample.resample(d, self.opts[n], x, self.since_fired[n] >= self.window, self.cfg.seed, t)
            self.since_fired[n][ids] = 0
            self._accumulate(n, {"resampled": float(ids.numel())})

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
