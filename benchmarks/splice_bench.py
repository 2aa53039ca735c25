"""Spliced-forward benchmark: SmolLM2 with a TopK SAE at every residual site vs the bare forward.

Target (interventions issue): a forward with dictionaries spliced at all 30 layers costs <= 2x
the bare forward (TopK decode is sparse). Prints, measured side by side in one run (interleaved
repetitions, medians):

    bare          transformers forward (logits)
    traced        the same through an nnsight trace (no dictionaries)
    spliced       run_spliced with a TopK SAE (k=32, 4x576 latents) at resid.0 .. resid.29
    spliced+grad  the same with grad=True and a backward of a logit metric (attribution cost)

    python benchmarks/splice_bench.py [--batch 8] [--ctx-len 128] [--reps 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from interventions import run_spliced
    from sae import TopKSAE, load_model, tracing

    model = load_model()
    torch.manual_seed(0)
    sites = [f"resid.{i}" for i in range(model.n_layers)]
    saes = {s: TopKSAE(model.d_model, args.expansion * model.d_model, k=args.k).eval() for s in sites}
    ids = torch.randint(0, 49152, (args.batch, args.ctx_len), generator=torch.Generator().manual_seed(0))
    tokens = ids.numel()

    def bare():
        with torch.no_grad():
            model.hf(input_ids=ids)

    def traced():
        with torch.no_grad():
            with tracing.trace(model.nn, ids) as tracer:
                out = tracing.save(tracing.logits(model.nn))
        return out

    def spliced():
        with torch.no_grad():
            run_spliced(model, saes, ids)

    def spliced_grad():
        run_spliced(model, saes, ids, grad=True, metric=lambda logits: logits[:, -1, 0])

    runs = {"bare": bare, "traced": traced, "spliced": spliced, "spliced+grad": spliced_grad}
    for fn in runs.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# spliced forward: {model.name}, TopK k={args.k} x{args.expansion} at {len(sites)} sites, "
          f"{args.batch}x{args.ctx_len} tokens, {args.threads} threads, median of {args.reps}")
    print(f"{'run':>14} {'seconds':>8} {'tok/s':>8} {'x bare':>7}")
    for name, t in med.items():
        print(f"{name:>14} {t:8.2f} {tokens / t:8.0f} {t / med['bare']:7.2f}")
    print(f"spliced / bare = {med['spliced'] / med['bare']:.2f} (target <= 2.0)")


if __name__ == "__main__":
    main()
