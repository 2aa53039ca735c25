#!/usr/bin/env bash
# Build the peer virtual environments for benchmarks/train_bench.py and benchmarks/formats_parity.py,
# outside the repository (default ~/.cache/sae-circuits/bench/venvs; override with $BENCH_VENVS).
#
#   bash benchmarks/peers.sh            # all three peers
#   bash benchmarks/peers.sh saelens    # only some: saelens sparsify dl
#
# Every venv gets the CPU torch 2.13.0 FIRST, then the peer, so no peer can swap torch for a
# multi-GB CUDA build; each step is checked and the script fails loudly if torch changed.
# Our package goes into every venv with --no-deps (editable) plus its light runtime deps, so the
# benchmark workers and the format-parity check can import `sae` there.
#
#   saelens   pip install sae-lens              (a dry run first: must not touch torch)
#   sparsify  pip install eai-sparsify          (same)
#   dl        dictionary-learning==0.1.0 pins nnsight>=0.3,<0.4, whose torchvision requirement
#             would replace torch with a CUDA build. So: --no-deps for the
#             package itself and for nnsight==0.3.7 (the package's __init__ imports nnsight), their
#             runtime deps listed explicitly except torchvision, torch pinned by a constraint file.
set -euo pipefail

ROOT="${BENCH_VENVS:-$HOME/.cache/sae-circuits/bench/venvs}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"
# light runtime deps of our package for the workers (no nnsight/transformers needed there)
OURS_DEPS=(safetensors numpy scipy tqdm)
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(saelens sparsify dl)

mkdir -p "$ROOT"
PIN="$ROOT/torch_pin.txt"
echo "$TORCH" > "$PIN"

pip_in() {  # venv, pip args...: pip, minus the machine's noise about absent local index folders
    local v="$1"; shift
    "$v/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" >&2 || true; }
}

torch_version() { "$1/bin/python" -c 'import torch; print(torch.__version__)'; }

new_venv() {  # name -> path, with torch 2.13.0 (CPU) installed first
    local v="$ROOT/$1"
    if [ ! -x "$v/bin/python" ]; then
        "$PY" -m venv "$v"
        pip_in "$v" install -q --upgrade pip
    fi
    pip_in "$v" install -q "$TORCH"
    echo "[$1] torch $(torch_version "$v")" >&2
    echo "$v"
}

check_torch() {  # venv name: torch must still be 2.13.0
    local got
    got="$(torch_version "$1")"
    case "$got" in
        2.13.0*) ;;
        *) echo "ERROR: torch in $1 is $got, expected 2.13.0 (a peer replaced it)" >&2; exit 1 ;;
    esac
}

dry_run_keeps_torch() {  # venv, packages...: fail if pip would install or change torch
    local v="$1"; shift
    local plan
    plan="$("$v/bin/pip" install --dry-run "$@" 2>/dev/null)" || {
        echo "ERROR: pip cannot resolve $* in $v" >&2; exit 1; }
    if echo "$plan" | grep "^Would install" | grep -qE "(^| )torch-[0-9]"; then
        echo "ERROR: installing $* would change torch in $v:" >&2
        echo "$plan" | grep "^Would install" >&2
        exit 1
    fi
    echo "[dry run] $* keeps torch" >&2
}

install_ours() {
    pip_in "$1" install -q -c "$PIN" "${OURS_DEPS[@]}"
    pip_in "$1" install -q --no-deps -e "$REPO"
}

for peer in "${PEERS[@]}"; do
    case "$peer" in
        saelens)
            v="$(new_venv saelens)"
            dry_run_keeps_torch "$v" sae-lens
            pip_in "$v" install -q -c "$PIN" sae-lens
            install_ours "$v"
            check_torch "$v"
            HF_HUB_OFFLINE=1 "$v/bin/python" -c 'import sae_lens, sae; print("sae_lens", sae_lens.__version__)'
            ;;
        sparsify)
            v="$(new_venv sparsify)"
            dry_run_keeps_torch "$v" eai-sparsify
            pip_in "$v" install -q -c "$PIN" eai-sparsify
            install_ours "$v"
            check_torch "$v"
            HF_HUB_OFFLINE=1 "$v/bin/python" -c 'import importlib.metadata as m, sparsify, sae; print("sparsify", m.version("eai-sparsify"))'
            ;;
        dl)
            v="$(new_venv dl)"
            # the package and nnsight 0.3.7 (its pin nnsight>=0.3,<0.4) without their dependencies:
            # nnsight 0.3.7 requires torchvision, which would replace torch with a CUDA build
            pip_in "$v" install -q -c "$PIN" --no-deps dictionary-learning==0.1.0 nnsight==0.3.7
            # nnsight 0.3.7's requirements except torchvision, and what dictionary_learning's
            # trainers and dictionaries import (einops, tqdm); the rest of its list (umap, wandb,
            # plotly, circuitsvis, datasets ...) is only for its interp/evaluation/training modules
            pip_in "$v" install -q -c "$PIN" transformers protobuf "python-socketio[client]" \
                "tokenizers>=0.13.0" "pydantic>=2.9.0" sentencepiece accelerate diffusers einops tqdm pyyaml \
                wandb  # dictionary_learning.training (trainSAE, its save path) imports wandb
            install_ours "$v"
            check_torch "$v"
            HF_HUB_OFFLINE=1 "$v/bin/python" -c '
import importlib.metadata as m
from dictionary_learning.trainers.top_k import TopKTrainer, AutoEncoderTopK
from dictionary_learning.dictionary import AutoEncoder
import sae
print("dictionary_learning", m.version("dictionary-learning"))'
            ;;
        *) echo "unknown peer $peer (saelens, sparsify, dl)" >&2; exit 2 ;;
    esac
    echo "[$peer] ready: $ROOT/$peer/bin/python" >&2
done
