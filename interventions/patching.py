"""Feature patching and ablation on the spliced model.

Sub-rank-one feature patching (Cunningham et al. 2023, "Sparse Autoencoders Find Highly
Interpretable Features in Language Models", arXiv 2309.08600, §4 and its IOI experiment): run the
base input with the source input's codes for a feature set F at chosen sites and positions. With
c = encode(x_base), c̄ = encode(x_source), f_i = W_dec[i] and mask positions P:

    sub_rank_one    x' = x_base + Σ_{i∈F} (c̄_i - c_i) f_i              error and other features kept
    reconstruction  x' = decode(c')     c'_F = c̄_F, c'_rest = c_rest    error dropped
    full            x' = x_base - Π x_base + Π x_source                   Π: orthogonal projector onto span{f_i : i∈F}

(the `partial`, `reconstruction` and `full` modes of Cunningham et al.'s erasure code; `full` is
the rank-one projection c_i = <x, f̂_i> when |F| = 1, and the projection onto the span otherwise,
so a set of features with spanning directions patches the whole activation).

Ablation of F sets the codes to a reference value a_i with error and other features untouched,
x' = x + Σ_{i∈F} (a_i - c_i) f_i, where a_i is 0 (zero), the mean code over reference tokens
(mean), or the code of another input at the same position (resample; by default the next row of
the batch). These are the zero/mean/resample ablations of Marks et al. 2024 and auto-circuit.

Every function returns the `SplicedRun` of the edited forward (logits, codes, errors, and
`edit_norm(site)` = ||x' - x|| per token, the edit size Cunningham et al. report).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .means import token_mean
from .spliced import (Edit, Features, Positions, SplicedRun, dictionary_tensor, position_mask, resolve_features,
                     run_spliced, token_batch)

PATCH_MODES = ("sub_rank_one", "reconstruction", "full")
ABLATION_MODES = ("zero", "mean", "resample")


# --- edits (building blocks, also used by steering and by circuits) -------------------------
def set_codes(features: torch.Tensor, values: torch.Tensor | float, where: torch.Tensor) -> Edit:
    """Edit: codes[..., features] := values at positions `where` [batch, pos]. values broadcast
    against [batch, pos, k] (a scalar, [k], or [batch, pos, k])."""
    def edit(codes: torch.Tensor, error: torch.Tensor):
        idx = features.to(codes.device)
        new = torch.as_tensor(values, dtype=codes.dtype, device=codes.device).expand(*codes.shape[:-1], len(idx))
        codes[..., idx] = torch.where(where.to(codes.device)[..., None], new, codes[..., idx])
        return codes, error
    return edit


def add_codes(features: torch.Tensor, delta: torch.Tensor | float, where: torch.Tensor) -> Edit:
    """Edit: codes[..., features] += delta at positions `where` (moves x by Σ delta_i f_i)."""
    def edit(codes: torch.Tensor, error: torch.Tensor):
        idx = features.to(codes.device)
        d = torch.as_tensor(delta, dtype=codes.dtype, device=codes.device).expand(*codes.shape[:-1], len(idx))
        codes[..., idx] = codes[..., idx] + torch.where(where.to(codes.device)[..., None], d, 0)
        return codes, error
    return edit


def zero_error(where: torch.Tensor) -> Edit:
    """Edit: error := 0 at positions `where` (the site passes on its reconstruction there)."""
    def edit(codes: torch.Tensor, error: torch.Tensor):
        return codes, torch.where(where.to(error.device)[..., None], 0, error)
    return edit


def project_onto(dictionary: Any, features: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> Edit:
    """Edit: replace the component of x = decode(c) + e in span{f_i : i∈features} by that of
    `target` [batch, pos, d_in] at positions `where` (carried by the error term)."""
    W = dictionary.W_dec[features.to(dictionary.W_dec.device)].detach()        # [k, d_in]
    basis = W.new_zeros(0, W.shape[1], dtype=torch.float64)                      # [r, d_in] orthonormal
    if len(features):
        _, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
        basis = vh[:int((s > s.max() * max(W.shape) * torch.finfo(W.dtype).eps).sum())]

    def edit(codes: torch.Tensor, error: torch.Tensor):
        x = dictionary.decode(codes) + error
        b = basis.to(x)
        delta = ((target.to(x) - x) @ b.T) @ b                                   # Π (target - x)
        return codes, error + torch.where(where.to(x.device)[..., None], delta, 0)
    return edit


def chain(*edits: Edit) -> Edit:
    """Edit: apply `edits` in order."""
    def edit(codes: torch.Tensor, error: torch.Tensor):
        for e in edits:
            codes, error = e(codes, error)
        return codes, error
    return edit


# --- patching ---------------------------------------------------------------------------------
def patch_features(model: Any, dictionaries: Mapping[str, Any], base: Any, source: Any,
                   features: Mapping[str, Features], *, positions: Positions = None,
                   mode: str = "sub_rank_one", base_mask: torch.Tensor | None = None,
                   source_mask: torch.Tensor | None = None, grad: bool = False,
                   metric: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SplicedRun:
    """Run `base` with the `source` codes of `features` ({site: ids}) at `positions` (module
    docstring for the modes). base and source: token ids [batch, pos] of the same shape (or
    `model.tokenize` dicts, or text that tokenizes to the same shape). Only the sites named in
    `features` are spliced."""
    if mode not in PATCH_MODES:
        raise ValueError(f"unknown patch mode {mode!r}; valid modes: {PATCH_MODES}")
    feats = resolve_features(model, dictionaries, features)
    dicts = {s: dictionaries[s] for s in feats}
    b_ids, b_mask = token_batch(model, base, base_mask)
    s_ids, s_mask = token_batch(model, source, source_mask)
    if b_ids.shape != s_ids.shape:
        raise ValueError(f"base and source must have the same shape [batch, pos] to patch position by "
                         f"position, got base {tuple(b_ids.shape)} and source {tuple(s_ids.shape)}; "
                         f"tokenize them together (model.tokenize(base + source)) or pad to one length")
    where = position_mask(positions, *b_ids.shape, device=b_ids.device)
    src = run_spliced(model, dicts, s_ids, s_mask, logits=False)
    edits: dict[str, Edit] = {}
    for site, ids in feats.items():
        d = dicts[site]
        if mode == "full":
            target = dictionary_tensor(d, src.acts[site])
            edits[site] = project_onto(d, ids, target, where)
        else:
            values = src.codes[site][..., ids.to(src.codes[site].device)]
            edit = set_codes(ids, values, where)
            edits[site] = edit if mode == "sub_rank_one" else chain(edit, zero_error(where))
    return run_spliced(model, dicts, b_ids, b_mask, edits=edits, grad=grad, metric=metric)


# --- ablation ---------------------------------------------------------------------------------
def ablate_features(model: Any, dictionaries: Mapping[str, Any], inputs: Any,
                    features: Mapping[str, Features], *, mode: str = "zero", positions: Positions = None,
                    attention_mask: torch.Tensor | None = None, reference: Any = None,
                    reference_mask: torch.Tensor | None = None, grad: bool = False,
                    metric: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SplicedRun:
    """Run `inputs` with the codes of `features` ({site: ids}) ablated at `positions`.

    mode "zero": codes := 0. "mean": codes := their mean over the real tokens of `reference`
    (token ids or text; default `inputs`), or `reference` = {site: tensor [n_latents]} of
    precomputed means. "resample": codes := those of `reference` (same shape as `inputs`) at
    the same position; default: `inputs` rolled by one row, so each row takes the next one's."""
    if mode not in ABLATION_MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; valid modes: {ABLATION_MODES}")
    feats = resolve_features(model, dictionaries, features)
    dicts = {s: dictionaries[s] for s in feats}
    ids, mask = token_batch(model, inputs, attention_mask)
    where = position_mask(positions, *ids.shape, device=ids.device)
    values = _ablation_values(model, dicts, feats, mode, ids, mask, reference, reference_mask)
    edits = {s: set_codes(feats[s], values[s], where) for s in feats}
    return run_spliced(model, dicts, ids, mask, edits=edits, grad=grad, metric=metric)


