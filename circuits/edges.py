"""Edge attribution between nodes of spliced sites, with batched vector-Jacobian products.

Marks et al. 2024 ("Sparse Feature Circuits", arXiv 2403.19647, §2) weight the edge
from an upstream node u to a downstream node d by its linearised direct effect

    e(u -> d) = grad_d m . (dd/du) . (u_cf - u_clean)

where grad_d m is d's total gradient on the clean input (as in attribution patching, Syed et al.
2023, arXiv 2310.10348), dd/du the Jacobian of d w.r.t. u with every other spliced site held at
its clean value (direct effects only), and u_cf - u_clean the node's change; an error node u is
contracted over d_model, (dd/de_u) . delta e_u, and an error node d carries the vector
cotangent grad_{e_d} m. Edges point from a site to a later one and exist when some path of the
model joins them without crossing a third spliced site. With attn.L, mlp.L and resid.L spliced
at every layer these are exactly Marks et al.'s adjacent pairs: resid.{L-1} -> attn.L, mlp.L,
resid.L; attn.L -> mlp.L (sequential blocks), resid.L; mlp.L -> resid.L. Extra pseudo-nodes:

- input/<pos>: the token embedding at pos (the input of block 0, delta = emb(cf) - emb(clean));
  when "embed" is not spliced it is spliced internally with the identity dictionary. When it
  is spliced, input/<pos> -> embed node edges are the embed nodes' own AtP effects at pos.
- metric: the edge u -> metric is u's DIRECT effect on m (grad of m with all sites held fixed).

Computation (the circuit-tracer trick; Ameisen et al. 2025, "Circuit Tracing"): one forward on the
batch repeated K times, every spliced site a gradient leaf with `stop_grad` (see
`interventions.spliced`: a stopped site passes gradient only through its codes and error, so a
leaf's gradient is the direct path), downstream codes re-encoded in the graph
(c_d = encode(x_d), e_d = x_d - decode(c_d)); then one backward per K downstream nodes: row block
k carries node k's cotangent (grad_d m at d's coordinates, zero elsewhere), and rows do not
interact, so each block's leaf gradients are the VJP for its own node. The graph is retained
between backwards, so one forward serves every node. K = rows_per_backward // batch (at least 1).
`edge_effects_reference` is the plain algorithm (Marks et al.'s code): one backward per
downstream node; both count their backwards (`n_backwards`, including the clean-gradient one).

Positions: per_position=True keeps (pos, node) pairs; otherwise the downstream node is the feature
at all positions (its cotangent covers every position) and upstream positions are summed: the
sum over positions of the per-position edges. Weights are averaged over examples. Feature nodes
that are zero on every clean example (at that position) are not expanded when skip_inactive:
ReLU, TopK, JumpReLU and gated encoders have zero Jacobian there, so their edges are exactly 0.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from interventions.spliced import dictionary_tensor, run_spliced

from .attribution import (INPUT_SITE, backward_metric, example_chunks, grad_or_zero, metric_caller, nodes_of, token_pair,
                          with_input_site)

METRIC = "metric"


@dataclass
class EdgeEffects:
    """Edge weights, averaged over examples. Node index n (= n_latents of the site) is the error.

    weights[(up, down)]: sparse COO [n_down + 1, n_up + 1], or [pos, n_down + 1, pos, n_up + 1]
    with per_position (row = downstream node, column = upstream node); absent pairs are 0.
    from_input[down]: dense [n_down + 1, pos] or [pos, n_down + 1, pos]: input/<pos> -> node.
    to_metric[site]: dense [n + 1] or [pos, n + 1]: node -> metric (direct effect on m).
    input_to_metric: [pos]."""

    weights: dict[tuple[str, str], torch.Tensor]
    from_input: dict[str, torch.Tensor]
    to_metric: dict[str, torch.Tensor]
    input_to_metric: torch.Tensor
    per_position: bool
    n_backwards: int
    n_examples: int
    sizes: dict[str, int] = field(default_factory=dict)  # site -> n_latents + 1, forward order

    def weight(self, up: str, down: str) -> torch.Tensor:
        """The dense weights of (up -> down); zeros when no edge joins the two sites."""
        for s in (up, down):
            if s not in self.sizes:
                raise KeyError(f"no spliced site {s!r}; sites: {list(self.sizes)}")
        if (up, down) in self.weights:
            return self.weights[(up, down)].to_dense()
        p = self.input_to_metric.numel()
        shape = ((p, self.sizes[down], p, self.sizes[up]) if self.per_position
                 else (self.sizes[down], self.sizes[up]))
        return torch.zeros(shape, dtype=self.input_to_metric.dtype)

    def __repr__(self) -> str:
        nnz = {f"{u}->{d}": int(w._nnz()) for (u, d), w in self.weights.items()}
        return f"EdgeEffects(examples={self.n_examples}, backwards={self.n_backwards}, nonzero={nnz})"


@contextmanager
def _frozen(dicts: Mapping[str, Any]) -> Iterator[None]:
    params = [p for d in dicts.values() if hasattr(d, "parameters") for p in d.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _downstream_values(dicts, run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Codes and errors of every downstream site, recomputed in the graph of the upstream leaves."""
    codes, errors = {}, {}
    for s, d in dicts.items():
        if s == INPUT_SITE:
            continue
        x = dictionary_tensor(d, run.acts[s])   # [rows, pos, d_in]
        codes[s] = d.encode(x)                  # [rows, pos, n]
        errors[s] = x - d.decode(codes[s])      # [rows, pos, d_in]
    return codes, errors


