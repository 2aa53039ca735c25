"""The main job: from the embedded default model and corpus to a rendered IOI feature circuit.

    python -m circuits.main [--out DIR] [--tokens N] [--prompts N] ...

1. `sae.cli.train_and_evaluate`: load SmolLM2, train (or reuse cached) TopK dictionaries on the
   residual stream after every layer, and print their evaluation table.
2. IOI prompts (ABBA/BABA, ABC counterfactuals) and the metric m = logit(IO) - logit(S) at the end.
3. Node effects by attribution patching (Marks et al. 2024), edges between the kept nodes with
   batched vector-Jacobian products, a graph pruned to the top nodes per site.
4. Each feature node labelled with its top activating tokens in the corpus.
5. Faithfulness (m(C) - m(empty)) / (m(M) - m(empty)) with everything outside the circuit
   mean-ablated, and a curve over node thresholds.
6. circuit.json, circuit.svg and report.md in the output directory, named at the end.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sae.cli import add_train_arguments

    p = argparse.ArgumentParser(prog="python -m circuits.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--out", default="out/ioi-circuit", help="output directory (default out/ioi-circuit)")
    p.add_argument("--prompts", type=int, default=32, help="IOI prompts for node effects and faithfulness")
    p.add_argument("--edge-prompts", type=int, default=8, help="IOI prompts for edge weights (default 8)")
    p.add_argument("--top-k", type=int, default=3, help="nodes kept per site (default 3)")
    p.add_argument("--method", default="atp", choices=["atp", "ig"], help="node attribution method")
    p.add_argument("--corpus-tokens", type=int, default=16_384, help="corpus tokens for top-token labels")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    from interventions.tasks import make_ioi, logit_diff
    from sae.cli import train_and_evaluate

    from .attribution import node_effects
    from .edges import edge_effects
    from .evaluate import faithfulness_curve
    from .graph import build_graph, save_graph
    from .rendering import GraphvizNotFound, render
    from .top_tokens import annotate_top_tokens

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, corpus, dicts, table = train_and_evaluate(args)
    timings = {"dictionaries": time.perf_counter() - t0}

    t = time.perf_counter()
    ioi = make_ioi(model.tokenizer, n=args.prompts, counterfactual="ABC", seed=0)
    clean, cf = ioi.input_ids, ioi.cf_input_ids

    def metric(logits, rows):  # [batch, pos, vocab] -> [batch]; rows: which prompts the batch holds
        return logit_diff(logits, ioi[rows])

    nodes = node_effects(model, dicts, clean, cf, metric, method=args.method)
    keep = nodes.select(top_k=args.top_k)
    n = min(args.edge_prompts, len(ioi))
    edges = edge_effects(model, dicts, clean[:n], cf[:n], metric, nodes=keep)
    graph = build_graph(nodes, edges, top_k=args.top_k)
    timings["attribution"] = time.perf_counter() - t

    t = time.perf_counter()
    annotate_top_tokens(graph, model, dicts, corpus.train[: max(1, args.corpus_tokens // corpus.ctx_len)], n=5)
    timings["labels"] = time.perf_counter() - t

    t = time.perf_counter()
    curve = faithfulness_curve(model, dicts, clean, metric, graph, ablation="mean", batch_size=max(64, len(ioi)))
    timings["faithfulness"] = time.perf_counter() - t

    json_path = save_graph(graph, out / "circuit.json")
    svg_path = out / "circuit.svg"
    try:
        render(graph, svg_path, title=f"IOI circuit, {model.name}: logit(IO) - logit(S)")
    except GraphvizNotFound as e:
        print(f"warning: {e}\nthe graph is saved as {json_path}", file=sys.stderr)
        svg_path = None
    timings["total"] = time.perf_counter() - t0
    report = write_report(out, model, ioi, nodes, graph, table, curve, timings, args, svg_path)
    print(curve.to_string(float_format="{:.3f}".format, index=False))
    print(f"\nwrote {json_path}" + (f", {svg_path}" if svg_path else "") + f" and {report} in {out.resolve()}")
    return out


def write_report(out: Path, model, ioi, nodes, graph, table, curve, timings, args, svg_path) -> Path:
    """report.md: the numbers of this run (all computed above; nothing is copied in)."""
    from sae.io import atomic_path

    whole = curve[curve.threshold == 0].iloc[0] if (curve.threshold == 0).any() else curve.iloc[-1]
    features = [(d.get("effect", 0.0), n, d) for n, d in graph.nodes(data=True) if d.get("kind") in ("feature", "error")]
    top = sorted(features, key=lambda item: -abs(item[0]))[:15]
    rows = [f"| `{n}` | {eff:+.3f} | {', '.join(map(repr, d.get('top_tokens') or [])) or '-'} |" for eff, n, d in top]
    dict_cols = [c for c in ("fvu", "l0", "dead_frac", "ce_recovered", "kl") if c in table]
    lines = [
        f"# IOI feature circuit: {model.name}",
        "",
        f"- prompts: {len(ioi)} (ABBA/BABA, ABC counterfactuals); metric m = logit(IO) - logit(S) at the end",
        f"- m(clean) = {float(nodes.metric_clean.mean()):.3f}, m(counterfactual) = {float(nodes.metric_cf.mean()):.3f}",
        f"- dictionaries: TopK k={args.k}, {args.expansion}x latents at {len(table)} sites, {args.tokens:,} training tokens each",
        f"- node effects: {nodes.method}; graph: top {args.top_k} nodes per site, edges from {min(args.edge_prompts, len(ioi))} prompts",
        f"- graph: {graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges"
        + (f"; rendered to `{svg_path.name}`" if svg_path else " (not rendered: graphviz `dot` missing)"),
        f"- faithfulness of the whole graph (mean ablation outside it): {whole.faithfulness:.3f}; "
        f"completeness: {whole.completeness:.3f}",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
        "## Strongest nodes",
        "",
        "| node | effect | top activating tokens |",
        "|---|---|---|",
        *rows,
        "",
        "## Faithfulness over node thresholds",
        "",
        "```",
        curve[["threshold", "n_nodes", "faithfulness", "completeness"]].to_string(index=False, float_format="{:.3f}".format),
        "```",
        "",
        "## Dictionaries (held-out evaluation)",
        "",
        "```",
        table[dict_cols].to_string(float_format="{:.3f}".format),
        "```",
        "",
    ]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    pd.set_option("display.width", 160)
    main()
