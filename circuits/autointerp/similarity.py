"""How similar are the dictionaries of adjacent layers? (Paulo et al. 2024, "Automatically
Interpreting Millions of Features in LLMs", §5: SAEs of nearby residual layers learn similar
features, seen both in their decoder directions and in their explanations.)

For sites a = kind.L and b = kind.L+1 (same kind: residual, MLP, ...):

- decoder matching: the one-to-one (Hungarian, Kuhn 1955) assignment pi between rows of W_dec^a
  and W_dec^b maximising sum_i cos(d^a_i, d^b_pi(i)) (`sae.similarity.match`); reported as the
  mean and median matched cosine, the share above 0.5 and 0.7, and the same mean for b replaced by
  random unit directions (a null baseline at the same shapes). Only for sites whose activations
  live in one space (residual-stream outputs: resid, attn, mlp, embed); `mlp_hidden.L` is in each
  layer's own neuron basis, so its decoder matching is left empty.
- explanation matching: explanations of the explained features at a and at b embedded with
  all-MiniLM-L6-v2 (unit norm, `circuits.autointerp.embedding.embed`) and Hungarian-matched by
  cosine; reported as the mean matched cosine, the mean cosine over all pairs (what unrelated
  explanations score), and `agreement`: among explained features at a whose decoder partner is
  explained at b, the share the explanation matching pairs with that same partner.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import torch

from sae.dictionary import Dictionary, random_unit_rows
from sae.similarity import match

#: site kinds whose activations are vectors of the residual stream (one basis at every layer)
SHARED_SPACE = ("resid", "attn", "mlp", "embed")
COLUMNS = ["kind", "site_a", "site_b", "layer_a", "layer_b", "n_a", "n_b", "decoder_mean_cos",
           "decoder_median_cos", "decoder_frac_above_0.5", "decoder_frac_above_0.7", "decoder_random_mean_cos",
           "n_explained_a", "n_explained_b", "explanation_mean_cos", "explanation_pair_mean_cos", "agreement",
           "n_agreement"]
_SITE = re.compile(r"^([a-z_]+)\.(\d+)$")


def parse_site(site: str) -> tuple[str, int]:
    """("resid", 3) from "resid.3"; a clear error otherwise."""
    m = _SITE.match(site)
    if not m:
        raise ValueError(f"site {site!r} is not of the form KIND.LAYER (e.g. 'resid.3', 'mlp_hidden.5')")
    return m.group(1), int(m.group(2))


def adjacent_pairs(sites: Iterable[str]) -> list[tuple[str, str]]:
    """(kind.L, kind.L+1) for every kind and every consecutive pair of layers present."""
    by_kind: dict[str, set[int]] = {}
    for s in sites:
        kind, layer = parse_site(s)
        by_kind.setdefault(kind, set()).add(layer)
    return [(f"{kind}.{l}", f"{kind}.{l + 1}") for kind in sorted(by_kind)
            for l in sorted(by_kind[kind]) if l + 1 in by_kind[kind]]


def _rows(d: Dictionary | torch.Tensor) -> torch.Tensor:
    return d.W_dec.detach() if isinstance(d, Dictionary) else d


def decoder_matching(a: Dictionary | torch.Tensor, b: Dictionary | torch.Tensor, *, absolute: bool = False,
                     seed: int = 0) -> dict[str, Any]:
    """Hungarian matching of decoder rows (see module docstring) -> {pairs [m, 2], cos [m],
    mean_cos, median_cos, frac_above_0.5, frac_above_0.7, random_mean_cos}."""
    A, B = _rows(a), _rows(b)
    pairs, cos = match(A, B, absolute=absolute)
    g = torch.Generator().manual_seed(int(seed) + 7_777_777)   # not the stream RandomDictionary.fit(seed) uses
    null = random_unit_rows(B.shape[0], B.shape[1], generator=g)
    _, null_cos = match(A, null, absolute=absolute)
    return {"pairs": pairs, "cos": cos, "mean_cos": float(cos.mean()), "median_cos": float(cos.median()),
            "frac_above_0.5": float((cos > 0.5).float().mean()), "frac_above_0.7": float((cos > 0.7).float().mean()),
            "random_mean_cos": float(null_cos.mean())}


def explanation_matching(texts_a: list[str], texts_b: list[str], *,
                         embed_fn: Callable[[list[str]], torch.Tensor] | None = None) -> dict[str, Any]:
    """Hungarian matching of explanation embeddings -> {pairs [m, 2] (indices into texts_a,
    texts_b), cos [m], mean_cos, pair_mean_cos (mean cosine over all pairs)}."""
    if not texts_a or not texts_b:
        raise ValueError(f"explanation matching needs explanations on both sides, got {len(texts_a)} and "
                         f"{len(texts_b)}")
    if embed_fn is None:
        from .embedding import embed as embed_fn
    E = embed_fn(list(texts_a) + list(texts_b)).float()
    Ea, Eb = E[:len(texts_a)], E[len(texts_a):]
    pairs, cos = match(Ea, Eb)
    Ea, Eb = (torch.nn.functional.normalize(x, dim=1) for x in (Ea, Eb))
    return {"pairs": pairs, "cos": cos, "mean_cos": float(cos.mean()), "pair_mean_cos": float((Ea @ Eb.T).mean())}


def layer_similarity(dictionaries: Mapping[str, Dictionary],
                     explanations: Mapping[str, Mapping[int, str]] | None = None, *,
                     pairs: Iterable[tuple[str, str]] | None = None, absolute: bool = False, seed: int = 0,
                     embed_fn: Callable[[list[str]], torch.Tensor] | None = None) -> pd.DataFrame:
    """One row per adjacent pair of sites (default `adjacent_pairs(dictionaries)`) with the
    module docstring's columns (NaN where a measure does not apply). explanations:
    {site: {feature: text}}; unparseable or empty ones should be left out by the caller."""
    explanations = explanations or {}
    pairs = list(pairs) if pairs is not None else adjacent_pairs(dictionaries)
    if not pairs:
        raise ValueError(f"no adjacent layers among the sites {sorted(dictionaries)}: give dictionaries at "
                         "consecutive layers of one kind (e.g. resid.3 and resid.4)")
    rows = []
    for sa, sb in pairs:
        for s in (sa, sb):
            if s not in dictionaries:
                raise ValueError(f"no dictionary at {s!r}; dictionaries are at {sorted(dictionaries)}")
        (kind, la), (kind_b, lb) = parse_site(sa), parse_site(sb)
        da, db = dictionaries[sa], dictionaries[sb]
        row: dict[str, Any] = {c: math.nan for c in COLUMNS}
        row.update(kind=kind if kind == kind_b else f"{kind}/{kind_b}", site_a=sa, site_b=sb, layer_a=la,
                   layer_b=lb, n_a=da.n_latents, n_b=db.n_latents)
        partner = None
        if kind in SHARED_SPACE and kind_b in SHARED_SPACE and da.d_in == db.d_in:
            dm = decoder_matching(da, db, absolute=absolute, seed=seed)
            row.update(decoder_mean_cos=dm["mean_cos"], decoder_median_cos=dm["median_cos"],
                       decoder_random_mean_cos=dm["random_mean_cos"])
            row["decoder_frac_above_0.5"], row["decoder_frac_above_0.7"] = dm["frac_above_0.5"], dm["frac_above_0.7"]
            partner = {int(i): int(j) for i, j in dm["pairs"]}
        ea, eb = dict(explanations.get(sa, {})), dict(explanations.get(sb, {}))
        row.update(n_explained_a=len(ea), n_explained_b=len(eb))
        if ea and eb:
            fa, fb = sorted(ea), sorted(eb)
            em = explanation_matching([ea[f] for f in fa], [eb[f] for f in fb], embed_fn=embed_fn)
            row.update(explanation_mean_cos=em["mean_cos"], explanation_pair_mean_cos=em["pair_mean_cos"])
            if partner is not None:
                exp_partner = {fa[int(i)]: fb[int(j)] for i, j in em["pairs"]}
                both = [f for f in fa if partner.get(f) in eb]
                row["n_agreement"] = len(both)
                if both:
                    row["agreement"] = sum(exp_partner.get(f) == partner[f] for f in both) / len(both)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def plot_layer_similarity(df: pd.DataFrame, path: Any) -> Any:
    """Mean matched cosine (decoder, with its random baseline, and explanation) against layer,
    one line per kind; saved as PNG (interventions.runners.report.save_figure)."""
    from interventions.runners.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for kind, part in df.groupby("kind"):
        x = part["layer_a"] + 0.5
        axes[0].plot(x, part["decoder_mean_cos"], marker="o", label=f"{kind}")
        axes[0].plot(x, part["decoder_random_mean_cos"], ls=":", color="grey")
        axes[1].plot(x, part["explanation_mean_cos"], marker="o", label=f"{kind} matched")
        axes[1].plot(x, part["explanation_pair_mean_cos"], ls=":", marker=".", label=f"{kind} all pairs")
    axes[0].set(title="decoder directions (Hungarian)", xlabel="between layers L and L+1",
                ylabel="mean matched cosine")
    axes[1].set(title="explanations (Hungarian on embeddings)", xlabel="between layers L and L+1")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
