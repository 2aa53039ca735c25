"""SAE training benchmark on synthetic superposition data with a known dictionary:
throughput (tokens/s), reconstruction (FVU), sparsity, dead latents and recovery of
the ground-truth directions (MMCS), for our trainer and, side by side, the peers' trainers
(sparsify, dictionary_learning, SAELens), each run with that library's own training code.

Data (`make-data`, `sae.synthetic.SyntheticActivations`, seed 1234): 2,048 unit ground-truth
directions in R^576; per token 32 candidate features drawn with Zipf-like probabilities
p_i ∝ i^-0.7, each kept with probability 1/2 (mean L0 16), magnitudes 0.5 + Exp(1), a fixed mean
offset (~10% of the energy) and isotropic noise (0.25% of the energy), scaled so E‖x‖² = 576.
Training tokens come from stream 0, the 65,536 evaluation tokens from stream 1. Stored as .npy
with the ground truth, in a cache directory; batches are read with plain file reads (not a
memory map, whose touched pages would count in the resident set and hide the trainer's own).

Common settings: TopK, k = 32, 2,304 latents (4×), batch 4,096, 819,200 tokens (200 steps),
1 thread (`torch.set_num_threads`): the machine is shared and oversubscribed threads distort
timings. Each library's own learning-rate rule; Adam runs warm up for 25 steps;
schedule-free sign-descent runs (sparsify's default, our `optimizer="signsgd"`) use no warm-up,
as sparsify does.

Metrics, computed by the same code for every library on the evaluation set:
    FVU          = Σ‖x − x̂‖² / Σ‖x − x̄‖²  (float64)
    L0           = mean number of nonzero codes per token
    dead(eval)   = fraction of latents that never fire on the evaluation tokens
    GT MMCS      = mean over ground-truth directions of the max cosine to any decoder row
    GT rec>0.9   = fraction of ground-truth directions with such a cosine above 0.9
    tok/s (wall) = tokens / wall time of the whole training call (incl. batch reads and init)
    tok/s (median step) = batch / median interval between batch hand-outs (robust to noise)
    tok/s (CPU)  = tokens / CPU time of the worker over the training call: on a shared machine
                   this counts only the worker's own time slices (still slowed by contention
                   for caches and memory bandwidth); the ratio line reports all three
    peak RSS     = the worker's maximum resident set (getrusage), MiB
Ours also reports the encoder's dense matmul (2·B·d·n flop per forward) timed at the training
shapes, and a large square float32 GEMM at the same thread count (this machine's matmul peak).

Each run is a subprocess (`worker`), so a runner can use another library's virtual environment:
`--python LIB=/path/to/venv/bin/python` (benchmarks/peers.sh builds them). The worker part of
this file needs only numpy and torch plus the library it runs (the `ours` runner imports `sae`).

    python benchmarks/train_bench.py make-data [--tokens 819200] [--eval-tokens 65536]
    python benchmarks/train_bench.py run --lib ours [--opt signsgd] [--tokens 819200] [--tag x]
    python benchmarks/train_bench.py report [--run-id ID]
    python benchmarks/train_bench.py all [--tokens N] --python sparsify=V/sparsify/bin/python \\
        --python dictionary_learning=V/dl/bin/python --python saelens=V/saelens/bin/python

`all` runs, in one invocation and on the same data: ours with Adam and with schedule-free
sign descent, each peer given with --python, ours again with bfloat16 matmul products
(`matmul_precision="medium"`, tagged bf16-matmul: an opt-in, not the float32 comparison) and a
4x shorter run of ours (memory check); then it prints one markdown table, the speed ratios ours /
fastest peer (wall, median step, CPU time) with the quality comparison, the encoder GFLOP/s
lines and the peak-RSS ratio. Results are appended to <data-dir>/results.jsonl with a run id.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
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
PEERS = ("sparsify", "dictionary_learning", "saelens")


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
    start, cpu = time.perf_counter(), time.process_time()
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
    """The benchmark data (numpy + torch only: usable from any venv). Training batches are read
    with explicit file reads into fresh arrays, so the resident set holds one batch, not the
    pages of a memory map."""

    def __init__(self, data_dir: Path):
        if not (data_dir / "meta.json").exists():
            raise FileNotFoundError(f"no benchmark data in {data_dir}: run `train_bench.py make-data` first")
        self.meta = json.loads((data_dir / "meta.json").read_text())
        self.train_path = data_dir / "train.npy"
        header = np.load(self.train_path, mmap_mode="r", allow_pickle=False)  # shape and offset only
        if header.dtype != np.float32 or header.ndim != 2:
            raise ValueError(f"{self.train_path}: expected a float32 [tokens, d] array")
        self.n_train, self.d = header.shape
        self.offset = header.offset
        del header
        self.eval = torch.from_numpy(np.load(data_dir / "eval.npy", allow_pickle=False))        # [E, d]
        self.truth = torch.from_numpy(np.load(data_dir / "ground_truth.npy", allow_pickle=False))  # [F, d]
        self.hand_outs: list[float] = []  # perf_counter() at each batch hand-out (one per step)

    def batches(self, batch_size: int, n_steps: int, start_step: int = 0):
        """Consecutive training batches [batch_size, d] (float32), batch `start_step` first."""
        if n_steps * batch_size > self.n_train:
            raise ValueError(f"{n_steps * batch_size:,} training tokens requested, the data has "
                             f"{self.n_train:,}: run make-data --tokens {n_steps * batch_size}")
        if start_step == 0:
            self.hand_outs = []  # a trainer may read the first batches twice (calibration, training)
        row_bytes = self.d * 4
        with open(self.train_path, "rb", buffering=0) as f:
            for i in range(start_step, n_steps):
                buf = np.empty((batch_size, self.d), dtype=np.float32)
                f.seek(self.offset + i * batch_size * row_bytes)
                f.readinto(memoryview(buf).cast("B"))
                self.hand_outs.append(time.perf_counter())
                yield torch.from_numpy(buf)


@dataclass
class Trained:
    """What a runner returns: the trained model as callables plus its own description."""

    encode: Callable[[torch.Tensor], torch.Tensor]   # [B, d] -> codes [B, n_latents]
    decode: Callable[[torch.Tensor], torch.Tensor]   # codes -> [B, d]
    W_dec: torch.Tensor                              # [n_latents, d]
    train_seconds: float                             # wall
    cpu_seconds: float                               # this process's CPU time over the same span
    library: str
    version: str
    arch: str
    optimizer: str
    lr: float


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


def _steps(args) -> int:
    return args.tokens // args.batch


def _warmup(args) -> int:
    """Adam warm-up steps, kept below the run length (dictionary_learning asserts it)."""
    return min(args.warmup, max(0, _steps(args) - 1))


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
    steps = _steps(args)
    opt = args.opt or "adam"
    # The first torch.optim optimizer built in a process imports torch._dynamo (~1.5 s here). The
    # peers' runners build their optimizers before their timed region; ours is built inside
    # train(), so pay that one-time import before the clock starts, like them.
    importlib.import_module("torch._dynamo")
    cfg = TrainConfig(total_tokens=steps * args.batch, batch_size=args.batch, lr=args.lr, optimizer=opt,
                      matmul_precision=args.matmul_precision,
                      warmup_steps=_warmup(args) if opt == "adam" else 0, progress=False, device="cpu",
                      seed=args.seed, log_every=max(1, steps // 10), metrics_file=args.metrics_file)
    start, cpu = time.perf_counter(), time.process_time()
    out = train(model, lambda s: data.batches(args.batch, steps, s), cfg)["sae"]
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    lr = args.lr if args.lr is not None else default_lr(out, opt)
    return Trained(out.encode, out.decode, out.W_dec.detach(), seconds, cpu, "sae-circuits", sae.__version__,
                   args.arch, opt, lr)


def run_sparsify(args, data: Data) -> Trained:
    """sparsify's `Trainer` step replayed on `SparseCoder` (its Trainer needs a HF model and a
    token dataset): b_dec := first-batch mean, unit-norm decoder rows before every forward, FVU
    loss (AuxK off: sparsify's default auxk_alpha = 0), parallel-gradient removal, then its default
    optimizer ScheduleFreeWrapper(SignSGD, momentum 0.95) at 5e-3/sqrt(n/2^14) (opt.eval() before
    evaluation), or --opt adam: Adam at 2e-4/sqrt(n/2^14) with linear warm-up and decay to 0."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    steps = _steps(args)
    sae = SparseCoder(data.d, SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu",
                      dtype=torch.float32)
    opt_name = args.opt or "signum"
    scale = math.sqrt(args.d_sae / 2 ** 14)
    if opt_name == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        lr = args.lr or 5e-3 / scale
        opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
        opt.train()
        sched = None
    elif opt_name == "adam":
        lr = args.lr or 2e-4 / scale
        opt = torch.optim.Adam(sae.parameters(), lr=lr)
        w = _warmup(args)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: (t / max(1, w)) if t < w else max(0.0, (steps - t) / max(1, steps - w)))
    else:
        raise SystemExit(f"sparsify runner: unknown --opt {opt_name!r} (signum, adam)")
    since_fired = torch.zeros(args.d_sae, dtype=torch.long)
    start, cpu = time.perf_counter(), time.process_time()
    for step, x in enumerate(data.batches(args.batch, steps)):
        if step == 0:
            sae.b_dec.data = x.mean(0).to(sae.dtype)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=None)
        out.fvu.backward()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
        float(out.fvu.detach())  # the Trainer accumulates the FVU for logging every step
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    if opt_name == "signum":
        opt.eval()  # swap in the averaged weights, as sparsify does before saving
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sae.eval()

    def encode(x):
        top_acts, top_indices, _ = sae.encode(x)
        return torch.zeros(x.shape[0], args.d_sae).scatter(-1, top_indices, top_acts)

    def decode(codes):
        return codes @ sae.W_dec + sae.b_dec  # = sae.decode(top_acts, top_indices)

    return Trained(encode, decode, sae.W_dec.detach(), seconds, cpu, "sparsify", _version("eai-sparsify"),
                   args.arch, opt_name, lr)


