"""Universality measures against independent computations: MMCS of a dictionary with itself and
with a permuted copy, max correlation against numpy's corrcoef, planted shared features found
across two tiny models of different widths, the offset alignment of two tokenizations, and the
whole section end to end on tiny models (cached rerun loads the dictionaries)."""
import importlib.util

import numpy as np
import pytest
import torch

from circuits.runners import universality as uni
from sae.models import tiny_model


def test_max_correlation_matches_numpy_corrcoef():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(300, 7, generator=g))
    b = torch.relu(torch.randn(300, 11, generator=g))
    b[:, 3] = 2.0 * a[:, 5] + 0.1 * b[:, 3]            # a strongly correlated partner of a_5
    b[:, 4] = 1.0                                       # constant: never the max
    a[:, 6] = 0.0                                       # never fires: not counted
    with np.errstate(invalid="ignore"):                  # the constant and silent columns give NaN
        full = np.corrcoef(a.numpy().T, b.numpy().T)[:7, 7:]   # [7, 11]
    full[:, 4] = -np.inf
    expect = np.nanmax(full, axis=1)
    got = uni.max_correlation(a, b)
    assert np.allclose(got[:6].numpy(), expect[:6], atol=1e-5)
    assert torch.isnan(got[6]) and got[5] > 0.99


def test_max_correlation_rejects_mismatched_positions():
    with pytest.raises(ValueError, match="same n positions"):
        uni.max_correlation(torch.zeros(5, 2), torch.zeros(6, 2))


def test_planted_shared_features_correlate_and_shuffling_breaks_them():
    g = torch.Generator().manual_seed(1)
    n, shared = 2000, 12
    z = torch.relu(torch.randn(n, shared, generator=g) - 1.0)           # sparse shared causes
    a = torch.cat([z, torch.relu(torch.randn(n, 4, generator=g) - 1.0)], 1)   # 12 shared + 4 own
    perm = torch.randperm(shared, generator=g)
    b = torch.cat([3.0 * z[:, perm] + 0.01 * torch.rand(n, shared, generator=g),
                   torch.relu(torch.randn(n, 9, generator=g) - 1.0)], 1)
    row, rho, base = uni.activation_row(a, b, "a", "b", min_active=5)
    assert (rho[:shared] > 0.99).all() and (rho[shared:] < 0.3).all()
    assert row["mean_max_corr"] == pytest.approx(float(rho.mean()))
    assert row["share_above"] == pytest.approx(shared / 16)
    assert row["shuffled_mean"] < 0.2 and (base < 0.3).all()


def test_shared_positions_are_common_token_ends():
    text = "the cat sat"
    a = [(0, 3), (3, 7), (7, 11)]                       # "the", " cat", " sat"
    b = [(0, 0), (0, 1), (1, 3), (3, 5), (5, 7), (7, 11)]   # BOS, "t", "he", " c", "at", " sat"
    ia, ib = uni.shared_positions(a, b)
    # first real token skipped in each; ends 7 and 11 are shared
    assert [a[i][1] for i in ia] == [7, 11] and [b[i][1] for i in ib] == [7, 11]
    assert ia == [1, 2] and ib == [4, 5]
    assert all(text[: a[i][1]] == text[: b[j][1]] for i, j in zip(ia, ib))
    # several tokens ending at one offset (byte fallback): the last one is used
    ia, ib = uni.shared_positions([(0, 1), (1, 2), (1, 2)], [(0, 1), (1, 2)])
    assert (ia, ib) == ([2], [1])


def test_mmcs_self_permuted_and_random_rows():
    from sae.similarity import mmcs

    from sae.architectures import TopKSAE

    torch.manual_seed(0)
    d = TopKSAE(32, 96, k=4)
    perm = torch.randperm(96)
    twin = TopKSAE(32, 96, k=4)
    with torch.no_grad():
        twin.W_dec.copy_(d.W_dec[perm])
    row = uni.decoder_row(d, twin, "a", "b", hungarian=True)
    assert row["mmcs_ab"] == pytest.approx(1.0, abs=1e-5) and row["mmcs_ba"] == pytest.approx(1.0, abs=1e-5)
    assert row["hungarian_share"] == 1.0 and row["hungarian_mean_cos"] == pytest.approx(1.0, abs=1e-5)
    # the random baseline: as many random unit directions, scored the same way
    rand = uni.random_directions(96, 32, seed=uni.RANDOM_SEED)
    assert row["random_ab"] == pytest.approx(mmcs(d, rand)) and row["random_ab"] < 0.8
    # a rotation of both dictionaries leaves MMCS unchanged
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    assert mmcs(d.W_dec @ q, rand @ q) == pytest.approx(mmcs(d, rand), abs=1e-5)