class _Collector:
    """Turns leaf gradients of K row blocks into edge weights, summed over examples."""

    def __init__(self, dicts, pseudo, order, clean, cf, mask, per_position):
        self.dicts, self.pseudo, self.order, self.mask, self.pp = dicts, pseudo, order, mask, per_position
        self.dc = {s: (cf.codes[s] - clean.codes[s]) * mask[..., None] for s in dicts}
        self.de = {s: (cf.errors[s] - clean.errors[s]) * mask[..., None] for s in dicts}
        self.parts: dict[tuple[str, str], list] = {}     # (u, s) -> [(indices [dims, nnz], values [nnz])]
        self.from_input: dict[str, torch.Tensor] = {}   # site -> dense [(p,) n + 1, p]
        self.to_metric: dict[str, torch.Tensor] = {}
        self.input_to_metric: torch.Tensor | float = 0.0

    def upstream(self, down_sites: list[str]) -> list[str]:
        last = max(len(self.order) if s == METRIC else self.order.index(s) for s in down_sites)
        return self.order[:last]

    def add(self, chunk: list[tuple[str, int, int]], grads: dict[str, tuple], b: int) -> None:
        """Contract block k's leaf gradients with the upstream deltas and file them under the
        edge (u -> chunk[k]); feature-to-feature weights are kept sparse (nonzeros only)."""
        K = len(chunk)
        by_site: dict[str, list[int]] = {}
        for k, (s, _, _) in enumerate(chunk):
            by_site.setdefault(s, []).append(k)
        for u, (gc, ge) in grads.items():
            p, n = gc.shape[1], gc.shape[2]
            contrib = nodes_of(gc[:K * b].view(K, b, p, n), ge[:K * b].view(K, b, p, -1),
                               self.dc[u][None], self.de[u][None]).sum(1).detach()   # [K, p, n_u + 1]
            for s, ks in by_site.items():
                if s != METRIC and self.order.index(u) >= self.order.index(s):
                    continue
                rows = contrib[ks]                                                  # [m, p, n_u + 1]
                if u == INPUT_SITE and self.pseudo:
                    vec = rows.sum(-1)                                              # [m, p]
                    if s == METRIC:
                        self.input_to_metric = self.input_to_metric + vec.sum(0)
                        continue
                    if s not in self.from_input:
                        n_s = self.dicts[s].n_latents + 1
                        self.from_input[s] = vec.new_zeros((p, n_s, p) if self.pp else (n_s, p))
                    for (_, q, j), v in zip([chunk[k] for k in ks], vec):
                        self.from_input[s][(q, j) if self.pp else j] += v
                elif s == METRIC:
                    self.to_metric[u] = self.to_metric.get(u, 0.0) + (rows[0] if self.pp else rows[0].sum(0))
                else:
                    down = torch.tensor([[q, j] if self.pp else [j] for _, q, j in (chunk[k] for k in ks)],
                                        dtype=torch.long, device=rows.device)       # [m, 1 or 2]
                    rows = rows if self.pp else rows.sum(1)                         # [m, (p,) n_u + 1]
                    nz = rows.nonzero()                                             # [nnz, 1 + up dims]
                    index = torch.cat([down[nz[:, 0]], nz[:, 1:]], 1).T.cpu()
                    self.parts.setdefault((u, s), []).append((index, rows[tuple(nz.T)].cpu()))


