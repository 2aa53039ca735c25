"""Neuronpedia-compatible JSON of one feature, with the field names SAEDashboard's Neuronpedia
export uses (jbloomAus/SAEDashboard, `neuronpedia_feature.py`), values rounded to 3 decimals:

    feature_index, frac_nonzero, num_tokens_for_dashboard
    activations[]            {tokens, values, bin_min, bin_max, bin_contains}: the top group has
                             bin_min = -1, bin_max = max activation, bin_contains = -1; a quantile
                             bin its min/max window maxima and the fraction of activating windows
    pos_str/pos_values, neg_str/neg_values            top / bottom logit effects
    freq_hist_data_bar_values/heights                 activation histogram (bin centres, counts)
    logits_hist_data_bar_values/heights               logit-effect histogram (bin centres, counts)
    neuron_alignment_indices/values/l1                largest |W_dec| entries and their share of L1
    correlated_features_indices/pearson/l1            Pearson r; "l1" holds the decoder cosine, as
                                                      SAEDashboard fills it (0 when unknown)
    correlated_neurons_indices/pearson/l1             empty (not computed)
plus `site` and, when autointerp ran, `explanation` and `scores` (not Neuronpedia fields).
Strings are the raw token texts (JSON escapes what it must); `neuronpedia_json` writes UTF-8 text,
or, when some string holds a lone surrogate (not encodable as UTF-8), ASCII with \\u escapes.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from .data import FeatureView
from .text import _SURROGATE


def _r(xs: Sequence[float]) -> list[float]:
    return [round(float(x), 3) if x else 0.0 for x in xs]


def _centres(edges: Sequence[float]) -> list[float]:
    return _r([(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])])


def neuronpedia_feature(view: FeatureView) -> dict[str, Any]:
    """The Neuronpedia dashboard-feature dict of `view` (module docstring)."""
    v = view
    acts = [{"tokens": list(c.tokens), "values": _r(c.acts), "bin_min": round(g.bin_min, 3),
             "bin_max": round(g.bin_max, 3), "bin_contains": round(g.bin_contains, 3)}
            for g in v.groups for c in g.contexts]
    out: dict[str, Any] = {
        "feature_index": v.feature,
        "site": v.site,
        "neuron_alignment_indices": [j for j, _, _ in v.alignment],
        "neuron_alignment_values": _r([w for _, w, _ in v.alignment]),
        "neuron_alignment_l1": _r([f for _, _, f in v.alignment]),
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [j for j, _, _ in v.correlated],
        "correlated_features_l1": _r([0.0 if c is None else c for _, _, c in v.correlated]),
        "correlated_features_pearson": _r([r for _, r, _ in v.correlated]),
        "neg_str": [t for t, _ in v.logits_bottom], "neg_values": _r([x for _, x in v.logits_bottom]),
        "pos_str": [t for t, _ in v.logits_top], "pos_values": _r([x for _, x in v.logits_top]),
        "frac_nonzero": float(v.density),
        "freq_hist_data_bar_values": _centres(v.hist_edges),
        "freq_hist_data_bar_heights": [float(c) for c in v.hist_counts],
        "logits_hist_data_bar_values": _centres(v.logits_hist_edges),
        "logits_hist_data_bar_heights": [float(c) for c in v.logits_hist_counts],
        "num_tokens_for_dashboard": v.n_tokens,
        "activations": acts,
    }
    if v.explanation is not None or v.scores:
        out["explanation"] = v.explanation
        out["scores"] = dict(v.scores)
    return out


def neuronpedia_json(view: FeatureView) -> str:
    """`neuronpedia_feature(view)` as JSON text that is always valid UTF-8 (module docstring)."""
    doc = neuronpedia_feature(view)
    text = json.dumps(doc, ensure_ascii=False, allow_nan=False)
    return json.dumps(doc, allow_nan=False) if _SURROGATE.search(text) else text
