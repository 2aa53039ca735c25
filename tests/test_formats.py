"""Loading SAELens, dictionary_learning and sparsify checkpoints built by hand from known
weights: encode/decode must equal each library's own formulas (written out here)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae.architectures import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from sae.formats import (detect_format, load_any, load_dictionary_learning, load_saelens,
                         load_sparsify)

D, S = 10, 24  # d_in, d_sae


@pytest.fixture
def W():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {"W_enc": r(D, S) * 0.5, "W_dec": r(S, D) * (torch.rand(S, 1, generator=g) + 0.5),
            "b_enc": r(S) * 0.3, "b_dec": r(D), "threshold": torch.rand(S, generator=g) * 0.5,
            "b_gate": r(S) * 0.3, "b_mag": r(S) * 0.3, "r_mag": r(S) * 0.2,
            "x": r(40, D) * 2 + 1}


def write_saelens(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def close(a, b):
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def topk_dense(pre, k):
    v, i = pre.topk(k)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


# --- SAELens ----------------------------------------------------------------------------------
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_standard(W, tmp_path, apply_b_dec):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "dtype": "float32"}
    p = write_saelens(tmp_path / "std", cfg, {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    m = load_saelens(p)
    assert isinstance(m, ReLUSAE)
    x = W["x"]
    sae_in = x - W["b_dec"] * apply_b_dec
    f = F.relu(sae_in @ W["W_enc"] + W["b_enc"])
    assert close(m.encode(x), f)
    assert close(m.decode(f), f @ W["W_dec"] + W["b_dec"])
    assert torch.allclose(m.W_dec, W["W_dec"])


def test_saelens_topk_v6_and_pre_v6_and_decoder_norm_rescaling(W, tmp_path):
    x = W["x"]
    base = {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    pre = (x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]
    m6 = load_saelens(write_saelens(tmp_path / "v6", {"architecture": "topk", "d_in": D, "d_sae": S, "k": 3}, base))
    old_cfg = {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
               "d_in": D, "d_sae": S, "normalize_activations": False}
    m5 = load_saelens(write_saelens(tmp_path / "v5", old_cfg, base))
    for m in (m6, m5):
        assert isinstance(m, TopKSAE) and m.k == 3
        f = topk_dense(pre, 3)
        assert close(m.encode(x), f) and close(m(x), f @ W["W_dec"] + W["b_dec"])
    # rescale_acts_by_decoder_norm: hidden_pre * ||W_dec,i|| ranks and is decoded by W_dec,i / ||W_dec,i||
    cfg = {"architecture": "topk", "d_in": D, "d_sae": S, "k": 3, "rescale_acts_by_decoder_norm": True}
    m = load_saelens(write_saelens(tmp_path / "rescaled", cfg, base))
    norms = W["W_dec"].norm(dim=1)
    f = topk_dense(pre * norms, 3)
    assert close(m.encode(x), f)
    assert close(m(x), (f / norms) @ W["W_dec"] + W["b_dec"])


def test_saelens_jumprelu_gemma_scope_style(W, tmp_path):
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": S, "apply_b_dec_to_input": False,
           "normalize_activations": None}
    p = write_saelens(tmp_path / "jr", cfg, {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")})
    m = load_saelens(p)
    assert isinstance(m, JumpReLUSAE)
    x = W["x"]
    z = x @ W["W_enc"] + W["b_enc"]
    f = F.relu(z) * (z > W["threshold"])
    assert close(m.encode(x), f) and close(m(x), f @ W["W_dec"] + W["b_dec"])
    assert (f > 0).any() and (f == 0).any()


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_saelens_gated(W, tmp_path, apply_b_dec):
    cfg = {"architecture": "gated", "d_in": D, "d_sae": S, "apply_b_dec_to_input": apply_b_dec}
    keys = ("W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag")
    m = load_saelens(write_saelens(tmp_path / "g", cfg, {k: W[k] for k in keys}))
    assert isinstance(m, GatedSAE)
    x = W["x"]
    sae_in = x - W["b_dec"] * apply_b_dec
    active = (sae_in @ W["W_enc"] + W["b_gate"] > 0).float()
    f = active * F.relu(sae_in @ (W["W_enc"] * W["r_mag"].exp()) + W["b_mag"])
    assert close(m.encode(x), f) and close(m(x), f @ W["W_dec"] + W["b_dec"])


def test_saelens_finetuning_scaling_factor_is_folded_into_the_decoder(W, tmp_path):
    sf = torch.rand(S) + 0.5
    tensors = {**{k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}, "scaling_factor": sf}
    m = load_saelens(write_saelens(tmp_path / "sf", {"d_in": D, "d_sae": S}, tensors))
    x = W["x"]
    f = F.relu((x - W["b_dec"]) @ W["W_enc"] + W["b_enc"])
    assert close(m(x), (f * sf) @ W["W_dec"] + W["b_dec"])


def test_saelens_unfolded_norm_scaling_needs_the_factor(W, tmp_path):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "normalize_activations": "expected_average_only_in"}
    p = write_saelens(tmp_path / "n", cfg, {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    with pytest.raises(ValueError, match="norm_scaling_factor"):
        load_saelens(p)
    s = 0.25
    m = load_saelens(p, norm_scaling_factor=s)
    x = W["x"]
    f = F.relu((s * x - W["b_dec"]) @ W["W_enc"] + W["b_enc"])  # trained on s*x
    assert close(m.encode(x), f) and close(m(x), (f @ W["W_dec"] + W["b_dec"]) / s)
    for bad in ("layer_norm", "constant_norm_rescale"):
        cfg["normalize_activations"] = bad
        (p / "cfg.json").write_text(json.dumps(cfg))
        with pytest.raises(NotImplementedError, match=bad):
            load_saelens(p)


def test_saelens_errors(W, tmp_path):
    base = {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    p = write_saelens(tmp_path / "e", {"architecture": "matryoshka", "d_in": D, "d_sae": S}, base)
    with pytest.raises(ValueError, match="'standard', 'topk', 'jumprelu', 'gated'"):
        load_saelens(p)
    p = write_saelens(tmp_path / "e2", {"architecture": "jumprelu", "d_in": D, "d_sae": S}, base)
    with pytest.raises(ValueError, match=r"lacks the weights \['threshold'\]"):
        load_saelens(p)
    p = write_saelens(tmp_path / "e3", {"architecture": "standard", "d_in": D + 1, "d_sae": S}, base)
    with pytest.raises(ValueError, match="W_enc has shape"):
        load_saelens(p)
    p = write_saelens(tmp_path / "e4", {"architecture": "topk", "d_in": D, "d_sae": S}, base)
    with pytest.raises(ValueError, match="needs 'k'"):
        load_saelens(p)
    p = write_saelens(tmp_path / "e5", {"d_in": D, "d_sae": S}, base)
    w = p / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_saelens(p)


# --- dictionary_learning -------------------------------------------------------------------
class NotATensor:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""


def write_dl(path, dict_class, state, **trainer):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "ae.pt")
    (path / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, **trainer},
                                                  "buffer": {"ctx_len": 128}}))
    return path


def test_dl_autoencoder_and_autoencoder_new(W, tmp_path):
    x = W["x"]
    enc_w, dec_w = W["W_enc"].T.contiguous(), W["W_dec"].T.contiguous()  # nn.Linear layouts
    st = {"bias": W["b_dec"], "encoder.weight": enc_w, "encoder.bias": W["b_enc"], "decoder.weight": dec_w}
    m = load_dictionary_learning(write_dl(tmp_path / "ae", "AutoEncoder", st))
    assert isinstance(m, ReLUSAE)
    f = F.relu((x - W["b_dec"]) @ enc_w.T + W["b_enc"])  # encode: relu(encoder(x - bias))
    assert close(m.encode(x), f) and close(m(x), f @ dec_w.T + W["b_dec"])
    st = {"encoder.weight": enc_w, "encoder.bias": W["b_enc"], "decoder.weight": dec_w, "decoder.bias": W["b_dec"]}
    m = load_dictionary_learning(write_dl(tmp_path / "new", "AutoEncoderNew", st))
    f = F.relu(x @ enc_w.T + W["b_enc"])  # no centring
    assert close(m.encode(x), f) and close(m(x), f @ dec_w.T + W["b_dec"])


def test_dl_topk_and_batchtopk(W, tmp_path):
    x = W["x"]
    enc_w, dec_w = W["W_enc"].T.contiguous(), W["W_dec"].T.contiguous()
    st = {"encoder.weight": enc_w, "encoder.bias": W["b_enc"], "decoder.weight": dec_w, "b_dec": W["b_dec"],
          "k": torch.tensor(3, dtype=torch.int), "threshold": torch.tensor(0.4)}
    post_relu = F.relu((x - W["b_dec"]) @ enc_w.T + W["b_enc"])
    m = load_dictionary_learning(write_dl(tmp_path / "tk", "AutoEncoderTopK", st, k=3))
    assert isinstance(m, TopKSAE) and m.k == 3
    f = topk_dense(post_relu, 3)
    assert close(m.encode(x), f) and close(m(x), f @ dec_w.T + W["b_dec"])
    m = load_dictionary_learning(write_dl(tmp_path / "btk", "BatchTopKSAE", st, k=3))
    assert isinstance(m, BatchTopKSAE) and float(m.threshold) == pytest.approx(0.4)
    f = post_relu * (post_relu > 0.4)  # inference: use_threshold=True
    assert close(m.encode(x), f) and close(m(x), f @ dec_w.T + W["b_dec"])


def test_dl_jumprelu_autoencoder(W, tmp_path):
    x = W["x"]
    st = {k: W[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    m = load_dictionary_learning(write_dl(tmp_path / "jr", "JumpReluAutoEncoder", st))
    assert isinstance(m, JumpReLUSAE)
    pre = x @ W["W_enc"] + W["b_enc"]  # apply_b_dec_to_input defaults to False
    norms = W["W_dec"].norm(dim=1)
    f = F.relu(pre * (pre > W["threshold"])) * norms  # codes reported times ||W_dec,i||
    assert close(m.encode(x), f)
    assert close(m(x), (f / norms) @ W["W_dec"] + W["b_dec"])


def test_dl_gated_autoencoder(W, tmp_path):
    x = W["x"]
    enc_w, dec_w = W["W_enc"].T.contiguous(), W["W_dec"].T.contiguous()
    st = {"decoder_bias": W["b_dec"], "encoder.weight": enc_w, "r_mag": W["r_mag"],
          "gate_bias": W["b_gate"], "mag_bias": W["b_mag"], "decoder.weight": dec_w}
    m = load_dictionary_learning(write_dl(tmp_path / "g", "GatedAutoEncoder", st))
    assert isinstance(m, GatedSAE)
    x_enc = (x - W["b_dec"]) @ enc_w.T
    f = (x_enc + W["b_gate"] > 0).float() * F.relu(W["r_mag"].exp() * x_enc + W["b_mag"])
    norms = dec_w.norm(dim=0)
    f = f * norms
    assert close(m.encode(x), f)
    assert close(m(x), (f / norms) @ dec_w.T + W["b_dec"])


def test_dl_class_inference_override_and_errors(W, tmp_path):
    st = {"bias": W["b_dec"], "encoder.weight": W["W_enc"].T.contiguous(), "encoder.bias": W["b_enc"],
          "decoder.weight": W["W_dec"].T.contiguous()}
    p = tmp_path / "noconfig"
    p.mkdir()
    torch.save(st, p / "ae.pt")
    assert isinstance(load_dictionary_learning(p / "ae.pt"), ReLUSAE)  # inferred from "bias"
    with pytest.raises(ValueError, match="not supported"):
        load_dictionary_learning(p, dict_class="CrossCoder")
    (p / "ae.pt").write_bytes(b"garbage, not a zip or pickle")
    with pytest.raises(ValueError, match="truncated, corrupted"):
        load_dictionary_learning(p)
    torch.save({"encoder.weight": NotATensor()}, p / "ae.pt")
    with pytest.raises(ValueError, match="not a plain state dict"):
        load_dictionary_learning(p)  # weights_only refuses to unpickle arbitrary objects


# --- sparsify and detection ----------------------------------------------------------------
def test_sparsify_topk(W, tmp_path):
    p = tmp_path / "layers.3"
    p.mkdir()
    (p / "cfg.json").write_text(json.dumps({"expansion_factor": 2, "normalize_decoder": True,
                                             "num_latents": S, "k": 4, "multi_topk": False, "d_in": D}))
    save_file({"encoder.weight": W["W_enc"].T.contiguous(), "encoder.bias": W["b_enc"],
               "W_dec": W["W_dec"], "b_dec": W["b_dec"]}, str(p / "sae.safetensors"))
    m = load_sparsify(p)
    x = W["x"]
    f = topk_dense(F.relu((x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]), 4)
    assert isinstance(m, TopKSAE) and close(m.encode(x), f) and close(m(x), f @ W["W_dec"] + W["b_dec"])


def test_load_any_detects_every_format(W, tmp_path):
    ours = TopKSAE(D, S, k=2)
    ours.save(tmp_path / "ours")
    write_saelens(tmp_path / "sl", {"d_in": D, "d_sae": S}, {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    write_dl(tmp_path / "dl", "AutoEncoder", {"bias": W["b_dec"], "encoder.weight": W["W_enc"].T.contiguous(),
                                             "encoder.bias": W["b_enc"], "decoder.weight": W["W_dec"].T.contiguous()})
    expected = {"ours": "sae-circuits", "sl": "saelens", "dl": "dictionary_learning"}
    for name, fmt in expected.items():
        assert detect_format(tmp_path / name) == fmt
    assert detect_format(tmp_path / "dl" / "ae.pt") == "dictionary_learning"
    x = W["x"]
    assert torch.equal(load_any(tmp_path / "ours").encode(x), ours.encode(x))
    assert isinstance(load_any(tmp_path / "sl"), ReLUSAE)
    assert isinstance(load_any(tmp_path / "dl" / "ae.pt"), ReLUSAE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a known dictionary checkpoint.*sae_weights.safetensors"):
        load_any(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        load_any(tmp_path / "missing")


@pytest.mark.parametrize("arch,kw", [("relu", {}), ("topk", {"k": 3}), ("jumprelu", {})])
def test_save_saelens_round_trip(arch, kw, tmp_path):
    from sae.dictionary import build
    from sae.formats import load_saelens, save_saelens

    torch.manual_seed(0)
    d = build(arch, d_in=8, n_latents=16, **kw)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_saelens(d, tmp_path / arch, hook_name="resid.3")
    cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
    assert cfg["d_sae"] == 16 and cfg["hook_name"] == "blocks.3.hook_resid_post"   # the real hook name
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"               # where SAELens v6 reads it
    back = load_saelens(tmp_path / arch)
    x = torch.randn(5, 8)
    assert back.architecture == arch and back.site == "resid.3"
    assert torch.allclose(back.encode(x), d.encode(x), atol=1e-6)
    assert torch.allclose(back(x), d(x), atol=1e-6)


def test_save_saelens_refuses_what_saelens_cannot_hold(tmp_path):
    from sae.dictionary import build
    from sae.formats import save_saelens

    with pytest.raises(ValueError, match="no equivalent"):
        save_saelens(build("gated", d_in=4, n_latents=8), tmp_path)


# --- SAELens hook names <-> our sites ---------------------------------------------------------------
HOOKS = [("blocks.0.hook_resid_pre", "embed"), ("blocks.4.hook_resid_pre", "resid.3"),
         ("blocks.4.hook_resid_post", "resid.4"), ("blocks.2.hook_attn_out", "attn.2"),
         ("blocks.7.hook_mlp_out", "mlp.7"), ("blocks.11.mlp.hook_post", "mlp_hidden.11")]


@pytest.mark.parametrize("hook,site", HOOKS)
@pytest.mark.parametrize("where", ["v6 metadata", "pre-v6 top level"])
def test_saelens_hook_names_map_to_sites_on_load(W, tmp_path, hook, site, where):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S}
    if where == "v6 metadata":
        cfg["metadata"] = {"hook_name": hook, "model_name": "gpt2"}
    else:
        cfg.update(hook_name=hook, hook_layer=int(hook.split(".")[1]))
    m = load_saelens(write_saelens(tmp_path / "s", cfg, {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}))
    assert m.site == site
    assert load_any(tmp_path / "s").site == site


@pytest.mark.parametrize("site", ["embed", "resid.0", "resid.29", "attn.3", "mlp.12", "mlp_hidden.5"])
def test_sites_round_trip_through_saelens_files(tmp_path, site):
    from sae.formats import hook_for_site, save_saelens, site_for_hook

    hook = hook_for_site(site)
    assert hook.startswith("blocks.") and site_for_hook(hook) == site
    d = TopKSAE(8, 16, k=2)
    d.site = site                                   # save_saelens takes the site from the dictionary
    save_saelens(d, tmp_path / "rt")
    cfg = json.loads((tmp_path / "rt" / "cfg.json").read_text())
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == hook
    assert load_saelens(tmp_path / "rt").site == site


def test_hook_names_written_by_hand_in_the_saelens_layout(tmp_path):
    """A cfg.json as SAELens 6 writes it, typed in full: the site comes from metadata.hook_name."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    path = tmp_path / "hand"
    path.mkdir()
    (path / "cfg.json").write_text("""{
      "d_in": 6, "d_sae": 12, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": true,
      "normalize_activations": "none", "reshape_activations": "none", "k": 3,
      "rescale_acts_by_decoder_norm": false, "architecture": "topk",
      "metadata": {"sae_lens_version": "6.5.1", "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre",
                   "hook_head_index": null, "prepend_bos": true, "context_size": 128}
    }""")
    save_file({"W_enc": torch.randn(6, 12, generator=g), "W_dec": torch.randn(12, 6, generator=g),
               "b_enc": torch.randn(12, generator=g), "b_dec": torch.randn(6, generator=g)},
              str(path / "sae_weights.safetensors"))
    m = load_saelens(path)
    assert isinstance(m, TopKSAE) and m.k == 3 and m.site == "resid.7"


