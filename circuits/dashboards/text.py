"""Corpus text made safe and visible for HTML: every string from a corpus, a tokenizer or an
explainer passes through `visible` and then `html.escape` (`esc`) before it reaches a page.

`visible(s)` keeps ordinary text and replaces, with a printable escape:
    NUL and other C0/C1 control characters     -> \\x00 ... \\x9f   (newline ↵ and tab ⇥ in tokens)
    lone surrogates (U+D800-U+DFFF)             -> \\udXXX          (they cannot be written as UTF-8)
    bidirectional overrides and isolates        -> \\u202e ...     (U+202A-U+202E, U+2066-U+2069,
      and the marks U+200E, U+200F, U+061C)                        which would reorder the page)
bytes are decoded as UTF-8 with invalid sequences -> U+FFFD. `esc` then escapes & < > " ' so the
result is safe both as element text and inside a double- or single-quoted attribute value.
"""
from __future__ import annotations

import html
import json
import re
from functools import lru_cache
from typing import Any

#: Characters that reorder text (Unicode bidi embeddings, overrides, isolates and marks).
BIDI = frozenset([0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)])
_TOKEN_NAMED = {"\n": "↵", "\t": "⇥", "\r": "\\r"}


def _table(token: bool) -> dict[int, str]:
    t: dict[int, str] = {}
    for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]:
        t[c] = f"\\x{c:02x}"
    if token:
        t.update({ord(k): v for k, v in _TOKEN_NAMED.items()})
    else:
        t.update({ord("\n"): "\n", ord("\t"): "\t"})
    for c in BIDI:
        t[c] = f"\\u{c:04x}"
    return t


_TOKEN_TABLE, _TEXT_TABLE = _table(True), _table(False)
_SURROGATE = re.compile("[\ud800-\udfff]")


def visible(s: Any, *, token: bool = False) -> str:
    """`s` (str, bytes or anything with str()) with the characters of the module docstring
    replaced by visible escapes. token=True also shows newlines as ↵ and tabs as ⇥."""
    if isinstance(s, (bytes, bytearray, memoryview)):
        s = bytes(s).decode("utf-8", errors="replace")
    s = str(s)
    out = s.translate(_TOKEN_TABLE if token else _TEXT_TABLE)
    if _SURROGATE.search(out):                                  # rare: only from surrogateescape'd data
        out = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", out)
    return out


@lru_cache(maxsize=1 << 17)
def esc_token(token: str) -> tuple[str, str]:
    """(escaped visible text, escaped repr for a title attribute) of one token text, memoised:
    a vocabulary's tokens recur on every page."""
    return esc(token, token=True), esc(repr(token))


def esc(s: Any, *, token: bool = False) -> str:
    """`visible(s)` escaped for HTML text and quoted attribute values."""
    return html.escape(visible(s, token=token), quote=True)


def script_json(data: Any) -> str:
    """JSON safe to embed in <script type="application/json">: strings made `visible`, and
    < > & U+2028 U+2029 written as \\u escapes, so no `</script>` or `<!--` can end the block."""
    text = json.dumps(_visible_tree(data), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, rep in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, rep)
    return text


def _visible_tree(x: Any) -> Any:
    if isinstance(x, str):
        return visible(x)
    if isinstance(x, dict):
        return {visible(k): _visible_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_visible_tree(v) for v in x]
    return x
