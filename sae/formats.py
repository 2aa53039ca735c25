"""Load dictionaries saved by other libraries into our classes (exactly: same codes, same x_hat).

Formats (field names checked against the libraries' public code):

- SAELens (`SAE.save_model` / `load_from_disk`): a directory with `cfg.json` and
  `sae_weights.safetensors`. Weights W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
  b_dec [d_in], + `threshold` [d_sae] (jumprelu), + b_gate, b_mag, r_mag [d_sae] (gated; no b_enc),
  optional `scaling_factor` [d_sae] (finetuning scaling of codes before decoding). cfg fields:
  `architecture` ("standard" | "topk" | "jumprelu" | "gated"; before v6, a "standard" SAE with
  `activation_fn_str`/`activation_fn` = "topk" and `activation_fn_kwargs.k` was a TopK SAE),
  `d_in`, `d_sae`, `k`, `rescale_acts_by_decoder_norm` (topk), `apply_b_dec_to_input` (default
  True), `normalize_activations` ("none" | "expected_average_only_in" | "constant_norm_rescale" |
  "layer_norm"; a bool before v3).
- dictionary_learning (saprmarks): a directory with `ae.pt` (a state dict; read with
  `torch.load(weights_only=True)`, never unpickling code) and `config.json` whose
  `trainer.dict_class` names the class: "AutoEncoder" (encoder.weight [d_sae, d_in],
  encoder.bias, decoder.weight [d_in, d_sae], bias = b_dec), "AutoEncoderNew" (no input
  centring; decoder.bias), "AutoEncoderTopK" / "BatchTopKSAE" (encoder.*, decoder.weight, b_dec,
  k, threshold), "JumpReluAutoEncoder" (W_enc [d_in, d_sae], b_enc, W_dec, b_dec, threshold; input
  not centred), "GatedAutoEncoder" (encoder.weight, gate_bias, mag_bias, r_mag, decoder.weight,
  decoder_bias).
- sparsify (EleutherAI): a directory with `cfg.json` (d_in, k, num_latents, ...) and
  `sae.safetensors` (encoder.weight [n, d_in], encoder.bias, W_dec [n, d_in], b_dec).

Conversions are exact reparametrisations:

- no input centring (x enters as x, not x - b_dec): b_enc <- b_enc + W_enc b_dec;
- codes reported as c_i * ||W_dec,i|| with decoding by W_dec,i / ||W_dec,i|| (SAELens
  `rescale_acts_by_decoder_norm`; dictionary_learning's JumpReluAutoEncoder and
  GatedAutoEncoder): scale latent i's encoder row and bias (and threshold, or r_mag += log n_i
  and b_mag *= n_i for gated) by n_i = ||W_dec,i|| and divide its decoder row by n_i;
- SAELens `scaling_factor` s_i multiplies codes before decoding: W_dec,i <- s_i W_dec,i.

`load_any(path)` detects the format from the files present (ours: `cfg.json` + `model.safetensors`).

Sites. SAELens names where an SAE reads by its TransformerLens hook (`hook_name`, top-level in
cfg.json before v6, in `metadata` since). Loading maps it to our site and sets `d.site`;
`save_saelens` writes the real hook name (both places):

    blocks.L.hook_resid_pre    embed for L = 0, else resid.{L-1}   (the input of block L)
    blocks.L.hook_resid_post   resid.L                              (the output of block L)
    blocks.L.hook_attn_out     attn.L                               (after W_O, before the residual add)
    blocks.L.hook_mlp_out      mlp.L
    blocks.L.mlp.hook_post     mlp_hidden.L                         (the input of W_out: act(x W_gate) * x W_in
                                                                     for gated MLPs, act(x W_in) otherwise)

Hooks with no site of ours raise a ValueError saying why (pass site=... to load the weights
anyway): `hook_mlp_in` and `hook_resid_mid` (TransformerLens' hook_mlp_in is resid_mid, the
residual stream between attention and MLP *before* ln2; in a parallel block it is resid_pre),
`ln2.hook_normalized` (the MLP input after its norm), `mlp.hook_pre` / `hook_pre_linear`
(pre-activations), `attn.hook_z` (per-head outputs before W_O), `hook_embed` / `hook_pos_embed`
(one embedding alone; blocks.0.hook_resid_pre is their sum, our embed). Our own site names are
accepted as hook names too (files written before the mapping).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .dictionary import CONFIG_FILE, WEIGHTS_FILE, Dictionary, load

SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
DL_WEIGHTS, DL_CONFIG = "ae.pt", "config.json"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"

FORMATS = ("sae-circuits", "saelens", "dictionary_learning", "sparsify")


# --- small helpers ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupted ({e})") from None


def _need(state: dict[str, torch.Tensor], keys: list[str], where: Path) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{where} lacks the weights {missing} (it has {sorted(state)})")


def _check_shape(t: torch.Tensor, shape: tuple[int, ...], name: str, where: Path) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} from the config")
    return t


def _rescale_latents(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                     norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes multiplied by n_i > 0: encoder row and bias of latent i times n_i, decoder row / n_i."""
    if not bool((norms > 0).all()):
        raise ValueError("cannot fold decoder norms: some decoder rows have zero norm")
    return W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]


