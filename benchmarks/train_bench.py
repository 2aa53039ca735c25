"""SAE training benchmark on synthetic superposition data with a known dictionary (training
notes §8.2): throughput (tokens/s), reconstruction (FVU), sparsity, dead latents and recovery of
the ground-truth directions (MMCS), for our trainer and, side by side, the peers' trainers.

Data (`make-data`, `sae.synthetic.SyntheticActivations`, seed 1234): 2,048 unit ground-truth
directions in R^576; per token 32 candidate features drawn with Zipf-like probabilities
p_i ∝ i^-0.7, each kept with probability 1/2 (mean L0 16), magnitudes 0.5 + Exp(1), a fixed mean
offset (~10% of the energy) and isotropic noise (0.25% of the energy), scaled so E‖x‖² = 576.
Training tokens come from stream 0, the 65,536 evaluation tokens from stream 1. Stored as .npy
(memory-mapped, never pickled) with the ground truth, in a cache directory.

Common settings: 2,304 latents (4×), k = 32, batch 4,096, 819,200 tokens (200 steps), warm-up 25
steps, 1 thread (`torch.set_num_threads`): the machine is shared and oversubscribed threads
distort timings (notes §8.2).

Metrics, computed by the same code for every library on the evaluation set:
    FVU          = Σ‖x − x̂‖² / Σ‖x − x̄‖²  (float64)
    L0           = mean number of nonzero codes per token
    dead(eval)   = fraction of latents that never fire on the evaluation tokens
    GT MMCS      = mean over ground-truth directions of the max cosine to any decoder row
    GT rec>0.9   = fraction of ground-truth directions with such a cosine above 0.9
    tok/s (wall) = tokens / wall time of the whole training call (incl. batch reads and init)
    tok/s (median step) = batch / median interval between batch hand-outs (robust to noise)

Each run is a subprocess (`worker`), so a runner can use another library's virtual environment:
`--python LIB=/path/to/venv/bin/python`. The worker part of this file needs only numpy and torch
(the `ours` runner also imports `sae`). Adding a peer (sparsify, dictionary_learning, SAELens):
write `run_<lib>(args, data) -> Trained` that trains with that library's own trainer on
`data.batches(...)` and returns encode/decode callables and the decoder matrix, then add it to
RUNNERS; everything else (timing, evaluation, results, report) is shared.

    python benchmarks/train_bench.py make-data [--tokens 819200] [--eval-tokens 65536]
    python benchmarks/train_bench.py run --lib ours [--tokens 819200] [--threads 1] [--tag x]
    python benchmarks/train_bench.py report
    python benchmarks/train_bench.py all [--tokens N] [--python sparsify=/venvs/sparsify/bin/python ...]

Results are appended to <data-dir>/results.jsonl; `report` prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

GENERATOR = dict(d=576, n_features=2048, k_candidates=32, keep_prob=0.5, zipf_exponent=0.7,
                 magnitude_min=0.5, magnitude_scale=1.0, mean_fraction=0.1, noise_fraction=0.0025, seed=1234)
DEFAULTS = dict(tokens=819_200, eval_tokens=65_536, d_sae=2304, k=32, batch=4096, warmup=25, threads=1)


def default_data_dir() -> Path:
    root = os.environ.get("SAE_CIRCUITS_CACHE") or str(Path.home() / ".cache" / "sae-circuits")
    return Path(root) / "bench" / "train_synthetic"


# --- data ---------------------------------------------------------------------------------------
def make_data(data_dir: Path, tokens: int, eval_tokens: int) -> None:
    """Write train.npy [tokens, d], eval.npy [eval_tokens, d], ground_truth.npy [n_features, d]."""
    from sae.io import atomic_path
    from sae.synthetic import SyntheticActivations

    data_dir.mkdir(parents=True, exist_ok=True)
    meta_path = data_dir / "meta.json"
    want = {"generator": GENERATOR, "tokens": tokens, "eval_tokens": eval_tokens}
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        if have.get("generator") == GENERATOR and have["tokens"] >= tokens and have["eval_tokens"] >= eval_tokens:
            print(f"data in {data_dir} is up to date ({have['tokens']:,} train tokens)")
            return
    start = time.perf_counter()
    gen = SyntheticActivations(**GENERATOR)
    chunk = 16_384
    for name, n, stream in (("train", tokens, 0), ("eval", eval_tokens, 1)):
        with atomic_path(data_dir / f"{name}.npy") as tmp:
            with open(tmp, "wb"):
                pass
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, gen.d))
            for i, batch in enumerate(gen.batches(chunk, stream=stream, n_batches=-(-n // chunk))):
                lo = i * chunk
                arr[lo:lo + chunk] = batch[: n - lo].numpy()
            arr.flush()
            del arr
    with atomic_path(data_dir / "ground_truth.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, gen.directions.numpy())
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps({**want, "scale": gen.scale, "expected_l0": gen.expected_l0}, indent=1))
    print(f"wrote {tokens:,} + {eval_tokens:,} tokens to {data_dir} in {time.perf_counter() - start:.1f} s")


class Data:
    """The benchmark data, memory-mapped (numpy + torch only: usable from any venv)."""

    def __init__(self, data_dir: Path):
        if not (data_dir / "meta.json").exists():
            raise FileNotFoundError(f"no benchmark data in {data_dir}: run `train_bench.py make-data` first")
        self.meta = json.loads((data_dir / "meta.json").read_text())
        self.train = np.load(data_dir / "train.npy", mmap_mode="r", allow_pickle=False)        # [N, d]
        self.eval = torch.from_numpy(np.load(data_dir / "eval.npy", allow_pickle=False))        # [E, d]
        self.truth = torch.from_numpy(np.load(data_dir / "ground_truth.npy", allow_pickle=False))  # [F, d]
        self.d = self.train.shape[1]
        self.hand_outs: list[float] = []  # perf_counter() at each batch hand-out (one per step)

    def batches(self, batch_size: int, n_steps: int, start_step: int = 0):
        """Consecutive training batches [batch_size, d] (float32 copies), batch `start_step` first."""
        if n_steps * batch_size > len(self.train):
            raise ValueError(f"{n_steps * batch_size:,} training tokens requested, the data has "
                             f"{len(self.train):,}: run make-data --tokens {n_steps * batch_size}")
        if start_step == 0:
            self.hand_outs = []  # the trainer reads the first batches twice (calibration, training)
        for i in range(start_step, n_steps):
            self.hand_outs.append(time.perf_counter())
            yield torch.from_numpy(np.array(self.train[i * batch_size:(i + 1) * batch_size]))


@dataclass
class Trained:
    """What a runner returns: the trained model as callables plus its own description."""

    encode: Callable[[torch.Tensor], torch.Tensor]   # [B, d] -> codes [B, n_latents]
    decode: Callable[[torch.Tensor], torch.Tensor]   # codes -> [B, d]
    W_dec: torch.Tensor                              # [n_latents, d]
    train_seconds: float
    library: str
    version: str
    arch: str
    optimizer: str
    lr: float


# --- runners (one per library; each runs inside that library's venv) -----------------------------
def run_ours(args, data: Data) -> Trained:
    import sae
    from sae.dictionary import build
    from sae.training import TrainConfig, default_lr, train

    torch.manual_seed(args.seed)
    kwargs = {"d_in": data.d, "n_latents": args.d_sae, **json.loads(args.arch_kwargs)}
    if args.arch in ("topk", "batchtopk"):
        kwargs.setdefault("k", args.k)
    model = build(args.arch, **kwargs)
    steps = args.tokens // args.batch
    cfg = TrainConfig(total_tokens=steps * args.batch, batch_size=args.batch, lr=args.lr,
                      warmup_steps=args.warmup, progress=False, device="cpu", seed=args.seed,
                      log_every=max(1, steps // 10), metrics_file=args.metrics_file)
    start = time.perf_counter()
    out = train(model, lambda s: data.batches(args.batch, steps, s), cfg)["sae"]
    seconds = time.perf_counter() - start
    lr = args.lr if args.lr is not None else default_lr(out)
    return Trained(out.encode, out.decode, out.W_dec.detach(), seconds, "sae-circuits", sae.__version__,
                   args.arch, "adam", lr)


RUNNERS: dict[str, Callable[..., Trained]] = {"ours": run_ours}


# --- shared evaluation --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(t: Trained, data: Data, chunk: int = 4096) -> dict[str, float]:
    x_all = data.eval
    mean = x_all.double().mean(0)
    err = tot = l0 = 0.0
    fired = None
    for lo in range(0, len(x_all), chunk):
        x = x_all[lo:lo + chunk]
        codes = t.encode(x)
        x_hat = t.decode(codes)
        err += (x.double() - x_hat.double()).pow(2).sum().item()
        tot += (x.double() - mean).pow(2).sum().item()
        nz = codes != 0
        l0 += nz.sum().item()
        f = nz.any(0)
        fired = f if fired is None else fired | f
    W = t.W_dec.double()
    cos = torch.nn.functional.normalize(data.truth.double(), dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    best = cos.max(1).values                                  # [n_features]
    return {"fvu": err / tot, "l0": l0 / len(x_all), "dead_eval": 1 - fired.float().mean().item(),
            "gt_mmcs": best.mean().item(), "gt_rec_0.9": (best > 0.9).float().mean().item()}


def worker(args) -> None:
    """Train with one library in this process and print one RESULT line of JSON."""
    torch.set_num_threads(args.threads)
    data = Data(Path(args.data_dir))
    if args.lib not in RUNNERS:
        raise SystemExit(f"unknown library {args.lib!r}; runners: {sorted(RUNNERS)}")
    trained = RUNNERS[args.lib](args, data)
    steps = args.tokens // args.batch
    gaps = np.diff(data.hand_outs) if len(data.hand_outs) > 1 else np.array([float("nan")])
    result = {
        "library": trained.library, "version": trained.version, "arch": trained.arch, "opt": trained.optimizer,
        "lr": trained.lr, "threads": args.threads, "tokens": steps * args.batch, "batch": args.batch,
        "d_sae": args.d_sae, "k": args.k, "tag": args.tag, "torch": torch.__version__,
        "train_s": trained.train_seconds, "tok_s_wall": steps * args.batch / trained.train_seconds,
        "tok_s_median_step": args.batch / float(statistics.median(gaps)),
        **evaluate(trained, data),
    }
    print("RESULT " + json.dumps(result), flush=True)


# --- parent side ----------------------------------------------------------------------------------
def run(args, lib: str, python: str) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "worker", "--lib", lib, "--data-dir", str(args.data_dir),
           "--tokens", str(args.tokens), "--threads", str(args.threads), "--batch", str(args.batch),
           "--d-sae", str(args.d_sae), "--k", str(args.k), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--tag", args.tag, "--arch", args.arch, "--arch-kwargs", args.arch_kwargs]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled")
    print(f"[{lib}] {' '.join(cmd[2:])}", flush=True)
    import resource

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[{lib}] worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"[{lib}] worker printed no RESULT line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    result = json.loads(line[len("RESULT "):])
    result["peak_rss_mib_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    results = Path(args.data_dir) / "results.jsonl"
    with open(results, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"[{lib}] {result['tok_s_wall']:,.0f} tok/s (wall), {result['tok_s_median_step']:,.0f} tok/s (median step), "
          f"FVU {result['fvu']:.4f}, L0 {result['l0']:.1f}, GT MMCS {result['gt_mmcs']:.3f}", flush=True)
    return result


COLUMNS = [("library", "library", "{}"), ("version", "version", "{}"), ("arch", "arch", "{}"), ("opt", "opt", "{}"),
           ("lr", "lr", "{:.2e}"), ("threads", "threads", "{}"), ("tokens", "tokens", "{:,}"),
           ("train s", "train_s", "{:.0f}"), ("tok/s (wall)", "tok_s_wall", "{:,.0f}"),
           ("tok/s (median step)", "tok_s_median_step", "{:,.0f}"), ("FVU", "fvu", "{:.4f}"), ("L0", "l0", "{:.1f}"),
           ("dead(eval)", "dead_eval", "{:.3f}"), ("GT MMCS", "gt_mmcs", "{:.3f}"), ("GT rec>0.9", "gt_rec_0.9", "{:.3f}"),
           ("tag", "tag", "{}")]


def report(data_dir: Path) -> str:
    path = data_dir / "results.jsonl"
    if not path.exists():
        raise SystemExit(f"no results in {path}: run `train_bench.py run` first")
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    out = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(fmt.format(r.get(key, "")) if r.get(key) is not None else ""
                                     for _, key, fmt in COLUMNS) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["make-data", "run", "report", "all", "worker"])
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="training tokens")
    p.add_argument("--eval-tokens", type=int, default=DEFAULTS["eval_tokens"])
    p.add_argument("--lib", default="ours", help=f"runner: {sorted(RUNNERS)}")
    p.add_argument("--python", action="append", default=[], metavar="LIB=PATH",
                   help="interpreter (venv) for a runner; default: this interpreter")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    p.add_argument("--d-sae", type=int, default=DEFAULTS["d_sae"])
    p.add_argument("--k", type=int, default=DEFAULTS["k"])
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--lr", type=float, default=None, help="default: each library's own rule")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="topk")
    p.add_argument("--arch-kwargs", default="{}", help="JSON of extra constructor arguments")
    p.add_argument("--metrics-file", default=None, help="(ours) the trainer's JSONL metrics")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    pythons = dict(item.split("=", 1) for item in args.python)
    if args.command == "make-data":
        make_data(args.data_dir, args.tokens, args.eval_tokens)
    elif args.command == "worker":
        worker(args)
    elif args.command == "run":
        run(args, args.lib, pythons.get(args.lib, sys.executable))
    elif args.command == "report":
        print(report(args.data_dir))
    elif args.command == "all":
        make_data(args.data_dir, args.tokens, args.eval_tokens)
        for lib in RUNNERS:
            if lib == "ours" or lib in pythons:
                run(args, lib, pythons.get(lib, sys.executable))
        print(report(args.data_dir))


if __name__ == "__main__":
    main()
