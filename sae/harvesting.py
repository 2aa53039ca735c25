"""Harvest activations at many sites in one traced pass per batch.

For a batch of contexts the model runs under an nnsight trace that saves every requested site,
visiting sites in forward order, and stops the forward right after the deepest one: harvesting
`resid.L` costs about (L+1)/n_layers of a full forward. Padding positions (attention mask 0)
and, by default, the first position of every context are dropped, so each batch yields token rows

    {site: Tensor[n_tokens, width]}     (row r is the same token at every site)

Memory is bounded by one batch: the generator holds nothing between batches.
"""
from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from . import tracing
from .sites import Site, resolve_sites


def as_token_batch(model: Any, contexts: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [n, pos], from token ids, a `Corpus`, a dict with
    input_ids (and attention_mask), or a list of strings (tokenized with right padding)."""
    if hasattr(contexts, "train") and hasattr(contexts, "ctx_len"):  # a Corpus
        contexts = contexts.train
    if isinstance(contexts, str) or (isinstance(contexts, (list, tuple)) and contexts and isinstance(contexts[0], str)):
        contexts = model.tokenize(list(contexts) if not isinstance(contexts, str) else contexts)
    if isinstance(contexts, dict):
        ids = contexts["input_ids"]
        mask = contexts.get("attention_mask")
    elif isinstance(contexts, torch.Tensor):
        ids, mask = contexts, None
    else:
        raise TypeError(f"contexts must be token ids [n, pos], a Corpus, a dict with input_ids, or a list "
                        f"of strings; got {type(contexts).__name__}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"token ids must be a non-empty [n_contexts, pos] tensor; got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint16):
        raise TypeError(f"token ids must be an integer tensor; got {ids.dtype}")
    limit = model.max_positions
    if limit is not None and ids.shape[1] > limit:
        raise ValueError(f"contexts of {ids.shape[1]} tokens are longer than {model.name} allows "
                         f"({limit} positions); use ctx_len <= {limit}")
    vocab = model.hf.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab}) for {model.name}; got range "
                         f"[{int(ids.min())}, {int(ids.max())}] (tokenized with another tokenizer?)")
    if mask is None:
        mask = torch.ones_like(ids)
    return ids.long(), mask.long()


def token_mask(attention_mask: torch.Tensor, exclude_first: bool) -> torch.Tensor:
    """[batch, pos] bool: positions to keep (not padding; not position 0 if `exclude_first`).

    Position 0 holds BOS, or in models without a BOS convention (SmolLM2) an attention-sink
    token whose residual norm is ~100x the others (23,500 vs 150 at SmolLM2's resid.14); either
    way it would dominate a dictionary's reconstruction loss."""
    keep = attention_mask.bool().clone()
    if exclude_first:
        keep[:, 0] = False
    return keep


def harvest(model: Any, contexts: Any, sites: str | Iterable[str | Site], *, batch_size: int = 8,
            exclude_first: bool = True, with_tokens: bool = False, out_device: str | torch.device | None = "cpu",
            progress: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Yield {site: [n_tokens, width]} per batch of contexts (see module docstring).

    sites: names or glob patterns ("resid.*"). with_tokens: also yield "tokens" [n_tokens].
    out_device: where yielded tensors live (None keeps the model's device)."""
    chosen = resolve_sites(model, sites)
    ids, attention_mask = as_token_batch(model, contexts)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device
    bar = tqdm(total=int(attention_mask.sum()), unit="tok", unit_scale=True, desc="harvest",
               disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for lo in range(0, ids.shape[0], batch_size):
            batch_ids = ids[lo:lo + batch_size].to(device)
            batch_mask = attention_mask[lo:lo + batch_size].to(device)
            acts = trace_sites(model, batch_ids, batch_mask, chosen)
            keep = token_mask(batch_mask, exclude_first)
            rows = {name: a[keep].to(out_device) if out_device else a[keep] for name, a in acts.items()}
            if with_tokens:
                rows["tokens"] = batch_ids[keep].to(out_device or device)
            bar.update(int(batch_mask.sum()))
            bar.set_postfix_str(f"{bar.n / max(1e-9, time.perf_counter() - start):,.0f} tok/s", refresh=False)
            yield rows
    finally:
        bar.close()


def trace_sites(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                sites: list[Site]) -> dict[str, torch.Tensor]:
    """One no-grad traced forward that saves `sites` (in forward order) and stops after the
    deepest: {site: [batch, pos, width]}."""
    saved = {}
    with torch.no_grad():
        with tracing.trace(model.nn, input_ids, attention_mask) as tracer:
            for site in sites:
                saved[site.name] = tracing.save(site.read(model.nn))
            tracing.stop(tracer)
    return saved


def harvest_to_store(model: Any, contexts: Any, sites: str | Iterable[str | Site], directory: Any, *,
                     contexts_per_shard: int = 64, batch_size: int = 8, exclude_first: bool = True,
                     dtype: torch.dtype = torch.float32, with_tokens: bool = True,
                     progress: bool = True) -> "ActivationStore":
    """Harvest into an on-disk `ActivationStore`, one shard per `contexts_per_shard` contexts.

    Resumable: rerunning with the same arguments writes only the shards that are missing (an
    interrupted run loses at most the shard in flight); a finished store is returned as is.
    A store in `directory` built from other contexts or settings is refused, not mixed."""
    import hashlib
    import math

    from .store import ActivationStore

    chosen = resolve_sites(model, sites)
    ids, attention_mask = as_token_batch(model, contexts)
    digest = hashlib.sha256(ids.numpy().tobytes() + attention_mask.numpy().tobytes()).hexdigest()
    meta = {"model": model.name, "contexts": list(ids.shape), "contexts_sha256": digest,
            "contexts_per_shard": contexts_per_shard, "exclude_first": exclude_first}
    store = ActivationStore.create(directory, {s.name: s.width for s in chosen}, dtype=dtype,
                                   n_shards=math.ceil(ids.shape[0] / contexts_per_shard), meta=meta,
                                   tokens=with_tokens)
    todo = store.missing()
    total = sum(int(attention_mask[i * contexts_per_shard:(i + 1) * contexts_per_shard].sum()) for i in todo)
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"harvest -> {directory}",
              disable=not progress, dynamic_ncols=True) as bar:
        for index in todo:
            part = slice(index * contexts_per_shard, (index + 1) * contexts_per_shard)
            batches = list(harvest(model, {"input_ids": ids[part], "attention_mask": attention_mask[part]},
                                   chosen, batch_size=batch_size, exclude_first=exclude_first,
                                   with_tokens=with_tokens, progress=False))
            store.write_shard(index, {k: torch.cat([b[k] for b in batches]) for k in batches[0]})
            bar.update(int(attention_mask[part].sum()))
    store.finish()
    return store
