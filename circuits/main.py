"""The main job: from the embedded default model and corpus to a rendered IOI feature circuit.

    python -m circuits.main [--out DIR] [--tokens N] [--prompts N] ...

1. `sae.cli.train_and_evaluate`: load SmolLM2, train (or reuse cached) TopK dictionaries on the
   residual stream after every layer, and print their evaluation table.
2. IOI prompts (ABBA/BABA, ABC counterfactuals; all templates align token for token) and the
   metric m = logit(IO) - logit(S) at the end.
3. Per-position node effects by integrated gradients (10 steps per site, Marks et al. 2024;
   `--method atp` for attribution patching) against the ABC counterfactual at the circuit sites
   (--circuit-sites: by default every sixth residual layer), edges between the top nodes of each
   site with batched vector-Jacobian products, the graph of those nodes.
4. Each feature node labelled with its top activating tokens in the corpus; a latent cache of
   the circuit's features, autointerp explanations with detection scores for the strongest
   (--explain), and a dashboard page per feature node, linked from the SVG (`circuits.interpret`).
5. Faithfulness (m(C) - m(empty)) / (m(M) - m(empty)) with every node outside the circuit
   mean-ablated (per position), for the rendered graph and as a curve over node thresholds for
   the top --curve-nodes nodes: how many nodes the behaviour needs.
6. circuit.json, circuit.svg, dashboards/ and report.md in the output directory, named at the end.

Every option is checked before anything loads: bad values exit with status 2 and one line naming
the option, the value and what is valid; site names (--sites, --circuit-sites) and sizes are
checked against the model's config read from its files (`sae.model_info`, well under a second),
and again on the loaded model before training when the config cannot be read (a hub id).

Why a subset of layers: every node outside the circuit is ablated at every circuit site, and the
losses compound from site to site. On the default model with all 30 residual sites even the top
3,000 per-position nodes keep almost none of the logit difference (faithfulness 0.004 with mean,
0.06 with counterfactual ablation); with the 5 default sites they keep ~90% of it
(`--circuit-sites 'resid.*'` reproduces the first).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

# torch, pandas and the model load only after every argument is checked (parse_args), so a typo
# fails in well under a second rather than after minutes of loading and training.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every option (exit status 2 and a one-line error for bad values): ranges
    here, cross-option and model-config checks in `sae.cli.check_args` and `check_circuit_sites`."""
    from sae.cli import add_train_arguments, check_args, int_at_least, site_list

    p = argparse.ArgumentParser(prog="python -m circuits.main", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--out", default="out/ioi-circuit", help="output directory (default out/ioi-circuit)")
    p.add_argument("--prompts", type=int_at_least(1), default=32, help="IOI prompts for node effects and faithfulness")
    p.add_argument("--edge-prompts", type=int_at_least(1), default=8, help="IOI prompts for edge weights (default 8)")
    p.add_argument("--circuit-sites", type=site_list, default=None,
                   help="comma-separated sites or globs the circuit runs through (default: every sixth "
                        "trained site, counting back from the last: resid.5,11,17,23,29 on SmolLM2)")
    p.add_argument("--top-k", type=int_at_least(1), default=8, help="nodes per site in the rendered graph (default 8)")
    p.add_argument("--curve-nodes", type=int_at_least(1), default=3000,
                   help="largest node budget of the faithfulness curve (default 3000)")
    p.add_argument("--method", default="ig", choices=["atp", "ig", "ig-input"],
                   help="node attribution method (default ig: on the default model its graphs keep more of the logit "
                        "difference than atp's, for ~70 s more)")
    p.add_argument("--reference", default="counterfactual", choices=["counterfactual", "mean"],
                   help="what a node is patched to in its effect: its value on the ABC counterfactual, or its "
                        "per-position mean over the prompts (the state faithfulness ablates to)")
    p.add_argument("--corpus-tokens", type=int_at_least(1), default=16_384,
                   help="corpus tokens for top-token labels, the latent cache and dashboards")
    p.add_argument("--explain", type=int_at_least(0), default=8,
                   help="strongest feature nodes explained and detection-scored by the model itself (default 8; 0: none)")
    args = p.parse_args(argv)
    if args.circuit_sites is not None and not args.circuit_sites:
        p.error("argument --circuit-sites: no site given; name sites or globs, e.g. 'resid.5,resid.11'")
    info = check_args(p, args)
    if info is not None and args.circuit_sites is not None:
        from sae.model_info import site_names
        try:
            check_circuit_sites(args.circuit_sites, args.sites, site_names(info["n_layers"]))
        except ValueError as e:
            p.error(f"argument --circuit-sites: {e}")
    return args


def check_circuit_sites(circuit: list[str], trained: str, valid: list[str]) -> list[str]:
    """The circuit sites (names or globs) among `valid`, each one a trained site (`trained`: the
    --sites name or glob); else a ValueError naming what is wrong and what is valid."""
    from sae.cli import site_list
    from sae.model_info import match_sites

    chosen = match_sites(circuit, valid)
    have = match_sites(site_list(trained), valid)
    missing = [s for s in chosen if s not in have]
    if missing:
        raise ValueError(f"{missing} have no dictionary: --sites {trained!r} trains only "
                         f"{have if len(have) <= 6 else have[:3] + ['...'] + have[-2:]}")
    return chosen


def run(args: argparse.Namespace) -> Path:
    from interventions.tasks import make_ioi, logit_diff
    from sae.cli import train_and_evaluate
    from sae.sites import resolve_sites

    from .attribution import node_effects
    from .edges import edge_effects
    from .dashboards import dashboard_links
    from .evaluate import faithfulness, faithfulness_curve
    from .interpret import interpret_circuit
    from .graph import build_graph, save_graph
    from .rendering import GraphvizNotFound, render
    from .top_tokens import annotate_top_tokens

    import torch

    t0 = time.perf_counter()
    out = Path(args.out)

    def sites_exist(model: Any) -> None:   # the exact check on the loaded model, before training
        if args.circuit_sites is not None:
            check_circuit_sites(args.circuit_sites, args.sites, [s.name for s in resolve_sites(model, "*")])
    model, corpus, trained, table = train_and_evaluate(args, before_training=sites_exist)
    timings = {"dictionaries": time.perf_counter() - t0}
    if args.circuit_sites is None:
        chosen = list(trained)[::-1][::6][::-1]
    else:
        chosen = check_circuit_sites(args.circuit_sites, args.sites, list(trained))
    dicts = {s: trained[s] for s in chosen}
    out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    ioi = make_ioi(model.tokenizer, n=args.prompts, counterfactual="ABC", seed=0)
    clean, cf = ioi.input_ids, (ioi.cf_input_ids if args.reference == "counterfactual" else "mean")

    def metric(logits, rows):  # [batch, pos, vocab] -> [batch]; rows: which prompts the batch holds
        return logit_diff(logits, ioi[rows])

    nodes = node_effects(model, dicts, clean, cf, metric, method=args.method, per_position=True)
    keep = nodes.select(top_k=args.top_k)
    n = min(args.edge_prompts, len(ioi))
    edges = edge_effects(model, dicts, clean[:n], cf if isinstance(cf, str) else cf[:n], metric, nodes=keep,
                         per_position=True)
    graph = build_graph(nodes, edges, top_k=args.top_k)
    every = torch.cat([e.abs().flatten() for e in nodes.effects.values()])
    budget = max(1, min(args.curve_nodes, int((every > 0).sum())))
    large = build_graph(nodes, node_threshold=float(every.topk(budget).values[-1]), include_inputs=False)
    timings["attribution"] = time.perf_counter() - t

    t = time.perf_counter()
    label_contexts = corpus.train[: max(1, args.corpus_tokens // corpus.ctx_len)]
    annotate_top_tokens(graph, model, dicts, label_contexts, n=5)
    timings["labels"] = time.perf_counter() - t

    t = time.perf_counter()
    interpret_circuit(graph, model, dicts, label_contexts, out / "dashboards", n_explain=args.explain,
                      cache_dir=out / "latent-cache", progress=not args.no_progress)
    timings["autointerp and dashboards"] = time.perf_counter() - t

    t = time.perf_counter()
    rendered = faithfulness(model, dicts, clean, metric, graph, ablation="mean", batch_size=max(64, len(ioi)))
    curve = faithfulness_curve(model, dicts, clean, metric, large, ablation="mean", batch_size=max(64, len(ioi)))
    timings["faithfulness"] = time.perf_counter() - t

    json_path = save_graph(graph, out / "circuit.json")
    svg_path = out / "circuit.svg"
    try:
        render(graph, svg_path, layout="positions", title=f"IOI circuit, {model.name}: logit(IO) - logit(S)",
               links=dashboard_links(graph, "dashboards/"))
    except GraphvizNotFound as e:
        print(f"warning: {e}\nthe graph is saved as {json_path}", file=sys.stderr)
        svg_path = None
    timings["total"] = time.perf_counter() - t0
    report = write_report(out, model, ioi, nodes, graph, rendered, table, curve, timings, args, svg_path)
    print(curve.to_string(float_format="{:.3f}".format, index=False))
    print(f"\nwrote {json_path}" + (f", {svg_path}" if svg_path else "") + f" and {report} in {out.resolve()}")
    return out


def nodes_needed(curve, level: float) -> str:
    """The smallest node count of the curve whose faithfulness reaches `level` (or "more than N")."""
    hit = curve[curve.faithfulness >= level]
    return f"{int(hit.n_nodes.min()):,}" if len(hit) else f"more than {int(curve.n_nodes.max()):,}"


def write_report(out: Path, model, ioi, nodes, graph, rendered, table, curve, timings, args, svg_path) -> Path:
    """report.md: the numbers of this run (all computed above; nothing is copied in)."""
    from sae.io import atomic_path

    def strongest(kind: str, n: int) -> list[str]:
        found = [(d.get("effect", 0.0), v, d) for v, d in graph.nodes(data=True) if d.get("kind") == kind]
        def interp(d):
            if kind != "feature":
                return ""
            det = d.get("detection")
            text = str(d.get("explanation", "-")).replace("|", "\\|")   # a | would split the table cell
            return (f" {text} | " + (f"{det:.2f}" if det is not None and det == det else "-")
                    + " |")
        return [f"| `{v}` | {eff:+.3f} | {', '.join(map(repr, d.get('top_tokens') or [])) or '-'} |{interp(d)}"
                for eff, v, d in sorted(found, key=lambda item: -abs(item[0]))[:n]]

    share = {k: sum(float(e[..., -1].abs().sum()) if k == "error" else float(e[..., :-1].abs().sum())
                    for e in nodes.effects.values()) for k in ("error", "feature")}
    dict_cols = [c for c in ("fvu", "l0", "dead_frac", "ce_recovered", "kl") if c in table]
    lines = [
        f"# IOI feature circuit: {model.name}",
        "",
        f"- prompts: {len(ioi)} (ABBA/BABA, ABC counterfactuals); metric m = logit(IO) - logit(S) at the end",
        f"- m(clean) = {float(nodes.metric_clean.mean()):.3f}, m({args.reference}) = {float(nodes.metric_cf.mean()):.3f}",
        f"- dictionaries: TopK k={args.k}, {args.expansion}x latents at {len(table)} sites, {args.tokens:,} training tokens each",
        f"- circuit sites: {', '.join(nodes.sites)}; node effects: {nodes.method} against the {args.reference}, "
        "per position",
        f"- graph: top {args.top_k} nodes per site, edges from {min(args.edge_prompts, len(ioi))} prompts: "
        f"{graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges"
        + (f"; rendered to `{svg_path.name}`" if svg_path else " (not rendered: graphviz `dot` missing)"),
        f"- faithfulness of the graph's {rendered.n_nodes} feature and error nodes (everything else mean-ablated "
        f"per position): {rendered.faithfulness:.3f}; completeness {rendered.completeness:.3f}",
        f"- nodes needed (curve below, nodes ranked by |effect|): faithfulness >= 0.5 with "
        f"{nodes_needed(curve, 0.5)} nodes, >= 0.8 with {nodes_needed(curve, 0.8)}",
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()),
        "",
        "## Strongest nodes",
        "",
        f"Error nodes hold {share['error'] / max(sum(share.values()), 1e-12):.0%} of the total |effect| at the "
        "circuit sites: what the dictionaries do not reconstruct carries much of the behaviour.",
        "",
        "Explanations come from the model itself (autointerp, Paulo et al. 2024); detection is the AUC of "
        "its P(yes) separating held-out activating windows from non-activating ones (0.5 = chance). "
        "Each feature's page is in `dashboards/`.",
        "",
        "| feature | effect | top activating tokens | explanation | detection |",
        "|---|---|---|---|---|",
        *strongest("feature", 15),
        "",
        "| error node | effect | |",
        "|---|---|---|",
        *strongest("error", 8),
        "",
        "## Faithfulness over node thresholds",
        "",
        f"The top {int(curve.n_nodes.max()):,} nodes by |effect|; m(M) = {curve.attrs['m_full']:.3f}, "
        f"m(empty) = {curve.attrs['m_empty']:.3f}.",
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
    import pandas as pd

    pd.set_option("display.width", 160)
    try:
        run(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
