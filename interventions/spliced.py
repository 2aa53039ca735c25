"""The SAE-spliced model: a traced forward with a dictionary at every chosen site.

At a site with activation x [batch, pos, d_in] and a dictionary (encode, decode, W_dec
[n_latents, d_in]), the splice of Marks et al. 2024 ("Sparse Feature Circuits", arXiv 2403.19647,
§2) writes the activation as features plus an error term:

    c = encode(x)                   codes  [batch, pos, n_latents]
    e = x - decode(c)               error  [batch, pos, d_in]
    x = decode(c) + e               so the spliced forward equals the plain one

An edit maps (c, e) -> (c', e') and the site passes on

    v = x + (decode(c') - decode(c)) + (e' - e)      (keep_error=True; v = x where nothing changed)
    v = decode(c') + e'   with e := 0 before editing (keep_error=False: the reconstruction alone)

Every decoder here is affine, so decode(c') - decode(c) = (c' - c) W_dec: changing code i by
delta moves the activation by delta * f_i with f_i = W_dec[i] (Cunningham et al. 2023, arXiv
2309.08600, §4 "sub-rank-one" edits build on this; see `interventions.patching`).

Gradients (DESIGN.md, "Gradients through spliced dictionaries"). With grad=True the post-edit
codes and errors are leaves and the site output is

    f = c'.detach().requires_grad_()          err = e'.detach().requires_grad_()
    out = x + (v - x).detach() + (decode(f) - decode(f).detach()) + (err - err.detach())

The last two terms are zero in value, so the forward is unchanged; for a metric m with upstream
gradient g = dm/d(out) [batch, pos, d_in]:

    dm/d err = g            dm/d f = g W_dec^T      (per token: W_dec g)

The x term passes g on to earlier layers with identity Jacobian, so leaves at upstream sites get
total effects (through all later sites), as in Marks et al.'s node attribution. The identity is
exact for an unedited site with keep_error=True; at an edited site or with keep_error=False it
treats the change as a constant offset (straight-through). Sites in `stop_grad` drop the x term
(out = v.detach() + leaf terms): downstream quantities then depend on upstream leaves only along
paths that avoid those sites, the "intermediate nodes held fixed" of Marks et al.'s edges.
Dictionary parameters are frozen while the graph is built, so backward never touches them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch

from sae import tracing
from sae.sites import Site, resolve_sites

#: An edit of one site: (codes [batch, pos, n_latents], error [batch, pos, d_in]) -> the same.
#: It receives fresh tensors it may modify in place, and returns the edited pair.
Edit = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
#: Where to act: None (every position); an int or a list of ints (the same columns in every
#: row, negative counting from the end); an integer tensor [batch] or [batch, k] (per row); or
#: a bool mask [batch, pos].
Positions = Union[None, int, Sequence[int], torch.Tensor]
#: Feature ids of one site: an int, a list of ints, a 1-D integer tensor, or "all".
Features = Union[int, Sequence[int], torch.Tensor, str]


@dataclass
class SplicedRun:
    """What a spliced forward returns. Per-site tensors are keyed by site name.

    codes and errors are the post-edit values the site was run with (the gradient leaves when
    the run had grad=True: read `.grad` after `metric.backward()`, or use `grads(site)`)."""

    logits: torch.Tensor | None                                      # [batch, pos, vocab]
    codes: dict[str, torch.Tensor] = field(default_factory=dict)     # [batch, pos, n_latents]
    errors: dict[str, torch.Tensor] = field(default_factory=dict)    # [batch, pos, d_in]
    acts: dict[str, torch.Tensor] = field(default_factory=dict)      # [batch, pos, d_in] what the model computed there
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)   # [batch, pos, d_in] what the site passed on
    metric: torch.Tensor | None = None                               # metric(logits), when one was given
    backpropagated: bool = False                                     # run_spliced ran metric.sum().backward()

    def grads(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(dm/dc [batch, pos, n_latents], dm/de [batch, pos, d_in]) at `site` after a backward
        (zeros where the metric run_spliced backpropagated does not depend on the leaf)."""
        if site not in self.codes:
            raise KeyError(f"no spliced site {site!r} in this run; spliced sites: {list(self.codes)}")
        c, e = self.codes[site], self.errors[site]
        if not c.requires_grad:
            raise ValueError("this run was made with grad=False: pass grad=True (and a metric, or call "
                             "backward yourself) to get gradients w.r.t. codes and errors")
        if self.backpropagated:  # a leaf the metric does not depend on has no .grad: its gradient is 0
            return (torch.zeros_like(c) if c.grad is None else c.grad,
                    torch.zeros_like(e) if e.grad is None else e.grad)
        if c.grad is None or e.grad is None:
            raise ValueError(f"no gradient at {site} yet: pass metric=... to run_spliced, or call "
                             f"backward() on a function of run.logits first")
        return c.grad, e.grad

    def edit_norm(self, site: str) -> torch.Tensor:
        """||out - x|| per token [batch, pos]: how far the edits moved the activation at `site`."""
        return (self.outputs[site] - self.acts[site]).detach().float().norm(dim=-1)


