"""Edge attribution (circuits.edges): explicit Jacobian products, batched == unbatched VJPs."""
import math

import pytest
import torch

from circuits.attribution import node_effects
from circuits.edges import EdgeEffects, edge_effects, edge_effects_reference
from sae.models import load_model, tiny_model
from circuit_helpers import pair, topk_dicts


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP contention on loaded shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2_64():
    small = tiny_model("gpt2", n_layers=2, d_model=32)
    return load_model(small.hf, tokenizer=small.tokenizer, dtype=torch.float64)


def metric(logits):  # [batch, pos, vocab] -> [batch]
    return logits[:, -1, 5] - logits[:, -1, 11]




# --- an independent forward with plain PyTorch hooks --------------------------------------------
def hooked(model, ids, replace=None, capture=()):
    """(logits, {site: activation}) of a plain forward where replace[site](x) -> x' rewrites a
    site's output (all sites here are module outputs)."""
    replace, seen, handles = dict(replace or {}), {}, []
    for name in set(replace) | set(capture):
        site = model.sites[name]
        assert site.io == "output"

        def hook(module, args, out, name=name, i=site.tuple_index):
            x = out if i is None else out[i]
            seen[name] = x
            y = replace[name](x) if name in replace else x
            return y if i is None else (*out[:i], y, *out[i + 1:])
        handles.append(model.hf.get_submodule(site.module).register_forward_hook(hook))
    try:
        logits = model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def split(d, x):
    c = d.encode(x)
    return c, x - d.decode(c)


def test_edge_weights_equal_explicit_jacobian_products(gpt2_64):
    """resid.0 -> resid.1 with attn.1 spliced in between (held at its clean value) and mlp.1
    not spliced (its path belongs to the direct edge), one example."""
    dicts = topk_dicts(["resid.0", "attn.1", "resid.1"])
    for d in dicts.values():
        d.requires_grad_(False)
    ids, cf = pair(batch=1)
    up, down = dicts["resid.0"], dicts["resid.1"]
    _, acts = hooked(gpt2_64, ids, capture=["resid.0", "attn.1", "resid.1"])
    _, acts_cf = hooked(gpt2_64, cf, capture=["resid.0", "resid.1"])
    c_u, e_u = split(up, acts["resid.0"][0])
    c_u_cf, e_u_cf = split(up, acts_cf["resid.0"][0])
    delta_c, delta_e = c_u_cf - c_u, e_u_cf - e_u                       # [p, n_u], [p, d]
    c_d, e_d = split(down, acts["resid.1"][0])

    def m_of_down(c, e):  # the metric as a function of resid.1's nodes (nothing after it is spliced)
        lg, _ = hooked(gpt2_64, ids, replace={"resid.1": lambda x: (down.decode(c) + e)[None]})
        return metric(lg)[0]

    left_c, left_e = torch.autograd.functional.jacobian(m_of_down, (c_d, e_d))  # [p, n_d], [p, d]

    def down_of_up(c, e):  # resid.1's nodes as a function of resid.0's, attn.1 held at clean
        attn = acts["attn.1"].detach()
        _, seen = hooked(gpt2_64, ids, replace={"resid.0": lambda x: (up.decode(c) + e)[None],
                                                "attn.1": lambda x: attn}, capture=["resid.1"])
        return split(down, seen["resid.1"][0])

    (J_cc, J_ce), (J_ec, J_ee) = torch.autograd.functional.jacobian(down_of_up, (c_u, e_u))
    expected = torch.zeros(25, 25, dtype=torch.float64)                 # [n_d + 1, n_u + 1]
    expected[:24, :24] = torch.einsum("qi,qipj,pj->ij", left_c, J_cc, delta_c)
    expected[:24, 24] = torch.einsum("qi,qipk,pk->i", left_c, J_ce, delta_e)
    expected[24, :24] = torch.einsum("qk,qkpj,pj->j", left_e, J_ec, delta_c)
    expected[24, 24] = torch.einsum("qk,qkpl,pl->", left_e, J_ee, delta_e)
    per_pos = torch.einsum("qi,qipj,pj->qipj", left_c, J_cc, delta_c)  # [p, n_d, p, n_u]

    for d in dicts.values():
        d.requires_grad_(True)
    edges = edge_effects(gpt2_64, dicts, ids, cf, metric)
    assert expected.abs().max() > 1e-6 and J_ce.abs().max() > 0
    torch.testing.assert_close(edges.weight("resid.0", "resid.1"), expected, rtol=1e-6, atol=1e-12)
    pp = edge_effects(gpt2_64, dicts, ids, cf, metric, per_position=True)
    torch.testing.assert_close(pp.weight("resid.0", "resid.1")[:, :24, :, :24], per_pos, rtol=1e-6, atol=1e-12)
    # into the metric: resid.1 is the last site, so its direct effect is its AtP effect; every path
    # from resid.0, attn.1 or the input to the logits crosses resid.1
    c_d_cf, e_d_cf = split(down, acts_cf["resid.1"][0])
    atp = torch.cat([(left_c * (c_d_cf - c_d)).sum(0), (left_e * (e_d_cf - e_d)).sum()[None]])
    torch.testing.assert_close(edges.to_metric["resid.1"], atp, rtol=1e-6, atol=1e-12)
    assert torch.all(edges.to_metric["resid.0"] == 0) and torch.all(edges.to_metric["attn.1"] == 0)
    assert torch.all(edges.input_to_metric == 0)


