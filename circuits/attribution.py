"""Node attribution: the indirect effect of every feature and error node on a metric.

Marks et al. 2024 ("Sparse Feature Circuits", arXiv 2403.19647, §2) splice a dictionary at each
site, x_s = decode(c_s) + e_s, and take as nodes the codes c_s,i (feature nodes) and the error
e_s (one error node per site, contracted over d_model). For clean and counterfactual inputs of the
same shape and a metric m (logits [batch, pos, vocab] -> [batch], one value per example), the
indirect effect of a node a is

    IE(a) = m(clean | do(a := a_cf)) - m(clean)

with every later site recomputed by the model. Four ways to get it (`method=`):

- "atp", attribution patching (Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
  Automated Circuit Discovery", arXiv 2310.10348; Marks et al. §2): one forward+backward on
  clean, one forward on cf,   IE ~= grad_a m|clean . (a_cf - a_clean).
- "ig", integrated gradients (Sundararajan, Taly & Yan 2017, "Axiomatic Attribution for Deep
  Networks", arXiv 1703.01365; Marks et al. §2, steps N = 10 by default):

      IE ~= (1/N sum_k grad_a m|z(alpha_k)) . (a_cf - a_clean),   z(alpha) = z_clean + alpha (z_cf - z_clean)

  PER SITE, as in Marks et al.'s code: the codes and the error of one site are interpolated
  together (all its nodes at once) while every other site is recomputed by the model; one batched
  forward+backward per site (more when N * batch > max_rows) carries the N steps as N copies of
  the batch. We use the midpoint
  rule alpha_k = (k + 1/2) / N (Marks et al. use the left sum k / N; same cost, second-order
  accurate). Completeness: at a site that every path from the input to the metric crosses (a
  resid.L site, or the input), the effects of its nodes sum to ~ m(cf) - m(clean).
  Cost: about N forwards and backwards per site and batch.
- "ig-input", integrated gradients along the path the model takes from ONE interpolation of
  its input (the input-embedding path of EAP-IG, Hanna, Pezzelle & Belinkov 2024, "Have Faith in
  Faithfulness", arXiv 2403.17806): only the token embeddings move, z_embed(t) = z_clean + t
  (z_cf - z_clean), every site is recomputed by the model, and each node gets the line integral
  of its gradient along its own (curved) trajectory a(t):

      IE(a) ~= integral_0^1 grad_a m|t . da/dt dt
            ~= sum_k (g(t_k) + g(t_k+1))/2 . (a(t_k+1) - a(t_k)),    t_k = k / N (trapezoid)

  All sites at once: N + 1 forwards and backwards per batch (run as copies of the batch,
  `max_rows` rows per pass), against ~N per site for "ig". Complete at every site that all paths
  cross (dm/dt is the sum of its nodes' terms), exact on a model that is affine in the input.
  It attributes the whole change along the path (Aumann-Shapley), which is not the same quantity
  as patching one node with all others clean: at sites that not every path crosses (attn.L,
  mlp.L) it can differ markedly from "exact"; use "ig" to estimate single-node patches.
- "exact", activation patching: one patched forward per node whose value differs between clean
  and cf (exact effects are 0 elsewhere), K nodes per forward by repeating the batch K times
  (`max_rows` = K * batch). For verification; cost grows with the number of nodes.

Gradients are TOTAL effects: the splice passes the upstream gradient through every later site
unchanged (see `interventions.spliced`), so grad_c m = W_dec grad_x m and grad_e m = grad_x m.
The error node's effect is (grad_e m . delta e) summed over d_model.

Mean reference (counterfactual="mean"): instead of a counterfactual prompt, every node's
reference value is its mean clean value at its position over all the examples (padding left
out; `interventions.means.token_mean(per_position=True)`, the state that `circuits.evaluate`'s
mean ablation sets), IE(a) = m(clean | do(a := mean a)) - m(clean): the nodes ranked by what
mean-ablating them costs, as the faithfulness of a circuit is measured (Marks et al. §3). The
input nodes' reference is then the mean token embedding at each position; m(cf) is m with every
spliced site set to its mean.

Positions: per_position=True keeps one node per (feature, position) -> effects [pos, n + 1];
per_position=False (Marks et al.'s aggregation="sum") sums over positions -> [n + 1]; for
"exact" that node is the feature at every position at once (the intervention whose first-order
estimate is the summed AtP effect). The error node is always last (index n_latents). Effects are
averaged over examples (in chunks of `batch_size`). Input nodes: the effect of swapping the
token at each position to the counterfactual's, always per position ("atp"/"ig" attribute the
token embedding, the input of block 0; "exact" swaps the token).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from interventions.spliced import check_dictionaries, run_spliced, token_batch
from sae.baselines import IdentityDictionary

METHODS = ("atp", "ig", "ig-input", "exact")
MEAN = "mean"         # counterfactual=MEAN: every node's reference is its per-position mean clean value
INPUT_SITE = "embed"  # the token embedding entering block 0; spliced with the identity if not given


@dataclass
class NodeEffects:
    """Node effects per site, averaged over examples. Node index i < n_latents is feature i,
    index n_latents the site's error node. Shapes: [n_latents + 1], or [pos, n_latents + 1]
    with per_position=True. Sites are in forward order."""

    effects: dict[str, torch.Tensor]      # site -> [(pos,) n_latents + 1]
    inputs: torch.Tensor                  # [pos] effect of swapping the input token at each position
    metric_clean: torch.Tensor            # [n_examples] m(clean)
    metric_cf: torch.Tensor               # [n_examples] m(cf)
    activation: dict[str, torch.Tensor]   # site -> like effects: mean clean code (error: mean ||e||)
    frequency: dict[str, torch.Tensor]    # site -> like effects: fraction of clean tokens with code != 0
    method: str
    per_position: bool
    tokens: list[str] = field(default_factory=list)     # [pos] clean token text ("a|b" where examples differ)
    layers: dict[str, int] = field(default_factory=dict)  # site -> layer (embed: -1)
    n_layers: int = 0

    @property
    def sites(self) -> list[str]:
        return list(self.effects)

    @property
    def n_examples(self) -> int:
        return int(self.metric_clean.numel())

    @property
    def delta_metric(self) -> float:
        """mean m(cf) - m(clean): what a complete set of effects sums to."""
        return float((self.metric_cf - self.metric_clean).mean())

    def total(self, site: str | None = None) -> float:
        """Sum of the node effects at `site` (all sites when None)."""
        sites = self.sites if site is None else [site]
        return float(sum(self.effects[s].sum() for s in sites))

    def select(self, threshold: float | None = None, top_k: int | None = None) -> dict[str, torch.Tensor]:
        """{site: bool mask shaped like its effects}: nodes with |effect| >= threshold and among
        the top_k of their site by |effect| (both optional; ties go to the lower flat index, by a
        stable sort, so the choice is the same on every machine). Use as `edge_effects(nodes=...)`."""
        out = {}
        for s, e in self.effects.items():
            keep = torch.ones_like(e, dtype=torch.bool)
            if threshold is not None:
                keep &= e.abs() >= threshold
            if top_k is not None:
                flat = e.abs().flatten()
                top = torch.zeros_like(flat, dtype=torch.bool)
                order = torch.sort(flat, descending=True, stable=True).indices  # ties: lower index first
                top[order[: min(int(top_k), flat.numel())]] = True
                keep &= top.view_as(e)
            out[s] = keep
        return out

    def __repr__(self) -> str:
        shape = {s: tuple(e.shape) for s, e in self.effects.items()}
        return (f"NodeEffects(method={self.method!r}, examples={self.n_examples}, "
                f"delta_metric={self.delta_metric:.4g}, sites={shape})")


# --- shared helpers (also used by circuits.edges) ----------------------------------------------
def metric_caller(metric: Any) -> Callable[[torch.Tensor, int, slice], torch.Tensor]:
    """Wrap `metric` so that logits [K * b, pos, vocab] -> [K, b]: it is called on each block of b
    rows (the K copies of a batch) and must return a float tensor [b]. A metric of two positional
    arguments gets the examples' slice as well: metric(logits, rows)."""
    if not callable(metric):
        raise TypeError(f"metric must be a function logits [batch, pos, vocab] -> [batch], got "
                        f"{type(metric).__name__}")
    try:
        params = [p for p in inspect.signature(metric).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        with_rows = len(params) >= 2
    except (TypeError, ValueError):
        with_rows = False

    def call(logits: torch.Tensor, b: int, rows: slice) -> torch.Tensor:
        outs = []
        for k in range(logits.shape[0] // b):
            block = logits[k * b:(k + 1) * b]
            out = metric(block, rows) if with_rows else metric(block)
            if not isinstance(out, torch.Tensor) or out.shape != (b,) or not out.is_floating_point():
                got = (f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                       else type(out).__name__)
                raise ValueError(f"the metric must return one value per example: a float tensor of shape "
                                 f"[batch] = ({b},), got {got}. Reduce over positions and vocabulary "
                                 f"inside it and do not average over the batch, e.g. "
                                 f"lambda logits: logits[:, -1, a] - logits[:, -1, b]")
            outs.append(out)
        return torch.stack(outs)  # [K, b]
    return call


def is_mean(counterfactual: Any) -> bool:
    """Whether `counterfactual` asks for the per-position mean reference."""
    return isinstance(counterfactual, str) and counterfactual == MEAN


def token_pair(model: Any, clean: Any, counterfactual: Any, attention_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean ids, cf ids [batch, pos], position mask [batch, pos] bool), checked to match
    (counterfactual=MEAN: the clean ids stand in for the cf ids)."""
    ids, mask = token_batch(model, clean, attention_mask)
    if is_mean(counterfactual):
        return ids, ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    cf_ids, cf_mask = token_batch(model, counterfactual, attention_mask)
    if ids.shape != cf_ids.shape:
        raise ValueError(f"clean and counterfactual inputs must have the same shape [batch, pos], got "
                         f"{tuple(ids.shape)} and {tuple(cf_ids.shape)}: pair every clean prompt with one "
                         f"counterfactual of the same number of tokens")
    if mask is not None and cf_mask is not None and not torch.equal(mask.bool(), cf_mask.bool()):
        raise ValueError("clean and counterfactual inputs are padded differently: their attention "
                         "masks must be equal (nodes are compared position by position)")
    mask = mask if mask is not None else cf_mask
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return ids, cf_ids, real


class _InputIdentity(IdentityDictionary):
    """The identity dictionary at the input site, with W_dec [d, d] on the model's device and in
    its dtype (its codes are the token embeddings)."""

    def __init__(self, d_in: int, like: torch.Tensor):
        super().__init__(d_in)
        self.register_buffer("eye", torch.eye(d_in, dtype=like.dtype, device=like.device))

    @property
    def W_dec(self) -> torch.Tensor:  # [d_in, d_in]
        return self.eye


def with_input_site(model: Any, dictionaries: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """(dictionaries in forward order, plus the identity at `embed` when it is not spliced; whether
    that identity was added). Its codes are the token embeddings: the input nodes' gradient leaf."""
    check_dictionaries(model, dictionaries)
    ext = dict(dictionaries)
    pseudo = INPUT_SITE not in ext
    if pseudo:
        like = next(model.hf.parameters())
        ext[INPUT_SITE] = _InputIdentity(model.sites[INPUT_SITE].width, like)
    order = [s.name for s in check_dictionaries(model, ext)]
    return {s: ext[s] for s in order}, pseudo


def example_chunks(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    step = n if batch_size is None else int(batch_size)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


@dataclass
class Reference:
    """Node reference values of a batch: codes [b, pos, n] and errors [b, pos, d] per site."""

    codes: dict[str, torch.Tensor]
    errors: dict[str, torch.Tensor]


def mean_reference(model: Any, dicts: Mapping[str, Any], ids: torch.Tensor, mask: torch.Tensor,
                   batch_size: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{site: (codes [pos, n], errors [pos, d])}: per-position means of the clean values over
    all examples' real tokens (`token_mean`), in chunks of batch_size examples."""
    sums: dict[str, list] = {}
    count = torch.zeros(ids.shape[1], dtype=torch.float64, device=ids.device)
    with torch.no_grad():
        for rows in example_chunks(ids.shape[0], batch_size):
            run = run_spliced(model, dicts, ids[rows], mask[rows].long())
            w = mask[rows].to(count.dtype)
            count += w.sum(0)
            for s in dicts:
                acc = sums.setdefault(s, [0.0, 0.0])
                for i, x in enumerate((run.codes[s], run.errors[s])):
                    acc[i] = acc[i] + (x.double() * w[..., None].to(x.device)).sum(0)    # [pos, width]
    denom = count.clamp_min(1)[:, None]
    return {s: tuple((t / denom.to(t.device)).to(run.codes[s].dtype) for t in sums[s]) for s in dicts}


def reference_run(model: Any, dicts: Mapping[str, Any], cf_ids: torch.Tensor, mask: torch.Tensor,
                  means: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
    """The nodes' reference values for one chunk: the counterfactual run, or the means expanded
    to the chunk's batch."""
    if means is None:
        with torch.no_grad():
            return run_spliced(model, dicts, cf_ids, mask.long())
    b = cf_ids.shape[0]
    return Reference(codes={s: c.expand(b, *c.shape) for s, (c, _) in means.items()},
                     errors={s: e.expand(b, *e.shape) for s, (_, e) in means.items()})


def nodes_of(dc: torch.Tensor, de: torch.Tensor, delta_c: torch.Tensor, delta_e: torch.Tensor) -> torch.Tensor:
    """Per-example linear node effects [b, pos, n + 1] from gradients and deltas (error last)."""
    return torch.cat([dc * delta_c, (de * delta_e).sum(-1, keepdim=True)], dim=-1)


def backward_metric(m: torch.Tensor) -> None:
    """Backpropagate the sum of per-example metric values [b] (rows are independent)."""
    if not m.requires_grad:
        raise ValueError("the metric does not depend on the logits (it has no gradient); compute it "
                         "from the logits it is given")
    m.sum().backward()


def grad_or_zero(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(t) if t.grad is None else t.grad


def _token_texts(model: Any, ids: torch.Tensor) -> list[str]:
    out = []
    for col in ids.T.tolist():
        uniq = list(dict.fromkeys(col))
        out.append("|".join(model.tokenizer.decode([t]) for t in uniq[:3]) + ("|..." if len(uniq) > 3 else ""))
    return out


# --- the three estimators, on one chunk of examples --------------------------------------------
def _atp(dicts, clean, cf):
    """{site: [b, pos, n + 1]} from the gradients of the (already backpropagated) clean run."""
    return {s: nodes_of(grad_or_zero(clean.codes[s]), grad_or_zero(clean.errors[s]),
                        cf.codes[s] - clean.codes[s], cf.errors[s] - clean.errors[s]) for s in dicts}


def _interpolate(c0, e0, dc, de, alphas):
    """Edit: block k of the repeated batch gets (c0 + alpha_k dc, e0 + alpha_k de)."""
    def edit(codes, error):
        a = alphas.to(codes)[:, None, None, None]
        return ((c0[None] + a * dc[None]).reshape(codes.shape),
                (e0[None] + a.to(error) * de[None]).reshape(error.shape))
    return edit


def _ig(model, dicts, ids, mask, call, rows, clean, cf, steps, max_rows):
    b = ids.shape[0]
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
    per_block = max(1, max_rows // b)
    out = {}
    for s, d in dicts.items():
        c0, e0 = clean.codes[s], clean.errors[s]
        dc, de = cf.codes[s] - c0, cf.errors[s] - e0
        gc, ge = torch.zeros_like(c0), torch.zeros_like(e0)
        for i in range(0, steps, per_block):
            a = alphas[i:i + per_block]
            k = len(a)
            run = run_spliced(model, {s: d}, ids.repeat(k, 1), mask.repeat(k, 1).long(),
                              edits={s: _interpolate(c0, e0, dc, de, a)}, grad=True)
            call(run.logits, b, rows).sum().backward()
            gc += grad_or_zero(run.codes[s]).view(k, *c0.shape).sum(0)
            ge += grad_or_zero(run.errors[s]).view(k, *e0.shape).sum(0)
        out[s] = nodes_of(gc / steps, ge / steps, dc, de)
    return out


def _ig_input(model, dicts, ids, mask, call, rows, clean, cf, steps, max_rows):
    b = ids.shape[0]
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    per_block = max(1, max_rows // b)
    c0, e0 = clean.codes[INPUT_SITE], clean.errors[INPUT_SITE]
    path = (c0, e0, cf.codes[INPUT_SITE] - c0, cf.errors[INPUT_SITE] - e0)
    out = {s: 0.0 for s in dicts}
    last: dict[str, tuple] = {}  # site -> (codes, grad codes, error, grad error) at the previous t
    for i in range(0, steps + 1, per_block):
        t = ts[i:i + per_block]
        k = len(t)
        run = run_spliced(model, dicts, ids.repeat(k, 1), mask.repeat(k, 1).long(),
                          edits={INPUT_SITE: _interpolate(*path, t)}, grad=True)
        call(run.logits, b, rows).sum().backward()
        for s in dicts:
            c, e = run.codes[s].detach(), run.errors[s].detach()
            c, e = c.view(k, b, *c.shape[1:]), e.view(k, b, *e.shape[1:])  # [k, b, pos, .]
            gc = grad_or_zero(run.codes[s]).view_as(c)
            ge = grad_or_zero(run.errors[s]).view_as(e)
            if s in last:  # prepend the previous pass's last point
                pc, pgc, pe, pge = last[s]
                c, gc, e, ge = (torch.cat([p[None], q]) for p, q in ((pc, c), (pgc, gc), (pe, e), (pge, ge)))
            if len(c) > 1:  # trapezoid segments between consecutive points
                out[s] = out[s] + nodes_of((gc[1:] + gc[:-1]) / 2, (ge[1:] + ge[:-1]) / 2,
                                           c[1:] - c[:-1], e[1:] - e[:-1]).sum(0)
            last[s] = (c[-1], gc[-1], e[-1], ge[-1])
    return out


def _patch_nodes(nodes: list[tuple[int, int]], c1, e1, where: torch.Tensor):
    """Edit: block k of the repeated batch sets node nodes[k] = (pos or -1 for all positions,
    index; index n = error) to its counterfactual value (c1 [b,p,n], e1 [b,p,d])."""
    b, p, n = c1.shape
    k = len(nodes)
    pos = torch.tensor([q for q, _ in nodes], device=c1.device)
    idx = torch.tensor([j for _, j in nodes], device=c1.device)
    at = torch.where(pos[:, None] < 0, where.any(0)[None].expand(k, p),
                     torch.arange(p, device=c1.device)[None] == pos[:, None])  # [k, p]
    is_err = idx == n
    fk, kk = idx.clamp(max=n - 1), torch.arange(k, device=c1.device)

    def edit(codes, error):
        C, E = codes.view(k, b, p, n), error.view(k, b, p, -1)
        sel = (at & ~is_err[:, None])[:, None, :] & where[None]               # [k, b, p]
        C[kk, :, :, fk] = torch.where(sel, c1[:, :, fk].permute(2, 0, 1), C[kk, :, :, fk])
        sel_e = ((at & is_err[:, None])[:, None, :] & where[None])[..., None]  # [k, b, p, 1]
        return C.reshape(codes.shape), torch.where(sel_e, e1[None], E).reshape(error.shape)
    return edit


def _exact(model, dicts, ids, mask, call, rows, clean, cf, m0, per_position, max_rows):
    b, p = ids.shape
    per_block = max(1, max_rows // b)
    out = {}
    for s, d in dicts.items():
        c0, e0, c1, e1 = clean.codes[s], clean.errors[s], cf.codes[s], cf.errors[s]
        n = c0.shape[-1]
        diff = torch.cat([(c1 != c0), (e1 != e0).any(-1, keepdim=True)], -1) & mask[..., None]  # [b,p,n+1]
        diff = diff.any(0)                                                                       # [p, n+1]
        nodes = ([tuple(x) for x in diff.nonzero().tolist()] if per_position
                 else [(-1, j) for j in diff.any(0).nonzero()[:, 0].tolist()])
        eff = torch.zeros(b, p if per_position else 1, n + 1, dtype=m0.dtype, device=m0.device)
        for i in range(0, len(nodes), per_block):
            chunk = nodes[i:i + per_block]
            k = len(chunk)
            with torch.no_grad():
                run = run_spliced(model, {s: d}, ids.repeat(k, 1), mask.repeat(k, 1).long(),
                                  edits={s: _patch_nodes(chunk, c1, e1, mask)})
                m = call(run.logits, b, rows) - m0  # [k, b]
            for (q, j), mk in zip(chunk, m):
                eff[:, max(q, 0), j] = mk
        out[s] = eff
    return out


def _patch_positions(positions: list[int], c1: torch.Tensor, e1: torch.Tensor):
    """Edit: block k of the repeated batch sets the whole site at position positions[k] to its
    reference value (c1 [b, p, n], e1 [b, p, d])."""
    k = len(positions)

    def edit(codes, error):
        C, E = codes.view(k, -1, *codes.shape[1:]).clone(), error.view(k, -1, *error.shape[1:]).clone()
        for i, q in enumerate(positions):
            C[i, :, q], E[i, :, q] = c1[:, q], e1[:, q]
        return C.reshape(codes.shape), E.reshape(error.shape)
    return edit


def _exact_inputs(model, dicts, mask, call, rows, ids, clean, cf, m0, max_rows) -> torch.Tensor:
    """[b, pos]: m(clean with the input at pos set to its reference) - m(clean): for a token
    counterfactual, the token swapped to the cf's."""
    b, p = ids.shape
    eff = torch.zeros(b, p, dtype=m0.dtype, device=m0.device)
    c0, e0, c1, e1 = clean.codes[INPUT_SITE], clean.errors[INPUT_SITE], cf.codes[INPUT_SITE], cf.errors[INPUT_SITE]
    differs = ((c1 != c0).any(-1) | (e1 != e0).any(-1)) & mask
    positions = differs.any(0).nonzero()[:, 0].tolist()
    per_block = max(1, max_rows // b)
    embed = {INPUT_SITE: dicts[INPUT_SITE]}
    for i in range(0, len(positions), per_block):
        chunk = positions[i:i + per_block]
        with torch.no_grad():
            run = run_spliced(model, embed, ids.repeat(len(chunk), 1), mask.repeat(len(chunk), 1).long(),
                              edits={INPUT_SITE: _patch_positions(chunk, c1, e1)})
            m = call(run.logits, b, rows) - m0
        for q, mk in zip(chunk, m):
            eff[:, q] = mk
    return eff


# --- the public entry point ----------------------------------------------------------------------
def node_effects(model: Any, dictionaries: Mapping[str, Any], clean: Any, counterfactual: Any,
                 metric: Callable[..., torch.Tensor], *, method: str = "atp", steps: int = 10,
                 per_position: bool = False, attention_mask: torch.Tensor | None = None,
                 batch_size: int | None = None, max_rows: int = 256) -> NodeEffects:
    """Indirect effects of every feature and error node at every spliced site (module docstring).

    clean, counterfactual: token ids [batch, pos] (or `model.tokenize` dicts) of the same shape;
    counterfactual=MEAN ("mean") for the per-position mean reference (module docstring).
    metric: logits [batch, pos, vocab] -> [batch]; when batch_size splits the examples, a metric
    of two arguments is called as metric(logits, rows) with rows the examples' slice (e.g.
    `lambda lg, rows: logit_diff(lg, dataset[rows])`).
    method: "atp" | "ig" (steps, per site) | "ig-input" (steps, all sites at once) | "exact".
    per_position: keep positions (else summed). batch_size: examples per chunk (None: all at
    once). max_rows: batch rows per forward for the repeated batches of "ig", "ig-input" and
    "exact"."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method in ("ig", "ig-input") and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    call = metric_caller(metric)
    ids_all, cf_all, mask_all = token_pair(model, clean, counterfactual, attention_mask)
    dicts, pseudo = with_input_site(model, dictionaries)
    sites = [s for s in dicts if not (pseudo and s == INPUT_SITE)]
    n_all, p = ids_all.shape
    means = mean_reference(model, dicts, ids_all, mask_all, batch_size) if is_mean(counterfactual) else None
    sums = {s: 0.0 for s in sites}
    stats: dict[str, list] = {s: [0.0, 0.0] for s in sites}
    inputs, m_clean, m_cf = 0.0, [], []
    for rows in example_chunks(n_all, batch_size):
        ids, cf_ids, mask = ids_all[rows], cf_all[rows], mask_all[rows]
        b = ids.shape[0]
        clean = run_spliced(model, dicts, ids, mask.long(), grad=method == "atp")
        m0 = call(clean.logits, b, rows)[0]
        if method == "atp":
            backward_metric(m0)
        m0 = m0.detach()
        cf = reference_run(model, dicts, cf_ids, mask, means)
        with torch.no_grad():
            if means is None:
                m1 = call(cf.logits, b, rows)[0]
            else:  # every spliced site at its mean
                edits = {s: (lambda c, e, s=s: (cf.codes[s].reshape(c.shape), cf.errors[s].reshape(e.shape)))
                         for s in dicts}
                m1 = call(run_spliced(model, dicts, ids, mask.long(), edits=edits).logits, b, rows)[0]
        if method == "atp":
            per_ex = _atp(dicts, clean, cf)
        elif method == "ig":
            per_ex = _ig(model, dicts, ids, mask, call, rows, clean, cf, steps, max_rows)
        elif method == "ig-input":
            per_ex = _ig_input(model, dicts, ids, mask, call, rows, clean, cf, steps, max_rows)
        else:
            run_dicts = {s: dicts[s] for s in sites}
            per_ex = _exact(model, run_dicts, ids, mask, call, rows, clean, cf, m0, per_position, max_rows)
        with torch.no_grad():
            if method == "exact":
                inputs = inputs + _exact_inputs(model, dicts, mask, call, rows, ids, clean, cf, m0, max_rows).sum(0)
            else:
                inputs = inputs + (per_ex[INPUT_SITE].sum(-1) * mask).sum(0)
            for s in sites:
                e = per_ex[s].detach()
                if method != "exact":  # gradient estimates: nothing at padding positions
                    e = e * mask[..., None]
                sums[s] = sums[s] + (e.sum(0) if per_position else e.sum((0, 1)))
                c = torch.cat([clean.codes[s], clean.errors[s].norm(dim=-1, keepdim=True)], -1).detach()
                stats[s][0] = stats[s][0] + (c * mask[..., None]).sum(0)                    # [p, n+1]
                stats[s][1] = stats[s][1] + ((c != 0) & mask[..., None]).sum(0)              # [p, n+1]
        m_clean.append(m0)
        m_cf.append(m1.detach())
    counts = mask_all.sum(0).clamp(min=1)  # [p] real examples per position
    act, freq = {}, {}
    for s in sites:
        total, fired = stats[s]
        if per_position:
            act[s], freq[s] = total / counts[:, None], fired.to(total.dtype) / counts[:, None]
        else:
            tokens = mask_all.sum().clamp(min=1)
            act[s], freq[s] = total.sum(0) / tokens, fired.sum(0).to(total.dtype) / tokens
    layers = {s: model.sites[s].layer for s in sites}
    return NodeEffects(effects={s: sums[s] / n_all for s in sites}, inputs=inputs / n_all,
                       metric_clean=torch.cat(m_clean), metric_cf=torch.cat(m_cf), activation=act,
                       frequency=freq, method=method, per_position=per_position,
                       tokens=_token_texts(model, ids_all.cpu()), layers=layers, n_layers=model.n_layers)