def run_dictionary_learning(args, data: Data) -> Trained:
    """dictionary_learning's `TopKTrainer.update(step, x)` per batch (what its `trainSAE` does
    minus logging and saving): geometric-median b_dec, AuxK, Adam at its auto LR
    2e-4/sqrt(n/2^14), warm-up, clip-norm 1, unit-norm decoder."""
    from dictionary_learning.trainers.top_k import TopKTrainer

    steps = _steps(args)
    trainer = TopKTrainer(steps=steps, activation_dim=data.d, dict_size=args.d_sae, k=args.k, layer=0,
                          lm_name="synthetic", lr=args.lr, warmup_steps=_warmup(args), seed=args.seed,
                          device="cpu")
    start, cpu = time.perf_counter(), time.process_time()
    for step, x in enumerate(data.batches(args.batch, steps)):
        trainer.update(step, x)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    ae = trainer.ae.eval()
    return Trained(lambda x: ae.encode(x), ae.decode, ae.decoder.weight.detach().T, seconds, cpu,
                   "dictionary_learning", _version("dictionary-learning"), args.arch, "adam", trainer.lr)


def run_saelens(args, data: Data) -> Trained:
    """SAELens' `SAETrainer.fit()` on a `TopKTrainingSAE` with library defaults (0.1-norm decoder
    init, rescale_acts_by_decoder_norm, AuxK coefficient 1, dead window 1000 steps), Adam at the
    TopK LR rule 2e-4/sqrt(n/2^14) with a warm-up and otherwise constant LR."""
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(args.seed)
    steps = _steps(args)
    lr = args.lr or 2e-4 / math.sqrt(args.d_sae / 2 ** 14)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.d, d_sae=args.d_sae, k=args.k, dtype="float32",
                                                device="cpu"))
    cfg = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                           lr=lr, lr_end=lr, lr_scheduler_name="constant", lr_warm_up_steps=_warmup(args),
                           device="cpu", logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=iter(data.batches(args.batch, steps)))
    start, cpu = time.perf_counter(), time.process_time()
    sae = trainer.fit()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    sae.eval()
    return Trained(sae.encode, sae.decode, sae.W_dec.detach(), seconds, cpu, "saelens", _version("sae-lens"),
                   args.arch, "adam", lr)


