#!/usr/bin/env bash
# The README's "What models attend to" figures and docs/inspect.md's worked examples:
#
#     bash benchmarks/inspect.sh        # about 3 minutes on 2 cores
#
# Writes benchmarks/results/{coreference,finetune_shift}.txt, benchmarks/results/induction.json
# and docs/img/induction.png; benchmarks/capture.py gives the capture memory table.
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p "$out" docs/img
python examples/coreference.py > "$out/coreference.txt"
python examples/finetune_shift.py > "$out/finetune_shift.txt"
python -m attnkit induction --plot docs/img/induction.png --json "$out/induction.json"
python benchmarks/capture.py
