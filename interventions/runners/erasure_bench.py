"""Gendered-pronoun erasure: SAE-feature ablation against LEACE, class-mean projection, PCA and neurons.

Cunningham et al. 2023 (arXiv 2309.08600 v1, their `erasure.py` and `plotting/erasure_plot.py`)
remove the model's ability to predict " he" / " she" after a gendered name by editing one site,
and plot prediction ability against the size of the edit and against the KL divergence it
causes. Here, at each site (`interventions.erasure` for the methods and the math):

- data: `make_pronouns` prompts ("When {NAME} woke up this morning,"), split by name: erasers
  are fitted and features chosen on the train split, everything is measured on held-out names.
- dictionary families (sae, pca, ica, neurons): the k = 1, 2, 4, ... features with the largest
  concept score (`select_concept_features`, default "mean_diff": ||f_i|| times the between-class
  spread of code i on the labelled train tokens) are set to their mean code over train tokens,
  x' = x + Σ_{i∈F} (mean_i - c_i) f_i (error term and other features kept).
- linear erasers fitted on the same labelled tokens: LEACE (Belrose et al. 2023) and the
  class-mean projection ("mean_diff", Cunningham et al.'s `mean` baseline).
- labelled tokens: every position from the name to the last token carries the prompt's gender
  (`fit_positions="name_to_end"`; "name": the name only; "end": the last token only). Every edit is applied at every
  position except position 0, which precedes the name (so holds no gender) and is SmolLM2's
  attention sink, with a norm ~100x the others' that would dominate any edit size.
- measured on held-out prompts: pronoun accuracy (logit of the right pronoun > the other's),
  the two-way probability of the right pronoun (Cunningham et al.'s "prediction ability"),
  mean ||x' - x||_2 over edited tokens; linear-probe accuracy on the edited activations (probe
  trained on clean train activations) and of a probe retrained on edited activations (LEACE's
  guarantee: chance); and on neutral text (held-out contexts of the embedded corpus):
  KL(p_clean || p_edited) per token (`collateral`, mean over all tokens, position 0 included
  with KL 0) and the cross-entropy increase.

Outputs (in `out_dir`): erasure_bench.csv (one row per site, method and k),
erasure_bench_summary.csv, erasure_bench.png (accuracy and two-way probability vs edit size
and vs KL, one row per site) and erasure_bench.md (protocol, a table per site).

    python -m interventions.runners.erasure_bench                     # CPU defaults, a few minutes
    python -m interventions.runners.erasure_bench --sites resid.2 resid.5 resid.10 --n-prompts 128
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

from interventions.erasure import edited_positions
from interventions.spliced import dictionary_tensor
from sae import metrics as sae_metrics

from . import FAMILIES, add_family_arguments, check_families, families_from_args, log
from . import report as rp

LINEAR = ("leace", "mean_diff")
FIT_POSITIONS = ("name_to_end", "name", "end")
DEFAULT_KS = (1, 2, 4, 8, 16, 32)
ACCURACY_LEVEL = 0.75
COLUMNS = ["site", "method", "family", "k", "accuracy", "two_way_probability", "logit_diff", "edit_l2",
           "edit_l2_neutral", "kl_neutral", "ce_increase", "probe_acc", "probe_acc_retrained", "chance",
           "seconds", "features"]


def class_ids(labels: torch.Tensor) -> torch.Tensor:
    """Labels of any integer values (e.g. +1 he / -1 she) -> class ids 0..C-1 [n]."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point():
        raise TypeError(f"labels must be integers, got {labels.dtype}")
    return labels.unique(return_inverse=True)[1]


