"""Write feature dashboards: one static HTML page (plus its Neuronpedia JSON) per feature and an
index page over every feature rendered into the same directory.

Layout of `out_dir`:
    index.html                 search / sort / paging over every feature below (all sites)
    <site>/f<i>.html           the dashboard of feature i of the dictionary at <site>
    <site>/f<i>.json           its Neuronpedia-compatible export (`circuits.dashboards.neuronpedia`)
    <site>/_index.json         that site's rows of the index (rendering another site keeps them)
Site names become directory names with characters outside [A-Za-z0-9._-] written as ~hex
(`site_dir`). Every file is written atomically (`sae.io.atomic_path`).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

from tqdm.auto import tqdm

from sae.io import atomic_path

from .data import decoder_cosines, feature_view, logit_effects, neuron_alignment, unit_rows, vocab_strings
from .index import index_page
from .neuronpedia import neuronpedia_json
from .page import feature_page
from .text import visible

INDEX = "index.html"
SITE_INDEX = "_index.json"


def site_dir(site: str) -> str:
    """The directory name of `site`: [A-Za-z0-9._-] kept, other characters as ~hex; never "."/".."."""
    name = re.sub(r"[^A-Za-z0-9._-]", lambda m: f"~{ord(m.group()):x}", str(site))
    return name if name.strip(".") else "~" + name


def page_path(site: str, feature: int) -> str:
    """Relative URL of a feature's page from the dashboard directory, e.g. "resid.3/f12.html"."""
    return f"{quote(site_dir(site))}/f{int(feature)}.html"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --- per feature (runs in worker processes when workers > 1) ----------------------------------------
_STATE: dict[str, Any] = {}     # per process: cache, site, vocab, W_dec, out, opts, linked


def _init(state: dict[str, Any] | None) -> None:
    global _STATE
    if state is not None:
        _STATE = state


def _init_worker(state: dict[str, Any] | None) -> None:
    """A worker process: one torch thread (OpenMP's pool does not survive fork: a forked child's
    first parallel region would wait forever on the parent's threads), then the state."""
    import torch

    torch.set_num_threads(1)
    _init(state)


def _one(job: tuple) -> tuple[list, list[tuple[str, str]]]:
    """One feature: (its index row, [(file path, text)] to write)."""
    f, logits, align, expl = job
    st = _STATE
    opts = st["opts"]
    ex = st["cache"].examples(st["site"], f)
    W_dec = st["W_dec"]
    others = [j for j, _ in list(ex.correlated)[:opts["n_correlated"]]]
    cos = decoder_cosines(W_dec, f, others) if W_dec is not None else {}
    view = feature_view(ex, st["vocab"], logits=logits, alignment=align, cosines=cos, explanation=expl,
                        n_top=opts["n_top"], per_quantile=opts["per_quantile"], n_correlated=opts["n_correlated"])
    linked = st["linked"]
    href = (lambda j: f"f{int(j)}.html" if int(j) in linked else None)
    files = [(f"{st['out']}/f{view.feature}.html", feature_page(view, feature_href=href))]
    if opts["json"]:
        files.append((f"{st['out']}/f{view.feature}.json", neuronpedia_json(view)))
    sig = lambda x: float(f"{x:.4g}")                                  # noqa: E731
    row = [view.feature, sig(view.density), sig(view.max_act), visible(view.top_token, token=True),
           visible(view.explanation or ""), {visible(k): sig(s) for k, s in view.scores.items()}]
    return row, files


# --- the index --------------------------------------------------------------------------------------
def write_index(out_dir: str | os.PathLike, *, title: str = "Feature dashboards") -> Path:
    """(Re)write out_dir/index.html from every <site>/_index.json below out_dir."""
    out_dir = Path(out_dir)
    sites, rows, scorers = [], [], set()
    for f in sorted(out_dir.glob(f"*/{SITE_INDEX}")):
        doc = json.loads(f.read_text(encoding="utf-8"))
        sites.append([doc["site"], f"{quote(f.parent.name)}/"])
        for r in doc["rows"]:
            scorers.update(r[5])
            rows.append((len(sites) - 1, r))
    names = sorted(scorers)
    data = {"sites": sites, "scorers": names,
            "rows": [[i, *r[:5], *[r[5].get(s) for s in names]] for i, r in rows]}
    path = out_dir / INDEX
    _write_text(path, index_page(data, title=title))
    return path


