"""Sizes as people read them: one formatter for every message, table and repr (``static/units.js`` is its twin
for the pages, and a browser test holds the two to the same strings)."""

from __future__ import annotations


def size(n: float) -> str:
    """Bytes in binary units, to three significant digits (no trailing zeros): ``'512 B'``, ``'27.3 KiB'``,
    ``'118 MiB'``, ``'1.25 GiB'``, ``'2.5 MiB'``.

    >>> [size(n) for n in (512, 1023, 1024, 27_955, 327_680, 123_456_789, 1_342_177_280, 2.5 * 2**20, 2**20 - 100)]
    ['512 B', '1023 B', '1 KiB', '27.3 KiB', '320 KiB', '118 MiB', '1.25 GiB', '2.5 MiB', '1 MiB']
    """
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    u = 0
    while abs(n) >= 1023.5 and u < len(units) - 1:  # 1023.5 KiB would round to "1024 KiB": "1 MiB"
        n /= 1024
        u += 1
    if u == 0:
        return f"{n:.0f} B"
    digits = 0 if abs(n) >= 100 else 1 if abs(n) >= 10 else 2
    text = f"{n:.{digits}f}"
    return (text.rstrip("0").rstrip(".") if digits else text) + f" {units[u]}"
