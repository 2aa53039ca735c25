"""Evaluate dictionaries at their sites: reconstruction, sparsity, and the model's loss with the
dictionary spliced in. One DataFrame row per site.

Definitions (x: activations at kept tokens, x̂ = decode(encode(x)), sums in float64 over the
evaluation window of n = `tokens` kept tokens, width d; position 0 and padding are excluded as in
harvesting; the reconstruction metrics are `sae.metrics`' `ReconstructionSums`):

    mse            Σ||x - x̂||² / (n d)                           (mean over elements)
    sq_err_per_token  Σ||x - x̂||² / n                            (summed over d, mean over tokens)
    fvu            Σ||x - x̂||² / Σ||x - x̄||²                      (x̄: mean over the window; Gao et al.)
    explained_var  1 - fvu
    cosine         mean over tokens of cos(x, x̂)
    l0             mean number of non-zero codes per token
    dead_frac      fraction of latents that never fire in the window
    dense_frac     fraction of latents firing on more than `dense_threshold` of tokens
    ce_clean       next-token cross-entropy of the unmodified model (nats/token)
    ce_spliced     the same with the site's activation replaced by x̂ at kept positions
    ce_zero        the same with the site's activation set to 0 at kept positions
    ce_recovered   (ce_zero - ce_spliced) / (ce_zero - ce_clean)
    kl             mean over tokens of KL(p_clean || p_spliced) of the next-token distributions
    ppl_diff       exp(ce_spliced) - exp(ce_clean)

The CE-family metrics run one traced forward per site for splicing and one for zero-ablation per
batch, on the first `ce_tokens` tokens. `table.attrs["worst_tokens"]` lists (as records; wrap in
`pd.DataFrame`) the tokens whose loss rises most when each dictionary is spliced in (site,
context, position, token, context text, loss increase): what the dictionary fails to represent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import tracing
from .dictionary import Dictionary
from .metrics import ReconstructionSums
from .harvesting import as_token_batch, token_mask
from .sites import resolve_sites


@dataclass
class _Sums:
    rec: ReconstructionSums = field(default_factory=ReconstructionSums)
    cosine: float = 0.0
    l0: float = 0.0
    fires: torch.Tensor | None = None
    ce_tokens: int = 0
    ce_spliced: float = 0.0
    ce_zero: float = 0.0
    kl: float = 0.0
    worst: list = field(default_factory=list)

    def add_reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        self.rec.add(x, x_hat)
        self.cosine += float(F.cosine_similarity(x, x_hat, dim=-1).sum())
        fired = codes != 0
        self.l0 += float(fired.sum())
        self.fires = fired.sum(0) if self.fires is None else self.fires + fired.sum(0)


def _next_token_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[batch, pos-1] cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


def evaluate(model: Any, dictionaries: Mapping[str, Dictionary], contexts: Any, *, tokens: int = 8192,
             ce_tokens: int | None = 2048, batch_size: int = 8, exclude_first: bool = True,
             dense_threshold: float = 0.1, worst: int = 10, progress: bool = True) -> pd.DataFrame:
    """One row per site (see the module docstring for the definitions).

    dictionaries: {site name: Dictionary}; contexts: token ids, a Corpus (its held-out split is
    used) or anything `harvest` accepts. tokens: evaluation window for reconstruction metrics;
    ce_tokens: window for CE/KL metrics (None: the same; 0: skip them)."""
    if not dictionaries:
        raise ValueError("no dictionaries to evaluate: pass {site: Dictionary}")
    sites = resolve_sites(model, list(dictionaries))
    for site in sites:
        d = dictionaries[site.name]
        if d.d_in != site.width:
            raise ValueError(f"dictionary for {site.name} has d_in={d.d_in} but the site is {site.width} wide")
    if hasattr(contexts, "heldout") and hasattr(contexts, "ctx_len"):
        contexts = contexts.heldout if len(contexts.heldout) else contexts.train
    ids_all, mask_all = as_token_batch(model, contexts)
    ce_tokens = tokens if ce_tokens is None else ce_tokens
    sums = {s.name: _Sums() for s in sites}
    ce_clean, n_ce, kept_total = 0.0, 0, 0
    device = model.device
    bar = tqdm(total=tokens, unit="tok", desc="evaluate", disable=not progress, dynamic_ncols=True)
    for lo in range(0, ids_all.shape[0], batch_size):
        if kept_total >= tokens:
            break
        ids, mask = ids_all[lo:lo + batch_size].to(device), mask_all[lo:lo + batch_size].to(device)
        keep = token_mask(mask, exclude_first)  # [batch, pos]
        acts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            with tracing.trace(model.nn, ids, mask) as tracer:
                for site in sites:
                    acts[site.name] = tracing.save(site.read(model.nn))
                clean_logits = tracing.save(tracing.logits(model.nn))
            for site in sites:
                d = dictionaries[site.name]
                x = acts[site.name][keep]
                codes = d.encode(x.to(d.W_dec.dtype))
                sums[site.name].add_reconstruction(x, d.decode(codes), codes)
            kept_total += int(keep.sum())
            bar.update(int(keep.sum()))
            if n_ce >= ce_tokens:
                continue
            # only as many contexts as the CE window still needs: each costs 2 forwards per site
            target_mask = keep[:, 1:] & mask[:, 1:].bool()  # predictions of kept, real tokens
            rows = int((target_mask.sum(1).cumsum(0) < ce_tokens - n_ce).sum()) + 1
            ids, mask, keep, target_mask = ids[:rows], mask[:rows], keep[:rows], target_mask[:rows]
            acts = {name: a[:rows] for name, a in acts.items()}
            clean_logits = clean_logits[:rows]
            clean_loss = _next_token_losses(clean_logits, ids)
            ce_clean += float(clean_loss[target_mask].sum())
            n_batch = int(target_mask.sum())
            n_ce += n_batch
            log_p = F.log_softmax(clean_logits[:, :-1].float(), -1)
            for site in sites:
                d, s = dictionaries[site.name], sums[site.name]
                x_hat = torch.where(keep[..., None], d(acts[site.name].to(d.W_dec.dtype)).to(acts[site.name].dtype),
                                    acts[site.name])
                spliced = _patched_logits(model, ids, mask, site, x_hat)
                zero = _patched_logits(model, ids, mask, site, torch.where(keep[..., None], 0.0, acts[site.name]))
                loss = _next_token_losses(spliced, ids)
                s.ce_spliced += float(loss[target_mask].sum())
                s.ce_zero += float(_next_token_losses(zero, ids)[target_mask].sum())
                kl = (log_p.exp() * (log_p - F.log_softmax(spliced[:, :-1].float(), -1))).sum(-1)
                s.kl += float(kl[target_mask].sum())
                s.ce_tokens += n_batch
                if worst:
                    rise = torch.where(target_mask, loss - clean_loss, torch.tensor(float("-inf")))
                    top = rise.flatten().topk(min(worst, int(target_mask.sum()))).indices
                    for flat in top.tolist():
                        b, p = divmod(flat, rise.shape[1])
                        s.worst.append((float(rise[b, p]), lo + b, p + 1, ids[b].tolist()))
                    s.worst = sorted(s.worst, reverse=True)[:worst]
    bar.close()
    if kept_total == 0:
        raise ValueError("no tokens to evaluate: the contexts are empty after dropping padding and position 0")
    return _table(model, sites, dictionaries, sums, ce_clean / max(1, n_ce), dense_threshold)


def _patched_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, site, value: torch.Tensor) -> torch.Tensor:
    """Logits of a forward whose activation at `site` is replaced by `value` [batch, pos, width]."""
    with tracing.trace(model.nn, ids, mask) as tracer:
        site.write(model.nn, value)
        logits = tracing.save(tracing.logits(model.nn))
    return logits


def _table(model, sites, dictionaries, sums, ce_clean: float, dense_threshold: float) -> pd.DataFrame:
    import math

    rows, worst_rows = [], []
    for site in sites:
        s, d = sums[site.name], dictionaries[site.name]
        n = s.rec.tokens
        fire_rate = s.fires.double() / n
        row = {"site": site.name, "architecture": d.architecture, "n_latents": d.n_latents, "tokens": n,
               "mse": s.rec.mse, "sq_err_per_token": s.rec.sq_err_per_token, "fvu": s.rec.fvu,
               "cosine": s.cosine / n, "l0": s.l0 / n, "dead_frac": float((fire_rate == 0).double().mean()),
               "dense_frac": float((fire_rate > dense_threshold).double().mean())}
        row["explained_var"] = 1 - row["fvu"]
        if s.ce_tokens:
            spliced, zero = s.ce_spliced / s.ce_tokens, s.ce_zero / s.ce_tokens
            row.update(ce_tokens=s.ce_tokens, ce_clean=ce_clean, ce_spliced=spliced, ce_zero=zero,
                       ce_recovered=(zero - spliced) / (zero - ce_clean) if zero != ce_clean else float("nan"),
                       kl=s.kl / s.ce_tokens, ppl_diff=math.exp(spliced) - math.exp(ce_clean))
        rows.append(row)
        for rise, context, position, ids in s.worst:
            tok = model.tokenizer
            worst_rows.append({"site": site.name, "loss_increase": rise, "context": context, "position": position,
                               "token": tok.decode(ids[position]),
                               "text": tok.decode(ids[max(0, position - 12):position]) + "[[" + tok.decode(ids[position]) + "]]"})
    table = pd.DataFrame(rows).set_index("site")
    table.attrs["worst_tokens"] = worst_rows  # records, so tables still concatenate
    return table
