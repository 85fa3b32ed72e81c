"""The steady-state cost of resume's episode log: FastVectorEnv with it (``resume="auto"``,
the default; "on" below) next to ``resume="off"``, on the same workload, in the same run,
repeats interleaved.

With resume on the parent logs every lockstep step (a few array copies: actions, reward,
terminated, truncated) and every worker reports how each episode began (its seed, or its
RNG state before an unseeded reset): a cost paid on every step, faults or not. It is
largest where a step costs least, the no-op env (transport.py); on a real simulator
(the wildfire, compare.py) it should vanish in the noise.

Method (:func:`measure_pair`): both envs are built from the same env functions, reset
and warmed up, untimed. Then ``repeats`` rounds; each times both, in an order that
alternates (on, off / off, on / ...), every sample the same number of steps from
``reset(seed=0)`` (untimed) with the same pre-drawn actions, so the wildfire replays the
same episode in both. A sample gives env-steps/s (wall) and the parent's CPU time per
vector step (``time.process_time``, all its threads: the log is written there, and CPU
time is less disturbed than wall time by other work on a shared machine). Reported:
medians with min and max, the ratio of the medians (on / off), and the median of the
per-round ratios (paired: drift of the machine between rounds cancels).
"""

from __future__ import annotations

import time

from contenders import RESUME_ON, fast
from machine import CpuMeter
from measure import Progress, Timing, action_batches, run_steps, summary
from processes import safe_close
from report import exc_text, fmt_rate, table

MODES = ("on", "off")
SETTING = {"on": RESUME_ON, "off": "off"}  # FastVectorEnv's resume= for each mode


def measure_pair(make_env_fns, k: int, timing: Timing, repeats: int, min_steps: int = 0,
                 progress: Progress | None = None, note: str = "") -> dict:
    """resume on vs off for FastVectorEnv with ``k`` envs per worker (see the module)."""
    contenders = {mode: fast(k, resume=SETTING[mode]) for mode in MODES}
    out: dict = {"envs_per_worker": k, "repeats": repeats,
                 "contenders": {m: c.describe() for m, c in contenders.items()}}
    live: dict = {}
    try:
        fns = make_env_fns()
        probe = fns[0]()
        try:
            _, batches = action_batches(probe.action_space, len(fns), 64)
        finally:
            probe.close()
        per_step = {}
        for mode, c in contenders.items():
            env = live[mode] = c.build(make_env_fns())
            env.reset(seed=[0] * env.num_envs)
            n, spent = 1, run_steps(env, batches, 1)
            while spent < timing.warmup_s and n < timing.max_steps:
                spent += run_steps(env, batches, n)
                n *= 2
            per_step[mode] = spent / n
        steps = int(min(timing.max_steps, max(timing.min_steps, min_steps,
                                              timing.repeat_s / max(per_step.values()))))
        sps: dict = {m: [] for m in MODES}
        cpu: dict = {m: [] for m in MODES}
        for r in range(repeats):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                env = live[mode]
                env.reset(seed=[0] * env.num_envs)  # untimed: the same episode
                c0, t0 = time.process_time(), time.perf_counter()
                run_steps(env, batches, steps)
                wall, used = time.perf_counter() - t0, time.process_time() - c0
                sps[mode].append(steps * env.num_envs / wall)
                cpu[mode].append(1e6 * used / steps)
                if progress is not None:
                    progress.update(1, note)
    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
        out["error"] = exc_text(exc)
        return out
    finally:
        for env in live.values():
            problem = safe_close(env)
            if problem and "error" not in out:
                out["error"] = f"close: {problem}"
    out["steps_per_repeat"] = steps
    for m in MODES:
        out[m] = {"sps": summary(sps[m]), "parent_cpu_us_per_step": summary(cpu[m])}
    out["sps_ratio_on_off"] = out["on"]["sps"]["median"] / out["off"]["sps"]["median"]
    out["paired_sps_ratio_on_off"] = summary([a / b for a, b in zip(sps["on"], sps["off"])])
    out["parent_cpu_us_extra"] = (out["on"]["parent_cpu_us_per_step"]["median"]
                                  - out["off"]["parent_cpu_us_per_step"]["median"])
    return out


def run(cells: list[tuple], timing: Timing, repeats: int,
        progress: Progress | None = None) -> list[dict]:
    """``cells``: (workload, num_envs, k); one :func:`measure_pair` each."""
    out = []
    meter = CpuMeter()
    for wl, n, k in cells:
        t0 = time.monotonic()
        res = measure_pair(lambda: wl.env_fns(n), k, timing, repeats, wl.min_steps, progress,
                           f"resume cost {wl.name} n={n} k={k}")
        out.append({"workload": wl.describe(), "num_envs": n, **res,
                    "foreign_cpu_share": meter.foreign_share(),
                    "elapsed_s": time.monotonic() - t0})
    return out


def samples(cells: list[tuple], repeats: int) -> int:
    """Progress steps of :func:`run`."""
    return len(cells) * repeats * len(MODES)


def errors_of(results: list[dict]) -> list[str]:
    return [f"resume cost {r['workload']['name']} n={r['num_envs']} k={r['envs_per_worker']}: "
            f"{r['error']}" for r in results if "error" in r]


def report(results: list[dict]) -> str:
    if not results:
        return ""
    rows = []
    for r in results:
        head = [r["workload"]["name"] + ("*" if r.get("foreign_cpu_share", 0) > 0.1 else ""),
                str(r["num_envs"]), str(r["envs_per_worker"])]
        if "error" in r:
            rows.append(head + ["ERROR: " + r["error"][:60], "", "", "", "", ""])
            continue
        on, off = r["on"], r["off"]
        p = r["paired_sps_ratio_on_off"]
        rows.append(head + [
            fmt_rate(off["sps"]["median"]), fmt_rate(on["sps"]["median"]),
            f"{r['sps_ratio_on_off']:.2f}x (paired {p['median']:.2f} "
            f"[{p['min']:.2f}-{p['max']:.2f}])",
            f"{off['parent_cpu_us_per_step']['median']:.1f}",
            f"{on['parent_cpu_us_per_step']['median']:.1f}",
            f"{r['parent_cpu_us_extra']:+.1f}",
        ])
    reps = results[0].get("repeats")
    out = [f"episode log, steady state: FastVectorEnv resume={RESUME_ON} (on) next to "
           f"resume=off, {reps} "
           "interleaved repeats each; env-steps/s medians, on/off = ratio of the medians "
           "(paired: median [min-max] of the per-round ratios); parent CPU µs per vector "
           "step, medians",
           table(["workload", "n", "k", "off env-steps/s", "on env-steps/s", "on/off",
                  "CPU µs off", "CPU µs on", "on - off"], rows)]
    busy = [r for r in results if r.get("foreign_cpu_share", 0) > 0.1]
    if busy:
        out.append("* other processes used more than 10% of the CPU meanwhile: "
                   + ", ".join(f"{r['workload']['name']} k={r['envs_per_worker']} "
                               f"{100 * r['foreign_cpu_share']:.0f}%" for r in busy))
    return "\n".join(out)
