"""Survival under injected faults: gymnasium AsyncVectorEnv vs FastVectorEnv, resume off and on.

    python benchmarks/survival.py             # every workload and fault kind (~6 min)
    python benchmarks/survival.py --quick     # segfault and SIGKILL, short budgets (~1.5 min)
    python benchmarks/survival.py --workloads noop,slow_build --faults sigkill

One env of ``num_envs`` (env 0) faults for real every ``period`` of its own steps
(workloads.FaultyEnv: segfault, SIGKILL, os._exit(1), an exception, or a hang); every other
env is healthy. Steps a resumed worker replays count among env 0's own steps. Workloads
(``CASES``): a no-op env, CartPole-v1, a no-op env whose construction takes 1.5 s (a
replacement pays a process start and that build; a resume adds its replay), and the
wildfire env when pyretechnics imports here (skipped with the reason otherwise).

Each (workload, fault, contender) attempt steps for ``budget`` seconds or until the vector
env raises, and reports the steps it completed, the faults it met, the restarts, and what
became of the episodes the faults hit:

* lost: the episode ended truncated by the failure (``infos["worker_restarted"]`` with
  truncated). AsyncVectorEnv dies at its first fault: every episode in flight is lost and
  the run ends. FastVectorEnv ``resume="off"`` truncates the episode of every env of the
  lost worker (one per fault here: one env per worker);
* resumed: ``infos["worker_resumed"]``, the replacement replayed the episode and the step
  returned its real result (``resume="auto"``, the default: the episode log is kept);
  not lost.

For every fault FastVectorEnv survived it records the episode length at the fault (the
steps a resume replays) and the recovery time: from the fault (env 0 appends
``time.monotonic()`` to a stamp file just before it faults) to the return of the step
that reports it; medians and p90 over the faults, resume off next to resume on ("auto").

Hot spares (``spares=1``) build their envs ahead only when every env comes from one
function, which env 0's faulting wrapper breaks; so the spare pair runs apart: every env
is the plain workload, and the benchmark sends env 0's worker the fault from outside
(SIGKILL, or SIGSEGV for a segfault) every ``Case.outside_every_s`` seconds, longer than
a spare's build, stamping the time first. Resume on without a spare next to resume on
with one, same schedule; the table adds the median step without a fault, the target
of a spare: (2 + steps replayed) x that step, and the kernel's part, measured in the same
run (benchmarks/death_floor.py): the same signal to a sleeping process of this size, to
its death seen, below which no recovery of a process can go.

Nothing here can hang the benchmark: each attempt runs in its own process, every wait has
a deadline (``step_wait(timeout=...)``, ``close(terminate=True)`` in a thread with a
timeout), and the parent kills the attempt's whole process tree if it does not report in
time, then removes the fastvec names it left in /dev/shm.

FastVectorEnv runs with ``max_restarts`` lifted (the faults are deliberate and periodic;
the default budget of 5 restarts a minute exists to stop a deterministic crash loop) and
``step_timeout=1.0`` so that a hang is detected (no step here comes close). That timeout
is also a replay's time budget (fastvec/replay.py).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
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

import death_floor  # noqa: E402
import workloads  # noqa: E402
from checkout import BENCH_DIR, import_fastvec  # noqa: E402
from contenders import RESUME_ON  # noqa: E402
from machine import machine_facts  # noqa: E402
from measure import Progress, action_batches  # noqa: E402
from processes import children, kill_processes, leftover_report, safe_close  # noqa: E402
from report import exc_text, fmt_rate, table, write_json  # noqa: E402

fastvec = import_fastvec()
FastVectorEnv = fastvec.FastVectorEnv
leftovers, unlink_segment, unlink_semaphore = (
    fastvec.shm.leftovers, fastvec.shm.unlink_segment, fastvec.shm.unlink_semaphore)

CONTENDERS = {
    "async_shm": "gym Async shm",
    "fast_off": "fastvec k=1 resume=off",
    "fast_on": f"fastvec k=1 resume={RESUME_ON}",
    # hot spares: faults from outside (every env from one function, so spares build ahead)
    "out_on": f"fastvec k=1 resume={RESUME_ON}, fault from outside",
    "out_spare": f"fastvec k=1 resume={RESUME_ON} spares=1, fault from outside",
}
RESUME = {"fast_off": "off", "fast_on": RESUME_ON, "out_on": RESUME_ON,
          "out_spare": RESUME_ON}
SPARES = {"out_spare": 1}
# Faults a test can send a worker from outside (a signal to its pid): the spare pair runs
# these only. A segfault from outside is SIGSEGV, as the kernel sends it.
OUTSIDE = {"sigkill": signal.SIGKILL, "segfault": signal.SIGSEGV}
QUICK_KINDS = ("segfault", "sigkill")
ASYNC_STEP_WAIT_S = 2.0  # our deadline on one AsyncVectorEnv step: past it, it hangs
FAST_STEP_WAIT_S = 20.0  # FastVectorEnv's own bounds end every step well before this
FAST_STEP_TIMEOUT_S = 1.0
BUILD_S = 1.5  # construction time of the slow-build workload


@dataclass(frozen=True)
class Case:
    """A survival workload: what env 0 and the others run, and its default budgets."""

    key: str
    period: int  # env 0's steps between faults
    budget_s: float
    quick_budget_s: float
    # the spare pair: seconds between faults sent from outside, more than a spare's build
    # (else the comparison would be of a spare still building)
    outside_every_s: float = 0.5

    def workload(self) -> workloads.Workload:
        if self.key == "noop":
            return workloads.noop((4,), "float32")
        if self.key == "cartpole":
            return workloads.cartpole()
        if self.key == "slow_build":
            return workloads.slow_build(workloads.noop((4,), "float32"), BUILD_S)
        if self.key == "wildfire":
            return workloads.wildfire(64)
        raise ValueError(self.key)

    def available(self) -> tuple[bool, str]:
        return workloads.wildfire_available() if self.key == "wildfire" else (True, "")


# The no-op episode is 200 steps, CartPole's ~20 with random actions, the wildfire's at
# most 100 (about 4 ms a step at 64x64). A replacement counts from 0 and a resume replays
# at most episode length - 1 steps before it re-sends the failed one: a period longer than
# the longest episode never makes a replay fault again. The wildfire's (137) is also off
# the rhythm of its 100-step episodes, so that its faults land at various episode lengths.
# The slow cases pay 1.5 s or more per fault, or ~10 ms a vector step, and get longer
# budgets.
CASES = {c.key: c for c in (Case("noop", 500, 3.0, 1.5), Case("cartpole", 500, 3.0, 1.5),
                            Case("slow_build", 500, 10.0, 5.0, 2.5),
                            Case("wildfire", 137, 12.0, 6.0, 1.5))}


def _build(key: str, env_fns: list):
    if key == "async_shm":
        return gym.vector.AsyncVectorEnv(env_fns, shared_memory=True)
    if key in RESUME:
        return FastVectorEnv(env_fns, envs_per_worker=1, max_restarts=1_000_000,
                             step_timeout=FAST_STEP_TIMEOUT_S, resume=RESUME[key],
                             spares=SPARES.get(key, 0))
    raise ValueError(key)


def _mask(infos: dict, key: str, n: int) -> np.ndarray:
    m = infos.get("_" + key)
    return np.zeros(n, bool) if m is None else np.asarray(m, bool)


def _attempt(case_key: str, key: str, kind: str, period: int, num_envs: int,
             budget_s: float, stamp: str) -> dict:
    """One attempt, in the process that calls it (a fresh child of the benchmark)."""
    base = CASES[case_key].workload()
    bad = workloads.faulty(base, kind, period, stamp=stamp)  # safe_pid: this process never faults
    outside = key.startswith("out_")
    env_fns = base.env_fns(num_envs) if outside else [bad.env_fn()] + base.env_fns(num_envs - 1)
    every_s = CASES[case_key].outside_every_s
    res = {"case": case_key, "contender": key, "fault": kind, "period": period,
           "num_envs": num_envs, "budget_s": budget_s, "workload": bad.describe(),
           "steps": 0, "faults": 0, "restarts": 0, "restart_infos": 0, "episodes_lost": 0,
           "episodes_resumed": 0, "episodes_ended": 0, "events": [], "error": None,
           "survived": False, "outside_every_s": every_s if outside else None}
    try:
        env = _build(key, env_fns)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"build: {exc_text(exc)}"
        return res
    n = num_envs
    _, batches = action_batches(env.single_action_space, n, 64)
    wait_s = ASYNC_STEP_WAIT_S if key == "async_shm" else FAST_STEP_WAIT_S
    ep_len = np.zeros(n, np.int64)  # steps of each env's current episode so far
    quiet = []  # durations of the steps that met no fault
    resetting = np.zeros(n, bool)  # NEXT_STEP: this env's next step is its reset step
    clock = time.monotonic
    t0 = clock()
    try:
        env.reset(seed=0)
        t0 = clock()
        next_fault = t0 + every_s
        while clock() - t0 < budget_s:
            if outside and clock() >= next_fault:  # env 0's worker, now: the stamp, the signal
                pid = env.health()[0]["pid"]
                workloads.write_stamp(stamp)
                os.kill(pid, OUTSIDE[kind])
                next_fault = clock() + every_s
            sent = clock()
            env.step_async(batches[res["steps"] % len(batches)])
            try:
                _, _, term, trunc, infos = env.step_wait(timeout=wait_s)
            except BaseException:
                if key == "async_shm":  # the fault that ended the run, if it had come
                    res["faults"] = 1
                    res["episodes_lost"] = n  # every episode in flight
                    res["events"].append({"env": 0, "episode_len": int(ep_len[0]),
                                          "outcome": "run ended"})
                raise
            back = clock()
            res["steps"] += 1
            restarted = _mask(infos, "worker_restarted", n)
            resumed = _mask(infos, "worker_resumed", n)
            hit = restarted | resumed
            if hit.any():
                res["faults"] += 1
                # the first fault in this step (a crash that repeats in the replacement
                # adds a second one)
                at = [s for s in workloads.read_stamps(stamp)
                      if (sent - (every_s if outside else 0)) <= s <= back]
                since = back - at[0] if at else None
                reasons = infos.get("worker_restart_reason")
                for i in np.flatnonzero(hit):
                    lost = bool(restarted[i] and trunc[i])
                    res["events"].append({
                        "env": int(i), "episode_len": int(ep_len[i]),
                        "outcome": "resumed" if resumed[i] else "lost" if lost else "reset",
                        "since_fault_s": since, "step_s": back - sent,
                        "reason": str(reasons[i]) if restarted[i] and reasons is not None
                        else None})
            else:
                quiet.append(back - sent)
            res["restart_infos"] += int(restarted.sum())
            lost = restarted & trunc
            res["episodes_lost"] += int(lost.sum())
            res["episodes_resumed"] += int(resumed.sum())
            ended = (term | trunc) & ~lost
            res["episodes_ended"] += int(ended.sum())
            ep_len = np.where(resetting, 0, ep_len + 1)
            resetting = term | trunc
        res["survived"] = True
    except BaseException as exc:  # noqa: BLE001 - what the vectorizer raised is the result
        res["error"] = exc_text(exc).splitlines()[0][:300]
    res["elapsed_s"] = clock() - t0
    res["step_s_median"] = float(np.median(quiet)) if quiet else None
    if isinstance(env, FastVectorEnv):
        try:
            health = env.health()
            res["restarts"] = sum(h["restarts"] for h in health)
            res["health_reasons"] = [h["reasons"] for h in health]
            res["resumed"] = sum(h.get("resumed", 0) for h in health)
            not_resumed: dict = {}
            for h in health:
                for why, count in h.get("not_resumed", {}).items():
                    not_resumed[why] = not_resumed.get(why, 0) + count
            res["not_resumed"] = not_resumed
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


def run_attempt(case_key: str, key: str, kind: str, period: int, num_envs: int,
                budget_s: float, log_dir: str | None = None, grace_s: float = 40.0) -> dict:
    """Run one attempt in a child process; kill its process tree if it does not report.

    The attempt's stderr goes to ``<log_dir>/<workload>-<fault>-<contender>.log`` (or
    nowhere).
    """
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, f"{case_key}-{kind}-{key}.log")
    else:
        log_path = os.devnull
    stamps = tempfile.mkdtemp(prefix="fvbench-stamp-")  # where env 0 notes its faults
    proc = ctx.Process(target=_attempt_main, name=f"bench-survival-{case_key}-{key}-{kind}",
                       args=(send, log_path, case_key, key, kind, period, num_envs, budget_s,
                             os.path.join(stamps, "faults")),
                       daemon=False)
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
    shutil.rmtree(stamps, ignore_errors=True)
    if res is None:
        res = {"case": case_key, "contender": key, "fault": kind, "period": period,
               "num_envs": num_envs, "budget_s": budget_s, "survived": False, "steps": None,
               "restarts": None, "events": [],
               "error": f"benchmark watchdog: the attempt did not report within "
                        f"{budget_s + grace_s:.0f} s (exit code {proc.exitcode}); killed"}
    for field, value in (("case", case_key), ("contender", key), ("fault", kind),
                         ("period", period), ("num_envs", num_envs), ("budget_s", budget_s)):
        res.setdefault(field, value)  # a "benchmark bug" result has only its error
    res["label"] = CONTENDERS[key]
    res["log"] = None if log_path == os.devnull else log_path
    res["leftover_shm"] = _remove_names_of(proc.pid)
    summarize(res)
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


def _quantiles(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": float(np.median(vals)), "p90": float(np.percentile(vals, 90)),
            "min": float(min(vals)), "max": float(max(vals)), "count": len(vals)}


def summarize(res: dict) -> None:
    """Add the per-attempt figures: lost per 1000 faults, recovery time, episode length."""
    faults = res.get("faults") or 0
    died = not res.get("survived") and res["contender"] == "async_shm" and faults
    res["run_ended_at_fault"] = 1 if died else None
    res["lost_per_1000_faults"] = (None if died or not faults
                                   else 1000.0 * res.get("episodes_lost", 0) / faults)
    survived = [e for e in res.get("events", []) if e.get("outcome") != "run ended"]
    res["recovery_s"] = _quantiles(
        [e["since_fault_s"] if e.get("since_fault_s") is not None else e.get("step_s")
         for e in survived])
    res["episode_len_at_fault"] = _quantiles([e["episode_len"] for e in res.get("events", [])])
    res["not_resumed_reasons"] = sorted({e["reason"].split("not resumed: ", 1)[1]
                                         for e in survived if e.get("reason")
                                         and "not resumed: " in e["reason"]})[:5]


def plan(case_keys, kinds) -> tuple[list[str], list[dict]]:
    """The cases this run can do, and those skipped (with why)."""
    chosen, skipped = [], []
    for key in case_keys:
        ok, why = CASES[key].available()
        if ok:
            chosen.append(key)
        else:
            skipped.append({"workload": key, "reason": why})
    return chosen, skipped


def contenders(kind: str) -> list[str]:
    """The contenders of a fault kind: the spare pair only where a signal sends it."""
    return [k for k in CONTENDERS if not k.startswith("out_") or kind in OUTSIDE]


def attempts(case_keys, kinds) -> int:
    return len(case_keys) * sum(len(contenders(k)) for k in kinds)


def run(kinds, budget_s: float | None, period: int | None, num_envs: int,
        progress: Progress | None = None, log_dir: str | None = None,
        cases=("noop",), quick: bool = False) -> list[dict]:
    """Every (case, fault kind, contender) attempt. ``budget_s`` and ``period`` None: each
    case's own (its quick budget with ``quick``)."""
    out = []
    for case_key in cases:
        case = CASES[case_key]
        budget = budget_s or (case.quick_budget_s if quick else case.budget_s)
        for kind in kinds:
            for key in contenders(kind):
                res = run_attempt(case_key, key, kind, period or case.period, num_envs,
                                  budget, log_dir)
                if key in SPARES and kind in death_floor.SIGNALS:
                    # the kernel's part of the spare's recovery, from a process of this size
                    res["death_floor"] = death_floor.measure(kind)
                out.append(res)
                if progress is not None:
                    progress.update(1, f"survival {case_key} {kind}")
    return out


