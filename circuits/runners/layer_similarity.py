"""Do SAEs at adjacent layers learn the same features? Residual vs MLP dictionaries.

Paulo et al. 2024 (arXiv 2410.13928) find SAEs of nearby residual layers highly similar. Here
TopK SAEs are trained (`sae.pipeline.train_at_sites`, one harvest pass, cached run directory)
at `KIND.L` for each kind (default `resid`, the block output, and `mlp`, the MLP output: both in
the residual basis) and each chosen layer, and every adjacent pair (KIND.L, KIND.L+1) is compared
(`circuits.autointerp.similarity`):

- decoder directions: Hungarian matching of W_dec rows, mean matched cosine against the same
  matching to random unit directions;
- explanations (with --explain N > 0): N features drawn uniformly among those firing at KIND.L
  and their decoder partners at KIND.L+1 are explained from one latent cache (same explainer as
  `autointerp_bench`), the explanations embedded (all-MiniLM-L6-v2) and Hungarian-matched;
  `agreement` is the share of features whose explanation partner is their decoder partner.

Outputs in --out: layer_similarity.csv (one row per adjacent pair), layer_similarity_summary.csv
(means per kind), layer_similarity.png, layer_similarity.md, and explanations.json.

    python -m circuits.runners.layer_similarity                      # resid and mlp at layers 3-6
    python -m circuits.runners.layer_similarity --layers 10 11 12 --explain 0
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from interventions.runners import harvest_sample, log
from interventions.runners import report as rp

from ..autointerp.cache import build_latent_cache
from ..autointerp.similarity import (COLUMNS, SHARED_SPACE, adjacent_pairs, decoder_matching, layer_similarity,
                                     plot_layer_similarity)
from .autointerp_bench import candidate_features, load_bench_corpus, make_client, train_saes

DEFAULT_LAYERS = (3, 4, 5, 6)
DEFAULT_KINDS = ("resid", "mlp")
CACHE_SETTINGS = dict(window=32, n_top=10, n_quantiles=5, per_quantile=4, n_random=10, n_negatives=10,
                      n_hard_negatives=0, n_correlated=0)


def run_layer_similarity(model: Any, client: Any = None, *, layers: Sequence[int] = DEFAULT_LAYERS,
                         kinds: Sequence[str] = DEFAULT_KINDS, explain_features: int = 4, sae_tokens: int = 65_536,
                         k: int = 32, expansion: int = 4, sae_dir: str | Path | None = None,
                         baseline_tokens: int = 4096, cache_contexts: int = 64, n_examples: int = 8, seed: int = 0,
                         out_dir: str | Path = "out/layer-similarity", corpus: Any = None, progress: bool = True,
                         write: bool = True) -> pd.DataFrame:
    """One row per adjacent pair (columns of `circuits.autointerp.similarity.COLUMNS`);
    df.attrs: summary, info, explanations, files."""
    from ..autointerp.explain import explain

    t_start = time.perf_counter()
    layers, kinds = sorted({int(l) for l in layers}), list(kinds)
    sites = [f"{kind}.{l}" for kind in kinds for l in layers]
    for s in sites:
        if s not in model.sites:
            raise ValueError(f"{s!r} is not a site of {model.name} ({model.n_layers} layers; kinds are e.g. "
                             "resid, mlp, attn)")
    pairs = adjacent_pairs(sites)
    if not pairs:
        raise ValueError(f"layers {layers} hold no two consecutive layers; give e.g. --layers 3 4 5")
    if explain_features and client is None:
        raise ValueError("explanations need a client (or pass explain_features=0)")
    corpus = corpus if corpus is not None else load_bench_corpus(model, sae_tokens, cache_contexts, baseline_tokens)
    timings = {}
    t = time.perf_counter()
    dicts, source = train_saes(model, sites, corpus, sae_tokens=sae_tokens, k=k, expansion=expansion,
                               sae_dir=sae_dir, progress=progress)
    timings["saes_s"] = time.perf_counter() - t
    log(f"SAEs: {source}", progress)
    explanations: dict[str, dict[int, str]] = {}
    if explain_features:
        t = time.perf_counter()
        sample = harvest_sample(model, corpus.train, sites, baseline_tokens)
        wanted: dict[str, set[int]] = {s: set() for s in sites}
        for a, b in pairs:
            chosen = candidate_features(dicts[a], sample[a], explain_features, seed)
            wanted[a].update(chosen)
            if a.split(".")[0] in SHARED_SPACE:
                partner = {int(i): int(j) for i, j in decoder_matching(dicts[a], dicts[b])["pairs"]}
                wanted[b].update(partner[f] for f in chosen)
            else:                                # per-layer neuron bases: no decoder partner, sample b too
                wanted[b].update(candidate_features(dicts[b], sample[b], explain_features, seed))
        feats = {s: sorted(f) for s, f in wanted.items() if f}
        cache = build_latent_cache(model, {s: dicts[s] for s in feats}, corpus.heldout,
                                   Path(out_dir) / "cache", features=feats, seed=seed, progress=progress,
                                   **CACHE_SETTINGS)
        for s, fs in feats.items():
            for f in fs:
                ex = cache.examples(s, f)
                e = explain(ex, client, model.tokenizer, n_examples=n_examples, seed=seed)
                if e.ok:
                    explanations.setdefault(s, {})[f] = e.text
                log(f"{s} f{f}: {e.text if e.ok else '(unparseable) ' + e.raw[:60]!r}", progress)
        timings["explanations_s"] = time.perf_counter() - t
    t = time.perf_counter()
    df = layer_similarity(dicts, explanations, pairs=pairs, seed=seed)
    timings["matching_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    numeric = [c for c in COLUMNS if c not in ("kind", "site_a", "site_b", "layer_a", "layer_b")]
    df.attrs.update(summary=df.groupby("kind")[numeric].mean().reset_index(), explanations=explanations,
                    info={"model": model.name, "layers": layers, "kinds": kinds, "sae_source": source, "k": k,
                          "expansion": expansion, "sae_tokens": sae_tokens, "explain_features": explain_features,
                          "timings": timings, "seed": seed})
    if write:
        df.attrs["files"] = write_outputs(df, out_dir)
    return df


def markdown_report(df: pd.DataFrame) -> str:
    info = df.attrs["info"]
    cols = ["kind", "site_a", "site_b", "decoder_mean_cos", "decoder_random_mean_cos", "decoder_frac_above_0.7",
            "n_explained_a", "n_explained_b", "explanation_mean_cos", "explanation_pair_mean_cos", "agreement"]
    heads = {"decoder_mean_cos": "decoder cos", "decoder_random_mean_cos": "random cos",
             "decoder_frac_above_0.7": "share > 0.7", "n_explained_a": "expl. a", "n_explained_b": "expl. b",
             "explanation_mean_cos": "explanation cos", "explanation_pair_mean_cos": "all-pairs cos"}
    lines = [f"# Similarity across adjacent layers ({info['model']})", "",
             rp.bullet_list([
                 f"TopK SAEs k={info['k']}, {info['expansion']}x, {info['sae_tokens']:,} tokens per site: "
                 f"{info['sae_source']}",
                 "decoder cos: mean cosine of the Hungarian matching of W_dec rows; random cos: the same against "
                 "random unit directions",
                 f"explanations: {info['explain_features']} features per pair and their decoder partners, embedded "
                 "with all-MiniLM-L6-v2 and Hungarian-matched; agreement = share matched to their decoder partner",
                 f"time: {rp.timings_line(info['timings'])}"]), "",
             rp.markdown_table(df, cols, headers=heads), "",
             "## Mean per kind", "",
             rp.markdown_table(df.attrs["summary"], ["kind", "decoder_mean_cos", "decoder_random_mean_cos",
                                                     "explanation_mean_cos", "agreement"], headers=heads), ""]
    return "\n".join(lines)


def write_outputs(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    files = rp.write_outputs("layer_similarity", df, out_dir, plot_layer_similarity, markdown_report(df))
    files["explanations"] = rp.write_text(Path(out_dir) / "explanations.json",
                                          json.dumps({s: {str(f): t for f, t in e.items()}
                                                      for s, e in df.attrs["explanations"].items()}, indent=1))
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m circuits.runners.layer_similarity", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local model directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--layers", nargs="+", type=int, default=list(DEFAULT_LAYERS))
    p.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), help="site kinds (resid, mlp, attn, mlp_hidden)")
    p.add_argument("--explain", type=int, default=4, help="features explained per adjacent pair (0: decoders only)")
    p.add_argument("--sae-tokens", type=int, default=65_536)
    p.add_argument("--sae-dir", default=None)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--baseline-tokens", type=int, default=4096, help="harvested tokens to find firing features")
    p.add_argument("--cache-contexts", type=int, default=64)
    p.add_argument("--n-examples", type=int, default=8)
    p.add_argument("--server", default=None, help="OpenAI-compatible base URL for the explainer")
    p.add_argument("--server-model", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/layer-similarity")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from sae.models import load_model

    model = load_model(args.model, device=args.device)
    client = make_client(model, args.server, args.server_model) if args.explain else None
    df = run_layer_similarity(model, client, layers=args.layers, kinds=args.kinds, explain_features=args.explain,
                              sae_tokens=args.sae_tokens, k=args.k, expansion=args.expansion, sae_dir=args.sae_dir,
                              baseline_tokens=args.baseline_tokens, cache_contexts=args.cache_contexts,
                              n_examples=args.n_examples, seed=args.seed, out_dir=args.out, progress=not args.quiet)
    rp.print_outputs(df)


if __name__ == "__main__":
    main()
