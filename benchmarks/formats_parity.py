"""Format parity: dictionaries built and saved by the peer libraries themselves, loaded with
`sae.formats.load_any`, must encode and decode exactly like the library does on the same inputs.

Run it inside a peer's virtual environment that also has our package (benchmarks/peers.sh
installs it there with `pip install --no-deps -e`); it checks every library importable there:

    V=~/.cache/sae-circuits/bench/venvs
    $V/saelens/bin/python  benchmarks/formats_parity.py   # SAELens TopK (both decoder-norm modes), standard, JumpReLU
    $V/dl/bin/python       benchmarks/formats_parity.py   # dictionary_learning AutoEncoder, AutoEncoderTopK
    $V/sparsify/bin/python benchmarks/formats_parity.py   # sparsify SparseCoder (TopK)

Each case builds the library's own model with random weights (all parameters drawn at random,
decoder rows of random norms, nonzero biases), saves it with the library's own save function,
loads it with `load_any`, and compares on the same random inputs (offset from zero):
    codes : our encode(x)            vs the library's encode(x)      [N, n_latents]
    decode: our decode(their codes)  vs the library's decode(codes)  [N, d_in]
    x_hat : our decode(our encode(x)) vs the library's x_hat
Checkpoints are written in float32 (as the libraries train and save them); both sides then
compute in float64 on the same (exactly representable) weights and inputs, so any difference
beyond rounding (1e-9 relative to the output scale) is a conversion error, not float32 noise,
and top-k selections cannot flip on rounding. The library side is the checkpoint read back with
the library's own loader (SAELens `SAE.load_from_disk`, sparsify `SparseCoder.load_from_disk`,
dictionary_learning `from_pretrained`), cast to float64. dictionary_learning has no save function outside its `trainSAE` loop, so its cases
run `trainSAE` itself for a few steps with `save_dir` (its save path: `ae.pt` + `config.json`)
and then also save randomised weights the way that loop does. Prints one line per case with
the max abs differences: PASS = equal up to float64 rounding (relative 1e-9); PASS~ = equal up to
float32 rounding (relative 1e-6): a checkpoint whose conversion is a reparametrisation (SAELens
`rescale_acts_by_decoder_norm`) is converted by `sae.formats` in float32 arithmetic; FAIL
otherwise, or when the active sets differ. Exits 1 on any FAIL, 2 if no library is importable.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

D_IN, N_LAT, K, N_TOKENS = 48, 192, 8, 512
RTOL = 1e-9       # exact up to float64 rounding
RTOL_F32 = 1e-6   # float32 rounding of a reparametrised checkpoint (a few float32 ulps)
F64 = torch.float64


def _inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N_TOKENS, D_IN, generator=g, dtype=F64) * 1.5 + torch.randn(D_IN, generator=g, dtype=F64)


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int, scales: dict[str, float] | None = None) -> None:
    """Every floating parameter <- N(0, s^2) (s from `scales` by name suffix, else 1/sqrt(fan-in))."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        s = next((v for k, v in (scales or {}).items() if name.endswith(k)), None)
        if s is None:
            s = 1.0 / max(1, p.shape[-1]) ** 0.5 if p.dim() == 2 else 0.3
        p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * s)


def _dense(codes) -> torch.Tensor:
    return codes.to_dense() if getattr(codes, "is_sparse", False) else codes


