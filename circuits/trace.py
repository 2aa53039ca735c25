"""Greedy circuit tracing from one feature, layer by layer.

Cunningham et al. 2023 ("Sparse Autoencoders Find Highly Interpretable Features in Language
Models", arXiv 2309.08600; their closing-parenthesis circuit) start from one dictionary feature
and ask which features of the previous layer it depends on, then which features those depend
on, and so on. Here a step scores every feature and the error node u at the next site upstream
for a downstream node t by attribution patching of t's activation (Syed, Rager & Conmy 2023,
arXiv 2310.10348), computed with one backward through the spliced model:

    a_t        = Σ_{p ∈ P_t} encode(x_site(t))[b, p, t]            t's activation (P_t: its position,
                                                                  or every real position)
    w(u -> t)  = mean_b Σ_p  ∂a_t/∂u[b, p] · (u_ref - u[b, p])       error nodes: · over d_model

with u_ref = 0 ("zero", so -w is gradient × activation) or the mean over the inputs ("mean"),
the sign convention of `circuits.graph` (the change when u is ablated).
The gradient runs through the model between the two sites only (no traced site in between), so
w is the first-order effect of ablating u on t along direct paths. Each downstream node keeps its
k upstream nodes with the largest |w| (error nodes can be chosen but are not expanded further);
the features chosen become the next step's downstream nodes. All downstream nodes of one step
are scored in one forward/backward: the batch is repeated once per node and each block of rows
backpropagates its own node's activation.

Node effects are total first-order effects on the target, from one backward through all traced
sites:  effect(u) = mean_b Σ_p ∂a_target/∂u · (u_ref - u). With verify=True each chosen node is
also ablated for real (`circuits.evaluate.ablation_effects` with the target's activation as the
metric) and its exact effect stored as `ablation_effect`.

The result is a circuit `networkx.DiGraph` in the attribute spec of `circuits.graph`: nodes
"site/f<id>" or "site/err" (+ "@pos" with keep_positions) with kind, site, layer, order (1..S
over the traced sites in forward order), feature, position, effect, label, activation (mean
clean code; error nodes mean ||e||) and frequency (fraction of real tokens where nonzero), plus
ablation_effect when verified; edges u -> t with weight w(u -> t). There is no "metric" node:
the metric is the target's activation, and the target node's `effect` is its mean a_target.
graph.graph: method "trace", per_position, n_layers, n_prompts, sites, target, ablation.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import networkx as nx
import torch

from interventions.means import token_mean
from interventions.spliced import check_dictionaries, dictionary_tensor, run_spliced, token_batch

from .evaluate import Node, ablation_effects, parse_node

ABLATIONS = ("zero", "mean")


def _target_value(d: Any, acts: torch.Tensor, feature: int, position: int | None,
                  mask: torch.Tensor | None) -> torch.Tensor:
    """a_t per row [rows] from the site's activation [rows, p, d_in]."""
    c = d.encode(dictionary_tensor(d, acts))[..., feature]                      # [rows, p]
    if position is not None:
        return c[:, position]
    return (c * mask.to(c)).sum(1) if mask is not None else c.sum(1)