def test_mid_site_scales_with_depth():
    m = tiny_model("llama", n_layers=5, d_model=16)
    assert uni.mid_site(m) == "resid.2" and uni.mid_site(m, 1.0) == "resid.4"
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        uni.mid_site(m, 1.5)


def test_section_end_to_end_on_two_tiny_models(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_CIRCUITS_CACHE", str(tmp_path / "cache"))
    a = tiny_model("llama", n_layers=2, d_model=32, seed=0)
    b = tiny_model("gemma", n_layers=3, d_model=48, seed=1)
    settings = uni.Settings(tokens=2048, eval_contexts=4, expansions=(2, 4), k=4, batch_size=256, min_active=1)
    sec = uni.universality_section(a, tmp_path / "out", other=b, settings=settings, progress=False,
                                   sae_root=tmp_path / "runs")
    dec, act = sec.tables["universality_decoder"], sec.tables["universality_activation"]
    assert list(dec["a"]) == ["x4_seed0", "x2_seed0"] and list(dec["b"]) == ["x4_seed1", "x4_seed0"]
    assert (dec["n_a"] == [128, 64]).all() and (dec["n_b"] == [128, 128]).all()
    assert ((dec[["mmcs_ab", "mmcs_ba"]] > -1).all().all() and (dec[["mmcs_ab", "mmcs_ba"]] <= 1 + 1e-6).all().all())
    # same tokenizer: (nearly) every position after the first of each of the 4 texts is shared
    assert act["positions"].iloc[0] > 4 * 100 and act["counted"].iloc[0] > 0
    assert {c.verdict for c in sec.claims} <= {"reproduced", "not reproduced", "partly"} and len(sec.claims) == 3
    assert sec.figures[0].is_file() and (tmp_path / "out" / "universality.md").is_file()
    md = (tmp_path / "out" / "universality.md").read_text()
    assert f"{dec['mmcs_ab'].iloc[0]:.3g}" in md
    # a rerun loads the cached sweeps and gives the same numbers
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2
    again = uni.universality_section(a, tmp_path / "out2", other=b, settings=settings, progress=False,
                                     sae_root=tmp_path / "runs")
    assert np.allclose(again.tables["universality_decoder"]["mmcs_ab"], dec["mmcs_ab"])
    assert np.allclose(again.tables["universality_activation"]["mean_max_corr"], act["mean_max_corr"])
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs


def test_aligned_activations_match_a_direct_forward():
    """Activations at shared positions equal those of a plain forward of each text."""
    a = tiny_model("llama", n_layers=3, d_model=32, seed=0)   # 3 layers: hidden_states[2] is before the final norm
    b = tiny_model("gpt2", n_layers=2, d_model=24, seed=2)
    texts = ["hello there world", "a b"]
    xa, xb = uni.aligned_activations(a, "resid.1", b, "resid.0", texts, batch_size=2, progress=False)
    assert xa.shape == (len(texts[0]) - 1 + len(texts[1]) - 1, 32) and xb.shape[1] == 24
    ids = torch.tensor([a.tokenizer(texts[0])["input_ids"]])
    with torch.no_grad():
        hs = a.hf(input_ids=ids, output_hidden_states=True).hidden_states[2]   # block 1 output
    assert torch.allclose(xa[: len(texts[0]) - 1], hs[0, 1:], atol=1e-5)


@pytest.mark.slow
def test_gemma_loads_from_its_wheel():
    if importlib.util.find_spec(uni.GEMMA_PACKAGE) is None:
        pytest.skip(f"Gemma-3-270M wheel not installed ({uni.GEMMA_INSTALL})")
    from sae.models import load_model

    g = load_model(uni.gemma_path())
    assert g.n_layers == 18 and g.d_model == 640
    batch = g.tokenize("The capital of France is")
    with torch.no_grad():
        logits = g.hf(**batch).logits
    assert torch.isfinite(logits).all()
    top = [g.tokenizer.decode(int(i)) for i in logits[0, -1].topk(5).indices]
    assert " Paris" in top
