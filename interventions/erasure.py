"""Concept erasure at one site: SAE-feature ablation against LEACE and linear baselines.

Cunningham et al. 2023 ("Sparse Autoencoders Find Highly Interpretable Features in Language
Models", arXiv 2309.08600; v1 erasure experiments on gendered-pronoun prediction) remove a
concept from a site's activation x [batch, pos, d] in one of these ways (`erase(method=...)`):

    features   ablate the k SAE features that carry the concept:  x' = x + Σ_{i∈F} (a_i - c_i) f_i
               (a_i = the mean code over the fitting data, or 0; error and other features kept)
    pca        the same with PCA components as the dictionary (Cunningham et al.'s PCA baseline)
    neurons    the same in the neuron basis (the identity dictionary)
    leace      x' = x - W^+ U U^T W (x - mu)         LEACE (Belrose et al. 2023, `interventions.leace`)
    mean_diff  x' = x - U U^T (x - mu)                 projection off the class-mean differences

Features are chosen (`select_concept_features`) by one of two scores s_i [n_latents]:

    mean_diff    s_i = ||f_i|| * sqrt(Σ_y p_y (E[c_i | y] - E[c_i])^2)   between-class spread of code i,
                 in activation units (for two classes: ||f_i|| sqrt(p0 p1) |E[c_i|1] - E[c_i|0]|)
    attribution  s_i = E_batch Σ_pos (c_i - a_i) dm/dc_i                   first-order estimate of how
                 much ablating i lowers the concept metric m (attribution patching; gradients
                 from `run_spliced(grad=True, metric=m)`); orient m so that higher = concept used

and the top k by score are ablated. LEACE and the mean-difference projection act on the
activation itself: the edit adds r(x) - x to the error term, so any dictionary (or none: the
identity) can be spliced at the site.

`erasure_report` measures (Cunningham et al.'s axes plus the LEACE paper's probe criterion):

    metric_before / metric_after   the concept metric (e.g. two-way pronoun probability)
    probe_acc_before               linear probe trained and tested on clean held-out activations
    probe_acc_after                the same probe on the erased test activations
    probe_acc_retrained            a probe re-trained on erased activations (what LEACE guards
                                   against: it reaches chance = the majority-class rate)
    edit_l2                        mean ||x' - x||_2 over the tokens the erasure acts on
    kl_unrelated                   mean over tokens of KL(p_clean || p_erased) on unrelated text
    ce_increase                    next-token cross-entropy after minus before, same text
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from sae.baselines import IdentityDictionary, PCADictionary

from .leace import LeaceEraser
from .means import token_mean
from .patching import set_codes
from .spliced import Edit, Positions, SplicedRun, check_dictionaries, position_mask, run_spliced, token_batch

METHODS = ("features", "pca", "neurons", "leace", "mean_diff")
SELECTIONS = ("mean_diff", "attribution")
ABLATIONS = ("mean", "zero")


# --- linear probes --------------------------------------------------------------------------------
@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised inputs: predict(x [n, d]) -> labels [n]."""

    weight: torch.Tensor    # [n_classes, d]
    bias: torch.Tensor      # [n_classes]
    mean: torch.Tensor      # [d]
    scale: torch.Tensor     # [d]
    classes: torch.Tensor   # [n_classes] label values

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        xs = (x.detach().double().to(self.mean.device) - self.mean) / self.scale
        return xs @ self.weight.T + self.bias                         # [n, n_classes]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes[self.logits(x).argmax(-1)]

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y.to(self.classes.device)).double().mean())


