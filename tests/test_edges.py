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
    site's activation (module outputs, or the input of block 0 for "embed")."""
    replace, seen, handles = dict(replace or {}), {}, []
    for name in set(replace) | set(capture):
        site = model.sites[name]
        module = model.hf.get_submodule(site.module)
        if site.io == "input":
            def pre(module, args, name=name):
                seen[name] = args[0]
                return (replace[name](args[0]), *args[1:]) if name in replace else None
            handles.append(module.register_forward_pre_hook(pre))
            continue

        def hook(module, args, out, name=name, i=site.tuple_index):
            x = out if i is None else out[i]
            seen[name] = x
            y = replace[name](x) if name in replace else x
            return y if i is None else (*out[:i], y, *out[i + 1:])
        handles.append(module.register_forward_hook(hook))
    try:
        logits = model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


def split(d, x):
    c = d.encode(x)
    return c, x - d.decode(c)


def jacobian(f, inputs):
    return torch.autograd.functional.jacobian(f, inputs, vectorize=True)


def explicit_edges(model, dicts, ids, cf):
    """The edge weights of `circuits.edges`' module docstring written out with explicit
    Jacobians of plain hooked forwards (no run_spliced, no code of circuits.edges), per position:
    {(u, d): [p, n_d + 1, p, n_u + 1]}, {u: [p, n_u + 1]} into the metric and {d: [p, n_d + 1, p]}
    from the input tokens, averaged over examples. Per example:

        left_d   = d m / d(c_d, e_d)              through the whole model (the splices are identities)
        J_{d,u}  = d(c_d, e_d) / d(c_u, e_u)      every spliced site between u and d held at its clean value
        e(u->d)[q, i, p, j] = left_d[q, i] . J[q, i, p, j] . delta_u[p, j]   (error nodes contracted over d_model)
    """
    order = list(dicts)
    with torch.no_grad():
        _, cf_acts = hooked(model, cf, capture=order + ["embed"])
    out_pairs, out_metric, out_input = {}, {}, {}
    for b in range(ids.shape[0]):
        row, cf_row = ids[b:b + 1], cf[b:b + 1]
        with torch.no_grad():
            _, acts = hooked(model, row, capture=order + ["embed"])
        nodes = {s: split(dicts[s], acts[s][0]) for s in order}                     # ([p, n], [p, d])
        delta = {s: tuple(a - c for a, c in zip(split(dicts[s], cf_acts[s][b]), nodes[s])) for s in order}

        def held(lo, hi):                     # spliced sites strictly between positions lo and hi of `order`
            return {s: (lambda x, v=acts[s].detach(): v) for s in order[lo + 1:hi]}

        def metric_of(s, hold_after):
            def f(c, e):
                rep = {s: lambda x: (dicts[s].decode(c) + e)[None]}
                if hold_after:
                    rep.update(held(order.index(s), len(order)))
                return metric(hooked(model, row, rep)[0])[0]
            return f

        for di, d in enumerate(order):
            left_c, left_e = jacobian(metric_of(d, False), nodes[d])                # [p, n_d], [p, dim]
            for ui, u in enumerate(order[:di]):
                def down_of_up(c, e, u=u, ui=ui, d=d, di=di):
                    rep = {u: lambda x: (dicts[u].decode(c) + e)[None], **held(ui, di)}
                    return split(dicts[d], hooked(model, row, rep, capture=[d])[1][d][0])
                (J_cc, J_ce), (J_ec, J_ee) = jacobian(down_of_up, nodes[u])
                dc, de = delta[u]
                p, n_d, n_u = dc.shape[0], left_c.shape[1], dc.shape[1]
                w = torch.zeros(p, n_d + 1, p, n_u + 1, dtype=torch.float64)
                w[:, :n_d, :, :n_u] = torch.einsum("qi,qipj,pj->qipj", left_c, J_cc, dc)
                w[:, :n_d, :, n_u] = torch.einsum("qi,qipk,pk->qip", left_c, J_ce, de)
                w[:, n_d, :, :n_u] = torch.einsum("qk,qkpj,pj->qpj", left_e, J_ec, dc)
                w[:, n_d, :, n_u] = torch.einsum("qk,qkpl,pl->qp", left_e, J_ee, de)
                out_pairs[(u, d)] = out_pairs.get((u, d), 0) + w / ids.shape[0]
            # into the metric: the direct effect, every later spliced site held
            g_c, g_e = jacobian(metric_of(d, True), nodes[d])
            dc, de = delta[d]
            direct = torch.cat([g_c * dc, (g_e * de).sum(-1, keepdim=True)], -1)     # [p, n_d + 1]
            out_metric[d] = out_metric.get(d, 0) + direct / ids.shape[0]
            # from the input tokens (the input of block 0), sites before d held
            def down_of_input(x, d=d, di=di):
                rep = {"embed": lambda _: x[None], **held(-1, di)}
                return split(dicts[d], hooked(model, row, rep, capture=[d])[1][d][0])
            J_c, J_e = jacobian(down_of_input, acts["embed"][0].detach())            # [p, n, p, dim], [p, dim, p, dim]
            d_emb = cf_acts["embed"][b] - acts["embed"][0]                           # [p, dim]
            w_in = torch.cat([torch.einsum("qi,qipk,pk->qip", left_c, J_c, d_emb),
                              torch.einsum("qk,qkpl,pl->qp", left_e, J_e, d_emb)[:, None]], 1)  # [p, n + 1, p]
            out_input[d] = out_input.get(d, 0) + w_in / ids.shape[0]
    return out_pairs, out_metric, out_input