# --- validation helpers, shared by patching, ablation and steering ----------------------------
def check_dictionaries(model: Any, dictionaries: Mapping[Any, Any]) -> list[Site]:
    """The sites of `dictionaries` ({site name: Dictionary}) in forward order, after checking
    that every name is a site of `model` and every dictionary fits its site's width."""
    if not isinstance(dictionaries, Mapping) or not dictionaries:
        raise ValueError("pass dictionaries as a non-empty {site name: Dictionary} mapping, "
                         f"got {type(dictionaries).__name__}")
    for key in dictionaries:
        if not isinstance(key, str) or key not in model.sites:
            raise ValueError(f"dictionary key {key!r} is not a site of {model.name}; use exact site "
                             f"names such as {list(model.sites)[:4]} (see model.sites)")
    sites = resolve_sites(model, list(dictionaries))
    for site in sites:
        d = dictionaries[site.name]
        for attr in ("encode", "decode", "d_in", "n_latents"):
            if not hasattr(d, attr):
                raise TypeError(f"the dictionary for {site.name} is a {type(d).__name__} without "
                                f"`{attr}`; pass sae.Dictionary objects")
        if d.d_in != site.width:
            raise ValueError(f"the dictionary for {site.name} has d_in={d.d_in}, but {site.name} is "
                             f"{site.width} wide: it was trained on another site or model")
    return sites


def token_batch(model: Any, inputs: Any, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids [batch, pos], attention_mask [batch, pos] or None) from token ids [batch, pos]
    or [pos], the dict `model.tokenize` returns, or text (tokenized with right padding)."""
    if isinstance(inputs, (str, list)) and inputs and all(isinstance(t, str) for t in
                                                         ([inputs] if isinstance(inputs, str) else inputs)):
        inputs = model.tokenize(inputs)
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise ValueError(f"a token batch dict needs 'input_ids', got keys {list(inputs)}")
        attention_mask = inputs.get("attention_mask") if attention_mask is None else attention_mask
        inputs = inputs["input_ids"]
    if not isinstance(inputs, torch.Tensor) or inputs.dtype not in (torch.long, torch.int, torch.int32):
        raise TypeError(f"pass token ids as an integer tensor [batch, pos], a model.tokenize(...) "
                        f"dict or text, got {type(inputs).__name__}")
    ids = inputs[None] if inputs.dim() == 1 else inputs
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"token ids must have shape [batch, pos] with pos >= 1, got {tuple(inputs.shape)}")
    if attention_mask is not None:
        attention_mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the token "
                             f"ids have shape {tuple(ids.shape)}")
        attention_mask = attention_mask.to(model.device)
    return ids.to(model.device), attention_mask


def position_mask(positions: Positions, batch: int, n_pos: int,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """A bool mask [batch, pos] of the positions named by `positions` (see `Positions`)."""
    def check(p: torch.Tensor) -> torch.Tensor:
        bad = (p < -n_pos) | (p >= n_pos)
        if bad.any():
            raise ValueError(f"position {int(p[bad][0])} is out of range for sequences of {n_pos} "
                             f"tokens: valid positions are -{n_pos}..{n_pos - 1}")
        return p % n_pos

    mask = torch.zeros(batch, n_pos, dtype=torch.bool, device=device)
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return mask.fill_(True)
    if isinstance(positions, torch.Tensor):
        p = positions.to(device)
        if p.dtype == torch.bool:
            if p.shape != (batch, n_pos):
                raise ValueError(f"a bool position mask must have shape [batch, pos] = {(batch, n_pos)}, "
                                 f"got {tuple(p.shape)}")
            return p.clone()
        if p.is_floating_point() or p.dim() not in (1, 2) or p.shape[0] != batch:
            raise ValueError(f"an integer position tensor gives positions per row: shape [batch] or "
                             f"[batch, k] with batch={batch}, got {tuple(p.shape)} {p.dtype}; use a "
                             f"list of ints for the same positions in every row")
        p = check(p.long()).reshape(batch, -1)
        return mask.scatter_(1, p, True)
    if isinstance(positions, int) and not isinstance(positions, bool):
        positions = [positions]
    if isinstance(positions, (list, tuple, range)) and all(isinstance(q, int) and not isinstance(q, bool)
                                                           for q in positions):
        p = check(torch.tensor(list(positions), dtype=torch.long, device=device))
        mask[:, p] = True
        return mask
    raise TypeError(f"positions must be None, an int, a list of ints, an integer tensor [batch] or "
                    f"[batch, k], or a bool mask [batch, pos]; got {positions!r}")


def feature_ids(features: Features, n_latents: int, site: str = "") -> torch.Tensor:
    """The feature ids [k] (long) named by `features`, checked against `n_latents`."""
    where = f" at {site}" if site else ""
    if isinstance(features, str):
        if features != "all":
            raise ValueError(f"features{where} must be ids or 'all', got {features!r}")
        return torch.arange(n_latents)
    if isinstance(features, torch.Tensor):
        if features.dtype == torch.bool or features.is_floating_point() or features.dim() > 1:
            raise TypeError(f"a feature tensor{where} must be a 1-D integer tensor of ids, got "
                            f"{tuple(features.shape)} {features.dtype}")
        ids = features.detach().long().cpu().reshape(-1)
    else:
        items = [features] if isinstance(features, int) else list(features)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError(f"feature ids{where} must be ints, got {features!r}")
        ids = torch.tensor(items, dtype=torch.long)
    bad = (ids < 0) | (ids >= n_latents)
    if bad.any():
        raise ValueError(f"feature id {int(ids[bad][0])}{where} is out of range: the dictionary has "
                         f"{n_latents} latents (valid ids 0..{n_latents - 1})")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"feature ids{where} contain duplicates: {ids.tolist()}")
    return ids


def resolve_features(model: Any, dictionaries: Mapping[str, Any],
                     features: Mapping[str, Features]) -> dict[str, torch.Tensor]:
    """{site: feature ids [k]} for a {site: Features} mapping, checked against the dictionaries."""
    if not isinstance(features, Mapping) or not features:
        raise ValueError("pass features as a non-empty {site name: feature ids} mapping, e.g. "
                         "{'resid.3': [12, 40]}")
    missing = [s for s in features if s not in dictionaries]
    if missing:
        raise ValueError(f"features name sites without a dictionary: {missing}; dictionaries are "
                         f"given for {list(dictionaries)}")
    check_dictionaries(model, {s: dictionaries[s] for s in features})
    return {s: feature_ids(f, dictionaries[s].n_latents, s) for s, f in features.items()}


def dictionary_tensor(d: Any, like: torch.Tensor) -> torch.Tensor:
    """`like` on the dictionary's device and dtype (unchanged for parameter-free dictionaries)."""
    ref = next(iter(d.parameters()), None) if hasattr(d, "parameters") else None
    ref = next(iter(d.buffers()), None) if ref is None and hasattr(d, "buffers") else ref
    return like if ref is None else like.to(device=ref.device, dtype=ref.dtype)


