"""Survival under injected faults: gymnasium AsyncVectorEnv vs FastVectorEnv.

    python benchmarks/survival.py             # every fault kind, 5 s each
    python benchmarks/survival.py --quick     # segfault and SIGKILL, 1.5 s each

One env of ``num_envs`` no-op envs (env 0) faults for real every ``period`` of its own steps
(workloads.FaultyEnv: segfault, SIGKILL, os._exit(1), an exception, or a hang); every other
env is healthy. Each (fault, contender) attempt steps for ``budget`` seconds or until the
vector env raises, and reports the steps it completed, the restarts and the error it saw.

Nothing here can hang the benchmark: each attempt runs in its own process, every wait has
a deadline (``step_wait(timeout=...)``, ``close(terminate=True)`` in a thread with a
timeout), and the parent kills the attempt's whole process tree if it does not report in
time, then removes the fastvec names it left in /dev/shm.

FastVectorEnv runs with ``max_restarts`` lifted (the faults are deliberate and periodic;
the default budget of 5 restarts a minute exists to stop a deterministic crash loop) and
``step_timeout=1.0`` so that a hang is detected (a no-op step never comes close).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

from blas_threads import pin_blas_threads

if __name__ == "__main__":
    # As a script: before numpy loads, so this process and every worker it starts run one
    # BLAS thread each (see blas_threads.py). Imported (by compare.py), it leaves the
    # environment to the importing script.
    pin_blas_threads()

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

import workloads  # noqa: E402
from checkout import BENCH_DIR, import_fastvec  # noqa: E402
from machine import machine_facts  # noqa: E402
from measure import Progress  # noqa: E402
from processes import children, kill_processes, leftover_report, safe_close  # noqa: E402
from report import exc_text, fmt_rate, table, write_json  # noqa: E402

fastvec = import_fastvec()
FastVectorEnv = fastvec.FastVectorEnv
leftovers, unlink_segment, unlink_semaphore = (
    fastvec.shm.leftovers, fastvec.shm.unlink_segment, fastvec.shm.unlink_semaphore)

CONTENDERS = {
    "async_shm": "gym Async shm",
    "fast_k1": "fastvec k=1",
}
QUICK_KINDS = ("segfault", "sigkill")
STEP_WAIT_S = 2.0  # our deadline on one step_wait(); a no-op step takes microseconds
FAST_STEP_TIMEOUT_S = 1.0


def _build(key: str, env_fns: list):
    if key == "async_shm":
        return gym.vector.AsyncVectorEnv(env_fns, shared_memory=True)
    if key == "fast_k1":
        return FastVectorEnv(env_fns, envs_per_worker=1, max_restarts=1_000_000,
                             step_timeout=FAST_STEP_TIMEOUT_S)
    raise ValueError(key)


def _attempt(key: str, kind: str, period: int, num_envs: int, budget_s: float) -> dict:
    """One attempt, in the process that calls it (a fresh child of the benchmark)."""
    base = workloads.noop((4,), "float32")
    bad = workloads.faulty(base, kind, period)  # safe_pid: this process never faults
    env_fns = [bad.env_fn()] + base.env_fns(num_envs - 1)
    res = {"contender": key, "fault": kind, "period": period, "num_envs": num_envs,
           "budget_s": budget_s, "workload": bad.describe(), "steps": 0, "restarts": 0,
           "restart_infos": 0, "error": None, "survived": False}
    try:
        env = _build(key, env_fns)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"build: {exc_text(exc)}"
        return res
    actions = np.zeros(num_envs, np.int64)
    t0 = time.perf_counter()
    try:
        env.reset(seed=0)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < budget_s:
            env.step_async(actions)
            _, _, _, _, infos = env.step_wait(timeout=STEP_WAIT_S)
            res["steps"] += 1
            if "worker_restarted" in infos:
                res["restart_infos"] += int(np.sum(infos["_worker_restarted"]))
        res["survived"] = True
    except BaseException as exc:  # noqa: BLE001 - what the vectorizer raised is the result
        res["error"] = exc_text(exc).splitlines()[0][:300]
    res["elapsed_s"] = time.perf_counter() - t0
    if isinstance(env, FastVectorEnv):
        try:
            res["restarts"] = sum(h["restarts"] for h in env.health())
            res["health_reasons"] = [h["reasons"] for h in env.health()]
        except Exception as exc:  # noqa: BLE001
            res["health_error"] = f"{type(exc).__name__}: {exc}"
    res["close_problem"] = safe_close(env, terminate=not res["survived"], timeout=10.0)
    return res


def _attempt_main(conn, log_path, *args) -> None:
    # The attempt's stderr (gymnasium's worker tracebacks, fastvec's restart warnings, also
    # those of the workers, which inherit it) goes to a log file, not the benchmark's console.
    if log_path:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        res = _attempt(*args)
    except BaseException:  # noqa: BLE001
        res = {"error": "benchmark bug: " + traceback.format_exc()[-500:], "survived": False}
    kill_processes(children())  # nothing of this attempt outlives it
    conn.send(res)
    conn.close()


def run_attempt(key: str, kind: str, period: int, num_envs: int, budget_s: float,
                log_dir: str | None = None, grace_s: float = 30.0) -> dict:
    """Run one attempt in a child process; kill its process tree if it does not report.

    The attempt's stderr goes to ``<log_dir>/<fault>-<contender>.log`` (or nowhere).
    """
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, f"{kind}-{key}.log")
    else:
        log_path = os.devnull
    proc = ctx.Process(target=_attempt_main, name=f"bench-survival-{key}-{kind}",
                       args=(send, log_path, key, kind, period, num_envs, budget_s), daemon=False)
    proc.start()
    send.close()
    res = None
    if recv.poll(budget_s + grace_s):
        try:
            res = recv.recv()
        except (EOFError, OSError):
            res = None
    recv.close()
    proc.join(10.0)
    if res is None or proc.exitcode is None:
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        kill_processes(tree)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5.0)
    if res is None:
        res = {"contender": key, "fault": kind, "period": period, "num_envs": num_envs,
               "budget_s": budget_s, "survived": False, "steps": None, "restarts": None,
               "error": f"benchmark watchdog: the attempt did not report within "
                        f"{budget_s + grace_s:.0f} s (exit code {proc.exitcode}); killed"}
    res["label"] = CONTENDERS[key]
    res["log"] = None if log_path == os.devnull else log_path
    res["leftover_shm"] = _remove_names_of(proc.pid)
    return res


def _remove_names_of(pid: int) -> list[str]:
    """fastvec names the attempt process (now dead) left in /dev/shm; removes them."""
    mine = [n for n in leftovers() if n.startswith((f"fv{pid}_", f"sem.fv{pid}_"))]
    for n in mine:
        if n.startswith("sem."):
            unlink_semaphore("/" + n[4:])
        else:
            unlink_segment("/" + n)
    return mine


def run(kinds, budget_s: float, period: int, num_envs: int,
        progress: Progress | None = None, log_dir: str | None = None) -> list[dict]:
    out = []
    for kind in kinds:
        for key in CONTENDERS:
            res = run_attempt(key, kind, period, num_envs, budget_s, log_dir)
            out.append(res)
            if progress is not None:
                progress.update(1, f"survival {kind}")
    return out


def unexpected(results: list[dict]) -> list[str]:
    """FastVectorEnv is expected to survive every fault; anything else is only reported."""
    errs = []
    for r in results:
        if r["contender"].startswith("fast") and not r["survived"]:
            errs.append(f"survival {r['fault']} {r['label']}: {r['error']}")
        elif r.get("error", "") and str(r["error"]).startswith(("benchmark", "build")):
            errs.append(f"survival {r['fault']} {r['label']}: {r['error']}")
        if r.get("leftover_shm"):
            errs.append(f"survival {r['fault']} {r['label']} left {r['leftover_shm']} in "
                        "/dev/shm (removed)")
    return errs


def report(results: list[dict]) -> str:
    if not results:
        return ""
    r0 = results[0]
    head = (f"survival: env 0 of {r0['num_envs']} no-op envs faults every {r0['period']} of "
            f"its steps; budget {r0['budget_s']:g} s per attempt")
    rows = []
    for r in results:
        steps = r.get("steps")
        el = r.get("elapsed_s")
        rate = (steps * r["num_envs"] / el) if steps and el else None
        rows.append([
            r["fault"], r["label"],
            "survived" if r["survived"] else "DIED",
            "-" if steps is None else str(steps),
            "-" if el is None else f"{el:.2f}",
            fmt_rate(rate),
            "-" if r.get("restarts") is None else str(r["restarts"]),
            r.get("error") or "",
        ])
    return head + "\n" + table(["fault", "contender", "outcome", "steps", "s",
                                "env-steps/s", "restarts", "error seen"], rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="segfault and SIGKILL, 1.5 s each")
    p.add_argument("--faults", help=f"comma-separated subset of {','.join(workloads.FAULT_KINDS)}")
    p.add_argument("--budget-s", type=float, help="seconds per attempt (default 5, quick 1.5)")
    p.add_argument("--period", type=int, default=500, help="steps of env 0 between faults")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--out", default=str(BENCH_DIR / "results"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    kinds = (args.faults.split(",") if args.faults else
             QUICK_KINDS if args.quick else workloads.FAULT_KINDS)
    bad = set(kinds) - set(workloads.FAULT_KINDS)
    if bad:
        p.error(f"unknown fault kinds {sorted(bad)}")
    budget = args.budget_s or (1.5 if args.quick else 5.0)

    t0 = time.monotonic()
    progress = Progress(len(kinds) * len(CONTENDERS), not args.no_progress, "survival")
    try:
        results = run(kinds, budget, args.period, args.num_envs, progress,
                      os.path.join(args.out, "survival-logs"))
    finally:
        progress.close()
    data = {"machine": machine_facts(), "survival": results,
            "leftovers": leftover_report(), "runtime_s": time.monotonic() - t0}
    out = os.path.join(args.out, "survival.json")
    write_json(Path(out), data)
    print(report(results))
    errs = unexpected(results)
    left = data["leftovers"]
    if left["stray_processes"] or left["shm_leftovers"]:
        errs.append(f"leftovers: {left}")
    for e in errs:
        print(f"ERROR: {e}", file=sys.stderr)
    print(f"\nwrote {out}; {data['runtime_s']:.0f} s")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