RUNNERS: dict[str, Callable[..., Trained]] = {"ours": run_ours, "sparsify": run_sparsify,
                                               "dictionary_learning": run_dictionary_learning,
                                               "saelens": run_saelens}


# --- shared measurements ------------------------------------------------------------------------
def _median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (allocations, kernel choice)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def matmul_rates(B: int, d: int, n: int, square: int = 2048, reps: int = 9) -> dict[str, float]:
    """GFLOP/s of the encoder's dense matmul at the training shapes (pre = (x - b_dec) W_enc^T +
    b_enc: [B, d] x [d, n], 2·B·d·n flop, as `sae.architectures._sparse` computes it) and of a
    square float32 GEMM (this machine's matmul peak at the current thread count); medians."""
    g = torch.Generator().manual_seed(0)
    x, W, b = torch.randn(B, d, generator=g), torch.randn(n, d, generator=g), torch.randn(n, generator=g)
    enc = _median_seconds(lambda: torch.addmm(b, x, W.t()), reps)
    A, C = torch.randn(square, square, generator=g), torch.randn(square, square, generator=g)
    sq = _median_seconds(lambda: A @ C, reps)
    return {"enc_matmul_ms": enc * 1e3, "enc_gflops": 2 * B * d * n / enc / 1e9,
            "peak_gflops": 2 * square ** 3 / sq / 1e9, "peak_square": square}


