"""The spliced model: exact forward, reconstruction-only runs, exact gradients, validation."""
import pytest
import torch

from interventions.patching import add_codes
from interventions.spliced import SplicedModel, feature_ids, position_mask, run_spliced
from sae import tracing
from sae.architectures import TopKSAE
from sae.models import load_model, tiny_model

SITES = ["embed", "attn.0", "mlp_hidden.0", "resid.0", "mlp.1", "resid.1"]


def sae_for(model, sites, n_latents=64, k=8, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    dicts = {}
    for s in sites:
        d = TopKSAE(model.sites[s].width, n_latents, k=k)
        with torch.no_grad():
            d.b_enc.normal_(0, 0.1)
            d.b_dec.normal_(0, 0.1)
        dicts[s] = d.to(dtype)
    return dicts


def ids_for(batch=2, pos=6, seed=1):
    return torch.randint(2, 250, (batch, pos), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())  # max relative difference


def test_spliced_forward_equals_plain(tiny):
    sites = [s for s in SITES if s in tiny.sites]
    dicts = sae_for(tiny, sites)
    ids = ids_for()
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    plain = tiny.hf(input_ids=ids, attention_mask=mask).logits
    run = run_spliced(tiny, dicts, ids, mask)
    assert rel(run.logits, plain) <= 1e-5
    for s in sites:  # codes and errors decompose what the model computed
        d, x = dicts[s], run.acts[s]
        assert torch.allclose(run.codes[s], d.encode(x))
        assert torch.allclose(d.decode(run.codes[s]) + run.errors[s], x, atol=1e-5)
        assert (run.codes[s] != 0).sum(-1).max() <= 8
    assert not run.codes[sites[0]].requires_grad


def test_keep_error_false_equals_writing_the_reconstruction(llama):
    site = llama.site("resid.1")
    d = sae_for(llama, [site.name])[site.name]
    ids = ids_for()
    run = run_spliced(llama, {site.name: d}, ids, keep_error=False)
    saved = {}
    with tracing.trace(llama.nn, ids) as tracer:
        x = site.read(llama.nn)
        site.write(llama.nn, d.decode(d.encode(x)))
        saved["logits"] = tracing.save(tracing.logits(llama.nn))
    assert rel(run.logits, saved["logits"]) <= 1e-5
    assert torch.all(run.errors[site.name] == 0)
    assert rel(run.logits, llama.hf(input_ids=ids).logits) > 1e-3  # the reconstruction is lossy


def test_spliced_model_binds_dictionaries(llama):
    dicts = sae_for(llama, ["resid.0"])
    ids = ids_for()
    spliced = SplicedModel(llama, dicts, keep_error=False)
    assert torch.equal(spliced(ids).logits, run_spliced(llama, dicts, ids, keep_error=False).logits)
    assert "resid.0" in repr(spliced)


def test_logits_false_stops_after_last_site(llama):
    dicts = sae_for(llama, ["resid.0"])
    run = run_spliced(llama, dicts, ids_for(), logits=False)
    assert run.logits is None and run.codes["resid.0"].shape == (2, 6, 64)


# --- gradients ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_64():
    """A float64 tiny GPT-2 (Llama's RMSNorm computes in float32 whatever the model dtype, which
    would drown a finite difference in rounding noise)."""
    small = tiny_model("gpt2", n_layers=2, d_model=32)
    return load_model(small.hf, tokenizer=small.tokenizer, dtype=torch.float64)


def test_code_grad_is_decoder_times_error_grad_exactly(llama):
    dicts = sae_for(llama, ["attn.0", "resid.1"])
    run = run_spliced(llama, dicts, ids_for(), grad=True, metric=lambda lg: lg[:, -1, 7] - lg[:, -1, 9])
    for s, d in dicts.items():
        dc, de = run.grads(s)
        assert de.abs().max() > 0
        assert torch.equal(dc, de @ d.W_dec.T)
        assert d.W_dec.grad is None and d.W_dec.requires_grad  # frozen during the run, then restored


def test_grads_match_finite_differences(gpt2_64):
    dicts = sae_for(gpt2_64, ["resid.0", "mlp.1"], dtype=torch.float64)
    ids = ids_for(batch=1)

    def metric(lg):
        return lg[:, -1, 5] - lg[:, -1, 11]

    run = run_spliced(gpt2_64, dicts, ids, grad=True, metric=metric)
    assert run.codes["resid.0"].dtype == torch.float64
    dc, de = run.grads("resid.0")
    eps = 1e-6
    for pos, feat in [(2, int(run.codes["resid.0"][0, 2].argmax())), (4, 3)]:
        where = position_mask([pos], 1, ids.shape[1])
        fd = []
        for sign in (1, -1):
            edits = {"resid.0": add_codes(torch.tensor([feat]), sign * eps, where)}
            fd.append(run_spliced(gpt2_64, dicts, ids, edits=edits, metric=metric).metric)
        numeric = float((fd[0] - fd[1]) / (2 * eps))
        assert abs(numeric) > 1e-6
        assert numeric == pytest.approx(float(dc[0, pos, feat]), rel=1e-5, abs=1e-9)
    # error direction: the error is exact too (its gradient is the model's own)
    j = 4

    def bump(sign):
        def edit(codes, error):
            error[0, 3, j] += sign * eps
            return codes, error
        return edit

    plus, minus = (run_spliced(gpt2_64, dicts, ids, edits={"resid.0": bump(s)}, metric=metric).metric for s in (1, -1))
    assert float((plus - minus) / (2 * eps)) == pytest.approx(float(de[0, 3, j]), rel=1e-5)


def test_stop_grad_cuts_paths_through_a_site(llama):
    dicts = sae_for(llama, ["resid.0", "resid.1"])
    ids = ids_for()

    def metric(lg):
        return lg[:, -1, 3]

    total = run_spliced(llama, dicts, ids, grad=True, metric=metric)
    cut = run_spliced(llama, dicts, ids, grad=True, metric=metric, stop_grad="resid.1")
    assert total.grads("resid.0")[1].abs().max() > 0
    # resid.1 is the last block's output: every path from resid.0 to the logits passes through it
    assert torch.all(cut.grads("resid.0")[1] == 0)
    assert torch.equal(cut.grads("resid.1")[1], total.grads("resid.1")[1])
    assert torch.equal(cut.logits, total.logits)


def test_downstream_codes_are_differentiable_in_upstream_leaves(llama):
    dicts = sae_for(llama, ["resid.0", "resid.1"])
    run = run_spliced(llama, dicts, ids_for(), grad=True)
    downstream = dicts["resid.1"].encode(run.acts["resid.1"])  # [batch, pos, n_latents], in the graph
    (g,) = torch.autograd.grad(downstream[:, -1].sum(), run.errors["resid.0"])
    assert g[:, -1].abs().max() > 0


# --- validation -----------------------------------------------------------------------------
def test_position_mask_forms():
    assert position_mask(None, 2, 4).all()
    assert position_mask(-1, 2, 4)[:, 3].all() and position_mask(-1, 2, 4).sum() == 2
    assert position_mask([0, 2], 2, 4).sum() == 4
    per_row = position_mask(torch.tensor([1, 3]), 2, 4)
    assert per_row[0, 1] and per_row[1, 3] and per_row.sum() == 2
    with pytest.raises(ValueError, match="out of range.*-4..3"):
        position_mask([4], 2, 4)
    with pytest.raises(ValueError, match="per row"):
        position_mask(torch.tensor([1, 2, 3]), 2, 4)
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        position_mask(torch.ones(3, 4, dtype=torch.bool), 2, 4)


def test_feature_ids_validate():
    assert feature_ids("all", 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="out of range.*5 latents"):
        feature_ids([1, 5], 5, "resid.0")
    with pytest.raises(ValueError, match="duplicates"):
        feature_ids([1, 1], 5)


def test_bad_inputs_raise_clear_errors(llama):
    ids = ids_for()
    with pytest.raises(ValueError, match="d_in=16.*32 wide"):
        run_spliced(llama, {"resid.0": TopKSAE(16, 32, k=4)}, ids)
    with pytest.raises(ValueError, match="not a site"):
        run_spliced(llama, {"resid.99": TopKSAE(32, 64, k=4)}, ids)
    dicts = sae_for(llama, ["resid.0"])
    with pytest.raises(ValueError, match="edits name sites without a dictionary"):
        run_spliced(llama, dicts, ids, edits={"resid.1": lambda c, e: (c, e)})
    with pytest.raises(ValueError, match="edit at resid.0 must return"):
        run_spliced(llama, dicts, ids, edits={"resid.0": lambda c, e: (c[..., :3], e)})
    with pytest.raises(ValueError, match="stop_grad"):
        run_spliced(llama, dicts, ids, stop_grad=["resid.1"])
    with pytest.raises(ValueError, match="grad=False"):
        run_spliced(llama, dicts, ids).grads("resid.0")
    with pytest.raises(ValueError, match="no gradient"):
        run_spliced(llama, dicts, ids, grad=True).grads("resid.0")
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        run_spliced(llama, dicts, torch.zeros(1, 2, 3, dtype=torch.long))
