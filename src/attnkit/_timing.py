"""The one timing helper: median wall time of repeated calls, after warm-up."""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], repeats: int = 5,
                               warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so that drifts in machine
    load fall on all of them alike. Each round starts one function later, so that the
    after-effects of a heavy call (freeing gigabytes, a cold cache) do not always fall on
    the same neighbour. ``clock`` reads the time in seconds (a fake one in tests)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        shift = round_ % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB. Unlike getrusage's ru_maxrss,
    it is not inherited from the parent across fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError("VmHWM not found in /proc/self/status")


def _resettable_peak() -> bool:
    """Whether this process can reset its peak resident set (Linux >= 4.0, clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _release_free_memory() -> None:
    """Make glibc give freed memory back to the system now (malloc_trim), and every freed
    block over 64 KiB from now on, so that the resident set follows live memory and a peak
    reading is not hidden by reused, already-resident heap. Process-wide; only benchmark
    processes call it."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)


def peak_memory_mib(fn: Callable[[], object], device: torch.device | str = "cpu") -> float | None:
    """Peak memory growth while ``fn()`` runs, in MiB: CUDA's allocator peak on a GPU, the
    growth of the peak resident set (reset first) on Linux CPUs; None where neither exists.

    On CPU it counts everything ``fn`` allocates, temporaries and its output included,
    to within a few MiB of allocator noise.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base: float = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    if device.type != "cpu" or not _resettable_peak():
        return None
    _release_free_memory()
    with open("/proc/self/status") as f:
        base = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    _resettable_peak()
    fn()
    return max(0.0, peak_rss_mib() - base)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s, else ``platform.processor()``), e.g. ``AMD EPYC 7B13``.

    Where the name is generic (no model number, as some cloud machines report ``AMD EPYC``), the CPU family and
    model numbers follow it, ``AMD EPYC (family 26, model 2)``: two generations under one name differ by 2x in
    fp32 matmul rate and in whether they have bf16 units, so the tuning cache and the benchmark rows must tell
    them apart.
    """
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return cpu
    info = {key.strip(): value.strip() for key, value in info.items()}
    cpu = info.get("model name", cpu)
    if not any(ch.isdigit() for ch in cpu) and "cpu family" in info and "model" in info:
        cpu = f"{cpu} (family {info['cpu family']}, model {info['model']})"
    return cpu


def machine() -> str:
    """The CPU model, core count, torch version and thread count, for benchmark reports."""
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def matmul_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """This machine's rate on a 2048 x 2048 matmul in ``dtype`` (default fp32), in GFLOP/s: the yardstick for
    attention. In bfloat16 it shows whether the CPU has bf16 units (AMX, AVX512-BF16) or converts to fp32."""
    device = torch.device(device)
    a, b = (torch.randn(2048, 2048, device=device).to(dtype) for _ in range(2))

    def run() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return 2 * 2048**3 / median_seconds(run, 5) / 1e9