@torch.no_grad()
def evaluate(t: Trained, data: Data, chunk: int = 4096) -> dict[str, float]:
    x_all = data.eval
    mean = x_all.double().mean(0)
    err = tot = l0 = 0.0
    fired = None
    for lo in range(0, len(x_all), chunk):
        x = x_all[lo:lo + chunk]
        codes = t.encode(x)
        if codes.is_sparse:
            codes = codes.to_dense()
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
    rss_train = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    steps = _steps(args)
    gaps = np.diff(data.hand_outs) if len(data.hand_outs) > 1 else np.array([float("nan")])
    result = {
        "library": trained.library, "version": trained.version, "arch": trained.arch, "opt": trained.optimizer,
        "lr": trained.lr, "threads": args.threads, "tokens": steps * args.batch, "batch": args.batch,
        "d_sae": args.d_sae, "k": args.k, "seed": args.seed, "tag": args.tag, "run_id": args.run_id,
        "torch": torch.__version__,
        "train_s": trained.train_seconds, "tok_s_wall": steps * args.batch / trained.train_seconds,
        "cpu_s": trained.cpu_seconds, "tok_s_cpu": steps * args.batch / trained.cpu_seconds,
        "tok_s_median_step": args.batch / float(statistics.median(gaps)),
        "step_ms_median": float(statistics.median(gaps)) * 1e3, "peak_rss_mib": rss_train,
        **evaluate(trained, data),
    }
    if args.lib == "ours":  # after reading the peak RSS: the GEMM timing allocates its own operands
        result["matmul_precision"] = args.matmul_precision
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(args.matmul_precision)  # as during training
        try:
            result.update(matmul_rates(args.batch, data.d, args.d_sae))
        finally:
            torch.set_float32_matmul_precision(previous)
    print("RESULT " + json.dumps(result), flush=True)


