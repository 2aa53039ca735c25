"""Harvest benchmark on the default model (SmolLM2-135M): overhead, early stop, memory.

Prints ratios measured side by side in one run (interleaved repetitions, medians), since the
machine is shared and noisy:

1. overhead: harvesting one site `resid.L` through nnsight vs a bare `transformers` forward
   cut after block L with a plain hook (same tokens, same layer). Target <= 1.10.
2. early stop: harvesting `resid.L` vs a full forward (with the unembedding) and vs a forward
   through all blocks (without it); expected about (L+1)/n_layers of the latter.
3. memory: peak RSS of a harvest over N and 4N contexts, each in a fresh process. Target: equal.

    python benchmarks/harvest_bench.py [--batches 2] [--batch-size 8] [--ctx-len 128] [--reps 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


class _Cut(Exception):
    pass


def bare_forward(model, ids, layer: int | None, unembed: bool = True) -> None:
    """transformers forward; with `layer`, cut right after that block with a plain hook."""
    handle = None
    if layer is not None:
        def cut(module, args, output):
            raise _Cut
        handle = model.hf.get_submodule(model.sites[f"resid.{layer}"].module).register_forward_hook(cut)
    try:
        with torch.no_grad():
            if unembed:
                model.hf(input_ids=ids)
            else:
                model.hf.base_model(input_ids=ids)
    except _Cut:
        pass
    finally:
        if handle is not None:
            handle.remove()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def memory_probe(n_contexts: int, ctx_len: int, batch_size: int) -> None:
    """Child process: harvest n_contexts and print the peak RSS in MiB."""
    import resource

    from sae.harvesting import harvest
    from sae.models import load_model
    from sae.stats import ActivationStats

    model = load_model()
    ids = torch.randint(0, 49152, (n_contexts, ctx_len), generator=torch.Generator().manual_seed(0))
    stats = ActivationStats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for batch in harvest(model, ids, ["resid.3", "mlp_hidden.3"], batch_size=batch_size, progress=False):
        stats.update(batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"contexts": n_contexts, "rss_before_mib": before, "peak_rss_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=2, help="batches per timing")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ctx-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 7, 14, 22, 29])
    p.add_argument("--memory-contexts", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is least disturbed by other load)")
    p.add_argument("--probe", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe is not None:
        memory_probe(args.probe, args.ctx_len, args.batch_size)
        return

    from sae.harvesting import harvest
    from sae.models import load_model

    model = load_model()
    n = model.n_layers
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 49152, (args.batch_size, args.ctx_len), generator=g) for _ in range(args.batches)]
    tokens = args.batches * args.batch_size * args.ctx_len

    def run_harvest(layer):
        for ids in batches:
            for _ in harvest(model, ids, f"resid.{layer}", batch_size=args.batch_size, progress=False):
                pass

    def run_bare(layer, unembed=True):
        for ids in batches:
            bare_forward(model, ids, layer, unembed)

    run_harvest(0), run_bare(0)  # warm up
    times: dict[str, list[float]] = {}
    for _ in range(args.reps):  # interleave every measurement within each repetition
        times.setdefault("full", []).append(timed(lambda: run_bare(None)))
        times.setdefault("blocks", []).append(timed(lambda: run_bare(None, unembed=False)))
        for layer in args.layers:
            times.setdefault(f"harvest.{layer}", []).append(timed(lambda: run_harvest(layer)))
            times.setdefault(f"cut.{layer}", []).append(timed(lambda: run_bare(layer)))
    med = {k: statistics.median(v) for k, v in times.items()}

    print(f"# harvest benchmark: {model.name}, {tokens} tokens per timing "
          f"({args.batches} x {args.batch_size} x {args.ctx_len}), {args.threads} threads, median of {args.reps}")
    print(f"full forward {med['full']:.2f} s ({tokens / med['full']:.0f} tok/s); "
          f"all blocks, no unembedding {med['blocks']:.2f} s")
    print(f"{'site':>9} {'harvest s':>10} {'cut fwd s':>10} {'overhead':>9} {'/full':>7} {'/blocks':>8} {'(L+1)/n':>8}")
    worst = 0.0
    for layer in args.layers:
        h, c = med[f"harvest.{layer}"], med[f"cut.{layer}"]
        worst = max(worst, h / c)
        print(f"{'resid.' + str(layer):>9} {h:10.2f} {c:10.2f} {h / c:9.3f} {h / med['full']:7.3f} "
              f"{h / med['blocks']:8.3f} {(layer + 1) / n:8.3f}")
    print(f"worst harvest overhead over the cut transformers forward: {worst:.3f} (target <= 1.10)")

    peaks = []
    for contexts in (args.memory_contexts, 4 * args.memory_contexts):
        out = subprocess.run([sys.executable, __file__, "--probe", str(contexts), "--ctx-len", str(args.ctx_len),
                              "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True)
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    small, large = peaks
    print(f"peak RSS harvesting {small['contexts']} contexts: {small['peak_rss_mib']:.0f} MiB; "
          f"{large['contexts']} contexts: {large['peak_rss_mib']:.0f} MiB; "
          f"ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.3f} (target ~1.0: independent of corpus size)")


if __name__ == "__main__":
    main()
