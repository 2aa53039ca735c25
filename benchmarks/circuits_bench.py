"""Circuits benchmark: what node and edge attribution cost, and the IOI graph at every layer.

Sections (all by default; name some to run only those):

  --counts  forwards and backwards of `node_effects`, attribution patching ("atp") vs integrated
            gradients per site ("ig", --steps N) and along the input path for all sites at once
            ("ig-input", N + 1 points), counted, not assumed: a forward pre-hook on the first
            transformer block counts forwards (and their rows), wrappers around
            torch.autograd.backward / torch.autograd.grad (Tensor.backward goes through the first)
            count backwards. The counts are asserted against the expected ones and printed.
  --edges   `edge_effects` (batched VJPs; one run per --rows value) vs `edge_effects_reference`
            (one backward per downstream node) on the same prompts, dictionaries and nodes:
            backwards of each, wall time (interleaved repetitions, medians), speed-up, and the max
            |difference| of all edge weights (asserted allclose). The time of every backward is
            recorded; the one that carries the metric node is reported apart.
  --graph   the IOI graph for --prompts prompts (default 64) with TopK dictionaries at every
            residual layer: node effects (atp), edges for the top --graph-top-k nodes of each site,
            build_graph. Wall time per phase and peak RSS (getrusage ru_maxrss), in a fresh
            subprocess so that nothing else in this process inflates the peak.

  --tiny    a random 4-layer Llama with a byte tokenizer instead of SmolLM2, random prompt pairs
            instead of IOI (quick mode: seconds). --graph always uses SmolLM2.

Dictionaries: the trained residual TopK SAEs of a finished main job (`python -m circuits.main` or `python -m sae.cli train`) in
the cache when one covers the sites, else random-init TopK SAEs (k=32, 4 x d_model latents):
the costs are the same, the circuit is meaningless. The summary says which were used.

Timings on a shared machine drift; ratios are measured side by side in one run (interleaved,
medians), never compared across runs. On loaded shared cores --threads 1 can be several times
faster than 2 (OpenMP threads wait for each other).

    python benchmarks/circuits_bench.py --tiny                     # all sections but graph, quick
    python benchmarks/circuits_bench.py --edges --reps 3
    python benchmarks/circuits_bench.py --graph --prompts 64
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", message=".*deprecated.*")
warnings.filterwarnings("ignore", message=".*skipped.*")


# --- setup ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cached_dictionaries(model, sites):
    """{site: Dictionary} from a finished main-job run in the cache that covers `sites`, else None."""
    from sae import load
    from sae.io import cache_dir

    for run in sorted(cache_dir("runs").glob(f"{model.name}-*/run.json")):
        info = json.loads(run.read_text())
        if info.get("complete") and info["key"].get("model") == model.name and set(sites) <= set(info["key"]["sites"]):
            return {s: load(run.parent / s.replace(".", "_")).eval() for s in sites}, f"trained ({run.parent.name})"
    return None, None


def dictionaries(model, sites, k: int, seed: int = 0):
    """(dicts, description): cached trained ones when available, else random-init TopK SAEs."""
    from sae import TopKSAE

    dicts, what = cached_dictionaries(model, sites) if not model.name.startswith("tiny") else (None, None)
    if dicts is not None:
        return dicts, what
    torch.manual_seed(seed)
    d = model.d_model
    k = min(k, d // 4)
    return {s: TopKSAE(d, 4 * d, k=k).eval() for s in sites}, f"random-init TopK (k={k}, {4 * d} latents)"


def task(model, n: int, tiny: bool):
    """(clean ids [n, pos], counterfactual ids, metric(logits, rows) -> [b], description)."""
    if tiny:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(2, 250, (n, 12), generator=g)
        cf = ids.clone()
        cf[:, [3, 8]] = torch.randint(2, 250, (n, 2), generator=g)
        return ids, cf, (lambda logits, rows: logits[:, -1, 5] - logits[:, -1, 11]), "random pairs (2 tokens swapped)"
    from interventions.tasks import logit_diff, make_ioi

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_ioi(model.tokenizer, n)
    return (ds.input_ids, ds.cf_input_ids, (lambda logits, rows: logit_diff(logits, ds[rows])),
            f"IOI ({ds.seq_len} tokens, ABC counterfactual, logit_diff)")


def load(tiny: bool, threads: int):
    torch.set_num_threads(threads)
    from sae import load_model, tiny_model

    if tiny:
        return tiny_model("llama", n_layers=4, d_model=32)
    return load_model()


# --- counting passes -----------------------------------------------------------------------------
class PassCounter:
    """Forwards through the first transformer block (rows each) and backward passes (calls of
    torch.autograd.backward / .grad, with their wall time and the rows of the grad-enabled forward
    whose graph they traverse)."""

    def __init__(self, model):
        self.block = model.hf.get_submodule(model.sites["resid.0"].module)
        self.forwards: list[tuple[int, bool]] = []       # (rows, grad enabled)
        self.backwards: list[tuple[int, float]] = []     # (rows, seconds)
        self._grad_rows = 0

    def _pre(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        grad = torch.is_grad_enabled()
        self.forwards.append((int(x.shape[0]), grad))
        if grad:
            self._grad_rows = int(x.shape[0])

    def _wrap(self, fn):
        def counted(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.backwards.append((self._grad_rows, time.perf_counter() - start))
        return counted

    @contextlib.contextmanager
    def count(self):
        self.forwards.clear()
        self.backwards.clear()
        handle = self.block.register_forward_pre_hook(self._pre, with_kwargs=True)
        saved = torch.autograd.backward, torch.autograd.grad
        torch.autograd.backward, torch.autograd.grad = self._wrap(saved[0]), self._wrap(saved[1])
        try:
            yield self
        finally:
            torch.autograd.backward, torch.autograd.grad = saved
            handle.remove()


def section_counts(model, args, summary):
    from circuits import node_effects

    sites = args.sites
    dicts, what = dictionaries(model, sites, args.k)
    n, b, N = args.count_prompts, args.count_batch, args.steps
    ids, cf, metric, desc = task(model, n, args.tiny)
    counter = PassCounter(model)
    chunks = math.ceil(n / b)
    S = len(sites) + 1                    # + the token-embedding input site ("embed"), spliced internally
    per_block = max(1, args.max_rows // b)
    ig_calls = math.ceil(N / per_block)   # forwards (and backwards) per site per batch
    print(f"\n## node effects: passes per batch ({model.name}, {n} prompts in batches of {b}, sites "
          f"{', '.join(sites)} + embed input; {desc}; {what})")
    times = {}
    for method in ("atp", "ig", "ig-input"):
        with counter.count():
            start = time.perf_counter()
            node_effects(model, dicts, ids, cf, metric, method=method, steps=N, batch_size=b, max_rows=args.max_rows)
            times[method] = time.perf_counter() - start
        fw, bw = counter.forwards, counter.backwards
        if method == "atp":
            assert len(fw) == 2 * chunks and len(bw) == chunks, (fw, bw)
            assert [g for _, g in fw] == [True, False] * chunks and all(r == b for r, _ in fw), fw
            print(f"atp: {len(fw) // chunks} forwards + {len(bw) // chunks} backward per batch of {b} (clean "
                  f"forward with grad + backward, counterfactual forward without grad); counted "
                  f"{len(fw)} forwards, {len(bw)} backwards for {chunks} batches")
            summary.append(("node effects atp, per batch", f"{len(fw) // chunks} fwd + {len(bw) // chunks} bwd",
                             f"{times[method]:.1f} s for {n} prompts"))
        elif method == "ig-input":
            grad_fw = [r for r, g in fw if g]
            calls = math.ceil((N + 1) / per_block)
            rows_fw = sum(r for r, _ in fw) / b / chunks
            rows_bw = sum(r for r, _ in bw) / b / chunks
            assert len(grad_fw) == calls * chunks and len(bw) == calls * chunks, (fw, bw)
            assert rows_fw == 2 + N + 1 and rows_bw == N + 1, (rows_fw, rows_bw)
            print(f"ig-input (N={N}): 2 plain forwards + {calls} forward+backward of up to "
                  f"{min(N + 1, per_block) * b} rows per batch of {b}, for all {S} sites at once; in "
                  f"batch-equivalents {rows_fw:g} forwards + {rows_bw:g} backwards = 2 + (N + 1)")
            summary.append((f"node effects ig-input N={N}, per batch",
                            f"{len(fw) // chunks} fwd + {len(bw) // chunks} bwd calls; {rows_fw:g} + {rows_bw:g} "
                            f"batch-equivalents (all sites)", f"{times[method]:.1f} s for {n} prompts"))
        else:
            grad_fw = [r for r, g in fw if g]
            plain_fw = [r for r, g in fw if not g]
            rows_fw = sum(r for r, _ in fw) / b / chunks       # batch-equivalents per batch
            rows_bw = sum(r for r, _ in bw) / b / chunks
            assert len(plain_fw) == 2 * chunks and len(grad_fw) == S * ig_calls * chunks, fw
            assert len(bw) == S * ig_calls * chunks, bw
            assert rows_fw == 2 + S * N and rows_bw == S * N, (rows_fw, rows_bw)
            print(f"ig (N={N}): {len(fw) // chunks} forwards + {len(bw) // chunks} backwards per batch of {b}: "
                  f"2 plain forwards + per site {ig_calls} forward+backward of {min(N, per_block) * b} rows "
                  f"(the N steps as N copies of the batch, max_rows={args.max_rows}); in batch-equivalents "
                  f"{rows_fw:g} forwards + {rows_bw:g} backwards = 2 + N per site x {S} sites (incl. embed)")
            summary.append((f"node effects ig N={N}, per batch",
                            f"{len(fw) // chunks} fwd + {len(bw) // chunks} bwd calls; {rows_fw:g} + {rows_bw:g} "
                            f"batch-equivalents (N per site, {S} sites)", f"{times[method]:.1f} s for {n} prompts"))
    print(f"wall: atp {times['atp']:.2f} s, ig {times['ig']:.2f} s ({times['ig'] / times['atp']:.1f}x atp), "
          f"ig-input {times['ig-input']:.2f} s ({times['ig-input'] / times['atp']:.1f}x atp; "
          f"ig / ig-input = {times['ig'] / times['ig-input']:.1f}x) (one run each)")


# --- edges: batched vs one backward per node -----------------------------------------------------
def _all_weights(e, weights, inputs):
    """Every number of an EdgeEffects as one flat dense vector, over the given (up, down) pairs and
    from_input sites (absent ones are zeros, as EdgeEffects.weight says)."""
    p = e.input_to_metric.numel()
    parts = [e.weight(u, d).flatten() for u, d in weights]
    for s in inputs:
        zeros = torch.zeros((p, e.sizes[s], p) if e.per_position else (e.sizes[s], p))
        parts.append(e.from_input.get(s, zeros).flatten())
    parts += [e.to_metric[s].flatten() for s in sorted(e.to_metric)]
    parts.append(e.input_to_metric.flatten())
    return torch.cat([p.double() for p in parts])


def _compare(a, b):
    """(max |a - b| over every weight, max |weight|); asserts allclose."""
    weights = sorted(set(a.weights) | set(b.weights))
    inputs = sorted(set(a.from_input) | set(b.from_input))
    wa, wb = _all_weights(a, weights, inputs), _all_weights(b, weights, inputs)
    scale = float(wb.abs().max())
    diff = float((wa - wb).abs().max())
    assert torch.allclose(wa, wb, rtol=1e-3, atol=1e-4 * max(scale, 1e-12)), f"max |diff| {diff:.3g} vs max {scale:.3g}"
    return diff, scale


def section_edges(model, args, summary):
    from circuits import edge_effects, edge_effects_reference, node_effects

    sites = args.sites
    dicts, what = dictionaries(model, sites, args.k)
    ids, cf, metric, desc = task(model, args.edge_prompts, args.tiny)
    b = ids.shape[0]
    nodes = node_effects(model, dicts, ids, cf, metric)
    sel = nodes.select(top_k=args.edge_top_k)
    counter = PassCounter(model)
    runs = {"reference": lambda: edge_effects_reference(model, dicts, ids, cf, metric, nodes=sel)}
    for r in args.rows:
        runs[f"rows={r}"] = (lambda r=r: edge_effects(model, dicts, ids, cf, metric, nodes=sel, rows_per_backward=r))
    times = {k: [] for k in runs}
    result, bw_times, fwd = {}, {}, {}
    print(f"\n## edges: batched VJPs vs one backward per node ({model.name}, {b} prompts, sites {', '.join(sites)}, "
          f"top {args.edge_top_k} nodes per site by |atp effect|; {desc}; {what})")
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]   # interleaved, alternating order
        for name in order:
            with counter.count():
                start = time.perf_counter()
                result[name] = runs[name]()
                times[name].append(time.perf_counter() - start)
            bw_times[name] = [s for _, s in counter.backwards]
            fwd[name] = list(counter.forwards)
            assert len(counter.backwards) == result[name].n_backwards, (len(counter.backwards), result[name].n_backwards)
            log(f"  rep {rep + 1}/{args.reps} {name}: {times[name][-1]:.1f} s, {result[name].n_backwards} backwards")
    ref = result["reference"]
    n_nodes = ref.n_backwards - 1     # one backward per downstream node (the metric included) + the clean one
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"downstream nodes expanded: {n_nodes} (incl. the metric); peak RSS of this process so far "
          f"{peak_rss_mb():.0f} MB")
    print(f"| run | rows/backward | nodes/backward | backwards | expected | forward rows | wall s (median of "
          f"{args.reps}) | speed-up vs reference | all backwards s | metric-node backward s | other backwards s (median) | max abs diff | max abs weight |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in runs:
        e = result[name]
        K = 1 if name == "reference" else max(1, min(n_nodes, int(name.split("=")[1]) // b))
        expected = 1 + math.ceil(n_nodes / K)
        assert e.n_backwards == expected, (name, e.n_backwards, expected)
        diff, scale = _compare(e, ref)
        bws = bw_times[name][1:]        # without the clean-gradient backward
        metric_bw = bws[-1]             # the metric node is last in the queue
        others = statistics.median(bws[:-1]) if len(bws) > 1 else float("nan")
        print(f"| {name} | {K * b} | {K} | {e.n_backwards} | 1 + ceil({n_nodes}/{K}) = {expected} | "
              f"{'+'.join(str(r) for r, _ in fwd[name])} | {med[name]:.2f} | {med['reference'] / med[name]:.2f}x | "
              f"{sum(bw_times[name]):.2f} | {metric_bw:.2f} | {others:.3f} | {diff:.2e} | {scale:.3g} |")
        if name != "reference":
            summary.append((f"edges {name} ({K} nodes/backward) vs reference",
                            f"{e.n_backwards} vs {ref.n_backwards} backwards, speed-up {med['reference'] / med[name]:.2f}x",
                            f"max |diff| {diff:.1e} (max |w| {scale:.2g})"))


# --- the IOI graph at every layer, in a fresh process --------------------------------------------
def graph_child(cfg: dict) -> dict:
    """Runs in its own process; returns phase times and peak RSS."""
    out = {"rss_start_mb": peak_rss_mb()}
    t0 = time.perf_counter()
    model = load(False, cfg["threads"])
    from circuits import build_graph, edge_effects, node_effects

    sites = [f"resid.{i}" for i in range(model.n_layers)]
    dicts, what = dictionaries(model, sites, cfg["k"])
    ids, cf, metric, desc = task(model, cfg["prompts"], False)
    out.update(setup_s=time.perf_counter() - t0, rss_setup_mb=peak_rss_mb(), dictionaries=what, task=desc,
               sites=len(sites), prompts=cfg["prompts"], model=model.name)
    log(f"  graph: setup {out['setup_s']:.1f} s")
    t = time.perf_counter()
    nodes = node_effects(model, dicts, ids, cf, metric, batch_size=cfg["node_batch"])
    out.update(nodes_s=time.perf_counter() - t, rss_nodes_mb=peak_rss_mb())
    log(f"  graph: node effects {out['nodes_s']:.1f} s")
    t = time.perf_counter()
    sel = nodes.select(top_k=cfg["top_k"])
    with PassCounter(model).count() as counter:
        edges = edge_effects(model, dicts, ids, cf, metric, nodes=sel, batch_size=cfg["edge_batch"],
                             rows_per_backward=cfg["rows"])
    out.update(edges_s=time.perf_counter() - t, rss_edges_mb=peak_rss_mb(), backwards=edges.n_backwards,
               expanded=int(sum(int(m.sum()) for m in sel.values())), forward_rows=[r for r, _ in counter.forwards],
               backward_s=sum(s for _, s in counter.backwards), metric_backward_s=counter.backwards[-1][1])
    log(f"  graph: edges {out['edges_s']:.1f} s ({edges.n_backwards} backwards)")
    t = time.perf_counter()
    g = build_graph(nodes, edges, top_k=cfg["top_k"])
    out.update(build_s=time.perf_counter() - t, rss_end_mb=peak_rss_mb(), graph_nodes=g.number_of_nodes(),
               graph_edges=g.number_of_edges(), total_s=time.perf_counter() - t0)
    return out


def section_graph(args, summary):
    for rows in args.graph_rows:
        graph_run(args, rows, summary)


def graph_run(args, rows, summary):
    cfg = dict(prompts=args.prompts, top_k=args.graph_top_k, rows=rows, node_batch=args.node_batch,
               edge_batch=args.edge_batch, k=args.k, threads=args.threads)
    print(f"\n## IOI graph at every residual layer ({args.prompts} prompts, top {args.graph_top_k} nodes per site, "
          f"rows_per_backward={rows}, fresh subprocess)")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--graph-child", json.dumps(cfg)], stdout=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"graph subprocess failed (exit {done.returncode}); see stderr above")
        summary.append(("IOI graph", "FAILED", f"exit {done.returncode}"))
        return
    r = json.loads(done.stdout.strip().splitlines()[-1])
    work = r["nodes_s"] + r["edges_s"] + r["build_s"]
    print(f"{r['model']}, {r['sites']} sites, {r['dictionaries']}, {r['task']}")
    print("| phase | wall s | peak RSS after, MB |")
    print("|---|---|---|")
    print(f"| python + imports | - | {r['rss_start_mb']:.0f} |")
    print(f"| load model + dictionaries + prompts | {r['setup_s']:.1f} | {r['rss_setup_mb']:.0f} |")
    print(f"| node effects (atp) | {r['nodes_s']:.1f} | {r['rss_nodes_mb']:.0f} |")
    print(f"| edges ({r['expanded']} nodes expanded; forwards of {'+'.join(map(str, r['forward_rows']))} rows; "
          f"{r['backwards']} backwards: {r['backward_s']:.1f} s, the metric node's {r['metric_backward_s']:.1f} s) | "
          f"{r['edges_s']:.1f} | {r['rss_edges_mb']:.0f} |")
    print(f"| build_graph ({r['graph_nodes']} nodes, {r['graph_edges']} edges) | {r['build_s']:.2f} | "
          f"{r['rss_end_mb']:.0f} |")
    print(f"attribution (nodes + edges + graph) {work:.1f} s = {work / r['prompts']:.2f} s per prompt; whole "
          f"subprocess {wall:.1f} s; peak RSS {r['rss_end_mb']:.0f} MB ({r['rss_end_mb'] - r['rss_setup_mb']:+.0f} MB "
          f"over the loaded model and dictionaries)")
    summary.append((f"IOI graph, {r['prompts']} prompts x {r['sites']} resid sites, rows_per_backward={rows}",
                    f"{work:.0f} s attribution ({work / r['prompts']:.2f} s/prompt), {wall:.0f} s with loading",
                    f"peak RSS {r['rss_end_mb'] / 1024:.2f} GB"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", action="store_true", help="section a: passes of node_effects (atp vs ig)")
    p.add_argument("--edges", action="store_true", help="section b: batched vs reference edges")
    p.add_argument("--graph", action="store_true", help="section c: IOI graph at all residual layers")
    p.add_argument("--tiny", action="store_true", help="tiny random model for --counts/--edges (quick)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sites", nargs="+", default=None,
                   help="sites for --counts/--edges (default resid.6 resid.12 resid.18; tiny: resid.0..3)")
    p.add_argument("--k", type=int, default=32, help="TopK k of random-init dictionaries")
    p.add_argument("--steps", type=int, default=10, help="ig steps N")
    p.add_argument("--max-rows", type=int, default=256, help="node_effects max_rows")
    p.add_argument("--count-prompts", type=int, default=8)
    p.add_argument("--count-batch", type=int, default=4, help="node_effects batch_size for --counts")
    p.add_argument("--edge-prompts", type=int, default=4)
    p.add_argument("--edge-top-k", type=int, default=12, help="downstream nodes per site for --edges")
    p.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256], help="rows_per_backward values for --edges")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions for --edges")
    p.add_argument("--prompts", type=int, default=64, help="IOI prompts for --graph")
    p.add_argument("--graph-top-k", type=int, default=10, help="nodes per site expanded for edges and kept in the graph")
    p.add_argument("--graph-rows", type=int, nargs="+", default=[64],
                   help="rows_per_backward for --graph, one fresh subprocess each (default 64: the library "
                        "default 256 retains a 256-row graph through all 30 layers, ~14 GB peak RSS)")
    p.add_argument("--node-batch", type=int, default=None, help="node_effects batch_size for --graph (default all)")
    p.add_argument("--edge-batch", type=int, default=None, help="edge_effects batch_size for --graph (default all)")
    p.add_argument("--graph-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.graph_child is not None:
        print(json.dumps(graph_child(json.loads(args.graph_child))))
        return
    if not (args.counts or args.edges or args.graph):
        args.counts = args.edges = True
        args.graph = not args.tiny
    summary: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    if args.graph:  # first, while this process is small: a child's ru_maxrss starts at its parent's RSS at fork
        section_graph(args, summary)
    if args.counts or args.edges:
        model = load(args.tiny, args.threads)
        args.sites = args.sites or ([f"resid.{i}" for i in range(model.n_layers)] if args.tiny
                                    else ["resid.6", "resid.12", "resid.18"])
        if args.counts:
            section_counts(model, args, summary)
        if args.edges:
            section_edges(model, args, summary)
    print(f"\n## summary ({args.threads} threads; times from one shared machine, ratios side by side; "
          f"total {time.perf_counter() - t0:.0f} s)")
    print("| measurement | result | notes |")
    print("|---|---|---|")
    for row in summary:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