# --- parent side ----------------------------------------------------------------------------------
def run(args, lib: str, python: str, tokens: int | None = None, opt: str | None = None, tag: str | None = None,
        precision: str | None = None) -> dict | None:
    tokens = tokens or args.tokens
    if precision is None and args.matmul_precision != "highest":
        precision = args.matmul_precision
    cmd = [python, str(Path(__file__).resolve()), "worker", "--lib", lib, "--data-dir", str(args.data_dir),
           "--tokens", str(tokens), "--threads", str(args.threads), "--batch", str(args.batch),
           "--d-sae", str(args.d_sae), "--k", str(args.k), "--warmup", str(args.warmup), "--seed", str(args.seed),
           "--tag", tag if tag is not None else args.tag, "--arch", args.arch, "--arch-kwargs", args.arch_kwargs,
           "--run-id", args.run_id]
    opt = opt or args.opt
    if opt:
        cmd += ["--opt", opt]
    if args.lr is not None:
        cmd += ["--lr", str(args.lr)]
    if lib == "ours" and precision:
        cmd += ["--matmul-precision", precision]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", TQDM_DISABLE="1")
    print(f"[{lib}] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"[{lib}] worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", flush=True)
        return None
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"[{lib}] worker printed no RESULT line:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}", flush=True)
        return None
    result = json.loads(line[len("RESULT "):])
    with open(Path(args.data_dir) / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"[{lib}] {result['tok_s_wall']:,.0f} tok/s (wall), {result['tok_s_median_step']:,.0f} tok/s (median step), "
          f"FVU {result['fvu']:.4f}, L0 {result['l0']:.1f}, GT MMCS {result['gt_mmcs']:.3f}, "
          f"peak RSS {result['peak_rss_mib']:,.0f} MiB", flush=True)
    return result


COLUMNS = [("library", "library", "{}"), ("version", "version", "{}"), ("opt", "opt", "{}"), ("lr", "lr", "{:.2e}"),
           ("tokens", "tokens", "{:,}"), ("train s", "train_s", "{:.1f}"), ("tok/s (wall)", "tok_s_wall", "{:,.0f}"),
           ("tok/s (median step)", "tok_s_median_step", "{:,.0f}"), ("tok/s (CPU)", "tok_s_cpu", "{:,.0f}"), ("FVU", "fvu", "{:.4f}"), ("L0", "l0", "{:.1f}"),
           ("dead(eval)", "dead_eval", "{:.3f}"), ("GT MMCS", "gt_mmcs", "{:.3f}"), ("GT rec>0.9", "gt_rec_0.9", "{:.3f}"),
           ("peak RSS MiB", "peak_rss_mib", "{:,.0f}"), ("tag", "tag", "{}")]


def _table(rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(fmt.format(r[key]) if r.get(key) is not None else ""
                                     for _, key, fmt in COLUMNS) + " |")
    return out


