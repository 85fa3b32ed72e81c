"""The processes and /dev/shm names a benchmark leaves behind, and closing without hanging.

Nothing a benchmark starts may outlive it: a contender whose ``close()`` wedges has its
workers killed (:func:`safe_close`), and the end of a run reports (and kills) stray child
processes and this process's fastvec names left in /dev/shm (:func:`leftover_report`).
"""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil

from checkout import import_fastvec
from report import exc_text

fastvec_leftovers = import_fastvec().shm.leftovers


def children() -> list[psutil.Process]:
    """Live child processes of this one, recursively, minus multiprocessing's helpers."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "resource_tracker" in cmd or "forkserver" in cmd:
            continue
        out.append(child)
    return out


def kill_processes(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5)


def worker_pids(env) -> set[int]:
    """Pids of the worker processes of a vector env.

    A wrapper that knows its processes says so with a ``worker_pids()`` method; otherwise
    gymnasium's AsyncVectorEnv (``processes``) and FastVectorEnv (its supervisor's slots)
    are read.
    """
    own = getattr(env, "worker_pids", None)
    if callable(own):
        return set(own())
    procs = list(getattr(env, "processes", None) or [])  # AsyncVectorEnv
    sup = getattr(env, "_sup", None)  # FastVectorEnv keeps its processes in its supervisor
    if sup is not None:
        procs += [s.process for s in getattr(sup, "slots", []) if s.process is not None]
    pids = set()
    for p in procs:
        try:
            if p.pid:
                pids.add(p.pid)
        except ValueError:  # a closed multiprocessing.Process
            pass
    return pids


def safe_close(env, terminate: bool = False, timeout: float = 10.0) -> str | None:
    """Close ``env`` without letting a wedged close() hang the benchmark.

    gymnasium's AsyncVectorEnv can block forever in close() after a worker died; the close
    runs in a daemon thread, and the env's worker processes are killed if it does not return.
    Returns None, or a description of what went wrong.
    """
    pids = worker_pids(env)
    err: list = []

    def run():
        try:
            if terminate:
                env.close(terminate=True)
            else:
                env.close()
        except BaseException as exc:  # noqa: BLE001 - reported, cleanup continues
            err.append(exc_text(exc))

    t = threading.Thread(target=run, daemon=True, name="bench-close")
    t.start()
    t.join(timeout)
    if t.is_alive():
        err.append(f"close() did not return within {timeout:.0f} s; killed its workers")
        kill_processes([p for p in children() if p.pid in pids])
    return "; ".join(err) or None


def leftover_report(grace: float = 5.0) -> dict:
    """Stray child processes and this process's fastvec names in /dev/shm.

    Children that are still there after ``grace`` seconds are killed (and reported).
    """
    gc.collect()
    deadline = time.monotonic() + grace
    mine = (f"fv{os.getpid()}_", f"sem.fv{os.getpid()}_")
    while True:
        procs = children()
        shm = [n for n in fastvec_leftovers() if n.startswith(mine)]
        if (not procs and not shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if procs:
        kill_processes(procs)
    return {"stray_processes": [p.pid for p in procs], "shm_leftovers": shm}
