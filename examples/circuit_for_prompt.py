"""The sparse feature circuit behind one prediction: your prompt, a counterfactual with the same
number of tokens, and the metric logit(answer) - logit(wrong) at the last position; the graph is
written as JSON and rendered to SVG.

    python examples/circuit_for_prompt.py \\
        --clean "When Mary and John went to the store, John gave a drink to" \\
        --cf "When Mary and John went to the store, Mary gave a drink to" --answer " Mary" --wrong " John"

Dictionaries: those of a finished main job (`python -m circuits.main` or `python -m sae.cli train`) in the cache when it covers
--sites, else TopK SAEs trained here on --train-tokens per site (kept in --out; small budgets give
rough features).
"""
import argparse
import json
from pathlib import Path

from circuits import GraphvizNotFound, annotate_top_tokens, build_graph, edge_effects, node_effects, render, save_graph
from sae import load, load_corpus, load_model
from sae.io import cache_dir
from sae.pipeline import train_at_sites
from sae.training import TrainConfig

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--clean", default="When Mary and John went to the store, John gave a drink to")
p.add_argument("--cf", default="When Mary and John went to the store, Mary gave a drink to")
p.add_argument("--answer", default=" Mary", help="the token the clean prompt should predict")
p.add_argument("--wrong", default=" John", help="the competing token")
p.add_argument("--sites", nargs="+", default=["resid.4", "resid.10", "resid.16", "resid.22"])
p.add_argument("--top-k", type=int, default=8, help="nodes kept per site")
p.add_argument("--train-tokens", type=int, default=65_536, help="training tokens per site when no trained SAEs are cached")
p.add_argument("--corpus-tokens", type=int, default=16_384, help="corpus tokens searched for top activating tokens")
p.add_argument("--out", default="circuit_out")
args = p.parse_args()
(out := Path(args.out)).mkdir(parents=True, exist_ok=True)

model = load_model()
clean, cf = model.tokenize(args.clean)["input_ids"], model.tokenize(args.cf)["input_ids"]
pieces = lambda ids: [model.tokenizer.decode([int(t)]) for t in ids]  # noqa: E731
if clean.shape != cf.shape:
    raise SystemExit(f"clean and counterfactual must have the same number of tokens (nodes are compared position by "
                     f"position), got {clean.shape[1]} and {cf.shape[1]}:\n  clean {pieces(clean[0])}\n  cf    {pieces(cf[0])}")
ids = {w: model.tokenizer.encode(w, add_special_tokens=False) for w in (args.answer, args.wrong)}
for w, t in ids.items():
    if len(t) != 1:
        raise SystemExit(f"{w!r} is {len(t)} tokens {pieces(t)}; the metric needs one token (mind the leading space)")
a, w = ids[args.answer][0], ids[args.wrong][0]
metric = lambda logits: logits[:, -1, a] - logits[:, -1, w]  # noqa: E731  [batch, pos, vocab] -> [batch]
differ = (clean != cf)[0].nonzero()[:, 0].tolist()
print(f"clean and counterfactual: {clean.shape[1]} tokens each, differing at positions {differ} "
      f"({[pieces(clean[0])[q] for q in differ]} -> {[pieces(cf[0])[q] for q in differ]})")

corpus = load_corpus(None, model.tokenizer, ctx_len=128, max_tokens=int(1.1 * args.train_tokens) + args.corpus_tokens,
                     heldout_fraction=args.corpus_tokens / (int(1.1 * args.train_tokens) + args.corpus_tokens))
found = [(r.parent, json.loads(r.read_text())) for r in sorted(cache_dir("runs").glob(f"{model.name}-*/run.json"))]
runs = [d for d, info in found if info.get("complete") and set(args.sites) <= set(info["key"]["sites"])]
if runs:  # a finished main job covering the sites
    dicts = {s: load(runs[0] / s.replace(".", "_")) for s in args.sites}
    print(f"using the trained dictionaries of {runs[0]}")
else:
    print(f"no cached main-job dictionaries for {args.sites}: training TopK SAEs on {args.train_tokens} tokens per site")
    cfg = TrainConfig(total_tokens=args.train_tokens, batch_size=min(1024, args.train_tokens),
                      calibration_tokens=min(4096, args.train_tokens), progress=False)
    dicts = train_at_sites(model, corpus.train, args.sites, k=32, expansion=4, cfg=cfg, directory=out / "dictionaries",
                           progress=False)

# Node effects by attribution patching, then edges between the top nodes of each site (Marks et al. 2024).
nodes = node_effects(model, dicts, clean, cf, metric)
edges = edge_effects(model, dicts, clean, cf, metric, nodes=nodes.select(top_k=args.top_k),
                     rows_per_backward=8)  # few rows per backward: faster on CPU (benchmarks/circuits_bench.py)
graph = build_graph(nodes, edges, top_k=args.top_k)
annotate_top_tokens(graph, model, dicts, corpus.heldout, n=5)
save_graph(graph, out / "circuit.json")
print(f"wrote {out / 'circuit.json'} ({graph.number_of_nodes()} nodes, {graph.number_of_edges()} edges)")
try:
    print(f"wrote {render(graph, out / 'circuit.svg', title=f'{args.answer!r} vs {args.wrong!r}')}")
except GraphvizNotFound as e:
    print(f"no SVG: {e}")

top = sorted((v for v, k in graph.nodes(data="kind") if k in ("feature", "error")),
             key=lambda v: -abs(graph.nodes[v]["effect"]))
print(f"\n{'node':<20} {'effect':>8}  top activating tokens (metric: clean {graph.graph['metric_clean']:.3f}, "
      f"counterfactual {graph.graph['metric_cf']:.3f})")
for v in top[:12]:
    print(f"{v:<20} {graph.nodes[v]['effect']:>8.3f}  {graph.nodes[v].get('top_tokens', '')}")
