"""ActivationStore: round trip, resume, corruption, manifest mismatch, disk full, batching."""
import errno
import json
import os
import re

import pytest
import torch

import sae.store as store_mod
from sae.store import ActivationStore, CorruptShardError, DiskFullError, StoreError, shard_name

WIDTHS = {"resid.1": 6, "mlp.1": 4}
META = {"model": "tiny", "ctx_len": 8}


def chunk(index: int, n: int = 10, tokens: bool = True) -> dict[str, torch.Tensor]:
    """A shard whose rows are identifiable: row r of shard i carries id 1000*i + r at every site."""
    g = torch.Generator().manual_seed(index)
    ids = torch.arange(n) + 1000 * index
    out = {
        "resid.1": torch.cat([ids[:, None].float(), torch.randn(n, 5, generator=g)], dim=1),
        "mlp.1": torch.cat([ids[:, None].float(), torch.randn(n, 3, generator=g)], dim=1),
    }
    if tokens:
        out["tokens"] = ids
    return out


def make(tmp_path, n_shards=4, write=range(4), **kw) -> ActivationStore:
    st = ActivationStore.create(tmp_path / "store", WIDTHS, n_shards=n_shards, meta=META, tokens=True, **kw)
    for i in write:
        st.write_shard(i, chunk(i))
    return st


def test_round_trip_bit_exact(tmp_path):
    st = make(tmp_path)
    st.finish()
    again = ActivationStore.open(tmp_path / "store")
    assert again.complete and again.done == {0, 1, 2, 3} and again.n_tokens == 40
    assert again.widths == WIDTHS and again.dtype == torch.float32 and again.meta == META
    assert again.sites == ["resid.1", "mlp.1"] and again.has_tokens
    for i in range(4):
        got = again.read_shard(i, verify=True)
        want = chunk(i)
        assert set(got) == set(want)
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
    assert set(again.read_shard(2, sites="mlp.1")) == {"mlp.1"}


def test_dtype_cast_and_input_validation(tmp_path):
    st = ActivationStore.create(tmp_path / "s", {"a": 3}, dtype=torch.float16)
    x = torch.randn(5, 3)
    st.write_shard(0, {"a": x})
    assert torch.equal(st.read_shard(0)["a"], x.half())
    with pytest.raises(ValueError, match=r"unexpected entries \['b'\], missing entries \['a'\]"):
        st.write_shard(1, {"b": x})
    with pytest.raises(ValueError, match="created without tokens"):
        st.write_shard(1, {"a": x, "tokens": torch.arange(5)})
    with pytest.raises(ValueError, match=r"must be a Tensor \[n_tokens, 3\], got \(5, 4\)"):
        st.write_shard(1, {"a": torch.randn(5, 4)})
    with pytest.raises(ValueError, match="floating point"):
        st.write_shard(1, {"a": torch.ones(5, 3, dtype=torch.int64)})
    with pytest.raises(ValueError, match="non-negative int"):
        st.write_shard(-1, {"a": x})
    with pytest.raises(ValueError, match="different row counts"):
        make(tmp_path).write_shard(0, {**chunk(0), "tokens": torch.arange(9)})
    with pytest.raises(ValueError, match="out of range"):
        make(tmp_path, write=[]).write_shard(4, chunk(4))
    with pytest.raises(ValueError, match="reserved"):
        ActivationStore.create(tmp_path / "t", {"tokens": 1})
    with pytest.raises(ValueError, match="floating torch dtype"):
        ActivationStore.create(tmp_path / "t", {"a": 1}, dtype=torch.int32)
    with pytest.raises(ValueError, match="unknown sites"):
        st.read_shard(0, sites=["nope"])
    assert st.done == {0}  # failed writes changed nothing


def test_resume_after_interruption(tmp_path):
    st = make(tmp_path, n_shards=5, write=[0, 2])
    d = st.directory
    # Simulate a kill between the rename and the manifest update, and a leftover temp file.
    stray = d / shard_name(3)
    stray.write_bytes(b"half a shard")
    temp = d / f".{shard_name(4)}.tmp-12345"
    temp.write_bytes(b"partial")

    resumed = ActivationStore.create(d, WIDTHS, n_shards=5, meta=META, tokens=True)
    assert resumed.done == {0, 2}
    assert resumed.missing() == [1, 3, 4]  # what the caller still has to write
    assert not stray.exists() and not temp.exists()
    with pytest.raises(StoreError, match="not in the manifest"):
        resumed.read_shard(3)
    for i in resumed.missing():
        resumed.write_shard(i, chunk(i))
    resumed.finish()
    assert ActivationStore.open(d).complete
    assert torch.equal(ActivationStore.open(d).read_shard(3, verify=True)["tokens"], chunk(3)["tokens"])
    # A complete store is reused as is.
    reused = ActivationStore.create(d, WIDTHS, n_shards=5, meta=META, tokens=True)
    assert reused.complete and reused.missing() == []


