"""The kernel's part of a recovery: a signal sent to a process, to its death being seen.

    python benchmarks/death_floor.py          # SIGKILL and SIGSEGV, 15 each, fork

A process of the benchmark's own size (forked from it, as fastvec's workers are) sleeps;
the parent stamps the time, sends the signal, and waits on the process's sentinel (the
pipe end the child holds, closed by the kernel once it has torn the process down), the
event fastvec's watchdog waits on. No process-level runner can learn of a death sooner,
so this is the floor under every recovery time of survival.py's spare table: it is
measured in the same run and printed beside it.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import statistics
import time

SIGNALS = {"sigkill": signal.SIGKILL, "segfault": signal.SIGSEGV}
READY_S = 5.0  # bound on the child saying it sleeps
DEATH_S = 5.0  # bound on one death being seen


def _sleeper(conn) -> None:
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)  # die as a crashed worker would
    conn.send("ready")
    while True:
        time.sleep(1.0)


def once(sig: int, ctx) -> float | None:
    """Seconds from sending ``sig`` to the sentinel being readable; None when not seen
    within DEATH_S (the child is killed and reaped either way)."""
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_sleeper, args=(w,), daemon=True)
    p.start()
    w.close()
    try:
        if not r.poll(READY_S):
            return None
        r.recv()
        time.sleep(0.01)  # asleep in time.sleep, as an idle worker is in its wait
        t0 = time.monotonic()
        os.kill(p.pid, sig)
        seen, _, _ = select.select([p.sentinel], [], [], DEATH_S)
        return time.monotonic() - t0 if seen else None
    finally:
        r.close()
        if p.is_alive():
            p.kill()
        p.join(DEATH_S)


def measure(kind: str, repeats: int = 15, context: str = "fork") -> dict | None:
    """Median and p90 (ms) of ``repeats`` deaths by the signal of fault ``kind``."""
    ctx = multiprocessing.get_context(context)
    got = [t for t in (once(SIGNALS[kind], ctx) for _ in range(repeats)) if t is not None]
    if not got:
        return None
    got.sort()
    return {"median_ms": 1e3 * statistics.median(got),
            "p90_ms": 1e3 * got[min(len(got) - 1, int(0.9 * len(got)))], "n": len(got)}


if __name__ == "__main__":
    for k in SIGNALS:
        m = measure(k)
        print(f"{k}: " + ("not seen" if m is None else
                          f"{m['median_ms']:.2f} ms median, {m['p90_ms']:.2f} p90 (n={m['n']})"))
