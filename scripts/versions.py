"""Print what a test run runs against: the machine (attnkit's own description of it) and the resolved versions of
attnkit's dependencies."""

from __future__ import annotations

import platform
from importlib import metadata

from attnkit._timing import machine


def main() -> None:
    names = ["torch", "numpy", "safetensors", "transformers", "tokenizers", "starlette", "uvicorn", "playwright"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    print(f"versions: Python {platform.python_version()}, {machine()}; " + ", ".join(found), flush=True)


if __name__ == "__main__":
    main()