def _scores(grad_c: torch.Tensor, grad_e: torch.Tensor, codes: torch.Tensor, errors: torch.Tensor,
            ref_c: torch.Tensor, ref_e: torch.Tensor, keep_positions: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order effects of ablating each node, mean over the batch:
    features [p, n] (or [n]), error [p] (or [])."""
    wf = (grad_c * (ref_c - codes)).mean(0)                                     # [p, n]
    we = (grad_e * (ref_e - errors)).sum(-1).mean(0)                            # [p]
    return (wf, we) if keep_positions else (wf.sum(0), we.sum(0))


def trace_feature(model: Any, dictionaries: Mapping[str, Any], inputs: Any, target: Any, *,
                  attention_mask: torch.Tensor | None = None, sites: Sequence[str] | None = None,
                  k: int = 5, max_per_site: int = 20, min_weight: float = 0.0, depth: int | None = None,
                  ablation: str = "zero", keep_positions: bool = False, include_errors: bool = True,
                  verify: bool = True, batch_size: int = 64) -> nx.DiGraph:
    """Trace the upstream circuit of one feature (module docstring) and return it as a DiGraph.

    target: "site/f<id>" (activation summed over real positions), "site/f<id>@pos", or
    (site, feature[, position]). dictionaries: {site: Dictionary}, including the target's site.
    sites: the upstream sites to trace through, in any order (default: every dictionary site
    before the target's). k: upstream nodes kept per downstream node; max_per_site: cap on the
    nodes kept at one site (by total |effect| on the target); min_weight: drop edges with
    |w| <= min_weight. depth: how many sites upstream to go (default all). ablation: "zero"
    (gradient × activation) or "mean" (means over the inputs, per position). keep_positions:
    one node per (feature, position). verify: also ablate each chosen node for real."""
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r} for tracing; choose one of {ABLATIONS}")
    if k < 1 or max_per_site < 1:
        raise ValueError(f"k and max_per_site must be >= 1, got k={k}, max_per_site={max_per_site}")
    tnode = parse_node(target)
    if tnode is None or tnode.feature == "error":
        raise ValueError(f"the target must be a feature node such as 'resid.3/f12' or ('resid.3', 12); "
                         f"got {target!r}")
    if tnode.site not in dictionaries:
        raise ValueError(f"no dictionary for the target's site {tnode.site!r}; dictionaries are given for "
                         f"{sorted(dictionaries)}")
    all_sites = [s.name for s in check_dictionaries(model, dictionaries)]
    order = {s: i for i, s in enumerate(all_sites)}
    if sites is None:
        upstream = all_sites[:order[tnode.site]]
    else:
        unknown = [s for s in sites if s not in dictionaries]
        if unknown:
            raise ValueError(f"sites {unknown} have no dictionary; dictionaries are given for {all_sites}")
        late = [s for s in sites if order[s] >= order[tnode.site]]
        if late:
            raise ValueError(f"sites {late} are not upstream of the target's site {tnode.site}")
        upstream = sorted(set(sites), key=order.get)
    if not upstream:
        raise ValueError(f"nothing to trace: no dictionary site before {tnode.site} (sites: {all_sites})")
    upstream = upstream[::-1][:depth][::-1] if depth is not None else upstream
    ids, mask = token_batch(model, inputs, attention_mask)
    b, p = ids.shape
    feat = int(tnode.feature)
    if not 0 <= feat < dictionaries[tnode.site].n_latents:
        raise ValueError(f"target feature {feat} is out of range at {tnode.site}")
    if tnode.position is not None and not 0 <= tnode.position < p:
        raise ValueError(f"target position {tnode.position} is out of range for inputs of {p} tokens")
    traced = {s: dictionaries[s] for s in upstream + [tnode.site]}

    # total first-order effects on the target, and the clean values, from one backward
    run = run_spliced(model, traced, ids, mask, grad=True, logits=False)
    a = _target_value(traced[tnode.site], run.acts[tnode.site], feat, tnode.position, mask)     # [b]
    if not bool((a.detach() != 0).any()):
        where = "" if tnode.position is None else f" at position {tnode.position}"
        raise ValueError(f"{tnode.id} is zero on every input{where}: nothing depends on it here; "
                         f"trace a feature that fires on these inputs "
                         f"(e.g. the largest of run_spliced(...).codes[{tnode.site!r}].sum((0, 1)))")
    if not a.requires_grad:
        raise TypeError(f"the dictionary at {tnode.site} ({type(traced[tnode.site]).__name__}) encodes without "
                        f"gradients; tracing needs a differentiable encode")
    leaves = [t for s in upstream for t in (run.codes[s], run.errors[s])]
    grads = torch.autograd.grad(a.sum(), leaves, allow_unused=True)
    clean, ref, total = {}, {}, {}
    real_tokens = torch.ones(b, p) if mask is None else mask.float().cpu()     # [b, p]
    for i, s in enumerate(upstream):
        c, e = run.codes[s].detach(), run.errors[s].detach()                  # [b, p, n], [b, p, d]
        gc, ge = (torch.zeros_like(c) if g is None else g for g in grads[2 * i:2 * i + 2])
        clean[s] = (c, e)
        if ablation == "zero":
            ref[s] = (torch.zeros_like(c[:1]), torch.zeros_like(e[:1]))
        else:
            ref[s] = (token_mean(c, real_tokens, per_position=True)[None],     # [1, p, n]
                      token_mean(e, real_tokens, per_position=True)[None])     # [1, p, d]
        total[s] = _scores(gc, ge, c, e, *ref[s], keep_positions)
    a_mean = float(a.detach().mean())

    stats_src = {s: (run.codes[s].detach(), run.errors[s].detach()) for s in traced}
    order_of = {s: i + 1 for i, s in enumerate(traced)}
    graph = nx.DiGraph(method="trace", per_position=keep_positions, n_layers=model.n_layers, n_prompts=b,
                       sites=list(traced), target=tnode.id, metric=f"activation of {tnode.id}", ablation=ablation)

    def add(node: Node, effect: float) -> str:
        """Add `node` with the attributes of `circuits.graph` (once)."""
        nid = node.id
        if nid in graph:
            return nid
        codes, errors = stats_src[node.site]
        if node.feature == "error":
            v = errors.float().norm(dim=-1).cpu()                             # [b, p] ||e||
        else:
            v = codes[..., int(node.feature)].float().cpu()                   # [b, p]
        real = real_tokens.bool()
        if node.position is not None:
            real = real & (torch.arange(p) == node.position)
        vals = v[real]
        graph.add_node(nid, kind="error" if node.feature == "error" else "feature", site=node.site,
                       layer=model.sites[node.site].layer, order=order_of[node.site], feature=node.feature,
                       position=node.position, effect=float(effect), label=nid,
                       activation=float(vals.mean()) if vals.numel() else 0.0,
                       frequency=float((vals != 0).float().mean()) if vals.numel() else 0.0)
        return nid

    tid = add(tnode, a_mean)
    frontier: list[Node] = [tnode]
    below = tnode.site
    for s in reversed(upstream):
        if not frontier:
            break
        edges = _step(model, traced[s], s, traced[below], below, ids, mask, frontier, clean[s], ref[s],
                      keep_positions, batch_size)
        chosen: dict[Node, float] = {}
        for t, (wf, we) in zip(frontier, edges):
            for u, x in _candidates(wf, we, include_errors, s, k, min_weight):
                chosen[u] = _lookup(*total[s], u)
                add(u, chosen[u])
                graph.add_edge(u.id, t.id, weight=x)
        # cap the site: keep the nodes with the largest total |effect| on the target
        if len(chosen) > max_per_site:
            keep = set(sorted(chosen, key=lambda u: -abs(chosen[u]))[:max_per_site])
            graph.remove_nodes_from([u.id for u in chosen if u not in keep])
            chosen = {u: chosen[u] for u in chosen if u in keep}
        frontier = [u for u in chosen if u.feature != "error"]
        below = s

    if verify and graph.number_of_nodes() > 1:
        others = [n for n in graph.nodes if n != tid]
        measured = ablation_effects(model, traced, ids, tnode.id, others, attention_mask=mask,
                                    ablation="zero" if ablation == "zero" else "mean",
                                    per_position=True, batch_size=batch_size)
        for n in others:
            graph.nodes[n]["ablation_effect"] = float(measured[n])
    return graph


def _lookup(tf: torch.Tensor, te: torch.Tensor, u: Node) -> float:
    if u.feature == "error":
        return float(te if u.position is None else te[u.position])
    return float(tf[int(u.feature)] if u.position is None else tf[u.position, int(u.feature)])


def _candidates(wf: torch.Tensor, we: torch.Tensor, include_errors: bool, site: str, k: int,
                min_weight: float) -> list[tuple[Node, float]]:
    """The k upstream nodes at `site` with the largest |w(u -> t)| > min_weight, largest first.
    wf: [n] or [p, n] (per position); we: [] or [p]."""
    n = wf.shape[-1]
    feats = wf.reshape(-1, n)                                             # [p or 1, n]
    errs = we.reshape(-1, 1) if include_errors else feats.new_zeros(feats.shape[0], 1)
    flat = torch.cat([feats, errs], 1).reshape(-1)                        # [(p or 1) * (n + 1)]
    vals, idx = flat.abs().topk(min(k, flat.numel()))
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        if not v > min_weight:
            break
        q, j = divmod(i, n + 1)
        out.append((Node(site, "error" if j == n else j, q if wf.dim() == 2 else None), float(flat[i])))
    return out


def _step(model, d_up, site_up, d_down, site_down, ids, mask, frontier: list[Node], clean, ref,
          keep_positions, batch_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """w(u -> t) for every node u at site_up and every t in `frontier` at site_down:
    per t, (features [p, n] or [n], error [p] or [])."""
    b = ids.shape[0]
    per = max(1, batch_size // b)
    out = []
    c0, e0 = clean
    for lo in range(0, len(frontier), per):
        chunk = frontier[lo:lo + per]
        kk = len(chunk)
        rep_mask = None if mask is None else mask.repeat(kk, 1)
        run = run_spliced(model, {site_up: d_up, site_down: d_down}, ids.repeat(kk, 1), rep_mask,
                          grad=True, logits=False, stop_grad=[site_up])
        codes = d_down.encode(dictionary_tensor(d_down, run.acts[site_down]))          # [kk*b, p, n]
        total = 0
        for j, t in enumerate(chunk):
            c = codes[j * b:(j + 1) * b, :, int(t.feature)]                            # [b, p]
            if t.position is not None:
                total = total + c[:, t.position].sum()
            else:
                total = total + ((c * mask.to(c)).sum() if mask is not None else c.sum())
        gc, ge = torch.autograd.grad(total, [run.codes[site_up], run.errors[site_up]], allow_unused=True)
        gc = torch.zeros_like(run.codes[site_up]) if gc is None else gc
        ge = torch.zeros_like(run.errors[site_up]) if ge is None else ge
        for j in range(kk):
            rows = slice(j * b, (j + 1) * b)
            out.append(_scores(gc[rows], ge[rows], c0, e0, *ref, keep_positions))
    return out


__all__ = ["trace_feature"]
