"""On-disk activation store: harvest once, train and analyse many times.

Layout of a store directory:

    manifest.json              format version, widths, dtype, meta, per-shard entries, complete flag
    shard-00000.safetensors    one file per harvested chunk: {site: Tensor[n_tokens, d_site]}
    shard-00001.safetensors    (+ "tokens": int64 [n_tokens] when created with tokens=True)

Every entry of a shard has the same n_tokens rows, aligned: row r is the same token at every site.

Crash safety. A shard is written to a temporary name, fsynced and renamed (`sae.io.atomic_path`);
only then is its entry {file, n_tokens, bytes, sha256} added to the manifest, which is itself
rewritten atomically. So the manifest is the truth: a shard file without an entry (a process killed
between the rename and the manifest update) is not valid and is rewritten when the harvest resumes;
a half-written temp file is never read. Reads check each file's size against the manifest (always)
and its sha256 (with verify=True) and refuse a mismatching file rather than use it. Disk full during
a write removes the partial file, leaves the manifest untouched and raises `DiskFullError`; rerunning
`ActivationStore.create(...)` with the same arguments resumes.

Memory. Writing holds one shard (twice: tensors and their serialized bytes); reading holds one shard;
`iter_batches` streams shards through a `ShufflingBuffer`, so peak memory never depends on the
corpus size. One writer per store at a time.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _serialize

from sae.buffer import ShufflingBuffer, rebatch
from sae.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

FORMAT = "sae-circuits.activation-store"
VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens"  # reserved entry name: token ids, int64 [n_tokens]
_SHARD_RE = re.compile(r"^shard-(\d+)\.safetensors$")
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+$")  # sae.io.atomic_path's temporary names
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20


class StoreError(RuntimeError):
    """A store on disk is unusable as asked: corrupt, incomplete, or not the store requested."""


class CorruptShardError(StoreError):
    """A shard file disagrees with its manifest entry (size, checksum or contents)."""


class DiskFullError(OSError):
    """No space left while writing a store; the store stays consistent and a rerun resumes."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.args[1]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' for torch.float32 or 'float32'; refuses non-floating dtypes."""
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    resolved = getattr(torch, name, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (float32, float16, bfloat16, float64), got {dtype!r}")
    return name


def _json_normalise(meta: dict | None) -> dict:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict of JSON-serialisable values, got {type(meta).__name__}")
    try:
        return json.loads(json.dumps(meta, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta must be JSON-serialisable (str, numbers, bools, None, lists, dicts): {e}") from None




def _write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` in blocks (a seam for tests that simulate a full disk)."""
    view = memoryview(data)
    with open(path, "wb") as f:
        for i in range(0, len(view), 8 * _BLOCK):
            f.write(view[i:i + 8 * _BLOCK])


class ActivationStore:
    """A directory of activation shards described by a JSON manifest (see the module docstring).

    Build with `create` (new, or resume an interrupted one), read with `open`.
    """

    def __init__(self, directory: Path, manifest: dict):
        # Use create() / open(); this only wraps an already validated manifest.
        self.directory = Path(directory)
        self._m = manifest

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, directory, widths: dict[str, int], dtype: torch.dtype | str = torch.float32,
               n_shards: int | None = None, meta: dict | None = None, tokens: bool = False) -> "ActivationStore":
        """A new store in `directory`, or the existing one there if it was created with the same
        widths, dtype, n_shards, meta and tokens (resume: write the shards not in `done`).

        widths: {site: d_site}; dtype: floating dtype the activations are stored in (inputs are cast);
        n_shards: total shards expected, if known (enables `missing()` and checks `finish()`);
        meta: JSON-serialisable provenance (model, corpus, context length, ...), compared on resume;
        tokens: shards also carry the token ids under the reserved name "tokens".
        """
        directory = Path(directory)
        if not isinstance(widths, dict) or not widths:
            raise ValueError(f"widths must be a non-empty dict {{site: width}}, got {widths!r}")
        for site, d in widths.items():
            if not isinstance(site, str) or not site:
                raise ValueError(f"site names must be non-empty strings, got {site!r}")
            if site == TOKENS:
                raise ValueError(f"{TOKENS!r} is reserved for token ids; pass tokens=True instead of a width for it")
            if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
                raise ValueError(f"width of site {site!r} must be a positive int, got {d!r}")
        if n_shards is not None and (isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards <= 0):
            raise ValueError(f"n_shards must be a positive int or None, got {n_shards!r}")
        wanted = {
            "format": FORMAT, "version": VERSION,
            "widths": dict(widths), "dtype": _dtype_name(dtype), "tokens": bool(tokens),
            "n_shards": n_shards, "meta": _json_normalise(meta),
            "complete": False, "shards": {},
        }
        if (directory / MANIFEST).exists():
            store = cls.open(directory)
            diffs = [f"{key}: store has {store._m[key]!r}, requested {wanted[key]!r}"
                     for key in ("widths", "dtype", "tokens", "n_shards", "meta") if store._m[key] != wanted[key]]
            if diffs:
                raise StoreError(
                    f"{directory} already holds a different activation store ({'; '.join(diffs)}). "
                    "Use another directory, pass the same arguments to resume, or delete the directory to rebuild."
                )
            store._prepare_resume()
            return store
        if directory.exists() and any(directory.iterdir()):
            raise StoreError(
                f"{directory} is not empty and holds no {MANIFEST}, so it is not an activation store; "
                "refusing to write into it. Choose a new or empty directory."
            )
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory, wanted)
        store._save_manifest(context="creating the store")
        return store

    @classmethod
    def open(cls, directory) -> "ActivationStore":
        """An existing store; checks the manifest's structure (not the shard contents: see `verify`)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no activation store at {directory}: {MANIFEST} is missing")
        try:
            m = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{path} is not valid JSON ({e}); delete {directory} and re-run the harvest") from None
        cls._check_manifest(m, path)
        return cls(directory, m)

    @staticmethod
    def _check_manifest(m, path: Path) -> None:
        def bad(why: str):
            raise StoreError(f"{path} is not a valid activation-store manifest: {why}. "
                             f"Delete {path.parent} and re-run the harvest to rebuild it.")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            bad(f"'format' is not {FORMAT!r}")
        if m.get("version") != VERSION:
            bad(f"version {m.get('version')!r}, this sae-circuits reads version {VERSION}")
        for key, typ in (("widths", dict), ("dtype", str), ("tokens", bool), ("meta", dict),
                         ("complete", bool), ("shards", dict)):
            if not isinstance(m.get(key), typ):
                bad(f"{key!r} missing or not a {typ.__name__}")
        if not m["widths"] or not all(isinstance(d, int) and d > 0 for d in m["widths"].values()):
            bad("'widths' must map site names to positive ints")
        try:
            _dtype_name(m["dtype"])
        except ValueError as e:
            bad(str(e))
        if m.get("n_shards") is not None and not (isinstance(m["n_shards"], int) and m["n_shards"] > 0):
            bad("'n_shards' must be a positive int or null")
        for key, entry in m["shards"].items():
            if not key.isdigit():
                bad(f"shard key {key!r} is not an index")
            ok = (isinstance(entry, dict) and entry.get("file") == shard_name(int(key))
                  and isinstance(entry.get("n_tokens"), int) and entry["n_tokens"] >= 0
                  and isinstance(entry.get("bytes"), int) and entry["bytes"] > 0
                  and isinstance(entry.get("sha256"), str) and _HEX64.match(entry["sha256"]))
            if not ok:
                bad(f"entry for shard {key} is malformed: {entry!r}")

    def _prepare_resume(self) -> None:
        """Before writing more: drop leftovers of an interrupted writer (temp files, shard files the
        manifest does not list) and un-list shards whose file is missing or has the wrong size."""
        listed = {e["file"] for e in self._m["shards"].values()}
        for p in self.directory.iterdir():
            if _TEMP_RE.match(p.name) or (_SHARD_RE.match(p.name) and p.name not in listed):
                log.info("removing %s, left by an interrupted write; it will be rewritten", p)
                p.unlink(missing_ok=True)
        broken = [i for i in self.done if not self._size_ok(i)]
        if broken:
            log.warning("shards %s of %s are missing or truncated; they will be rewritten", broken, self.directory)
            self._drop(broken)

    # --- properties -----------------------------------------------------------------------
    @property
    def widths(self) -> dict[str, int]:
        return dict(self._m["widths"])

    @property
    def sites(self) -> list[str]:
        return list(self._m["widths"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self._m["dtype"])

    @property
    def meta(self) -> dict:
        return copy.deepcopy(self._m["meta"])

    @property
    def has_tokens(self) -> bool:
        return self._m["tokens"]

    @property
    def n_shards(self) -> int | None:
        """Total shards: as given to create(), else the written count once complete, else None."""
        if self._m["n_shards"] is None and self.complete:
            return len(self._m["shards"])
        return self._m["n_shards"]

    @property
    def done(self) -> set[int]:
        """Indices of shards fully written and listed in the manifest (a copy)."""
        return {int(k) for k in self._m["shards"]}

    @property
    def complete(self) -> bool:
        return self._m["complete"]

    @property
    def n_tokens(self) -> int:
        """Rows over all written shards."""
        return sum(e["n_tokens"] for e in self._m["shards"].values())

    def shard_tokens(self, index: int) -> int:
        """Rows in written shard `index`."""
        return self._entry(index)["n_tokens"]

    def missing(self) -> list[int]:
        """Shard indices still to write, in order (needs n_shards)."""
        if self.n_shards is None:
            raise ValueError("missing() needs the total shard count: pass n_shards to ActivationStore.create, "
                             "or skip the indices in `store.done` while writing")
        done = self.done
        return [i for i in range(self.n_shards) if i not in done]

    def __repr__(self) -> str:
        state = "complete" if self.complete else f"{len(self._m['shards'])}/{self.n_shards or '?'} shards"
        return (f"ActivationStore({str(self.directory)!r}, sites={self.sites}, dtype={self._m['dtype']}, "
                f"n_tokens={self.n_tokens}, {state})")

    # --- writing --------------------------------------------------------------------------
    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard `index` atomically: {site: Tensor[n_tokens, d_site]} for every site
        (+ "tokens": int [n_tokens] iff the store has tokens). Floating inputs are cast to the store
        dtype. Rewriting a written shard replaces it."""
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"shard index must be a non-negative int, got {index!r}")
        if self.complete:
            raise StoreError(f"{self.directory} is marked complete; create a new store to write more shards")
        if self.n_shards is not None and index >= self.n_shards:
            raise ValueError(f"shard index {index} is out of range: this store has n_shards={self.n_shards}")
        payload = self._validate(index, tensors)  # name -> contiguous CPU tensor
        n_rows = next(iter(payload.values())).shape[0]
        data = _serialize(payload)
        del payload
        name = shard_name(index)
        path = self.directory / name
        if str(index) in self._m["shards"]:  # rewriting: un-list the old file first, so no moment pairs
            self._drop([index])               # the new file with the old entry
        free = shutil.disk_usage(self.directory).free
        if len(data) > free:
            raise self._disk_full(f"writing {name}", len(data), free)
        try:
            with atomic_path(path) as tmp:
                _write_bytes(tmp, data)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._disk_full(f"writing {name}", len(data), shutil.disk_usage(self.directory).free) from e
            raise
        entry = {"file": name, "n_tokens": n_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self._m["shards"][str(index)] = entry
        try:
            self._save_manifest(context=f"recording {name}")
        except BaseException:
            # The manifest on disk does not list the new file: roll back memory and remove the file.
            del self._m["shards"][str(index)]
            path.unlink(missing_ok=True)
            raise

    def _validate(self, index: int, tensors) -> dict[str, torch.Tensor]:
        where = f"shard {index}"
        if not isinstance(tensors, dict):
            raise TypeError(f"{where}: expected a dict {{site: Tensor[n_tokens, d_site]}}, got {type(tensors).__name__}")
        expected = set(self.sites) | ({TOKENS} if self.has_tokens else set())
        if set(tensors) != expected:
            extra, lacking = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            hint = ""
            if TOKENS in extra:
                hint = " (this store was created without tokens; pass tokens=True to create() to keep token ids)"
            raise ValueError(f"{where}: unexpected entries {extra}, missing entries {lacking}; "
                             f"the store's entries are {sorted(expected)}{hint}")
        rows: dict[str, int] = {}
        out: dict[str, torch.Tensor] = {}
        for site in self.sites:
            t = tensors[site]
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != self._m["widths"][site]:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: site {site!r} must be a Tensor [n_tokens, {self._m['widths'][site]}], "
                                 f"got {shape}")
            if not t.is_floating_point():
                raise ValueError(f"{where}: site {site!r} has dtype {t.dtype}; activations must be floating point")
            rows[site] = t.shape[0]
            out[site] = t.detach().to("cpu", self.dtype).contiguous()
        if self.has_tokens:
            t = tensors[TOKENS]
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
                desc = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{where}: {TOKENS!r} must be an integer Tensor [n_tokens], got {desc}")
            rows[TOKENS] = t.shape[0]
            out[TOKENS] = t.detach().to("cpu", torch.int64).contiguous()
        if len(set(rows.values())) != 1:
            raise ValueError(f"{where}: entries have different row counts {rows}; every entry must have the same "
                             "n_tokens rows (row r is the same token at every site)")
        return out

    def finish(self) -> None:
        """Mark the store complete. All shards 0..n_shards-1 (or 0..max written, when n_shards was
        not given) must be written."""
        done = self.done
        total = self.n_shards if self.n_shards is not None else (max(done) + 1 if done else 0)
        lacking = [i for i in range(total) if i not in done]
        if not done or lacking:
            what = f"shards {lacking[:20]}{' ...' if len(lacking) > 20 else ''}" if lacking else "any shard"
            raise StoreError(f"cannot finish {self.directory}: {what} not written yet; write them (rerun the harvest) "
                             "and call finish() again")
        self._m["complete"] = True
        try:
            self._save_manifest(context="marking the store complete")
        except BaseException:
            self._m["complete"] = False
            raise

    def _save_manifest(self, context: str) -> None:
        data = json.dumps(self._m, indent=1).encode()  # keeps the site order of `widths`
        try:
            with atomic_path(self.directory / MANIFEST) as tmp:
                _write_bytes(tmp, data)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise self._disk_full(f"{context} (writing {MANIFEST})", len(data),
                                      shutil.disk_usage(self.directory).free) from e
            raise

    def _disk_full(self, doing: str, needed: int, free: int) -> DiskFullError:
        return DiskFullError(
            f"disk full in {self.directory} while {doing}: needs {needed:,} bytes, {free:,} free. "
            f"The store is consistent ({len(self._m['shards'])} shards kept). Free some space and rerun: "
            "ActivationStore.create() with the same arguments resumes and writes only the missing shards."
        )

    # --- reading --------------------------------------------------------------------------
    def _entry(self, index: int) -> dict:
        entry = self._m["shards"].get(str(index)) if isinstance(index, int) and index >= 0 else None
        if entry is None:
            raise StoreError(
                f"shard {index} of {self.directory} is not in the manifest (not written yet, or dropped as corrupt); "
                f"written shards: {len(self._m['shards'])}. Re-run the harvest to write it."
            )
        return entry

    def _size_ok(self, index: int) -> bool:
        path = self.directory / self._entry(index)["file"]
        return path.is_file() and path.stat().st_size == self._entry(index)["bytes"]

    def _corrupt(self, index: int, why: str) -> CorruptShardError:
        path = self.directory / self._entry(index)["file"]
        return CorruptShardError(
            f"{path} is corrupt: {why}. It is not used. Delete it and re-run the harvest: "
            "ActivationStore.create() with the same arguments rewrites it (store.verify() finds all bad shards)."
        )

    def read_shard(self, index: int, sites: str | Sequence[str] | None = None,
                   verify: bool = False) -> dict[str, torch.Tensor]:
        """{site: Tensor[n_tokens, d_site]} (and "tokens" when asked, or when sites=None and the
        store has tokens). Refuses a file whose size (always) or sha256 (verify=True) differs from
        the manifest."""
        entry = self._entry(index)
        names = self._names(sites)
        path = self.directory / entry["file"]
        if not path.is_file():
            raise self._corrupt(index, "the file is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise self._corrupt(index, f"size {size:,} bytes, the manifest says {entry['bytes']:,}")
        if verify and sha256_file(path) != entry["sha256"]:
            raise self._corrupt(index, "its sha256 does not match the manifest")
        out = {}
        try:
            with safe_open(path, framework="pt") as f:
                for name in names:
                    out[name] = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise self._corrupt(index, f"unreadable ({e})") from None
        for name, t in out.items():
            shape = (entry["n_tokens"],) if name == TOKENS else (entry["n_tokens"], self._m["widths"][name])
            dtype = torch.int64 if name == TOKENS else self.dtype
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise self._corrupt(index, f"{name!r} is {tuple(t.shape)} {t.dtype}, expected {shape} {dtype}")
        return out

    def _names(self, sites) -> list[str]:
        if sites is None:
            return self.sites + ([TOKENS] if self.has_tokens else [])
        names = [sites] if isinstance(sites, str) else list(sites)
        valid = self.sites + ([TOKENS] if self.has_tokens else [])
        unknown = [s for s in names if s not in valid]
        if unknown or not names:
            raise ValueError(f"unknown sites {unknown or names}; this store holds {valid}")
        return names

    def verify(self) -> list[int]:
        """Check every written shard's size and sha256. Returns the bad indices, and drops them from
        the manifest (so `done` no longer has them and a rerun of the harvest rewrites them)."""
        bad = [i for i in sorted(self.done)
               if not self._size_ok(i) or sha256_file(self.directory / self._entry(i)["file"]) != self._entry(i)["sha256"]]
        if bad:
            self._drop(bad)
        return bad

    def _drop(self, indices: list[int]) -> None:
        for i in indices:
            del self._m["shards"][str(i)]
        self._m["complete"] = False
        self._save_manifest(context=f"dropping bad shards {indices}")

    def iter_batches(self, site_or_sites: str | Sequence[str], batch_size: int, shuffle: bool = True, seed: int = 0,
                     epochs: int | None = 1, buffer_tokens: int = 65536, drop_last: bool = False,
                     verify: bool = False) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Training batches: Tensor [batch_size, d] for one site name, dict {site: Tensor} for a list.

        shuffle=True: shards in a seeded random order each epoch, streamed through a ShufflingBuffer
        of `buffer_tokens` rows (memory ~ buffer_tokens rows + one shard). shuffle=False: shards in
        index order, rows in order. epochs=None repeats forever. Every row appears once per epoch.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if shuffle and (not isinstance(buffer_tokens, int) or buffer_tokens < batch_size):
            raise ValueError(f"buffer_tokens must be an int >= batch_size ({batch_size}), got {buffer_tokens!r}")
        names = self._names(site_or_sites)
        single = isinstance(site_or_sites, str)
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"epochs must be a positive int or None (forever), got {epochs!r}")
        if not self.done:
            raise StoreError(f"{self.directory} holds no written shards; run the harvest first")
        if not self.complete:
            warnings.warn(f"{self.directory} is not complete ({len(self.done)} shards written); "
                          "iterating over the written shards only", stacklevel=2)
        g = torch.Generator().manual_seed(int(seed))
        buffer_seed = int(torch.randint(2**62, (1,), generator=g))
        order = sorted(self.done)

        def chunks():
            epoch = 0
            while epochs is None or epoch < epochs:
                ids = [order[i] for i in torch.randperm(len(order), generator=g)] if shuffle else order
                for i in ids:
                    shard = self.read_shard(i, names, verify=verify)
                    yield shard[names[0]] if single else shard
                epoch += 1

        if shuffle:
            return iter(ShufflingBuffer(chunks(), batch_size, capacity=buffer_tokens, seed=buffer_seed,
                                        drop_last=drop_last))
        return rebatch(chunks(), batch_size, drop_last=drop_last)