def summary(rows: list[dict]) -> list[str]:
    """Speed ratio ours / fastest peer (at equal or better quality), encoder GFLOP/s, RSS ratio."""
    lines = []
    full = [r for r in rows if r.get("tag") != "memory-short"]
    ours = [r for r in full if r["library"] == "sae-circuits"]
    peers = [r for r in full if r["library"] != "sae-circuits"]
    if ours and peers:
        fastest = max(peers, key=lambda r: r["tok_s_wall"])
        for o in ours:
            ratio_wall = o["tok_s_wall"] / fastest["tok_s_wall"]
            ratio_step = o["tok_s_median_step"] / max(peers, key=lambda r: r["tok_s_median_step"])["tok_s_median_step"]
            ratio_cpu = o["tok_s_cpu"] / max(peers, key=lambda r: r["tok_s_cpu"])["tok_s_cpu"]
            best_q = min(peers, key=lambda r: r["fvu"])
            quality = ("equal or better" if o["fvu"] <= best_q["fvu"] and o["gt_mmcs"] >= best_q["gt_mmcs"]
                       else "WORSE")
            label = o["opt"] + (f", matmul_precision={o['matmul_precision']}"
                                if o.get("matmul_precision", "highest") != "highest" else "")
            lines.append(f"- speed ours ({label}) / fastest peer ({fastest['library']} {fastest['opt']}): "
                         f"{ratio_wall:.2f}x (wall), {ratio_step:.2f}x (median step), {ratio_cpu:.2f}x (CPU time); FVU {o['fvu']:.4f} vs best "
                         f"peer {best_q['fvu']:.4f} ({best_q['library']}), GT MMCS {o['gt_mmcs']:.3f} vs "
                         f"{best_q['gt_mmcs']:.3f}: {quality}")
    seen = set()
    for o in ours:
        prec = o.get("matmul_precision", "highest")
        if "enc_gflops" in o and prec not in seen:
            seen.add(prec)
            step_ms = o.get("step_ms_median")
            share = f", {o['enc_matmul_ms'] / step_ms:.0%} of the median step ({step_ms:.0f} ms)" if step_ms else ""
            lines.append(f"- encoder matmul ({o['opt']} run, float32 matmul precision {prec!r}) "
                         f"[{o['batch']}x576]x[576x{o['d_sae']}]: {o['enc_matmul_ms']:.0f} ms = "
                         f"{o['enc_gflops']:.1f} GFLOP/s vs {o['peak_gflops']:.1f} GFLOP/s for a "
                         f"{o['peak_square']}^3 GEMM at the same precision ({o['enc_gflops'] / o['peak_gflops']:.0%} "
                         f"of that peak){share}")
    short = [r for r in rows if r.get("tag") == "memory-short"]
    if short and ours:
        s = short[-1]
        long = next((o for o in ours if o["opt"] == s["opt"] and o.get("matmul_precision") == s.get("matmul_precision")),
                    ours[0])
        lines.append(f"- memory: peak RSS {long['peak_rss_mib']:,.0f} MiB at {long['tokens']:,} tokens vs "
                     f"{s['peak_rss_mib']:,.0f} MiB at {s['tokens']:,} tokens: ratio "
                     f"{long['peak_rss_mib'] / s['peak_rss_mib']:.3f} for {long['tokens'] / s['tokens']:.0f}x the tokens")
    return lines


def quality_summary(rows: list[dict]) -> list[str]:
    """Per-seed FVU and GT MMCS of the `quality` runs, and the verdict on their means."""
    import statistics

    by_lib: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("tag") == "quality":
            by_lib.setdefault(f"{r['library']} {r['opt']}", []).append(r)
    lines = ["| library | seeds | FVU per seed | FVU mean (sd) | GT MMCS per seed | GT MMCS mean (sd) |",
             "|---|---|---|---|---|---|"]
    means = {}
    for lib, rs in by_lib.items():
        rs.sort(key=lambda r: r["seed"])
        fvu, mmcs = [r["fvu"] for r in rs], [r["gt_mmcs"] for r in rs]
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else float("nan"))
        means[lib] = (statistics.mean(fvu), statistics.mean(mmcs))
        lines.append(f"| {lib} | {', '.join(str(r['seed']) for r in rs)} | {' / '.join(f'{v:.4f}' for v in fvu)} | "
                     f"{means[lib][0]:.4f} ({sd(fvu):.4f}) | {' / '.join(f'{v:.3f}' for v in mmcs)} | "
                     f"{means[lib][1]:.3f} ({sd(mmcs):.3f}) |")
    ours = [k for k in means if k.startswith("sae-circuits")]
    peers = [k for k in means if not k.startswith("sae-circuits")]
    for o in ours:
        for q in peers:
            better = means[o][0] <= means[q][0] and means[o][1] >= means[q][1]
            lines.append(f"- mean over seeds, {o} vs {q}: FVU {means[o][0]:.4f} vs {means[q][0]:.4f}, GT MMCS "
                         f"{means[o][1]:.3f} vs {means[q][1]:.3f}: {'equal or better' if better else 'WORSE'}")
    return lines


