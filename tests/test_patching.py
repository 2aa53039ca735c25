"""Sub-rank-one feature patching (Cunningham et al. 2023) and feature ablation."""
import pytest
import torch

from interventions.patching import ablate_features, patch_features
from interventions.spliced import run_spliced
from sae import tracing
from sae.architectures import TopKSAE
from sae.baselines import IdentityDictionary, PCADictionary

SITE = "resid.0"


def topk(width, n_latents=64, k=8, seed=0):
    torch.manual_seed(seed)
    d = TopKSAE(width, n_latents, k=k)
    with torch.no_grad():
        d.b_enc.normal_(0, 0.1)
        d.b_dec.normal_(0, 0.1)
    return d


def rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(3)
    return torch.randint(2, 250, (2, 7), generator=g), torch.randint(2, 250, (2, 7), generator=g)


def plain_logits(model, ids):
    return model.hf(input_ids=ids).logits


def write_logits(model, site_name, ids, value):
    """Logits of a plain trace that writes `value` [batch, pos, d] at the site."""
    site, saved = model.site(site_name), {}
    with tracing.trace(model.nn, ids) as tracer:
        site.write(model.nn, value)
        saved["logits"] = tracing.save(tracing.logits(model.nn))
    return saved["logits"]


def site_acts(model, site_name, ids):
    run = run_spliced(model, {site_name: IdentityDictionary(model.sites[site_name].width)}, ids, logits=False)
    return run.acts[site_name]


def test_all_features_patched_gives_the_source_run(llama, batches):
    base, source = batches
    identity = {SITE: IdentityDictionary(32)}
    run = patch_features(llama, identity, base, source, {SITE: "all"})
    assert rel(run.logits, plain_logits(llama, source)) <= 1e-5
    pca = {SITE: PCADictionary.fit(torch.randn(500, 32, generator=torch.Generator().manual_seed(0)))}
    run = patch_features(llama, pca, base, source, {SITE: "all"})
    assert rel(run.logits, plain_logits(llama, source)) <= 1e-4
    assert rel(run.logits, plain_logits(llama, base)) > 1e-2


def test_no_features_patched_gives_the_base_run(llama, batches):
    base, source = batches
    dicts = {SITE: topk(32)}
    for mode in ("sub_rank_one", "full"):
        run = patch_features(llama, dicts, base, source, {SITE: []}, mode=mode)
        assert rel(run.logits, plain_logits(llama, base)) <= 1e-5
        assert run.edit_norm(SITE).max() < 1e-5
    # reconstruction mode always drops the error: with nothing patched it is the spliced base
    run = patch_features(llama, dicts, base, source, {SITE: []}, mode="reconstruction")
    assert rel(run.logits, run_spliced(llama, dicts, base, keep_error=False).logits) <= 1e-5


def test_reconstruction_mode_with_all_features_is_the_spliced_source(llama, batches):
    base, source = batches
    dicts = {SITE: topk(32)}
    run = patch_features(llama, dicts, base, source, {SITE: "all"}, mode="reconstruction")
    expected = run_spliced(llama, dicts, source, keep_error=False).logits
    assert rel(run.logits, expected) <= 1e-5


def test_full_mode_with_spanning_features_is_the_source_run(llama, batches):
    base, source = batches
    run = patch_features(llama, {SITE: topk(32)}, base, source, {SITE: "all"}, mode="full")
    assert rel(run.logits, plain_logits(llama, source)) <= 1e-4  # 64 random rows span R^32


