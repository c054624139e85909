#!/usr/bin/env bash
# Set up and run the whole test suite: lint, then pytest (doctests included).
# Slow, exhaustive cases run too with `--run-slow` or ATTNKIT_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cli,test
PY=${PYTHON:-python3}
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