@torch.no_grad()
def compare(name: str, path: Path, their_encode: Callable, their_decode: Callable) -> bool:
    from sae.formats import detect_format, load_any

    ours = load_any(path, dtype=F64)
    x = _inputs()
    c_them = _dense(their_encode(x)).to(F64)
    c_ours = ours.encode(x)
    dec_them = their_decode(c_them.to(c_them.dtype)).to(F64)
    dec_ours = ours.decode(c_them)
    xh_ours = ours.decode(c_ours)
    scale_c = c_them.abs().max().clamp_min(1e-12)
    scale_x = dec_them.abs().max().clamp_min(1e-12)
    d_codes = (c_ours - c_them).abs().max().item()
    d_dec = (dec_ours - dec_them).abs().max().item()
    d_xhat = (xh_ours - dec_them).abs().max().item()  # dec_them = their x_hat (decode of their codes)
    same_support = torch.equal(c_ours != 0, c_them != 0)
    rel = max(d_codes / float(scale_c), d_dec / float(scale_x), d_xhat / float(scale_x))
    ok = same_support and rel <= RTOL_F32
    verdict = "FAIL" if not ok else ("PASS" if rel <= RTOL else "PASS~")
    active = (c_them != 0).float().sum(1).mean().item()
    print(f"{verdict:5s} {name:62s} {detect_format(path):19s} -> {ours.architecture:9s} L0 {active:6.1f}  "
          f"max|dcodes| {d_codes:.1e}  max|ddecode| {d_dec:.1e}  max|dx_hat| {d_xhat:.1e}  (rel {rel:.1e})"
          f"{'' if same_support else '  DIFFERENT ACTIVE SETS'}", flush=True)
    return ok


# --- SAELens ------------------------------------------------------------------------------------
def saelens_cases(tmp: Path) -> list[bool]:
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAE
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    results = []
    common = dict(d_in=D_IN, d_sae=N_LAT, dtype="float32", device="cpu")
    cases = [
        ("saelens TopKTrainingSAE (rescale_acts_by_decoder_norm)",
         TopKTrainingSAE(TopKTrainingSAEConfig(k=K, rescale_acts_by_decoder_norm=True, **common)), "save_model"),
        ("saelens TopKTrainingSAE (raw decoder)",
         TopKTrainingSAE(TopKTrainingSAEConfig(k=K, rescale_acts_by_decoder_norm=False, **common)), "save_model"),
        ("saelens TopKTrainingSAE -> save_inference_model",
         TopKTrainingSAE(TopKTrainingSAEConfig(k=K, rescale_acts_by_decoder_norm=True, **common)),
         "save_inference_model"),
        ("saelens TopKSAE (inference class)", TopKSAE(TopKSAEConfig(k=K, **common)), "save_model"),
        ("saelens StandardTrainingSAE", StandardTrainingSAE(StandardTrainingSAEConfig(**common)), "save_model"),
        ("saelens StandardSAE (inference class)", StandardSAE(StandardSAEConfig(**common)), "save_model"),
        ("saelens JumpReLUSAE (inference class)", JumpReLUSAE(JumpReLUSAEConfig(**common)), "save_model"),
    ]
    for i, (name, sae, save) in enumerate(cases):
        _randomise(sae, seed=10 + i, scales={"W_dec": 0.5, "threshold": 0.2})
        if hasattr(sae, "threshold"):
            with torch.no_grad():
                sae.threshold.abs_()
        sae.eval()
        path = tmp / f"saelens_{i}"
        getattr(sae, save)(path)
        if save == "save_model":  # SAELens' own loader reads back what was saved
            back32 = SAE.load_from_disk(path, device="cpu")
            x = _inputs().float()
            if not torch.equal(back32.decode(back32.encode(x)), sae.decode(sae.encode(x))):
                print(f"FAIL  {name}: SAELens' own load_from_disk disagrees with the saved object")
                results.append(False)
        back = SAE.load_from_disk(path, device="cpu", dtype="float64").eval()
        results.append(compare(f"{name} [{save}]", path, back.encode, back.decode))
    return results