def unexpected(results: list[dict]) -> list[str]:
    """FastVectorEnv is expected to survive every fault; anything else is only reported
    (episodes that resume on did not resume are shown in the report, with why)."""
    errs = []
    for r in results:
        where = f"survival {r.get('case', 'noop')} {r['fault']} {r['label']}"
        if r["contender"].startswith("fast") and not r["survived"]:
            errs.append(f"{where}: {r['error']}")
        elif r.get("error", "") and str(r["error"]).startswith(("benchmark", "build")):
            errs.append(f"{where}: {r['error']}")
        if r.get("leftover_shm"):
            errs.append(f"{where} left {r['leftover_shm']} in /dev/shm (removed)")
    return errs


# -- output ----------------------------------------------------------------------------------------

def _ms(q: dict | None) -> str:
    if not q:
        return "-"
    return f"{1e3 * q['median']:.0f} / {1e3 * q['p90']:.0f}"


def _lost_text(r: dict) -> str:
    if r.get("run_ended_at_fault"):
        return f"all {r['num_envs']} in flight; run ends"
    v = r.get("lost_per_1000_faults")
    return "-" if v is None else f"{v:.0f}"


def report(results: list[dict]) -> str:
    if not results:
        return ""
    out = []
    for case_key in dict.fromkeys(r.get("case", "noop") for r in results):
        rs = [r for r in results if r.get("case", "noop") == case_key]
        r0 = rs[0]
        inner = r0.get("workload", {}).get("kwargs", {}).get("inner", {})
        if out:
            out.append("")
        out.append(f"survival, {case_key} ({inner.get('name', '?')}): env 0 of "
                   f"{r0['num_envs']} envs faults every {r0['period']} of its steps; budget "
                   f"{r0['budget_s']:g} s per attempt")
        rows = []
        for r in rs:
            steps = r.get("steps")
            el = r.get("elapsed_s")
            rate = (steps * r["num_envs"] / el) if steps and el else None
            rows.append([
                r["fault"], r["label"],
                "survived" if r["survived"] else "DIED",
                "-" if steps is None else str(steps),
                fmt_rate(rate),
                str(r.get("faults", "-")),
                "-" if r.get("restarts") is None else str(r["restarts"]),
                str(r.get("episodes_resumed", "-")),
                str(r.get("episodes_lost", "-")),
                _lost_text(r),
                (r.get("error") or "")[:70],
            ])
        out.append(table(["fault", "contender", "outcome", "steps", "env-steps/s", "faults",
                          "restarts", "resumed", "lost", "lost / 1000 faults",
                          "error seen"], rows))
    pairs = resume_pairs(results)
    if pairs:
        out += ["", "recovery time, ms, median / p90 over the faults: from env 0's fault to the "
                "return of the step that reports it; episode length at the fault = the steps "
                "a resume replays (median [min-max])"]
        rows = []
        for p in pairs:
            off, on = p["off"], p["on"]
            ratio = p["on_over_off"]
            ln = on.get("episode_len_at_fault") or off.get("episode_len_at_fault")
            rows.append([
                p["case"], p["fault"],
                "-" if not ln else f"{ln['median']:.0f} [{ln['min']:.0f}-{ln['max']:.0f}]",
                _ms(off.get("recovery_s")), _ms(on.get("recovery_s")),
                "-" if ratio is None else f"{ratio:.2f}x",
                f"{on.get('episodes_resumed', 0)}/{on.get('faults', 0)}",
                "; ".join(f"{k}: {v}" for k, v in (on.get("not_resumed") or {}).items()) or "-",
            ])
        out.append(table(["workload", "fault", "episode len at fault", "resume=off",
                          f"resume={RESUME_ON}", "on/off", "resumed/faults", "not resumed"],
                         rows))
        whys = sorted({w for p in pairs for w in p["on"].get("not_resumed_reasons", [])})
        for w in whys[:5]:
            out.append(f"  not resumed: {w[:200]}")
    spares = spare_pairs(results)
    if spares:
        out += ["", f"recovery with a hot spare, ms, median / p90: a fault sent from outside to "
                f"env 0's worker (every env from one function, resume={RESUME_ON}); bound = "
                "(2 + steps replayed) x the median step without a fault; kernel = the same "
                "signal to a sleeping process of this benchmark's size, to its death seen "
                "(benchmarks/death_floor.py): no runner of processes recovers sooner"]
        rows = [[p["case"], p["fault"], f"{p['faults'][0]} / {p['faults'][1]}",
                 _ms(p["without"].get("recovery_s")), _ms(p["with"].get("recovery_s")),
                 "-" if p["with_over_without"] is None else f"{p['with_over_without']:.3f}x",
                 "-" if p["step_ms"] is None else f"{p['step_ms']:.2f}",
                 "-" if p["bound_ms"] is None else f"{p['bound_ms']:.1f}",
                 {True: "yes", False: "NO", None: "-"}[p["within_bound"]],
                 "-" if not p["floor"] else
                 f"{p['floor']['median_ms']:.1f} / {p['floor']['p90_ms']:.1f}"]
                for p in spares]
        out.append(table(["workload", "fault", "faults", "no spare", "spares=1",
                          "spare/none", "step ms", "bound ms", "within", "kernel"], rows))
    return "\n".join(out)


