"""Shared fixtures: every test must leave /dev/shm, processes and fds as it found them."""

from __future__ import annotations

import gc
import os
import time

import numpy as np
import psutil
import pytest

from fastvec.shm import leftovers

MY_PREFIXES = (f"fv{os.getpid()}_", f"sem.fv{os.getpid()}_")


def my_leftovers() -> list[str]:
    return [n for n in leftovers() if n.startswith(MY_PREFIXES)]


def worker_children() -> list[psutil.Process]:
    """Live children of this process, minus multiprocessing's own helpers."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if "resource_tracker" in cmd or "forkserver" in cmd:
            continue
        out.append(child)
    return out


def process_gone(pid: int) -> bool:
    """Whether no thread of ``pid`` runs any more. A zombie *leader* is not enough: after
    SIGKILL the leader can show as a zombie while a sibling thread (a worker's heartbeat)
    is still exiting and still holds the process's fds, flock included."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return False
    return True


def replaced(info: dict, n: int) -> list[bool]:
    """Per env, whether its worker was replaced in this step: its episode was resumed
    (``worker_resumed``) or ended truncated (``worker_restarted``)."""
    none = np.zeros(n, bool)
    return (info.get("_worker_resumed", none) | info.get("_worker_restarted", none)).tolist()


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


@pytest.fixture(autouse=True)
def _needs_pyretechnics(request):
    """Tests marked ``fire`` skip when pyretechnics is not installed, and only then."""
    if request.node.get_closest_marker("fire"):
        try:
            import pyretechnics  # noqa: F401
        except ModuleNotFoundError as exc:
            if exc.name != "pyretechnics":
                raise  # installed, but broken: that is a failure, not a missing extra
            pytest.skip('pyretechnics is not installed: pip install "fastvec[fire]"')


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves fastvec segments, semaphores or worker processes behind."""
    yield
    gc.collect()
    assert wait_until(lambda: not my_leftovers(), 5.0), f"leaked in /dev/shm: {my_leftovers()}"
    assert wait_until(lambda: not worker_children(), 5.0), \
        f"leaked processes: {[p.pid for p in worker_children()]}"


def pytest_sessionfinish(session, exitstatus):
    gc.collect()
    left = my_leftovers()
    if left:
        print(f"\nfastvec leftovers in /dev/shm at the end of the session: {left}")
        session.exitstatus = 1
