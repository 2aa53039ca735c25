"""What a feature dashboard shows, computed from the latent cache, the dictionary and the model.

For feature i of the dictionary D at a site (Bricken et al. 2023, "Towards Monosemanticity";
the layout of sae_vis / Neuronpedia dashboards):

    density          #{t : c_t > 0} / N over the cache's N real tokens, with the histogram of the
                     nonzero c_t (from `FeatureExamples`)
    contexts         the top windows and the quantile bins of activating windows (highest first)
    logit effects    l = W_U (γ ⊙ v_i) [vocab]: the direct effect of the feature's decoder row on
                     the logits, where v_i = W_dec[i] carried into the residual stream (through the
                     MLP's output projection for `mlp_hidden` sites: v = P(v_dec) − P(0)) and γ is
                     the final norm's elementwise scale. The norm's 1/rms(x) factor is positive and
                     the same for every token, so it is left out (as sae_vis folds the final norm's
                     weight into W_U); LayerNorm's mean-centring is not applied. γ is probed from the
                     norm module itself, γ = (N(u) − N(−u))/2 ⊙ u with u = (+1, −1, +1, …), exact
                     for LayerNorm and RMSNorm whatever their parameterisation (Gemma's 1 + w).
                     Top/bottom k tokens and a histogram of l over the whole vocabulary.
    neuron alignment the k largest |W_dec[i, j]|, with |W_dec[i, j]| / Σ_j |W_dec[i, j]| (% of L1)
    correlated       the cache's most correlated features (Pearson r of c over tokens) and the
                     cosine of their decoder rows
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from circuits.autointerp.examples import FeatureExamples, Window


@dataclass
class Context:
    """One window: token texts (raw, not yet escaped) and the feature's activation at each."""

    tokens: list[str]
    acts: list[float]
    row: int
    start: int

    @property
    def max_act(self) -> float:
        return max(self.acts) if self.acts else 0.0


@dataclass
class ContextGroup:
    """A block of contexts: the top windows, or one quantile bin of activating windows."""

    title: str
    kind: str                  # "top" | "quantile"
    bin_min: float             # Neuronpedia convention: -1 for the top group
    bin_max: float
    bin_contains: float        # fraction of activating windows in this bin; -1 for the top group
    contexts: list[Context] = field(default_factory=list)


@dataclass
class LogitEffects:
    """Direct logit effect l = W_U (γ ⊙ v) of one feature (module docstring)."""

    top: list[tuple[int, float]]          # (token id, l), largest first
    bottom: list[tuple[int, float]]       # (token id, l), most negative first
    hist_edges: list[float]               # [bins + 1]
    hist_counts: list[int]                # [bins] tokens of the vocabulary per bin


@dataclass
class FeatureView:
    """Everything one dashboard page (and its Neuronpedia JSON) shows about one feature."""

    site: str
    feature: int
    n_tokens: int
    density: float
    max_act: float
    mean_active: float
    hist_edges: list[float]
    hist_counts: list[int]
    groups: list[ContextGroup]
    logits_top: list[tuple[str, float]] = field(default_factory=list)      # (token text, l)
    logits_bottom: list[tuple[str, float]] = field(default_factory=list)
    logits_hist_edges: list[float] = field(default_factory=list)
    logits_hist_counts: list[int] = field(default_factory=list)
    alignment: list[tuple[int, float, float]] = field(default_factory=list)  # (neuron, W_dec, |.|/L1)
    correlated: list[tuple[int, float, float | None]] = field(default_factory=list)  # (feature, r, cos)
    explanation: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def n_contexts(self) -> int:
        return sum(len(g.contexts) for g in self.groups)

    @property
    def top_token(self) -> str:
        """The token where the feature fired most strongly ("" when it never fired)."""
        for g in self.groups:
            for c in g.contexts:
                if c.acts and c.max_act > 0:
                    return c.tokens[max(range(len(c.acts)), key=c.acts.__getitem__)]
        return ""


# --- vocabulary and unembedding ------------------------------------------------------------------
def vocab_strings(tokenizer: Any, size: int | None = None) -> list[str]:
    """Each token id's own text, ids 0..size-1 (size default: the tokenizer's length; ids the
    tokenizer does not know read "<id N>"). One batched decode, as `token_strings` per id."""
    n_tok = len(tokenizer)
    size = n_tok if size is None else int(size)
    known = min(size, n_tok)
    ids = [[i] for i in range(known)]
    texts = list(tokenizer.batch_decode(ids)) if hasattr(tokenizer, "batch_decode") \
        else [tokenizer.decode(i) for i in ids]
    return texts + [f"<id {i}>" for i in range(known, size)]


