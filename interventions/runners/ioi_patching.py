"""IOI feature patching: how few features of each dictionary carry the counterfactual behaviour.

Cunningham et al. 2023 ("Sparse Autoencoders Find Highly Interpretable Features in Language
Models", arXiv 2309.08600, §5 and their `ioi_feature_ident.py`): at one site, patch a feature set
F from one IOI prompt into its counterfactual twin and ask how small F can be while the patched
run still matches the source run. The sub-rank-one patch keeps the error term and all other
features (`interventions.search`):

    x'_F = x_base + Σ_{i∈F} (c_src,i - c_base,i) f_i       at every position (all_positions=True)

Protocol here (stated in every report):

- data: `make_ioi(..., counterfactual="replace_io")`, the counterfactual of Cunningham et al.:
  the IO name replaced by a third name C (S kept), same template, place and object.
- direction "cf_to_clean" (default, the product card's x' = x̄ + Σ_i (c_i - c̄_i) f_i): base = the
  counterfactual prompt, source = target = the clean prompt. "clean_to_cf" is Cunningham et al.'s
  code exactly (base = clean, source = target = counterfactual); the two are the same experiment
  with the roles swapped.
- score: KL(patched run || target run) at the last token (the paper's direction), and the clean
  logit difference m = logit(IO) - logit(S) (Wang et al. 2022) with
  restored = (m(F) - m(base)) / (m(target) - m(base)): for cf_to_clean the fraction of the clean
  logit difference restored, for clean_to_cf the fraction of its drop reproduced.
- search: `search_feature_set` (greedy removal over an ascending tau grid, random visiting order,
  blocks of `batch` candidates per forward). To fit a CPU budget the candidates are restricted
  to the `candidates` features with the largest mean |c_src,i - c_base,i| ||f_i|| (their share
  of the activation difference), for every family alike; `--candidates 0` searches every feature
  whose code differs, as the paper does. The curve is completed by two computed endpoints:
  nothing patched (|F| = 0) and every candidate patched (|F| = candidates).
- edit size: mean ||x'_F - x_base||_2 over all patched positions.

Outputs (in `out_dir`): ioi_patching.csv (one row per curve point), ioi_patching_summary.csv
(one row per site and family), ioi_patching.png (KL vs |F|, restored fraction vs |F| and edit size
vs KL, one panel per site, one line per family), ioi_patching.md (the protocol and a table per site).

    python -m interventions.runners.ioi_patching                      # CPU defaults, a few minutes
    python -m interventions.runners.ioi_patching --n-prompts 16 --candidates 0 --taus paper
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
import torch

from interventions.spliced import dictionary_tensor
from sae import metrics as sae_metrics

from . import FAMILIES, add_family_arguments, check_families, families_from_args, log
from . import report as rp

DIRECTIONS = ("cf_to_clean", "clean_to_cf")
#: A coarse tau grid for CPU runs (the paper uses logspace(-5, 0, 50): --taus paper).
DEFAULT_TAUS = (0.01, 0.05, 0.2, 1.0)
KL_LEVELS = (0.5, 0.2, 0.1)          # fractions of KL(nothing patched)
RESTORED_LEVELS = (0.5, 0.8)
CURVE_COLUMNS = ["site", "family", "point", "tau", "n_features", "kl", "metric", "restored", "edit_l2",
                 "forwards", "features"]


def _level_name(prefix: str, level: float) -> str:
    return f"{prefix}_{round(100 * level)}"


def candidate_features(dictionary: Any, x_base: torch.Tensor, x_source: torch.Tensor, n: int | None) -> torch.Tensor:
    """The `n` feature ids (all that differ when n is None or 0) with the largest mean
    |c_src,i - c_base,i| ||f_i|| over positions, for activations x [batch, pos, d] -> [k] long."""
    with torch.no_grad():
        c_base = dictionary.encode(dictionary_tensor(dictionary, x_base))
        c_src = dictionary.encode(dictionary_tensor(dictionary, x_source))
        share = (c_src - c_base).abs().double().flatten(0, -2).mean(0).cpu()            # [n_latents]
        share = share * dictionary.W_dec.detach().double().norm(dim=-1).cpu()
    order = share.argsort(descending=True, stable=True)
    order = order[share[order] > 0]
    return (order if not n else order[:n]).cpu()


def delta_diagnostics(dictionary: Any, x_base: torch.Tensor, x_source: torch.Tensor, cand: torch.Tensor) -> dict:
    """How much of the source-minus-base activation difference a feature patch can carry, from
    activations x [batch, pos, d] and candidate ids [k] (sums over every token):

        fvu                  Σ||e||^2 / Σ||x - mean x||^2 on both prompts (positions >= 1)
        delta_in_error       ||Δe||^2 / ||Δx||^2: the part left in the error term, which the
                             sub-rank-one patch keeps from the base run (can exceed 1)
        delta_in_candidates  ||Σ_{i∈cand} Δc_i f_i||^2 / ||Δx||^2: the part the candidates carry"""
    with torch.no_grad():
        x = dictionary_tensor(dictionary, torch.cat([x_base, x_source]))              # [2 batch, pos, d]
        codes = dictionary.encode(x)
        err = (x - dictionary.decode(codes)).double().cpu()
        codes, x = codes.double().cpu(), x.double().cpu()
        b = x_base.shape[0]
        dx, de = x[b:] - x[:b], err[b:] - err[:b]
        W = dictionary.W_dec.detach().double().cpu()
        dcand = (codes[b:] - codes[:b])[..., cand] @ W[cand]
        xs, es = x[:, 1:], err[:, 1:]
        total = float(dx.pow(2).sum())
        return dict(fvu=float(sae_metrics.fvu(xs, xs - es)),
                    delta_in_error=float(de.pow(2).sum()) / total if total else math.nan,
                    delta_in_candidates=float(dcand.pow(2).sum()) / total if total else math.nan)


def _minimum(rows: pd.DataFrame, column: str, test) -> float:
    hit = rows[test(rows[column])]
    return float(hit.n_features.min()) if len(hit) else math.nan


def summarise(curves: pd.DataFrame, kl_levels: Sequence[float] = KL_LEVELS,
              restored_levels: Sequence[float] = RESTORED_LEVELS) -> pd.DataFrame:
    """One row per (site, family) from the curve rows: KL with nothing / every candidate patched,
    and the smallest |F| whose KL is <= level * KL(nothing patched) (`min_f_kl_<pct>`) or whose
    restored fraction is >= level (`min_f_restored_<pct>`); NaN where no point reaches it."""
    out = []
    for (site, fam), g in curves.groupby(["site", "family"], sort=False):
        none, every = g[g.point == "none"].iloc[0], g[g.point == "all"].iloc[0]
        row = dict(site=site, family=fam, n_latents=int(g.n_latents.iloc[0]), candidates=int(every.n_features),
                   kl_none=float(none.kl), kl_all=float(every.kl), restored_all=float(every.restored),
                   edit_l2_all=float(every.edit_l2), metric_base=float(none.metric),
                   metric_target=float(g.metric_target.iloc[0]), fvu=float(g.fvu.iloc[0]),
                   delta_in_error=float(g.delta_in_error.iloc[0]),
                   delta_in_candidates=float(g.delta_in_candidates.iloc[0]), forwards=int(g.forwards.sum()),
                   seconds=float(g.seconds.iloc[0]))
        for lvl in kl_levels:
            row[_level_name("min_f_kl", lvl)] = _minimum(g, "kl", lambda s: s <= lvl * float(none.kl))
        for lvl in restored_levels:
            row[_level_name("min_f_restored", lvl)] = _minimum(g, "restored", lambda s: s >= lvl)
        out.append(row)
    return pd.DataFrame(out)


def run_ioi_patching(model: Any, dictionaries_by_family: Mapping[str, Mapping[str, Any]], sites: Sequence[str], *,
                     n_prompts: int = 2, dataset: Any = None, candidates: int | None = 12,
                     taus: Sequence[float] = DEFAULT_TAUS, batch: int = 12, direction: str = "cf_to_clean",
                     order: str = "random", seed: int = 0, kl_levels: Sequence[float] = KL_LEVELS,
                     restored_levels: Sequence[float] = RESTORED_LEVELS, out_dir: str | Path | None = None,
                     notes: Sequence[str] = (), progress: bool = True) -> pd.DataFrame:
    """Run the feature-set search for every site and family (module docstring) -> curve rows.

    dictionaries_by_family: {family: {site: Dictionary}} (e.g. from `build_families`).
    dataset: an IOI dataset with counterfactuals (`input_ids`, `cf_input_ids`, `end_pos`,
    `answer_ids()`, slicing, as `make_ioi` returns); default `make_ioi(model.tokenizer,
    n_prompts, counterfactual="replace_io", seed=seed)`. candidates: features searched per site
    and family (None or 0: every feature whose code differs). taus, batch, order, seed: passed to
    `search_feature_set`. out_dir: where to write the CSVs, PNG and markdown (None: nothing written).

    Returns one row per curve point: site, family, point ("none" | "search" | "all"), tau,
    n_features, kl, metric (mean clean logit difference), restored, edit_l2, forwards, features,
    plus n_latents, n_candidates, metric_target, seconds (of the site and family). attrs:
    summary (DataFrame of `summarise`), dataset stats, files written, timings."""
    from interventions.patching import patch_features
    from interventions.search import search_feature_set
    from interventions.tasks import accuracy, kl_to_target, logit_diff, make_ioi
    from sae.harvesting import trace_sites
    from sae.sites import resolve_sites

    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    sites = list(sites)
    check_families(model, dictionaries_by_family, sites)
    t_start = time.perf_counter()
    if dataset is None:
        dataset = make_ioi(model.tokenizer, n_prompts, counterfactual="replace_io", seed=seed)
    if getattr(dataset, "counterfactual", "replace_io") is None:
        raise ValueError("the IOI dataset has no counterfactual prompts: build it with make_ioi(..., "
                         "counterfactual='replace_io')")
    clean, cf = dataset.input_ids.to(model.device), dataset.cf_input_ids.to(model.device)
    base, source = (cf, clean) if direction == "cf_to_clean" else (clean, cf)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, dataset)                                   # [batch] logit(IO) - logit(S)

    with torch.no_grad():
        target_logits = model.hf(input_ids=source).logits                   # [batch, pos, vocab]
        base_logits = model.hf(input_ids=base).logits
        acts = trace_sites(model, torch.cat([base, source]), None, resolve_sites(model, sites))
    n = base.shape[0]
    stats = dict(n_prompts=n, seq_len=int(base.shape[1]), direction=direction,
                 clean_logit_diff=float(metric(target_logits if direction == "cf_to_clean" else base_logits).mean()),
                 cf_logit_diff=float(metric(base_logits if direction == "cf_to_clean" else target_logits).mean()),
                 clean_accuracy=float(accuracy(target_logits if direction == "cf_to_clean" else base_logits, dataset)),
                 kl_base_target=float(kl_to_target(base_logits, target_logits, dataset.end_pos, reverse=True).mean()))
    log(f"IOI: {n} prompts of {stats['seq_len']} tokens, clean logit diff {stats['clean_logit_diff']:.2f}, "
        f"counterfactual {stats['cf_logit_diff']:.2f}, KL(base || target) {stats['kl_base_target']:.2f}", progress)

    rows: list[dict] = []
    for site in sites:
        for fam, dicts in dictionaries_by_family.items():
            t0 = time.perf_counter()
            d = dicts[site]
            cand = candidate_features(d, acts[site][:n], acts[site][n:], candidates)
            df = search_feature_set(model, {site: d}, site, base, source, target_logits, metric=metric, taus=taus,
                                    candidates=cand, batch=batch, order=order, seed=seed)
            a = df.attrs
            span = a["metric_target"] - a["metric_base"]
            restored = (lambda m: (m - a["metric_base"]) / span if span else math.nan)
            common = dict(site=site, family=fam, n_latents=int(d.n_latents), n_candidates=len(cand),
                          metric_target=a["metric_target"],
                          **delta_diagnostics(d, acts[site][:n], acts[site][n:], cand))
            rows.append(dict(common, point="none", tau=math.nan, n_features=0, kl=a["kl_none"],
                             metric=a["metric_base"], restored=0.0 if span else math.nan, edit_l2=0.0,
                             forwards=0, features=[]))
            for r in df.itertuples():
                rows.append(dict(common, point="search", tau=r.tau, n_features=r.n_features, kl=r.kl,
                                 metric=r.metric, restored=r.restored, edit_l2=r.edit_l2, forwards=r.forwards,
                                 features=list(r.features)))
            forwards = a["forwards"] - int(df.forwards.sum())           # the search's set-up forward
            if len(cand):
                run = patch_features(model, {site: d}, base, source, {site: cand.tolist()})
                kl_all = float(kl_to_target(run.logits, target_logits, dataset.end_pos, reverse=True).mean())
                m_all = float(metric(run.logits).mean())
                edit_all = float(run.edit_norm(site).mean())
                forwards += 1
            else:
                kl_all, m_all, edit_all = a["kl_none"], a["metric_base"], 0.0
            rows.append(dict(common, point="all", tau=math.nan, n_features=len(cand), kl=kl_all, metric=m_all,
                             restored=restored(m_all), edit_l2=edit_all, forwards=forwards, features=cand.tolist()))
            seconds = time.perf_counter() - t0
            for r in rows:
                if r["site"] == site and r["family"] == fam:
                    r["seconds"] = seconds
            best = df[df.kl <= 0.5 * a["kl_none"]].n_features
            log(f"{site} {fam:8s} {len(cand):3d} candidates: KL none {a['kl_none']:.3f}, all {kl_all:.3f}, "
                f"restored(all) {restored(m_all):.2f}; min |F| with KL <= 50% "
                f"{int(best.min()) if len(best) else '—'}; {a['forwards'] + 1} forwards, {seconds:.0f} s", progress)
    curves = pd.DataFrame(rows)
    curves = curves[CURVE_COLUMNS + [c for c in curves.columns if c not in CURVE_COLUMNS]]
    summary = summarise(curves, kl_levels, restored_levels)
    curves.attrs.update(summary=summary, stats=stats, kl_levels=tuple(kl_levels),
                        restored_levels=tuple(restored_levels), taus=list(taus), batch=batch, order=order,
                        candidates=candidates, seed=seed,
                        timings={"total_s": time.perf_counter() - t_start})
    if out_dir is not None:
        curves.attrs["files"] = write_outputs(curves, out_dir, model_name=model.name, notes=notes)
    return curves


# --- outputs -------------------------------------------------------------------------------------
SUMMARY_COLUMNS_FMT = {"n_latents": "d", "candidates": "d", "fvu": ".2f", "delta_in_error": ".2f",
                       "delta_in_candidates": ".2f", "kl_none": ".3f", "kl_all": ".3f", "restored_all": ".2f",
                       "edit_l2_all": ".3g", "forwards": "d", "seconds": ".0f"}


def _summary_columns(kl_levels, restored_levels) -> tuple[list[str], dict[str, str], dict[str, str]]:
    cols = ["family", "n_latents", "candidates", "fvu", "delta_in_error", "delta_in_candidates", "kl_none", "kl_all",
            "restored_all", "edit_l2_all"]
    heads = {"family": "family", "n_latents": "latents", "candidates": "candidates", "fvu": "FVU",
             "delta_in_error": "Δx in error", "delta_in_candidates": "Δx in cand.", "kl_none": "KL none",
             "kl_all": "KL all cand.", "restored_all": "restored all", "edit_l2_all": "edit L2 all",
             "forwards": "forwards", "seconds": "s"}
    fmts = dict(SUMMARY_COLUMNS_FMT)
    for lvl in kl_levels:
        c = _level_name("min_f_kl", lvl)
        cols.append(c), heads.__setitem__(c, f"min F: KL<={round(100 * lvl)}%"), fmts.__setitem__(c, "d")
    for lvl in restored_levels:
        c = _level_name("min_f_restored", lvl)
        cols.append(c), heads.__setitem__(c, f"min F: restored>={round(100 * lvl)}%"), fmts.__setitem__(c, "d")
    return cols + ["forwards", "seconds"], fmts, heads


def markdown_report(curves: pd.DataFrame, model_name: str = "", notes: Sequence[str] = ()) -> str:
    """The markdown report of `run_ioi_patching`'s result (protocol, dataset numbers, a table per site)."""
    a = curves.attrs
    s, summary = a["stats"], a["summary"]
    cols, fmts, heads = _summary_columns(a["kl_levels"], a["restored_levels"])
    direction = ("base = counterfactual prompt, source = target = clean prompt" if s["direction"] == "cf_to_clean"
                 else "base = clean prompt, source = target = counterfactual prompt (Cunningham et al.'s code)")
    chosen = (f"top {a['candidates']} features by mean |c_src - c_base| ||f_i|| per site and family"
              if a["candidates"] else "every feature whose code differs")
    lines = [
        "# IOI feature patching (Cunningham et al. 2023 protocol)", "",
        rp.bullet_list([
            f"model: {model_name}" if model_name else "model: (unnamed)",
            f"{s['n_prompts']} IOI prompts of {s['seq_len']} tokens, counterfactual = IO replaced by a third "
            f"name (replace_io); direction {s['direction']}: {direction}",
            f"clean logit diff logit(IO) - logit(S) = {s['clean_logit_diff']:.3f} (accuracy "
            f"{s['clean_accuracy']:.2f}); on the counterfactual prompt {s['cf_logit_diff']:.3f}; "
            f"KL(base || target) at the last token = {s['kl_base_target']:.3f}",
            "sub-rank-one patch x' = x_base + sum_F (c_src - c_base) f_i at every position, error kept; "
            "KL(patched || target) at the last token; restored = (m(F) - m(base)) / (m(target) - m(base)) "
            "for m = logit(IO) - logit(S)",
            f"candidates: {chosen}; taus {', '.join(format(t, 'g') for t in a['taus'])}; batch {a['batch']}; "
            f"order {a['order']}; seed {a['seed']}",
            "FVU: the dictionary's unexplained variance on these prompts (positions >= 1); Δx in error / "
            "Δx in cand.: the share ||.||^2 / ||Δx||^2 of the source-minus-base activation difference that sits "
            "in the error term (no feature patch can move it: the error is kept) / that the candidates carry",
            "min F columns: the smallest number of patched features among the computed curve points "
            "(nothing patched, the search's sets, every candidate) whose KL is at most the given share of "
            "KL(nothing patched), or whose restored fraction reaches the level; — where no point does",
            *notes,
        ]), ""]
    for site, g in summary.groupby("site", sort=False):
        lines += [f"## {site}", "", rp.markdown_table(g, cols, fmts, heads), ""]
    lines += [f"Full curves: ioi_patching.csv; figure: ioi_patching.png. Total time "
              f"{a['timings']['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(curves: pd.DataFrame, path: str | Path) -> Path:
    """KL vs |F|, restored vs |F| and edit L2 vs KL: one column per site, one line per family."""
    plt = rp.pyplot()
    sites = list(dict.fromkeys(curves.site))
    fig, axes = plt.subplots(3, len(sites), figsize=(4.2 * len(sites), 10), squeeze=False, layout="constrained")
    for j, site in enumerate(sites):
        for fam, g in curves[curves.site == site].groupby("family", sort=False):
            g = g.sort_values(["n_features", "kl"])
            axes[0, j].plot(g.n_features, g.kl, marker="o", label=fam)
            axes[1, j].plot(g.n_features, g.restored, marker="o", label=fam)
            axes[2, j].plot(g.kl, g.edit_l2, marker="o", label=fam)
        axes[0, j].set(title=site, xlabel="features patched |F|", ylabel="KL(patched || target)")
        axes[1, j].set(xlabel="features patched |F|", ylabel="logit diff restored")
        axes[2, j].set(xlabel="KL(patched || target)", ylabel="edit ||x' - x||_2")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=8)
    fig.suptitle("IOI sub-rank-one feature patching")
    return rp.save_figure(fig, path)


