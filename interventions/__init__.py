"""sae-circuits, interventions half: the SAE-spliced model and what runs on it (patching,
ablation, steering). Imports `sae` only. Public names are imported lazily so that
`import interventions` stays cheap.

    run_spliced(model, {site: Dictionary}, ids, ...) -> SplicedRun    (interventions.spliced)
    splice(model, {site: Dictionary}, keep_error)(ids, ...)           (the same, bound: SplicedModel)
    patch_features / ablate_features                                  (interventions.patching)
    steer / steer_generate                                            (interventions.steering)
    search_feature_set                                                (interventions.search)
    erase / erasure_report / LeaceEraser                              (interventions.erasure, .leace)
    make_ioi / make_pronouns and their metrics                        (interventions.tasks)
"""
from __future__ import annotations

from sae._lazy import lazy_exports

_EXPORTS = {
    "run_spliced": "interventions.spliced",
    "SplicedModel": "interventions.spliced",
    "splice": "interventions.spliced",
    "SplicedRun": "interventions.spliced",
    "position_mask": "interventions.spliced",
    "feature_ids": "interventions.spliced",
    "patch_features": "interventions.patching",
    "ablate_features": "interventions.patching",
    "search_feature_set": "interventions.search",
    "feature_set_kl": "interventions.search",
    "erase": "interventions.erasure",
    "erasure_report": "interventions.erasure",
    "select_concept_features": "interventions.erasure",
    "feature_erasure": "interventions.erasure",
    "Erasure": "interventions.erasure",
    "LeaceEraser": "interventions.leace",
    "fit_leace": "interventions.leace",
    "steer": "interventions.steering",
    "steer_generate": "interventions.steering",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
