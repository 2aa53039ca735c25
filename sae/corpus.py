"""Corpora: raw documents -> fixed-length token contexts for harvesting and evaluation.

    load_corpus(source, tokenizer, ctx_len=128) -> Corpus(train [n, ctx_len], heldout [m, ctx_len])

Sources (`iter_texts` yields their documents in a fixed order):

- `None` / "embedded": a corpus that needs no download, made of CPython's own documentation
  (`pydoc_data.topics`, English prose) followed by the standard library's `.py` files (source
  with docstrings; site-packages and test directories skipped), read lazily.
- a path: a `.txt` file (one document), a `.jsonl` file (one JSON object per line, text in
  `text_field`), a `.parquet` file (column `text_field`), or a folder of these (recursive, sorted).
- "hf:NAME[:split]" or a bare Hugging Face dataset name: `datasets.load_dataset` (optional
  dependency); NAME may be a local file or folder.
- "topics": the prose-only part of the embedded corpus (the pydoc topics, ~0.11M tokens).
- "fortunes": English prose with people's names, Debian's fortune cookies (~0.6M SmolLM2 tokens),
  built once by `sae.prose_corpus.build_fortunes_corpus` (apt-get download + dpkg-deb -x).
- "mix:A[:w],B[:w],...": the documents of the sources interleaved so that every prefix holds
  about w_i / sum(w) of its characters from source i; "prose" is "mix:fortunes:3,topics:1".
- "debian": the benchmark corpus of technical English from Debian's linux-doc-6.1 and
  python3.11-doc packages (~13M SmolLM2 tokens; pass max_tokens=10_000_000 for 10M), built once
  by `build_debian_corpus` (apt-get download + dpkg-deb -x, never apt-get install; needs the
  Debian package registry the first time).

Tokenization: each document is encoded without special tokens, documents are joined with the EOS
token, and the stream is cut into contexts (incomplete tail dropped). If the tokenizer itself
prepends BOS (Llama-2, Gemma), every context is [BOS] + (ctx_len - 1) stream tokens, matching what
the model saw in training; otherwise (GPT-2, SmolLM2) contexts are plain ctx_len windows. Contexts
are shuffled with `torch.Generator().manual_seed(seed)` and the last `heldout_fraction` of them is
held out. The token stream is cached (int32 safetensors with a content digest) under
`cache_dir("corpora")`, keyed by the source's identity and the tokenizer's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from sae.io import atomic_path, cache_dir
from sae.prose_corpus import MIX_PREFIX, PROSE_MIX

# Bump when the way documents are produced or tokenized changes, so stale caches are not reused.
FORMAT_VERSION = 1

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
VALID_SOURCES = (
    "valid sources: None or 'embedded' (built-in CPython docs and stdlib), 'topics' (its prose part, "
    "the pydoc topics), 'debian' (Debian doc packages), 'fortunes' (Debian's fortune cookies), "
    f"'prose' ({PROSE_MIX}), 'mix:A[:weight],B[:weight]' (sources interleaved by character share), "
    "a .txt file (one document), a .jsonl file (one JSON object per line with a text "
    "field), a .parquet file (a text column), a folder of such files, or 'hf:NAME[:split]' "
    "(a Hugging Face dataset; needs `pip install datasets`)"
)
# Test and third-party directories of the stdlib are not part of the embedded corpus; pydoc_data
# is skipped because its topics are already the corpus's first documents.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                     "pydoc_data"}
_PROBE = "Probe: The quick brown fox, 12345 ü→∑ def f(x):\n\treturn x ** 2  # done."


class CorpusError(ValueError):
    """A corpus source that cannot be used: missing, empty, unreadable or in an unknown format."""


@dataclass
class Corpus:
    """Tokenized contexts, shuffled, split into train and held-out parts."""

    train: torch.Tensor  # [n_train, ctx_len] int64 token ids
    heldout: torch.Tensor  # [n_heldout, ctx_len] int64
    ctx_len: int
    bos_id: int | None  # set when each context starts with BOS (the tokenizer's convention)
    name: str  # "embedded", a path, or a dataset name

    def __len__(self) -> int:
        return self.train.shape[0]

    @property
    def n_tokens(self) -> int:
        """Number of train tokens (contexts x ctx_len)."""
        return self.train.numel()

    def __repr__(self) -> str:
        return (f"Corpus(name={self.name!r}, train={tuple(self.train.shape)}, "
                f"heldout={tuple(self.heldout.shape)}, ctx_len={self.ctx_len}, bos_id={self.bos_id})")


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------

@dataclass
class _Source:
    """A resolved source: its display name, a JSON-able identity for the cache key, and a factory
    for its documents (a fresh lazy iterator per call)."""

    name: str
    identity: dict[str, Any]
    texts: Callable[[], Iterator[str]]
    n_docs: int | None = None
    slug: str = field(default="corpus")


def iter_texts(source: str | os.PathLike | None = None, *, text_field: str = "text") -> Iterator[str]:
    """The raw documents of `source` (see the module docstring), in their fixed order."""
    return _resolve(source, text_field).texts()


def _resolve(source: str | os.PathLike | None, text_field: str) -> _Source:
    if source is None or (isinstance(source, str) and source == "embedded"):
        return _embedded_source()
    if isinstance(source, str) and source == "topics":
        return _topics_source()
    if isinstance(source, str) and source == "fortunes":
        from sae.prose_corpus import build_fortunes_corpus

        src = _path_source(build_fortunes_corpus(), text_field="text")
        src.name, src.slug = "fortunes", "fortunes"
        return src
    if isinstance(source, str) and (source == "prose" or source.startswith(MIX_PREFIX)):
        return _mix_source(PROSE_MIX if source == "prose" else source, text_field,
                           name="prose" if source == "prose" else source)
    if isinstance(source, str) and source == "debian":
        from sae.debian_corpus import build_debian_corpus

        src = _path_source(build_debian_corpus(), text_field)
        src.name, src.slug = "debian", "debian"
        return src
    if isinstance(source, str) and source.startswith("hf:"):
        return _hf_source(source[3:], text_field)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"corpus source must be a str, a path or None, got {type(source).__name__}; "
                        + VALID_SOURCES)
    path = Path(source).expanduser()
    if path.exists():
        return _path_source(path, text_field)
    if isinstance(source, str) and _datasets_available() and not _looks_like_path(source):
        return _hf_source(source, text_field)
    hint = "" if _datasets_available() else (
        f"; if {str(source)!r} is a Hugging Face dataset name, install `datasets` (pip install datasets)")
    raise CorpusError(f"no file or folder at {str(source)!r}{hint}. " + VALID_SOURCES)


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith(FILE_SUFFIXES) or s.count("/") > 1


# The embedded corpus --------------------------------------------------------------------------

def _stdlib_files() -> tuple[Path, list[Path]]:
    """The stdlib's .py files, sorted, without site-packages, tests and pydoc_data."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _STDLIB_SKIP_DIRS and not d.startswith(("config-", ".")))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return root, files