def write_outputs(curves: pd.DataFrame, out_dir: str | Path, model_name: str = "",
                  notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write ioi_patching.csv, ioi_patching_summary.csv, ioi_patching.png and ioi_patching.md."""
    return rp.write_outputs("ioi_patching", curves, out_dir, plot, markdown_report(curves, model_name, notes))


# --- command line ----------------------------------------------------------------------------------
def _taus(values: list[str]) -> list[float]:
    if values == ["paper"]:
        from interventions.search import DEFAULT_TAUS as PAPER

        return list(PAPER)
    try:
        return [float(v) for v in values]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--taus takes numbers or 'paper', got {values}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m interventions.runners.ioi_patching",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sites", nargs="+", default=["resid.3", "resid.6", "resid.9"], help="sites to patch at")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, help="dictionary families")
    p.add_argument("--n-prompts", type=int, default=2, help="IOI prompts (more: less noise, slower)")
    p.add_argument("--candidates", type=int, default=12,
                   help="features searched per site and family (0: every feature whose code differs, as the paper)")
    p.add_argument("--taus", nargs="+", default=[str(t) for t in DEFAULT_TAUS],
                   help="ascending thresholds, or 'paper' for logspace(-5, 0, 50)")
    p.add_argument("--batch", type=int, default=12, help="candidate removals judged per forward")
    p.add_argument("--direction", choices=DIRECTIONS, default="cf_to_clean", help="which prompt is patched")
    p.add_argument("--order", choices=("random", "ascending"), default="random", help="visiting order per tau")
    add_family_arguments(p, out="reports/ioi_patching")
    args = p.parse_args(argv)
    try:
        taus = _taus(args.taus)
        model, fams, info, notes = families_from_args(args)
        curves = run_ioi_patching(model, fams, args.sites, n_prompts=args.n_prompts,
                                  candidates=args.candidates or None, taus=taus, batch=args.batch,
                                  direction=args.direction, order=args.order, seed=args.seed, out_dir=args.out,
                                  notes=notes, progress=not args.quiet)
    except (ValueError, FileNotFoundError, OSError, ImportError, argparse.ArgumentTypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rp.print_outputs(curves)


if __name__ == "__main__":
    main()