def token_labels(dataset: Any, fit_positions: str) -> torch.Tensor:
    """Per-token class ids [batch, pos] (-1 = unlabelled) for a pronoun dataset: from the name
    through the last token ("name_to_end"), the name only ("name"), or the last token ("end")."""
    if fit_positions not in FIT_POSITIONS:
        raise ValueError(f"fit_positions must be one of {FIT_POSITIONS}, got {fit_positions!r}")
    ids, z, end = dataset.input_ids, class_ids(dataset.labels), dataset.end_pos
    pos = torch.arange(ids.shape[1])[None]                                   # [1, pos]
    if fit_positions == "end":
        start = end
    else:
        idx = getattr(dataset, "word_idx", {})
        if "NAME" not in idx:
            raise ValueError(f"fit_positions={fit_positions!r} needs dataset.word_idx['NAME'] (the name's "
                             f"position); use fit_positions='end'")
        start = idx["NAME"]
        end = start if fit_positions == "name" else end
    inside = (pos >= start[:, None]) & (pos <= end[:, None])
    return torch.where(inside, z[:, None], torch.full_like(ids, -1))


def fvu(d: Any, x: torch.Tensor) -> float:
    """Fraction of variance unexplained by dictionary d on activations x [n, d]."""
    with torch.no_grad():
        x = dictionary_tensor(d, x)
        return float(sae_metrics.fvu(x.double(), d.decode(d.encode(x)).double()))


