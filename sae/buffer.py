"""Shuffle a stream of activation chunks into training batches with bounded memory.

Harvested activations arrive in chunks whose rows are strongly correlated (consecutive tokens of
the same contexts). Training wants i.i.d.-looking batches, but the corpus does not fit in
memory. `ShufflingBuffer` keeps a fixed-capacity pool of rows and runs the usual half-refill
scheme (as in dictionary_learning's `ActivationBuffer`):

    fill the pool to `capacity` rows from the stream
    repeat: draw ~capacity/2 rows uniformly at random without replacement from the pool, emit
            them as batches, and refill their slots from the stream
    when the stream ends: emit everything left in random order

so each emitted batch mixes rows from many chunks. Peak memory is `capacity` rows plus one
incoming chunk, whatever the stream length; the stream's total length is never needed, so it
works on live harvests as well as on stores. A chunk is either a Tensor [n, ...] or a dict
{name: Tensor[n, ...]} whose entries are row-aligned (row r is the same token in every entry);
every entry of a dict gets the same row permutation, so alignment survives shuffling.

`rebatch` is the unshuffled counterpart: the same chunks cut into consecutive batches.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Union

import torch

Chunk = Union[torch.Tensor, dict[str, torch.Tensor]]

_PLAIN = "\0tensor"  # internal key under which a plain-Tensor stream travels


def _as_dict(chunk: Chunk, position: int) -> tuple[dict[str, torch.Tensor], bool, int]:
    """Normalise one chunk to {name: Tensor[n, ...]}; return (dict, was_plain, n_rows)."""
    plain = isinstance(chunk, torch.Tensor)
    parts = {_PLAIN: chunk} if plain else chunk
    if not isinstance(parts, dict) or not parts:
        raise TypeError(
            f"chunk {position} is a {type(chunk).__name__}; expected a Tensor [n, ...] or a non-empty "
            "dict {name: Tensor[n, ...]}"
        )
    rows = {}
    for name, t in parts.items():
        if not isinstance(t, torch.Tensor) or t.dim() < 1:
            what = type(t).__name__ if not isinstance(t, torch.Tensor) else "a 0-d tensor"
            label = "chunk" if plain else f"entry {name!r}"
            raise TypeError(f"chunk {position}: {label} is {what}; expected a Tensor with rows on dim 0")
        rows[name] = t.shape[0]
    if len(set(rows.values())) > 1:
        raise ValueError(
            f"chunk {position}: entries have different row counts {rows}; all entries of a chunk must be "
            "row-aligned (row r is the same token everywhere)"
        )
    return parts, plain, next(iter(rows.values()))


class ShufflingBuffer:
    """Iterable of shuffled batches drawn from a stream of chunks, holding at most `capacity`
    rows plus one incoming chunk.

    chunks: iterable of Tensor [n, ...] or dict {name: Tensor[n, ...]} (same keys, trailing shapes
        and dtypes in every chunk). Yields the same kind: Tensor [batch_size, ...] or a dict.
    capacity: pool size in rows (tokens), >= batch_size. Memory is about
        capacity * sum(row bytes of each entry); larger pools mix better.
    seed: the order is a deterministic function of (chunks, batch_size, capacity, seed).
    drop_last: drop the final short batch instead of yielding it.

    Batches are copies (safe to keep). `peak_rows` records the most rows ever held (pool plus the
    current incoming chunk), for checking the memory bound.
    """

    def __init__(self, chunks: Iterable[Chunk], batch_size: int, capacity: int = 65536, seed: int = 0,
                 drop_last: bool = False):
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(capacity, int) or capacity < batch_size:
            raise ValueError(
                f"capacity must be an int >= batch_size ({batch_size}), got {capacity!r}; a pool smaller "
                "than one batch cannot shuffle"
            )
        self.chunks = chunks
        self.batch_size = batch_size
        self.capacity = capacity
        self.seed = int(seed)
        self.drop_last = drop_last
        self.rows_held = 0  # rows currently in the pool plus the incoming chunk
        self.peak_rows = 0

    def _hold(self, n: int) -> None:
        self.rows_held = n
        self.peak_rows = max(self.peak_rows, n)

    def __iter__(self) -> Iterator[Chunk]:
        g = torch.Generator().manual_seed(self.seed)
        source = iter(self.chunks)
        bs, cap = self.batch_size, self.capacity
        # Rows emitted per round: about half the pool, a whole number of batches.
        per_round = max(bs, (cap // 2) // bs * bs)
        pool: dict[str, torch.Tensor] | None = None  # name -> [capacity, ...]
        plain = False
        n = 0  # live rows in pool[:, n]
        pending: dict[str, torch.Tensor] | None = None  # incoming chunk, partly copied
        pending_rows = offset = 0
        position = 0  # chunk counter, for error messages
        exhausted = False

        def out(idx: torch.Tensor) -> Chunk:  # idx [rows] -> batch (copies)
            batch = {k: v[idx] for k, v in pool.items()}
            return batch[_PLAIN] if plain else batch

        while True:
            # 1. Refill the pool to capacity from the stream.
            while n < cap and not exhausted:
                if pending is None:
                    try:
                        raw = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    parts, is_plain, rows = _as_dict(raw, position)
                    position += 1
                    if pool is None:
                        plain = is_plain
                        pool = {k: torch.empty((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
                                for k, t in parts.items()}
                    else:
                        self._check_matches(pool, parts, plain, is_plain, position - 1)
                    if rows == 0:
                        continue
                    pending, pending_rows, offset = parts, rows, 0
                    self._hold(n + pending_rows)
                take = min(cap - n, pending_rows - offset)
                for k, v in pool.items():
                    v[n:n + take] = pending[k][offset:offset + take]
                n += take
                offset += take
                if offset == pending_rows:
                    pending = None  # release the chunk
                    self._hold(n)
            if pool is None:  # empty stream
                return
            # 2. Stream over: emit what is left in random order.
            if exhausted:
                perm = torch.randperm(n, generator=g, device="cpu").to(_device(pool))  # [n]
                stop = n - n % bs if self.drop_last else n
                for i in range(0, stop, bs):
                    yield out(perm[i:i + bs])
                self._hold(0)
                return
            # 3. Pool full: emit `per_round` random rows, then compact the survivors into pool[:n - per_round].
            chosen = torch.randperm(n, generator=g, device="cpu")[:per_round]  # [per_round] distinct rows
            chosen = chosen.to(_device(pool))
            for i in range(0, per_round, bs):
                yield out(chosen[i:i + bs])
            keep_n = n - per_round
            holes = chosen[chosen < keep_n]  # emitted slots below the cut: fill them
            tail_kept = torch.ones(per_round, dtype=torch.bool, device=chosen.device)
            tail_kept[chosen[chosen >= keep_n] - keep_n] = False
            movers = torch.arange(keep_n, n, device=chosen.device)[tail_kept]  # survivors above the cut
            for v in pool.values():
                v[holes] = v[movers]
            n = keep_n
            self._hold(n + (pending_rows if pending is not None else 0))  # the whole chunk stays alive

    @staticmethod
    def _check_matches(pool, parts, plain, is_plain, position) -> None:
        """Every chunk must look like the first: same kind, keys, trailing shapes, dtypes."""
        if is_plain != plain:
            raise TypeError(f"chunk {position} is a {'Tensor' if is_plain else 'dict'} but the first chunk was a "
                            f"{'Tensor' if plain else 'dict'}; a stream must not mix the two")
        if parts.keys() != pool.keys():
            raise ValueError(f"chunk {position} has entries {sorted(parts)}; the first chunk had {sorted(pool)}")
        for k, t in parts.items():
            ref = pool[k]
            if t.shape[1:] != ref.shape[1:] or t.dtype != ref.dtype:
                label = "chunk" if plain else f"entry {k!r} of chunk {position}"
                raise ValueError(
                    f"{label} has row shape {tuple(t.shape[1:])} and dtype {t.dtype}; earlier chunks had "
                    f"{tuple(ref.shape[1:])} and {ref.dtype}"
                )


def _device(pool: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(pool.values())).device


def rebatch(chunks: Iterable[Chunk], batch_size: int, drop_last: bool = False) -> Iterator[Chunk]:
    """Cut a stream of chunks into consecutive batches of `batch_size` rows, in order (no shuffle).

    Holds one chunk plus fewer than `batch_size` leftover rows. Batches may be views of a chunk."""
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    left: dict[str, torch.Tensor] | None = None
    plain = False
    for position, raw in enumerate(chunks):
        parts, plain, rows = _as_dict(raw, position)
        if left is not None:
            if parts.keys() != left.keys():
                raise ValueError(f"chunk {position} has entries {sorted(parts)}; earlier chunks had {sorted(left)}")
            parts = {k: torch.cat([left[k], parts[k]]) for k in parts}
            rows += next(iter(left.values())).shape[0]
        full = rows - rows % batch_size
        for i in range(0, full, batch_size):
            batch = {k: v[i:i + batch_size] for k, v in parts.items()}
            yield batch[_PLAIN] if plain else batch
        left = {k: v[full:] for k, v in parts.items()}
    if left is not None and not drop_last and next(iter(left.values())).shape[0] > 0:
        yield left[_PLAIN] if plain else left
