"""Evaluation metrics on a tiny model, checked against hand-computed values."""
import math

import pandas as pd
import pytest
import torch

from sae.dictionary import Dictionary
from sae.evaluation import evaluate
from sae.harvesting import harvest


class Scaled(Dictionary):
    """x_hat = a * x with codes = x (a test dictionary with a known reconstruction)."""

    architecture = "test-scaled"

    def __init__(self, d_in, a=1.0):
        super().__init__(d_in, d_in)
        self.a = a

    def encode(self, x):
        return x

    def decode(self, c):
        return self.a * c

    @property
    def W_dec(self):
        return self.a * torch.eye(self.d_in)


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(2, 250, (6, 10), generator=torch.Generator().manual_seed(0))


def test_perfect_dictionary_recovers_everything(llama, contexts):
    table = evaluate(llama, {"resid.1": Scaled(32), "mlp_hidden.0": Scaled(64)}, contexts, progress=False)
    for site in ("resid.1", "mlp_hidden.0"):
        row = table.loc[site]
        assert row.tokens == 6 * 9  # position 0 dropped
        assert row.fvu == pytest.approx(0, abs=1e-12) and row.cosine == pytest.approx(1)
        assert row.ce_spliced == pytest.approx(row.ce_clean, abs=1e-5)
        assert row.kl == pytest.approx(0, abs=1e-5) and row.ce_recovered == pytest.approx(1, abs=1e-4)
        assert abs(row.ce_zero - row.ce_clean) > 1e-4  # ablation changes the loss (random model: either way)
    assert table.loc["mlp_hidden.0", "l0"] == pytest.approx(64, abs=0.5)


def test_zero_dictionary_recovers_nothing_and_fvu_matches_by_hand(llama, contexts):
    table = evaluate(llama, {"resid.0": Scaled(32, a=0.0), "attn.1": Scaled(32, a=0.5)}, contexts,
                     progress=False, worst=3)
    zero = table.loc["resid.0"]
    assert zero.ce_spliced == pytest.approx(zero.ce_zero, abs=1e-5)
    assert zero.ce_recovered == pytest.approx(0, abs=1e-4)
    x = torch.cat([b["attn.1"] for b in harvest(llama, contexts, "attn.1", progress=False)]).double()
    expected = (0.25 * x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert table.loc["attn.1", "fvu"] == pytest.approx(expected, rel=1e-6)
    assert table.loc["attn.1", "mse"] == pytest.approx((0.25 * x.pow(2)).mean().item(), rel=1e-6)  # per element
    assert table.loc["attn.1", "sq_err_per_token"] == pytest.approx((0.25 * x.pow(2)).sum(1).mean().item(), rel=1e-6)
    assert table.loc["attn.1", "ppl_diff"] == pytest.approx(
        math.exp(table.loc["attn.1", "ce_spliced"]) - math.exp(table.loc["attn.1", "ce_clean"]))
    worst = pd.DataFrame(table.attrs["worst_tokens"])
    assert set(worst.site) == {"resid.0", "attn.1"} and (worst.groupby("site").size() == 3).all()
    assert (worst.position >= 1).all()
    assert all(g.loss_increase.is_monotonic_decreasing for _, g in worst.groupby("site"))
    assert (worst[worst.site == "resid.0"].loss_increase > 0).any()  # zeroing the stream hurts somewhere


def test_ce_window_and_bad_inputs(llama, contexts):
    table = evaluate(llama, {"resid.0": Scaled(32)}, contexts, ce_tokens=0, progress=False)
    assert "ce_spliced" not in table.columns and table.loc["resid.0", "tokens"] == 54
    # the CE window takes whole contexts (9 predictions each), no more than it needs
    assert evaluate(llama, {"resid.0": Scaled(32)}, contexts, ce_tokens=9, progress=False).loc["resid.0", "ce_tokens"] == 9
    assert evaluate(llama, {"resid.0": Scaled(32)}, contexts, ce_tokens=10, progress=False).loc["resid.0", "ce_tokens"] == 18
    with pytest.raises(ValueError, match="d_in=16 but the site is 32 wide"):
        evaluate(llama, {"resid.0": Scaled(16)}, contexts, progress=False)
    with pytest.raises(ValueError, match="unknown site"):
        evaluate(llama, {"resid.9": Scaled(32)}, contexts, progress=False)