def _mean_codes(d: Any, x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean code of dictionary d over the tokens `where` of x [batch, pos, d] -> [n_latents]."""
    with torch.no_grad():
        return d.encode(dictionary_tensor(d, x[where])).mean(0).cpu()


def run_erasure_bench(model: Any, dictionaries_by_family: Mapping[str, Mapping[str, Any]], sites: Sequence[str], *,
                      dataset: Any = None, n_prompts: int = 48, heldout_fraction: float = 0.5,
                      ks: Sequence[int] = DEFAULT_KS, linear: Sequence[str] = LINEAR, neutral: Any = None,
                      neutral_contexts: int = 3, neutral_len: int = 64, select: str = "mean_diff",
                      ablation: str = "mean", fit_positions: str = "name", seed: int = 0,
                      accuracy_level: float = ACCURACY_LEVEL, out_dir: str | Path | None = None,
                      notes: Sequence[str] = (), progress: bool = True) -> pd.DataFrame:
    """Erase gender at every site with every method (module docstring) -> one row per erasure.

    dictionaries_by_family: {family: {site: Dictionary}}; each family is ablated k features at a
    time for k in `ks` (k larger than the dictionary is skipped). linear: any of "leace",
    "mean_diff". dataset: a pronoun dataset (`split("train"/"heldout")`, `input_ids`, `labels`,
    `end_pos`, `word_idx["NAME"]`, `answer_ids()`; default `make_pronouns(model.tokenizer,
    n_prompts, heldout_fraction=heldout_fraction, seed=seed)`). neutral: token ids [batch, pos]
    of text unrelated to the concept (default `neutral_contexts` held-out contexts of
    `neutral_len` tokens from the embedded corpus). select / ablation: as in `erase`.

    Columns: site, method ("none", a family name, "leace", "mean_diff"), family, k (features,
    or the eraser's rank), accuracy, two_way_probability, logit_diff, edit_l2 (pronoun prompts),
    edit_l2_neutral, kl_neutral, ce_increase, probe_acc, probe_acc_retrained, chance, seconds,
    features (ablated ids). attrs: summary (per site and method), stats, files, timings."""
    from interventions.erasure import collateral, erase, feature_erasure, fit_probe, select_concept_features
    from interventions.tasks import accuracy, logit_diff, make_pronouns, two_way_probability
    from sae.harvesting import trace_sites
    from sae.sites import resolve_sites

    sites = list(sites)
    if dictionaries_by_family:
        check_families(model, dictionaries_by_family, sites)
    bad = [m for m in linear if m not in LINEAR]
    if bad:
        raise ValueError(f"unknown linear erasers {bad}; choose from {LINEAR}")
    if not dictionaries_by_family and not linear:
        raise ValueError("nothing to compare: pass dictionary families and/or linear erasers")
    ks = sorted({int(k) for k in ks})
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive feature counts, got {ks}")
    t_start = time.perf_counter()
    if dataset is None:
        dataset = make_pronouns(model.tokenizer, n_prompts, heldout_fraction=heldout_fraction, seed=seed)
    train, held = dataset.split("train"), dataset.split("heldout")
    if len(train) < 2 or len(held) < 2:
        raise ValueError(f"need at least 2 train and 2 held-out prompts, got {len(train)} and {len(held)}: "
                         f"raise n_prompts or change heldout_fraction")
    if neutral is None:
        from sae.corpus import load_corpus

        corpus = load_corpus(None, model.tokenizer, ctx_len=neutral_len, heldout_fraction=0.0,
                             max_tokens=(neutral_contexts + 1) * neutral_len, max_positions=model.max_positions)
        neutral = corpus.train[:neutral_contexts]
    dev = model.device
    tr_ids, he_ids, u_ids = train.input_ids.to(dev), held.input_ids.to(dev), torch.as_tensor(neutral).to(dev)
    tr_z, he_z = token_labels(train, fit_positions).to(dev), token_labels(held, fit_positions).to(dev)
    tr_where, he_where, u_where = edited_positions(tr_ids), edited_positions(he_ids), edited_positions(u_ids)
    site_objs = resolve_sites(model, sites)
    with torch.no_grad():
        clean_he = model.hf(input_ids=he_ids).logits                       # [n_held, pos, vocab]
        clean_u = model.hf(input_ids=u_ids).logits                         # [n_neutral, pos, vocab]
        acts_tr = trace_sites(model, tr_ids, None, site_objs)
        acts_he = trace_sites(model, he_ids, None, site_objs)
    stats = dict(n_train=len(train), n_heldout=len(held), seq_len=int(he_ids.shape[1]),
                 neutral_tokens=int(u_ids.numel()), clean_accuracy=float(accuracy(clean_he, held)),
                 clean_two_way=float(two_way_probability(clean_he, held).mean()),
                 clean_logit_diff=float(logit_diff(clean_he, held).mean()), fit_positions=fit_positions,
                 select=select, ablation=ablation)
    log(f"pronouns: {len(train)} train / {len(held)} held-out prompts; clean held-out accuracy "
        f"{stats['clean_accuracy']:.2f}, two-way probability {stats['clean_two_way']:.2f}", progress)
    lab_tr, lab_he = tr_z >= 0, he_z >= 0

    rows: list[dict] = []
    fvus: dict[tuple[str, str], float] = {}
    for site in sites:
        t_site = time.perf_counter()
        probe = fit_probe(acts_tr[site][lab_tr], tr_z[lab_tr])
        y_he = he_z[lab_he].cpu()
        chance = float(torch.bincount(y_he).max() / len(y_he))

        def measure(erasure, method: str, family: str, k: float, feats: list[int]) -> dict:
            t0 = time.perf_counter()
            run = erasure.run(model, he_ids, positions=he_where)
            run_tr = erasure.run(model, tr_ids, positions=tr_where, logits=False)
            run_u = erasure.run(model, u_ids, positions=u_where)
            retrained = fit_probe(run_tr.outputs[site][lab_tr], tr_z[lab_tr])
            x_he = run.outputs[site][lab_he]
            col = collateral(clean_u, run_u.logits, u_ids)
            return dict(site=site, method=method, family=family, k=k, accuracy=float(accuracy(run.logits, held)),
                        two_way_probability=float(two_way_probability(run.logits, held).mean()),
                        logit_diff=float(logit_diff(run.logits, held).mean()),
                        edit_l2=float(run.edit_norm(site)[he_where].mean()),
                        edit_l2_neutral=float(run_u.edit_norm(site)[u_where].mean()),
                        kl_neutral=col["kl_unrelated"], ce_increase=col["ce_increase"],
                        probe_acc=probe.accuracy(x_he, y_he), probe_acc_retrained=retrained.accuracy(x_he, y_he),
                        chance=chance, seconds=time.perf_counter() - t0, features=feats)

        rows.append(dict(site=site, method="none", family="", k=0, accuracy=stats["clean_accuracy"],
                         two_way_probability=stats["clean_two_way"], logit_diff=stats["clean_logit_diff"],
                         edit_l2=0.0, edit_l2_neutral=0.0, kl_neutral=0.0, ce_increase=0.0,
                         probe_acc=probe.accuracy(acts_he[site][lab_he], y_he), probe_acc_retrained=math.nan,
                         chance=chance, seconds=0.0, features=[]))
        for fam, dicts in (dictionaries_by_family or {}).items():
            d = dicts[site]
            fvus[(site, fam)] = fvu(d, acts_tr[site][tr_where])
            usable = [k for k in ks if k <= d.n_latents]
            if not usable:
                continue
            metric = (lambda logits: logit_diff(logits, train)) if select == "attribution" else None
            feats, _ = select_concept_features(model, {site: d}, site, tr_ids, tr_z, k=max(usable), method=select,
                                               metric=metric, ablation=ablation)
            values = (_mean_codes(d, acts_tr[site], tr_where)[feats] if ablation == "mean"
                      else torch.zeros(len(feats)))
            for k in usable:
                e = feature_erasure(d, site, feats[:k], values[:k])
                rows.append(measure(e, fam, fam, k, feats[:k].tolist()))
                r = rows[-1]
                log(f"{site} {fam:8s} k={k:3d}: accuracy {r['accuracy']:.2f}, two-way {r['two_way_probability']:.2f}, "
                    f"edit {r['edit_l2']:.2f}, KL neutral {r['kl_neutral']:.4f}", progress)
        for method in linear:
            e = erase(model, None, site, tr_ids, tr_z, method=method)
            rows.append(measure(e, method, "", float(e.eraser.rank), []))
            r = rows[-1]
            log(f"{site} {method:9s} rank {e.eraser.rank}: accuracy {r['accuracy']:.2f}, two-way "
                f"{r['two_way_probability']:.2f}, edit {r['edit_l2']:.2f}, KL neutral {r['kl_neutral']:.4f}, "
                f"retrained probe {r['probe_acc_retrained']:.2f} (chance {chance:.2f})", progress)
        log(f"{site}: {time.perf_counter() - t_site:.0f} s", progress)
    df = pd.DataFrame(rows)[COLUMNS]
    summary = summarise(df, accuracy_level)
    summary.insert(2, "fvu", [fvus.get((r.site, r.method), math.nan) for r in summary.itertuples()])
    df.attrs.update(summary=summary, fvus=fvus, stats=stats, ks=ks, linear=list(linear),
                    accuracy_level=accuracy_level, seed=seed,
                    timings={"total_s": time.perf_counter() - t_start})
    if out_dir is not None:
        df.attrs["files"] = write_outputs(df, out_dir, model_name=model.name, notes=notes)
    return df


def summarise(df: pd.DataFrame, accuracy_level: float = ACCURACY_LEVEL) -> pd.DataFrame:
    """Per site and method (erasing rows only): the lowest accuracy reached with its k, edit and
    KL, and the smallest edit L2 and KL among rows whose accuracy is <= accuracy_level (NaN if none)."""
    out = []
    for (site, method), g in df[df.method != "none"].groupby(["site", "method"], sort=False):
        low = g.loc[g.accuracy.idxmin()]
        hit = g[g.accuracy <= accuracy_level]
        out.append(dict(site=site, method=method, min_accuracy=float(low.accuracy), k_at_min=float(low.k),
                        edit_l2_at_min=float(low.edit_l2), kl_at_min=float(low.kl_neutral),
                        min_edit_at_level=float(hit.edit_l2.min()) if len(hit) else math.nan,
                        min_kl_at_level=float(hit.kl_neutral.min()) if len(hit) else math.nan))
    return pd.DataFrame(out, columns=["site", "method", "min_accuracy", "k_at_min", "edit_l2_at_min", "kl_at_min",
                                      "min_edit_at_level", "min_kl_at_level"])


# --- outputs -------------------------------------------------------------------------------------
ROW_FMT = {"k": "g", "accuracy": ".3f", "two_way_probability": ".3f", "logit_diff": ".3f", "edit_l2": ".3g",
           "kl_neutral": ".3g", "ce_increase": ".3g", "probe_acc": ".3f", "probe_acc_retrained": ".3f"}
ROW_HEAD = {"k": "k / rank", "two_way_probability": "two-way p", "logit_diff": "logit diff", "edit_l2": "edit L2",
            "kl_neutral": "KL neutral", "ce_increase": "CE increase", "probe_acc": "probe acc",
            "probe_acc_retrained": "retrained probe"}
ROW_COLS = ["method", "k", "accuracy", "two_way_probability", "logit_diff", "edit_l2", "kl_neutral", "ce_increase",
            "probe_acc", "probe_acc_retrained"]
SUM_FMT = {"fvu": ".2f", "min_accuracy": ".3f", "k_at_min": "g", "edit_l2_at_min": ".3g", "kl_at_min": ".3g",
           "min_edit_at_level": ".3g", "min_kl_at_level": ".3g"}


def markdown_report(df: pd.DataFrame, model_name: str = "", notes: Sequence[str] = ()) -> str:
    """The markdown report of `run_erasure_bench`'s result."""
    a, s = df.attrs, df.attrs["stats"]
    lvl = a["accuracy_level"]
    sum_head = {"fvu": "FVU", "min_accuracy": "lowest accuracy", "k_at_min": "at k", "edit_l2_at_min": "edit L2 there",
                "kl_at_min": "KL there", "min_edit_at_level": f"min edit L2 with acc<={lvl:g}",
                "min_kl_at_level": f"min KL with acc<={lvl:g}"}
    lines = [
        "# Gendered-pronoun erasure (Cunningham et al. 2023 v1 protocol)", "",
        rp.bullet_list([
            f"model: {model_name}" if model_name else "model: (unnamed)",
            f"{s['n_train']} train / {s['n_heldout']} held-out prompts of {s['seq_len']} tokens (split by name); "
            f"clean held-out accuracy {s['clean_accuracy']:.3f}, two-way probability {s['clean_two_way']:.3f}, "
            f"logit diff {s['clean_logit_diff']:.3f}",
            f"labelled tokens: {s['fit_positions']}; edits at every position but 0; features chosen by "
            f"{s['select']} on the train split and set to their {s['ablation']} code; k in "
            f"{', '.join(str(k) for k in a['ks'])}",
            f"edit L2: mean ||x' - x||_2 over edited tokens of the held-out prompts; KL neutral: mean "
            f"KL(p_clean || p_edited) per token over {s['neutral_tokens']} tokens of held-out corpus text",
            "probe acc: a logistic probe trained on clean train activations, tested on edited held-out ones; "
            "retrained probe: trained on edited train activations (chance = majority class)",
            "FVU: the dictionary's unexplained variance on the train prompts' tokens (positions >= 1); ablating "
            "features cannot touch what sits in the error term",
            *notes]), ""]
    for site, g in df.groupby("site", sort=False):
        lines += [f"## {site}", "", rp.markdown_table(g, ROW_COLS, ROW_FMT, ROW_HEAD), ""]
        sm = a["summary"][a["summary"].site == site]
        if len(sm):
            lines += [rp.markdown_table(sm, ["method", *SUM_FMT], SUM_FMT, sum_head), ""]
    lines += [f"Rows: erasure_bench.csv; figure: erasure_bench.png. Total time {a['timings']['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: str | Path) -> Path:
    """Accuracy and two-way probability vs edit L2 and vs KL on neutral text, a row per site."""
    plt = rp.pyplot()
    sites = list(dict.fromkeys(df.site))
    fig, axes = plt.subplots(len(sites), 4, figsize=(17, 3.8 * len(sites)), squeeze=False, layout="constrained")
    panels = [("edit_l2", "accuracy"), ("kl_neutral", "accuracy"), ("edit_l2", "two_way_probability"),
              ("kl_neutral", "two_way_probability")]
    for i, site in enumerate(sites):
        g = df[df.site == site]
        clean = g[g.method == "none"].iloc[0]
        for j, (x, y) in enumerate(panels):
            ax = axes[i, j]
            for method, h in g[g.method != "none"].groupby("method", sort=False):
                h = h.sort_values("k")
                ax.plot(h[x], h[y], marker="o" if len(h) > 1 else "*", markersize=5 if len(h) > 1 else 12,
                        label=method)
                if len(h) > 1:
                    for _, r in h.iterrows():
                        ax.annotate(f"{r.k:g}", (r[x], r[y]), fontsize=6, xytext=(2, 2), textcoords="offset points")
            ax.axhline(clean[y], color="gray", ls=":", label="no edit")
            ax.axhline(clean.chance if y == "accuracy" else 0.5, color="black", lw=0.5, ls="--", label="chance")
            edits = g[g.method != "none"][x]
            if x == "kl_neutral" and len(edits) and (edits > 0).all():
                ax.set_xscale("log")
            ax.set(xlabel={"edit_l2": "edit ||x' - x||_2", "kl_neutral": "KL on neutral text"}[x],
                   ylabel={"accuracy": "pronoun accuracy", "two_way_probability": "two-way probability"}[y],
                   title=site if j == 0 else None)
            ax.grid(alpha=0.3)
        axes[i, 0].legend(fontsize=7)
    fig.suptitle("Gendered-pronoun erasure")
    return rp.save_figure(fig, path)


def write_outputs(df: pd.DataFrame, out_dir: str | Path, model_name: str = "",
                  notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write erasure_bench.csv, erasure_bench_summary.csv, erasure_bench.png and erasure_bench.md."""
    return rp.write_outputs("erasure_bench", df, out_dir, plot, markdown_report(df, model_name, notes))


# --- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m interventions.runners.erasure_bench",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sites", nargs="+", default=["resid.9"], help="sites to erase at")
    p.add_argument("--families", nargs="*", default=["sae", "pca", "neurons"], choices=FAMILIES,
                   help="dictionary families whose features are ablated")
    p.add_argument("--linear", nargs="*", default=list(LINEAR), choices=LINEAR, help="linear erasers")
    p.add_argument("--ks", nargs="+", type=int, default=list(DEFAULT_KS), help="features ablated per family")
    p.add_argument("--n-prompts", type=int, default=48, help="pronoun prompts (even; half held out)")
    p.add_argument("--heldout-fraction", type=float, default=0.5, help="share of names (and prompts) held out")
    p.add_argument("--neutral-contexts", type=int, default=3, help="held-out corpus contexts for collateral KL")
    p.add_argument("--neutral-len", type=int, default=64, help="tokens per neutral context (<= 128)")
    p.add_argument("--select", choices=("mean_diff", "attribution"), default="mean_diff", help="feature ranking")
    p.add_argument("--ablation", choices=("mean", "zero"), default="mean", help="value ablated features are set to")
    p.add_argument("--fit-positions", choices=FIT_POSITIONS, default="name", help="labelled tokens")
    add_family_arguments(p, out="reports/erasure_bench")
    args = p.parse_args(argv)
    try:
        if not 1 <= args.neutral_len <= 128:
            raise ValueError(f"--neutral-len must be in 1..128 (the corpus contexts' length), got {args.neutral_len}")
        model, fams, info, notes = families_from_args(args)
        held = info["corpus"].heldout if "corpus" in info else None
        if held is not None and held.shape[0] < args.neutral_contexts:
            raise ValueError(f"only {held.shape[0]} held-out contexts for --neutral-contexts {args.neutral_contexts}")
        neutral = None if held is None else held[:args.neutral_contexts, :args.neutral_len]
        df = run_erasure_bench(model, fams, args.sites, n_prompts=args.n_prompts,
                               heldout_fraction=args.heldout_fraction, ks=args.ks, linear=args.linear,
                               neutral=neutral, neutral_contexts=args.neutral_contexts, neutral_len=args.neutral_len,
                               select=args.select, ablation=args.ablation, fit_positions=args.fit_positions,
                               seed=args.seed, out_dir=args.out, notes=notes, progress=not args.quiet)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    rp.print_outputs(df)


if __name__ == "__main__":
    main()
