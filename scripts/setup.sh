#!/usr/bin/env bash
# Install attnkit (editable) with the given extras (default cli,hf,plot,serve: what `attnkit explain` and `attnkit serve` need),
# e.g. `bash scripts/setup.sh cli,test`.
# torch==2.13.0 (CPU build) is installed first when torch is missing, so that pip never
# resolves `torch>=2.4` to a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[${1:-cli,hf,plot,serve}]"
# pyenv puts console scripts behind shims that exist only after a rehash.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