def _queue(dicts, clean, mask, nodes, per_position, skip_inactive) -> list[tuple[str, int, int]]:
    """Downstream nodes to expand, as (site, position or -1 for all, index; n = error), then the metric."""
    queue = []
    for s in dicts:
        if s == INPUT_SITE:
            continue
        c = clean.codes[s]
        b, p, n = c.shape
        shape = (p, n + 1) if per_position else (n + 1,)
        if nodes is None:
            sel = torch.ones(shape, dtype=torch.bool, device=c.device)
        elif s not in nodes:
            continue
        else:
            sel = torch.as_tensor(nodes[s], device=c.device)
            if sel.dtype != torch.bool or tuple(sel.shape) != shape:
                raise ValueError(f"nodes[{s!r}] must be a bool mask of shape {shape} (like the site's node "
                                 f"effects), got {sel.dtype} {tuple(sel.shape)}")
        if skip_inactive:
            active = ((c != 0) & mask[..., None]).any(0)                     # [p, n]
            active = torch.cat([active, torch.ones_like(active[:, :1])], -1)  # error always
            sel = sel & (active if per_position else active.any(0))
        if per_position:
            queue += [(s, q, j) for q, j in sel.nonzero().tolist()]
        else:
            queue += [(s, -1, j) for j in sel.nonzero()[:, 0].tolist()]
    return queue + [(METRIC, -1, -1)]


