"""``attnkit bench``: attnkit's backends against PyTorch SDPA, FlexAttention and eager
attention, on the same inputs in one process, checked before they are timed.

>>> from attnkit import bench
>>> result = bench.run(["causal"], [64, 128], peers=["sdpa", "naive"], repeats=1, memory=False)
>>> sorted({row.impl for row in result.rows})
['attnkit:auto', 'attnkit:reference', 'attnkit:tiled', 'naive', 'sdpa']
>>> all(row.status == "ok" for row in result.rows)
True
"""

from attnkit.bench.cases import CASES, DEFAULT_CASES, Problem, make_problem
from attnkit.bench.report import markdown, plot
from attnkit.bench.runner import BACKENDS, PEERS, BenchResult, Row, run

__all__ = ["BACKENDS", "CASES", "DEFAULT_CASES", "PEERS", "BenchResult", "Problem", "Row", "make_problem", "markdown",
           "plot", "run"]
