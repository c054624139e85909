"""``attnkit bench --load N``: background loads that always end, and slowdowns beside idle figures."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

from attnkit import bench
from attnkit.bench.load import background_load


def _wait_dead(procs, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    return all(p.poll() is not None for p in procs)


def test_loads_run_inside_the_block_and_are_killed_after():
    with background_load(2, seconds=60, settle=0.5) as procs:
        assert len(procs) == 2
        assert all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)


def test_loads_are_killed_on_error_and_on_ctrl_c():
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc), background_load(1, seconds=60, settle=0.0) as procs:
            raise exc()
        assert procs[0].poll() is not None


def test_a_load_stops_at_its_own_deadline():
    with background_load(2, seconds=1.0, settle=0.0) as procs:
        assert _wait_dead(procs)


def test_bad_load_arguments_name_the_argument():
    with pytest.raises(ValueError, match="seconds"), background_load(1, seconds=0):
        pass
    with pytest.raises(ValueError, match="load"):
        bench.run(["causal"], [64], load=-1)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_run_with_load_times_a_second_pass_while_the_load_burns_cpu(monkeypatch):
    """The loaded figures come from a pass timed inside the load's block, while the load really ran: its
    process used at least a tenth of a core over the block (a spin loop asks for a whole one; on a busy
    2-core machine it still gets a third or more, and a missing load gets nothing)."""
    import attnkit.bench.runner as runner

    blocks = []

    @contextlib.contextmanager
    def watched(n, seconds):
        with background_load(n, seconds) as procs:
            start, cpu = time.monotonic(), sum(_cpu_seconds(p.pid) for p in procs)
            yield procs
            blocks.append((n, time.monotonic() - start, sum(_cpu_seconds(p.pid) for p in procs) - cpu))

    monkeypatch.setattr(runner, "background_load", watched)
    result = bench.run(["causal"], [1024], backends=["tiled"], peers=["sdpa"], repeats=5, memory=False, load=1)
    ok = [r for r in result.rows if r.status == "ok"]
    assert {r.impl for r in ok} == {"attnkit:tiled", "sdpa"}
    (n, wall, cpu), = blocks
    assert n == 1 and cpu >= 0.1 * wall, f"the load used {cpu:.2f} CPU-seconds in {wall:.2f} s"
    for r in ok:
        assert r.loaded_ms is not None and r.loaded_ms != r.ms and r.slowdown == pytest.approx(r.loaded_ms / r.ms)
    assert "slowdown" in bench.markdown(result)
