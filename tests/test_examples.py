"""Every example runs against the current library (small budgets), so examples never drift."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ARGS = {
    "harvest_activations.py": ["--tokens", "512", "--sites", "resid.2", "mlp_hidden.2", "--store", "{tmp}/store"],
    "train_dictionaries.py": ["--sites", "resid.2", "--tokens", "2048", "--eval-tokens", "256", "--k", "8", "--out", "{tmp}/run"],
    "patch_ioi_features.py": ["--site", "resid.2", "--n-prompts", "2", "--max-features", "4", "--sae-tokens", "2048", "--sae-dir", "{tmp}/sae"],
    "steer_generation.py": ["--site", "resid.2", "--new-tokens", "5", "--sae-tokens", "2048", "--sae-dir", "{tmp}/sae"],
    "erase_concept.py": ["--site", "resid.2", "--k", "2", "--n-prompts", "16", "--neutral-tokens", "64", "--sae-tokens", "2048", "--sae-dir", "{tmp}/sae"],
    "circuit_for_prompt.py": ["--sites", "resid.2", "resid.5", "--train-tokens", "4096", "--corpus-tokens", "2048", "--top-k", "4", "--out", "{tmp}/circuit"],
}


def test_every_example_has_smoke_arguments():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(ARGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARGS))
def test_example_runs(name, tmp_path):
    args = [a.format(tmp=tmp_path) for a in ARGS[name]]
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example printed nothing"
