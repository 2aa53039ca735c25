"""Benchmark runners: the paper experiments as one command each, with CSV, PNG and markdown output.

    python -m interventions.runners.ioi_patching --help    SAE vs PCA/ICA/neuron feature patching on IOI
    python -m interventions.runners.erasure_bench --help   gendered-pronoun erasure: SAE features vs LEACE

Both compare dictionary *families* at the same sites on the same code path: a family is a
{site: Dictionary} mapping, and `dictionaries_by_family` is {family name: that mapping}. This
module builds the default families for a model (`build_families`):

    sae       TopK SAEs (Gao et al. 2024). Taken from the README main job (`python -m circuits.main` or `python -m sae.cli train`,
              residual sites, k=32, 4x expansion, 131072 tokens) when its run directory in the
              cache is complete and holds the sites; otherwise trained here with a small budget
              by `sae.pipeline.train_at_sites` into a cached run directory (a rerun loads it).
    pca       all d principal components of harvested activations (a rotation: Cunningham et
              al.'s `pca_rot`), `sae.baselines.PCADictionary`.
    ica       FastICA with `ica_components` components (default 128, the top-128 principal
              subspace; all 576 of SmolLM2 take minutes on 2 cores), `ICADictionary`.
    neurons   the neuron basis (`IdentityDictionary`).

Baselines are fitted on activations harvested from the same embedded corpus (position 0, the
attention sink, excluded as in training). The runners also accept any families the caller
builds (e.g. tiny dictionaries for a tiny model in tests).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

FAMILIES = ("sae", "pca", "ica", "neurons")
#: Contexts of 128 tokens loaded besides the SAE training tokens: baselines and neutral text.
EXTRA_CONTEXTS = 64
CTX_LEN = 128


def log(msg: str, progress: bool = True) -> None:
    """Print a progress line (flushed) when `progress`."""
    if progress:
        print(msg, flush=True)


def main_job_directory(model: Any) -> Path:
    """Where the README main job (default settings) keeps its dictionaries."""
    from sae.cli import run_directory

    return run_directory(model.name)


def load_run(directory: str | Path, sites: Iterable[str]) -> dict[str, Any] | None:
    """{site: Dictionary} from a finished `train_at_sites` run directory that holds every site,
    else None (missing, unfinished, or trained at other sites)."""
    from sae.dictionary import load

    root = Path(directory)
    try:
        run = json.loads((root / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    sites = list(sites)
    if not run.get("complete") or not set(sites) <= set(run.get("key", {}).get("sites", [])):
        return None
    return {s: load(root / s.replace(".", "_")) for s in sites}


def load_corpus_for(model: Any, sae_tokens: int) -> Any:
    """The embedded corpus sized for `sae_tokens` SAE training tokens plus EXTRA_CONTEXTS
    contexts (half held out: neutral text for collateral KL). Deterministic in `sae_tokens`,
    so the SAE run cache is reused across runners and reruns."""
    from sae.corpus import load_corpus

    n_train = -(-sae_tokens // (CTX_LEN - 1)) + 1 + EXTRA_CONTEXTS // 2
    n_total = n_train + EXTRA_CONTEXTS // 2
    return load_corpus(None, model.tokenizer, ctx_len=CTX_LEN, max_tokens=n_total * CTX_LEN,
                       heldout_fraction=(EXTRA_CONTEXTS // 2) / n_total, max_positions=model.max_positions)


def get_saes(model: Any, sites: list[str], *, corpus: Any, sae_tokens: int = 16_384, k: int = 32,
             expansion: int = 4, directory: str | Path | None = None, use_main_job: bool = True,
             progress: bool = True) -> tuple[dict[str, Any], str]:
    """({site: TopK SAE}, where they came from). Order: `directory` when it holds a finished run
    with these sites; the README main job's cached run; an earlier runner run in the cache with
    the same budget at a superset of the sites; else train on `sae_tokens` tokens of
    `corpus.train` with `train_at_sites` into `directory` (default a cache directory named by
    model, sites and budget, so the next call loads instead of retraining)."""
    from sae.io import cache_dir
    from sae.pipeline import train_at_sites
    from sae.training import TrainConfig

    if directory is not None and (found := load_run(directory, sites)) is not None:
        return found, f"loaded from {directory}"
    if use_main_job and directory is None:
        main = main_job_directory(model)
        if (found := load_run(main, sites)) is not None:
            return found, f"README main job ({main})"
    if directory is None:
        # an earlier runner run with the same budget at a superset of these sites
        for earlier in sorted(cache_dir("runs").glob(f"{model.name}-runners-*-topk{k}x{expansion}-{sae_tokens}")):
            if (found := load_run(earlier, sites)) is not None:
                return found, f"TopK k={k} x{expansion} trained on {sae_tokens:,} tokens, cached ({earlier})"
        directory = cache_dir("runs", f"{model.name}-runners-{'+'.join(sites)}-topk{k}x{expansion}-{sae_tokens}")
    batch = min(1024, sae_tokens)
    cfg = TrainConfig(total_tokens=sae_tokens, batch_size=batch, calibration_tokens=min(4096, sae_tokens),
                      log_every=10**9, checkpoint_every=0, progress=progress,
                      device="cpu" if model.device.type == "cpu" else str(model.device))
    t0 = time.perf_counter()
    dicts = train_at_sites(model, corpus.train, sites, k=k, expansion=expansion, cfg=cfg, directory=directory,
                           progress=progress)
    return dicts, f"TopK k={k} x{expansion} trained on {sae_tokens:,} tokens ({directory}, " \
                  f"{time.perf_counter() - t0:.0f} s incl. loading)"


def harvest_sample(model: Any, contexts: torch.Tensor, sites: list[str], tokens: int) -> dict[str, torch.Tensor]:
    """{site: activations [~tokens, width]} from the first contexts (position 0 excluded)."""
    from sae.harvesting import harvest

    n_ctx = max(1, math.ceil(tokens / max(1, contexts.shape[1] - 1)))
    if n_ctx > contexts.shape[0]:
        raise ValueError(f"need {n_ctx} contexts for {tokens} baseline tokens, the corpus has "
                         f"{contexts.shape[0]}: lower baseline_tokens")
    batches = list(harvest(model, contexts[:n_ctx], sites, progress=False))
    return {s: torch.cat([b[s] for b in batches])[:tokens] for s in sites}


def fit_baselines(sample: Mapping[str, torch.Tensor], families: Iterable[str], *,
                  ica_components: int = 128, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{family: {site: Dictionary}} for the baseline families among "pca", "ica", "neurons"
    ("identity" is accepted for "neurons"), fitted on `sample` ({site: [n, d]})."""
    from sae.baselines import fit_baseline

    out: dict[str, dict[str, Any]] = {}
    for fam in families:
        if fam == "pca":
            out[fam] = {s: fit_baseline("pca", x) for s, x in sample.items()}
        elif fam == "ica":
            out[fam] = {s: fit_baseline("ica", x, n_latents=min(ica_components, x.shape[1]), seed=seed)
                        for s, x in sample.items()}
        elif fam in ("neurons", "identity"):
            out[fam] = {s: fit_baseline("identity", x) for s, x in sample.items()}
        else:
            raise ValueError(f"unknown baseline family {fam!r}; baselines are 'pca', 'ica', 'neurons'")
    return out


