"""Command line of the dictionaries half: `python -m sae.cli train` (TopK SAEs at many sites,
cached, then the evaluation table) and `python -m sae.cli harvest` (an on-disk activation store).
The README's main job, `python -m circuits.main`, runs `train` and then traces an IOI circuit.

Every subcommand is a thin layer over the Python API, so scripts and the CLI cannot drift.
"""
from __future__ import annotations

import argparse
import sys
import time


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--corpus", default=None, help="txt/jsonl/parquet file or folder (default: embedded corpus)")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per context (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward (default 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


#: The main job's dictionaries. Schedule-free sign descent, not Adam: at this CPU-sized budget (128
#: steps) it reaches FVU 0.05-0.31 where Adam stays at 0.09-0.40 (and CE recovered 0.87-0.99 vs
#: 0.77-0.97) on the same tokens, as on the synthetic benchmark (benchmarks/README.md).
DEFAULTS = dict(sites="resid.*", k=32, expansion=4, tokens=131_072, optimizer="signsgd")


def run_directory(model_name: str, sites: str = DEFAULTS["sites"], k: int = DEFAULTS["k"],
                  expansion: int = DEFAULTS["expansion"], tokens: int = DEFAULTS["tokens"],
                  optimizer: str = DEFAULTS["optimizer"]):
    """The cache directory of a `train` run with these settings (the main job's by default)."""
    from .io import cache_dir

    return cache_dir("runs", f"{model_name}-{sites.replace('*', 'all')}-topk{k}x{expansion}-{tokens}-{optimizer}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `train_and_evaluate` (shared with the circuits main job)."""
    _common(p)
    p.add_argument("--sites", default=DEFAULTS["sites"], help="sites to train, names or a glob (default 'resid.*')")
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="training tokens per site (default 131072; "
                   "more gives better dictionaries at ~1 min per 10k tokens for 30 sites on 2 CPU cores)")
    p.add_argument("--k", type=int, default=DEFAULTS["k"], help="TopK active latents per token (default 32)")
    p.add_argument("--expansion", type=int, default=DEFAULTS["expansion"], help="latents per input dimension (default 4)")
    p.add_argument("--train-batch", type=int, default=1024, help="tokens per training step (default 1024)")
    p.add_argument("--optimizer", default=DEFAULTS["optimizer"], choices=["adam", "signsgd"],
                   help="signsgd (default: schedule-free sign descent, sparsify's default) or adam")
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens for reconstruction metrics")
    p.add_argument("--ce-tokens", type=int, default=512, help="held-out tokens for the spliced-CE metrics")
    p.add_argument("--runs", default=None, help="dictionary run directory (default: in the sae-circuits cache)")


def train_and_evaluate(args: argparse.Namespace):
    """Load the model and corpus, train (or load cached) TopK dictionaries at `args.sites`,
    evaluate them on held-out text and print the table. Returns (model, corpus, dicts, table)."""
    import pandas as pd

    from .corpus import load_corpus
    from .evaluation import evaluate
    from .models import load_model
    from .pipeline import train_at_sites
    from .training import TrainConfig

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    per_context = args.ctx_len - 1  # position 0 is neither trained nor evaluated on
    n_train, n_eval = -(-args.tokens // per_context) + 1, -(-args.eval_tokens // per_context)
    corpus = load_corpus(args.corpus, model.tokenizer, ctx_len=args.ctx_len, heldout_fraction=n_eval / (n_train + n_eval),
                         max_tokens=(n_train + n_eval) * args.ctx_len, max_positions=model.max_positions)
    cfg = TrainConfig(total_tokens=args.tokens, batch_size=args.train_batch, calibration_tokens=8192,
                      optimizer=args.optimizer,
                      log_every=25, checkpoint_every=50, progress=not args.no_progress,
                      device="cpu" if model.device.type == "cpu" else str(model.device))
    directory = args.runs or run_directory(model.name, args.sites, args.k, args.expansion, args.tokens,
                                           args.optimizer)
    print(f"dictionaries: {directory}")
    t1 = time.perf_counter()
    dicts = train_at_sites(model, corpus.train, args.sites, k=args.k, expansion=args.expansion, cfg=cfg,
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
    p.set_defaults(func=train_and_evaluate)
    p = sub.add_parser("harvest", help=cmd_harvest.__doc__, description=cmd_harvest.__doc__)
    _common(p)
    p.add_argument("--sites", nargs="+", default=["resid.*"], help="site names or globs (default 'resid.*')")
    p.add_argument("--tokens", type=int, default=65_536, help="corpus tokens to harvest")
    p.add_argument("--out", required=True, help="store directory (rerun to resume)")
    p.add_argument("--contexts-per-shard", type=int, default=64)
    p.set_defaults(func=cmd_harvest)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
