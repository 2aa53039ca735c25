"""Concept erasure on a tiny model: LEACE and the mean-difference projection against SAE-feature,
PCA and neuron ablation, feature selection, and the report's numbers."""
import pytest
import torch

from interventions.erasure import (Erasure, erase, erasure_report, feature_erasure, fit_probe, label_positions,
                                   select_concept_features)
from interventions.patching import ablate_features
from interventions.spliced import run_spliced
from sae.baselines import IdentityDictionary

SITE = "resid.0"


@pytest.fixture(scope="module")
def model(loud_llama):
    return loud_llama


@pytest.fixture(scope="module")
def sae(random_topk):
    return random_topk


@pytest.fixture(scope="module")
def data(model):
    """Token ids [384, 8] and a random linear concept planted in resid.0: per-token labels
    z = [<x, v> > median], split into a fitting part and a held-out part."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 250, (384, 8), generator=g)
    x = run_spliced(model, {SITE: IdentityDictionary(32)}, ids, logits=False).acts[SITE]
    s = x @ torch.randn(32, generator=g)
    z = (s > s.median()).long()                                   # [batch, pos]
    unrelated = torch.randint(2, 250, (8, 8), generator=g)
    return dict(fit=(ids[:256], z[:256]), held=(ids[256:], z[256:]), unrelated=unrelated)


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 7]


def test_leace_drives_a_linear_probe_to_chance(model, data):
    eraser = erase(model, None, SITE, *data["fit"], method="leace")
    assert eraser.eraser.rank == 1
    rep = erasure_report(model, eraser, *data["held"], unrelated=data["unrelated"])
    assert rep["probe_acc_before"] > 0.9
    assert rep["probe_acc_retrained"] <= rep["chance"] + 0.1
    assert rep["probe_acc_after"] <= rep["chance"] + 0.1
    assert rep["edit_l2"] > 0 and rep["kl_unrelated"] > 0
    assert rep["ce_increase"] == pytest.approx(rep["ce_after"] - rep["ce_before"])


def test_in_sample_class_means_are_equal_and_leace_moves_less_than_mean_diff(model, data):
    ids, z = data["fit"]
    sq = {}
    for method in ("leace", "mean_diff"):
        e = erase(model, None, SITE, ids, z, method=method)
        run = e.run(model, ids, logits=False)
        xe, x = run.outputs[SITE].double(), run.acts[SITE].double()
        gap = xe[z == 1].mean(0) - xe[z == 0].mean(0)
        assert gap.abs().max() < 1e-3 * (x[z == 1].mean(0) - x[z == 0].mean(0)).abs().max()
        sq[method] = (xe - x).pow(2).sum(-1).mean()
    assert sq["leace"] < sq["mean_diff"]


def test_no_op_erasure_reports_zero_edit_and_zero_damage(model, sae, data):
    nothing = feature_erasure(sae, SITE, [])
    rep = erasure_report(model, nothing, *data["held"], metric=metric, unrelated=data["unrelated"])
    assert rep["edit_l2"] == 0 and rep["n_features"] == 0
    assert abs(rep["kl_unrelated"]) < 1e-12 and abs(rep["ce_increase"]) < 1e-12
    assert rep["metric_after"] == rep["metric_before"]
    assert rep["probe_acc_after"] == rep["probe_acc_before"] == rep["probe_acc_retrained"]


def test_feature_ablation_sets_chosen_codes_to_their_mean_and_nothing_else(model, sae, data):
    ids = data["fit"][0][:64]
    codes = run_spliced(model, {SITE: sae}, ids, logits=False).codes[SITE]   # [batch, pos, n_latents]
    j = int((codes > 0).float().mean((0, 1)).sub(0.5).abs().argmin())         # active about half the time
    z = (codes[..., j] > 0).long()                                            # concept: feature j fires
    e = erase(model, {SITE: sae}, SITE, ids, z, method="features", k=3)
    assert j in e.features.tolist()
    assert e.scores.argmax() == j
    run = e.run(model, ids, logits=False)
    F = e.features
    assert torch.allclose(run.codes[SITE][..., F], e.values.expand(*codes.shape[:2], 3))
    assert torch.allclose(e.values, codes.flatten(0, 1)[:, F].mean(0))
    others = torch.ones(codes.shape[-1], dtype=torch.bool)
    others[F] = False
    assert torch.equal(run.codes[SITE][..., others], codes[..., others])
    dx = run.outputs[SITE] - run.acts[SITE]
    expected = (run.codes[SITE][..., F] - codes[..., F]) @ sae.W_dec[F].detach()
    assert torch.allclose(dx, expected, atol=1e-5)
    rep = erasure_report(model, e, ids, z)
    assert rep["probe_acc_retrained"] < rep["probe_acc_before"]


def test_attribution_ranks_features_by_their_ablation_effect(model, sae, data):
    ids = data["fit"][0][:16]
    feats, scores = select_concept_features(model, {SITE: sae}, SITE, ids, method="attribution", metric=metric,
                                            ablation="zero", k=3)
    base = float(metric(run_spliced(model, {SITE: sae}, ids).logits).mean())
    true = torch.tensor([base - float(metric(ablate_features(model, {SITE: sae}, ids, {SITE: [i]}).logits).mean())
                         for i in range(sae.n_latents)])
    assert int(feats[0]) == int(true.argmax())
    rank = lambda t: t.argsort().argsort().double()
    assert torch.corrcoef(torch.stack([rank(scores), rank(true)]))[0, 1] > 0.6


def test_neuron_and_pca_baselines_ablate_along_their_own_directions(model, data):
    ids, _ = data["fit"]
    ids = ids[:64]
    x = run_spliced(model, {SITE: IdentityDictionary(32)}, ids, logits=False).acts[SITE]
    z = (x[..., 3] > x[..., 3].median()).long()                               # concept = neuron 3 high
    e = erase(model, None, SITE, ids, z, method="neurons", k=1)
    assert e.features.tolist() == [3]
    out = e.run(model, ids, logits=False).outputs[SITE]
    assert torch.allclose(out[..., 3], x[..., 3].mean().expand_as(out[..., 3]), atol=1e-5)
    assert torch.equal(out[..., :3], x[..., :3])
    p = erase(model, None, SITE, ids, z, method="pca", k=2)
    run = p.run(model, ids, logits=False)
    dx = (run.outputs[SITE] - run.acts[SITE]).reshape(-1, 32).double()
    W = p.dictionary.W_dec[p.features].double()                              # [2, d] orthonormal rows
    assert dx.norm() > 0
    assert (dx - dx @ W.T @ W).norm() < 1e-4 * dx.norm()                    # the edit lies in their span


def test_report_metric_moves_under_a_large_edit(model, sae, data):
    ids, z = data["held"]
    e = erase(model, {SITE: sae}, SITE, ids, z, method="features", k=12, ablation="zero")
    rep = erasure_report(model, e, ids, z, metric=metric, unrelated=data["unrelated"])
    assert rep["metric_after"] != pytest.approx(rep["metric_before"])
    assert rep["edit_l2"] > 0 and rep["kl_unrelated"] > 0 and rep["n_features"] == 12


def test_sequence_labels_are_read_at_the_last_real_token():
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    where, z = label_positions(torch.tensor([0, 1]), ids, mask)
    assert where.tolist() == [[False, False, True, False], [False, False, False, True]]
    assert z[where].tolist() == [0, 1]
    per_token = torch.tensor([[0, -1, 1, 1], [1, 0, -1, 0]])
    where, _ = label_positions(per_token, ids, mask)
    assert where.tolist() == [[True, False, True, False], [True, True, False, True]]


def test_probe_fits_a_separable_concept():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long() + 2 * (x[:, 1] > 1).long()         # 4 classes, labels 0..3
    probe = fit_probe(x, y)
    assert probe.accuracy(x, y) > 0.9


def test_errors(model, sae, data):
    ids, z = data["fit"]
    with pytest.raises(ValueError, match="unknown erasure method"):
        erase(model, None, SITE, ids, z, method="inlp")
    with pytest.raises(ValueError, match="pass dictionaries"):
        erase(model, None, SITE, ids, z, method="features", k=2)
    with pytest.raises(ValueError, match="k="):
        erase(model, {SITE: sae}, SITE, ids, z, method="features")
    with pytest.raises(ValueError, match="labels must be"):
        erase(model, None, SITE, ids, z[:, :3], method="leace")
    with pytest.raises(ValueError, match="needs metric"):
        select_concept_features(model, {SITE: sae}, SITE, ids, method="attribution")
    with pytest.raises(ValueError, match="not a site"):
        erase(model, None, "resid.9", ids, z, method="leace")
    assert isinstance(feature_erasure(sae, SITE, [1, 2], 0.0), Erasure)


def test_report_never_edits_position_zero(model, data):
    """Position 0 (BOS / attention sink) is left alone: on one-token unrelated text nothing is
    edited, so the collateral damage is exactly zero; the edit size averages positions >= 1."""
    ids, z = data["held"]
    e = erase(model, None, SITE, *data["fit"], method="mean_diff")
    one_token = data["unrelated"][:, :1]
    rep = erasure_report(model, e, ids, z, unrelated=one_token)
    assert rep["kl_unrelated"] == 0.0
    run = e.run(model, ids, logits=False)                       # the erasure everywhere, by hand
    assert run.edit_norm(SITE)[:, 0].abs().max() > 0            # it would move position 0
    assert rep["edit_l2"] == pytest.approx(float(run.edit_norm(SITE)[:, 1:].mean()), rel=1e-5)