def _edge_chunk(model, dicts, pseudo, ids, cf_ids, mask, call, rows, nodes, per_position, skip_inactive,
                rows_per_backward):
    """Edges of one chunk of examples. rows_per_backward=None: the unbatched reference."""
    b, p = ids.shape
    order = list(dicts)
    clean = run_spliced(model, dicts, ids, mask.long(), grad=True)
    backward_metric(call(clean.logits, b, rows)[0])
    left_c = {s: grad_or_zero(clean.codes[s]).detach() for s in dicts}
    left_e = {s: grad_or_zero(clean.errors[s]).detach() for s in dicts}
    with torch.no_grad():
        cf = run_spliced(model, dicts, cf_ids, mask.long())
    col = _Collector(dicts, pseudo, order, clean, cf, mask, per_position)
    queue = _queue(dicts, clean, mask, nodes, per_position, skip_inactive)
    K = 1 if rows_per_backward is None else max(1, min(len(queue), rows_per_backward // b))
    run = run_spliced(model, dicts, ids.repeat(K, 1), mask.repeat(K, 1).long(), grad=True, stop_grad=True)
    values, errors = _downstream_values(dicts, run)
    m = call(run.logits, b, rows)                                            # [K, b]
    backwards = 1
    for i in range(0, len(queue), K):
        chunk = queue[i:i + K]
        if rows_per_backward is None:  # reference: index the node, one scalar per backward
            s, q, j = chunk[0]
            at = slice(None) if q < 0 else q
            if s == METRIC:
                loss = m.sum()
            elif j < left_c[s].shape[-1]:
                loss = (values[s][:, at, j] * left_c[s][:, at, j]).sum()
            else:
                loss = (errors[s][:, at, :] * left_e[s][:, at, :]).sum()
        else:                           # batched: a cotangent tensor per site, one block per node
            cot_c = {s: torch.zeros_like(values[s]) for s, _, _ in chunk if s != METRIC}
            cot_e = {s: torch.zeros_like(errors[s]) for s in cot_c}
            cot_m = torch.zeros_like(m)
            for k, (s, q, j) in enumerate(chunk):
                blk, at = slice(k * b, (k + 1) * b), slice(None) if q < 0 else q
                if s == METRIC:
                    cot_m[k] = 1
                elif j < left_c[s].shape[-1]:
                    cot_c[s][blk, at, j] = left_c[s][:, at, j]
                else:
                    cot_e[s][blk, at, :] = left_e[s][:, at, :]
            loss = (m * cot_m).sum() + sum((values[s] * cot_c[s]).sum() + (errors[s] * cot_e[s]).sum()
                                           for s in cot_c)
        ups = col.upstream([s for s, _, _ in chunk])
        leaves = [t for u in ups for t in (run.codes[u], run.errors[u])]
        got = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        backwards += 1
        grads = {u: (g_c if g_c is not None else torch.zeros_like(run.codes[u]),
                     g_e if g_e is not None else torch.zeros_like(run.errors[u]))
                 for u, g_c, g_e in zip(ups, got[0::2], got[1::2]) if g_c is not None or g_e is not None}
        col.add(chunk, grads, b)
    if not pseudo:  # input/<pos> -> embed nodes: the embed nodes' own AtP effects at pos
        eff = nodes_of(left_c[INPUT_SITE], left_e[INPUT_SITE], col.dc[INPUT_SITE],
                       col.de[INPUT_SITE]).detach().sum(0)                  # [p, n + 1]
        if per_position:
            col.from_input[INPUT_SITE] = torch.diag_embed(eff.T).permute(1, 0, 2)  # [p, n + 1, p]
        else:
            col.from_input[INPUT_SITE] = eff.T                                   # [n + 1, p]
    return col, backwards


def _sparse(parts: list, shape: tuple) -> torch.Tensor:
    """Sparse COO of `shape` from (indices [dims, nnz], values [nnz]) parts (duplicates summed)."""
    index = torch.cat([i for i, _ in parts], 1)
    values = torch.cat([v for _, v in parts])
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=True).coalesce()


def _run(model, dictionaries, clean, counterfactual, metric, nodes, per_position, attention_mask,
         batch_size, skip_inactive, rows_per_backward) -> EdgeEffects:
    call = metric_caller(metric)
    ids_all, cf_all, mask_all = token_pair(model, clean, counterfactual, attention_mask)
    dicts, pseudo = with_input_site(model, dictionaries)
    n_all, p = ids_all.shape
    sizes = {s: d.n_latents + 1 for s, d in dicts.items() if not (pseudo and s == INPUT_SITE)}
    parts: dict[tuple[str, str], list] = {}
    from_input: dict[str, torch.Tensor] = {}
    to_metric: dict[str, Any] = {}
    input_to_metric: Any = 0.0
    backwards = 0
    with _frozen(dicts):
        for rows in example_chunks(n_all, batch_size):
            col, bw = _edge_chunk(model, dicts, pseudo, ids_all[rows], cf_all[rows], mask_all[rows], call, rows,
                                  nodes, per_position, skip_inactive, rows_per_backward)
            backwards += bw
            for key, val in col.parts.items():
                parts.setdefault(key, []).extend(val)
            for key, val in col.from_input.items():
                from_input[key] = from_input.get(key, 0.0) + val
            for key, val in col.to_metric.items():
                to_metric[key] = to_metric.get(key, 0.0) + val.detach()
            input_to_metric = input_to_metric + (col.input_to_metric.detach()
                                                 if isinstance(col.input_to_metric, torch.Tensor) else 0.0)
    down = lambda s: (p, sizes[s]) if per_position else (sizes[s],)  # noqa: E731
    weights = {}
    for (u, s), val in parts.items():
        w = _sparse(val, (*down(s), *down(u))) / n_all
        if w._nnz():
            weights[(u, s)] = w
    dtype = next(iter(weights.values())).dtype if weights else torch.float32
    inputs = {s: (val / n_all).cpu() for s, val in from_input.items()}
    metric_edges = {s: (to_metric[s] / n_all).cpu() if s in to_metric else torch.zeros(down(s), dtype=dtype)
                    for s in sizes}
    itm = (input_to_metric / n_all).cpu() if isinstance(input_to_metric, torch.Tensor) else torch.zeros(p)
    return EdgeEffects(weights=weights, from_input=inputs, to_metric=metric_edges, input_to_metric=itm,
                       per_position=per_position, n_backwards=backwards, n_examples=n_all, sizes=sizes)


def edge_effects(model: Any, dictionaries: Mapping[str, Any], clean: Any, counterfactual: Any,
                 metric: Callable[..., torch.Tensor], *, nodes: Mapping[str, torch.Tensor] | None = None,
                 per_position: bool = False, attention_mask: torch.Tensor | None = None,
                 batch_size: int | None = None, rows_per_backward: int = 256,
                 skip_inactive: bool = True) -> EdgeEffects:
    """Edge weights between the nodes of the spliced sites, the input and the metric (module
    docstring), with batched VJPs: each backward expands rows_per_backward // batch downstream
    nodes. nodes: {site: bool mask like its node effects} of the downstream nodes to expand
    (sites left out are not expanded; None: all), e.g. `NodeEffects.select(threshold)`. Other
    arguments as in `circuits.attribution.node_effects`."""
    if isinstance(rows_per_backward, bool) or not isinstance(rows_per_backward, int) or rows_per_backward < 1:
        raise ValueError(f"rows_per_backward must be a positive int, got {rows_per_backward!r}")
    return _run(model, dictionaries, clean, counterfactual, metric, nodes, per_position, attention_mask,
                batch_size, skip_inactive, rows_per_backward)


def edge_effects_reference(model: Any, dictionaries: Mapping[str, Any], clean: Any, counterfactual: Any,
                           metric: Callable[..., torch.Tensor], *, nodes: Mapping[str, torch.Tensor] | None = None,
                           per_position: bool = False, attention_mask: torch.Tensor | None = None,
                           batch_size: int | None = None, skip_inactive: bool = True) -> EdgeEffects:
    """`edge_effects` the unbatched way: one backward per downstream node (for tests and
    benchmarks; same result, many more backwards)."""
    return _run(model, dictionaries, clean, counterfactual, metric, nodes, per_position, attention_mask,
                batch_size, skip_inactive, None)