def fit_probe(x: torch.Tensor, y: torch.Tensor, *, l2: float = 1e-4, max_iter: int = 200) -> LinearProbe:
    """Fit a linear probe on x [n, d] (float) and integer labels y [n] by L-BFGS on the mean
    cross-entropy + l2 * ||weight||^2, starting from weight 0 (so on linearly guarded data,
    where the gradient at 0 vanishes, it stays a constant predictor)."""
    x = x.detach().reshape(-1, x.shape[-1]).double().cpu()
    y = y.detach().reshape(-1).cpu()
    if y.is_floating_point() or y.shape[0] != x.shape[0]:
        raise ValueError(f"a probe needs integer labels [n] for x [n, d]; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)} {y.dtype}")
    classes, target = y.unique(return_inverse=True)
    if classes.numel() < 2:
        raise ValueError(f"probe labels take a single value {classes.tolist()}: nothing to predict")
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-12)
    xs = (x - mean) / scale
    weight = torch.zeros(len(classes), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weight.T + bias, target) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, scale, classes)


# --- labelled samples -----------------------------------------------------------------------------
def label_positions(labels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
                    positions: Positions = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(where [batch, pos] bool, z [batch, pos] long) from labels [batch] (one per sequence, at
    `positions`, default the last real token) or [batch, pos] (per token, -1 = unlabelled)."""
    labels = torch.as_tensor(labels).to(ids.device)
    if labels.is_floating_point():
        raise TypeError(f"concept labels must be integers (class ids), got {labels.dtype}")
    b, p = ids.shape
    real = torch.ones(b, p, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
    if labels.shape == (b,):
        if positions is None:
            last = real.long().cumsum(1).argmax(1)                   # last real token per row
            positions = last
        where = position_mask(positions, b, p, ids.device) & real
        return where, labels[:, None].expand(b, p)
    if labels.shape == (b, p):
        return (labels >= 0) & real, labels
    raise ValueError(f"labels must be one per sequence [batch]={b} or one per token [batch, pos]="
                     f"{(b, p)} (-1 = unlabelled), got {tuple(labels.shape)}")


def _real(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool().to(ids.device)


# --- choosing features ----------------------------------------------------------------------------
def select_concept_features(model: Any, dictionaries: Mapping[str, Any], site: str, inputs: Any,
                            labels: torch.Tensor | None = None, *, k: int | None = None,
                            method: str = "mean_diff", metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                            ablation: str = "mean", attention_mask: torch.Tensor | None = None,
                            positions: Positions = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature ids [k] best first, scores [n_latents]) of the features at `site` that carry a
    concept (module docstring). method "mean_diff" needs `labels`; "attribution" needs `metric`
    (logits [batch, pos, vocab] -> [batch] or scalar) and sums over every real token."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection method {method!r}; valid: {SELECTIONS}")
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; valid: {ABLATIONS}")
    if site not in dictionaries:
        raise ValueError(f"no dictionary for site {site!r}; dictionaries are given for {list(dictionaries)}")
    d = dictionaries[site]
    dicts = {site: d}
    ids, mask = token_batch(model, inputs, attention_mask)
    real = _real(ids, mask)
    if method == "mean_diff":
        if labels is None:
            raise ValueError("method='mean_diff' ranks features by class-conditional mean codes: pass labels")
        run = run_spliced(model, dicts, ids, mask, logits=False)
        where, z = label_positions(labels, ids, mask, positions)
        scores = between_class_spread(run.codes[site][where].double(), z[where])
        scores = scores * _decoder_norms(d).to(scores)
    else:
        if metric is None:
            raise ValueError("method='attribution' needs metric=f(logits [batch, pos, vocab]) -> [batch], "
                             "oriented so that higher means the concept is used")
        run = run_spliced(model, dicts, ids, mask, grad=True, metric=metric)
        c = run.codes[site].detach()
        g, _ = run.grads(site)
        ref = token_mean(c, real) if ablation == "mean" else torch.zeros_like(c[0, 0])
        scores = ((c - ref) * g * real[..., None]).sum(1).mean(0).double()   # [n_latents]
    order = scores.argsort(descending=True)
    return (order if k is None else order[:k]).cpu(), scores.cpu()


def between_class_spread(codes: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ_y p_y (E[c | y] - E[c])^2) per column of codes [n, m] for labels z [n] -> [m]."""
    if codes.shape[0] == 0:
        raise ValueError("no labelled tokens: check labels and positions")
    classes = z.unique()
    if classes.numel() < 2:
        raise ValueError(f"the labels take a single value {classes.tolist()}: a concept needs two classes")
    overall = codes.mean(0)
    spread = torch.zeros_like(overall)
    for y in classes:
        sel = z == y
        spread += sel.double().mean() * (codes[sel].mean(0) - overall) ** 2
    return spread.sqrt()


def _decoder_norms(d: Any) -> torch.Tensor:
    W = getattr(d, "W_dec", None)
    if W is None:
        return torch.ones(d.n_latents)
    return W.detach().double().norm(dim=-1).cpu()


# --- the erasure ----------------------------------------------------------------------------------
@dataclass
class Erasure:
    """A concept erasure at one site, applied as an Edit of the spliced forward.

    Feature ablation (features is not None): codes[..., features] := values. Linear erasure
    (eraser is not None): error += r(x) - x with x = decode(codes) + error. Use
    `run(model, ids)`, or `run_spliced(model, e.dictionaries, ids, edits={e.site: e.edit})`."""

    site: str
    method: str
    dictionary: Any                              # spliced at `site`
    features: torch.Tensor | None = None         # [k] ablated feature ids
    values: torch.Tensor | None = None           # [k] what they are set to
    eraser: LeaceEraser | None = None
    scores: torch.Tensor | None = None           # [n_latents] selection scores, when features were chosen
    info: dict = field(default_factory=dict)

    @property
    def dictionaries(self) -> dict[str, Any]:
        return {self.site: self.dictionary}

    def apply(self, codes: torch.Tensor, error: torch.Tensor, where: torch.Tensor | None = None):
        """Edit (codes [batch, pos, n_latents], error [batch, pos, d_in]) at `where` [batch, pos]
        (default every position)."""
        if where is None:
            where = torch.ones(codes.shape[:2], dtype=torch.bool, device=codes.device)
        if self.features is not None:
            codes, error = set_codes(self.features, self.values, where)(codes, error)
        if self.eraser is not None:
            x = self.dictionary.decode(codes) + error
            error = error + torch.where(where.to(x.device)[..., None], self.eraser.delta(x), 0)
        return codes, error

    @property
    def edit(self) -> Edit:
        """The Edit acting at every position."""
        return lambda codes, error: self.apply(codes, error)

    def edit_at(self, where: torch.Tensor) -> Edit:
        """The Edit acting at positions `where` [batch, pos] only."""
        return lambda codes, error: self.apply(codes, error, where)

    def run(self, model: Any, inputs: Any, attention_mask: torch.Tensor | None = None, *,
            positions: Positions = None, **kwargs: Any) -> SplicedRun:
        """`run_spliced` of `inputs` with this erasure at `positions` (default all)."""
        ids, mask = token_batch(model, inputs, attention_mask)
        where = position_mask(positions, *ids.shape, device=ids.device)
        return run_spliced(model, self.dictionaries, ids, mask, edits={self.site: self.edit_at(where)}, **kwargs)


def erase(model: Any, dictionaries: Mapping[str, Any] | None, site: str, inputs: Any,
          labels: torch.Tensor | None, *, method: str = "features", k: int | None = None,
          select: str = "mean_diff", metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
          ablation: str = "mean", attention_mask: torch.Tensor | None = None, positions: Positions = None,
          svd_tol: float | None = None) -> Erasure:
    """Fit an erasure of the concept `labels` at `site` on `inputs` (module docstring).

    labels: one class id per sequence [batch] (read at `positions`, default the last real token)
    or per token [batch, pos] (-1 = unlabelled). dictionaries: {site: Dictionary}; needed for
    method "features", optional for the others (leace / mean_diff edit the activation whatever
    is spliced; without a dictionary the identity is used). k: how many features or components
    to ablate (features / pca / neurons), chosen by `select` ("mean_diff" or "attribution" with
    `metric`), set to their mean code over every real token of `inputs` (ablation="mean") or 0."""
    if method not in METHODS:
        raise ValueError(f"unknown erasure method {method!r}; valid methods: {METHODS}")
    if site not in model.sites:
        raise ValueError(f"{site!r} is not a site of {model.name}; sites are e.g. {list(model.sites)[:4]}")
    width = model.sites[site].width
    given = (dictionaries or {}).get(site)
    if method == "features" and given is None:
        raise ValueError(f"method='features' ablates SAE features: pass dictionaries={{{site!r}: sae}}")
    if method in ("features", "pca", "neurons") and k is None:
        raise ValueError(f"method={method!r} ablates k features: pass k=...")
    # the dictionary spliced at the site: the SAE for "features"; the user's (else the identity) for the
    # activation-space erasers; the neuron basis or a PCA fitted below for the baselines
    d = given if method == "features" or (method in ("leace", "mean_diff") and given is not None) \
        else IdentityDictionary(width)
    check_dictionaries(model, {site: d})
    ids, mask = token_batch(model, inputs, attention_mask)
    real = _real(ids, mask)
    if method in ("leace", "mean_diff"):
        if labels is None:
            raise ValueError(f"method={method!r} fits on labelled activations: pass labels")
        x = run_spliced(model, {site: IdentityDictionary(width)}, ids, mask, logits=False).acts[site]
        where, z = label_positions(labels, ids, mask, positions)
        eraser = LeaceEraser.fit(x[where].detach(), z[where].cpu(), svd_tol=svd_tol,
                                 method="leace" if method == "leace" else "orth")
        return Erasure(site, method, d, eraser=eraser, info={"rank": eraser.rank})
    if method == "pca":
        x = run_spliced(model, {site: IdentityDictionary(width)}, ids, mask, logits=False).acts[site]
        d = PCADictionary.fit(x[real].detach())
    dicts = {site: d}
    feats, scores = select_concept_features(model, dicts, site, ids, labels, k=k, method=select, metric=metric,
                                            ablation=ablation, attention_mask=mask, positions=positions)
    if ablation == "mean":
        codes = run_spliced(model, dicts, ids, mask, logits=False).codes[site]
        values = token_mean(codes, real)[feats.to(codes.device)].detach()
    else:
        values = torch.zeros(len(feats))
    return Erasure(site, method, d, features=feats, values=values, scores=scores,
                   info={"k": len(feats), "select": select, "ablation": ablation})


def feature_erasure(dictionary: Any, site: str, features: Any, values: torch.Tensor | float = 0.0) -> Erasure:
    """An Erasure that sets given feature ids [k] of `dictionary` at `site` to `values` ([k] or a
    scalar): for hand-picked features; `features=[]` gives the no-op erasure."""
    feats = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    vals = torch.as_tensor(values, dtype=torch.float32)
    vals = vals.expand(len(feats)).clone() if vals.dim() == 0 else vals.reshape(-1)
    if vals.shape[0] != feats.shape[0]:
        raise ValueError(f"got {feats.shape[0]} features but {vals.shape[0]} values")
    return Erasure(site, "features", dictionary, features=feats, values=vals)


# --- the report -----------------------------------------------------------------------------------
def edited_positions(ids: torch.Tensor) -> torch.Tensor:
    """Where an erasure acts by default: every position but 0, bool [batch, pos]. Position 0
    holds BOS or, in SmolLM2, the attention-sink token (~100x the others' norm): editing it
    would dominate the edit size and the collateral damage while carrying no concept."""
    where = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    where[:, 0] = False
    return where


def erasure_report(model: Any, erasure: Erasure, inputs: Any, labels: torch.Tensor, *,
                   metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   attention_mask: torch.Tensor | None = None, positions: Positions = None,
                   unrelated: Any = None, unrelated_mask: torch.Tensor | None = None,
                   train_fraction: float = 0.5, seed: int = 0) -> dict[str, float]:
    """The numbers of the module docstring for `erasure` on held-out `inputs` with `labels`
    (as in `erase`), as a flat dict (one DataFrame row). The erasure acts at every position but
    0 (`edited_positions`), and the probes and edit size are measured on those tokens. The probe
    is fitted on a random `train_fraction` of the labelled tokens and tested on the rest; `metric`
    (logits -> [batch] or scalar, averaged) and `unrelated` (token ids or text) are optional (NaN
    if absent)."""
    ids, mask = token_batch(model, inputs, attention_mask)
    site = erasure.site
    plain = run_spliced(model, erasure.dictionaries, ids, mask, logits=metric is not None)
    edited = edited_positions(ids)
    erased = erasure.run(model, ids, mask, positions=edited, logits=metric is not None)
    real = _real(ids, mask) & edited
    out: dict[str, float] = {"method": erasure.method, "site": site}
    out["n_features"] = float(len(erasure.features)) if erasure.features is not None else math.nan
    out["rank"] = float(erasure.eraser.rank) if erasure.eraser is not None else math.nan
    out["metric_before"] = float(metric(plain.logits).float().mean()) if metric else math.nan
    out["metric_after"] = float(metric(erased.logits).float().mean()) if metric else math.nan
    out["edit_l2"] = float(erased.edit_norm(site)[real].mean())

    where, z = label_positions(labels, ids, mask, positions)
    where = where & edited
    x, x_erased, y = erased.acts[site][where], erased.outputs[site][where], z[where].cpu()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(train_fraction * len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    if n_train < 2 or len(te) < 1 or y[tr].unique().numel() < 2:
        raise ValueError(f"too few labelled tokens ({len(y)}) to train and test a probe with "
                         f"train_fraction={train_fraction}: pass more inputs")
    probe = fit_probe(x[tr], y[tr])
    retrained = fit_probe(x_erased[tr], y[tr])
    out["probe_acc_before"] = probe.accuracy(x[te], y[te])
    out["probe_acc_after"] = probe.accuracy(x_erased[te], y[te])
    out["probe_acc_retrained"] = retrained.accuracy(x_erased[te], y[te])
    out["chance"] = float(torch.bincount(y[te] - y.min()).max() / len(te))

    out.update(kl_unrelated=math.nan, ce_before=math.nan, ce_after=math.nan, ce_increase=math.nan)
    if unrelated is not None:
        u_ids, u_mask = token_batch(model, unrelated, unrelated_mask)
        clean = run_spliced(model, erasure.dictionaries, u_ids, u_mask).logits
        erased_u = erasure.run(model, u_ids, u_mask, positions=edited_positions(u_ids)).logits
        out.update(collateral(clean, erased_u, u_ids, u_mask))
    return out


def collateral(clean: torch.Tensor, edited: torch.Tensor, ids: torch.Tensor,
               mask: torch.Tensor | None = None) -> dict[str, float]:
    """Damage on text unrelated to the concept, from clean and edited logits [batch, pos, vocab]:
    mean over real tokens of KL(p_clean || p_edited), and next-token cross-entropy before/after."""
    real = _real(ids, mask)
    logp, logq = clean.double().log_softmax(-1), edited.double().log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)                          # [batch, pos]
    nxt = real[:, 1:] & real[:, :-1]
    target = ids[:, 1:].to(clean.device)
    ce_p = -logp[:, :-1].gather(-1, target[..., None])[..., 0][nxt].mean()
    ce_q = -logq[:, :-1].gather(-1, target[..., None])[..., 0][nxt].mean()
    return {"kl_unrelated": float(kl[real].mean()), "ce_before": float(ce_p), "ce_after": float(ce_q),
            "ce_increase": float(ce_q - ce_p)}
