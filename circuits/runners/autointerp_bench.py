"""Are SAE features more interpretable than neurons? Autointerp of five dictionary families.

Cunningham et al. 2023 (arXiv 2309.08600, §3) and Paulo et al. 2024 (arXiv 2410.13928, §4)
compare automatic-interpretability scores of SAE features with those of the neuron basis and
other baselines. Here, at the MLP hidden layer `mlp_hidden.L` of each chosen layer, the same
number N of features of each family is explained by the same explainer and scored by the same
scorers (`circuits.autointerp.explain`, `circuits.autointerp.scorers`):

    sae           TopK SAE (Gao et al. 2024) trained here on mlp_hidden.L with
                  `sae.pipeline.train_at_sites` (cached run directory: a rerun loads it)
    neurons       the neuron basis (`IdentityDictionary`)
    topk_neurons  neurons sparsified per token: only the k largest kept (`TopKNeuronDictionary`,
                  k = the SAE's k; Paulo et al.'s "top-k postprocessing")
    pca           principal components of harvested activations (`PCADictionary`)
    random        random unit directions with least-squares codes (`RandomDictionary`)

Activations are positive parts c = max(0, code). Neurons, PCA and random directions are dense
(nearly every 32-token window has c > 0 somewhere, so there would be no non-activating windows
to score against); each of their features is therefore thresholded at its own (1 - rho)
quantile on the harvested sample, c' = c [c > tau_i], so it fires on a fraction rho of tokens;
rho = the median density of the SAE's features at that layer ("auto"), or given. Features are
drawn uniformly (seeded) among those firing on the sample, 3N candidates per family and layer;
the first N whose windows in the latent cache (`circuits.autointerp.cache`, one pass per family
over held-out contexts) split (`split_examples`) into an explainer half with an activating
window and a disjoint scorer half with activating and non-activating windows are scored.

Outputs in --out: autointerp_bench.csv (one row per feature: explanation, every score, seconds),
autointerp_bench_summary.csv (mean, sem, n per family, layer and scorer), autointerp_spearman.csv
(Spearman rank correlation between scorers over all scored features), autointerp_bench.png
(violins per family, one panel per scorer), autointerp_bench.md, and scores.jsonl (each scored
feature as it is done: an interrupted run rerun with the same arguments skips those; SAEs and
latent caches are cached too).

    python -m circuits.runners.autointerp_bench                    # default size, < 30 min on 2 cores
    python -m circuits.runners.autointerp_bench --features 32 --layers 3 9 15 21
    python -m circuits.runners.autointerp_bench --server http://127.0.0.1:8080/v1   # OpenAI-compatible
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from interventions.runners import harvest_sample, log
from interventions.runners import report as rp
from sae.dictionary import Dictionary

from ..autointerp.cache import build_latent_cache, dictionary_digest

FAMILIES = ("sae", "neurons", "topk_neurons", "pca", "random")
DENSE = ("neurons", "pca", "random")
DEFAULT_SCORERS = ("detection", "fuzzing", "embedding")
DEFAULT_LAYERS = (4, 12)
CTX_LEN = 128
CACHE_SETTINGS = dict(window=32, n_top=10, n_quantiles=5, per_quantile=4, n_random=10, n_negatives=20,
                      n_hard_negatives=0, n_correlated=0)


class Thresholded(Dictionary):
    """A dictionary whose codes are zeroed below a per-feature threshold: c'_i = c_i [c_i > tau_i]
    (tau [n_latents]); decoding and W_dec are the base dictionary's."""

    architecture = "thresholded"
    unit_norm_decoder = False

    def __init__(self, base: Dictionary, tau: torch.Tensor):
        super().__init__(base.d_in, base.n_latents)
        self.base = base
        self.register_buffer("tau", tau.detach().float().clone())   # [n_latents]

    @property
    def W_dec(self) -> torch.Tensor:
        return self.base.W_dec

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base.encode(x)
        return torch.where(c > self.tau.to(c), c, torch.zeros_like(c))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.base.decode(codes)

    def config(self) -> dict[str, Any]:
        return {"d_in": self.d_in, "n_latents": self.n_latents, "base": self.base.architecture}


def density_thresholds(codes: torch.Tensor, rho: float) -> torch.Tensor:
    """tau [n_latents] with #{t: c_t > tau} ~ rho * n per column of codes [n, n_latents]
    (the (1 - rho) quantile, never below 0)."""
    if not 0 < rho < 1:
        raise ValueError(f"density must be in (0, 1), got {rho}")
    return torch.quantile(codes.float(), 1 - rho, dim=0).clamp_min(0)


