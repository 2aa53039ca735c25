"""Similarity between two dictionaries' feature directions (rows of W_dec).

- Mean max cosine similarity (Sharkey, Braun, Millidge 2022, "Taking features out of
  superposition with sparse autoencoders", AI Alignment Forum; used by Cunningham et al. 2023):

      MMCS(A, B) = (1/|A|) sum_{a in A} max_{b in B} cos(a, b)

  It is asymmetric: every row of `a` is scored against its best match in `b` (several rows of
  `a` may share a match). With `a` = ground-truth features it measures how well `b` recovers them.
- Hungarian matching (Kuhn 1955): the one-to-one assignment between rows of a and rows of b that
  maximises the summed cosine (scipy's `linear_sum_assignment`); the mean matched |cos| is the
  "mean correlation coefficient" of synthetic-data SAE evaluations.

`absolute=True` scores |cos| (direction up to sign: ICA and PCA components have arbitrary signs).
Either argument may be a [n, d] tensor or a `Dictionary` (its W_dec is used).
"""
from __future__ import annotations

import torch

from .dictionary import Dictionary


def _directions(m: torch.Tensor | Dictionary, name: str) -> torch.Tensor:
    w = m.W_dec if isinstance(m, Dictionary) else m
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise ValueError(f"{name} must be a [n, d] matrix of directions or a Dictionary, got "
                         f"{type(w).__name__} with shape {tuple(getattr(w, 'shape', ()))}")
    if w.shape[0] == 0:
        raise ValueError(f"{name} has no rows")
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    A, B = _directions(a, "a"), _directions(b, "b")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b live in different spaces: d={A.shape[1]} vs d={B.shape[1]}")
    return A, B.to(A.device)


@torch.no_grad()
def max_cosine(a: torch.Tensor | Dictionary, b: torch.Tensor | Dictionary, absolute: bool = False,
               chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of a, its best cosine to any row of b and that row's index -> ([n_a], [n_a])."""
    A, B = _pair(a, b)
    best, arg = [], []
    for s in range(0, A.shape[0], chunk):
        cos = A[s:s + chunk] @ B.T  # [chunk, n_b]
        if absolute:
            cos = cos.abs()
        v, i = cos.max(dim=1)
        best.append(v)
        arg.append(i)
    return torch.cat(best), torch.cat(arg)


def mmcs(a: torch.Tensor | Dictionary, b: torch.Tensor | Dictionary, absolute: bool = False) -> float:
    """Mean over rows of a of the max cosine similarity to any row of b."""
    return float(max_cosine(a, b, absolute=absolute)[0].mean())


@torch.no_grad()
def match(a: torch.Tensor | Dictionary, b: torch.Tensor | Dictionary,
          absolute: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Hungarian one-to-one matching of rows of a to rows of b maximising total cosine.

    Returns (pairs [m, 2] long: (row of a, row of b), sorted by row of a; cosine [m] of each pair),
    m = min(n_a, n_b). With absolute=True, pairs maximise |cos| and the returned cosines are |cos|."""
    from scipy.optimize import linear_sum_assignment

    A, B = _pair(a, b)
    cos = A @ B.T  # [n_a, n_b]
    score = cos.abs() if absolute else cos
    ri, ci = linear_sum_assignment(score.double().cpu().numpy(), maximize=True)
    rows = torch.as_tensor(ri, dtype=torch.long)
    cols = torch.as_tensor(ci, dtype=torch.long)
    pairs = torch.stack([rows, cols], dim=1)
    return pairs, score.cpu()[rows, cols]
