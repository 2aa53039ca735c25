#!/usr/bin/env bash
# The test suite (CPU, no downloads). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$root"
exec python -m pytest -q "$@"
