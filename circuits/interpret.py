"""Interpret a circuit's feature nodes: latent cache, autointerp explanations and dashboards.

For the feature nodes of a circuit graph (`circuits.dashboards.graph_features`):

1. one pass over the corpus builds the latent cache of exactly those features
   (`circuits.autointerp.cache`; rerun with the same arguments, it is reopened);
2. the strongest `n_explain` features by |effect| are explained from the train half of their
   windows and scored by detection on the held-out half (Paulo et al. 2024): explanation, AUC of
   P(yes) separating activating from non-activating windows; the explainer and scorer is the
   subject model itself (`LocalClient`), so nothing is downloaded;
3. one dashboard page per feature node, with the explanation and score where present
   (`circuits.dashboards.render_dashboards`); the graph's nodes get attributes `explanation`
   and `detection`, which the report and the SVG links read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import networkx as nx

from .autointerp.cache import build_latent_cache
from .autointerp.clients import LocalClient
from .autointerp.explain import explain
from .autointerp.scorers import score_detection, split_examples
from .dashboards import graph_features, render_dashboards


def interpret_circuit(graph: nx.DiGraph, model: Any, dictionaries: Mapping[str, Any], contexts: Any,
                      out_dir: str | Path, *, cache_dir: str | Path, n_explain: int = 15,
                      progress: bool = True) -> dict[tuple[str, int], dict]:
    """Steps 1-3 of the module docstring; returns {(site, feature): {"explanation", "scores"}}.
    Dashboards go to `out_dir` (index.html and <site>/f<i>.html)."""
    features = graph_features(graph)
    if not features:
        return {}
    cache = build_latent_cache(model, {s: dictionaries[s] for s in features}, contexts, cache_dir,
                               features=features, n_hard_negatives=0, progress=progress)
    ranked = sorted(((abs(float(d.get("effect", 0.0))), node, d) for node, d in graph.nodes(data=True)
                     if d.get("kind") == "feature"), key=lambda t: -t[0])
    client = LocalClient(model) if n_explain > 0 else None
    found: dict[tuple[str, int], dict] = {}
    for _, node, d in ranked[:n_explain]:
        key = (str(d["site"]), int(d["feature"]))
        if key in found:                       # the same feature at another position
            graph.nodes[node].update(found[key]["attrs"])
            continue
        train, test = split_examples(cache.examples(*key), seed=0)
        exp = explain(train, client, model.tokenizer)
        text = exp.text if exp.ok else f"(unparsed) {' '.join(exp.raw.split())[:80]}"   # one line
        det = None                    # not scored (JSON has no NaN)
        if exp.ok:
            try:
                det = score_detection(exp.text, test, client, model.tokenizer).score
            except ValueError as e:   # e.g. a feature active in every window: nothing to tell it from
                text += f" (not scored: {str(e).split(';')[0]})"
        found[key] = {"explanation": text, "scores": {} if det is None else {"detection": det},
                      "attrs": {"explanation": text, "detection": det}}
        graph.nodes[node].update(found[key]["attrs"])
    explanations = {k: {"explanation": v["explanation"], "scores": v["scores"]} for k, v in found.items()}
    for site, ids in features.items():
        render_dashboards(model, dictionaries[site], cache, out_dir, site=site, features=ids,
                          explanations=explanations, progress=progress)
    return explanations