def report(data_dir: Path, run_id: str | None = None) -> str:
    path = data_dir / "results.jsonl"
    if not path.exists():
        raise SystemExit(f"no results in {path}: run `train_bench.py run` first")
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    if run_id is None and rows:
        run_id = rows[-1].get("run_id")
    if run_id:
        rows = [r for r in rows if r.get("run_id") == run_id]
    if any(r.get("tag") == "quality" for r in rows):
        return "\n".join(_table(rows) + [""] + quality_summary(rows))
    return "\n".join(_table(rows) + [""] + summary(rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["make-data", "run", "report", "all", "quality", "worker"])
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
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="warm-up steps of the Adam runs")
    p.add_argument("--lr", type=float, default=None, help="default: each library's own rule")
    p.add_argument("--opt", default=None, help="ours: adam | signsgd; sparsify: signum | adam (default: "
                                               "the library's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3, help="quality: seeds 0..N-1 of ours (signsgd) and sparsify")
    p.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                   help="(ours) TrainConfig.matmul_precision; 'medium' = bfloat16 products (AMX)")
    p.add_argument("--arch", default="topk")
    p.add_argument("--arch-kwargs", default="{}", help="JSON of extra constructor arguments")
    p.add_argument("--metrics-file", default=None, help="(ours) the trainer's JSONL metrics")
    p.add_argument("--tag", default="")
    p.add_argument("--run-id", default=None, help="groups results of one invocation (default: a timestamp)")
    p.add_argument("--skip-memory", action="store_true", help="all: skip the 4x shorter memory run")
    p.add_argument("--skip-bf16", action="store_true",
                   help="all: skip the extra run of ours with matmul_precision='medium' (bfloat16 products)")
    args = p.parse_args(argv)
    args.run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    pythons = dict(item.split("=", 1) for item in args.python)
    unknown = set(pythons) - set(RUNNERS)
    if unknown:
        raise SystemExit(f"--python names unknown runners {sorted(unknown)}; runners: {sorted(RUNNERS)}")
    if args.command == "make-data":
        make_data(args.data_dir, args.tokens, args.eval_tokens)
    elif args.command == "worker":
        worker(args)
    elif args.command == "run":
        run(args, args.lib, pythons.get(args.lib, sys.executable))
    elif args.command == "report":
        print(report(args.data_dir, args.run_id if "--run-id" in (argv or sys.argv) else None))
    elif args.command == "all":
        make_data(args.data_dir, args.tokens, args.eval_tokens)
        ours_py = pythons.get("ours", sys.executable)
        run(args, "ours", ours_py, opt="adam")
        run(args, "ours", ours_py, opt="signsgd")
        for lib in PEERS:
            if lib in pythons:
                run(args, lib, pythons[lib])
            else:
                print(f"[{lib}] skipped: no --python {lib}=... given (benchmarks/peers.sh builds the venvs)")
        if not args.skip_bf16:  # opt-in bfloat16 products for the encoder matmul (reported apart)
            run(args, "ours", ours_py, opt="signsgd", tag="bf16-matmul", precision="medium")
        if not args.skip_memory:
            short = max(args.batch, (args.tokens // 4) // args.batch * args.batch)
            run(args, "ours", ours_py, tokens=short, opt="signsgd", tag="memory-short")
        print()
        print(report(args.data_dir, args.run_id))
    elif args.command == "quality":  # seed-to-seed spread: single-seed FVU differences of ~1% are noise
        make_data(args.data_dir, args.tokens, args.eval_tokens)
        if "sparsify" not in pythons:
            raise SystemExit("quality compares with sparsify: give --python sparsify=...")
        for seed in range(args.seeds):
            args.seed = seed
            run(args, "ours", pythons.get("ours", sys.executable), opt="signsgd", tag="quality")
            run(args, "sparsify", pythons["sparsify"], tag="quality")
        print()
        print(report(args.data_dir, args.run_id))


if __name__ == "__main__":
    main()
