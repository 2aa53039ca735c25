"""Streaming summary statistics of harvested activations, one row per site.

Accumulated in float64 over batches, so memory does not grow with the number of tokens:
    norm_mean, norm_std, norm_max   of ||x||_2 per token
    mean_abs                        mean of |x_i| over tokens and dimensions
    variance                        total variance sum_i Var(x_i) (the FVU denominator per token)
    mean_norm                       ||E[x]||_2, the size of the mean offset
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd
import torch


class ActivationStats:
    def __init__(self):
        self._acc: dict[str, dict[str, torch.Tensor | float]] = {}

    def update(self, batch: dict[str, torch.Tensor]) -> None:
        for site, x in batch.items():
            if x.dim() != 2 or not x.is_floating_point():
                continue  # token ids and other non-activation entries
            x = x.detach().double()
            norms = x.norm(dim=-1)
            a = self._acc.setdefault(site, {"n": 0, "sum": torch.zeros(x.shape[1], dtype=torch.float64),
                                            "sumsq": torch.zeros(x.shape[1], dtype=torch.float64),
                                            "norm": 0.0, "norm2": 0.0, "norm_max": 0.0, "abs": 0.0})
            a["n"] += x.shape[0]
            a["sum"] += x.sum(0).cpu()
            a["sumsq"] += x.pow(2).sum(0).cpu()
            a["norm"] += float(norms.sum())
            a["norm2"] += float(norms.pow(2).sum())
            a["norm_max"] = max(a["norm_max"], float(norms.max()) if len(norms) else 0.0)
            a["abs"] += float(x.abs().sum())

    def table(self) -> pd.DataFrame:
        rows = []
        for site, a in self._acc.items():
            n, d = a["n"], a["sum"].numel()
            mean = a["sum"] / n
            norm_mean = a["norm"] / n
            rows.append({"site": site, "d": d, "tokens": n, "norm_mean": norm_mean,
                         "norm_std": max(0.0, a["norm2"] / n - norm_mean ** 2) ** 0.5,
                         "norm_max": a["norm_max"], "mean_abs": a["abs"] / (n * d),
                         "variance": float((a["sumsq"] / n - mean ** 2).sum()),
                         "mean_norm": float(mean.norm())})
        return pd.DataFrame(rows).set_index("site")


def activation_stats(batches: Iterable[dict[str, torch.Tensor]]) -> pd.DataFrame:
    """Summary table (see module docstring) of a stream of {site: [n_tokens, d]} batches."""
    stats = ActivationStats()
    for batch in batches:
        stats.update(batch)
    return stats.table()