@pytest.mark.parametrize("per_position,rows", [(False, 64), (True, 64), (False, 16), (True, 2)])
def test_batched_vjps_equal_one_backward_per_node(gpt2_64, per_position, rows):
    """rows=64: 32 nodes per backward, sites mixed (attn.1 and mlp.1 share resid.0 upstream: one
    runs in a second copy of the forward); rows=2: one node per backward (plain backwards)."""
    dicts = topk_dicts(["resid.0", "attn.1", "mlp.1", "resid.1"])
    ids, cf = pair()
    ref = edge_effects_reference(gpt2_64, dicts, ids, cf, metric, per_position=per_position)
    fast = edge_effects(gpt2_64, dicts, ids, cf, metric, per_position=per_position, rows_per_backward=rows)
    assert set(fast.weights) == set(ref.weights) == {("resid.0", "attn.1"), ("resid.0", "mlp.1"),
                                                      ("attn.1", "mlp.1"), ("resid.0", "resid.1"),
                                                      ("attn.1", "resid.1"), ("mlp.1", "resid.1")}
    for key in ref.weights:
        torch.testing.assert_close(fast.weight(*key), ref.weight(*key), rtol=1e-9, atol=1e-15)
    for s in ref.to_metric:
        torch.testing.assert_close(fast.to_metric[s], ref.to_metric[s], rtol=1e-9, atol=1e-15)
    assert set(fast.from_input) == set(ref.from_input) == {"resid.0"}  # no all-zero extra sites
    for s in ref.from_input:
        torch.testing.assert_close(fast.from_input[s], ref.from_input[s], rtol=1e-9, atol=1e-15)
    # one backward for the clean gradient, then one per downstream node vs one per rows // batch
    n_nodes = ref.n_backwards - 1
    assert n_nodes > 30
    assert fast.n_backwards == 1 + math.ceil(n_nodes / (rows // 2)) <= ref.n_backwards


def test_edges_into_a_bottleneck_site_sum_to_the_node_effect(gpt2_64):
    """Chain rule: when resid.1 is the only site after resid.0, sum_d e(u -> d) over all of
    resid.1's nodes is u's attribution-patching effect."""
    dicts = topk_dicts(["resid.0", "resid.1"])
    ids, cf = pair(batch=3)
    edges = edge_effects(gpt2_64, dicts, ids, cf, metric)
    nodes = node_effects(gpt2_64, dicts, ids, cf, metric, method="atp")
    into = edges.weight("resid.0", "resid.1").sum(0)                      # [n_u + 1]
    assert nodes.effects["resid.0"].abs().max() > 1e-6
    torch.testing.assert_close(into, nodes.effects["resid.0"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(edges.to_metric["resid.1"], nodes.effects["resid.1"], rtol=1e-6, atol=1e-12)
    # the input: edges into resid.0 from input/<pos> sum to the input nodes' effects
    torch.testing.assert_close(edges.from_input["resid.0"].sum(0), nodes.inputs, rtol=1e-6, atol=1e-12)
    assert torch.all(edges.from_input["resid.0"][:, [0, 2, 4]] == 0)  # unchanged tokens


def test_spliced_embed_gets_input_edges_from_its_node_effects(gpt2_64):
    dicts = topk_dicts(["embed", "resid.0"])
    ids, cf = pair()
    edges = edge_effects(gpt2_64, dicts, ids, cf, metric, per_position=True)
    nodes = node_effects(gpt2_64, dicts, ids, cf, metric, per_position=True)
    diag = torch.diagonal(edges.from_input["embed"], dim1=0, dim2=2).T     # [p, n + 1]
    torch.testing.assert_close(diag, nodes.effects["embed"])
    assert ("embed", "resid.0") in edges.weights and "embed" in edges.sizes


def test_downstream_selection_and_example_chunks(gpt2_64):
    dicts = topk_dicts(["resid.0", "resid.1"])
    ids, cf = pair(batch=3)
    full = edge_effects(gpt2_64, dicts, ids, cf, metric)
    chunked = edge_effects(gpt2_64, dicts, ids, cf, metric, batch_size=2)
    torch.testing.assert_close(chunked.weight("resid.0", "resid.1"), full.weight("resid.0", "resid.1"))
    chosen = torch.zeros(25, dtype=torch.bool)
    chosen[[3, 24]] = True
    some = edge_effects(gpt2_64, dicts, ids, cf, metric, nodes={"resid.1": chosen})
    w, w_full = some.weight("resid.0", "resid.1"), full.weight("resid.0", "resid.1")
    assert torch.all(w[~chosen] == 0) and w_full[24].abs().max() > 0
    torch.testing.assert_close(w[chosen], w_full[chosen])
    assert isinstance(full, EdgeEffects) and "resid.0->resid.1" in repr(full)


def test_bad_inputs_raise_clear_errors(gpt2_64):
    dicts = topk_dicts(["resid.0", "resid.1"])
    ids, cf = pair()
    with pytest.raises(ValueError, match="rows_per_backward"):
        edge_effects(gpt2_64, dicts, ids, cf, metric, rows_per_backward=0)
    with pytest.raises(ValueError, match=r"nodes\['resid.1'\] must be a bool mask of shape \(25,\)"):
        edge_effects(gpt2_64, dicts, ids, cf, metric, nodes={"resid.1": torch.ones(5, 25, dtype=torch.bool)})
    with pytest.raises(ValueError, match="one value per example"):
        edge_effects(gpt2_64, dicts, ids, cf, lambda lg: lg[:, -1, 5].sum())
    with pytest.raises(ValueError, match="same shape"):
        edge_effects(gpt2_64, dicts, ids, cf[:1], metric)
    with pytest.raises(KeyError, match="no spliced site 'mlp.1'"):
        edge_effects(gpt2_64, dicts, ids, cf, metric).weight("mlp.1", "resid.1")
