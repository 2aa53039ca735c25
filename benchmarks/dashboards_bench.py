"""Dashboards benchmark: pages per second, index size and how fast the index opens in a browser.

Writes the dashboards of --features features (default 2,304: one SmolLM2 residual TopK SAE of the
main job, 4 x 576 latents) with `circuits.dashboards.render_dashboards`, once per --workers value
(default 1 and 2, on this 2-core machine), and prints

  pages/s         features rendered per second of wall time, everything included: logit effects of
                  every feature over the 49,152-token vocabulary (W_U (γ ⊙ W_dec[i]), batched), the
                  vocabulary decode, building and atomically writing each HTML page and its
                  Neuronpedia JSON, and the index
                  (logit effects and the vocabulary decode are also timed apart)
  page size       mean bytes of a feature page and of its JSON
  index size      bytes of index.html (all features' rows inline as one JSON document)
  index load      in headless Chromium (when installed): time from navigation start until the
                  index's script has parsed the data and drawn the first 100 rows (performance.now()
                  recorded by the page), and the wall time of driver.get; the median of --loads
                  loads; then the time to re-sort all rows by a column (median of 5 clicks)

The latent cache is synthetic but of the cache's default size: per feature 20 top windows and 10
quantile bins of 10 windows, 32 tokens each (3,840 tokens), five nonzero activations per window,
random token ids of the real vocabulary (drawn from a pool of 4,096 such windows), 10 correlated features, an explanation and two scores.
The dictionary is a random-init TopK SAE (the cost does not depend on its training). The model is
SmolLM2-135M-Instruct (`sae.load_model()`), or with --tiny a random 2-layer Llama (258 tokens).
Timings on the shared machine drift; the worker counts are compared within one run.

    python benchmarks/dashboards_bench.py                 # 2,304 features, workers 1 and 2
    python benchmarks/dashboards_bench.py --tiny --features 256
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from circuits.autointerp.examples import FeatureExamples, Window
from circuits.dashboards import render_dashboards

SITE = "resid.12"


class SyntheticCache:
    """The LatentCache interface over generated FeatureExamples of the cache's default size. Each
    feature draws its 120 windows from a pool of 4,096 random windows, so that generating the
    data costs little next to rendering it (rendering does not depend on which windows they are)."""

    def __init__(self, site: str, n_features: int, vocab: int, seed: int = 0, window: int = 32, pool: int = 4096):
        self.sites, self.n = [site], n_features
        rng = random.Random(seed)

        def win(row):
            acts = [0.0] * window
            peak = rng.uniform(0.05, 8.0)
            for p in rng.sample(range(window), 5):
                acts[p] = peak * rng.uniform(0.05, 1.0)
            acts[rng.randrange(window)] = peak
            return Window(tokens=tuple(rng.randrange(vocab) for _ in range(window)), acts=tuple(acts), row=row, start=1)

        self.pool = [win(i) for i in range(pool)]
        self.seed = seed

    def features(self, site):
        return list(range(self.n))

    def examples(self, site, f):
        rng = random.Random(self.seed * 1_000_003 + f)
        ws = sorted(rng.sample(self.pool, 120), key=lambda w: -w.max_act)
        top, rest = ws[:20], ws[20:][::-1]
        return FeatureExamples(
            site=site, feature=f, top=top, quantiles=[rest[10 * b:10 * b + 10] for b in range(10)],
            n_tokens=500_000, density=rng.uniform(1e-4, 0.05), max_act=top[0].max_act, mean_active=1.2,
            hist_edges=[10 ** (-2 + k / 5) for k in range(16)], hist_counts=[rng.randrange(1, 500) for _ in range(15)],
            correlated=[(rng.randrange(self.n), rng.uniform(-0.5, 0.9)) for _ in range(10)])


def browser_load(index: Path, loads: int) -> dict | None:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not (chromium and driver):
        return None
    opts = webdriver.ChromeOptions()
    for f in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1200,900", f"--user-data-dir={tempfile.mkdtemp(prefix='dash-bench-')}"]:
        opts.add_argument(f)
    opts.binary_location = chromium
    drv = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        ready, wall, sort = [], [], []
        for _ in range(loads):
            drv.get("about:blank")
            t = time.perf_counter()
            drv.get(index.resolve().as_uri())
            wall.append(time.perf_counter() - t)
            ready.append(float(drv.execute_script("return document.body.getAttribute('data-ready-ms')")))
        n_rows = drv.execute_script("return document.querySelectorAll('#rows tr').length")
        for _ in range(5):
            sort.append(drv.execute_script(
                "var th=document.querySelectorAll('#head th')[1],t=performance.now();th.click();"
                "return performance.now()-t"))
        return {"ready_ms": statistics.median(ready), "get_s": statistics.median(wall),
                "sort_ms": statistics.median(sort), "rows_drawn": n_rows}
    finally:
        drv.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=2304)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, each run once")
    p.add_argument("--tiny", action="store_true", help="random 2-layer Llama instead of SmolLM2")
    p.add_argument("--loads", type=int, default=5, help="browser loads of the index (median)")
    p.add_argument("--keep", default=None, help="write into this directory instead of a temporary one")
    a = p.parse_args(argv)

    from sae.architectures import TopKSAE
    from sae.models import load_model, tiny_model

    torch.manual_seed(0)
    t = time.perf_counter()
    model = tiny_model("llama", n_layers=2, d_model=32) if a.tiny else load_model()
    print(f"model {model.name} loaded in {time.perf_counter() - t:.1f} s; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    site = SITE if SITE in model.sites else f"resid.{model.n_layers - 1}"
    d = TopKSAE(model.d_model, max(a.features, 4 * model.d_model), k=32)
    vocab = model.hf.get_output_embeddings().weight.shape[0]
    cache = SyntheticCache(site, a.features, vocab)
    expl = {(site, f): {"explanation": f"synthetic explanation number {f} of a feature <b>",
                        "scores": {"detection": (f % 97) / 97, "fuzzing": (f % 89) / 89}} for f in range(a.features)}
    root = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="dash-bench-"))
    results = {}
    for w in [int(x) for x in a.workers.split(",")]:
        out = root / f"w{w}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        pages = render_dashboards(model, d, cache, out, site=site, explanations=expl, workers=w, progress=False)
        dt = time.perf_counter() - t
        results[w] = dt
        print(f"workers={w}: {len(pages)} pages in {dt:.1f} s = {len(pages) / dt:.1f} pages/s")
    from circuits.dashboards.data import logit_effects, vocab_strings
    t = time.perf_counter()
    logit_effects(model, d, site, list(range(a.features)))
    t_logits = time.perf_counter() - t
    t = time.perf_counter()
    vocab_strings(model.tokenizer, vocab)
    print(f"  of which (single process, measured apart): logit effects of all features {t_logits:.1f} s, "
          f"vocabulary decode {time.perf_counter() - t:.1f} s")
    out = root / f"w{int(a.workers.split(',')[-1])}"
    html = [p.stat().st_size for p in (out / site).glob("f*.html")]
    js = [p.stat().st_size for p in (out / site).glob("f*.json")]
    index = out / "index.html"
    print(f"page size: mean {statistics.mean(html) / 1e3:.1f} kB HTML, {statistics.mean(js) / 1e3:.1f} kB JSON; "
          f"total {sum(html) / 1e6:.1f} MB + {sum(js) / 1e6:.1f} MB for {len(html)} features")
    print(f"index.html: {index.stat().st_size / 1e3:.1f} kB for {len(html)} features")
    b = browser_load(index, a.loads)
    if b is None:
        print("index load: skipped (chromium, chromedriver or selenium missing)")
    else:
        print(f"index load in headless Chromium (median of {a.loads}): rows drawn {b['ready_ms']:.0f} ms after "
              f"navigation start ({b['rows_drawn']} rows shown), driver.get {1e3 * b['get_s']:.0f} ms; "
              f"re-sort of all {len(html)} rows {b['sort_ms']:.1f} ms")
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
