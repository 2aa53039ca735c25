"""Top activating tokens of chosen features, to label circuit nodes.

For each requested (site, feature) the corpus is streamed through `sae.harvest` (one traced pass
per batch of contexts, stopping after the deepest site) and the site's dictionary, and a running
top-n of the feature's activations is kept:

    c_t = encode(x_t)[i]                    for every real token t of the corpus
    top_n(i) = the n tokens with the largest c_t > 0, with a window of context around each

plus firing statistics over all N real tokens: frequency = #{t : c_t > 0} / N, mean_activation
= Σ_t c_t / N and mean_when_active = Σ_t c_t / #{t : c_t > 0}. This is the "max activating
examples" view of Bricken et al. 2023 ("Towards Monosemanticity") used to name features.

Memory is bounded: per batch one [n_tokens, n_latents] code matrix; across batches only
[n_features, n] values and token indices (merge = top-n of the concatenation of the kept and the
new candidates). Contexts are token ids [n_contexts, pos] held by the caller anyway.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping

import networkx as nx
import torch

from interventions.spliced import dictionary_tensor
from sae.harvesting import as_token_batch, harvest, token_mask


@dataclass
class TopActivation:
    """One activating token: where it is, what it says, and how strongly the feature fired."""

    activation: float
    token: str            # the token's text
    context: str          # the window around it, the token marked as «token»
    row: int              # context index in the corpus
    position: int         # token position in that context


@dataclass
class FeatureTopTokens:
    """The top activations and firing statistics of one feature over a corpus."""

    site: str
    feature: int
    examples: list[TopActivation] = field(default_factory=list)   # strongest first, activation > 0
    n_tokens: int = 0                                               # real tokens seen
    frequency: float = 0.0                                          # fraction of tokens with c > 0
    mean_activation: float = 0.0                                    # mean of c over all tokens
    mean_when_active: float = 0.0                                   # mean of c where c > 0

    @property
    def tokens(self) -> list[str]:
        """The top tokens' texts, strongest first (duplicates kept: frequency is information)."""
        return [e.token for e in self.examples]


def _requested(features: Any, dictionaries: Mapping[str, Any]) -> dict[str, list[int]]:
    """{site: sorted feature ids} from a graph, a {site: ids} mapping or (site, feature) pairs."""
    out: dict[str, set[int]] = defaultdict(set)
    if isinstance(features, nx.Graph):
        for _, d in features.nodes(data=True):
            if d.get("kind") == "feature":
                out[d["site"]].add(int(d["feature"]))
    elif isinstance(features, Mapping):
        for site, ids in features.items():
            out[site].update(int(i) for i in ([ids] if isinstance(ids, int) else ids))
    else:
        for item in features:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError(f"features must be a circuit graph, a {{site: ids}} mapping or (site, "
                                f"feature) pairs; got the item {item!r}")
            out[item[0]].add(int(item[1]))
    if not out:
        raise ValueError("no features requested (a graph without feature nodes, or empty ids)")
    for site, ids in out.items():
        if site not in dictionaries:
            raise ValueError(f"features at {site!r} but no dictionary for it; dictionaries are given for "
                             f"{sorted(dictionaries)}")
        n = dictionaries[site].n_latents
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise ValueError(f"feature id {bad[0]} at {site} is out of range: the dictionary has {n} latents")
    return {s: sorted(ids) for s, ids in out.items()}


