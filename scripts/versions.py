"""Print what a test run runs against: Python, the CPU, and the resolved versions of attnkit's dependencies."""

from __future__ import annotations

import platform
from importlib import metadata


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    names = ["torch", "numpy", "safetensors", "transformers", "tokenizers", "starlette", "uvicorn", "playwright"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    print(f"versions: Python {platform.python_version()}, {_cpu()}; " + ", ".join(found), flush=True)


if __name__ == "__main__":
    main()
