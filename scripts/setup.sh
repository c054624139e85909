#!/usr/bin/env bash
# Install attnkit (editable) with the given extras, default cli,hf,plot,serve (what `attnkit explain`
# and `attnkit serve` need), e.g. `bash scripts/setup.sh cli,test`. Further arguments are requirements
# resolved together with it, e.g. `bash scripts/setup.sh hf,test "transformers==4.57.1"` (the compat tier).
#
# Where it installs: the active virtual environment. Outside one, it creates (or reuses) ./.venv
# and installs there, since stock Debian/Ubuntu Pythons refuse system-wide pip installs
# (externally-managed-environment) and pyenv's would change the global interpreter. Activate
# it with `. .venv/bin/activate` to use `attnkit` afterwards.
#
# torch: an installed torch is kept, whatever its build (a GPU user installs theirs first).
# Otherwise ATTNKIT_TORCH picks the build:
#   cpu (default)  torch==2.13.0, CPU build: a local wheel where pip's configuration finds one,
#                  else PyTorch's CPU wheel index (https://download.pytorch.org/whl/cpu);
#   pypi           PyPI's default torch build (on Linux x86_64 that is the CUDA build, several GB);
#   a URL          that wheel index, e.g. https://download.pytorch.org/whl/cu126.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-cli,hf,plot,serve}
shift $(( $# > 0 ? 1 : 0 ))
PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  if [ ! -x .venv/bin/python ]; then
    echo "setup: no virtual environment is active; creating ./.venv" >&2
    "$PY" -m venv .venv || { echo "setup: '$PY -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 1; }
  fi
  PY=.venv/bin/python
  echo "setup: installing into ./.venv (activate it with: . .venv/bin/activate)" >&2
fi
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  choice=${ATTNKIT_TORCH:-cpu}
  case "$choice" in
    cpu)
      wheels=$(mktemp -d)
      # --no-index keeps pip to local wheel folders (find-links); nothing is downloaded.
      if "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-index \
           --only-binary=:all: -d "$wheels" "torch==2.13.0" >/dev/null 2>&1; then
        echo "setup: torch 2.13.0 from the local wheel" >&2
        pip_install "torch==2.13.0"
      else
        echo "setup: torch 2.13.0, CPU build, from PyTorch's CPU wheel index" >&2
        pip_install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
      fi
      rm -rf "$wheels" ;;
    pypi) echo "setup: torch from PyPI (its default build)" >&2; pip_install "torch>=2.4" ;;
    http://*|https://*|file://*) echo "setup: torch from $choice" >&2; pip_install torch --index-url "$choice" ;;
    *) echo "setup: ATTNKIT_TORCH must be cpu, pypi or a wheel-index URL; got '$choice'" >&2; exit 2 ;;
  esac
fi
pip_install -e ".[${extras}]" "$@"
# pyenv puts console scripts behind shims that exist only after a rehash.
if [ "$PY" = "${PYTHON:-python3}" ] && command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