def load_bench_corpus(model: Any, sae_tokens: int, cache_contexts: int, extra_tokens: int = 0) -> Any:
    """Embedded corpus: train part for SAEs (and the baseline sample), `cache_contexts` held out."""
    from sae.corpus import load_corpus

    n_train = -(-(sae_tokens + extra_tokens) // (CTX_LEN - 1)) + 1
    n_total = n_train + cache_contexts
    return load_corpus(None, model.tokenizer, ctx_len=CTX_LEN, max_tokens=n_total * CTX_LEN,
                       heldout_fraction=cache_contexts / n_total, max_positions=model.max_positions)


def train_saes(model: Any, sites: list[str], corpus: Any, *, sae_tokens: int, k: int, expansion: int,
               sae_dir: str | Path | None, progress: bool) -> tuple[dict[str, Dictionary], str]:
    """TopK SAEs at `sites`, trained with `sae.pipeline.train_at_sites` into a cached run
    directory (default: named by model, sites and budget), loaded when already trained."""
    from interventions.runners import get_saes
    from sae.io import cache_dir

    name = f"{model.name}-autointerp-{'+'.join(sites)}-topk{k}x{expansion}-{sae_tokens}"
    directory = sae_dir or cache_dir("runs", name)
    return get_saes(model, sites, corpus=corpus, sae_tokens=sae_tokens, k=k, expansion=expansion,
                    directory=directory, use_main_job=False, progress=progress)


def build_dictionaries(model: Any, sites: list[str], families: Sequence[str], corpus: Any, *, sae_tokens: int,
                       k: int, expansion: int, sae_dir: str | Path | None, baseline_tokens: int,
                       density: float | str, seed: int, progress: bool
                       ) -> tuple[dict[str, dict[str, Dictionary]], dict[str, torch.Tensor], dict[str, Any]]:
    """({family: {site: Dictionary}}, harvested sample {site: [n, d]}, info) as the module docstring says."""
    from sae.baselines import TopKNeuronDictionary, fit_baseline

    info: dict[str, Any] = {"densities": {}}
    out: dict[str, dict[str, Dictionary]] = {}
    if "sae" in families:
        out["sae"], info["sae_source"] = train_saes(model, sites, corpus, sae_tokens=sae_tokens, k=k,
                                                    expansion=expansion, sae_dir=sae_dir, progress=progress)
    sample = harvest_sample(model, corpus.train, sites, baseline_tokens)
    for site in sites:
        x = sample[site]
        rho = density
        if rho == "auto":
            if "sae" in out:
                with torch.no_grad():
                    dens = (out["sae"][site].encode(x) > 0).float().mean(0)
                rho = float(dens[dens > 0].median()) if (dens > 0).any() else 0.01
            else:
                rho = 0.01
        info["densities"][site] = rho
        for fam in families:
            if fam == "sae":
                continue
            if fam == "neurons":
                d = fit_baseline("identity", x)
            elif fam == "topk_neurons":
                d = TopKNeuronDictionary(x.shape[1], k=min(k, x.shape[1]))
            elif fam == "pca":
                d = fit_baseline("pca", x, n_latents=min(x.shape[1], x.shape[0] - 1))
            elif fam == "random":
                d = fit_baseline("random", x, n_latents=x.shape[1], seed=seed)
            else:
                raise ValueError(f"unknown family {fam!r}; choose from {FAMILIES}")
            if fam in DENSE:
                with torch.no_grad():
                    d = Thresholded(d, density_thresholds(d.encode(x).clamp_min(0), rho))
            out.setdefault(fam, {})[site] = d
    return {f: out[f] for f in families}, sample, info


def candidate_features(d: Dictionary, x: torch.Tensor, n: int, seed: int) -> list[int]:
    """Up to n latents drawn uniformly (seeded) among those that fire on >= 2 tokens of x."""
    with torch.no_grad():
        alive = ((d.encode(x) > 0).sum(0) >= 2).nonzero().flatten()
    g = torch.Generator().manual_seed(int(seed))
    return alive[torch.randperm(alive.numel(), generator=g)[:n]].tolist()


def _score(name: str, fn: Any, explanation: str, test: Any, model: Any, client: Any, tokenizer: Any,
           dictionary: Dictionary, n_score: int, seed: int) -> float:
    if name == "intervention":
        return fn(explanation, test, model, tokenizer, dictionary=dictionary, client=client).score
    kw = {"seed": seed}
    if name in ("detection", "fuzzing", "embedding", "surprisal", "simulation"):
        kw.update(n_activating=n_score, n_negatives=n_score)
    return fn(explanation, test, client, tokenizer, **kw).score


def run_autointerp_bench(model: Any, client: Any, *, layers: Sequence[int] = DEFAULT_LAYERS,
                         families: Sequence[str] = FAMILIES, scorers: Sequence[str] = DEFAULT_SCORERS,
                         features: int = 3, sae_tokens: int = 65_536, k: int = 32, expansion: int = 4,
                         sae_dir: str | Path | None = None, baseline_tokens: int = 4096, cache_contexts: int = 96,
                         density: float | str = "auto", n_examples: int = 6, n_score: int = 5, explain_tokens: int = 32,
                         seed: int = 0,
                         out_dir: str | Path = "out/autointerp-bench", corpus: Any = None, progress: bool = True,
                         write: bool = True) -> pd.DataFrame:
    """One row per scored feature (module docstring); df.attrs: summary, spearman, info, files."""
    from ..autointerp.explain import explain
    from ..autointerp.scorers import SCORERS, split_examples

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    families, scorers, layers = list(families), list(scorers), [int(l) for l in layers]
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"unknown families {bad}; choose from {FAMILIES}")
    bad = [s for s in scorers if s not in SCORERS]
    if bad or not scorers:
        raise ValueError(f"unknown scorers {bad}; choose from {sorted(SCORERS)}")
    if features < 1:
        raise ValueError(f"features must be >= 1, got {features}")
    sites = [f"mlp_hidden.{l}" for l in layers]
    for s in sites:
        if s not in model.sites:
            raise ValueError(f"layer {s.split('.')[1]} is not a layer of {model.name} (it has {model.n_layers} layers)")
    corpus = corpus if corpus is not None else load_bench_corpus(model, sae_tokens if "sae" in families else 0,
                                                                  cache_contexts, baseline_tokens)
    t = time.perf_counter()
    dicts, sample, info = build_dictionaries(model, sites, families, corpus, sae_tokens=sae_tokens, k=k,
                                             expansion=expansion, sae_dir=sae_dir, baseline_tokens=baseline_tokens,
                                             density=density, seed=seed, progress=progress)
    timings["dictionaries_s"] = time.perf_counter() - t
    log(f"dictionaries ready in {timings['dictionaries_s']:.0f} s; densities {info['densities']}", progress)
    out_dir = Path(out_dir)
    contexts = corpus.heldout
    caches, tags = {}, {}
    t = time.perf_counter()
    for fam in families:
        feats = {s: candidate_features(dicts[fam][s], sample[s], 3 * features, seed) for s in sites}
        empty = [s for s, f in feats.items() if not f]
        if empty:
            raise ValueError(f"family {fam!r}: no feature fires on the harvested sample at {empty}; "
                             "raise --baseline-tokens or --sae-tokens")
        tag = hashlib.sha256(json.dumps({"feats": feats, "settings": CACHE_SETTINGS, "seed": seed,
                                         "d": {s: dictionary_digest(dicts[fam][s]) for s in sites}},
                                        sort_keys=True).encode()).hexdigest()[:10]
        caches[fam] = build_latent_cache(model, dicts[fam], contexts, out_dir / "caches" / f"{fam}-{tag}",
                                         features=feats, seed=seed, progress=progress, **CACHE_SETTINGS)
        tags[fam] = tag
    timings["caches_s"] = time.perf_counter() - t
    log(f"latent caches built in {timings['caches_s']:.0f} s", progress)
    rows = []
    scores_file = out_dir / "scores.jsonl"          # one line per scored feature: a rerun skips them
    done = _read_jsonl(scores_file) if write else {}
    client_id = f"{type(client).__name__}:{getattr(client, 'base_url', '')}"
    t = time.perf_counter()
    for fam in families:
        for site, layer in zip(sites, layers):
            cache, chosen = caches[fam], []
            for f in cache.features(site):
                if len(chosen) == features:
                    break
                ex = cache.examples(site, f)
                train, test = split_examples(ex, seed)
                if train.activating and test.activating and test.negatives:   # both halves usable
                    chosen.append((ex, train, test))
            for ex, train, test in chosen:
                key = json.dumps([tags[fam], site, ex.feature, scorers, n_examples, n_score, explain_tokens, seed,
                                  client_id])
                if key in done:                        # scored by an earlier (interrupted) run
                    rows.append(done[key])
                    continue
                t0 = time.perf_counter()
                e = explain(train, client, model.tokenizer, n_examples=n_examples, max_tokens=explain_tokens,
                            seed=seed)
                row = {"family": fam, "site": site, "layer": layer, "feature": ex.feature, "density": ex.density,
                       "max_act": ex.max_act, "explanation": e.text, "explanation_ok": e.ok,
                       "raw": e.raw.strip()[:200], "explain_s": time.perf_counter() - t0, "error": ""}
                for name in scorers:
                    t1 = time.perf_counter()
                    score = math.nan
                    if e.ok:
                        try:
                            score = _score(name, SCORERS[name], e.text, test, model, client, model.tokenizer,
                                           dicts[fam][site], n_score, seed)
                        except ValueError as err:      # too few windows for this scorer: recorded, not dropped
                            row["error"] += f"{name}: {err}; "
                    row[name] = float(score)
                    row[f"{name}_s"] = time.perf_counter() - t1
                rows.append(row)
                if write:
                    _append_jsonl(scores_file, {"key": key, "row": row})
                log(f"{fam} {site} f{ex.feature}: {e.text or '(unparseable) ' + e.raw[:60]!r} "
                    + " ".join(f"{n}={row[n]:.2f}" for n in scorers), progress)
    timings["explain_and_score_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    columns = ["family", "site", "layer", "feature", "density", "max_act", "explanation", "explanation_ok", *scorers,
               "explain_s", *(f"{n}_s" for n in scorers), "raw", "error"]
    df = pd.DataFrame(rows, columns=columns)
    df.attrs.update(summary=summarise(df, scorers), spearman=spearman_table(df, scorers),
                    info={"model": model.name, "layers": layers, "features": features, "scorers": scorers,
                          "families": families, "timings": timings, "densities": info["densities"],
                          "sae_source": info.get("sae_source", ""), "cache_contexts": int(contexts.shape[0]),
                          "n_tokens": caches[families[0]].n_tokens, "k": k, "expansion": expansion,
                          "sae_tokens": sae_tokens, "seed": seed, "n_examples": n_examples, "n_score": n_score,
                          "explain_tokens": explain_tokens, "client": client_id})
    if write:
        df.attrs["files"] = write_outputs(df, out_dir)
    return df