# --- dictionary_learning ----------------------------------------------------------------------
def dictionary_learning_cases(tmp: Path) -> list[bool]:
    import torch as t
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    results = []
    g = torch.Generator().manual_seed(3)
    offset = torch.randn(D_IN, generator=g)

    def data(n_batches: int, batch: int = 256):
        for _ in range(n_batches):
            yield torch.randn(batch, D_IN, generator=g) + offset

    configs = {
        "AutoEncoder": dict(trainer=StandardTrainer, steps=5, activation_dim=D_IN, dict_size=N_LAT, layer=0,
                            lm_name="synthetic", warmup_steps=1, sparsity_warmup_steps=1, device="cpu", seed=0),
        "AutoEncoderTopK": dict(trainer=TopKTrainer, steps=5, activation_dim=D_IN, dict_size=N_LAT, k=K, layer=0,
                                lm_name="synthetic", warmup_steps=1, device="cpu", seed=0),
    }
    classes = {"AutoEncoder": AutoEncoder, "AutoEncoderTopK": AutoEncoderTopK}
    for cls_name, cfg in configs.items():
        # (a) the library's training loop writes the checkpoint (trainSAE with save_dir)
        out = tmp / f"dl_{cls_name}"
        trainSAE(data(5), [dict(cfg)], steps=5, save_dir=str(out), device="cpu")
        path = out / "trainer_0"
        ae = classes[cls_name].from_pretrained(str(path / "ae.pt")) if cls_name == "AutoEncoderTopK" \
            else classes[cls_name].from_pretrained(str(path / "ae.pt"), normalize_decoder=False)
        ae = ae.double().eval()
        results.append(compare(f"dictionary_learning {cls_name} [trainSAE save_dir]", path, ae.encode, ae.decode))
        # (b) random weights (random decoder norms, nonzero biases), saved the way trainSAE saves
        ae = classes[cls_name](D_IN, N_LAT, K) if cls_name == "AutoEncoderTopK" else classes[cls_name](D_IN, N_LAT)
        _randomise(ae, seed=20, scales={"decoder.weight": 0.5})
        path = tmp / f"dl_{cls_name}_random"
        path.mkdir()
        t.save({k: v.cpu() for k, v in ae.state_dict().items()}, path / "ae.pt")
        ae = ae.double().eval()
        trainer_cfg = {"dict_class": cls_name, "activation_dim": D_IN, "dict_size": N_LAT}
        if cls_name == "AutoEncoderTopK":
            trainer_cfg["k"] = K
        (path / "config.json").write_text(json.dumps({"trainer": trainer_cfg}, indent=4))
        results.append(compare(f"dictionary_learning {cls_name} [random weights, trainSAE layout]", path,
                               ae.encode, ae.decode))
    return results


# --- sparsify -------------------------------------------------------------------------------
def sparsify_cases(tmp: Path) -> list[bool]:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=N_LAT, k=K), device="cpu", dtype=torch.float32)
    _randomise(sae, seed=30, scales={"W_dec": 0.5})
    path = tmp / "sparsify"
    sae.save_to_disk(path)
    sae = SparseCoder.load_from_disk(path, device="cpu").double().eval()

    def encode(x):
        top_acts, top_indices, _ = sae.encode(x)
        return torch.zeros(x.shape[0], N_LAT, dtype=F64).scatter(-1, top_indices, top_acts)

    def decode(codes):  # sparsify decodes the top-k (value, index) pairs
        vals, idx = codes.abs().topk(K, dim=-1)
        return sae.decode(codes.gather(-1, idx), idx)

    return [compare("sparsify SparseCoder (topk) [save_to_disk]", path, encode, decode)]


LIBRARIES = {"saelens": ("sae_lens", saelens_cases), "dictionary_learning": ("dictionary_learning", dictionary_learning_cases),
             "sparsify": ("sparsify", sparsify_cases)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", action="append", choices=sorted(LIBRARIES),
                   help="libraries to check (default: every one importable here)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    wanted = args.lib or [k for k, (mod, _) in LIBRARIES.items() if importlib.util.find_spec(mod) is not None]
    if not wanted:
        print("none of SAELens, dictionary_learning, sparsify is importable in this interpreter "
              f"({sys.executable}); run it with a peer venv's python (benchmarks/peers.sh)")
        return 2
    results: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="sae-parity-") as tmp:
        for lib in wanted:
            results += LIBRARIES[lib][1](Path(tmp))
    n_fail = results.count(False)
    print(f"{len(results) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
