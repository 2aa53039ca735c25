"""Cunningham et al.'s feature-set search: batched evaluation against one forward per
candidate, extreme thresholds, forward counts."""
import math

import pytest
import torch

from interventions.patching import patch_features
from interventions.search import feature_set_kl, search_feature_set
from sae.baselines import IdentityDictionary

SITE = "resid.0"
INF = float("inf")


@pytest.fixture(scope="module")
def model(loud_llama):
    return loud_llama


@pytest.fixture(scope="module")
def sae(random_topk):
    return random_topk


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(3)
    return torch.randint(2, 250, (2, 5), generator=g), torch.randint(2, 250, (2, 5), generator=g)


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 7]


def reference_kl(model, sae, base, source, feats, target=None):
    """KL(run || source run) at the last position, one patch_features forward per set."""
    run = patch_features(model, {SITE: sae}, base, source, {SITE: list(feats)})
    if target is None:
        target = model.hf(input_ids=source).logits[:, -1].double().log_softmax(-1)
    logq = run.logits[:, -1].double().log_softmax(-1)
    return float((logq.exp() * (logq - target)).sum(-1).mean())


def test_extreme_thresholds_keep_everything_or_nothing(model, sae, pair):
    base, source = pair
    df = search_feature_set(model, {SITE: sae}, SITE, base, source, metric=metric, taus=[-INF, INF], batch=8)
    n = len(df.attrs["candidates"])
    assert n > 5
    keep_all, drop_all = df.iloc[0], df.iloc[1]
    assert keep_all.n_features == n and keep_all.features == df.attrs["candidates"]
    assert keep_all.kl == pytest.approx(df.attrs["kl_all"], rel=1e-5)
    assert keep_all.edit_l2 > 0
    assert drop_all.n_features == 0 and drop_all.features == []
    assert drop_all.kl == pytest.approx(df.attrs["kl_none"]) and drop_all.edit_l2 == 0
    assert drop_all.restored == 0 and drop_all.metric == pytest.approx(df.attrs["metric_base"])
    expected = (keep_all.metric - df.attrs["metric_base"]) / (df.attrs["metric_target"] - df.attrs["metric_base"])
    assert keep_all.restored == pytest.approx(expected)
    assert df.attrs["kl_none"] > df.attrs["kl_all"] > 0      # patching moves the run toward the source


def test_full_patch_in_the_neuron_basis_restores_the_source(model, pair):
    base, source = pair
    df = search_feature_set(model, {SITE: IdentityDictionary(32)}, SITE, base, source, metric=metric,
                            taus=[-INF], batch=32)
    assert df.kl[0] < 1e-8
    assert df.restored[0] == pytest.approx(1.0, abs=1e-4)


def test_batched_evaluation_equals_one_forward_per_set(model, sae, pair):
    base, source = pair
    sets = [[0, 3, 5], [1], [], [2, 4, 6, 7, 9, 11], list(range(24))]
    batched = feature_set_kl(model, {SITE: sae}, SITE, base, source, sets, batch=len(sets))
    single = feature_set_kl(model, {SITE: sae}, SITE, base, source, sets, batch=1)
    reference = torch.tensor([reference_kl(model, sae, base, source, s) for s in sets], dtype=torch.float64)
    assert torch.allclose(batched, single, rtol=1e-5, atol=1e-7)
    assert torch.allclose(batched, reference, rtol=1e-4, atol=1e-6)
    assert len(set(torch.round(reference, decimals=4).tolist())) > 3   # the sets differ in effect


@pytest.mark.parametrize("batch", [1, 3])
def test_search_equals_the_one_forward_per_candidate_greedy(model, sae, pair, batch):
    base, source = pair
    taus = [1e-2, 1e-1]
    probe = search_feature_set(model, {SITE: sae}, SITE, base, source, taus=[-INF])
    order = probe.attrs["candidates"][:10][::-1]                      # a subset, visited in reverse
    df = search_feature_set(model, {SITE: sae}, SITE, base, source, taus=taus, batch=batch, order=order,
                            candidates=order)
    # the paper's greedy (block variant for batch > 1) with one patch_features forward per set
    target = model.hf(input_ids=source).logits[:, -1].double().log_softmax(-1)
    kl = lambda feats: reference_kl(model, sae, base, source, feats, target)  # noqa: E731
    S = list(order)
    kl_S = kl(S)
    for tau, row in zip(taus, df.itertuples()):
        visit = list(S)
        for i in range(0, len(visit), batch):
            block = visit[i:i + batch]
            kls = [kl([f for f in S if f != j]) for j in block]
            drops = [j for j, kl in zip(block, kls) if kl - kl_S < tau]
            S = [f for f in S if f not in drops]
            kl_S = kl(S)
        assert sorted(row.features) == sorted(S)
        assert row.kl == pytest.approx(kl_S, rel=1e-4, abs=1e-6)
    assert df.n_features.iloc[0] > df.n_features.iloc[-1]           # the grid does something