def _read_jsonl(path: Path) -> dict[str, dict]:
    """{key: row} from the scores file of an earlier run (a truncated last line is ignored)."""
    out = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[item["key"]] = item["row"]
    return out


def _append_jsonl(path: Path, item: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(item) + "\n")
        f.flush()


def summarise(df: pd.DataFrame, scorers: Sequence[str]) -> pd.DataFrame:
    """Mean, standard error and count of each scorer per (family, layer) and per family over
    all layers (layer "all"); plus the share of explanations that parsed."""
    rows = []
    groups = [((fam, str(layer)), part) for (fam, layer), part in df.groupby(["family", "layer"], sort=False)]
    groups += [((fam, "all"), part) for fam, part in df.groupby("family", sort=False)]
    for (fam, layer), part in groups:
        row = {"family": fam, "layer": layer, "n_features": len(part),
               "explained": float(part["explanation_ok"].mean()) if len(part) else math.nan}
        for s in scorers:
            v = part[s].dropna()
            row[s] = float(v.mean()) if len(v) else math.nan
            row[f"{s}_sem"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
            row[f"{s}_n"] = int(len(v))
        rows.append(row)
    return pd.DataFrame(rows)


def spearman_table(df: pd.DataFrame, scorers: Sequence[str]) -> pd.DataFrame:
    """Spearman rank correlation between every pair of scorers over the features both scored
    (NaN with fewer than 3 features or a constant column)."""
    from scipy.stats import spearmanr

    rows = []
    for i, a in enumerate(scorers):
        for b in scorers[i + 1:]:
            both = df[[a, b]].dropna()
            varies = len(both) >= 3 and both[a].nunique() > 1 and both[b].nunique() > 1
            rho = float(spearmanr(both[a], both[b]).statistic) if varies else math.nan   # undefined otherwise
            rows.append({"scorer_a": a, "scorer_b": b, "spearman": rho, "n": len(both)})
    return pd.DataFrame(rows, columns=["scorer_a", "scorer_b", "spearman", "n"])


def compare_families(a: pd.Series, b: pd.Series, scorer: str) -> str:
    """"SAE x vs neurons y: difference d ± se (verdict, n = ...)" from two `summarise` rows;
    the verdict is "SAE higher" / "SAE lower" when |d| > 2 se, else "within noise"."""
    d = a[scorer] - b[scorer]
    se = math.sqrt(a[f"{scorer}_sem"] ** 2 + b[f"{scorer}_sem"] ** 2)
    verdict = ("within noise" if math.isnan(se) or abs(d) <= 2 * se else
               "SAE higher" if d > 0 else "SAE lower")
    return (f"SAE {rp.fmt(a[scorer])} vs neurons {rp.fmt(b[scorer])}: difference {rp.fmt(d)} ± {rp.fmt(se, '.2g')} "
            f"({verdict}, n = {int(a[f'{scorer}_n'])} and {int(b[f'{scorer}_n'])})")


def _rate(seconds: pd.Series) -> str:
    m = float(seconds.mean()) if len(seconds) else math.nan
    return f"{m:.1f} s ({60 / m:.1f}/min)" if m > 0 else rp.MISSING


def markdown_report(df: pd.DataFrame) -> str:
    info, summary, sp = df.attrs["info"], df.attrs["summary"], df.attrs["spearman"]
    scorers = info["scorers"]
    lines = [f"# Autointerp: SAE features vs neurons vs PCA vs random ({info['model']})", "",
             rp.bullet_list([
                 f"sites: {', '.join(f'mlp_hidden.{l}' for l in info['layers'])}; up to {info['features']} features "
                 f"per family and layer, drawn uniformly among features that fire",
                 f"families: {', '.join(info['families'])}; SAE: {info['sae_source'] or 'not run'}",
                 "dense families (neurons, pca, random) thresholded per feature to density "
                 + ", ".join(f"{s}: {r:.3g}" for s, r in info["densities"].items()),
                 f"latent cache: {info['cache_contexts']} held-out contexts ({info['n_tokens']:,} tokens), "
                 "32-token windows",
                 f"explainer and scorers: the same client ({info['client'].rstrip(':')}); the explainer sees "
                 f"{info['n_examples']} windows of the train half (at most {info['explain_tokens']} tokens answered), "
                 f"each scorer {info['n_score']} activating + {info['n_score']} non-activating windows of the test half; "
                 f"scorers: {', '.join(scorers)} (each scorer's headline score); seed {info['seed']}",
                 f"time: {rp.timings_line(info['timings'])}",
                 "seconds per feature (features per minute): "
                 + ", ".join(f"{name} {_rate(df[col])}" for name, col in
                             [("explain", "explain_s"), *((s, f"{s}_s") for s in scorers)])]), "",
             "## Mean score per family and layer (± standard error)", ""]
    table = summary.copy()
    for s in scorers:
        table[s] = [f"{rp.fmt(m)} ± {rp.fmt(e, '.2g')}" if not math.isnan(e) else rp.fmt(m)
                    for m, e in zip(table[s], table[f"{s}_sem"])]
    lines += [rp.markdown_table(table, ["family", "layer", "n_features", "explained", *scorers],
                                formats={"explained": ".2f"}), ""]
    overall = summary[summary.layer == "all"].set_index("family")
    if {"sae", "neurons"} <= set(overall.index):
        lines += ["## SAE features vs neurons", ""]
        lines += ["Difference of the means ± its standard error sqrt(sem_a² + sem_b²); a difference within "
                  "two standard errors is not told apart from chance (`--features N` for more).", ""]
        for s in scorers:
            lines.append(f"- {s}: {compare_families(overall.loc['sae'], overall.loc['neurons'], s)}")
        lines.append("")
    lines += ["## Spearman correlation between scorers (all scored features)", "",
              rp.markdown_table(sp, ["scorer_a", "scorer_b", "spearman", "n"]) if len(sp) else "(one scorer only)", "",
              "## Explanations (first three per family)", ""]
    for fam, part in df.groupby("family", sort=False):
        for _, r in part.head(3).iterrows():
            text = r.explanation if r.explanation_ok else f"(unparseable: {r.raw[:80]!r})"
            lines.append(f"- {fam} {r.site} f{r.feature}: {text}")
    failed = df[df.error != ""]
    if len(failed):
        lines += ["", f"{len(failed)} features had a scorer fail (see the `error` column of the CSV)."]
    return "\n".join(lines) + "\n"


def plot(df: pd.DataFrame, path: str | Path) -> Path:
    """One panel per scorer: a violin of the scores of each family (all layers), means marked."""
    plt = rp.pyplot()
    scorers, families = df.attrs["info"]["scorers"], df.attrs["info"]["families"]
    fig, axes = plt.subplots(1, len(scorers), figsize=(3.2 * len(scorers) + 1, 3.6), squeeze=False)
    for ax, s in zip(axes[0], scorers):
        data = [df.loc[df.family == f, s].dropna().to_numpy() for f in families]
        pos = [i for i, d in enumerate(data) if len(d) >= 2 and d.std() > 0]
        if pos:
            ax.violinplot([data[i] for i in pos], positions=pos, showmeans=True, showextrema=False)
        for i, d in enumerate(data):
            ax.scatter([i] * len(d), d, s=8, color="k", alpha=0.5, zorder=3)
        ax.set_xticks(range(len(families)), families, rotation=30, ha="right")
        ax.set_title(s)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("score")
    return rp.save_figure(fig, path)


def write_outputs(df: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    files = rp.write_outputs("autointerp_bench", df, out_dir, plot, markdown_report(df))
    files["spearman_csv"] = rp.write_csv(df.attrs["spearman"], Path(out_dir) / "autointerp_spearman.csv")
    return files


def make_client(model: Any, server: str | None, server_model: str = "default") -> Any:
    """The explainer/scorer client: an OpenAI-compatible server at `server`, else the model itself."""
    from ..autointerp.clients import LocalClient, OpenAIClient

    return OpenAIClient(server, model=server_model) if server else LocalClient(model)


def main(argv: list[str] | None = None) -> None:
    from ..autointerp.scorers import SCORERS

    p = argparse.ArgumentParser(prog="python -m circuits.runners.autointerp_bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="local model directory or hub id (default: embedded SmolLM2-135M)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--layers", nargs="+", type=int, default=list(DEFAULT_LAYERS), help="mlp_hidden layers")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--scorers", nargs="+", default=list(DEFAULT_SCORERS), choices=sorted(SCORERS))
    p.add_argument("--features", type=int, default=3, help="features per family and layer")
    p.add_argument("--sae-tokens", type=int, default=65_536, help="SAE training tokens per site")
    p.add_argument("--sae-dir", default=None, help="train_at_sites run directory to load SAEs from (or train into)")
    p.add_argument("--k", type=int, default=32, help="TopK active latents (SAE and topk_neurons)")
    p.add_argument("--expansion", type=int, default=4, help="SAE latents per dimension")
    p.add_argument("--baseline-tokens", type=int, default=4096, help="harvested tokens for PCA / thresholds")
    p.add_argument("--cache-contexts", type=int, default=96, help="held-out 128-token contexts in the latent cache")
    p.add_argument("--density", default="auto", help="firing density of the thresholded dense families, or 'auto'")
    p.add_argument("--n-examples", type=int, default=6, help="windows shown to the explainer")
    p.add_argument("--n-score", type=int, default=5, help="activating and non-activating windows per scorer")
    p.add_argument("--explain-tokens", type=int, default=32, help="most tokens the explainer may generate")
    p.add_argument("--server", default=None, help="OpenAI-compatible base URL for the explainer/scorer")
    p.add_argument("--server-model", default="default", help="model name sent to the server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/autointerp-bench", help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    from sae.models import load_model

    model = load_model(args.model, device=args.device)
    density = args.density if args.density == "auto" else float(args.density)
    df = run_autointerp_bench(model, make_client(model, args.server, args.server_model), layers=args.layers,
                              families=args.families, scorers=args.scorers, features=args.features,
                              sae_tokens=args.sae_tokens, k=args.k, expansion=args.expansion, sae_dir=args.sae_dir,
                              baseline_tokens=args.baseline_tokens, cache_contexts=args.cache_contexts,
                              density=density, n_examples=args.n_examples, n_score=args.n_score,
                              explain_tokens=args.explain_tokens, seed=args.seed,
                              out_dir=args.out, progress=not args.quiet)
    rp.print_outputs(df)


if __name__ == "__main__":
    main()
