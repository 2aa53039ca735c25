"""sae.metrics: one FVU and one meaning of "mse", checked against float64 computations written
out here; the data-parallel normalisers of the TopK loss checked against the single-process loss."""
import copy
import threading

import pytest
import torch

from sae import metrics
from sae.architectures import BatchTopKSAE, GatedSAE, JumpReLUSAE, ReLUSAE, TopKSAE
from sae.dictionary import TrainState


def data(n=256, d=16, offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + offset
    return x, x + 0.3 * torch.randn(n, d, generator=g)


def ref_fvu(x, x_hat):
    x, x_hat = x.double(), x_hat.double()
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@pytest.mark.parametrize("offset", [0.0, 30.0])  # 30: the mean carries > 99% of E||x||^2 (centred branch)
def test_fvu_variance_and_mse_match_float64_definitions(offset):
    x, x_hat = data(offset=offset)
    xd = x.double()
    assert metrics.fvu(x, x_hat).item() == pytest.approx(ref_fvu(x, x_hat), rel=1e-5)
    assert metrics.token_variance(x).item() == pytest.approx((xd - xd.mean(0)).pow(2).sum(1).mean().item(), rel=1e-5)
    err = (xd - x_hat.double()).pow(2)
    assert metrics.mse(x, x_hat).item() == pytest.approx(err.mean().item(), rel=1e-6)              # per element
    assert metrics.sq_err_per_token(x, x_hat).item() == pytest.approx(err.sum(1).mean().item(), rel=1e-6)
    # streamed sums over uneven batches equal the one-shot values
    sums = metrics.ReconstructionSums()
    for lo, hi in ((0, 100), (100, 101), (101, 256)):
        sums.add(x[lo:hi], x_hat[lo:hi])
    assert sums.fvu == pytest.approx(ref_fvu(x, x_hat), rel=1e-9)
    assert sums.mse == pytest.approx(err.mean().item(), rel=1e-9)
    assert sums.sq_err_per_token == pytest.approx(err.sum(1).mean().item(), rel=1e-9)


def two_ranks(fn, inputs):
    """Run fn(input, all_reduce) for two simulated data-parallel ranks in two threads; all_reduce
    sums a tensor over both (in place), as torch.distributed's SUM all_reduce does."""
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def reducer(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return t.copy_(total)
        return all_reduce

    def work(rank):
        out[rank] = fn(inputs[rank], reducer(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out[0] is not None and out[1] is not None
    return out


@pytest.mark.parametrize("offset", [0.0, 30.0])  # 30: the two-round (centred) branch
def test_token_variance_over_ranks_is_that_of_the_whole_batch(offset):
    x, _ = data(offset=offset)
    xd = x.double()
    want = (xd - xd.mean(0)).pow(2).sum(1).mean().item()
    v0, v1 = two_ranks(lambda xs, r: metrics.token_variance(xs, r).item(), [x[:128], x[128:]])
    assert v0 == pytest.approx(want, rel=1e-5) and v1 == pytest.approx(want, rel=1e-5)
    # float64 (and CUDA) inputs take the float64-moment branch
    v0, v1 = two_ranks(lambda xs, r: metrics.token_variance(xs, r).item(), [xd[:128], xd[128:]])
    assert v0 == pytest.approx(want, rel=1e-12) and v1 == pytest.approx(want, rel=1e-12)
    assert metrics.token_variance(x[:128]).item() != pytest.approx(want, rel=1e-3)  # one half alone differs


def test_topk_auxk_loss_and_gradients_averaged_over_ranks_equal_the_whole_batch():
    """Each rank's FVU + AuxK loss divides by the variances of the *global* batch, so the mean of
    the two ranks' losses and gradients is the single-process loss and gradient (the trainer
    averages gradients over ranks). Before the fix every rank divided by its own slice's variances."""
    torch.manual_seed(0)
    model = TopKSAE(d_in=16, n_latents=64, k=4)
    x = torch.randn(256, 16) * 2 + 1
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True  # AuxK active on 24 dead latents

    def loss_and_grads(m, xs, all_reduce=None):
        loss, mets = m.training_loss(xs, TrainState(0, 10, dead, all_reduce=all_reduce))
        loss.backward()
        return loss.detach(), mets, {n: p.grad.clone() for n, p in m.named_parameters()}

    single, mets, g = loss_and_grads(copy.deepcopy(model), x)
    assert mets["auxk"] > 0
    (l0, _, g0), (l1, _, g1) = two_ranks(lambda xs, r: loss_and_grads(copy.deepcopy(model), xs, r),
                                         [x[:128], x[128:]])
    assert ((l0 + l1) / 2).item() == pytest.approx(single.item(), rel=1e-5)
    for n in g:
        assert torch.allclose((g0[n] + g1[n]) / 2, g[n], rtol=1e-4, atol=1e-7), n


def test_every_training_objective_reports_sq_err_per_token_not_mse():
    """'mse' means the mean over elements everywhere; training metrics report the per-token sum
    under its own name, with the value of the definition."""
    x, _ = data(n=128, d=16)
    for model in (TopKSAE(16, 48, k=4), BatchTopKSAE(16, 48, k=4), ReLUSAE(16, 48), JumpReLUSAE(16, 48),
                  GatedSAE(16, 48)):
        _, m = model.training_loss(x, TrainState(0, 10))
        with torch.no_grad():
            x_hat = model(x) if not isinstance(model, BatchTopKSAE) else None
        assert "mse" not in m, type(model).__name__
        if x_hat is not None:  # BatchTopK's training selection differs from its inference encode
            want = (x.double() - x_hat.double()).pow(2).sum(1).mean().item()
            assert float(m["sq_err_per_token"]) == pytest.approx(want, rel=1e-4), type(model).__name__
            assert float(m["fvu"]) == pytest.approx(ref_fvu(x, x_hat), rel=1e-4), type(model).__name__


def test_one_fvu_function_is_used_by_training_and_the_runners(monkeypatch):
    from interventions.runners import erasure_bench, ioi_patching

    calls = []
    real = metrics.fvu

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(metrics, "fvu", spy)
    x, _ = data(n=64, d=16)
    for model in (TopKSAE(16, 48, k=4), ReLUSAE(16, 48), JumpReLUSAE(16, 48), GatedSAE(16, 48)):
        calls.clear()
        _, m = model.training_loss(x, TrainState(0, 10))
        assert calls, type(model).__name__
    model = ReLUSAE(16, 48)
    calls.clear()
    got = erasure_bench.fvu(model, x)
    assert calls and got == pytest.approx(ref_fvu(x, model(x).detach()), rel=1e-9)
    calls.clear()
    xb, xs = x[:32].reshape(4, 8, 16), x[32:].reshape(4, 8, 16)
    got = ioi_patching.delta_diagnostics(model, xb, xs, torch.tensor([0, 1]))["fvu"]
    both = torch.cat([xb, xs])[:, 1:].reshape(-1, 16)
    assert calls and got == pytest.approx(ref_fvu(both, model(both).detach()), rel=1e-6)
