"""sae-circuits, dictionaries half: models and sites, corpora, harvesting, dictionaries, training.

Nothing here imports `interventions` or `circuits`. Public names are imported lazily so that
`import sae` stays cheap.
"""
from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "sae.models",
    "tiny_model": "sae.models",
    "Site": "sae.sites",
    "resolve_sites": "sae.sites",
    "load_corpus": "sae.corpus",
    "Corpus": "sae.corpus",
    "harvest": "sae.harvesting",
    "harvest_to_store": "sae.harvesting",
    "ActivationStore": "sae.store",
    "ShufflingBuffer": "sae.buffer",
    "Dictionary": "sae.dictionary",
    "load": "sae.dictionary",
    "build": "sae.dictionary",
    "TopKSAE": "sae.architectures",
    "BatchTopKSAE": "sae.architectures",
    "ReLUSAE": "sae.architectures",
    "JumpReLUSAE": "sae.architectures",
    "GatedSAE": "sae.architectures",
    "fit_baseline": "sae.baselines",
    "load_any": "sae.formats",
    "mmcs": "sae.similarity",
    "match": "sae.similarity",
    "train": "sae.training",
    "TrainConfig": "sae.training",
    "SyntheticActivations": "sae.synthetic",
    "evaluate": "sae.evaluation",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