def build_families(model: Any, sites: list[str], families: Iterable[str] = FAMILIES, *, sae_tokens: int = 16_384,
                   sae_dir: str | Path | None = None, use_main_job: bool = True, k: int = 32, expansion: int = 4,
                   baseline_tokens: int = 4096, ica_components: int = 128, corpus: Any = None, seed: int = 0,
                   progress: bool = True) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(dictionaries_by_family, info) for `families` (subset of FAMILIES) at `sites`: the module
    docstring's defaults. info: corpus, where the SAEs came from, timings in seconds."""
    families = list(families)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {FAMILIES}")
    if not families:
        raise ValueError(f"no families given; choose from {FAMILIES}")
    info: dict[str, Any] = {"timings": {}}
    corpus = corpus if corpus is not None else load_corpus_for(model, sae_tokens)
    info["corpus"] = corpus
    out: dict[str, dict[str, Any]] = {}
    if "sae" in families:
        t = time.perf_counter()
        out["sae"], info["sae_source"] = get_saes(model, sites, corpus=corpus, sae_tokens=sae_tokens, k=k,
                                                  expansion=expansion, directory=sae_dir,
                                                  use_main_job=use_main_job, progress=progress)
        info["timings"]["saes_s"] = time.perf_counter() - t
        log(f"SAEs: {info['sae_source']}", progress)
    baselines = [f for f in families if f != "sae"]
    if baselines:
        t = time.perf_counter()
        sample = harvest_sample(model, corpus.train, sites, baseline_tokens)
        out.update(fit_baselines(sample, baselines, ica_components=ica_components, seed=seed))
        info["timings"]["baselines_s"] = time.perf_counter() - t
        info["baseline_tokens"] = min(x.shape[0] for x in sample.values())
        log(f"baselines {baselines} fitted on {info['baseline_tokens']} tokens per site in "
            f"{info['timings']['baselines_s']:.0f} s", progress)
    return {f: out[f] for f in families}, info


