"""Timing and memory helpers shared by the benchmark scripts (each script prints one JSON object)."""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of ``repeats`` calls in seconds (other processes may share the CPU)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(fn: Callable[[], object], device: torch.device, repeats: int) -> dict:
    """Warm up once, then time ``repeats`` calls; peak GPU memory on CUDA, peak process RSS on CPU.

    Returns:
        ``time_s`` (fastest), ``time_s_mean`` and ``peak_gpu_mib`` or ``peak_rss_mib`` / ``peak_rss_growth_mib``.
    """
    fn()  # warm-up (allocator, kernels, codebook initialisation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = peak_rss_mib()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out = {"time_s": min(times), "time_s_mean": sum(times) / len(times)}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_rss_mib"] = peak_rss_mib()
        out["peak_rss_growth_mib"] = peak_rss_mib() - rss0
    return out


def environment(device: torch.device) -> dict:
    """Date, device, threads and commit, to stamp every benchmark record."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": name,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit}