def test_resume_rewrites_truncated_shard(tmp_path):
    st = make(tmp_path, n_shards=4, write=[0, 1])
    path = st.directory / shard_name(1)
    path.write_bytes(path.read_bytes()[:-7])
    resumed = ActivationStore.create(st.directory, WIDTHS, n_shards=4, meta=META, tokens=True)
    assert resumed.missing() == [1, 2, 3]
    assert ActivationStore.open(st.directory).done == {0}  # the manifest on disk was updated too


def test_truncated_shard_refused_by_size(tmp_path):
    st = make(tmp_path)
    path = st.directory / shard_name(1)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match=r"shard-00001\.safetensors is corrupt: size .*Delete it and re-run"):
        st.read_shard(1)
    assert st.read_shard(0)["tokens"].shape == (10,)  # other shards are unaffected


def test_flipped_byte_refused_with_verify(tmp_path):
    st = make(tmp_path)
    st.finish()
    path = st.directory / shard_name(2)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data: same size, valid header
    path.write_bytes(bytes(data))
    st.read_shard(2)  # size check alone cannot see it
    with pytest.raises(CorruptShardError, match=r"shard-00002\.safetensors is corrupt: its sha256"):
        st.read_shard(2, verify=True)
    assert st.verify() == [2]
    assert st.done == {0, 1, 3} and not st.complete
    reopened = ActivationStore.create(st.directory, WIDTHS, n_shards=4, meta=META, tokens=True)
    assert reopened.missing() == [2]  # a rerun rebuilds it


def test_manifest_mismatch_says_what_differs(tmp_path):
    make(tmp_path, write=[0])
    with pytest.raises(StoreError, match=r"widths: store has .*'mlp.1': 4.*requested.*'mlp.1': 5"):
        ActivationStore.create(tmp_path / "store", {"resid.1": 6, "mlp.1": 5}, n_shards=4, meta=META, tokens=True)
    with pytest.raises(StoreError, match=r"meta: store has \{'ctx_len': 8, 'model': 'tiny'\}, requested"):
        ActivationStore.create(tmp_path / "store", WIDTHS, n_shards=4, meta={"model": "other"}, tokens=True)
    with pytest.raises(StoreError, match="dtype: store has 'float32', requested 'bfloat16'"):
        ActivationStore.create(tmp_path / "store", WIDTHS, torch.bfloat16, n_shards=4, meta=META, tokens=True)


def test_bad_directory_and_manifest(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and holds no manifest.json"):
        ActivationStore.create(tmp_path / "other", WIDTHS)
    st = make(tmp_path, write=[0])
    (st.directory / "manifest.json").write_text("{ not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        ActivationStore.open(st.directory)
    m = {"format": store_mod.FORMAT, "version": 1, "widths": WIDTHS, "dtype": "float32", "tokens": False,
         "meta": {}, "complete": False, "n_shards": None,
         "shards": {"0": {"file": "../evil", "n_tokens": 1, "bytes": 1, "sha256": "0" * 64}}}
    (st.directory / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="entry for shard 0 is malformed"):
        ActivationStore.open(st.directory)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        ActivationStore.open(tmp_path / "nowhere")


def _listing(d):
    return sorted(os.listdir(d))


def test_disk_full_during_shard_write(tmp_path, monkeypatch):
    st = make(tmp_path, write=[0])
    d = st.directory
    manifest_before = (d / "manifest.json").read_bytes()
    real_write = store_mod._write_bytes

    def full_disk(path, data):
        if "shard" in path.name:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])  # some bytes land, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store_mod, "_write_bytes", full_disk)
    with pytest.raises(DiskFullError) as info:
        st.write_shard(1, chunk(1))
    msg = str(info.value)
    assert str(d) in msg and "rerun" in msg
    assert re.search(r"needs [\d,]+ bytes, [\d,]+ free", msg)
    assert info.value.errno == errno.ENOSPC
    assert _listing(d) == ["manifest.json", shard_name(0)]  # no partial file
    assert (d / "manifest.json").read_bytes() == manifest_before
    assert st.done == {0}
    monkeypatch.setattr(store_mod, "_write_bytes", real_write)
    resumed = ActivationStore.create(d, WIDTHS, n_shards=4, meta=META, tokens=True)
    assert resumed.missing() == [1, 2, 3]