def _ablation_values(model, dicts, feats, mode, ids, mask, reference, reference_mask) -> dict[str, Any]:
    """{site: values broadcastable to [batch, pos, k]} that ablated codes are set to."""
    if mode == "zero":
        if reference is not None:
            raise ValueError("zero ablation takes no reference")
        return {s: 0.0 for s in feats}
    if mode == "mean" and isinstance(reference, Mapping):
        values = {}
        for s, idx in feats.items():
            means = reference.get(s)
            if not isinstance(means, torch.Tensor) or means.shape != (dicts[s].n_latents,):
                raise ValueError(f"mean ablation at {s} needs reference[{s!r}] = a tensor [n_latents="
                                 f"{dicts[s].n_latents}] of mean codes, got {getattr(means, 'shape', means)!r}")
            values[s] = means[idx.to(means.device)]
        return values
    if mode == "resample" and reference is None:
        if ids.shape[0] < 2:
            raise ValueError("resample ablation with no reference needs a batch of at least 2 rows "
                             "(each row takes the next row's codes); pass reference=... instead")
        ref_ids, ref_mask = ids.roll(-1, 0), None if mask is None else mask.roll(-1, 0)
    else:
        ref_ids, ref_mask = token_batch(model, ids if reference is None else reference, reference_mask)
        if reference is None:
            ref_mask = mask
    if mode == "resample" and ref_ids.shape != ids.shape:
        raise ValueError(f"resample ablation needs a reference of the same shape as the inputs "
                         f"{tuple(ids.shape)}, got {tuple(ref_ids.shape)}")
    ref = run_spliced(model, dicts, ref_ids, ref_mask, logits=False)
    values = {}
    for s, idx in feats.items():
        codes = ref.codes[s][..., idx.to(ref.codes[s].device)]               # [batch, pos, k]
        if mode == "resample":
            values[s] = codes
        else:
            values[s] = token_mean(codes, ref_mask)                            # [k]
    return values
