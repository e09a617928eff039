#!/usr/bin/env bash
# Sets up an environment (unless MEGALONG_PYTHON names one) and runs the whole test suite,
# slow tests included. Extra arguments go to pytest, e.g. `bash tests/run.sh -m "not slow"`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source "$root/examples/_env.sh"
megalong_env test
exec "$PY" -m pytest -q tests "$@"