def test_disk_full_during_manifest_update(tmp_path, monkeypatch):
    st = make(tmp_path, write=[0])
    d = st.directory
    real_write = store_mod._write_bytes

    def full_on_manifest(path, data):
        if "manifest" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store_mod, "_write_bytes", full_on_manifest)
    with pytest.raises(DiskFullError, match="writing manifest.json"):
        st.write_shard(1, chunk(1))
    assert _listing(d) == ["manifest.json", shard_name(0)]  # the unrecorded shard was removed
    assert st.done == {0} and ActivationStore.open(d).done == {0}


def test_not_enough_free_space_checked_before_writing(tmp_path, monkeypatch):
    st = make(tmp_path, write=[0])

    class Usage:
        total, used, free = 10**6, 10**6 - 100, 100

    monkeypatch.setattr(store_mod.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(DiskFullError, match=r"needs [\d,]+ bytes, 100 free"):
        st.write_shard(1, chunk(1))
    assert st.done == {0} and _listing(st.directory) == ["manifest.json", shard_name(0)]


def test_finish_requires_all_shards(tmp_path):
    st = make(tmp_path, write=[0, 1, 3])
    with pytest.raises(StoreError, match=r"shards \[2\] not written"):
        st.finish()
    assert not st.complete
    open_ended = ActivationStore.create(tmp_path / "open", {"a": 2})
    open_ended.write_shard(0, {"a": torch.zeros(3, 2)})
    open_ended.write_shard(1, {"a": torch.zeros(2, 2)})
    open_ended.finish()
    assert open_ended.n_shards == 2 and open_ended.complete
    reused = ActivationStore.create(tmp_path / "open", {"a": 2})  # same arguments: reused, not refused
    assert reused.complete and reused.n_tokens == 5
    with pytest.raises(StoreError, match="marked complete"):
        open_ended.write_shard(2, {"a": torch.zeros(2, 2)})


def test_iter_batches_shuffled_covers_every_row_aligned(tmp_path):
    st = make(tmp_path)
    st.finish()
    batches = list(st.iter_batches(["resid.1", "mlp.1", "tokens"], batch_size=8, buffer_tokens=16, seed=3))
    ids = torch.cat([b["tokens"] for b in batches])
    assert sorted(ids.tolist()) == sorted(torch.cat([chunk(i)["tokens"] for i in range(4)]).tolist())
    for b in batches:
        assert torch.equal(b["resid.1"][:, 0].long(), b["tokens"])
        assert torch.equal(b["mlp.1"][:, 0].long(), b["tokens"])
    again = torch.cat([b["tokens"] for b in st.iter_batches(["tokens", "mlp.1"], 8, buffer_tokens=16, seed=3)])
    other = torch.cat([b["tokens"] for b in st.iter_batches(["tokens", "mlp.1"], 8, buffer_tokens=16, seed=4)])
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_iter_batches_single_site_in_order_and_epochs(tmp_path):
    st = make(tmp_path)
    st.finish()
    ordered = list(st.iter_batches("resid.1", batch_size=15, shuffle=False))
    assert all(isinstance(b, torch.Tensor) and b.shape[1] == 6 for b in ordered)
    assert [b.shape[0] for b in ordered] == [15, 15, 10]
    expected = torch.cat([chunk(i)["resid.1"] for i in range(4)])
    assert torch.equal(torch.cat(ordered), expected)
    two = list(st.iter_batches("mlp.1", batch_size=8, epochs=2, buffer_tokens=16, drop_last=True))
    assert len(two) == 80 // 8
    counts = torch.cat(two)[:, 0].long().bincount()
    assert set(counts[counts > 0].tolist()) == {2}  # every row exactly twice


def test_iter_batches_warns_on_incomplete_store(tmp_path):
    st = make(tmp_path, write=[0, 1])
    with pytest.warns(UserWarning, match="not complete"):
        rows = sum(b.shape[0] for b in st.iter_batches("mlp.1", 4))
    assert rows == 20


def test_rewriting_a_shard_replaces_it(tmp_path):
    st = make(tmp_path, write=[0, 1])
    new = chunk(7)
    st.write_shard(1, new)
    got = ActivationStore.open(st.directory).read_shard(1, verify=True)
    assert torch.equal(got["tokens"], new["tokens"]) and st.done == {0, 1}