def _final_norm(hf: torch.nn.Module, lm_head: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose output is the unembedding's input (the final norm), found by one tiny
    forward with hooks (no table of model names); None when the unembedding reads a raw stream."""
    seen: dict[torch.nn.Module, torch.Tensor] = {}
    head_in: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, out) if torch.is_tensor(out) else None)
             for m in hf.modules() if m is not lm_head and m is not hf]
    hooks.append(lm_head.register_forward_pre_hook(lambda m, a: head_in.append(a[0])))
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([[0, 1, 2]], device=lm_head.weight.device) % lm_head.weight.shape[0])
    finally:
        for h in hooks:
            h.remove()
    if not head_in:
        return None
    x = head_in[0]
    hits = [m for m, out in seen.items() if out.shape[-1] == x.shape[-1] and out.shape[-2] >= x.shape[-2]
            and torch.equal(out[..., -x.shape[-2]:, :], x)]
    if not hits:
        return None
    norm = min(hits, key=lambda m: sum(1 for _ in m.modules()))          # the innermost match
    return norm if not any(p is lm_head.weight for p in norm.parameters()) else None


def unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U [vocab, d_model], γ [d_model] or None): the unembedding and the final norm's scale."""
    hf = model.hf
    head = hf.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(hf).__name__} has no output embedding (get_output_embeddings() is "
                         f"{head!r}); logit effects need a causal LM head")
    W_U = head.weight.detach().float()
    norm = _final_norm(hf, head)
    if norm is None:
        return W_U, None
    d = W_U.shape[1]
    p = next(iter(norm.parameters()), head.weight)
    u = torch.ones(d, device=p.device, dtype=p.dtype)
    u[1::2] = -1
    with torch.no_grad():
        gamma = ((norm(u[None, None]) - norm(-u[None, None]))[0, 0].float() / 2) * u.float()
    return W_U, gamma


def to_residual(model: Any, site: str, directions: torch.Tensor) -> torch.Tensor:
    """Directions at `site` [n, d_in] as residual-stream directions [n, d_model]: unchanged when
    d_in = d_model, else (sites read at a module's input, e.g. `mlp_hidden.L`) pushed through
    that module's linear part, P(v) − P(0)."""
    s = model.site(site)
    if directions.shape[-1] == model.d_model:
        return directions
    if s.io != "input":
        raise ValueError(f"site {site!r} has width {directions.shape[-1]} != d_model {model.d_model} and is "
                         f"not a module input: cannot carry its directions into the residual stream")
    proj = model.hf.get_submodule(s.module)
    p = next(iter(proj.parameters()))
    with torch.no_grad():
        v = directions.to(device=p.device, dtype=p.dtype)
        out = proj(v) - proj(torch.zeros_like(v[:1]))
    if out.shape[-1] != model.d_model:
        raise ValueError(f"module {s.module!r} of site {site!r} maps to width {out.shape[-1]}, not d_model "
                         f"{model.d_model}: cannot compute logit effects for this site")
    return out.float()


def logit_effects(model: Any, dictionary: Any, site: str, features: Sequence[int], *, k: int = 10,
                  bins: int = 50, chunk: int = 64, progress: bool = False) -> dict[int, LogitEffects]:
    """{feature: LogitEffects} for each feature, batched `chunk` features per matmul."""
    W_U, gamma = unembedding(model)                                   # [V, d], [d]
    W_dec = dictionary.W_dec.detach()
    out: dict[int, LogitEffects] = {}
    feats = [int(f) for f in features]
    for a in tqdm(range(0, len(feats), chunk), desc=f"logit effects {site}", unit="chunk", disable=not progress):
        ids = feats[a:a + chunk]
        v = to_residual(model, site, W_dec[ids].float()).to(W_U.device)   # [c, d]
        if gamma is not None:
            v = v * gamma.to(v.device)
        logits = v @ W_U.T                                            # [c, V]
        kk = min(k, logits.shape[1])
        tv, ti = logits.topk(kk, dim=1)
        bv, bi = logits.topk(kk, dim=1, largest=False)
        lo, hi = logits.min(1).values, logits.max(1).values           # [c]
        width = (hi - lo).clamp_min(1e-12)
        b = ((logits - lo[:, None]) * (bins / width)[:, None]).to(torch.int32).clamp_(0, bins - 1)   # [c, V]
        b += torch.arange(len(ids), dtype=torch.int32, device=b.device)[:, None] * bins
        counts = torch.bincount(b.flatten(), minlength=len(ids) * bins).view(len(ids), bins)
        steps = torch.linspace(0, 1, bins + 1, device=lo.device)
        edges = lo[:, None] + width[:, None] * steps[None]
        for r, f in enumerate(ids):
            out[f] = LogitEffects(top=list(zip(ti[r].tolist(), tv[r].tolist())),
                                  bottom=list(zip(bi[r].tolist(), bv[r].tolist())),
                                  hist_edges=edges[r].tolist(), hist_counts=counts[r].tolist())
    return out


