"""The machine a benchmark ran on, and how busy other processes kept it meanwhile."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import psutil

from blas_threads import thread_settings
from checkout import REPO_ROOT, git_commit, import_fastvec


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict:
    fastvec = import_fastvec()
    facts = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": cpu_count(),
        "cpu_count_os": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
        "fastvec": getattr(fastvec, "__version__", "?"),
        # the checkout fastvec was imported from (None when installed from a wheel), and
        # the one the benchmark scripts came from: they need not be the same
        "fastvec_commit": git_commit(Path(fastvec.__file__).resolve().parent),
        "benchmarks_commit": git_commit(REPO_ROOT),
        "start_method": multiprocessing.get_start_method(),
        "thread_env": thread_settings(),
        "loadavg_at_start": list(os.getloadavg()),
    }
    try:
        import posix_ipc

        facts["posix_ipc"] = posix_ipc.VERSION
    except ImportError:
        pass
    return facts


class CpuMeter:
    """How much of the machine's CPU other processes used between two readings.

    Busy time of the whole machine (psutil) minus the CPU time of this process and its
    reaped children (``os.times``), as a share of cores x wall time. Read it when no child
    is alive (between cells: every contender is closed and joined by then).
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        total = sum(getattr(t, f) for f in ("user", "nice", "system", "idle", "iowait",
                                              "irq", "softirq", "steal") if hasattr(t, f))
        busy = total - t.idle - getattr(t, "iowait", 0.0)
        own = os.times()
        return time.monotonic(), busy, own.user + own.system + own.children_user + \
            own.children_system

    def foreign_share(self, restart: bool = True) -> float:
        now = self._read()
        wall = max(now[0] - self.start[0], 1e-9)
        share = max(0.0, (now[1] - self.start[1]) - (now[2] - self.start[2])) / (
            wall * (os.cpu_count() or 1))
        if restart:
            self.start = now
        return share


def busy_warning(f: dict) -> str | None:
    """A warning when the machine was not idle: other processes skew every number."""
    load = f.get("loadavg_at_start", [0.0])[0]
    foreign = f.get("foreign_cpu_share")
    if foreign is not None and (foreign > 0.05 or f.get("foreign_cpu_share_max", 0) > 0.1):
        return (f"WARNING: other processes used {100 * foreign:.0f}% of the machine's CPU during "
                f"this run (max {100 * f.get('foreign_cpu_share_max', foreign):.0f}% in one "
                "cell, marked *): they compete for the cores and skew the numbers")
    if foreign is None and load > 0.5 * f["cores"]:
        return (f"WARNING: load average {load:.2f} on {f['cores']} cores when the run started: "
                "other processes compete for the cores; the numbers are skewed")
    return None


def facts_line(f: dict) -> str:
    return (f"{f['date']}  {f['cores']} cores ({f['cpu_model']}), {f['memory_gib']} GiB, "
            f"Python {f['python']}, numpy {f['numpy']}, gymnasium {f['gymnasium']}, "
            f"fastvec {f['fastvec']}, start method {f['start_method']}, "
            f"OPENBLAS_NUM_THREADS={f['thread_env']['OPENBLAS_NUM_THREADS']}")
