"""Command line: `python -m circuits.dashboards --cache DIR --dictionary DIR --site SITE --out DIR`.

Renders the dashboards of the features a latent cache (`circuits.autointerp.cache`) holds at one
site. --explanations reads autointerp results: a JSON list of {"site", "feature", "explanation",
"scores"} records, or an object keyed "site/feature" (or "site/f<feature>") with
{"explanation", "scores"} values, or a CSV table with columns site, feature, explanation and score
columns named after the scorers (detection, fuzzing, ...), as the autointerp benchmark writes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


#: Score columns read from an autointerp results table (the shared scorer names).
SCORE_COLUMNS = ("detection", "fuzzing", "simulation", "embedding", "surprisal", "intervention")


def load_explanations(path: str | Path, family: str | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """{(site, feature): {"explanation", "scores"}} from a JSON file in either layout above, or a
    CSV table with columns site, feature, explanation and any of SCORE_COLUMNS (the autointerp
    benchmark's per-feature table; `family` picks one dictionary family when it has several)."""
    if str(path).endswith(".csv"):
        import pandas as pd

        df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        missing = {"site", "feature", "explanation"} - set(df.columns)
        if missing:
            raise ValueError(f"{path}: a results table needs columns site, feature, explanation; missing {sorted(missing)}")
        if "family" in df.columns:
            fams = sorted(df["family"].astype(str).unique())
            if family is None and len(fams) > 1:
                raise ValueError(f"{path} holds several dictionary families {fams}: pick one with --family")
            if family is not None:
                if family not in fams:
                    raise ValueError(f"{path} has no family {family!r}; it has {fams}")
                df = df[df["family"].astype(str) == family]
        cols = [c for c in SCORE_COLUMNS if c in df.columns]
        return {(str(r["site"]), int(r["feature"])): {
            "explanation": None if pd.isna(r["explanation"]) else str(r["explanation"]),
            "scores": {c: float(r[c]) for c in cols if not pd.isna(r[c])}} for _, r in df.iterrows()}
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    out: dict[tuple[str, int], dict[str, Any]] = {}
    if isinstance(doc, list):
        for r in doc:
            if not isinstance(r, dict) or "site" not in r or "feature" not in r:
                raise ValueError(f"{path}: each record needs 'site' and 'feature', got {str(r)[:120]}")
            out[(str(r["site"]), int(r["feature"]))] = r
    elif isinstance(doc, dict):
        for key, r in doc.items():
            site, _, feat = str(key).rpartition("/")
            feat = feat[1:] if feat.startswith("f") else feat
            if not site or not feat.isdigit() or not isinstance(r, dict):
                raise ValueError(f"{path}: keys must look like 'resid.3/12' or 'resid.3/f12' with an object "
                                 f"value; got {key!r}")
            out[(site, int(feat))] = r
    else:
        raise ValueError(f"{path}: expected a JSON list or object, got {type(doc).__name__}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m circuits.dashboards",
                                description="Render static HTML feature dashboards, their Neuronpedia JSON and an "
                                            "index page from a latent cache.",
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="latent cache directory (build_latent_cache)")
    p.add_argument("--dictionary", required=True, help="the site's dictionary directory (cfg.json + safetensors)")
    p.add_argument("--site", required=True, help="site to render, e.g. resid.3")
    p.add_argument("--out", required=True, help="output directory (index.html and <site>/f<i>.html)")
    p.add_argument("--model", default=None, help="model path or id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--features", default=None, help="comma-separated feature ids (default: all cached)")
    p.add_argument("--explanations", default=None, help="autointerp results, JSON or CSV (see below)")
    p.add_argument("--family", default=None, help="dictionary family to read from a CSV with several")
    p.add_argument("--per-quantile", type=int, default=5, help="contexts shown per quantile bin")
    p.add_argument("--workers", type=int, default=1, help="processes writing pages")
    p.add_argument("--no-json", action="store_true", help="skip the Neuronpedia JSON files")
    a = p.parse_args(argv)

    from sae import load_model
    from sae.dictionary import load

    from circuits.autointerp.cache import LatentCache

    from .render import render_dashboards

    feats = None if a.features is None else [int(x) for x in a.features.split(",") if x.strip()]
    expl = load_explanations(a.explanations, a.family) if a.explanations else None
    model = load_model(a.model)
    pages = render_dashboards(model, load(a.dictionary), LatentCache.open(a.cache), a.out, site=a.site,
                              features=feats, explanations=expl, per_quantile=a.per_quantile,
                              workers=a.workers, write_json=not a.no_json)
    print(f"wrote {len(pages)} dashboards and {Path(a.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
