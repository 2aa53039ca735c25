#!/usr/bin/env python
"""Build the ~13M-token (SmolLM2) benchmark corpus from Debian's linux-doc-6.1 and python3.11-doc packages.

Downloads the .deb files with `apt-get download` (no installation), unpacks them with
`dpkg-deb -x` in a temporary folder, and writes debian-docs.jsonl, which
`sae.load_corpus(path, tokenizer)` (or `load_corpus("debian", tokenizer)`) reads.

    python scripts/build_debian_corpus.py [--dir DIR] [--force]
"""
from __future__ import annotations

import argparse
import json

from sae.debian_corpus import build_debian_corpus

CHARS_PER_TOKEN = 3.4  # SmolLM2's tokenizer on this corpus (measured: 44.6M characters -> 13.2M tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="output folder (default: the sae-circuits cache, "
                        "$SAE_CIRCUITS_CACHE/debian-docs)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the corpus exists")
    args = parser.parse_args(argv)

    path = build_debian_corpus(args.dir, force=args.force)
    n_docs = n_chars = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            n_docs += 1
            n_chars += len(json.loads(line)["text"])
    print(f"{path}\n{n_docs} documents, {n_chars / 1e6:.1f}M characters, "
          f"~{n_chars / CHARS_PER_TOKEN / 1e6:.1f}M tokens (at ~{CHARS_PER_TOKEN} characters per token)")


if __name__ == "__main__":
    main()