def _topics_source() -> _Source:
    """The prose-only part of the embedded corpus: CPython's pydoc topics, sorted by key."""
    from pydoc_data import topics as pydoc_topics

    topics = pydoc_topics.topics

    def texts() -> Iterator[str]:
        for key in sorted(topics):
            yield topics[key]

    identity = {"kind": "topics", "python": sys.version, "topics": _sha(json.dumps(topics, sort_keys=True))}
    return _Source("topics", identity, texts, n_docs=len(topics), slug="topics")


def _mix_source(spec: str, text_field: str, name: str) -> _Source:
    """"mix:A[:w],B[:w]": the sources' documents interleaved by character share
    (`sae.prose_corpus.interleave`)."""
    from sae.prose_corpus import interleave, parse_mix

    try:
        parts = parse_mix(spec)
    except ValueError as e:
        raise CorpusError(f"{e}. " + VALID_SOURCES) from None
    sources = [(_resolve(part, text_field), weight) for part, weight in parts]

    def texts() -> Iterator[str]:
        return interleave([(src.texts(), weight) for src, weight in sources])

    identity = {"kind": "mix", "parts": [[src.identity, weight] for src, weight in sources]}
    n_docs = None if any(src.n_docs is None for src, _ in sources) else sum(src.n_docs for src, _ in sources)
    slug = _slugify("mix-" + "-".join(src.slug for src, _ in sources))
    return _Source(name, identity, texts, n_docs=n_docs, slug=slug)


