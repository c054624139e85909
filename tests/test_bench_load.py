"""``attnkit bench --load N``: background loads that always end, and slowdowns beside idle figures."""

from __future__ import annotations

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


def test_run_with_load_reports_slowdowns():
    result = bench.run(["causal"], [128], backends=["tiled"], peers=["sdpa"], repeats=1, memory=False, load=1)
    ok = [r for r in result.rows if r.status == "ok"]
    assert {r.impl for r in ok} == {"attnkit:tiled", "sdpa"}
    for r in ok:
        assert r.loaded_ms is not None and r.slowdown == pytest.approx(r.loaded_ms / r.ms)
    assert "slowdown" in bench.markdown(result)
