#!/usr/bin/env bash
# Set up and run the whole test suite: lint (ruff), type-check (mypy), then pytest (doctests included), one worker
# process per core (pytest-xdist, work stealing; ATTNKIT_TEST_WORKERS=N to change, 0 for one process; extra
# arguments go to pytest and may override it). The default tier takes a few minutes on 2 cores; slow, exhaustive cases (fuzzing at scale,
# long sequences, benchmark smoke runs, multi-process runs) run too with `--run-slow` or
# ATTNKIT_SLOW=1. Installs into the active virtual environment, else ./.venv (see setup.sh).
#
# `scripts/test.sh --compat [pytest args]` runs the compatibility tier instead: the transformers-facing tests
# against the oldest declared transformers, in ./.venv-compat (scripts/test-compat.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--compat" ]; then shift; exec bash scripts/test-compat.sh "$@"; fi
bash scripts/setup.sh cli,hf,plot,serve,test
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then PY=.venv/bin/python; fi
# The browser tests drive Debian's chromium with Playwright (the test extra installs Playwright;
# its own browser download cannot work offline, so it is never used).
if [ ! -x "${ATTNKIT_CHROMIUM:-/usr/bin/chromium}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "test: installing Debian's chromium for the browser tests: ${SUDO:+sudo }apt-get install chromium" >&2
    $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
  else
    echo "test: no chromium and no apt-get: the browser tests will be skipped (under CI=true they fail)" >&2
  fi
fi
"$PY" scripts/versions.py  # so that a failing log says what it ran against
"$PY" -m ruff check .
"$PY" -m mypy  # settings and the files it checks: [tool.mypy] in pyproject.toml
WORKERS=${ATTNKIT_TEST_WORKERS:-$("$PY" -c 'import os; print(min(len(os.sched_getaffinity(0)), 4))')}
exec "$PY" -m pytest -n "$WORKERS" --dist worksteal --durations=15 "$@"
