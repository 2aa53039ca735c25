"""English prose with people's names: Debian's fortune cookies, and mixes of corpus sources.

The embedded corpus is mostly Python source, so features of names and narrative (what the IOI
task needs) are poorly learned from it. Two offline sources of prose:

- "topics": the prose-only part of the embedded corpus, CPython's `pydoc_data.topics`.
- "fortunes": the fortune cookies of Debian's `fortunes` package (quotations with their authors,
  anecdotes, jokes, poems; ~0.6M SmolLM2 tokens after cleaning), built once by
  `build_fortunes_corpus` (`apt-get download` + `dpkg-deb -x`, never `apt-get install`).

and a way to combine sources:

- "mix:A[:w],B[:w],...": the documents of each source interleaved so that every prefix of the
  stream holds about w_i / sum(w) of its characters from source i (weights default to 1): the next
  document always comes from the source with the smallest emitted_chars_i / w_i (ties: the
  earliest named); an exhausted source drops out. A capped read (max_tokens) therefore still sees
  every source in proportion.
- "prose" = "mix:fortunes:3,topics:1".

Cleaning of a cookie (`clean_fortune`): overstrike sequences (x BACKSPACE y) removed, each line
stripped, hard-wrapped lines of a paragraph joined into one line (a line of 50 characters or
more that does not end a sentence group is a wrapped line), attribution lines kept as
"-- Author"; cookies whose non-space characters are less than 60% letters (ASCII art, code,
tables) and categories of chat logs and computer jokes are dropped. Cookies are written in the
order of the SHA-256 of their text, so any prefix is a sample of all categories.

This module imports only the standard library, so the command line can check corpus names
before torch loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from sae.io import atomic_path, cache_dir

#: Sources that `sae.load_corpus` knows by name (besides paths and "hf:" / "mix:" specs).
NAMED_SOURCES = ("embedded", "debian", "topics", "fortunes", "prose")
MIX_PREFIX = "mix:"
PROSE_MIX = "mix:fortunes:3,topics:1"

FORTUNE_PACKAGES = ("fortunes",)
FORTUNES_FILE = "fortunes.jsonl"
FORTUNE_DIR = ("usr", "share", "games", "fortunes")
#: Categories left out: pictures, chat logs and computer jokes (code-like, few names).
SKIP_CATEGORIES = frozenset({"ascii-art", "computers", "linux", "linuxcookie", "perl", "debian", "knghtbrd",
                             "translate-me"})
MIN_LETTER_SHARE = 0.6
WRAP_WIDTH = 50


def is_corpus_name(text: str) -> bool:
    """True for a source load_corpus resolves by name: NAMED_SOURCES or a "mix:" spec."""
    return text in NAMED_SOURCES or text.startswith(MIX_PREFIX)


def parse_mix(spec: str) -> list[tuple[str, float]]:
    """"mix:A[:w],B[:w]" -> [(A, w), (B, w)]; a ValueError naming what is wrong otherwise.

    A part's weight is the number after its last colon when that parses as a positive float
    (so "hf:NAME:split" and Windows-free paths stay whole); default 1."""
    if not spec.startswith(MIX_PREFIX):
        raise ValueError(f"a mix spec starts with {MIX_PREFIX!r}, got {spec!r}")
    parts = [p.strip() for p in spec[len(MIX_PREFIX):].split(",")]
    if not parts or any(not p for p in parts):
        raise ValueError(f"empty source in {spec!r}; write e.g. 'mix:fortunes:3,topics:1' "
                         "(sources separated by commas, each with an optional :weight)")
    out = []
    for part in parts:
        name, weight = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                weight, name = float(tail), head
            except ValueError:
                pass  # the colon belongs to the source ("hf:NAME:split")
            else:
                if not 0 < weight < float("inf"):
                    raise ValueError(f"weight of {name!r} in {spec!r} must be a positive number, got {tail!r}")
        if name.startswith(MIX_PREFIX) or name == "prose":
            raise ValueError(f"{spec!r}: a mix cannot contain another mix ({name!r})")
        out.append((name, weight))
    return out


def interleave(sources: list[tuple[object, float]]):
    """Documents of several sources, merged by character share (see the module docstring).

    sources: [(iterator of str, weight)]. Yields str."""
    iters = [iter(it) for it, _ in sources]
    weights = [w for _, w in sources]
    emitted = [0] * len(iters)
    live = list(range(len(iters)))
    while live:
        i = min(live, key=lambda j: (emitted[j] / weights[j], j))
        try:
            text = next(iters[i])
        except StopIteration:
            live.remove(i)
            continue
        emitted[i] += max(1, len(text))
        yield text


# --- fortunes ------------------------------------------------------------------------------------

def build_fortunes_corpus(directory: str | os.PathLike | None = None, *, force: bool = False,
                          packages: tuple[str, ...] = FORTUNE_PACKAGES) -> Path:
    """Build (once) `fortunes.jsonl` ({"text", "source"} per cookie) from Debian's fortune packages.

    `apt-get download` (never install) into a temporary folder inside cache_dir("prose"), unpack
    with `dpkg-deb -x`, read every cookie file under /usr/share/games/fortunes, clean the cookies
    (`clean_fortune`), drop duplicates and write them in SHA-256 order to `directory` (default
    cache_dir("prose")), with a manifest.json of counts. Returns the .jsonl path."""
    from sae.debian_corpus import _apt_download, _run

    out_dir = Path(directory) if directory is not None else cache_dir("prose")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / FORTUNES_FILE
    if out.exists() and not force:
        return out
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building the fortunes corpus needs `{tool}` (a Debian or Ubuntu system); "
                               "use another corpus source on this machine (e.g. 'topics' or a text folder)")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir("prose")))
    try:
        debs = _apt_download(packages, work)
        tree = work / "tree"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
        docs, stats = collect_fortunes(tree.joinpath(*FORTUNE_DIR))
        if not docs:
            raise RuntimeError(f"no fortune cookies found in {', '.join(d.name for d in debs)}")
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for source, text in docs:
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        manifest = {"packages": [d.name for d in debs], "n_docs": len(docs),
                    "n_chars": sum(len(t) for _, t in docs), **stats}
        with atomic_path(out_dir / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def collect_fortunes(folder: Path) -> tuple[list[tuple[str, str]], dict]:
    """([(category/index, cleaned text)] in SHA-256 order, counts) from a folder of cookie files
    (text files of cookies separated by lines holding only "%"; .dat indexes and .u8 links skipped)."""
    if not folder.is_dir():
        raise RuntimeError(f"no fortune folder at {folder}")
    seen: set[str] = set()
    docs = []
    stats = {"categories": [], "skipped_categories": [], "dropped_non_prose": 0, "dropped_duplicates": 0}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8"):
            continue
        if path.name in SKIP_CATEGORIES:
            stats["skipped_categories"].append(path.name)
            continue
        stats["categories"].append(path.name)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        for i, cookie in enumerate(split_cookies(text)):
            cleaned = clean_fortune(cookie)
            if not cleaned:
                continue
            if not is_prose(cleaned):
                stats["dropped_non_prose"] += 1
                continue
            if cleaned in seen:
                stats["dropped_duplicates"] += 1
                continue
            seen.add(cleaned)
            docs.append((f"{path.name}/{i}", cleaned))
    docs.sort(key=lambda d: hashlib.sha256(d[1].encode("utf-8")).hexdigest())
    return docs, stats


def split_cookies(text: str) -> list[str]:
    """The cookies of a fortune file: the text between lines that hold only "%"."""
    return [c for c in re.split(r"^%[ \t]*\r?$\n?", text.replace("\r\n", "\n"), flags=re.M) if c.strip()]


_ATTRIBUTION = re.compile(r"^(--|\u2014)\s*")


def clean_fortune(cookie: str) -> str:
    """One cookie as plain prose: overstrikes removed, lines stripped, wrapped lines joined,
    "-- Author" attributions on their own line, at most one blank line between paragraphs."""
    s = re.sub(r".\x08", "", cookie)  # overstrike: "_\bx" (underline) or "x\bx" (bold)
    s = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", s)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in s.split("\n")]
    paragraphs: list[str] = []
    current = ""
    prev_len = 0
    for line in lines:
        if not line:
            if current:
                paragraphs.append(current)
            current, prev_len = "", 0
            continue
        attribution = bool(_ATTRIBUTION.match(line))
        if attribution:
            line = _ATTRIBUTION.sub("-- ", line)
        if not current:
            current = line
        elif attribution or prev_len < WRAP_WIDTH:
            current += "\n" + line  # a short line (verse, dialogue) or an attribution keeps its break
        else:
            current += " " + line  # a wrapped line of a paragraph
        prev_len = 0 if attribution else len(line)
    if current:
        paragraphs.append(current)
    return "\n\n".join(paragraphs).strip()


def is_prose(text: str, min_letter_share: float = MIN_LETTER_SHARE) -> bool:
    """At least `min_letter_share` of the non-space characters are letters."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(c.isalpha() for c in chars) / len(chars) >= min_letter_share
