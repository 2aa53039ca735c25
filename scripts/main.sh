#!/usr/bin/env bash
# The main job on the embedded default model and corpus (no downloads). Extra args go to the CLI.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
exec python -m circuits.main "$@"
