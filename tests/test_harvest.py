"""Harvesting: exact values, padding/BOS exclusion, early stop, errors, resumable on-disk store."""
import pytest
import torch

from sae.harvesting import as_token_batch, harvest, harvest_to_store
from sae.store import ActivationStore


def test_rows_are_the_traced_activations_at_kept_positions(llama):
    texts = ["the cat sat", "a much longer sentence here"]
    batch = llama.tokenize(texts)
    rows = list(harvest(llama, texts, ["resid.0", "mlp_hidden.1"], batch_size=1, progress=False,
                        with_tokens=True, exclude_first=False))
    got = torch.cat([r["resid.0"] for r in rows])
    with torch.no_grad():
        hidden = llama.hf(**batch, output_hidden_states=True).hidden_states[1]
    keep = batch["attention_mask"].bool()
    assert got.shape == (int(keep.sum()), 32)
    assert torch.allclose(got, hidden[keep], atol=1e-5)  # padding (right side) is excluded
    assert torch.equal(torch.cat([r["tokens"] for r in rows]), batch["input_ids"][keep])
    assert all(r["mlp_hidden.1"].shape[0] == r["resid.0"].shape[0] for r in rows)


def test_first_position_is_dropped_by_default(llama):
    ids = torch.randint(2, 250, (3, 6))
    with_first = torch.cat([r["tokens"] for r in harvest(llama, ids, "resid.0", exclude_first=False,
                                                          with_tokens=True, progress=False)])
    without = torch.cat([r["tokens"] for r in harvest(llama, ids, "resid.0", with_tokens=True, progress=False)])
    assert torch.equal(with_first, ids.flatten())
    assert torch.equal(without, ids[:, 1:].flatten())


def test_forward_stops_after_the_deepest_site(llama):
    calls = []
    handles = [llama.hf.get_submodule(name).register_forward_pre_hook(lambda *a, n=name: calls.append(n))
               for name in ("model.layers.1", "model.layers.2", "model.norm", "lm_head")]
    try:
        list(harvest(llama, torch.randint(2, 250, (2, 5)), ["resid.0", "mlp.1"], progress=False))
    finally:
        for h in handles:
            h.remove()
    assert "model.layers.1" in calls  # mlp.1 lives inside block 1 (entered) ...
    assert not {"model.layers.2", "model.norm", "lm_head"} & set(calls)  # ... nothing later ran


def test_bad_contexts_are_refused_with_the_limit(llama):
    with pytest.raises(ValueError, match="longer than .* allows \\(256 positions\\)"):
        as_token_batch(llama, torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ValueError, match="must lie in \\[0, 258\\)"):
        as_token_batch(llama, torch.full((1, 4), 1000))
    with pytest.raises(ValueError, match="non-empty"):
        as_token_batch(llama, torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        as_token_batch(llama, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="unknown site"):
        next(harvest(llama, torch.zeros(1, 4, dtype=torch.long), "resid.7", progress=False))


def test_store_resumes_after_an_interruption(llama, tmp_path, monkeypatch):
    ids = torch.randint(2, 250, (10, 8))
    sites = ["resid.0", "attn.2"]
    reference = harvest_to_store(llama, ids, sites, tmp_path / "ref", contexts_per_shard=3, progress=False)

    real_write = ActivationStore.write_shard
    def crash_on_third(self, index, tensors):
        if index == 2:
            raise KeyboardInterrupt("killed")
        real_write(self, index, tensors)
    monkeypatch.setattr(ActivationStore, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        harvest_to_store(llama, ids, sites, tmp_path / "run", contexts_per_shard=3, progress=False)
    assert ActivationStore.open(tmp_path / "run").done == {0, 1}

    written = []
    def record(self, index, tensors):
        written.append(index)
        real_write(self, index, tensors)
    monkeypatch.setattr(ActivationStore, "write_shard", record)
    store = harvest_to_store(llama, ids, sites, tmp_path / "run", contexts_per_shard=3, progress=False)
    assert written == [2, 3] and store.complete
    for i in range(4):
        a, b = store.read_shard(i, verify=True), reference.read_shard(i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # other contexts into the same directory are refused, not mixed in
    with pytest.raises(Exception, match="different activation store"):
        harvest_to_store(llama, ids[:5], sites, tmp_path / "run", contexts_per_shard=3, progress=False)