def neuron_alignment(dictionary: Any, features: Sequence[int], *, k: int = 5) -> dict[int, list[tuple[int, float, float]]]:
    """{feature: [(neuron j, W_dec[i, j], |W_dec[i, j]| / Σ_j |W_dec[i, j]|)]}, largest |.| first."""
    W = dictionary.W_dec.detach().float().cpu()
    feats = [int(f) for f in features]
    rows = W[feats]                                                   # [n, d_in]
    kk = min(k, rows.shape[1])
    _, idx = rows.abs().topk(kk, dim=1)
    vals = rows.gather(1, idx)
    l1 = rows.abs().sum(1, keepdim=True).clamp_min(1e-30)
    frac = vals.abs() / l1
    return {f: list(zip(idx[r].tolist(), vals[r].tolist(), frac[r].tolist())) for r, f in enumerate(feats)}


def unit_rows(W_dec: torch.Tensor) -> torch.Tensor:
    """W_dec [n_latents, d_in] with rows scaled to unit norm (float32, CPU), for `decoder_cosines`."""
    W = W_dec.detach().float().cpu()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_cosines(unit: torch.Tensor, feature: int, others: Sequence[int]) -> dict[tuple[int, int], float]:
    """{(feature, j): cos(W_dec[feature], W_dec[j])} for the j in range (others are left out);
    unit = `unit_rows(W_dec)`."""
    n = unit.shape[0]
    js = [int(j) for j in others if 0 <= int(j) < n]
    if not js or not 0 <= feature < n:
        return {}
    cos = unit[js] @ unit[feature]
    return {(feature, j): float(c) for j, c in zip(js, cos.tolist())}


# --- one feature's view -----------------------------------------------------------------------------
def _context(w: Window, vocab: Sequence[str]) -> Context:
    n = len(vocab)
    return Context(tokens=[vocab[t] if 0 <= t < n else f"<id {t}>" for t in w.tokens],
                   acts=[float(a) for a in w.acts], row=int(w.row), start=int(w.start))


def context_groups(ex: FeatureExamples, vocab: Sequence[str], *, n_top: int | None = None,
                   per_quantile: int | None = 5) -> list[ContextGroup]:
    """The top windows (at most n_top) and each quantile bin (at most per_quantile windows, the
    strongest of the bin), highest bin first. Bin bounds are the min/max window maxima in it."""
    top = ex.top[:n_top] if n_top is not None else ex.top
    groups = [ContextGroup(title=f"Top activations (max {ex.max_act:.3g})", kind="top", bin_min=-1.0,
                           bin_max=float(ex.max_act), bin_contains=-1.0,
                           contexts=[_context(w, vocab) for w in top])]
    bins = [q for q in ex.quantiles]
    nb = len(bins)
    for q in range(nb - 1, -1, -1):
        windows = sorted(bins[q], key=lambda w: -w.max_act)
        if not windows:
            continue
        shown = windows[:per_quantile] if per_quantile is not None else windows
        lo, hi = min(w.max_act for w in windows), max(w.max_act for w in windows)
        groups.append(ContextGroup(title=f"Quantile {q + 1}/{nb}: max activation {lo:.3g} – {hi:.3g}",
                                   kind="quantile", bin_min=float(lo), bin_max=float(hi),
                                   bin_contains=1.0 / nb, contexts=[_context(w, vocab) for w in shown]))
    return groups


def feature_view(ex: FeatureExamples, vocab: Sequence[str], *, logits: LogitEffects | None = None,
                 alignment: list[tuple[int, float, float]] | None = None,
                 cosines: Mapping[tuple[int, int], float] | None = None,
                 explanation: Mapping[str, Any] | None = None, n_top: int | None = None,
                 per_quantile: int | None = 5, n_correlated: int = 10) -> FeatureView:
    """The `FeatureView` of one cached feature. explanation: {"explanation": str, "scores":
    {scorer: float}} as the autointerp runners write it (either key may be missing)."""
    n = len(vocab)
    name = lambda t: vocab[t] if 0 <= t < n else f"<id {t}>"           # noqa: E731
    cosines = cosines or {}
    view = FeatureView(
        site=ex.site, feature=int(ex.feature), n_tokens=int(ex.n_tokens), density=float(ex.density),
        max_act=float(ex.max_act), mean_active=float(ex.mean_active),
        hist_edges=[float(e) for e in ex.hist_edges], hist_counts=[int(c) for c in ex.hist_counts],
        groups=context_groups(ex, vocab, n_top=n_top, per_quantile=per_quantile),
        alignment=list(alignment or []),
        correlated=[(int(j), float(r), cosines.get((int(ex.feature), int(j))))
                    for j, r in list(ex.correlated)[:n_correlated]])
    if logits is not None:
        view.logits_top = [(name(t), v) for t, v in logits.top]
        view.logits_bottom = [(name(t), v) for t, v in logits.bottom]
        view.logits_hist_edges, view.logits_hist_counts = logits.hist_edges, logits.hist_counts
    if explanation:
        text = explanation.get("explanation")
        view.explanation = None if text is None else str(text)
        view.scores = {str(k): float(v) for k, v in (explanation.get("scores") or {}).items()
                       if isinstance(v, (int, float))}
    return view
