"""sae-circuits, dictionaries half: models and sites, corpora, harvesting, dictionaries, training.

Nothing here imports `interventions` or `circuits`. Public names are imported lazily so that
`import sae` stays cheap.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "sae.models",
    "tiny_model": "sae.models",
    "Site": "sae.sites",
    "sites_of": "sae.sites",
    "load_corpus": "sae.corpus",
    "Corpus": "sae.corpus",
    "harvest": "sae.harvesting",
    "harvest_to_store": "sae.harvesting",
    "ActivationStore": "sae.store",
    "ShufflingBuffer": "sae.buffer",
    "Dictionary": "sae.dictionary",
    "load": "sae.dictionary",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sae' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
