"""Activation sites, named uniformly for every architecture and discovered from the module tree.

    embed          residual stream entering the first block (input of block 0)
    resid.L        residual stream leaving block L (block output)
    attn.L         attention output of block L, before it joins the residual stream
    mlp.L          MLP output of block L
    mlp_hidden.L   MLP hidden activations of block L (input of the MLP's output projection)

Discovery runs one tiny forward with PyTorch hooks and records, for every module, when it is
entered and left and whether it returns a tuple. The blocks are the `ModuleList` with
`config.num_hidden_layers` entries; inside a block the attention and MLP are the children whose
names say so ("attn"/"attention", "mlp"/"feed_forward"/"ffn"); the MLP's output projection is
the last weight-carrying module that runs inside it. No table of model names is involved.

A `Site` reads and writes its tensor [batch, pos, width] inside a trace, hiding whether it lives
in a module's input or output and whether that output is a tuple.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from . import tracing

_ATTN = re.compile(r"attn|attention", re.I)
_MLP = re.compile(r"mlp|feed_forward|ffn", re.I)


@dataclass(frozen=True)
class Site:
    name: str               # "resid.3"
    kind: str               # embed | resid | attn | mlp | mlp_hidden
    layer: int              # block index; -1 for embed
    module: str             # dotted module path in the transformers model
    io: str                 # "input" (first positional argument) or "output"
    tuple_index: int | None  # element of a tuple output; None for a plain tensor
    width: int              # size of the last dimension
    order: int              # position in the forward pass (sites must be visited in this order)

    def read(self, traced: Any) -> Any:
        """Inside a trace: this site's activation [batch, pos, width]."""
        return tracing.read(traced, self.module, self.io, self.tuple_index)

    def write(self, traced: Any, value: Any) -> None:
        """Inside a trace: replace this site's activation with `value` [batch, pos, width]."""
        tracing.write(traced, self.module, self.io, self.tuple_index, value)


def _blocks(hf: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    n = getattr(hf.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in hf.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    matching = [(name, m) for name, m in lists if len(m) == n] or lists
    if not matching:
        raise ValueError(f"{type(hf).__name__} has no nn.ModuleList of transformer blocks; "
                         f"sae-circuits needs a decoder-only model with a list of blocks")
    return max(matching, key=lambda item: len(item[1]))


def _largest(children: list[tuple[str, torch.nn.Module]], pattern: re.Pattern) -> list[str]:
    """The child whose name matches `pattern` and holds the most parameters (so "attention"
    wins over "post_attention_layernorm"), as a one-element list, or []."""
    hits = [(sum(p.numel() for p in m.parameters()), path) for path, m in children
            if pattern.search(path.rsplit(".", 1)[1])]
    return [max(hits)[1]] if hits else []


def discover_sites(hf: torch.nn.Module) -> dict[str, Site]:
    """All sites of a `transformers` causal LM, keyed by name, in forward order."""
    blocks_path, blocks = _blocks(hf)
    names = {m: n for n, m in hf.named_modules()}
    enter: dict[str, int] = {}
    leave: dict[str, tuple[int, Any, Any]] = {}  # name -> (tick, first input, output)
    tick = [0]

    def pre(module, args):
        enter.setdefault(names[module], tick[0])
        tick[0] += 1

    def post(module, args, output):
        leave.setdefault(names[module], (tick[0], args[0] if args else None, output))
        tick[0] += 1

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    try:
        device = next(hf.parameters()).device
        with torch.no_grad():
            hf(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()

    def out_site(name, kind, layer, path):
        _, _, out = leave[path]
        idx = 0 if isinstance(out, tuple) else None
        tensor = out[0] if idx is not None else out
        return Site(name, kind, layer, path, "output", idx, tensor.shape[-1], leave[path][0])

    def in_site(name, kind, layer, path):
        arg = leave[path][1]
        if not isinstance(arg, torch.Tensor):
            raise ValueError(f"module {path} takes no positional tensor input; cannot place site {name}")
        return Site(name, kind, layer, path, "input", None, arg.shape[-1], enter[path])

    sites = [in_site("embed", "embed", -1, f"{blocks_path}.0")]
    for layer, block in enumerate(blocks):
        prefix = f"{blocks_path}.{layer}"
        children = [(f"{prefix}.{n}", m) for n, m in block.named_children() if f"{prefix}.{n}" in leave]
        attn, mlp = _largest(children, _ATTN), _largest(children, _MLP)
        if attn:
            sites.append(out_site(f"attn.{layer}", "attn", layer, attn[0]))
        if mlp:
            projections = [n for n, m in hf.get_submodule(mlp[0]).named_modules()
                           if n and getattr(m, "weight", None) is not None and m.weight.dim() == 2
                           and f"{mlp[0]}.{n}" in leave]
            if projections:
                last = max(projections, key=lambda n: leave[f"{mlp[0]}.{n}"][0])
                sites.append(in_site(f"mlp_hidden.{layer}", "mlp_hidden", layer, f"{mlp[0]}.{last}"))
            sites.append(out_site(f"mlp.{layer}", "mlp", layer, mlp[0]))
        sites.append(out_site(f"resid.{layer}", "resid", layer, prefix))
    return {s.name: s for s in sorted(sites, key=lambda s: s.order)}


def _summary(sites: dict[str, Site]) -> str:
    kinds: dict[str, list[int]] = {}
    for s in sites.values():
        kinds.setdefault(s.kind, []).append(s.layer)
    parts = []
    for kind, layers in kinds.items():
        parts.append(kind if kind == "embed" else f"{kind}.{min(layers)}..{kind}.{max(layers)}")
    return ", ".join(parts)


def resolve_sites(model: Any, names: str | Iterable[str | Site]) -> list[Site]:
    """Sites for names or glob patterns ("resid.*", "mlp_hidden.3"), in forward order.

    Unknown names raise a ValueError that lists the valid ones."""
    sites = model.sites
    names = [names] if isinstance(names, (str, Site)) else list(names)
    if not names:
        raise ValueError(f"no sites given; valid sites: {_summary(sites)}")
    chosen: dict[str, Site] = {}
    for name in names:
        if isinstance(name, Site):
            chosen[name.name] = name
            continue
        hits = fnmatch.filter(sites, name) if any(c in name for c in "*?[") else [name] if name in sites else []
        if not hits:
            raise ValueError(f"unknown site {name!r} for {model.name}; valid sites: {_summary(sites)} "
                             f"(glob patterns like 'resid.*' work too)")
        chosen.update((h, sites[h]) for h in hits)
    return sorted(chosen.values(), key=lambda s: s.order)