# --- the entry point --------------------------------------------------------------------------------
def render_dashboards(model: Any, dictionary: Any, cache: Any, out_dir: str | os.PathLike, *, site: str,
                      features: Sequence[int] | None = None,
                      explanations: Mapping[tuple[str, int], Mapping[str, Any]] | None = None,
                      tokenizer: Any = None, n_top: int | None = None, per_quantile: int | None = 5,
                      n_logits: int = 10, n_neurons: int = 5, n_correlated: int = 10, write_json: bool = True,
                      workers: int = 1, progress: bool = True, title: str = "Feature dashboards") -> dict[int, Path]:
    """Write the dashboards of `features` (default: every feature the cache holds at `site`) of
    `dictionary` (the one at `site`) into out_dir, then rebuild out_dir/index.html. Returns
    {feature: path of its page}.

    model: a `sae.Model` (logit effects and the tokenizer), or None for no logit effects (then
    pass `tokenizer`). dictionary: a `Dictionary` with `W_dec`, or None for no neuron alignment.
    cache: a `LatentCache` (or anything with `.sites`, `.features(site)`, `.examples(site, i)`).
    explanations: {(site, feature): {"explanation": str, "scores": {scorer: float}}}.
    n_top / per_quantile: contexts shown from the top group / each quantile bin (None: all).
    workers: processes that build and write pages (fork where the platform has it)."""
    if site not in list(cache.sites):
        raise ValueError(f"site {site!r} is not in the latent cache; it holds {list(cache.sites)}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("need a tokenizer to show tokens: pass a model (its .tokenizer) or tokenizer=...")
    cached = [int(f) for f in cache.features(site)]
    feats = cached if features is None else list(dict.fromkeys(int(f) for f in features))
    missing = sorted(set(feats) - set(cached))
    if missing:
        raise ValueError(f"features {missing[:10]}{'…' if len(missing) > 10 else ''} are not in the cache at "
                         f"{site!r} ({len(cached)} cached features); build the cache with them or leave them out")
    if dictionary is not None:
        bad = [f for f in feats if not 0 <= f < dictionary.n_latents]
        if bad:
            raise ValueError(f"features {bad[:10]} are outside the dictionary at {site!r} (n_latents = "
                             f"{dictionary.n_latents}); is this the dictionary the cache was built from?")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    explanations = explanations or {}
    out = Path(out_dir) / site_dir(site)
    out.mkdir(parents=True, exist_ok=True)

    size = None
    logits = {}
    if model is not None and dictionary is not None:
        logits = logit_effects(model, dictionary, site, feats, k=n_logits, progress=progress)
        size = model.hf.get_output_embeddings().weight.shape[0]
    vocab = vocab_strings(tokenizer, size)
    align = neuron_alignment(dictionary, feats, k=n_neurons) if dictionary is not None else {}
    W_dec = unit_rows(dictionary.W_dec) if dictionary is not None else None
    linked = frozenset(feats) | frozenset(int(p.stem[1:]) for p in out.glob("f*.html") if p.stem[1:].isdigit())
    opts = {"n_top": n_top, "per_quantile": per_quantile, "n_correlated": n_correlated, "json": write_json}
    state = {"cache": cache, "site": site, "vocab": vocab, "W_dec": W_dec, "out": str(out), "opts": opts,
             "linked": linked}
    jobs = ((f, logits.get(f), align.get(f), explanations.get((site, f))) for f in feats)

    rows, pending = [], []
    bar = tqdm(total=len(feats), desc=f"dashboards {site}", unit="page", disable=not progress)
    # fsync (atomic_path) waits on the disk and releases the GIL: files are written by threads
    # while the next pages are built.
    with ThreadPoolExecutor(max_workers=8) as writer:
        def done(result):
            row, files = result
            rows.append(row)
            pending.extend(writer.submit(_write_text, Path(path), text) for path, text in files)
            bar.update()

        try:
            if workers == 1 or len(feats) < 2:
                _init(state)
                for job in jobs:
                    done(_one(job))
            else:
                # fork: workers inherit the state (cache, vocabulary) without pickling it
                ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
                _init(state)
                init = None if ctx.get_start_method() == "fork" else state
                with ctx.Pool(workers, initializer=_init_worker, initargs=(init,)) as pool:
                    for result in pool.imap(_one, jobs, chunksize=8):
                        done(result)
        finally:
            _init({})
        for fut in pending:
            fut.result()                                    # re-raise any write error
    bar.close()

    index_file = out / SITE_INDEX
    old = {}
    if index_file.exists():
        old = {r[0]: r for r in json.loads(index_file.read_text(encoding="utf-8")).get("rows", [])}
    old.update({r[0]: r for r in rows})
    _write_text(index_file, json.dumps({"site": site, "rows": [old[k] for k in sorted(old)]}, ensure_ascii=False))
    write_index(out_dir, title=title)
    return {f: out / f"f{f}.html" for f in feats}
