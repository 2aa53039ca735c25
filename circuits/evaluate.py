"""Circuit evaluation by ablation: faithfulness, completeness, edge and node checks, rankings.

The model M is the set of all nodes at the spliced sites (every feature of every dictionary and
one error node per site, per position when nodes are per position). A circuit C ⊆ M is a set of
nodes (a circuit graph's feature and error nodes, or node ids). With m the metric averaged over
the batch, m(S) is its value when every node outside S is ablated and the nodes in S run freely
(Marks et al. 2024, "Sparse Feature Circuits", arXiv 2403.19647, their faithfulness and
completeness; the normalisation follows Wang et al. 2022's IOI circuit evaluation):

    faithfulness(C) = (m(C) - m(∅)) / (m(M) - m(∅))     1 for C = M, 0 for C = ∅ by construction
    completeness(C) = (m(M \\ C) - m(∅)) / (m(M) - m(∅))  faithfulness of the complement: 0 when C
                                                        holds everything that matters, 1 when
                                                        removing C changes nothing

Ablating node (site, i, p) sets code i at position p to a reference value a and leaves the
others alone; at a site with error e the splice passes on x + (a - c_i) f_i (features) or
x + (ē - e) (error). Reference values (`ablation`):

    "mean"   over the reference batch's real tokens (default: the inputs themselves), per position
             when per_position=True (SFC's default; sequences must then have equal length):
             a[p] = mean_b c[b, p]; else one mean over all tokens (both `interventions.means.
             token_mean`, the toolkit's one mean-ablation reference). The error node gets the
             mean error, so ablating a whole site gives decode(ā) + ē = mean activation there.
    "zero"   a = 0, ē = 0 (ablating a whole site leaves decode(0) = b_dec there).
    "patch"  the codes and errors of a counterfactual batch (same shape) at the same position.

Sites are visited in forward order in one traced forward: codes at a later site are computed
from the already-ablated earlier sites, then that site's ablations apply (as SFC's
`run_with_ablations`). m(M) is the unablated model, bit for bit.

Edges. The edge u -> d (u upstream) is ablated exactly by path patching restricted to that edge
(Wang et al. 2022, arXiv 2211.00593; Goldowsky-Dill et al. 2023, arXiv 2304.05969):

    run A: ablate u; hold every spliced site strictly between u's and d's at its clean value
           (codes and error := clean, so the site passes on exactly its clean activation);
           read d's value d_A (code, or error vector, at d's position or all positions)
    run B: the clean run with only d set to d_A
    measured(u -> d) = mean_b [m_B - m(M)]

so d receives what it would get from an ablated u along direct paths, while every other node
sees u clean. For d = the metric node, run A holds every spliced site after u's and measures
m directly (u's direct effect on m). An input node input/<q> is the token embedding at q (the
input of block 0; spliced with the identity dictionary when "embed" has no dictionary), ablated
as a whole. This is the quantity the edge weight of `circuits.edges`,
∇_d m · ∂d/∂u · (u_ablated - u) with every other spliced site held at its clean value,
approximates to first order. The spliced API allows exactly this without hooks: each run is one
`run_spliced` call whose per-site edits overwrite codes/errors where a mask says so.

Node checks ablate one node at a time: measured(v) = mean_b [m({v} ablated) - m(M)], the exact
version of an attribution-patching node effect ∇_v m · (v_ablated - v). `ranking_agreement`
compares two rankings: Spearman's rank correlation (Pearson's r of average ranks) and top-k
overlap |top_k(a) ∩ top_k(b)| / k, by |score| unless absolute=False.

All variants (circuits, nodes, edges) are stacked along the batch: one forward runs
batch_size // batch variants at once, each its own block of rows with its own ablation masks.
The metric is called once per block with logits [batch, pos, vocab] and must return [batch]
(a metric of two arguments is called as metric(logits, rows), as in `circuits.attribution`).
It may instead name a feature node ("resid.3/f12", "resid.3/f12@4"): m is then that feature's
activation, encode(x_site) read where the model computed it, summed over real positions unless
a position is given (the metric of `circuits.trace`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import networkx as nx
import numpy as np
import pandas as pd
import torch

from interventions.means import token_mean
from interventions.spliced import SplicedRun, check_dictionaries, dictionary_tensor, run_spliced, token_batch
from sae.baselines import IdentityDictionary

from .attribution import INPUT_SITE, metric_caller
from .nodes import Node, circuit_nodes, parse_node

ABLATIONS = ("mean", "zero", "patch")
#: A metric: logits [batch, pos, vocab] -> [batch]; or a feature node whose activation is the
#: metric ("resid.3/f12", "resid.3/f12@4", or (site, feature[, position])).
Metric = Union[Callable[[torch.Tensor], torch.Tensor], str, tuple]


def _effects(scores: Any) -> pd.Series:
    if isinstance(scores, nx.Graph):
        return pd.Series({n: float(d["effect"]) for n, d in scores.nodes(data=True)
                          if d.get("kind") in ("feature", "error") and d.get("effect") is not None}, dtype=float)
    if isinstance(scores, pd.Series):
        return scores.astype(float)
    if isinstance(scores, Mapping):
        return pd.Series({k: float(v) for k, v in scores.items()}, dtype=float)
    if isinstance(scores, (torch.Tensor, np.ndarray, list, tuple)):
        arr = torch.as_tensor(scores).detach().double().cpu().reshape(-1).numpy()
        return pd.Series(arr)
    raise TypeError(f"a ranking is a circuit graph (node effects), a pandas Series, a mapping "
                    f"{{node: score}} or a 1-D tensor/array; got {type(scores).__name__}")


def ranking_agreement(a: Any, b: Any, *, k: int = 10, absolute: bool = True) -> dict[str, float]:
    """Agreement of two node rankings: {"spearman", "top_k_overlap", "k", "n"}.

    a, b: circuit graphs (node `effect`), Series / mappings keyed by node, or 1-D tensors of the
    same length (same order). They must score the same nodes. Ranked by |score| unless
    absolute=False. Spearman's rho is NaN when either ranking is constant."""
    sa, sb = _effects(a), _effects(b)
    if set(sa.index) != set(sb.index):
        only_a = [x for x in sa.index if x not in set(sb.index)][:3]
        only_b = [x for x in sb.index if x not in set(sa.index)][:3]
        raise ValueError(f"the two rankings score different nodes ({len(sa)} vs {len(sb)}; only in the "
                         f"first: {only_a}, only in the second: {only_b}); compare them on common "
                         f"nodes, e.g. b[a.index]")
    if len(sa) < 2:
        raise ValueError(f"need at least 2 nodes to compare rankings, got {len(sa)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    sb = sb.loc[sa.index]
    if absolute:
        sa, sb = sa.abs(), sb.abs()
    ra, rb = sa.rank(method="average"), sb.rank(method="average")
    rho = float(np.corrcoef(ra, rb)[0, 1]) if ra.std() > 0 and rb.std() > 0 else float("nan")
    k = min(k, len(sa))
    top_a = set(sa.sort_values(ascending=False, kind="stable").index[:k])
    top_b = set(sb.sort_values(ascending=False, kind="stable").index[:k])
    return {"spearman": rho, "top_k_overlap": len(top_a & top_b) / k, "k": k, "n": len(sa)}


# --- the ablation engine ----------------------------------------------------------------------------
@dataclass
class _Op:
    """One site's edit in one variant: codes := where(feat_mask, feat_val, codes), likewise the
    error. Masks [pos, n] / [pos] (same for every row) or [batch, pos, n] / [batch, pos]; values
    broadcast against [batch, pos, n] / [batch, pos, d]."""

    feat_mask: torch.Tensor | None = None
    feat_val: torch.Tensor | None = None
    err_mask: torch.Tensor | None = None
    err_val: torch.Tensor | None = None


Variant = dict  # {site: _Op}


class _Ablator:
    """Clean run, reference values and batched ablated forwards for one model, batch and metric."""

    def __init__(self, model: Any, dictionaries: Mapping[str, Any], inputs: Any, metric: Metric, *,
                 attention_mask: torch.Tensor | None = None, ablation: str = "mean", reference: Any = None,
                 reference_mask: torch.Tensor | None = None, per_position: bool = True, batch_size: int = 64):
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {ablation!r}; choose one of {ABLATIONS}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.dicts = model, dict(dictionaries)
        self.sites = [s.name for s in check_dictionaries(model, self.dicts)]
        self.ids, self.mask = token_batch(model, inputs, attention_mask)
        self.b, self.p = self.ids.shape
        self.batch_size = batch_size
        self._metric_setup(metric)
        clean = run_spliced(model, self.dicts, self.ids, self.mask, logits=self.needs_logits)
        self.clean_codes = {s: clean.codes[s] for s in self.sites}          # [b, p, n]
        self.clean_errors = {s: clean.errors[s] for s in self.sites}        # [b, p, d]
        self.m_clean = self._measure(clean, 1)[0]                            # [b]
        self.ref = self._reference(ablation, reference, reference_mask, per_position)

    # metric --------------------------------------------------------------------------------
    def _metric_setup(self, metric: Metric) -> None:
        if callable(metric):
            self.metric, self.feature_metric, self.needs_logits = metric_caller(metric), None, True
            return
        node = parse_node(metric) if isinstance(metric, (str, tuple)) else None
        if node is None or node.feature == "error":
            raise TypeError(f"metric must be a function logits [batch, pos, vocab] -> [batch] or a feature "
                            f"node such as 'resid.3/f12' (its activation); got {metric!r}")
        if node.site not in self.dicts:
            raise ValueError(f"the metric feature {metric!r} is at {node.site}, which has no dictionary here; "
                             f"add dictionaries[{node.site!r}]")
        if not 0 <= int(node.feature) < self.dicts[node.site].n_latents:
            raise ValueError(f"metric feature {node.feature} is out of range at {node.site}")
        if node.position is not None and not 0 <= node.position < self.p:
            raise ValueError(f"metric position {node.position} is out of range for {self.p} tokens")
        self.metric, self.feature_metric, self.needs_logits = None, node, False

    def _measure(self, run: SplicedRun, k: int) -> list[torch.Tensor]:
        """The metric of each of the k blocks of `run`'s rows: k tensors [b] (detached, float64)."""
        b = self.b
        if self.feature_metric is not None:
            node = self.feature_metric
            d = self.dicts[node.site]
            with torch.no_grad():
                c = d.encode(dictionary_tensor(d, run.acts[node.site]))[..., int(node.feature)]   # [k*b, p]
            c = c[:, node.position] if node.position is not None else \
                (c * (self.mask.to(c).repeat(k, 1) if self.mask is not None else 1)).sum(1)
            return list(c.detach().double().cpu().reshape(k, b))
        m = self.metric(run.logits, b, slice(0, b))                              # [k, b]
        return list(m.detach().double().cpu())

    # reference values ---------------------------------------------------------------------------
    def _reference(self, ablation, reference, reference_mask, per_position) -> dict[str, tuple]:
        """{site: (codes broadcastable to [b, p, n], errors broadcastable to [b, p, d])}."""
        self.ablation = ablation
        if ablation == "zero":
            if reference is not None:
                raise ValueError("ablation='zero' takes no reference")
            return {s: (torch.zeros((), dtype=c.dtype, device=c.device),
                        torch.zeros((), dtype=self.clean_errors[s].dtype, device=c.device))
                    for s, c in self.clean_codes.items()}
        if ablation == "patch" and reference is None:
            raise ValueError("ablation='patch' needs reference=... : the counterfactual token ids, same "
                             "shape as the inputs")
        if reference is None:
            codes, errors, mask = self.clean_codes, self.clean_errors, self.mask
        else:
            r_ids, r_mask = token_batch(self.model, reference, reference_mask)
            if ablation == "patch" and r_ids.shape != self.ids.shape:
                raise ValueError(f"a patch reference must have the inputs' shape [batch, pos] = "
                                 f"{tuple(self.ids.shape)}, got {tuple(r_ids.shape)}")
            if ablation == "mean" and per_position and r_ids.shape[1] != self.p:
                raise ValueError(f"per-position means need a reference of the inputs' length ({self.p} "
                                 f"tokens), got {r_ids.shape[1]}; pass per_position=False for one mean over "
                                 f"all tokens")
            run = run_spliced(self.model, self.dicts, r_ids, r_mask, logits=False)
            codes, errors, mask = run.codes, run.errors, r_mask
        if ablation == "patch":
            return {s: (codes[s].detach(), errors[s].detach()) for s in self.sites}
        out = {}
        for s in self.sites:
            c, e = codes[s].detach(), errors[s].detach()                       # [b, p, n], [b, p, d]
            if per_position:                                                    # [1, p, n], [1, p, d]
                out[s] = (token_mean(c, mask, per_position=True)[None], token_mean(e, mask, per_position=True)[None])
            else:                                                               # [1, 1, n], [1, 1, d]
                out[s] = (token_mean(c, mask)[None, None], token_mean(e, mask)[None, None])
        return out

    # masks -----------------------------------------------------------------------------------
    def nodes_of(self, circuit: Any) -> dict[Any, Node]:
        """`circuit_nodes(circuit)`, each checked against these dictionaries and inputs."""
        nodes = circuit_nodes(circuit)
        for key, node in nodes.items():
            self.check_node(node, key)
        return nodes

    def check_node(self, node: Node, key: Any = None) -> Node:
        where = f"node {key if key is not None else node!r}"
        if node.site not in self.dicts:
            raise ValueError(f"{where} is at {node.site!r}, which has no dictionary; dictionaries are given "
                             f"for {self.sites}")
        if node.feature != "error" and not 0 <= int(node.feature) < self.dicts[node.site].n_latents:
            raise ValueError(f"{where}: feature {node.feature} is out of range at {node.site} "
                             f"({self.dicts[node.site].n_latents} latents)")
        if node.position is not None and not 0 <= node.position < self.p:
            raise ValueError(f"{where}: position {node.position} is out of range for inputs of {self.p} "
                             f"tokens (were the graph and these inputs made from the same prompts?)")
        return node

    def masks(self, nodes: Iterable[Node]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{site: (features [p, n] bool, error [p] bool)}: True where a node of `nodes` sits."""
        out = {s: (torch.zeros(self.p, self.dicts[s].n_latents, dtype=torch.bool, device=c.device),
                   torch.zeros(self.p, dtype=torch.bool, device=c.device))
               for s, c in self.clean_codes.items()}
        for node in nodes:
            f, e = out[node.site]
            pos = slice(None) if node.position is None else node.position
            if node.feature == "error":
                e[pos] = True
            else:
                f[pos, int(node.feature)] = True
        return out

    def ablate(self, masks: Mapping[str, tuple[torch.Tensor, torch.Tensor]], invert: bool = False) -> Variant:
        """The variant that ablates the nodes marked in `masks` (or all the others, invert=True)."""
        variant = {}
        for s, (f, e) in masks.items():
            f, e = (~f, ~e) if invert else (f, e)
            if f.any() or e.any():
                variant[s] = _Op(f, self.ref[s][0], e, self.ref[s][1])
        return variant

    # running -----------------------------------------------------------------------------------
    def run(self, variants: Sequence[Variant], read: Callable[[SplicedRun, int], Any] | None = None,
            logits: bool | None = None) -> list:
        """Metric per variant (tensors [b]), or `read(run, k)` per chunk of k variants, concatenated."""
        per = max(1, self.batch_size // self.b)
        out: list = []
        for lo in range(0, len(variants), per):
            chunk = list(variants[lo:lo + per])
            k = len(chunk)
            edits = {s: self._edit(s, [v.get(s) for v in chunk]) for s in self.sites
                     if any(s in v for v in chunk)}
            ids = self.ids.repeat(k, 1)
            mask = None if self.mask is None else self.mask.repeat(k, 1)
            need = self.needs_logits if logits is None else logits
            run = run_spliced(self.model, self.dicts, ids, mask, edits=edits, logits=need)
            out.extend(read(run, k) if read is not None else self._measure(run, k))
        return out

    def _edit(self, site: str, ops: list[_Op | None]):
        """The Edit for `site` over stacked variants (one block of b rows per op)."""
        b, p = self.b, self.p
        n, d = self.clean_codes[site].shape[-1], self.clean_errors[site].shape[-1]
        dev = self.clean_codes[site].device

        def rows(mask, shape):  # [k*b, p(, n)] bool
            parts = []
            for m in mask:
                if m is None:
                    parts.append(torch.zeros((b,) + shape, dtype=torch.bool, device=dev))
                else:
                    parts.append(m.to(dev).expand((b,) + shape))
            return torch.cat(parts)

        def values(vals, width):  # broadcastable to [k*b, p, width]
            real = [v for v in vals if v is not None]
            if real and all(v is real[0] for v in real) and (real[0].dim() < 3 or real[0].shape[0] == 1):
                return real[0]                             # one shared value: no copies
            parts = []
            for v in vals:
                v = torch.zeros((), device=dev) if v is None else v
                parts.append(v.to(dev).expand(b, p, width))
            return torch.cat(parts)

        fm = [None if o is None else o.feat_mask for o in ops]
        em = [None if o is None else o.err_mask for o in ops]
        feat_mask = rows(fm, (p, n)) if any(m is not None for m in fm) else None
        err_mask = rows(em, (p,)) if any(m is not None for m in em) else None
        feat_val = values([None if o is None else o.feat_val for o in ops], n) if feat_mask is not None else None
        err_val = values([None if o is None else o.err_val for o in ops], d) if err_mask is not None else None

        def edit(codes: torch.Tensor, error: torch.Tensor):
            if feat_mask is not None:
                codes = torch.where(feat_mask, feat_val.to(codes), codes)
            if err_mask is not None:
                error = torch.where(err_mask[..., None], err_val.to(error), error)
            return codes, error
        return edit


# --- public API ---------------------------------------------------------------------------------
@dataclass
class CircuitScores:
    """Faithfulness and completeness of one circuit (module docstring); m_* are batch means."""

    n_nodes: int
    faithfulness: float
    completeness: float
    m_circuit: float       # m(C): everything outside C ablated
    m_complement: float    # m(M \ C): C ablated
    m_full: float          # m(M): the unablated model
    m_empty: float         # m(∅): every node ablated


def _scores(n_nodes: int, m_c: float, m_comp: float, m_full: float, m_empty: float) -> CircuitScores:
    denom = m_full - m_empty
    if abs(denom) <= 1e-12 * max(1.0, abs(m_full)):
        raise ValueError(f"the metric does not move when every node is ablated (m(M) = {m_full:.6g}, "
                         f"m(∅) = {m_empty:.6g}): faithfulness is undefined. Use a metric the sites affect, "
                         f"or another ablation (e.g. 'patch' with a counterfactual)")
    return CircuitScores(n_nodes, (m_c - m_empty) / denom, (m_comp - m_empty) / denom, m_c, m_comp, m_full, m_empty)


def _circuit_masks(ab: _Ablator, circuit: Any):
    nodes = ab.nodes_of(circuit)
    return ab.masks(nodes.values()), len(nodes)


def faithfulness(model: Any, dictionaries: Mapping[str, Any], inputs: Any, metric: Metric, circuit: Any, *,
                 attention_mask: torch.Tensor | None = None, ablation: str = "mean", reference: Any = None,
                 reference_mask: torch.Tensor | None = None, per_position: bool = True,
                 batch_size: int = 64) -> CircuitScores:
    """Faithfulness and completeness of `circuit` (a circuit graph or node ids) on `inputs`.

    dictionaries: {site: Dictionary}; their sites define M (nodes there outside the circuit are
    ablated). metric: logits [batch, pos, vocab] -> [batch], or a feature node id whose
    activation is the metric. ablation / reference / per_position: see the module docstring.
    batch_size: rows per forward (variants are stacked along the batch). Four ablated
    variants (C, M \\ C, M, ∅) run in batched forwards."""
    ab = _Ablator(model, dictionaries, inputs, metric, attention_mask=attention_mask, ablation=ablation,
                  reference=reference, reference_mask=reference_mask, per_position=per_position,
                  batch_size=batch_size)
    masks, n = _circuit_masks(ab, circuit)
    empty = ab.masks([])
    m_c, m_comp, m_empty = ab.run([ab.ablate(masks, invert=True), ab.ablate(masks), ab.ablate(empty, invert=True)])
    return _scores(n, float(m_c.mean()), float(m_comp.mean()), float(ab.m_clean.mean()), float(m_empty.mean()))


def faithfulness_curve(model: Any, dictionaries: Mapping[str, Any], inputs: Any, metric: Metric,
                       graph: nx.DiGraph, thresholds: Sequence[float] | None = None, *,
                       attention_mask: torch.Tensor | None = None, ablation: str = "mean",
                       reference: Any = None, reference_mask: torch.Tensor | None = None,
                       per_position: bool = True, batch_size: int = 64) -> pd.DataFrame:
    """Faithfulness and completeness of the sub-circuits C_t = {v : |effect(v)| >= t} of `graph`.

    thresholds: default 12 log-spaced values between the smallest and largest |effect| of the
    graph's feature and error nodes, and 0 (the whole graph). Returns a DataFrame with columns
    threshold, n_nodes, faithfulness, completeness, m_circuit, m_complement (sorted by
    decreasing threshold); m(M) and m(∅) are in `df.attrs`."""
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"faithfulness_curve reads node effects from a circuit graph, got {type(graph).__name__}")
    eff = _effects(graph).abs()
    if eff.empty:
        raise ValueError("the graph has no feature or error nodes with an `effect`")
    if thresholds is None:
        positive = eff[eff > 0]
        grid = np.geomspace(positive.min(), positive.max(), 12) if len(positive) else np.array([])
        thresholds = sorted(set(grid.tolist()) | {0.0}, reverse=True)
    thresholds = [float(t) for t in thresholds]
    if any(not math.isfinite(t) or t < 0 for t in thresholds):
        raise ValueError(f"thresholds must be finite and >= 0, got {thresholds}")
    ab = _Ablator(model, dictionaries, inputs, metric, attention_mask=attention_mask, ablation=ablation,
                  reference=reference, reference_mask=reference_mask, per_position=per_position,
                  batch_size=batch_size)
    nodes = ab.nodes_of(graph)
    variants, sizes = [ab.ablate(ab.masks([]), invert=True)], []
    for t in thresholds:
        chosen = [nodes[key] for key, e in eff.items() if e >= t and key in nodes]
        masks = ab.masks(chosen)
        variants += [ab.ablate(masks, invert=True), ab.ablate(masks)]
        sizes.append(len(chosen))
    results = ab.run(variants)
    m_full, m_empty = float(ab.m_clean.mean()), float(results[0].mean())
    rows = []
    for i, (t, n) in enumerate(zip(thresholds, sizes)):
        s = _scores(n, float(results[1 + 2 * i].mean()), float(results[2 + 2 * i].mean()), m_full, m_empty)
        rows.append({"threshold": t, "n_nodes": n, "faithfulness": s.faithfulness,
                     "completeness": s.completeness, "m_circuit": s.m_circuit, "m_complement": s.m_complement})
    df = pd.DataFrame(rows).sort_values("threshold", ascending=False, kind="stable").reset_index(drop=True)
    df.attrs.update(m_full=m_full, m_empty=m_empty, ablation=ablation)
    return df


def ablation_effects(model: Any, dictionaries: Mapping[str, Any], inputs: Any, metric: Metric, nodes: Any, *,
                     attention_mask: torch.Tensor | None = None, ablation: str = "mean", reference: Any = None,
                     reference_mask: torch.Tensor | None = None, per_position: bool = True,
                     batch_size: int = 64) -> pd.Series:
    """Exact effect of ablating each node alone: mean_b [m({v} ablated) - m(M)], a Series
    indexed like `nodes` (graph node ids, id strings or tuples). Batched: batch_size // batch
    nodes per forward."""
    ab = _Ablator(model, dictionaries, inputs, metric, attention_mask=attention_mask, ablation=ablation,
                  reference=reference, reference_mask=reference_mask, per_position=per_position,
                  batch_size=batch_size)
    parsed = ab.nodes_of(nodes)
    keys = list(parsed)
    results = ab.run([ab.ablate(ab.masks([parsed[k]])) for k in keys])
    return pd.Series([float((r - ab.m_clean).mean()) for r in results], index=pd.Index(keys, dtype=object),
                     dtype=float, name="ablation_effect")


def check_nodes(model: Any, dictionaries: Mapping[str, Any], inputs: Any, metric: Metric, graph: nx.DiGraph, *,
                k: int = 10, **options: Any) -> pd.DataFrame:
    """Compare each feature/error node's attributed `effect` with its exact ablation effect.

    Returns a DataFrame (node, effect, measured) sorted by |measured|, with the agreement of the
    two rankings (`ranking_agreement`: spearman, top_k_overlap) in `df.attrs`. options: those of
    `ablation_effects`; use the ablation the graph's effects were computed for."""
    est = _effects(graph)
    measured = ablation_effects(model, dictionaries, inputs, metric, list(est.index), **options)
    df = pd.DataFrame({"node": list(est.index), "effect": est.values, "measured": measured.loc[est.index].values})
    if len(df) >= 2:
        df.attrs.update(ranking_agreement(est, measured, k=k))
    return df.reindex(df["measured"].abs().sort_values(ascending=False).index).reset_index(drop=True)


def check_edges(model: Any, dictionaries: Mapping[str, Any], inputs: Any, metric: Metric, graph: nx.DiGraph,
                edges: Iterable[tuple[Any, Any]] | None = None, *, top: int | None = 20,
                attention_mask: torch.Tensor | None = None, ablation: str = "mean", reference: Any = None,
                reference_mask: torch.Tensor | None = None, per_position: bool = True,
                batch_size: int = 64) -> pd.DataFrame:
    """Ablate edges one at a time (module docstring: path patching along the edge) and compare
    with their predicted `weight`.

    edges: (source, target) pairs of `graph`; default the `top` edges by |weight| (all when
    top=None). An input node input/<q> is the token embedding at q (the input of block 0, as in
    `circuits.edges`): it is ablated by setting that embedding to the reference's (the
    counterfactual token with ablation="patch"). Use the ablation the graph was built for
    (graphs from `circuits.build_graph` use a counterfactual: ablation="patch",
    reference=counterfactual ids). Returns a DataFrame source, target, weight, measured, with
    `ranking_agreement` of weight and measured (when >= 2 edges) in `df.attrs`."""
    if not isinstance(graph, nx.DiGraph):
        raise TypeError(f"check_edges reads edges from a circuit graph, got {type(graph).__name__}")
    if edges is None:
        edges = sorted(graph.edges, key=lambda e: -abs(float(graph.edges[e].get("weight", 0.0))))
        edges = edges if top is None else edges[:top]
    edges = list(edges)
    if not edges:
        raise ValueError("no edges to check: the graph has none (or top=0)")
    for u, v in edges:
        if not graph.has_edge(u, v):
            raise ValueError(f"({u!r}, {v!r}) is not an edge of the graph")
    kind = lambda n: graph.nodes[n].get("kind")   # noqa: E731
    dicts = dict(dictionaries)
    if any(kind(u) == "input" for u, _ in edges) and INPUT_SITE not in dicts:
        dicts[INPUT_SITE] = IdentityDictionary(model.sites[INPUT_SITE].width)   # the token embeddings
    ab = _Ablator(model, dicts, inputs, metric, attention_mask=attention_mask, ablation=ablation,
                  reference=reference, reference_mask=reference_mask, per_position=per_position,
                  batch_size=batch_size)
    order = {s: i for i, s in enumerate(ab.sites)}
    to_metric, through = [], []     # (edge index, stage-A variant) / (edge index, variant, dst Node)
    for i, (u, v) in enumerate(edges):
        if kind(u) == "input":
            q = graph.nodes[u].get("position")
            if q is None or not 0 <= int(q) < ab.p:
                raise ValueError(f"input node {u!r} has position {q!r}, out of range for {ab.p} tokens")
            src_site, variant = INPUT_SITE, _ablate_position(ab, INPUT_SITE, int(q))
        else:
            src = parse_node(u, graph)
            if src is None:
                raise ValueError(f"edge ({u!r}, {v!r}) starts at the metric node")
            ab.check_node(src, u)
            src_site, variant = src.site, ab.ablate(ab.masks([src]))
        into_metric = kind(v) == "metric"
        if not into_metric and ab.feature_metric is not None:   # the metric feature's own node
            dst = parse_node(v, graph)
            into_metric = dst is not None and dst.site == ab.feature_metric.site and \
                dst.feature == ab.feature_metric.feature and dst.position == ab.feature_metric.position
        if into_metric:
            for s in ab.sites[order[src_site] + 1:]:
                variant[s] = _hold(ab, s)
            to_metric.append((i, variant))
            continue
        dst = parse_node(v, graph)
        if dst is None:
            raise ValueError(f"edge ({u!r}, {v!r}) ends at an input node")
        ab.check_node(dst, v)
        if order[dst.site] < order[src_site] or (order[dst.site] == order[src_site] and kind(u) != "input"):
            raise ValueError(f"edge ({u!r}, {v!r}) does not go forward: {dst.site} is not after {src_site}")
        for s in ab.sites[order[src_site] + 1:order[dst.site]]:
            variant[s] = _hold(ab, s)
        through.append((i, variant, dst))

    measured: dict[int, float] = {}
    if to_metric:
        for (i, _), r in zip(to_metric, ab.run([var for _, var in to_metric])):
            measured[i] = float((r - ab.m_clean).mean())
    if through:
        values = _read_values(ab, [var for _, var, _ in through], [dst for _, _, dst in through])
        b_variants = []
        for (_, _, dst), val in zip(through, values):
            f, e = ab.masks([dst])[dst.site]
            b_variants.append({dst.site: _Op(err_mask=e, err_val=val) if dst.feature == "error"
                               else _Op(feat_mask=f, feat_val=val)})
        for (i, _, _), r in zip(through, ab.run(b_variants)):
            measured[i] = float((r - ab.m_clean).mean())
    df = pd.DataFrame({"source": [u for u, _ in edges], "target": [v for _, v in edges],
                       "weight": [float(graph.edges[e].get("weight", float("nan"))) for e in edges],
                       "measured": [measured[i] for i in range(len(edges))]})
    if len(df) >= 2:
        df.attrs.update(ranking_agreement(pd.Series(df["weight"].values), pd.Series(df["measured"].values),
                                          k=min(10, len(df))))
    return df


def _ablate_position(ab: _Ablator, site: str, q: int) -> Variant:
    """Ablate every node of `site` at position q (the whole activation there)."""
    f = torch.zeros(ab.p, ab.dicts[site].n_latents, dtype=torch.bool, device=ab.clean_codes[site].device)
    e = torch.zeros(ab.p, dtype=torch.bool, device=f.device)
    f[q], e[q] = True, True
    return {site: _Op(f, ab.ref[site][0], e, ab.ref[site][1])}


def _hold(ab: _Ablator, site: str) -> _Op:
    """Hold `site` at its clean value in every row: codes and error := the clean run's."""
    full = torch.ones(ab.p, ab.dicts[site].n_latents, dtype=torch.bool, device=ab.clean_codes[site].device)
    return _Op(full, ab.clean_codes[site], full[:, 0], ab.clean_errors[site])


def _read_values(ab: _Ablator, variants: list[Variant], reads: list[Node]) -> list[torch.Tensor]:
    """Run `variants` and return, per variant, the post-edit codes [b, p, n] or errors [b, p, d]
    at the site of its read node (no edit there, except when the source sits at the same site)."""
    it = iter(reads)

    def read(run: SplicedRun, k: int):
        out = []
        for j in range(k):
            node = next(it)
            site = node.site
            rows = slice(j * ab.b, (j + 1) * ab.b)
            src = run.errors[site] if node.feature == "error" else run.codes[site]
            out.append(src[rows].detach())
        return out
    return ab.run(variants, read=read, logits=False)


__all__ = ["Node", "parse_node", "circuit_nodes", "CircuitScores", "faithfulness", "faithfulness_curve",
           "ablation_effects", "check_nodes", "check_edges", "ranking_agreement", "ABLATIONS"]
