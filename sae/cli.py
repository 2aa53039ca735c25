"""Command line of the dictionaries half: `python -m sae.cli train` (TopK SAEs at many sites,
cached, then the evaluation table) and `python -m sae.cli harvest` (an on-disk activation store).
The README's main job, `python -m circuits.main`, runs `train` and then traces an IOI circuit.

Every subcommand is a thin layer over the Python API, so scripts and the CLI cannot drift. Every
option is checked before the model loads (`check_args`; exit status 2 with a one-line error
naming the option, the value and what is valid).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable


# --- argument types and checks: everything is validated before the model loads -----------------
def int_at_least(lo: int):
    """An argparse type: an integer >= lo (the error names the option, the value and the range)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def device_name(text: str) -> str:
    """An argparse type: "auto", "cpu", "cuda", "cuda:N" or "mps", and available in this torch.
    torch is imported only for an accelerator name (the check needs it)."""
    import re

    name = text.strip().lower()
    if name in ("auto", "cpu"):
        return name
    m = re.fullmatch(r"(cuda|mps)(?::(\d+))?", name)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; valid: {DEVICES}")
    import torch

    if m[1] == "cuda":
        if not torch.cuda.is_available():
            build = f"a CPU-only torch build ({torch.__version__})" if torch.version.cuda is None else \
                f"torch {torch.__version__} (CUDA {torch.version.cuda}) that sees no CUDA device"
            raise argparse.ArgumentTypeError(f"{text!r} is not available: this is {build}; use cpu or auto")
        if m[2] is not None and int(m[2]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r} is not available: {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise argparse.ArgumentTypeError(f"{text!r} is not available in this torch build; use cpu or auto")
    return name


def site_list(text: str) -> list[str]:
    """Comma-separated site names or globs -> a list (empty entries dropped)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """Checks that need more than one option or the model's config (read from its files in well
    under a second by `sae.model_info`, never by loading it): --ctx-len against the context
    length, --sites, --k against the dictionary width, paths. Exits with parser.error (status 2,
    one line naming the option, what was given and what is valid). Returns the model facts
    ({"n_layers", "d_model", "max_positions"}) or None when they cannot be read cheaply (then
    the same checks run right after loading, before any training)."""
    from pathlib import Path

    from .model_info import match_sites, peek_model, site_names

    from .prose_corpus import NAMED_SOURCES, is_corpus_name

    if getattr(args, "corpus", None) and not str(args.corpus).startswith("hf:") and \
            not is_corpus_name(str(args.corpus)) and not Path(args.corpus).exists():
        parser.error(f"argument --corpus: {args.corpus!r} does not exist (a .txt/.jsonl/.parquet file or folder, "
                     f"hf:NAME:split, one of {', '.join(NAMED_SOURCES)}, or mix:A[:weight],B[:weight])")
    model_arg = getattr(args, "model", None)
    if model_arg is not None and Path(model_arg).exists() and not Path(model_arg).is_dir():
        parser.error(f"argument --model: {model_arg!r} is a file; give a model directory, a hub id, or nothing "
                     f"for the embedded default")
    if model_arg is not None and str(model_arg).startswith(("/", "./", "../", "~")) and \
            not Path(model_arg).expanduser().is_dir():
        parser.error(f"argument --model: the directory {model_arg!r} does not exist (a local model directory, a "
                     f"hub id, or nothing for the embedded default)")
    for opt in ("runs", "out"):
        value = getattr(args, opt, None)
        if value is not None and Path(value).is_file():
            parser.error(f"argument --{opt}: {value!r} is a file; it must be a directory (or not exist yet)")
    info = peek_model(model_arg)
    if info is None:
        return None
    limit = info.get("max_positions")
    if limit and args.ctx_len > limit:
        parser.error(f"argument --ctx-len: {args.ctx_len} is longer than the model's context ({limit} tokens)")
    if hasattr(args, "sites"):
        patterns = site_list(args.sites) if isinstance(args.sites, str) else list(args.sites)
        try:
            match_sites(patterns, site_names(info["n_layers"]))
        except ValueError as e:
            parser.error(f"argument --sites: {e}")
    if getattr(args, "k", None) is not None and getattr(args, "expansion", None) and info.get("d_model"):
        n_latents = args.expansion * info["d_model"]
        if args.k > n_latents:
            parser.error(f"argument --k: {args.k} is more than the {n_latents} latents of a {args.expansion}x "
                         f"dictionary at width {info['d_model']}; lower --k or raise --expansion")
    return info


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default=None, help="txt/jsonl/parquet file or folder, a named source (embedded, topics, "
                   "fortunes, prose, debian) or mix:A[:weight],B[:weight] (default: embedded corpus)")
    p.add_argument("--ctx-len", type=int_at_least(2), default=128, help="tokens per context, >= 2 (default 128)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="contexts per forward (default 8)")
    p.add_argument("--device", type=device_name, default="auto", help=f"{DEVICES} (default auto)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


#: The main job's dictionaries. Schedule-free sign descent, not Adam: at this CPU-sized budget (128
#: steps) it reaches FVU 0.05-0.31 where Adam stays at 0.09-0.40 (and CE recovered 0.87-0.99 vs
#: 0.77-0.97) on the same tokens, as on the synthetic benchmark (benchmarks/README.md).
DEFAULTS = dict(sites="resid.*", k=32, expansion=4, tokens=131_072, optimizer="signsgd")


def run_directory(model_name: str, sites: str = DEFAULTS["sites"], k: int = DEFAULTS["k"],
                  expansion: int = DEFAULTS["expansion"], tokens: int = DEFAULTS["tokens"],
                  optimizer: str = DEFAULTS["optimizer"], corpus: str | None = None):
    """The cache directory of a `train` run with these settings (the main job's by default); a
    corpus other than the embedded default adds its name (slugged)."""
    import re

    from .io import cache_dir, slug

    tail = "" if corpus in (None, "embedded") else "-" + slug(corpus)
    return cache_dir("runs", f"{model_name}-{sites.replace('*', 'all').replace(',', '+')}-topk{k}x{expansion}-{tokens}-{optimizer}{tail}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `train_and_evaluate` (shared with the circuits main job)."""
    _common(p)
    p.add_argument("--sites", default=DEFAULTS["sites"], help="sites to train: comma-separated names or globs (default 'resid.*')")
    p.add_argument("--tokens", type=int_at_least(1), default=DEFAULTS["tokens"],
                   help="training tokens per site (default 131072; more gives better dictionaries at ~1 min "
                        "per 10k tokens for 30 sites on 2 CPU cores)")
    p.add_argument("--k", type=int_at_least(1), default=DEFAULTS["k"], help="TopK active latents per token (default 32)")
    p.add_argument("--expansion", type=int_at_least(1), default=DEFAULTS["expansion"],
                   help="latents per input dimension (default 4)")
    p.add_argument("--train-batch", type=int_at_least(1), default=1024, help="tokens per training step (default 1024)")
    p.add_argument("--optimizer", default=DEFAULTS["optimizer"], choices=["adam", "signsgd"],
                   help="signsgd (default: schedule-free sign descent, sparsify's default) or adam")
    p.add_argument("--eval-tokens", type=int_at_least(1), default=4096,
                   help="held-out tokens for reconstruction metrics")
    p.add_argument("--ce-tokens", type=int_at_least(0), default=512,
                   help="held-out tokens for the spliced-CE metrics (0: skip them)")
    p.add_argument("--runs", default=None, help="dictionary run directory (default: in the sae-circuits cache)")


def train_and_evaluate(args: argparse.Namespace, before_training: Callable[[Any], None] | None = None):
    """Load the model and corpus, train (or load cached) TopK dictionaries at `args.sites`,
    evaluate them on held-out text and print the table. Returns (model, corpus, dicts, table).
    before_training(model) runs right after loading (checks that need the real model's sites)."""
    import pandas as pd

    from .corpus import load_corpus
    from .evaluation import evaluate
    from .models import load_model
    from .pipeline import train_at_sites
    from .sites import resolve_sites
    from .training import TrainConfig

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    sites = site_list(args.sites)
    resolve_sites(model, sites)            # the exact site check, before any corpus or training work
    if before_training is not None:
        before_training(model)
    per_context = args.ctx_len - 1  # position 0 is neither trained nor evaluated on
    n_train, n_eval = -(-args.tokens // per_context) + 1, -(-args.eval_tokens // per_context)
    corpus = load_corpus(args.corpus, model.tokenizer, ctx_len=args.ctx_len, heldout_fraction=n_eval / (n_train + n_eval),
                         max_tokens=(n_train + n_eval) * args.ctx_len, max_positions=model.max_positions)
    cfg = TrainConfig(total_tokens=args.tokens, batch_size=args.train_batch, calibration_tokens=8192,
                      optimizer=args.optimizer,
                      log_every=25, checkpoint_every=50, progress=not args.no_progress,
                      device="cpu" if model.device.type == "cpu" else str(model.device))
    directory = args.runs or run_directory(model.name, args.sites, args.k, args.expansion, args.tokens,
                                           args.optimizer, args.corpus)
    print(f"dictionaries: {directory}")
    t1 = time.perf_counter()
    dicts = train_at_sites(model, corpus.train, sites, k=args.k, expansion=args.expansion, cfg=cfg,
                           directory=directory, harvest_batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{len(dicts)} dictionaries ready in {time.perf_counter() - t1:.1f} s")
    t2 = time.perf_counter()
    table = evaluate(model, dicts, corpus.heldout, tokens=args.eval_tokens, ce_tokens=args.ce_tokens,
                     batch_size=args.batch_size, progress=not args.no_progress)
    columns = ["n_latents", "l0", "fvu", "cosine", "dead_frac", "dense_frac", "ce_clean", "ce_spliced",
               "ce_zero", "ce_recovered", "kl"]
    print(table[[c for c in columns if c in table]].to_string(float_format="{:.3f}".format))
    worst = pd.DataFrame(table.attrs["worst_tokens"])
    if len(worst):
        print("\ntokens where splicing hurts most:")
        print(worst.nlargest(5, "loss_increase")[["site", "loss_increase", "text"]].to_string(index=False))
    print(f"evaluated in {time.perf_counter() - t2:.1f} s")
    return model, corpus, dicts, table


def cmd_harvest(args: argparse.Namespace) -> None:
    """Harvest to a resumable on-disk activation store."""
    from .corpus import load_corpus
    from .harvesting import harvest_to_store
    from .models import load_model

    model = load_model(args.model, device=args.device)
    corpus = load_corpus(args.corpus, model.tokenizer, ctx_len=args.ctx_len, max_tokens=args.tokens,
                         max_positions=model.max_positions)
    store = harvest_to_store(model, corpus, args.sites, args.out, contexts_per_shard=args.contexts_per_shard,
                             batch_size=args.batch_size, progress=not args.no_progress)
    print(store)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sae-circuits", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help=train_and_evaluate.__doc__.split("\n")[0],
                       description=train_and_evaluate.__doc__)
    add_train_arguments(p)
    p.set_defaults(func=train_and_evaluate, parser=p)
    p = sub.add_parser("harvest", help=cmd_harvest.__doc__, description=cmd_harvest.__doc__)
    _common(p)
    p.add_argument("--sites", nargs="+", default=["resid.*"], help="site names or globs (default 'resid.*')")
    p.add_argument("--tokens", type=int_at_least(1), default=65_536, help="corpus tokens to harvest")
    p.add_argument("--out", required=True, help="store directory (rerun to resume)")
    p.add_argument("--contexts-per-shard", type=int_at_least(1), default=64)
    p.set_defaults(func=cmd_harvest, parser=p)
    args = parser.parse_args(argv)
    check_args(args.parser, args)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