def spare_pairs(results: list[dict]) -> list[dict]:
    """(case, fault) -> recovery from a fault sent from outside, without and with a spare;
    the ratio of medians, and the bound of the issue: two step times plus the replay."""
    out = []
    by = {(r.get("case", "noop"), r["fault"], r["contender"]): r for r in results}
    for (case, fault, key), without in by.items():
        spare = by.get((case, fault, "out_spare"))
        if key != "out_on" or spare is None:
            continue
        a, b = without.get("recovery_s"), spare.get("recovery_s")
        step = spare.get("step_s_median")
        ln = spare.get("episode_len_at_fault")
        bound = (2 + ln["median"]) * step if step and ln else None
        out.append({"case": case, "fault": fault, "without": without, "with": spare,
                    "faults": (without.get("faults"), spare.get("faults")),
                    "with_over_without": b["median"] / a["median"] if a and b and a["median"]
                    else None,
                    "step_ms": None if step is None else 1e3 * step,
                    "bound_ms": None if bound is None else 1e3 * bound,
                    "within_bound": None if bound is None or not b else b["median"] <= bound,
                    "floor": spare.get("death_floor")})
    return out


def resume_pairs(results: list[dict]) -> list[dict]:
    """(case, fault) -> resume off and on side by side, with the ratio of median recovery
    times (on / off)."""
    out = []
    by = {(r.get("case", "noop"), r["fault"], r["contender"]): r for r in results}
    for (case, fault, key), off in by.items():
        on = by.get((case, fault, "fast_on"))
        if key != "fast_off" or on is None:
            continue
        a, b = off.get("recovery_s"), on.get("recovery_s")
        out.append({"case": case, "fault": fault, "off": off, "on": on,
                    "on_over_off": b["median"] / a["median"] if a and b and a["median"] else None})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="segfault and SIGKILL only, short budgets")
    p.add_argument("--faults", help=f"comma-separated subset of {','.join(workloads.FAULT_KINDS)}")
    p.add_argument("--workloads", help=f"comma-separated subset of {','.join(CASES)} "
                                       "(default all; the wildfire needs pyretechnics)")
    p.add_argument("--budget-s", type=float,
                   help="seconds per attempt for every workload (default per workload: "
                        + ", ".join(f"{c.key} {c.budget_s:g} (quick {c.quick_budget_s:g})"
                                    for c in CASES.values()) + ")")
    p.add_argument("--period", type=int, help="steps of env 0 between faults (default per "
                   "workload: " + ", ".join(f"{c.key} {c.period}" for c in CASES.values()) + ")")
    p.add_argument("--num-envs", type=int, default=4)
    p.add_argument("--out", default=str(BENCH_DIR / "results"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    kinds = (args.faults.split(",") if args.faults else
             QUICK_KINDS if args.quick else workloads.FAULT_KINDS)
    bad = set(kinds) - set(workloads.FAULT_KINDS)
    if bad:
        p.error(f"unknown fault kinds {sorted(bad)}")
    wanted = args.workloads.split(",") if args.workloads else list(CASES)
    bad = set(wanted) - set(CASES)
    if bad:
        p.error(f"unknown workloads {sorted(bad)}")
    cases, skipped = plan(wanted, kinds)
    for s in skipped:
        print(f"skipping {s['workload']}: {s['reason']}\n  (install the fire extra, "
              f"pip install \"fastvec[fire]\", to include it)", file=sys.stderr)

    t0 = time.monotonic()
    progress = Progress(attempts(cases, kinds), not args.no_progress, "survival")
    try:
        results = run(kinds, args.budget_s, args.period, args.num_envs, progress,
                      os.path.join(args.out, "survival-logs"), cases, args.quick)
    finally:
        progress.close()
    data = {"machine": machine_facts(), "skipped": skipped, "survival": results,
            "resume": [{"case": p["case"], "fault": p["fault"], "on_over_off": p["on_over_off"],
                        "off": {k: p["off"].get(k) for k in PAIR_FIELDS},
                        "on": {k: p["on"].get(k) for k in PAIR_FIELDS}}
                       for p in resume_pairs(results)],
            "spares": [{"case": p["case"], "fault": p["fault"],
                        "with_over_without": p["with_over_without"], "step_ms": p["step_ms"],
                        "bound_ms": p["bound_ms"], "within_bound": p["within_bound"],
                        "death_floor": p["floor"],
                        "without": {k: p["without"].get(k) for k in PAIR_FIELDS},
                        "with": {k: p["with"].get(k) for k in PAIR_FIELDS}}
                       for p in spare_pairs(results)],
            "leftovers": leftover_report(), "runtime_s": time.monotonic() - t0}
    out = os.path.join(args.out, "survival.json")
    write_json(Path(out), data)
    for s in skipped:
        print(f"skipped {s['workload']}: {s['reason']}")
    print(report(results))
    errs = unexpected(results)
    left = data["leftovers"]
    if left["stray_processes"] or left["shm_leftovers"]:
        errs.append(f"leftovers: {left}")
    for e in errs:
        print(f"ERROR: {e}", file=sys.stderr)
    print(f"\nwrote {out}; {data['runtime_s']:.0f} s")
    return 1 if errs else 0


PAIR_FIELDS = ("faults", "episodes_lost", "episodes_resumed", "lost_per_1000_faults",
               "recovery_s", "episode_len_at_fault", "not_resumed")


if __name__ == "__main__":
    sys.exit(main())
