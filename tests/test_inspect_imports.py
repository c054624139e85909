"""attnkit.inspect stands below attnkit.viz: importing it imports no viz module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_importing_inspect_does_not_import_viz():
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import sys, attnkit.inspect; "
            "print(attnkit.inspect.__file__); print(sorted(m for m in sys.modules if m.startswith('attnkit.viz')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    path, modules = out.stdout.splitlines()
    assert path.startswith(src) and modules == "[]"
