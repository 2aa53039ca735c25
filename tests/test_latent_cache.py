"""Latent cache on a tiny model with a planted dictionary: exactly the right top windows, ordered
quantile bins, truly silent negatives, exact firing statistics, a killed build that resumes to the
uninterrupted result, and clear errors for bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from circuits.autointerp.cache import CacheError, LatentCache, build_latent_cache
from sae.baselines import IdentityDictionary
from sae.dictionary import Dictionary
from sae.harvesting import harvest
from sae.models import tiny_model

W = 32
N_ROWS, CTX = 24, 128
QUIET_ROWS = range(16, 24)           # only tokens 60..99: feature 1 never fires there
# feature 0: planted tokens 200..204 with values 5..1 at (row, position)
PLANTS = [(3, 40, 200), (7, 5, 201), (1, 100, 202), (10, 70, 203), (2, 0, 204), (5, 33, 204)]
EXPECTED_TOP = [((3, 32), 5.0), ((7, 0), 4.0), ((1, 96), 3.0), ((10, 64), 2.0), ((5, 32), 1.0)]  # (2, 0) is position 0


class Planted(Dictionary):
    """Codes looked up by token: encode(x) = table[t] where x is the embedding of token t."""

    architecture = "planted-test"
    unit_norm_decoder = False

    def __init__(self, embedding: torch.Tensor, table: torch.Tensor):
        super().__init__(embedding.shape[1], table.shape[1])
        self.register_buffer("E", embedding.clone())          # [V, d]
        self.register_buffer("table", table.clone())          # [V, n]
        self.register_buffer("W_dec", torch.randn(table.shape[1], embedding.shape[1],
                                                  generator=torch.Generator().manual_seed(0)))

    def encode(self, x):
        if os.environ.get("PLANTED_SLOW"):
            time.sleep(float(os.environ["PLANTED_SLOW"]))
        t = torch.cdist(x.reshape(-1, self.d_in), self.E).argmin(1)
        return self.table[t].reshape(*x.shape[:-1], self.n_latents)

    def decode(self, codes):
        return codes @ self.W_dec


def setup():
    """(model, {site: dictionary}, contexts, table): deterministic."""
    model = tiny_model("llama", d_model=32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 100, (N_ROWS, CTX), generator=g)
    ids[list(QUIET_ROWS)] = torch.randint(60, 100, (len(QUIET_ROWS), CTX), generator=g)
    for row, pos, tok in PLANTS:
        ids[row, pos] = tok
    V = model.hf.get_input_embeddings().num_embeddings
    table = torch.zeros(V, 4)
    table[200:205, 0] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    table[10:60, 1] = (torch.arange(10, 60).float() - 9) / 10
    table[:, 2] = table[:, 0]                 # a copy of feature 0: perfectly correlated
    planted = Planted(model.hf.get_input_embeddings().weight.detach(), table)   # feature 3 never fires
    return model, {"embed": planted, "mlp_hidden.1": IdentityDictionary(model.sites["mlp_hidden.1"].width)}, ids, table


KW = dict(features={"mlp_hidden.1": list(range(8))}, n_top=8, n_quantiles=4, per_quantile=3, n_random=5,
          n_negatives=6, n_hard_negatives=3, hard_negative_pool=40, reservoir=100, batch_size=4, seed=0,
          progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model, dicts, ids, table = setup()
    cache = build_latent_cache(model, dicts, ids, tmp_path_factory.mktemp("cache") / "c", **KW)
    return model, dicts, ids, table, cache


def true_acts(table, ids, w, f):
    """The planted activation at each token of window w (0 at position 0)."""
    a = table[torch.tensor(w.tokens), f].tolist()
    return [0.0 if w.start + i == 0 else v for i, v in enumerate(a)]


def test_planted_top_windows_exact(built):
    model, dicts, ids, table, cache = built
    ex = cache.examples("embed", 0)
    assert [((w.row, w.start), w.max_act) for w in ex.top] == EXPECTED_TOP
    for w in ex.top:
        assert list(w.acts) == true_acts(table, ids, w, 0)
        assert list(w.tokens) == ids[w.row, w.start:w.start + W].tolist()
    assert cache.examples("embed", 3).top == []          # never fires
    assert cache.examples("embed", 3).density == 0.0


def test_firing_statistics_exact(built):
    model, dicts, ids, table, cache = built
    real = table[ids[:, 1:]]                              # [rows, ctx-1, 4]: position 0 excluded
    assert cache.n_tokens == N_ROWS * (CTX - 1)
    for f in range(3):
        ex = cache.examples("embed", f)
        v = real[..., f]
        assert ex.n_tokens == v.numel()
        assert ex.density == pytest.approx(float((v > 0).float().mean()))
        assert ex.max_act == pytest.approx(float(v.max()))
        assert ex.mean_active == pytest.approx(float(v[v > 0].mean()))
        assert sum(ex.hist_counts) == int((v > 0).sum())
        assert len(ex.hist_edges) == len(ex.hist_counts) + 1
        assert all(a < b for a, b in zip(ex.hist_edges, ex.hist_edges[1:]))
        assert ex.hist_edges[0] <= float(v[v > 0].min()) and ex.hist_edges[-1] >= float(v.max())
    assert cache.examples("embed", 0).correlated[0] == (2, pytest.approx(1.0))
    stats = cache.statistics("embed")
    assert stats.feature.tolist() == [0, 1, 2, 3]
    for f in range(4):
        ex = cache.examples("embed", f)
        assert stats.density[f] == pytest.approx(ex.density) and stats.max_act[f] == pytest.approx(ex.max_act)
        assert stats.mean_active[f] == pytest.approx(ex.mean_active)


def test_quantile_bins_ordered_and_random_activating(built):
    model, dicts, ids, table, cache = built
    ex = cache.examples("embed", 1)
    assert len(ex.quantiles) == 4 and all(len(q) == 3 for q in ex.quantiles)
    for lower, upper in zip(ex.quantiles, ex.quantiles[1:]):
        assert max(w.max_act for w in lower) <= min(w.max_act for w in upper)
    assert ex.quantiles[0][0].max_act < ex.quantiles[-1][-1].max_act
    assert len(ex.random) == 5
    for w in [*ex.random, *(w for q in ex.quantiles for w in q)]:
        assert w.max_act > 0 and list(w.acts) == true_acts(table, ids, w, 1)
        assert w.row not in QUIET_ROWS
    keys = [(w.row, w.start) for w in ex.random]
    assert len(set(keys)) == len(keys)


def test_negatives_have_zero_activation_everywhere(built):
    model, dicts, ids, table, cache = built
    for f in (0, 1):
        ex = cache.examples("embed", f)
        assert len(ex.negatives) == 6 and len(ex.hard_negatives) == 3
        for w in [*ex.negatives, *ex.hard_negatives]:
            assert all(a == 0 for a in w.acts)
            assert all(v == 0 for v in true_acts(table, ids, w, f)), (f, w.row, w.start)
        if f == 1:
            assert all(w.row in QUIET_ROWS for w in ex.negatives + ex.hard_negatives)


def test_neuron_top_windows_match_brute_force(built):
    """Identity dictionary on a real site: top windows equal an exact computation from harvest."""
    model, dicts, ids, table, cache = built
    acts = torch.zeros(N_ROWS, CTX, 64)
    rows = torch.cat([b["mlp_hidden.1"] for b in harvest(model, ids, ["mlp_hidden.1"], progress=False)])
    acts[:, 1:] = rows.reshape(N_ROWS, CTX - 1, 64)
    win = acts.clamp_min(0).reshape(N_ROWS, CTX // W, W, 64).amax(2).reshape(-1, 64)   # [windows, 64]
    assert cache.features("mlp_hidden.1") == list(range(8))
    for f in range(8):
        ex = cache.examples("mlp_hidden.1", f)
        order = win[:, f].argsort(descending=True)[:8]
        assert [(w.row * (CTX // W) + w.start // W) for w in ex.top] == order.tolist()
        assert [w.max_act for w in ex.top] == pytest.approx(win[order, f].tolist())
        assert ex.density == pytest.approx(float((rows[:, f] > 0).float().mean()))


def test_reopen_and_identical_rebuild(built, tmp_path):
    model, dicts, ids, table, cache = built
    again = build_latent_cache(model, dicts, ids, cache.directory, **KW)     # finished: opened, not rebuilt
    assert again.examples("embed", 1) == cache.examples("embed", 1)
    fresh = build_latent_cache(model, dicts, ids, tmp_path / "c2", **KW)     # same seed: same result
    for site in cache.sites:
        for f in cache.features(site):
            assert fresh.examples(site, f) == cache.examples(site, f)
    assert torch.equal(LatentCache.open(tmp_path / "c2").contexts, ids)


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_latent_cache import setup, KW
from circuits.autointerp.cache import build_latent_cache
model, dicts, ids, table = setup()
build_latent_cache(model, dicts, ids, {out!r}, **dict(KW, checkpoint_every=1))
"""


