#!/usr/bin/env bash
# Set up and run the whole test suite: lint, then pytest (doctests included).
# Slow, exhaustive cases run too with `--run-slow` or ATTNKIT_SLOW=1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cli,test
# The browser tests drive Debian's chromium with Playwright (installed by the test extra;
# Playwright's own browser download cannot work offline, so it is never used).
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
fi
PY=${PYTHON:-python3}
"$PY" -m ruff check .
exec "$PY" -m pytest "$@"