# --- the splice --------------------------------------------------------------------------------
def _splice_site(d: Any, x: torch.Tensor, edit: Edit | None, keep_error: bool, grad: bool,
                 stop: bool, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One site: (output [batch, pos, d_in] in x's dtype, codes, error) per the module docstring."""
    xd = dictionary_tensor(d, x.detach())
    c0, x_hat0 = d.encode_and_reconstruct(xd)             # [batch, pos, n_latents], [batch, pos, d_in]
    e0 = xd - x_hat0 if keep_error else torch.zeros_like(xd)
    c, e = c0.detach(), e0.detach()
    if edit is not None:
        c, e = edit(c.clone(), e.clone())
        if not isinstance(c, torch.Tensor) or not isinstance(e, torch.Tensor) or \
                c.shape != c0.shape or e.shape != e0.shape:
            raise ValueError(f"the edit at {name} must return (codes {tuple(c0.shape)}, error "
                             f"{tuple(e0.shape)}), got {getattr(c, 'shape', c)!r}, {getattr(e, 'shape', e)!r}")
    if not keep_error:
        v = (x_hat0 + _decoded_change(d, c - c0) + e).to(x)
    elif edit is not None:
        v = x + (_decoded_change(d, c - c0) + (e - e0)).to(x)
    else:
        v = x                                             # bit-exact pass-through
    if not grad:
        return v.detach(), c, e
    c, e = c.detach().requires_grad_(), e.detach().requires_grad_()
    x_hat = d.decode(c)
    leaf_terms = ((x_hat - x_hat.detach()) + (e - e.detach())).to(x)
    base = v.detach() if stop else (x if v is x else x + (v - x).detach())
    return base + leaf_terms, c, e


def _decoded_change(d: Any, delta: torch.Tensor) -> torch.Tensor:
    """decode(c + delta) - decode(c) = delta W_dec (decoders are affine), computed from the
    latents the edit touched only: delta [batch, pos, n_latents] -> [batch, pos, d_in]."""
    touched = delta.flatten(0, -2).abs().sum(0).nonzero().squeeze(1)  # [m] latents with a change
    return delta[..., touched] @ d.W_dec[touched].to(delta)


def run_spliced(model: Any, dictionaries: Mapping[str, Any], input_ids: Any,
                attention_mask: torch.Tensor | None = None, *, edits: Mapping[str, Edit] | None = None,
                keep_error: bool = True, grad: bool = False,
                metric: Callable[[torch.Tensor], torch.Tensor] | None = None,
                stop_grad: bool | Iterable[str] = (), logits: bool = True) -> SplicedRun:
    """One traced forward with `dictionaries` ({site: Dictionary}) spliced in (module docstring).

    input_ids: token ids [batch, pos], a `model.tokenize` dict, or text.
    edits: {site: Edit} applied to that site's (codes, error) before it passes them on.
    keep_error: False runs every spliced site on its reconstruction alone.
    grad: make post-edit codes and errors gradient leaves. With `metric` (logits [batch, pos,
    vocab] -> tensor) the run also computes metric(logits) and, when grad, backpropagates its sum
    (rows of a batch do not interact, so per-row gradients are those of each row's metric).
    stop_grad: sites (or True for all) that pass no gradient to earlier layers except via leaves.
    logits: False stops the forward after the last spliced site (codes only; faster)."""
    sites = check_dictionaries(model, dictionaries)
    names = [s.name for s in sites]
    ids, mask = token_batch(model, input_ids, attention_mask)
    edits = dict(edits or {})
    unknown = [s for s in edits if s not in dictionaries]
    if unknown:
        raise ValueError(f"edits name sites without a dictionary: {unknown}; spliced sites: {names}")
    stops = set(names) if stop_grad is True else {stop_grad} if isinstance(stop_grad, str) else set(stop_grad or ())
    if stops - set(names):
        raise ValueError(f"stop_grad names sites that are not spliced: {sorted(stops - set(names))}; "
                         f"spliced sites: {names}")
    if metric is not None and not logits:
        raise ValueError("a metric needs the logits: leave logits=True")
    codes: dict[str, torch.Tensor] = {}
    errors: dict[str, torch.Tensor] = {}
    acts: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    frozen = [p for s in names for p in _parameters(dictionaries[s]) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.set_grad_enabled(grad):
            with tracing.trace(model.nn, ids, mask) as tracer:
                for site in sites:
                    x = site.read(model.nn)
                    out, c, e = _splice_site(dictionaries[site.name], x, edits.get(site.name), keep_error,
                                             grad, site.name in stops, site.name)
                    site.write(model.nn, out)
                    codes[site.name] = tracing.save(c)
                    errors[site.name] = tracing.save(e)
                    acts[site.name] = tracing.save(x)
                    outputs[site.name] = tracing.save(out)
                if logits:
                    saved["logits"] = tracing.save(tracing.logits(model.nn))
                else:
                    tracing.stop(tracer)
            run = SplicedRun(saved.get("logits"), codes, errors, acts, outputs)
            if metric is not None:
                run.metric = metric(run.logits)
                if grad:
                    run.metric.sum().backward()
                    run.backpropagated = True
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return run


def _parameters(d: Any) -> list[torch.Tensor]:
    return list(d.parameters()) if hasattr(d, "parameters") else []


class SplicedModel:
    """A model with dictionaries spliced in at their sites, validated once:
    `splice(model, dicts)(ids, ...)` is `run_spliced(model, dicts, ids, ..., keep_error=...)`."""

    def __init__(self, model: Any, dictionaries: Mapping[str, Any], keep_error: bool = True):
        self.sites = check_dictionaries(model, dictionaries)
        self.model, self.dictionaries, self.keep_error = model, dict(dictionaries), keep_error

    def run(self, input_ids: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> SplicedRun:
        """`run_spliced(model, dictionaries, input_ids, attention_mask, keep_error=..., **kwargs)`."""
        kwargs.setdefault("keep_error", self.keep_error)
        return run_spliced(self.model, self.dictionaries, input_ids, attention_mask, **kwargs)

    __call__ = run

    def __repr__(self) -> str:
        return (f"SplicedModel({self.model.name!r}, sites={[s.name for s in self.sites]}, "
                f"keep_error={self.keep_error})")


def splice(model: Any, dictionaries: Mapping[str, Any], keep_error: bool = True) -> SplicedModel:
    """The model with `dictionaries` spliced in at their sites (x = x_hat(c) + e; without the
    error term when keep_error=False), called like `run_spliced` without the dictionaries."""
    return SplicedModel(model, dictionaries, keep_error)