def test_killed_build_resumes_to_the_same_result(built, tmp_path):
    model, dicts, ids, table, cache = built
    out = tmp_path / "killed"
    script = tmp_path / "build.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    env = dict(os.environ, PLANTED_SLOW="0.5", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                m = json.loads((out / "manifest.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                m = {}
            if (m.get("state") or {}).get("batches", 0) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the build never checkpointed")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        LatentCache.open(out)
    resumed = build_latent_cache(model, dicts, ids, out, **dict(KW, checkpoint_every=1))
    starts = json.loads((out / "manifest.json").read_text())["resumes"]
    assert starts[0] == 0 and starts[-1] >= 2           # continued from a checkpoint, not from scratch
    assert not list(out.glob("state-*"))
    for site in cache.sites:
        for f in cache.features(site):
            assert resumed.examples(site, f) == cache.examples(site, f)


def test_bad_input(built, tmp_path):
    model, dicts, ids, table, cache = built
    with pytest.raises(ValueError, match="unknown site 'resid.99'"):
        build_latent_cache(model, {"resid.99": dicts["embed"]}, ids, tmp_path / "a", **KW)
    with pytest.raises(ValueError, match=r"out of range.*valid ids are 0\.\.63"):
        build_latent_cache(model, dicts, ids, tmp_path / "b", **dict(KW, features={"mlp_hidden.1": [3, 64]}))
    with pytest.raises(ValueError, match="d_in=64 but the site has width 32"):
        build_latent_cache(model, {"embed": dicts["mlp_hidden.1"]}, ids, tmp_path / "c", **KW)
    with pytest.raises(CacheError, match="other arguments.*settings.seed"):
        build_latent_cache(model, dicts, ids, cache.directory, **dict(KW, seed=1))
    with pytest.raises(CacheError, match="other arguments.*contexts_sha256"):
        build_latent_cache(model, dicts, ids[:8], cache.directory, **KW)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a latent cache"):
        build_latent_cache(model, dicts, ids, tmp_path / "d", **KW)
    with pytest.raises(FileNotFoundError, match="no latent cache"):
        LatentCache.open(tmp_path / "nothing")
    with pytest.raises(KeyError, match="resid.0"):
        cache.examples("resid.0", 0)
    with pytest.raises(ValueError, match="feature 9 is not in the latent cache"):
        cache.examples("mlp_hidden.1", 9)
    with pytest.raises(ValueError, match="feature 1.5 is not in the latent cache"):
        cache.examples("mlp_hidden.1", 1.5)
    assert cache.examples("mlp_hidden.1", torch.tensor(3)) == cache.examples("mlp_hidden.1", 3)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        build_latent_cache(model, dicts, ids, tmp_path / "e", **dict(KW, window=0))