def _assemble(arch: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
              device: str | torch.device, dtype: torch.dtype) -> Dictionary:
    from .dictionary import build

    model = build(arch, **config).to(dtype)  # at the target dtype first, so float64 stays exact
    state = {k: v.detach().to(torch.float64) for k, v in tensors.items()}
    own = model.state_dict()
    for k, v in state.items():
        if k not in own:
            raise ValueError(f"internal conversion error: {arch} has no tensor {k!r}")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{k} has shape {tuple(v.shape)}, the {arch} model expects {tuple(own[k].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    missing = set(own) - set(state)
    if missing - {"threshold"}:
        raise ValueError(f"internal conversion error: {sorted(missing)} not provided for {arch}")
    return model.to(device=device, dtype=dtype)


# --- SAELens hook names <-> sites (module docstring) ------------------------------------------
_SITE = re.compile(r"^(embed|(resid|attn|mlp|mlp_hidden)\.\d+)$")
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|mlp\.hook_post)$")
_NO_SITE = {
    "hook_mlp_in": "the residual stream between attention and MLP before ln2 (resid_mid)",
    "hook_resid_mid": "the residual stream between attention and MLP",
    "ln2.hook_normalized": "the MLP input after its LayerNorm",
    "mlp.hook_pre": "the MLP pre-activations",
    "mlp.hook_pre_linear": "the MLP's linear (ungated) pre-activations",
    "attn.hook_z": "per-head attention outputs before W_O (attn.L is after W_O)",
    "hook_embed": "the token embedding alone (blocks.0.hook_resid_pre, our embed, includes position embeddings)",
    "hook_pos_embed": "the position embedding alone (blocks.0.hook_resid_pre is our embed)",
}
_MAPPED = ("blocks.L.hook_resid_pre, blocks.L.hook_resid_post, blocks.L.hook_attn_out, "
           "blocks.L.hook_mlp_out, blocks.L.mlp.hook_post")


def site_for_hook(hook_name: str) -> str:
    """Our site for a SAELens/TransformerLens hook name (module docstring); our own site names
    pass through. ValueError for hooks we have no site for."""
    name = str(hook_name).strip()
    if _SITE.match(name):
        return name
    m = _HOOK.match(name)
    if m:
        layer, hook = int(m[1]), m[2]
        if hook == "hook_resid_pre":
            return "embed" if layer == 0 else f"resid.{layer - 1}"
        return {"hook_resid_post": "resid", "hook_attn_out": "attn", "hook_mlp_out": "mlp",
                "mlp.hook_post": "mlp_hidden"}[hook] + f".{layer}"
    tail = re.sub(r"^blocks\.\d+\.", "", name)
    why = _NO_SITE.get(tail)
    raise ValueError(f"SAELens hook {name!r} " + (f"reads {why}, where sae-circuits has no site" if why else
                     "is not one sae-circuits maps to a site") +
                     f"; mapped hooks: {_MAPPED} (or our site names: embed, resid.L, attn.L, mlp.L, mlp_hidden.L)")


def hook_for_site(site: str) -> str:
    """The SAELens/TransformerLens hook name of our site (inverse of `site_for_hook`; embed is
    blocks.0.hook_resid_pre and resid.L is written as blocks.L.hook_resid_post)."""
    m = _SITE.match(str(site))
    if not m:
        raise ValueError(f"{site!r} is not a site name; sites are embed, resid.L, attn.L, mlp.L, mlp_hidden.L")
    if site == "embed":
        return "blocks.0.hook_resid_pre"
    kind, layer = str(site).split(".")
    return f"blocks.{layer}." + {"resid": "hook_resid_post", "attn": "hook_attn_out", "mlp": "hook_mlp_out",
                                 "mlp_hidden": "mlp.hook_post"}[kind]


def saelens_hook_name(cfg: dict[str, Any]) -> str | None:
    """The hook name of a SAELens cfg.json (v6: metadata.hook_name; before: hook_name), or None."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    name = meta.get("hook_name") or cfg.get("hook_name")
    return str(name) if name else None


# --- SAELens ---------------------------------------------------------------------------------
def load_saelens(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32,
                 norm_scaling_factor: float | None = None, site: str | None = None) -> Dictionary:
    """Load a SAELens checkpoint directory (`cfg.json` + `sae_weights.safetensors`).

    The result's `site` attribute is our site for its hook name (module docstring; None when the
    file names none); a hook with no site of ours raises, unless `site` is given (then used as is).
    `norm_scaling_factor`: for checkpoints saved with normalize_activations =
    "expected_average_only_in" (the factor was not folded in yet), the scale s the inputs were
    multiplied by during training; it is folded so the result works on raw activations."""
    path = Path(path)
    cfg_path, w_path = path / SAELENS_CFG, path / SAELENS_WEIGHTS
    cfg = _read_json(cfg_path)
    if site is not None:
        if not _SITE.match(str(site)):
            raise ValueError(f"site={site!r} is not a site name; sites are embed, resid.L, attn.L, mlp.L, mlp_hidden.L")
    elif (hook := saelens_hook_name(cfg)) is not None:
        try:
            site = site_for_hook(hook)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}. Pass site=... to load it at a site of your choice") from None
    state = _read_safetensors(w_path)
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    if arch == "standard" and act_fn == "topk":
        arch = "topk"  # SAELens < 6 stored TopK SAEs as "standard" + activation_fn "topk"
    if arch not in ("standard", "topk", "jumprelu", "gated"):
        raise ValueError(f"{cfg_path}: SAELens architecture {arch!r} is not supported; supported: "
                         "'standard', 'topk', 'jumprelu', 'gated'")
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks the field {e.args[0]!r}") from None
    norm = cfg.get("normalize_activations", "none")
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    norm = norm or "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise NotImplementedError(f"{cfg_path}: normalize_activations={norm!r} rescales every token "
                                  "non-linearly, which our dictionaries cannot represent")
    if norm == "expected_average_only_in" and norm_scaling_factor is None:
        raise ValueError(f"{cfg_path} says normalize_activations='expected_average_only_in' but the "
                         "scale is not folded into the weights: pass norm_scaling_factor=s (the factor "
                         "the inputs were multiplied by in training), or norm_scaling_factor=1.0 to "
                         "use the weights as they are")
    if norm not in ("none", "expected_average_only_in"):
        raise ValueError(f"{cfg_path}: unknown normalize_activations {norm!r}")
    keys = ["W_enc", "W_dec", "b_dec"] + (["b_gate", "b_mag", "r_mag"] if arch == "gated" else ["b_enc"])
    if arch == "jumprelu":
        keys.append("threshold")
    _need(state, keys, w_path)
    st = {k: v.double() for k, v in state.items()}
    W_enc = _check_shape(st["W_enc"], (d_in, d_sae), "W_enc", w_path).T  # -> [d_sae, d_in]
    W_dec = _check_shape(st["W_dec"], (d_sae, d_in), "W_dec", w_path)
    b_dec = _check_shape(st["b_dec"], (d_in,), "b_dec", w_path)
    if "scaling_factor" in st:
        sf = _check_shape(st["scaling_factor"], (d_sae,), "scaling_factor", w_path)
        W_dec = W_dec * sf[:, None]
    apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
    shift = W_enc @ b_dec if not apply_b_dec else torch.zeros(d_sae, dtype=torch.float64)  # [d_sae]
    if arch == "gated":
        r_mag = _check_shape(st["r_mag"], (d_sae,), "r_mag", w_path)
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_dec": b_dec, "r_mag": r_mag,
                   "b_gate": _check_shape(st["b_gate"], (d_sae,), "b_gate", w_path) + shift,
                   "b_mag": _check_shape(st["b_mag"], (d_sae,), "b_mag", w_path) + r_mag.exp() * shift}
        model = _assemble("gated", {"d_in": d_in, "n_latents": d_sae}, tensors, device, dtype)
    else:
        b_enc = _check_shape(st["b_enc"], (d_sae,), "b_enc", w_path) + shift
        config: dict[str, Any] = {"d_in": d_in, "n_latents": d_sae}
        if arch == "topk":
            k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
            if k is None:
                raise ValueError(f"{cfg_path}: a topk SAE needs 'k' (or activation_fn_kwargs.k)")
            config["k"] = int(k)
            if cfg.get("rescale_acts_by_decoder_norm", False):
                W_enc, b_enc, W_dec = _rescale_latents(W_enc, b_enc, W_dec, W_dec.norm(dim=1))
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
        if arch == "jumprelu":
            tensors["threshold"] = _check_shape(st["threshold"], (d_sae,), "threshold", w_path)
        name = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
        model = _assemble(name, config, tensors, device, dtype)
    if norm == "expected_average_only_in" and norm_scaling_factor != 1.0:
        model.fold_scale(float(norm_scaling_factor))
    model.site = site
    return model


def save_saelens(d: Dictionary, path: str | os.PathLike, hook_name: str | None = None) -> Path:
    """Write `d` as a SAELens checkpoint directory (`cfg.json` + `sae_weights.safetensors`) that
    SAELens' `load_from_disk` and `load_saelens` read back exactly. Supported: relu ("standard"),
    topk, jumprelu; the weights are written as they are (already folded, inputs centred by b_dec).

    hook_name: our site ("resid.3", written as its hook "blocks.3.hook_resid_post") or a hook
    name that maps to one (written as given); default `d.site` when set. Written as `hook_name`
    and `metadata.hook_name` (SAELens before / since v6)."""
    hook_name = hook_name if hook_name is not None else getattr(d, "site", None)
    if hook_name:
        if _SITE.match(str(hook_name)):
            hook_name = hook_for_site(hook_name)
        else:
            site_for_hook(hook_name)          # a hook name we map (else a ValueError saying why)
            hook_name = str(hook_name)
    from safetensors.torch import save_file

    from .io import atomic_path

    names = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
    if d.architecture not in names or getattr(d, "tied", False):
        raise ValueError(f"SAELens has no equivalent of our {d.architecture!r}"
                         f"{' (tied)' if getattr(d, 'tied', False) else ''} dictionary; supported: {sorted(names)}")
    state = {k: v.detach().cpu().float() for k, v in d.state_dict().items()}
    tensors = {"W_enc": state["W_enc"].T.contiguous(), "W_dec": state["W_dec"].contiguous(),
               "b_enc": state["b_enc"], "b_dec": state["b_dec"]}
    if d.architecture == "jumprelu":
        tensors["threshold"] = state["threshold"]
    cfg: dict[str, Any] = {"architecture": names[d.architecture], "d_in": d.d_in, "d_sae": d.n_latents,
                           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                           "normalize_activations": "none", "hook_name": hook_name or "",
                           "metadata": {"hook_name": hook_name or ""}}
    if d.architecture == "topk":
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / SAELENS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(path / SAELENS_CFG) as tmp:
        tmp.write_text(json.dumps(cfg, indent=2))
    return path


# --- dictionary_learning ---------------------------------------------------------------------
_DL_CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE",
               "JumpReluAutoEncoder", "GatedAutoEncoder")


def _read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"{path} is truncated, corrupted or not a plain state dict ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} must hold a state dict of tensors, got {type(state).__name__}")
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # torch.compile'd saves


def _infer_dl_class(state: dict[str, torch.Tensor], where: Path) -> str:
    if "r_mag" in state:
        return "GatedAutoEncoder"
    if "W_enc" in state and "threshold" in state:
        return "JumpReluAutoEncoder"
    if "bias" in state:
        return "AutoEncoder"
    if "decoder.bias" in state:
        return "AutoEncoderNew"
    raise ValueError(f"{where}: cannot tell the dictionary_learning class from the weights "
                     f"{sorted(state)}; add {DL_CONFIG} or pass dict_class= (one of {list(_DL_CLASSES)})")


def load_dictionary_learning(path: str | os.PathLike, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32, dict_class: str | None = None) -> Dictionary:
    """Load a dictionary_learning checkpoint: a directory with `ae.pt` (+ `config.json`), or the
    `ae.pt` file itself. `dict_class` overrides `config.json`'s trainer.dict_class."""
    path = Path(path)
    directory = path.parent if path.is_file() else path
    w_path = path if path.is_file() else path / DL_WEIGHTS
    state = {k: v.double() for k, v in _read_torch_state(w_path).items()}
    trainer: dict[str, Any] = {}
    if (directory / DL_CONFIG).is_file():
        trainer = _read_json(directory / DL_CONFIG).get("trainer", {}) or {}
    cls_name = dict_class or trainer.get("dict_class") or _infer_dl_class(state, w_path)
    if cls_name not in _DL_CLASSES:
        raise ValueError(f"dictionary_learning class {cls_name!r} is not supported; supported: {list(_DL_CLASSES)}")

    if cls_name == "JumpReluAutoEncoder":
        _need(state, ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"], w_path)
        W_enc, b_enc, W_dec, b_dec = state["W_enc"].T, state["b_enc"], state["W_dec"], state["b_dec"]
        b_enc = b_enc + W_enc @ b_dec  # their encoder does not centre the input by default
        n_lat, d_in = W_enc.shape
        norms = W_dec.norm(dim=1)  # they report codes times ||W_dec,i||
        W_enc, b_enc, W_dec = _rescale_latents(W_enc, b_enc, W_dec, norms)
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                   "threshold": state["threshold"] * norms}
        return _assemble("jumprelu", {"d_in": d_in, "n_latents": n_lat}, tensors, device, dtype)

    if cls_name == "GatedAutoEncoder":
        _need(state, ["encoder.weight", "gate_bias", "mag_bias", "r_mag", "decoder.weight", "decoder_bias"], w_path)
        W_enc, W_dec = state["encoder.weight"], state["decoder.weight"].T
        n_lat, d_in = W_enc.shape
        norms = W_dec.norm(dim=1)  # codes reported times ||W_dec,i||
        if not bool((norms > 0).all()):
            raise ValueError(f"{w_path}: some decoder rows have zero norm")
        tensors = {"W_enc": W_enc, "b_gate": state["gate_bias"], "r_mag": state["r_mag"] + norms.log(),
                   "b_mag": state["mag_bias"] * norms, "W_dec": W_dec / norms[:, None],
                   "b_dec": state["decoder_bias"]}
        return _assemble("gated", {"d_in": d_in, "n_latents": n_lat}, tensors, device, dtype)

    _need(state, ["encoder.weight", "encoder.bias", "decoder.weight"], w_path)
    W_enc, b_enc, W_dec = state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T
    n_lat, d_in = W_enc.shape
    if cls_name == "AutoEncoder":
        _need(state, ["bias"], w_path)
        tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": state["bias"]}
        return _assemble("relu", {"d_in": d_in, "n_latents": n_lat}, tensors, device, dtype)
    if cls_name == "AutoEncoderNew":
        _need(state, ["decoder.bias"], w_path)
        b_dec = state["decoder.bias"]
        tensors = {"W_enc": W_enc, "b_enc": b_enc + W_enc @ b_dec, "W_dec": W_dec, "b_dec": b_dec}
        return _assemble("relu", {"d_in": d_in, "n_latents": n_lat}, tensors, device, dtype)
    # AutoEncoderTopK / BatchTopKSAE
    _need(state, ["b_dec"], w_path)
    k = trainer.get("k", state["k"].item() if "k" in state else None)
    if k is None:
        raise ValueError(f"{w_path}: no k in the weights or in {DL_CONFIG}")
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": state["b_dec"]}
    config = {"d_in": d_in, "n_latents": n_lat, "k": int(k)}
    if cls_name == "AutoEncoderTopK":
        return _assemble("topk", config, tensors, device, dtype)
    if "threshold" in state:
        tensors["threshold"] = state["threshold"].reshape(())
    return _assemble("batchtopk", config, tensors, device, dtype)