def check_families(model: Any, dictionaries_by_family: Mapping[str, Mapping[str, Any]], sites: list[str]) -> None:
    """Raise a clear error unless every family has a dictionary at every site."""
    if not isinstance(dictionaries_by_family, Mapping) or not dictionaries_by_family:
        raise ValueError("dictionaries_by_family must be a non-empty {family: {site: Dictionary}} mapping "
                         "(see interventions.runners.build_families)")
    if not sites:
        raise ValueError("no sites given")
    for site in sites:
        if site not in model.sites:
            raise ValueError(f"{site!r} is not a site of {model.name}; sites are e.g. {list(model.sites)[:4]}")
    for fam, dicts in dictionaries_by_family.items():
        missing = [s for s in sites if s not in dicts]
        if missing:
            raise ValueError(f"family {fam!r} has no dictionary at {missing}; it has {list(dicts)}")


def add_family_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The runners' shared options: model, seed, where the families come from, output. Values
    are range-checked while parsing (exit status 2 and a one-line error, before the model loads)."""
    from sae.cli import DEVICES, device_name, int_at_least

    p.add_argument("--model", default=None, help="local model directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--device", type=device_name, default="auto", help=DEVICES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sae-tokens", type=int_at_least(1), default=16_384,
                   help="training tokens per site when SAEs are trained here")
    p.add_argument("--sae-dir", default=None, help="a train_at_sites run directory to load SAEs from (or train into)")
    p.add_argument("--no-main-job", action="store_true", help="ignore the README main job's cached SAEs")
    p.add_argument("--k", type=int_at_least(1), default=32, help="TopK active latents when training")
    p.add_argument("--expansion", type=int_at_least(1), default=4, help="latents per dimension when training")
    p.add_argument("--baseline-tokens", type=int_at_least(1), default=4096,
                   help="harvested tokens per site for PCA/ICA")
    p.add_argument("--ica-components", type=int_at_least(1), default=128, help="FastICA components (<= d_model)")
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def families_from_args(args: argparse.Namespace) -> tuple[Any, dict[str, dict[str, Any]], dict[str, Any], list[str]]:
    """(model, dictionaries_by_family, info, report notes) for parsed `add_family_arguments`
    options plus args.sites and args.families (no families: no dictionaries, no corpus)."""
    from sae.models import load_model

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    fams, info = build_families(model, args.sites, args.families, sae_tokens=args.sae_tokens,
                                sae_dir=args.sae_dir, use_main_job=not args.no_main_job, k=args.k,
                                expansion=args.expansion, baseline_tokens=args.baseline_tokens,
                                ica_components=args.ica_components, seed=args.seed,
                                progress=not args.quiet) if args.families else ({}, {})
    notes = []
    if "sae_source" in info:
        notes.append(f"SAEs: {info['sae_source']}")
    if "baseline_tokens" in info:
        notes.append(f"baselines fitted on {info['baseline_tokens']} harvested tokens per site"
                     + (f"; ICA with {args.ica_components} components" if "ica" in args.families else ""))
    notes.append(f"set-up (model, dictionaries) {time.perf_counter() - t0:.0f} s")
    return model, fams, info, notes
