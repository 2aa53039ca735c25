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

Computation: one forward of the clean batch with every spliced site a gradient leaf with
`stop_grad` (see `interventions.spliced`: a stopped site passes gradient only through its codes
and error, so a leaf's gradient is the direct path), downstream codes re-encoded in the graph
(c_d = encode(x_d), e_d = x_d - decode(c_d)); its graph is retained and serves every backward.
`edge_effects_reference` is the plain algorithm (Marks et al.'s code): one backward per
downstream node. `edge_effects` takes K = rows_per_backward // batch (at least 1)
downstream nodes per backward (the circuit-tracer idea, Ameisen et al. 2025, "Circuit Tracing":
one VJP per node, many per pass) as a vmapped backward (`torch.autograd.grad(...,
is_grads_batched=True)`): slot k carries node k's cotangent (grad_d m at d's coordinates, zero
elsewhere), so the K VJPs share one pass over the graph of the b clean rows instead of a K-fold
repeated forward. The nodes of one backward are grouped by site; groups of different sites share
the slots when their upstream sites (found by walking the autograd graph) are disjoint, e.g.
consecutive resid.L sites, since their leaf gradients cannot mix; a group that shares an upstream
site with another (attn.L and mlp.L both reach resid.{L-1}) runs in another copy of the forward
(b rows, stopped after its site; logits only for the metric). Each group's backward spans only
its own graph segment: from its site down to the nearest spliced sites. Both count their
backwards (`n_backwards`: the clean-gradient one + one per K nodes; the reference one per node).

Memory: the retained graph is that of the b clean rows (like the reference's), plus one such
graph per extra copy (at most the number of sites in one backward, none for resid-only sites);
a backward allocates temporaries of about V x b rows of one segment (V = the largest group, at
most K), freed afterwards. Peak memory hence grows with rows_per_backward through the backward
temporaries only, not through the retained graph.

Positions: per_position=True keeps (pos, node) pairs; otherwise the downstream node is the feature
at all positions (its cotangent covers every position) and upstream positions are summed: the
sum over positions of the per-position edges. Weights are averaged over examples. Feature nodes
that are zero on every clean example (at that position) are not expanded when skip_inactive:
ReLU, TopK, JumpReLU and gated encoders have zero Jacobian there, so their edges are exactly 0.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from interventions.spliced import dictionary_tensor, run_spliced

from .attribution import (INPUT_SITE, backward_metric, example_chunks, grad_or_zero, is_mean, mean_reference,
                          metric_caller, nodes_of, reference_run, token_pair, with_input_site)

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

    def add(self, s: str, nodes: list[tuple[int, int]], grads: dict[str, tuple]) -> None:
        """File the leaf gradients of m downstream nodes of site s (slot k: nodes[k] = (position or
        -1, index)) under the edges (u -> s): grads[u] = (codes [>= m, b, p, n_u], errors [>= m, b,
        p, d_u]) holds only the upstream sites with a path to s. Feature-to-feature weights are
        kept sparse (nonzeros only)."""
        m = len(nodes)
        for u, (gc, ge) in grads.items():
            if s != METRIC and self.order.index(u) >= self.order.index(s):
                continue
            rows = nodes_of(gc[:m], ge[:m], self.dc[u][None], self.de[u][None]).sum(1).detach()  # [m, p, n_u + 1]
            p = rows.shape[1]
            if u == INPUT_SITE and self.pseudo:
                vec = rows.sum(-1)                                                      # [m, p]
                if s == METRIC:
                    self.input_to_metric = self.input_to_metric + vec.sum(0)
                    continue
                if s not in self.from_input:
                    n_s = self.dicts[s].n_latents + 1
                    self.from_input[s] = vec.new_zeros((p, n_s, p) if self.pp else (n_s, p))
                for (q, j), v in zip(nodes, vec):
                    self.from_input[s][(q, j) if self.pp else j] += v
            elif s == METRIC:
                self.to_metric[u] = self.to_metric.get(u, 0.0) + (rows[0] if self.pp else rows[0].sum(0))
            else:
                down = torch.tensor([[q, j] if self.pp else [j] for q, j in nodes],
                                    dtype=torch.long, device=rows.device)               # [m, 1 or 2]
                rows = rows if self.pp else rows.sum(1)                                 # [m, (p,) n_u + 1]
                nz = rows.nonzero()                                                     # [nnz, 1 + up dims]
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


class _Graph:
    """One forward of the b clean rows with every spliced site a `stop_grad` leaf, kept for many
    backwards: leaves (run.codes, run.errors), downstream codes and errors re-encoded in the graph
    and, with logits, the metric [1, b]. sites: a prefix of the forward order (the forward stops
    after the last one when there are no logits)."""

    def __init__(self, model, dicts, sites, ids, mask, call, rows, logits):
        sub = {s: dicts[s] for s in sites}
        self.run = run_spliced(model, sub, ids, mask.long(), grad=True, stop_grad=True, logits=logits)
        self.values, self.errors = _downstream_values(sub, self.run)
        self.m = call(self.run.logits, ids.shape[0], rows) if logits else None   # [1, b]

    def outputs(self, s: str) -> list[torch.Tensor]:
        return [self.m] if s == METRIC else [self.values[s], self.errors[s]]


def _reach(outputs: list[torch.Tensor], leaf_site: dict[int, str]) -> set[str]:
    """The spliced sites whose leaves the autograd graph of `outputs` reaches: the upstream sites
    with a direct path (every spliced site is `stop_grad`, so the walk ends at the nearest ones)."""
    found: set[str] = set()
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)   # AccumulateGrad: a leaf
        if var is not None:
            if id(var) in leaf_site:
                found.add(leaf_site[id(var)])
            continue
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _chunks(queue, K):
    """ceil(len(queue) / K) backwards of at most K nodes. The metric (last in the queue) backward
    runs through the last layers and the unembedding, once per vmap slot of its backward: its
    backward gets the r - 1 other nodes that do not fill whole backwards, taken from the ends of
    as many sites as possible (groups of one, one slot when their upstream sites are disjoint);
    the rest fill the others in queue order."""
    r = len(queue) - (len(queue) - 1) // K * K           # nodes of the metric's backward
    rest, tail = list(queue[:-1]), []
    while len(tail) < r - 1:
        by_site: dict[str, int] = {}
        for i, (s, _, _) in enumerate(rest):
            by_site[s] = i                                 # last node of each site
        for i in sorted(by_site.values(), reverse=True)[:r - 1 - len(tail)]:
            tail.append(rest.pop(i))
    return [rest[i:i + K] for i in range(0, len(rest), K)] + [tail[::-1] + queue[-1:]]


def _plan(queue, K, reach):
    """Backwards of at most K downstream nodes (`_chunks`), each split into one group per site. Groups of one backward whose upstream
    sites (reach) are disjoint share a graph copy and its vmap slots (their leaf gradients cannot
    mix); a group that shares an upstream site with another goes to another copy, so that every
    leaf gradient comes from one group. -> [[(copy, site, [(position or -1, index)])]]."""
    plan = []
    for chunk in _chunks(queue, K):
        groups: dict[str, list[tuple[int, int]]] = {}
        for s, q, j in chunk:
            groups.setdefault(s, []).append((q, j))
        used: list[set[str]] = []
        entries = []
        for s, nodes in groups.items():
            r = reach(s)
            c = next((c for c, u in enumerate(used) if not (u & r)), len(used))
            if c == len(used):
                used.append(set())
            used[c] |= r
            entries.append((c, s, nodes))
        plan.append(entries)
    return plan


def _cotangents(g: _Graph, s: str, nodes, V, left_c, left_e):
    """(outputs, cotangents [V, *output shape]) of site s's group: slot k carries node k's
    cotangent (grad_d m at d's coordinates, zero elsewhere)."""
    if s == METRIC:
        cot = torch.zeros((V, *g.m.shape), dtype=g.m.dtype, device=g.m.device)
        cot[0] = 1
        return [g.m], [cot]
    n = left_c[s].shape[-1]
    outs, cots = [], []
    if any(j < n for _, j in nodes):
        cot = g.values[s].new_zeros((V, *g.values[s].shape))
        for k, (q, j) in enumerate(nodes):
            at = slice(None) if q < 0 else q
            if j < n:
                cot[k, :, at, j] = left_c[s][:, at, j]
        outs.append(g.values[s])
        cots.append(cot)
    if any(j == n for _, j in nodes):
        cot = g.errors[s].new_zeros((V, *g.errors[s].shape))
        for k, (q, j) in enumerate(nodes):
            at = slice(None) if q < 0 else q
            if j == n:
                cot[k, :, at, :] = left_e[s][:, at, :]
        outs.append(g.errors[s])
        cots.append(cot)
    return outs, cots


def _vjp(outs, leaves, cots, V):
    """Leaf gradients [V, *leaf shape] of V cotangents in one backward: a vmapped backward
    (is_grads_batched) over the graph of the b clean rows, or a plain one when V == 1."""
    if V == 1:
        got = torch.autograd.grad(outs, leaves, [c[0] for c in cots], retain_graph=True, allow_unused=True)
        return [None if g is None else g[None] for g in got], 1
    try:
        got = torch.autograd.grad(outs, leaves, cots, retain_graph=True, allow_unused=True, is_grads_batched=True)
        return list(got), 1
    except RuntimeError as err:  # an op of the model without a batching rule: one backward per slot
        warnings.warn(f"batched VJP failed ({err}); falling back to one backward per node", RuntimeWarning)
        per = [torch.autograd.grad(outs, leaves, [c[k] for c in cots], retain_graph=True, allow_unused=True)
               for k in range(V)]
        got = [None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(leaves))]
        return got, V


