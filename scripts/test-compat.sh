#!/usr/bin/env bash
# The compatibility tier: the transformers integration, capture, generation and seq2seq tests against the
# OLDEST transformers that attnkit declares (pyproject.toml's hf extra), in a virtual environment of its own
# (./.venv-compat, made on first use). The default tier (scripts/test.sh) tests the newest that pip resolves.
# torch: the same local build as the default tier (see setup.sh); no older CPU wheel installs here, so torch's
# declared floor is not tested (README, "Tested with"). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
floor=$(grep -o '"transformers>=[0-9.]*"' pyproject.toml | head -1 | tr -d '"' | cut -d= -f2)
[ -n "$floor" ] || { echo "test-compat: no transformers>= floor found in pyproject.toml" >&2; exit 2; }
VENV=${ATTNKIT_COMPAT_VENV:-.venv-compat}
if [ ! -x "$VENV/bin/python" ]; then
  echo "test-compat: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
PYTHON="$VENV/bin/python" bash scripts/setup.sh hf,serve,test "transformers==$floor"
"$VENV/bin/python" scripts/versions.py
WORKERS=${ATTNKIT_TEST_WORKERS:-$("$VENV/bin/python" -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')}
exec "$VENV/bin/python" -m pytest -n "$WORKERS" --dist worksteal -p no:cacheprovider \
  tests/test_integrations.py tests/test_capture.py tests/test_generation_capture.py tests/test_seq2seq.py \
  tests/test_explain_seq2seq.py tests/test_attnkit_seq2seq.py tests/test_serve_seq2seq.py tests/test_roles_cross.py \
  "$@"