# --- sparsify --------------------------------------------------------------------------------
def load_sparsify(path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Dictionary:
    """Load an EleutherAI sparsify TopK SAE directory (`cfg.json` + `sae.safetensors`)."""
    path = Path(path)
    cfg_path, w_path = path / SPARSIFY_CFG, path / SPARSIFY_WEIGHTS
    cfg = _read_json(cfg_path)
    for flag in ("transcode", "skip_connection", "signed"):
        if cfg.get(flag):
            raise NotImplementedError(f"{cfg_path}: sparsify option {flag}=true is not supported")
    if cfg.get("activation", "topk") != "topk":
        raise NotImplementedError(f"{cfg_path}: sparsify activation {cfg['activation']!r} is not "
                                  "supported (only 'topk')")
    if "k" not in cfg:
        raise ValueError(f"{cfg_path} lacks the field 'k'")
    state = {k: v.double() for k, v in _read_safetensors(w_path).items()}
    _need(state, ["encoder.weight", "encoder.bias", "W_dec", "b_dec"], w_path)
    n_lat, d_in = state["encoder.weight"].shape
    tensors = {"W_enc": state["encoder.weight"], "b_enc": state["encoder.bias"],
               "W_dec": _check_shape(state["W_dec"], (n_lat, d_in), "W_dec", w_path), "b_dec": state["b_dec"]}
    return _assemble("topk", {"d_in": d_in, "n_latents": n_lat, "k": int(cfg["k"])}, tensors, device, dtype)


# --- detection -------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """Which format a checkpoint directory (or its weights file) is in: one of FORMATS."""
    p = Path(path)
    if p.is_file():
        if p.name == DL_WEIGHTS:
            return "dictionary_learning"
        p = p.parent
    if not p.is_dir():
        raise FileNotFoundError(f"{path} does not exist")
    names = {q.name for q in p.iterdir()}
    if CONFIG_FILE in names and WEIGHTS_FILE in names:
        return "sae-circuits"
    if SAELENS_CFG in names and SAELENS_WEIGHTS in names:
        return "saelens"
    if DL_WEIGHTS in names:
        return "dictionary_learning"
    if SPARSIFY_CFG in names and SPARSIFY_WEIGHTS in names:
        return "sparsify"
    raise ValueError(
        f"{p} is not a known dictionary checkpoint (files: {sorted(names)[:20]}); expected one of: "
        f"{CONFIG_FILE}+{WEIGHTS_FILE} (sae-circuits), {SAELENS_CFG}+{SAELENS_WEIGHTS} (SAELens), "
        f"{DL_WEIGHTS} [+ {DL_CONFIG}] (dictionary_learning), {SPARSIFY_CFG}+{SPARSIFY_WEIGHTS} (sparsify)")


def load_any(path: str | os.PathLike, device: str | torch.device = "cpu", **kwargs: Any) -> Dictionary:
    """Load a dictionary in any supported format (see `detect_format`); kwargs go to that loader."""
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "sae-circuits":
        if kwargs:
            raise TypeError(f"our own format takes no extra options, got {sorted(kwargs)}")
        return load(p.parent if p.is_file() else p, device=device)
    if fmt == "saelens":
        return load_saelens(p.parent if p.is_file() else p, device=device, **kwargs)
    if fmt == "dictionary_learning":
        return load_dictionary_learning(p, device=device, **kwargs)
    return load_sparsify(p.parent if p.is_file() else p, device=device, **kwargs)
