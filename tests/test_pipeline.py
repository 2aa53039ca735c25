"""train_at_sites: one harvest pass trains every site; finished runs are reused, killed runs resume."""
import pytest
import torch

import sae.pipeline as P
from sae.pipeline import train_at_sites
from sae.training import TrainConfig

CFG = dict(total_tokens=1536, batch_size=128, log_every=4, checkpoint_every=4, calibration_tokens=256, progress=False)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 250, (48, 40), generator=torch.Generator().manual_seed(1))


def _run(llama, ids, directory, **kw):
    return train_at_sites(llama, ids, ["resid.0", "mlp.1"], expansion=2, k=4, cfg=TrainConfig(**CFG),
                          directory=directory, buffer_tokens=512, progress=False, **kw)


def test_trains_every_site_and_reuses_the_finished_run(llama, ids, tmp_path, monkeypatch):
    first = _run(llama, ids, tmp_path)
    assert set(first) == {"resid.0", "mlp.1"}
    assert first["mlp.1"].n_latents == 64 and first["mlp.1"].k == 4
    monkeypatch.setattr(P, "harvest", lambda *a, **k: pytest.fail("a finished run must not harvest again"))
    again = _run(llama, ids, tmp_path)
    for site in first:
        assert all(torch.equal(a, b) for a, b in zip(first[site].state_dict().values(), again[site].state_dict().values()))
    with pytest.raises(ValueError, match="other settings \\(differs in: dictionary\\)"):
        train_at_sites(llama, ids, ["resid.0", "mlp.1"], expansion=2, k=8, cfg=TrainConfig(**CFG),
                       directory=tmp_path, buffer_tokens=512, progress=False)


def test_interrupted_run_resumes_to_the_same_result(llama, ids, tmp_path, monkeypatch):
    reference = _run(llama, ids, tmp_path / "ref")
    real = P.harvest

    def dies_midway(*args, **kwargs):
        for i, rows in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt("killed")
            yield rows
    monkeypatch.setattr(P, "harvest", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        _run(llama, ids, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").exists()
    monkeypatch.setattr(P, "harvest", real)
    resumed = _run(llama, ids, tmp_path / "run")
    for site in reference:
        for a, b in zip(reference[site].state_dict().values(), resumed[site].state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6)


def test_too_few_tokens_is_refused(llama, ids):
    with pytest.raises(ValueError, match="usable tokens but total_tokens"):
        train_at_sites(llama, ids[:2], "resid.0", k=4, cfg=TrainConfig(**CFG), progress=False)


def test_run_key_has_the_resampling_fields_only_where_they_act(llama, ids):
    """Dead-latent resampling acts only on architectures with resample_dead (ReLU): TopK run keys
    (and so the dictionaries cached before the option existed) do not change."""
    sites = P.resolve_sites(llama, ["resid.0"])
    key = lambda arch: P.run_key(llama, ids, sites, arch, {}, TrainConfig(**CFG), 512, True)["train"]  # noqa: E731
    fields = {"resample_dead", "resample_every", "resample_until"}
    assert not fields & set(key("topk")) and fields <= set(key("relu"))
    assert set(key("topk")) == set(key("relu")) - fields