def _edge_chunk(model, dicts, pseudo, ids, cf_ids, mask, means, call, rows, nodes, per_position, skip_inactive,
                rows_per_backward):
    """Edges of one chunk of examples. rows_per_backward=None: the unbatched reference."""
    b, p = ids.shape
    order = list(dicts)
    clean = run_spliced(model, dicts, ids, mask.long(), grad=True)
    backward_metric(call(clean.logits, b, rows)[0])
    left_c = {s: grad_or_zero(clean.codes[s]).detach() for s in dicts}
    left_e = {s: grad_or_zero(clean.errors[s]).detach() for s in dicts}
    cf = reference_run(model, dicts, cf_ids, mask, means)
    col = _Collector(dicts, pseudo, order, clean, cf, mask, per_position)
    queue = _queue(dicts, clean, mask, nodes, per_position, skip_inactive)
    main = _Graph(model, dicts, order, ids, mask, call, rows, logits=True)
    backwards = 1
    if rows_per_backward is None:  # reference: index the node, one scalar per backward
        for s, q, j in queue:
            at = slice(None) if q < 0 else q
            if s == METRIC:
                loss = main.m.sum()
            elif j < left_c[s].shape[-1]:
                loss = (main.values[s][:, at, j] * left_c[s][:, at, j]).sum()
            else:
                loss = (main.errors[s][:, at, :] * left_e[s][:, at, :]).sum()
            ups = col.upstream([s])
            leaves = [t for u in ups for t in (main.run.codes[u], main.run.errors[u])]
            got = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
            backwards += 1
            grads = {u: ((torch.zeros_like(main.run.codes[u]) if g_c is None else g_c)[None],
                         (torch.zeros_like(main.run.errors[u]) if g_e is None else g_e)[None])
                     for u, g_c, g_e in zip(ups, got[0::2], got[1::2]) if g_c is not None or g_e is not None}
            col.add(s, [(q, j)], grads)
    else:
        leaf_site = {id(t): u for u in order for t in (main.run.codes[u], main.run.errors[u])}
        reached: dict[str, list[str]] = {}

        def reach(s: str) -> set[str]:
            if s not in reached:
                r = _reach(main.outputs(s), leaf_site)
                reached[s] = [u for u in order if u in r]
            return set(reached[s])

        K = max(1, min(len(queue), rows_per_backward // b))
        plan = _plan(queue, K, reach)
        need: dict[int, tuple[int, bool]] = {}   # extra copy -> (deepest site's index, has the metric)
        for entries in plan:
            for c, s, _ in entries:
                deep, has_m = need.get(c, (-1, False))
                need[c] = (len(order) - 1 if s == METRIC else max(deep, order.index(s)), has_m or s == METRIC)
        graphs = {c: main if c == 0 else _Graph(model, dicts, order[:deep + 1], ids, mask, call, rows, has_m)
                  for c, (deep, has_m) in need.items()}
        for entries in plan:
            V = max(len(nodes) for _, _, nodes in entries)
            outs, cots, leaves = [], [], []
            for c, s, nodes in entries:
                o, t = _cotangents(graphs[c], s, nodes, V, left_c, left_e)
                outs += o
                cots += t
                leaves += [t for u in reached[s] for t in (graphs[c].run.codes[u], graphs[c].run.errors[u])]
            got, n_bw = _vjp(outs, leaves, cots, V)
            backwards += n_bw
            at = 0
            for c, s, nodes in entries:
                run = graphs[c].run
                grads = {}
                for u in reached[s]:
                    g_c, g_e = got[at], got[at + 1]
                    at += 2
                    grads[u] = (run.codes[u].new_zeros((V, *run.codes[u].shape)) if g_c is None else g_c,
                                run.errors[u].new_zeros((V, *run.errors[u].shape)) if g_e is None else g_e)
                col.add(s, nodes, grads)
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
    means = mean_reference(model, dicts, ids_all, mask_all, batch_size) if is_mean(counterfactual) else None
    sizes = {s: d.n_latents + 1 for s, d in dicts.items() if not (pseudo and s == INPUT_SITE)}
    parts: dict[tuple[str, str], list] = {}
    from_input: dict[str, torch.Tensor] = {}
    to_metric: dict[str, Any] = {}
    input_to_metric: Any = 0.0
    backwards = 0
    with _frozen(dicts):
        for rows in example_chunks(n_all, batch_size):
            col, bw = _edge_chunk(model, dicts, pseudo, ids_all[rows], cf_all[rows], mask_all[rows], means, call, rows,
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
                 batch_size: int | None = None, rows_per_backward: int = 64,
                 skip_inactive: bool = True) -> EdgeEffects:
    """Edge weights between the nodes of the spliced sites, the input and the metric (module
    docstring), with batched VJPs: each backward expands rows_per_backward // batch downstream
    nodes (a vmapped backward over the graph of the batch; the default 64 rows keeps its
    temporaries small, larger values save backwards at about the same compute on CPU, see
    "Memory" in the module docstring). nodes: {site: bool mask like its node effects} of the downstream nodes to expand
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
