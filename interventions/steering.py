"""Steering with dictionary features: add a feature direction or clamp a feature's code.

With f_i = W_dec[i], codes c = encode(x) and a feature set F at a site (Bricken et al. 2023,
"Towards Monosemanticity", feature steering; Templeton et al. 2024, "Scaling Monosemanticity",
feature clamping):

    add     x' = x + Σ_{i∈F} α_i f_i               (c_i += α_i)
    clamp   x' = x + Σ_{i∈F} (v_i - c_i) f_i       (c_i := v_i; the error and other features kept)

`steer` applies this in one spliced forward at chosen positions and returns its `SplicedRun`
(gradients available as for any spliced run). `steer_generate` applies it at every position of
every forward of a greedy generation (the prompt, then each new token; with the KV cache the
steered prompt states are reused) and returns the token ids.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import torch

from sae import tracing

from .patching import add_codes, set_codes
from .spliced import (Features, Positions, SplicedRun, check_dictionaries, dictionary_tensor, position_mask,
                     resolve_features, run_spliced, token_batch)

Amount = Union[float, Sequence[float], torch.Tensor]


def _amounts(alpha: Amount | None, value: Amount | None, feats: Mapping[str, torch.Tensor]
             ) -> tuple[dict[str, torch.Tensor], bool]:
    """({site: amounts [k] float64}, clamp?) from exactly one of alpha / value."""
    if (alpha is None) == (value is None):
        raise ValueError("pass exactly one of alpha= (add alpha * f_i) or value= (clamp code i to value)")
    amount, clamp = (alpha, False) if value is None else (value, True)
    out = {}
    for site, ids in feats.items():
        a = torch.as_tensor(amount, dtype=torch.float64).reshape(-1)
        if a.numel() == 1:
            a = a.expand(len(ids))
        if a.numel() != len(ids) or not torch.isfinite(a).all():
            raise ValueError(f"{'value' if clamp else 'alpha'} must be one finite number or one per "
                             f"feature ({len(ids)} at {site}), got {amount!r}")
        out[site] = a
    return out, clamp


def steer(model: Any, dictionaries: Mapping[str, Any], inputs: Any, features: Mapping[str, Features], *,
          alpha: Amount | None = None, value: Amount | None = None, positions: Positions = None,
          attention_mask: torch.Tensor | None = None, grad: bool = False,
          metric: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SplicedRun:
    """One forward of `inputs` with `features` ({site: ids}) steered at `positions`: add
    alpha * f_i (alpha=) or clamp code i to value (value=); one number or one per feature."""
    feats = resolve_features(model, dictionaries, features)
    amounts, clamp = _amounts(alpha, value, feats)
    dicts = {s: dictionaries[s] for s in feats}
    ids, mask = token_batch(model, inputs, attention_mask)
    where = position_mask(positions, *ids.shape, device=ids.device)
    make = set_codes if clamp else add_codes
    edits = {s: make(feats[s], amounts[s], where) for s in feats}
    return run_spliced(model, dicts, ids, mask, edits=edits, grad=grad, metric=metric)


def steered_activation(dictionary: Any, x: torch.Tensor, features: torch.Tensor, amounts: torch.Tensor,
                       clamp: bool) -> torch.Tensor:
    """x' [batch, pos, d_in] for x [batch, pos, d_in] per the module docstring."""
    W = dictionary.W_dec[features.to(dictionary.W_dec.device)].detach()      # [k, d_in]
    a = amounts.to(W)                                                         # [k]
    if clamp:
        codes = dictionary.encode(dictionary_tensor(dictionary, x.detach()))[..., features.to(W.device)]
        delta = (a - codes.to(W)) @ W                                         # [batch, pos, d_in]
    else:
        delta = a @ W                                                         # [d_in]
    return x + delta.to(x)


def steer_generate(model: Any, dictionaries: Mapping[str, Any], inputs: Any, features: Mapping[str, Features], *,
                   alpha: Amount | None = None, value: Amount | None = None, max_new_tokens: int = 20,
                   attention_mask: torch.Tensor | None = None, **generate_kwargs: Any) -> torch.Tensor:
    """Greedy generation of exactly `max_new_tokens` tokens with `features` steered at every
    position of every forward. Returns token ids [batch, pos + max_new_tokens]. For a batch of
    prompts of different lengths pass left-padded ids (generation appends on the right)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    feats = resolve_features(model, dictionaries, features)
    amounts, clamp = _amounts(alpha, value, feats)
    dicts = {s: dictionaries[s] for s in feats}
    sites = check_dictionaries(model, dicts)
    ids, mask = token_batch(model, inputs, attention_mask)
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        with tracing.generate(model.nn, ids, mask, max_new_tokens=max_new_tokens, **generate_kwargs) as tracer:
            for _ in tracing.steps(tracer, max_new_tokens):
                for site in sites:
                    x = site.read(model.nn)
                    site.write(model.nn, steered_activation(dicts[site.name], x, feats[site.name],
                                                            amounts[site.name], clamp))
            saved["ids"] = tracing.save(tracing.result(tracer))
    return saved["ids"]
