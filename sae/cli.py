"""Command line: `python -m sae.cli main` (the README's main job) and `python -m sae.cli harvest`.

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
    p.add_argument("--tokens", type=int, default=8192, help="corpus tokens to harvest (default 8192)")
    p.add_argument("--sites", nargs="+", default=["embed", "resid.0", "attn.14", "mlp.14", "mlp_hidden.14", "resid.14", "resid.29"],
                   help="site names or glob patterns, e.g. 'resid.*' (default: a few across the depth)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def cmd_main(args: argparse.Namespace) -> None:
    """Load the model, harvest a few sites of the corpus and print their statistics."""
    from .corpus import load_corpus
    from .harvesting import harvest
    from .models import load_model
    from .stats import activation_stats

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device)
    print(f"loaded {model} in {time.perf_counter() - t0:.1f} s")
    corpus = load_corpus(args.corpus, model.tokenizer, ctx_len=args.ctx_len, max_tokens=args.tokens,
                         max_positions=model.max_positions)
    print(f"corpus {corpus.name}: {len(corpus)} train contexts x {corpus.ctx_len} tokens "
          f"(+{len(corpus.heldout)} held out)")
    t1 = time.perf_counter()
    table = activation_stats(harvest(model, corpus, args.sites, batch_size=args.batch_size,
                                     progress=not args.no_progress))
    seconds = time.perf_counter() - t1
    print(table.to_string(float_format="{:.3f}".format))
    print(f"harvested {int(table['tokens'].iloc[0]):,} tokens at {len(table)} sites in {seconds:.1f} s")


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
    p = sub.add_parser("main", help=cmd_main.__doc__, description=cmd_main.__doc__)
    _common(p)
    p.set_defaults(func=cmd_main)
    p = sub.add_parser("harvest", help=cmd_harvest.__doc__, description=cmd_harvest.__doc__)
    _common(p)
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
