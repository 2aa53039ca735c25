"""Sites are discovered from the module tree and read/write the right tensors on every architecture."""
import pytest
import torch

from sae import tracing
from sae.harvesting import trace_sites
from sae.sites import resolve_sites


def _hidden(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids, output_hidden_states=True).hidden_states


def test_every_layer_has_every_kind(tiny):
    names = set(tiny.sites)
    assert "embed" in names
    for layer in range(2):
        assert {f"resid.{layer}", f"attn.{layer}", f"mlp.{layer}", f"mlp_hidden.{layer}"} <= names
    assert tiny.d_model == 32 and tiny.n_layers == 2
    # the hidden width is the MLP's inner size, not d_model
    assert tiny.sites["mlp_hidden.0"].width > 32
    orders = [s.order for s in tiny.sites.values()]
    assert orders == sorted(orders)


def test_reads_match_the_plain_forward(tiny):
    ids = torch.randint(2, 250, (2, 7))
    sites = resolve_sites(tiny, ["embed", "attn.*", "mlp.*", "mlp_hidden.*", "resid.*"])
    acts = trace_sites(tiny, ids, None, sites)
    hidden = _hidden(tiny, ids)
    assert torch.allclose(acts["embed"], hidden[0], atol=1e-6)
    # hidden_states[-1] is taken after the final norm, so compare the earlier blocks only
    assert torch.allclose(acts["resid.0"], hidden[1], atol=1e-6)
    for layer in range(2):
        # every architecture here adds attention and MLP outputs to the residual stream
        resid_in = acts["embed"] if layer == 0 else acts[f"resid.{layer - 1}"]
        delta = acts[f"resid.{layer}"] - resid_in
        assert torch.allclose(delta, acts[f"attn.{layer}"] + acts[f"mlp.{layer}"], atol=1e-5)
        # the MLP's output projection maps its hidden activations to the MLP output
        proj = tiny.hf.get_submodule(tiny.sites[f"mlp_hidden.{layer}"].module)
        with torch.no_grad():
            assert torch.allclose(proj(acts[f"mlp_hidden.{layer}"]), acts[f"mlp.{layer}"], atol=1e-5)


def test_write_replaces_the_activation(tiny):
    ids = torch.randint(2, 250, (2, 5))
    site = tiny.site("mlp.0")
    with torch.no_grad():
        with tracing.trace(tiny.nn, ids) as tracer:
            site.write(tiny.nn, torch.zeros(2, 5, site.width))
            patched = tracing.save(tiny.nn.output.logits)
    module = tiny.hf.get_submodule(site.module)
    handle = module.register_forward_hook(
        lambda m, i, o: (torch.zeros_like(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else torch.zeros_like(o))
    try:
        with torch.no_grad():
            expected = tiny.hf(input_ids=ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        clean = tiny.hf(input_ids=ids).logits
    assert torch.allclose(patched, expected, atol=1e-6)
    assert not torch.allclose(patched, clean, atol=1e-4)


def test_write_a_tuple_output(tiny):
    site = tiny.site("attn.1")
    ids = torch.randint(2, 250, (1, 4))
    with torch.no_grad():
        with tracing.trace(tiny.nn, ids) as tracer:
            before = tracing.save(tiny.site("resid.0").read(tiny.nn))
            site.write(tiny.nn, torch.zeros(1, 4, site.width))
            mlp = tracing.save(tiny.site("mlp.1").read(tiny.nn))
            resid = tracing.save(tiny.site("resid.1").read(tiny.nn))
    assert torch.allclose(resid, before + mlp, atol=1e-5)


def test_unknown_site_lists_valid_ones(llama):
    with pytest.raises(ValueError, match=r"unknown site 'resid\.99'.*resid\.0\.\.resid\.2"):
        llama.site("resid.99")
    with pytest.raises(ValueError, match="valid sites"):
        resolve_sites(llama, ["nonsense.*"])


def test_glob_patterns_in_forward_order(llama):
    names = [s.name for s in resolve_sites(llama, ["resid.*", "attn.1"])]
    assert names == ["resid.0", "attn.1", "resid.1", "resid.2"]