def test_correlations_match_pearson(built):
    """`correlated` holds the exact Pearson r of the clamped activations over real tokens."""
    model, dicts, ids, table, cache = built
    rows = torch.cat([b["mlp_hidden.1"] for b in harvest(model, ids, ["mlp_hidden.1"], progress=False)])
    r = torch.corrcoef(rows[:, :8].clamp_min(0).double().T)
    for f in range(8):
        got = cache.examples("mlp_hidden.1", f).correlated
        assert len(got) == 7
        assert [abs(v) for _, v in got] == sorted((abs(v) for _, v in got), reverse=True)
        for g, v in got:
            assert v == pytest.approx(float(r[f, g]), abs=1e-4)


@pytest.mark.parametrize("density", [0.02, 0.9])
def test_coactivation_sums_sparse_and_dense_paths(density):
    from circuits.autointerp.cache import _batch_generator, _fresh_state, _update

    F = 100
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(2 * 63, F, generator=g) * (torch.rand(2 * 63, F, generator=g) < density)
    keep = torch.ones(2, 64, dtype=torch.bool)
    keep[:, 0] = False
    dense = torch.zeros(2, 64, F)
    dense[keep] = codes
    state = _fresh_state(F, 32, 4, 8, 4, 0, True)
    _update(state, codes, dense, torch.ones(2, 2, dtype=torch.bool), torch.arange(4).reshape(2, 2),
            torch.zeros(0, dtype=torch.long), 32, _batch_generator(0, 0, 0))
    assert torch.allclose(state["s2"], (codes.T @ codes).double(), atol=1e-4)
    assert torch.equal(state["n_active"], (codes > 0).sum(0))


def test_hard_negatives_are_nearer_in_embedding_than_random_negatives(built):
    from circuits.autointerp.embedding import embed

    model, dicts, ids, table, cache = built
    for f in (0, 1):
        ex = cache.examples("embed", f)
        text = lambda ws: [model.tokenizer.decode(list(w.tokens)) for w in ws]   # noqa: E731
        centre = torch.nn.functional.normalize(embed(text(ex.top[:3])).mean(0), dim=0)
        hard = (embed(text(ex.hard_negatives)) @ centre).mean()
        rand = (embed(text(ex.negatives)) @ centre).mean()
        assert hard > rand, (f, float(hard), float(rand))
