"""Greedy search for the smallest feature set whose patch reproduces a counterfactual run.

Cunningham et al. 2023 ("Sparse Autoencoders Find Highly Interpretable Features in Language
Models", arXiv 2309.08600, §4, IOI experiment; their `ioi_feature_ident.py`). At one site, with
base codes c = encode(x_base), source codes c̄ = encode(x_source) [batch, pos, n_latents], patch
positions P and a feature set S, the sub-rank-one patch runs the base input with

    x'_S = x_base + Σ_{i∈S} (c̄_i - c_i) f_i          at the positions in P (error term kept)

and scores it by the divergence from the target run (usually the source run) at one position per
row (default the last real token):

    KL(S) = mean_rows KL( softmax(logits of run S) || softmax(target logits) )

The search starts with every candidate patched and, for each threshold tau in ascending order,
visits the features still in S (in random order, as the paper does, or another `order`) and drops
feature i when KL(S \\ {i}) - KL(S) < tau. S carries over from one tau to the next, so the sets
are nested and |S| falls as tau grows. Per tau it reports (tau, |S|, KL(S), the user metric and
the restored fraction (m(S) - m(base)) / (m(target) - m(base)), mean edit ||x'_S - x_base||_2 over
patched positions) -- the "features patched vs KL" and "edit size vs KL" curves of the paper.

Batched evaluation. Candidates are judged in blocks of B = `batch`: one forward runs the base
batch replicated B times (plus once more for S itself when KL(S) is not known), each replica
with its own per-feature mask [B, k] broadcast to the codes [B * batch, pos, n_latents], so a
tau costs ceil(|S| / B) + 1 forwards (the +1 evaluates the final S with the metric). Every
candidate of a block is judged against the S of the block's start; with B = 1 this is exactly
the paper's sequential greedy, with B > 1 it is its block (Jacobi) variant. After a block drops
exactly one feature its replica's KL is KL(S), so only blocks that drop two or more need a
fresh KL(S). The forward count is in `df.attrs["forwards"]` and, per tau, the `forwards` column.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import pandas as pd
import torch

from .spliced import (Features, Positions, check_dictionaries, feature_ids, position_mask, run_spliced,
                      token_batch)

ORDERS = ("random", "ascending")
DEFAULT_TAUS = [10 ** (-5 + 5 * i / 49) for i in range(50)]     # logspace(-5, 0, 50), as in the paper
Metric = Callable[[torch.Tensor], torch.Tensor]     # logits [batch, pos, vocab] -> [batch] or scalar


class SetEvaluator:
    """Runs the base input with the source codes of many feature sets at once.

    Set up with one forward of base and source together; then `kl(masks)` evaluates masks
    [R, k] (True = candidate patched) in one forward of R replicas."""

    def __init__(self, model: Any, dictionaries: Mapping[str, Any], site: str, base: Any, source: Any,
                 target_logits: torch.Tensor | None = None, *, positions: Positions = None,
                 candidates: Features | None = None, kl_positions: Positions = None,
                 base_mask: torch.Tensor | None = None, source_mask: torch.Tensor | None = None):
        if site not in dictionaries:
            raise ValueError(f"no dictionary for site {site!r}; dictionaries are given for {list(dictionaries)}")
        self.model, self.site, self.dicts = model, site, {site: dictionaries[site]}
        check_dictionaries(model, self.dicts)
        self.ids, self.mask = token_batch(model, base, base_mask)
        s_ids, s_mask = token_batch(model, source, source_mask)
        if s_ids.shape != self.ids.shape:
            raise ValueError(f"base and source must have the same shape [batch, pos] to patch position by "
                             f"position, got base {tuple(self.ids.shape)} and source {tuple(s_ids.shape)}")
        b, p = self.ids.shape
        real = torch.ones(b, p, dtype=torch.bool, device=self.ids.device) if self.mask is None else self.mask.bool()
        self.where = position_mask(positions, b, p, self.ids.device) & real       # [batch, pos] patched
        if self.mask is None and s_mask is None:
            both_mask = None
        else:
            ones = torch.ones_like(self.ids)
            both_mask = torch.cat([ones if self.mask is None else self.mask, ones if s_mask is None else s_mask])
        run = run_spliced(model, self.dicts, torch.cat([self.ids, s_ids]), both_mask)
        self.forwards = 1
        c_base, c_src = run.codes[site][:b], run.codes[site][b:]                    # [batch, pos, n_latents]
        self.base_logits = run.logits[:b]
        target = run.logits[b:] if target_logits is None else target_logits.to(run.logits.device)
        if target.shape != self.base_logits.shape:
            raise ValueError(f"target_logits must be the logits [batch, pos, vocab] = "
                             f"{tuple(self.base_logits.shape)} of the run to match, got {tuple(target.shape)}")
        self.target_logits = target
        if kl_positions is None:
            kl_positions = real.long().cumsum(1).argmax(1)                          # last real token per row
        kl_where = position_mask(kl_positions, b, p, self.ids.device)
        if not bool((kl_where.sum(1) == 1).all()):
            raise ValueError("kl_positions must name exactly one position per row (an int, or a tensor [batch])")
        self.kl_pos = kl_where.long().argmax(1)                                     # [batch]
        rows = torch.arange(b, device=self.ids.device)
        self.target_logp = target[rows, self.kl_pos].double().log_softmax(-1)      # [batch, vocab]
        diff = (c_src - c_base) * self.where[..., None]                             # [batch, pos, n_latents]
        n = c_base.shape[-1]
        if candidates is None:
            self.cand = diff.ne(0).flatten(0, 1).any(0).nonzero()[:, 0].cpu()
        else:
            self.cand = feature_ids(candidates, n, site)
        cand = self.cand.to(c_src.device)
        self.src = c_src[..., cand].detach()                                        # [batch, pos, k]
        w_norm = _decoder_norms(dictionaries[site], n)[self.cand]
        dc = diff[..., cand].abs().flatten(0, 1)[self.where.flatten()].double().cpu()
        #: mean |c̄_i - c_i| ||f_i|| over patched positions: feature i's share of the edit [k]
        self.contribution = (dc.mean(0) if len(dc) else torch.zeros(len(cand), dtype=torch.float64)) * w_norm
        self.kl_none = float(self._kl(self.base_logits).mean())

    @property
    def k(self) -> int:
        return len(self.cand)

    def _kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(run || target) at the KL positions, per row of a replicated batch -> [R, batch]."""
        b = self.ids.shape[0]
        r = logits.shape[0] // b
        rows = torch.arange(logits.shape[0], device=logits.device)
        logq = logits[rows, self.kl_pos.repeat(r)].double().log_softmax(-1)          # [R * batch, vocab]
        kl = (logq.exp() * (logq - self.target_logp.repeat(r, 1))).sum(-1)
        return kl.reshape(r, b)

    def run(self, masks: torch.Tensor):
        """One forward with R replicas of the base batch, replica r patching the candidates with
        masks[r] (bool [R, k]) -> (KL per replica [R], the SplicedRun)."""
        masks = masks.to(self.ids.device)
        r, (b, p) = masks.shape[0], self.ids.shape
        cand = self.cand.to(self.ids.device)
        sel = (masks[:, None, None, :] & self.where[None, :, :, None]).reshape(r * b, p, self.k)
        src = self.src.repeat(r, 1, 1)

        def edit(codes: torch.Tensor, error: torch.Tensor):
            idx = cand.to(codes.device)
            codes[..., idx] = torch.where(sel.to(codes.device), src.to(codes), codes[..., idx])
            return codes, error

        mask = None if self.mask is None else self.mask.repeat(r, 1)
        out = run_spliced(self.model, self.dicts, self.ids.repeat(r, 1), mask, edits={self.site: edit})
        self.forwards += 1
        return self._kl(out.logits).mean(1), out

    def kl(self, masks: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """KL of each feature set masks [R, k] -> [R], in forwards of at most `batch` replicas."""
        step = masks.shape[0] if batch is None else max(1, int(batch))
        return torch.cat([self.run(masks[i:i + step])[0] for i in range(0, masks.shape[0], step)])

    def masks(self, sets: Sequence[Features]) -> torch.Tensor:
        """Bool masks [len(sets), k] over the candidates for feature-id sets (ids must be candidates)."""
        pos = {int(f): j for j, f in enumerate(self.cand)}
        out = torch.zeros(len(sets), self.k, dtype=torch.bool)
        for r, s in enumerate(sets):
            for f in feature_ids(s, self.dicts[self.site].n_latents, self.site).tolist():
                if f not in pos:
                    raise ValueError(f"feature {f} is not a candidate (candidates: {self.cand.tolist()[:20]}...)")
                out[r, pos[f]] = True
        return out


def _decoder_norms(d: Any, n: int) -> torch.Tensor:
    W = getattr(d, "W_dec", None)
    return torch.ones(n, dtype=torch.float64) if W is None else W.detach().double().norm(dim=-1).cpu()


def feature_set_kl(model: Any, dictionaries: Mapping[str, Any], site: str, base: Any, source: Any,
                   sets: Sequence[Features], target_logits: torch.Tensor | None = None, *,
                   positions: Positions = None, kl_positions: Positions = None, batch: int = 8) -> torch.Tensor:
    """KL(run || target) [len(sets)] of the sub-rank-one patch of each feature set (lists of
    ids) at `site`, `batch` sets per forward (module docstring)."""
    ev = SetEvaluator(model, dictionaries, site, base, source, target_logits, positions=positions,
                      candidates=sorted({int(f) for s in sets for f in feature_ids(
                          s, dictionaries[site].n_latents, site).tolist()}), kl_positions=kl_positions)
    return ev.kl(ev.masks(sets), batch)


def search_feature_set(model: Any, dictionaries: Mapping[str, Any], site: str, base: Any, source: Any,
                       target_logits: torch.Tensor | None = None, *, metric: Metric | None = None,
                       taus: Sequence[float] | None = None, positions: Positions = None,
                       candidates: Features | None = None, batch: int = 8,
                       order: str | Sequence[int] = "random", seed: int = 0, kl_positions: Positions = None,
                       base_mask: torch.Tensor | None = None, source_mask: torch.Tensor | None = None
                       ) -> pd.DataFrame:
    """Cunningham et al.'s feature-set search at `site` (module docstring).

    base, source: token ids [batch, pos] of the same shape (or tokenize dicts / text).
    target_logits: logits [batch, pos, vocab] to match; default the source run's.
    metric: logits -> [batch] or scalar (e.g. IOI logit difference), averaged over rows.
    taus: thresholds, visited in ascending order (default logspace(-5, 0, 50) as in the paper).
    positions: patched positions (default all real tokens). candidates: feature ids (default
    every feature whose code differs between source and base at a patched position).
    batch: candidate drops evaluated per forward (each forward runs <= (batch + 1) * len(base)
    sequences). order: "random" (reshuffled per tau with `seed`, as in the paper), "ascending"
    (smallest contribution mean |c̄_i - c_i| ||f_i|| first) or a list of ids giving the order.

    Returns one row per tau: tau, n_features, kl, metric, restored, edit_l2, forwards (spent on
    that tau), features (ids kept). attrs: forwards (total, including the set-up forward),
    kl_none (nothing patched), kl_all (every candidate patched), metric_base, metric_target,
    candidates, batch."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1 candidate per forward, got {batch}")
    taus = sorted(float(t) for t in (DEFAULT_TAUS if taus is None else taus))
    if not taus or any(math.isnan(t) for t in taus):
        raise ValueError("taus must be a non-empty list of thresholds without NaN")
    ev = SetEvaluator(model, dictionaries, site, base, source, target_logits, positions=positions,
                      candidates=candidates, kl_positions=kl_positions, base_mask=base_mask, source_mask=source_mask)
    rank = _priority(order, ev)
    gen = torch.Generator().manual_seed(seed)
    m = (lambda logits: float(metric(logits).float().mean())) if metric is not None else (lambda _: math.nan)
    m_base, m_target = m(ev.base_logits), m(ev.target_logits)

    def summarise(S: torch.Tensor) -> dict:
        if not S.any():                                   # nothing patched: the base run, known
            return dict(kl=ev.kl_none, metric=m_base, edit_l2=0.0)
        kl, run = ev.run(S[None])
        return dict(kl=float(kl[0]), metric=m(run.logits),
                    edit_l2=float(run.edit_norm(site)[ev.where].mean()) if ev.where.any() else 0.0)

    S = torch.ones(ev.k, dtype=torch.bool)
    kl_S: float | None = None
    kl_all = math.nan
    last: dict | None = None
    rows = []
    for tau in taus:
        start = ev.forwards
        members = S.nonzero()[:, 0]
        if isinstance(order, str) and order == "random":
            visit = members[torch.randperm(len(members), generator=gen)]
        else:
            visit = members[rank[members].argsort(stable=True)]
        dropped_any = False
        for i in range(0, len(visit), batch):
            block = visit[i:i + batch]
            trial = S[None].repeat(len(block), 1)
            trial[torch.arange(len(block)), block] = False                   # replica j drops block[j]
            if kl_S is None:
                trial = torch.cat([S[None], trial])
            kls = ev.run(trial)[0].tolist()
            if kl_S is None:
                kl_S, kls = kls[0], kls[1:]
                kl_all = kl_S if math.isnan(kl_all) else kl_all
            drops = [j for j, kl in enumerate(kls) if kl - kl_S < tau]
            S[block[drops]] = False
            dropped_any |= bool(drops)
            kl_S = kls[drops[0]] if len(drops) == 1 else (kl_S if not drops else None)
        if last is None or dropped_any:
            last = summarise(S)
            kl_S = last["kl"]
        restored = (last["metric"] - m_base) / (m_target - m_base) if m_target != m_base else math.nan
        rows.append(dict(tau=tau, n_features=int(S.sum()), kl=last["kl"], metric=last["metric"],
                         restored=restored, edit_l2=last["edit_l2"], forwards=ev.forwards - start,
                         features=ev.cand[S].tolist()))
    df = pd.DataFrame(rows, columns=["tau", "n_features", "kl", "metric", "restored", "edit_l2", "forwards",
                                     "features"])
    if math.isnan(kl_all):                                # no candidates: nothing was ever evaluated
        kl_all = ev.kl_none
    df.attrs.update(forwards=ev.forwards, kl_none=ev.kl_none, kl_all=kl_all, metric_base=m_base,
                    metric_target=m_target, candidates=ev.cand.tolist(), batch=batch)
    return df


def _priority(order: str | Sequence[int], ev: SetEvaluator) -> torch.Tensor:
    """Visiting priority per candidate [k] (lower first) for order "ascending" or a list of ids."""
    if isinstance(order, str):
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; valid: {ORDERS} or a list of feature ids")
        return ev.contribution
    ids = feature_ids(list(order), ev.dicts[ev.site].n_latents, ev.site).tolist()
    where = {f: r for r, f in enumerate(ids)}
    missing = [int(f) for f in ev.cand if int(f) not in where]
    if missing:
        raise ValueError(f"order must list every candidate feature; missing {missing[:10]}")
    return torch.tensor([where[int(f)] for f in ev.cand], dtype=torch.float64)
