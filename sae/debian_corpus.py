"""The benchmark corpus of technical English: Debian's linux-doc-6.1 and python3.11-doc packages.

`build_debian_corpus()` runs `apt-get download` (never `apt-get install`, which would upgrade
other system packages), unpacks each .deb with `dpkg-deb -x`, keeps each documentation page once
as text and writes `debian-docs.jsonl` (~13M SmolLM2 tokens) for `sae.load_corpus`.
"""
from __future__ import annotations

import gzip
import html.parser
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from sae.io import atomic_path, cache_dir

DEBIAN_PACKAGES = ("linux-doc-6.1", "python3.11-doc")
DEBIAN_FILE = "debian-docs.jsonl"


def build_debian_corpus(directory: str | os.PathLike | None = None, *, force: bool = False,
                        packages: tuple[str, ...] = DEBIAN_PACKAGES) -> Path:
    """Build (once) a .jsonl corpus of technical English from Debian documentation packages.

    Runs `apt-get download` (never `apt-get install`) in a temporary folder inside
    cache_dir("debian-docs"), unpacks each .deb with `dpkg-deb -x`, and keeps the text: .txt and
    .rst files (gzipped or not) and HTML pages converted to text (main content only). Files that
    a rendered HTML page already covers (Sphinx `_sources`, the raw .rst it was built from) are
    skipped, so each page appears once. Returns the path of `debian-docs.jsonl` (one
    {"text", "source"} object per document) in `directory` (default: cache_dir("debian-docs")).
    """
    out_dir = Path(directory) if directory is not None else cache_dir("debian-docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / DEBIAN_FILE
    if out.exists() and not force:
        return out
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building the Debian corpus needs `{tool}` (a Debian or Ubuntu system); "
                               "use another corpus source on this machine")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir("debian-docs")))
    try:
        debs = _apt_download(packages, work)
        tree = work / "tree"
        for deb in debs:
            _run(["dpkg-deb", "-x", str(deb), str(tree)])
        docs = _collect_docs(tree)
        if not docs:
            raise RuntimeError(f"no documentation text found in {', '.join(d.name for d in debs)}")
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for source, text in docs:
                f.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
        manifest = {"packages": [d.name for d in debs], "n_docs": len(docs),
                    "n_chars": sum(len(t) for _, t in docs)}
        with atomic_path(out_dir / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def _apt_download(packages: tuple[str, ...], folder: Path) -> list[Path]:
    """`apt-get download` the packages into `folder`; on failure `apt-get update` once and retry."""
    try:
        _run(["apt-get", "download", *packages], cwd=folder)
    except subprocess.CalledProcessError as first:
        try:
            _run(["apt-get", "update"])
            _run(["apt-get", "download", *packages], cwd=folder)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"`apt-get download {' '.join(packages)}` failed: {first.stderr.strip()}\n"
                               f"retry after `apt-get update` failed too: {e.stderr.strip()}") from e
    debs = sorted(folder.glob("*.deb"))
    if len(debs) < len(packages):
        raise RuntimeError(f"apt-get download fetched {[d.name for d in debs]}, expected {list(packages)}")
    return debs


_SKIP_HTML = re.compile(r"(^|/)(genindex[^/]*|search|py-modindex|modindex|contents)\.html$")
_DOC_DIRS = {"html", "Documentation"}
# Sphinx's copies of the sources and assets, and the kernel's non-English translations.
_SKIP_DIRS = {"_sources", "_static", "_images", "_downloads", "translations"}


def _collect_docs(tree: Path) -> list[tuple[str, str]]:
    """(source, text) for every documentation page under `tree`, sorted, each page once."""
    doc_root = tree / "usr" / "share" / "doc"
    pages: dict[str, tuple[int, Path]] = {}  # page key -> (priority, file); lower priority wins
    for path in sorted(doc_root.rglob("*")):
        rel = path.relative_to(doc_root).as_posix()
        if not path.is_file() or any(p in _SKIP_DIRS for p in path.relative_to(doc_root).parts):
            continue
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        if name.endswith(".html") and not _SKIP_HTML.search(rel):
            priority, stem = 0, name[: -len(".html")]
        elif name.endswith((".rst", ".txt")):
            priority, stem = 1, name.rsplit(".", 1)[0]
        else:
            continue
        parts = [p for p in path.relative_to(doc_root).parent.parts if p not in _DOC_DIRS]
        key = "/".join([*parts, stem])
        if key not in pages or priority < pages[key][0]:
            pages[key] = (priority, path)
    docs = []
    for _, path in sorted(pages.values(), key=lambda v: v[1].as_posix()):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if ".html" in path.name:
            text = html_to_text(text)
        text = text.strip()
        if text:
            docs.append((path.relative_to(doc_root).as_posix(), text))
    return docs


class _HTMLText(html.parser.HTMLParser):
    """Visible text of an HTML page: blocks on their own lines, whitespace collapsed outside
    <pre>, scripts/navigation/permalinks dropped, and only the role="main" element when present."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
    BLOCK = {"p", "div", "section", "article", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol",
             "dl", "dt", "dd", "pre", "table", "tr", "blockquote", "figure", "figcaption", "caption"}
    SKIP_TAGS = {"script", "style", "nav", "head", "footer", "form", "button", "svg", "noscript", "title"}
    SKIP_CLASSES = {"headerlink", "sphinxsidebar", "related", "footer", "breadcrumbs", "mobile-nav",
                    "rst-footer-buttons", "wy-nav-side"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # open elements: (tag, skip, main)
        self.n_skip = 0  # open elements whose text is dropped
        self.n_main = 0  # open role="main" elements
        self.n_pre = 0
        self.all: list[str] = []
        self.main: list[str] = []
        self.saw_main = False

    def _emit(self, s: str, inline: bool = False) -> None:
        if self.n_skip:
            return
        for out in (self.all, self.main) if self.n_main else (self.all,):
            # collapsed inline text starts no line with a space
            piece = s.lstrip(" ") if inline and (not out or out[-1].endswith("\n")) else s
            if piece:
                out.append(piece)

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag in ("br", "hr"):
                self._emit("\n")
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skip = tag in self.SKIP_TAGS or bool(classes & self.SKIP_CLASSES) or a.get("role") == "navigation"
        main = a.get("role") == "main"
        self.saw_main |= main
        if tag in self.BLOCK:
            self._emit("\n")
        self.stack.append((tag, skip, main))
        self.n_skip += skip
        self.n_main += main
        self.n_pre += tag == "pre"

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):  # tolerate unclosed inner tags
            if self.stack[i][0] == tag:
                for t, skip, main in self.stack[i:]:
                    self.n_skip -= skip
                    self.n_main -= main
                    self.n_pre -= t == "pre"
                del self.stack[i:]
                if tag in self.BLOCK:
                    self._emit("\n")
                return

    def handle_data(self, data):
        if self.n_pre:
            self._emit(data)
        else:
            self._emit(re.sub(r"\s+", " ", data), inline=True)

    def text(self) -> str:
        s = "".join(self.main if self.saw_main else self.all)
        s = re.sub(r"[ \t]+\n", "\n", s)
        return re.sub(r"\n{3,}", "\n\n", s).strip()


def html_to_text(page: str) -> str:
    """The readable text of an HTML page (stdlib html.parser only)."""
    parser = _HTMLText()
    parser.feed(page)
    parser.close()
    return parser.text()