@pytest.fixture(scope="module", params=["resid.0,attn.1,mlp.1,resid.1", "resid.0,attn.1,resid.1"])
def explicit(gpt2_64, request):
    """Two examples through four spliced sites (attn.1 and mlp.1 between resid.0 and resid.1), or
    three (mlp.1 not spliced: its path belongs to the direct edges into resid.1)."""
    dicts = topk_dicts(request.param.split(","))
    for d in dicts.values():
        d.requires_grad_(False)
    ids, cf = pair()
    pairs, to_metric, from_input = explicit_edges(gpt2_64, dicts, ids, cf)
    for d in dicts.values():
        d.requires_grad_(True)
    return dicts, ids, cf, pairs, to_metric, from_input


def aggregated(w):
    """Per-position weights [p, n_d + 1, p, n_u + 1] -> summed over both positions [n_d + 1, n_u + 1]."""
    return w.sum((0, 2))


@pytest.mark.parametrize("per_position,rows", [(False, 64), (True, 64), (False, 16), (True, 2), (False, None)])
def test_edges_equal_explicit_jacobian_products(gpt2_64, explicit, per_position, rows):
    """Batched VJPs (rows=64: 32 nodes per backward, sites mixed; attn.1 and mlp.1 share resid.0
    upstream, so one runs in a second copy of the forward; rows=2: one node per backward) and the
    one-backward-per-node reference (rows=None), against `explicit_edges`."""
    dicts, ids, cf, pairs, to_metric, from_input = explicit
    if rows is None:
        got = edge_effects_reference(gpt2_64, dicts, ids, cf, metric, per_position=per_position)
    else:
        got = edge_effects(gpt2_64, dicts, ids, cf, metric, per_position=per_position, rows_per_backward=rows)
    sites = list(dicts)
    assert set(got.weights) == set(pairs) == {(u, d) for i, u in enumerate(sites) for d in sites[i + 1:]}
    for (u, d), w in pairs.items():                      # every pair of these sites has a direct path
        want = w if per_position else aggregated(w)
        assert want.abs().max() > 1e-6, (u, d)
        torch.testing.assert_close(got.weight(u, d), want, rtol=1e-6, atol=1e-10, msg=f"{u} -> {d}")
    for s, w in to_metric.items():
        want = w if per_position else w.sum(0)
        torch.testing.assert_close(got.to_metric[s], want, rtol=1e-6, atol=1e-10, msg=f"{s} -> metric")
    assert to_metric["resid.1"].abs().max() > 1e-6                      # only the last site reaches m directly
    assert set(got.from_input) == {"resid.0"}
    for s, w in from_input.items():
        if s != "resid.0":
            assert w.abs().max() < 1e-12, s                              # the input reaches them through resid.0
            continue
        want = w if per_position else w.sum(0)                           # [n + 1, p]
        torch.testing.assert_close(got.from_input[s], want, rtol=1e-6, atol=1e-10, msg=f"input -> {s}")
    assert torch.all(got.input_to_metric == 0)


def test_batching_saves_backwards(gpt2_64, explicit):
    """One backward for the clean gradient, then one per downstream node (reference) vs one per
    rows // batch nodes."""
    dicts, ids, cf = explicit[:3]
    ref = edge_effects_reference(gpt2_64, dicts, ids, cf, metric)
    n_nodes = ref.n_backwards - 1
    assert n_nodes > 20
    for rows in (64, 16, 2):
        fast = edge_effects(gpt2_64, dicts, ids, cf, metric, rows_per_backward=rows)
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