def _embedded_source() -> _Source:
    from pydoc_data import topics as pydoc_topics

    topics = pydoc_topics.topics
    root, files = _stdlib_files()
    topics_hash = _sha(json.dumps(topics, sort_keys=True))
    files_hash = _sha(json.dumps([[p.relative_to(root).as_posix(), p.stat().st_size] for p in files]))

    def texts() -> Iterator[str]:
        for key in sorted(topics):
            yield topics[key]
        for path in files:  # read lazily, so a small max_tokens stops early
            try:
                yield path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # unreadable or non-UTF-8 stdlib file: not part of the corpus

    identity = {"kind": "embedded", "python": sys.version, "topics": topics_hash,
                "stdlib": str(root), "files": files_hash}
    return _Source("embedded", identity, texts, n_docs=len(topics) + len(files), slug="embedded")


# Local files -----------------------------------------------------------------------------------

def _path_source(path: Path, text_field: str) -> _Source:
    path = path.resolve()
    if path.is_dir():
        files = sorted((p for p in path.rglob("*")
                        if p.is_file() and p.suffix in FILE_SUFFIXES
                        and not any(part.startswith(".") for part in p.relative_to(path).parts)),
                       key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise CorpusError(f"corpus folder {path} holds no .txt, .jsonl or .parquet files. " + VALID_SOURCES)
    elif path.suffix in FILE_SUFFIXES:
        files = [path]
    else:
        raise CorpusError(f"cannot read {path} as a corpus: unknown format {path.suffix or '(no suffix)'!r}. "
                          + VALID_SOURCES)
    try:
        stats = [[p.relative_to(path).as_posix() if path.is_dir() else p.name,
                  p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {e.filename}: {e.strerror}") from e

    def texts() -> Iterator[str]:
        for p in files:
            yield from _read_file(p, text_field)

    identity = {"kind": "files", "root": str(path), "files": stats, "text_field": text_field}
    return _Source(str(path), identity, texts, n_docs=None, slug=_slugify(path.stem))


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one file: a .txt is one document, a .jsonl one per line, a .parquet one per row."""
    try:
        if path.suffix == ".txt":
            try:
                yield path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as e:
                raise CorpusError(f"cannot read {path}: not UTF-8 text ({e})") from e
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_field)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, text_field)
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {e.strerror or e}. " + VALID_SOURCES) from e


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CorpusError(f"{path}:{lineno}: not a JSON line ({e}); a .jsonl corpus holds one "
                                  f"JSON object per line with the text in field {text_field!r}") from e
            if isinstance(row, str):
                yield row
                continue
            if not isinstance(row, dict) or text_field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise CorpusError(f"{path}:{lineno}: no text field {text_field!r} (found {fields}); "
                                  "pass text_field=... to name the field that holds the text")
            text = row[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} holds a {type(text).__name__}, "
                                  "expected a string")
            yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"cannot read {path} as parquet: {e}") from e
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {names}); "
                          "pass text_field=... to name the column that holds the text")
    for batch in pf.iter_batches(columns=[text_field], batch_size=256):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise CorpusError(f"{path}: column {text_field!r} holds {type(text).__name__} values, "
                                  "expected strings")
            yield text


# Hugging Face datasets -------------------------------------------------------------------------

def _datasets_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("datasets") is not None


def _hf_source(spec: str, text_field: str) -> _Source:
    """'NAME[:split]' -> datasets.load_dataset(NAME, split=split or 'train'); NAME may be local."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"loading the corpus {spec!r} from Hugging Face datasets needs the optional "
                          "`datasets` package: pip install datasets (or pip install 'sae-circuits[datasets]')") from e
    name, split = spec, "train"
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and not Path(spec).exists():
        name, split = head, tail
    local = Path(name).expanduser()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
    try:
        if local.is_file():
            if local.suffix not in builders:
                raise CorpusError(f"cannot load {local} with datasets: unknown format {local.suffix!r}; "
                                  f"valid: {sorted(builders)}")
            ds = datasets.load_dataset(builders[local.suffix], data_files=str(local), split=split)
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else name, split=split)
    except CorpusError:
        raise
    except Exception as e:  # hub unreachable, unknown name or split, ...
        raise CorpusError(f"datasets.load_dataset({name!r}, split={split!r}) failed: {e}") from e
    columns = ds.column_names  # None for some streaming datasets: checked per row instead
    if columns is not None and text_field not in columns:
        raise CorpusError(f"dataset {name!r} (split {split!r}) has no column {text_field!r} "
                          f"(columns: {columns}); pass text_field=...")

    def texts() -> Iterator[str]:
        for batch in ds.iter(batch_size=256):
            for text in batch[text_field]:
                if text is not None:
                    yield text

    identity = {"kind": "datasets", "name": name, "split": split, "text_field": text_field,
                "fingerprint": getattr(ds, "_fingerprint", None)}
    if local.exists():
        identity["files"] = [[str(p), p.stat().st_size, p.stat().st_mtime_ns]
                             for p in ([local] if local.is_file() else sorted(local.rglob("*"))) if p.is_file()]
    n_docs = len(ds) if hasattr(ds, "__len__") else None
    return _Source(f"hf:{name}:{split}", identity, texts, n_docs=n_docs, slug=_slugify(Path(name).name))


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

class _Tokenizer:
    """What load_corpus needs from a tokenizer: batch encoding without special tokens, BOS/EOS
    ids, whether the tokenizer itself prepends BOS, its length limit and an identity for caching."""

    def __init__(self, obj: Any):
        if obj is None:
            raise TypeError("load_corpus needs a tokenizer (a Hugging Face tokenizer, or a model with a "
                            "`.tokenizer`, e.g. sae.load_model()); none was given")
        self.limits: dict[str, int] = {}
        if hasattr(obj, "tokenizer") and obj.tokenizer is not None:  # nnsight / wrapped models
            n_pos = _max_positions_of(obj)
            if n_pos:
                self.limits["the model's config.max_position_embeddings"] = n_pos
            obj = obj.tokenizer
        if isinstance(obj, torch.nn.Module):
            raise TypeError(f"got a {type(obj).__name__} model without a tokenizer; pass its tokenizer "
                            "(e.g. AutoTokenizer.from_pretrained(...)) or a model from sae.load_model()")
        if not (callable(obj) or hasattr(obj, "encode")):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer or have .encode(text); "
                            f"got {type(obj).__name__}")
        self.tok = obj
        self.bos_id = getattr(obj, "bos_token_id", None)
        self.eos_id = getattr(obj, "eos_token_id", None)
        first = self._encode_with_specials("a")
        self.prepends_bos = self.bos_id is not None and len(first) > 0 and first[0] == self.bos_id
        mml = getattr(obj, "model_max_length", None)
        if isinstance(mml, int) and mml < 10**12:  # HF uses ~1e30 for "no limit"
            self.limits["tokenizer.model_max_length"] = mml

    def _encode_with_specials(self, text: str) -> list[int]:
        if callable(self.tok):
            out = self.tok(text)
            if isinstance(out, dict) or hasattr(out, "keys"):
                return list(out["input_ids"])
        return list(self.tok.encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens."""
        if callable(self.tok) and hasattr(self.tok, "model_max_length"):  # Hugging Face tokenizers
            return self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        try:
            return [list(self.tok.encode(t, add_special_tokens=False)) for t in texts]
        except TypeError:  # a plain .encode(text) without special-token handling
            return [list(self.tok.encode(t)) for t in texts]

    def identity(self) -> dict[str, Any]:
        try:
            vocab = len(self.tok)
        except TypeError:
            vocab = getattr(self.tok, "vocab_size", None)
        return {"class": type(self.tok).__name__, "name": str(getattr(self.tok, "name_or_path", "")),
                "gguf": str(getattr(self.tok, "init_kwargs", {}).get("gguf_file", "")),
                "vocab": vocab, "eos": self.eos_id, "probe": _sha(json.dumps(self.encode_batch([_PROBE])[0]))}


def _max_positions_of(model: Any) -> int | None:
    try:
        n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    except Exception:  # proxies (nnsight) may refuse attribute access outside a trace
        return None
    return n if isinstance(n, int) and n > 0 else None


# ---------------------------------------------------------------------------------------------
# Tokenizing and caching the stream
# ---------------------------------------------------------------------------------------------

def load_corpus(source: str | os.PathLike | None = None, tokenizer: Any = None, *, ctx_len: int = 128,
                max_tokens: int | None = None, seed: int = 0, heldout_fraction: float = 0.05,
                max_positions: int | None = None, text_field: str = "text", cache: bool = True) -> Corpus:
    """Tokenize `source` into shuffled [n, ctx_len] contexts with a held-out split.

    tokenizer: a Hugging Face tokenizer or a model with `.tokenizer`. max_tokens caps the total
    number of tokens (train + held-out; the corpus is read only as far as needed). max_positions:
    the model's context limit, checked against ctx_len with tokenizer.model_max_length.
    """
    tok = _Tokenizer(tokenizer)
    if not isinstance(ctx_len, int) or ctx_len < (2 if tok.prepends_bos else 1):
        raise ValueError(f"ctx_len must be an int >= {2 if tok.prepends_bos else 1} "
                         f"(the tokenizer {'prepends' if tok.prepends_bos else 'does not prepend'} BOS), "
                         f"got {ctx_len!r}")
    limits = dict(tok.limits)
    if max_positions is not None:
        limits["max_positions"] = int(max_positions)
    for what, limit in limits.items():
        if ctx_len > limit:
            raise ValueError(f"ctx_len={ctx_len} is longer than the model allows: {what} is {limit}; "
                             f"use ctx_len <= {limit}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if max_tokens is not None and max_tokens < ctx_len:
        raise ValueError(f"max_tokens={max_tokens} is smaller than one context (ctx_len={ctx_len}); "
                         f"use max_tokens >= {ctx_len} or None for the whole corpus")

    src = _resolve(source, text_field)
    body = ctx_len - 1 if tok.prepends_bos else ctx_len  # stream tokens per context
    cap = None if max_tokens is None else (max_tokens // ctx_len) * body
    stream = _token_stream(src, tok, cap, cache)  # [n_stream] int32
    if stream.size == 0:
        raise CorpusError(f"corpus {src.name} is empty: it holds no text. " + VALID_SOURCES)
    n_ctx = stream.size // body
    if n_ctx == 0:
        raise CorpusError(f"corpus {src.name} holds only {stream.size} tokens, fewer than one context of "
                          f"ctx_len={ctx_len}; use a smaller ctx_len or add text")
    ids = torch.from_numpy(stream[: n_ctx * body].astype(np.int64)).view(n_ctx, body)  # [n_ctx, body]
    if tok.prepends_bos:
        ids = torch.cat([torch.full((n_ctx, 1), tok.bos_id, dtype=torch.int64), ids], dim=1)

    perm = torch.randperm(n_ctx, generator=torch.Generator().manual_seed(seed))
    ids = ids[perm]  # [n_ctx, ctx_len]
    n_heldout = 0
    if heldout_fraction > 0 and n_ctx >= 2:
        n_heldout = min(n_ctx - 1, max(1, round(n_ctx * heldout_fraction)))
    return Corpus(train=ids[: n_ctx - n_heldout].contiguous(), heldout=ids[n_ctx - n_heldout:].contiguous(),
                  ctx_len=ctx_len, bos_id=tok.bos_id if tok.prepends_bos else None, name=src.name)


def _token_stream(src: _Source, tok: _Tokenizer, cap: int | None, cache: bool) -> np.ndarray:
    """The source's documents tokenized and joined with EOS, truncated to `cap` tokens: [n] int32.

    Two cache entries can serve a request: the whole stream (key with cap=None), from which any
    prefix is sliced, or a stream built for exactly this cap."""
    base = {"format": FORMAT_VERSION, "source": src.identity, "tokenizer": tok.identity()}
    full_key = _sha(json.dumps({**base, "cap": None}, sort_keys=True, default=str))
    cap_key = _sha(json.dumps({**base, "cap": cap}, sort_keys=True, default=str))
    folder = cache_dir("corpora") if cache else None
    if folder is not None:
        for key in dict.fromkeys([full_key, cap_key]):
            hit = _read_cache(folder / f"{src.slug}-{key[:20]}.safetensors", key)
            if hit is not None:
                return hit if cap is None else hit[:cap]
    stream, complete = _tokenize(src, tok, cap)
    if folder is not None and stream.size:
        key = full_key if complete else cap_key
        _write_cache(folder / f"{src.slug}-{key[:20]}.safetensors", key, stream, src.name)
    return stream


def _tokenize(src: _Source, tok: _Tokenizer, cap: int | None) -> tuple[np.ndarray, bool]:
    """Returns (stream [n] int32, complete): complete when the source ran out before `cap`."""
    from tqdm.auto import tqdm

    sep = [] if tok.eos_id is None else [tok.eos_id]
    parts: list[np.ndarray] = []
    n = 0
    total, unit = (cap, "tok") if cap is not None else (src.n_docs, "doc")
    with tqdm(total=total, unit=unit, unit_scale=True, desc=f"tokenizing {src.name}", delay=1.0) as bar:
        for batch in _growing_batches(src.texts(), max_size=64):
            for ids in tok.encode_batch(batch):
                if not ids:
                    continue
                if n and sep:
                    parts.append(np.asarray(sep, dtype=np.int32))
                    n += len(sep)
                parts.append(np.asarray(ids, dtype=np.int32))
                n += len(ids)
                if cap is not None:
                    bar.update(len(ids) - max(0, n - cap))
                    if n >= cap:
                        return np.concatenate(parts)[:cap], False
            if cap is None:
                bar.update(len(batch))
                bar.set_postfix_str(f"{n:,} tokens", refresh=False)
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)), True


def _growing_batches(texts: Iterable[str], max_size: int) -> Iterator[list[str]]:
    """Batches of 1, 2, 4, ... max_size non-blank texts: small first so a small cap stops early,
    large later so the fast tokenizer can use its threads."""
    size, batch = 1, []
    for text in texts:
        if not text or text.isspace():
            continue
        batch.append(text)
        if len(batch) >= size:
            yield batch
            size, batch = min(2 * size, max_size), []
    if batch:
        yield batch


def _digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


def _read_cache(path: Path, key: str) -> np.ndarray | None:
    """A cached stream if the file exists and checks out (key, dtype, length, digest); a corrupted
    file is reported, removed and rebuilt, never used."""
    if not path.exists():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            arr = f.get_tensor("ids")
        problems = []
        if meta.get("key") != key:
            problems.append("key mismatch")
        if arr.dtype != np.int32 or arr.shape != (int(meta.get("n_tokens", -1)),):
            problems.append(f"dtype/shape {arr.dtype}{arr.shape} vs n_tokens={meta.get('n_tokens')}")
        elif _digest(arr) != meta.get("digest"):
            problems.append("content digest mismatch")
        if problems:
            raise ValueError("; ".join(problems))
    except Exception as e:  # truncated header, garbage bytes, failed checks
        warnings.warn(f"corpus cache {path} is corrupted ({e}); deleting it and re-tokenizing", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    return arr


def _write_cache(path: Path, key: str, stream: np.ndarray, name: str) -> None:
    from safetensors.numpy import save_file

    meta = {"key": key, "n_tokens": str(stream.size), "digest": _digest(stream), "source": name,
            "format": str(FORMAT_VERSION)}
    try:
        with atomic_path(path) as tmp:
            save_file({"ids": np.ascontiguousarray(stream, dtype=np.int32)}, str(tmp), metadata=meta)
    except OSError as e:  # read-only or full disk: the corpus is still usable, just not cached
        warnings.warn(f"could not cache the tokenized corpus at {path}: {e}", stacklevel=3)


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()


def _slugify(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:40] or "corpus"