@pytest.mark.parametrize("hook,why", [
    ("blocks.3.hook_mlp_in", "before ln2"), ("blocks.3.hook_resid_mid", "between"),
    ("blocks.3.ln2.hook_normalized", "after its LayerNorm"), ("blocks.3.attn.hook_z", "before W_O"),
    ("blocks.3.mlp.hook_pre", "pre-activations"), ("hook_embed", "token embedding alone"), ("blocks.3.hook_q", "not one")])
def test_unmapped_hook_names_fail_clearly_unless_a_site_is_given(W, tmp_path, hook, why):
    from sae.formats import save_saelens, site_for_hook

    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "hook_name": hook}
    p = write_saelens(tmp_path / "u", cfg, {k: W[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")})
    with pytest.raises(ValueError, match=f"{hook}.*{why}.*mapped hooks: blocks.L.hook_resid_pre"):
        site_for_hook(hook)
    with pytest.raises(ValueError, match="Pass site=... to load it"):
        load_saelens(p)
    m = load_saelens(p, site="resid.3")                           # an explicit choice wins
    assert m.site == "resid.3"
    with pytest.raises(ValueError, match="not a site name"):
        load_saelens(p, site="blocks.3.hook_mlp_in")
    with pytest.raises(ValueError, match=f"{hook}"):
        save_saelens(ReLUSAE(D, S), tmp_path / "w", hook_name=hook)