def top_activating_tokens(model: Any, dictionaries: Mapping[str, Any], corpus: Any, features: Any, *,
                          n: int = 10, context: tuple[int, int] = (8, 3), batch_size: int = 8,
                          exclude_first: bool = True, progress: bool = False
                          ) -> dict[tuple[str, int], FeatureTopTokens]:
    """{(site, feature): FeatureTopTokens} over `corpus` (see module docstring).

    features: a circuit graph (its feature nodes), {site: ids}, or (site, feature) pairs.
    corpus: whatever `sae.harvest` takes (a Corpus, token ids [n, pos], a tokenize dict, texts).
    n: examples kept per feature. context: tokens shown (before, after) each example.
    exclude_first: skip position 0 (BOS / attention sink), as harvesting does by default."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(context) != 2 or min(context) < 0:
        raise ValueError(f"context must be (tokens before, tokens after) >= 0, got {context!r}")
    wanted = _requested(features, dictionaries)
    ids, mask = as_token_batch(model, corpus)                       # [n_ctx, pos] each
    n_pos = ids.shape[1]
    state = {}
    for site, feats in wanted.items():
        k = len(feats)
        state[site] = dict(idx=torch.tensor(feats), vals=torch.full((k, n), -torch.inf),
                           where=torch.full((k, n), -1, dtype=torch.long), count=torch.zeros(k, dtype=torch.long),
                           total=torch.zeros(k, dtype=torch.float64))
    seen = 0
    batches = harvest(model, {"input_ids": ids, "attention_mask": mask}, list(wanted), batch_size=batch_size,
                      exclude_first=exclude_first, progress=progress)
    for b, rows in enumerate(batches):
        lo = b * batch_size
        keep = token_mask(mask[lo:lo + batch_size], exclude_first)   # the rows harvest yielded, in order
        r, p = keep.nonzero(as_tuple=True)
        flat = (lo + r) * n_pos + p                                  # [n_tokens] global token index
        seen += len(flat)
        for site, st in state.items():
            d = dictionaries[site]
            with torch.no_grad():
                codes = d.encode(dictionary_tensor(d, rows[site]))   # [n_tokens, n_latents]
                c = codes[:, st["idx"].to(codes.device)].float().cpu().T   # [k, n_tokens]
            if c.shape[1] != len(flat):
                raise RuntimeError(f"harvest returned {c.shape[1]} tokens for batch {b}, expected {len(flat)}")
            st["count"] += (c > 0).sum(1)
            st["total"] += c.double().sum(1)
            vals = torch.cat([st["vals"], c], 1)
            where = torch.cat([st["where"], flat.expand(len(c), -1)], 1)
            top = vals.topk(min(n, vals.shape[1]), dim=1)
            st["vals"], st["where"] = top.values, where.gather(1, top.indices)

    tok = model.tokenizer
    before, after = context
    out = {}
    for site, st in state.items():
        for j, feat in enumerate(st["idx"].tolist()):
            count, total = int(st["count"][j]), float(st["total"][j])
            res = FeatureTopTokens(site, feat, n_tokens=seen, frequency=count / max(seen, 1),
                                   mean_activation=total / max(seen, 1),
                                   mean_when_active=total / count if count else 0.0)
            for v, g in zip(st["vals"][j].tolist(), st["where"][j].tolist()):
                if g < 0 or not v > 0:
                    continue
                row, pos = divmod(g, n_pos)
                real = mask[row].bool()
                left = [int(t) for q, t in enumerate(ids[row, max(0, pos - before):pos].tolist(),
                                                     start=max(0, pos - before)) if real[q]]
                right = [int(t) for q, t in enumerate(ids[row, pos + 1:pos + 1 + after].tolist(), start=pos + 1)
                         if real[q]]
                token = tok.decode([int(ids[row, pos])])
                text = f"{tok.decode(left)}«{token}»{tok.decode(right)}"
                res.examples.append(TopActivation(v, token, text, row, pos))
            out[(site, feat)] = res
    return out


def label_graph(graph: nx.DiGraph, tops: Mapping[tuple[str, int], FeatureTopTokens], *, n: int = 5) -> nx.DiGraph:
    """Set `top_tokens` (the n strongest tokens' texts) on the graph's feature nodes from `tops`
    (as `top_activating_tokens` returns). The graph's own `activation` / `frequency` (over the
    prompts it was built from) are left alone; corpus statistics stay in `tops`. Modifies and
    returns `graph`."""
    for node, d in graph.nodes(data=True):
        if d.get("kind") != "feature":
            continue
        res = tops.get((d.get("site"), int(d["feature"])))
        if res is None:
            continue
        d["top_tokens"] = res.tokens[:n]
    return graph


def annotate_top_tokens(graph: nx.DiGraph, model: Any, dictionaries: Mapping[str, Any], corpus: Any, *,
                        n: int = 5, **options: Any) -> dict[tuple[str, int], FeatureTopTokens]:
    """Find the top activating tokens of every feature node of `graph` over `corpus` and label
    the nodes with them (`label_graph`). options: those of `top_activating_tokens` (its `n`
    defaults to this n). Returns the full results (with contexts) for reports; {} for a graph
    without feature nodes (nothing to label)."""
    if not any(d.get("kind") == "feature" for _, d in graph.nodes(data=True)):
        return {}
    options.setdefault("n", n)
    tops = top_activating_tokens(model, dictionaries, corpus, graph, **options)
    label_graph(graph, tops, n=n)
    return tops


__all__ = ["TopActivation", "FeatureTopTokens", "top_activating_tokens", "label_graph", "annotate_top_tokens"]