def test_sub_rank_one_edit_is_the_code_difference_along_the_features(llama, batches):
    base, source = batches
    d, feats = topk(32), [1, 5, 9]
    src_codes = run_spliced(llama, {SITE: d}, source, logits=False).codes[SITE]
    run = patch_features(llama, {SITE: d}, base, source, {SITE: feats}, positions=[-1, 2])
    base_codes = d.encode(run.acts[SITE])
    expected = (src_codes - base_codes)[..., feats] @ d.W_dec[feats]         # [batch, pos, d]
    delta = run.outputs[SITE] - run.acts[SITE]
    assert torch.allclose(delta[:, [2, 6]], expected[:, [2, 6]].detach(), atol=1e-6)
    assert torch.all(delta[:, [0, 1, 3, 4, 5]] == 0)
    assert expected[:, [2, 6]].abs().max() > 0  # the patch did something
    x_prime = run.acts[SITE] + torch.where(torch.tensor([0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)[None, :, None],
                                           expected, 0).detach()
    assert rel(run.logits, write_logits(llama, SITE, base, x_prime)) <= 1e-5
    assert torch.allclose(run.edit_norm(SITE), delta.norm(dim=-1))


def test_full_mode_single_feature_is_a_rank_one_projection(llama, batches):
    base, source = batches
    d = topk(32)
    run = patch_features(llama, {SITE: d}, base, source, {SITE: [4]}, mode="full", positions=torch.tensor([3, 5]))
    u = d.W_dec[4].detach() / d.W_dec[4].detach().norm()
    x, xs = run.acts[SITE], site_acts(llama, SITE, source)
    expected = ((xs - x) @ u)[..., None] * u                                   # <x_src - x, u> u
    delta = run.outputs[SITE] - x
    assert torch.allclose(delta[0, 3], expected[0, 3], atol=1e-6)
    assert torch.allclose(delta[1, 5], expected[1, 5], atol=1e-6)
    assert delta[0, 3].abs().max() > 0 and delta[0, 5].abs().max() == 0


def test_patching_validates_inputs(llama, batches):
    base, source = batches
    dicts = {SITE: topk(32)}
    with pytest.raises(ValueError, match=r"same shape.*\(2, 7\).*\(2, 5\)"):
        patch_features(llama, dicts, base, source[:, :5], {SITE: [1]})
    with pytest.raises(ValueError, match="unknown patch mode"):
        patch_features(llama, dicts, base, source, {SITE: [1]}, mode="partial")
    with pytest.raises(ValueError, match="out of range: the dictionary has 64 latents"):
        patch_features(llama, dicts, base, source, {SITE: [64]})
    with pytest.raises(ValueError, match="without a dictionary"):
        patch_features(llama, dicts, base, source, {"resid.1": [1]})
    with pytest.raises(ValueError, match="out of range for sequences of 7"):
        patch_features(llama, dicts, base, source, {SITE: [1]}, positions=[7])


# --- ablation ---------------------------------------------------------------------------------
def test_zero_ablation_of_neurons_equals_writing_zeros(llama, batches):
    base, _ = batches
    run = ablate_features(llama, {SITE: IdentityDictionary(32)}, base, {SITE: [0, 7]}, positions=[-1])
    x = site_acts(llama, SITE, base).clone()
    x[:, -1, [0, 7]] = 0
    assert rel(run.logits, write_logits(llama, SITE, base, x)) <= 1e-5
    assert rel(run.logits, plain_logits(llama, base)) > 1e-4


def test_mean_ablation_uses_masked_reference_means(llama, batches):
    base, source = batches
    d = topk(32)
    mask = torch.ones_like(source)
    mask[0, -3:] = 0
    ref_codes = run_spliced(llama, {SITE: d}, source, mask, logits=False).codes[SITE]
    means = ref_codes[mask.bool()].mean(0)                                     # [n_latents]
    run = ablate_features(llama, {SITE: d}, base, {SITE: [2, 3]}, mode="mean", reference=source,
                          reference_mask=mask)
    assert torch.allclose(run.codes[SITE][..., [2, 3]], means[[2, 3]].expand(2, 7, 2))
    given = ablate_features(llama, {SITE: d}, base, {SITE: [2, 3]}, mode="mean", reference={SITE: means})
    assert torch.allclose(given.logits, run.logits)
    with pytest.raises(ValueError, match=r"tensor \[n_latents=64\]"):
        ablate_features(llama, {SITE: d}, base, {SITE: [2]}, mode="mean", reference={SITE: means[:3]})


def test_resample_ablation_takes_the_next_rows_codes(llama, batches):
    base, _ = batches
    d = topk(32)
    clean = run_spliced(llama, {SITE: d}, base, logits=False).codes[SITE]
    run = ablate_features(llama, {SITE: d}, base, {SITE: [0, 1, 2]}, mode="resample")
    assert torch.equal(run.codes[SITE][..., :3], clean.roll(-1, 0)[..., :3])
    assert torch.equal(run.codes[SITE][..., 3:], clean[..., 3:])
    with pytest.raises(ValueError, match="at least 2 rows"):
        ablate_features(llama, {SITE: d}, base[:1], {SITE: [0]}, mode="resample")
    with pytest.raises(ValueError, match="same shape"):
        ablate_features(llama, {SITE: d}, base, {SITE: [0]}, mode="resample", reference=base[:, :3])
    with pytest.raises(ValueError, match="unknown ablation mode"):
        ablate_features(llama, {SITE: d}, base, {SITE: [0]}, mode="noise")


# --- the one mean-ablation reference -------------------------------------------------------------
def test_token_mean_against_explicit_loops():
    """interventions.means.token_mean (every mean ablation uses it) against sums written out."""
    from interventions.means import token_mean

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)               # [batch, pos, width]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]])          # position 3: padding in every row
    real = [(b, p) for b in range(3) for p in range(4) if mask[b, p]]
    overall = sum(x[b, p] for b, p in real) / len(real)
    torch.testing.assert_close(token_mean(x, mask), overall)
    torch.testing.assert_close(token_mean(x), x.reshape(-1, 5).mean(0))
    per = token_mean(x, mask, per_position=True)                              # [pos, width]
    for p in range(3):
        rows = [b for b in range(3) if mask[b, p]]
        torch.testing.assert_close(per[p], sum(x[b, p] for b in rows) / len(rows))
    torch.testing.assert_close(per[3], overall)                               # no real token: the all-token mean
    assert torch.equal(token_mean(x, torch.zeros(3, 4)), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(token_mean(x[..., 0], mask.bool()), overall[0])   # no width dimension
    with pytest.raises(ValueError, match=r"mask must have shape \[batch, pos\] = \(3, 4\)"):
        token_mean(x, mask[:, :2])