def test_forward_count_is_blocks_per_tau(model, sae, pair):
    base, source = pair
    taus = [1e-3, 1e-2, 1e-1, 1.0]
    counts = {}
    for batch in (2, 8):
        df = search_feature_set(model, {SITE: sae}, SITE, base, source, taus=taus, batch=batch, order="ascending")
        n = len(df.attrs["candidates"])
        start = [n] + df.n_features.tolist()[:-1]
        for row, s in zip(df.itertuples(), start):
            assert row.forwards <= math.ceil(s / batch) + 1
        assert df.attrs["forwards"] == 1 + df.forwards.sum()
        assert df.attrs["forwards"] <= 1 + len(taus) * (math.ceil(n / batch) + 1)
        counts[batch] = df.attrs["forwards"]
    assert counts[8] < counts[2]


def test_sets_are_nested_and_sequential_greedy_never_raises_kl_at_tau_zero(model, sae, pair):
    base, source = pair
    df = search_feature_set(model, {SITE: sae}, SITE, base, source, taus=[0.0, 1e-2, 1e-1, 1.0], batch=1,
                            order="random", seed=1)
    # with batch=1 every accepted drop changed KL by less than tau
    assert df.kl[0] <= df.attrs["kl_all"] + 1e-6
    for prev, nxt in zip(df.features[:-1], df.features[1:]):
        assert set(nxt) <= set(prev)
    assert (df.n_features.diff().dropna() <= 0).all()


def test_right_padding_changes_nothing(model, sae, pair):
    base, source = pair
    pad = torch.zeros(2, 2, dtype=torch.long)
    mask = torch.cat([torch.ones(2, 5, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long)], 1)
    kw = dict(taus=[-INF, 1e-2], batch=8, order="ascending")
    plain = search_feature_set(model, {SITE: sae}, SITE, base, source, **kw)
    padded = search_feature_set(model, {SITE: sae}, SITE, torch.cat([base, pad], 1), torch.cat([source, pad], 1),
                                base_mask=mask, source_mask=mask, **kw)
    assert padded.attrs["candidates"] == plain.attrs["candidates"]
    assert padded.attrs["kl_none"] == pytest.approx(plain.attrs["kl_none"], rel=1e-5)
    assert padded.features.tolist() == plain.features.tolist()
    assert padded.kl.tolist() == pytest.approx(plain.kl.tolist(), rel=1e-4)
    assert padded.edit_l2.tolist() == pytest.approx(plain.edit_l2.tolist(), rel=1e-4)


def test_errors(model, sae, pair):
    base, source = pair
    with pytest.raises(ValueError, match="same shape"):
        search_feature_set(model, {SITE: sae}, SITE, base, source[:, :4])
    with pytest.raises(ValueError, match="unknown order"):
        search_feature_set(model, {SITE: sae}, SITE, base, source, order="largest")
    with pytest.raises(ValueError, match="batch"):
        search_feature_set(model, {SITE: sae}, SITE, base, source, batch=0)
    with pytest.raises(ValueError, match="no dictionary"):
        search_feature_set(model, {SITE: sae}, "resid.1", base, source)
    with pytest.raises(ValueError, match="every candidate"):
        search_feature_set(model, {SITE: sae}, SITE, base, source, order=[0, 1])


@pytest.mark.slow
def test_smollm2_ioi_search_with_a_pca_basis(smollm2):
    """End to end on IOI: patch clean-run PCA components into the ABC counterfactual."""
    import warnings

    from interventions.tasks import logit_diff, make_ioi
    from sae.baselines import PCADictionary

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = make_ioi(smollm2.tokenizer, n=4, seed=0)
    site = "resid.12"
    acts = run_spliced_acts(smollm2, site, torch.cat([ds.input_ids, ds.cf_input_ids]))
    pca = PCADictionary.fit(acts.flatten(0, 1), n_latents=8)
    df = search_feature_set(smollm2, {site: pca}, site, ds.cf_input_ids, ds.input_ids,
                            metric=lambda logits: logit_diff(logits, ds), taus=[-INF, 1e-2, INF], batch=8)
    assert df.n_features.tolist()[0] == 8 and df.n_features.tolist()[-1] == 0
    assert (df.n_features.diff().dropna() <= 0).all()
    assert df.kl.iloc[-1] == pytest.approx(df.attrs["kl_none"]) and df.restored.iloc[-1] == 0
    assert df.attrs["metric_target"] > df.attrs["metric_base"]        # the clean run prefers IO
    assert df.attrs["forwards"] <= 1 + 3 * (math.ceil(8 / 8) + 1)


def run_spliced_acts(model, site, ids):
    from interventions.spliced import run_spliced

    width = model.sites[site].width
    return run_spliced(model, {site: IdentityDictionary(width)}, ids, logits=False).acts[site]
