"""Steering by adding feature directions or clamping codes, in a forward and in generation."""
import pytest
import torch

from interventions.spliced import run_spliced
from interventions.steering import steer, steer_generate
from sae.architectures import TopKSAE
from sae.baselines import IdentityDictionary


def topk(width, n_latents=64, k=8, seed=0):
    torch.manual_seed(seed)
    return TopKSAE(width, n_latents, k=k)


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(2, 250, (2, 6), generator=torch.Generator().manual_seed(5))


def test_adding_a_direction_at_the_last_resid_moves_logits_through_norm_and_unembed(llama, prompts):
    last = f"resid.{llama.n_layers - 1}"
    d = topk(32)
    alpha = 3.0
    run = steer(llama, {last: d}, prompts, {last: [11]}, alpha=alpha, positions=[-1])
    x = run.acts[last]                                                         # [batch, pos, d]
    steered = x.clone()
    steered[:, -1] += alpha * d.W_dec[11].detach()
    expected = llama.hf.lm_head(llama.hf.model.norm(steered))
    assert rel(run.logits, expected) <= 1e-5
    assert torch.equal(run.logits[:, :-1], llama.hf(input_ids=prompts).logits[:, :-1])
    assert rel(run.logits[:, -1], llama.hf(input_ids=prompts).logits[:, -1]) > 1e-2


def test_alpha_per_feature_adds_the_weighted_sum_of_directions(llama, prompts):
    d = topk(32)
    run = steer(llama, {"mlp.0": d}, prompts, {"mlp.0": [1, 2]}, alpha=[2.0, -1.0])
    expected = 2.0 * d.W_dec[1] - d.W_dec[2]
    assert torch.allclose(run.outputs["mlp.0"] - run.acts["mlp.0"], expected.detach().expand(2, 6, 32), atol=1e-6)


def test_clamping_a_neuron_sets_it_to_the_value(llama, prompts):
    run = steer(llama, {"resid.0": IdentityDictionary(32)}, prompts, {"resid.0": [4]}, value=7.5,
                positions=torch.tensor([1, 3]))
    out, x = run.outputs["resid.0"], run.acts["resid.0"]
    assert out[0, 1, 4] == 7.5 and out[1, 3, 4] == 7.5
    changed = (out != x).nonzero().tolist()
    assert sorted(map(tuple, changed)) == [(0, 1, 4), (1, 3, 4)]


def test_clamping_a_topk_feature_fixes_its_code_and_keeps_the_error(llama, prompts):
    d = topk(32)
    run = steer(llama, {"resid.1": d}, prompts, {"resid.1": [0, 9]}, value=[0.0, 2.0])
    clean = run_spliced(llama, {"resid.1": d}, prompts, logits=False)
    assert torch.all(run.codes["resid.1"][..., 9] == 2.0) and torch.all(run.codes["resid.1"][..., 0] == 0)
    assert torch.allclose(run.errors["resid.1"], clean.errors["resid.1"])
    expected = (run.codes["resid.1"] - clean.codes["resid.1"])[..., [0, 9]] @ d.W_dec[[0, 9]]
    assert torch.allclose(run.outputs["resid.1"] - run.acts["resid.1"], expected.detach(), atol=1e-5)


def _hooked_generate(model, site_name, add, prompts, n):
    """Reference: plain transformers generation with a forward hook adding `add` [d] at the site."""
    site = model.site(site_name)
    assert site.io == "output" and site.tuple_index is None

    def hook(module, args, output):
        return output + add

    handle = model.hf.get_submodule(site.module).register_forward_hook(hook)
    try:
        return model.hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    finally:
        handle.remove()


def test_generation_with_zero_alpha_is_plain_generation(llama, prompts):
    out = steer_generate(llama, {"resid.1": topk(32)}, prompts, {"resid.1": [3]}, alpha=0.0, max_new_tokens=4)
    plain = llama.hf.generate(prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, 10) and torch.equal(out, plain)


def test_steered_generation_matches_a_hooked_reference_and_the_steered_forward(llama, prompts):
    d = topk(32)
    alpha = 40.0
    out = steer_generate(llama, {"resid.1": d}, prompts, {"resid.1": [3]}, alpha=alpha, max_new_tokens=5)
    ref = _hooked_generate(llama, "resid.1", alpha * d.W_dec[3].detach(), prompts, 5)
    assert torch.equal(out, ref)
    assert not torch.equal(out, llama.hf.generate(prompts, max_new_tokens=5, min_new_tokens=5, do_sample=False))
    first = steer(llama, {"resid.1": d}, prompts, {"resid.1": [3]}, alpha=alpha).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 6], first)


def test_clamped_generation_matches_the_clamped_forward(llama, prompts):
    d = topk(32)
    out = steer_generate(llama, {"resid.0": d}, prompts, {"resid.0": [5]}, value=30.0, max_new_tokens=2)
    first = steer(llama, {"resid.0": d}, prompts, {"resid.0": [5]}, value=30.0).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 6], first)
    second = steer(llama, {"resid.0": d}, out[:, :7], {"resid.0": [5]}, value=30.0).logits[:, -1].argmax(-1)
    assert torch.equal(out[:, 7], second)


def test_steering_validates_inputs(llama, prompts):
    dicts = {"resid.0": topk(32)}
    with pytest.raises(ValueError, match="exactly one of alpha"):
        steer(llama, dicts, prompts, {"resid.0": [1]})
    with pytest.raises(ValueError, match="exactly one of alpha"):
        steer(llama, dicts, prompts, {"resid.0": [1]}, alpha=1.0, value=2.0)
    with pytest.raises(ValueError, match="one per feature"):
        steer(llama, dicts, prompts, {"resid.0": [1, 2]}, alpha=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="out of range"):
        steer(llama, dicts, prompts, {"resid.0": [99]}, alpha=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        steer_generate(llama, dicts, prompts, {"resid.0": [1]}, alpha=1.0, max_new_tokens=0)
