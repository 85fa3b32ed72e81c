"""How a cell is timed: warm-up, round-robin repeats, the one-env reference, medians.

Method, shared by compare.py and transport.py (see :func:`measure_cell`):

* every contender of a cell is built, reset and warmed up before anything is timed; env
  construction, reset and close are never inside a timed section;
* the timed repeats are round-robin: round r runs every contender once, in an order
  rotated by r, so slow drift of the machine hits all contenders alike;
* every env of every contender does the same work: each repeat starts from
  ``reset(seed=0)`` for every env (not timed), and every env takes the same pre-drawn
  action sequence, so a deterministic env (the wildfire) replays one and the same episode
  everywhere; by default a repeat is the same number of steps for all contenders, chosen
  from the warm-up so that the slowest one's repeat lasts about ``repeat_s``;
* the reference, one env stepped in the benchmark process (``contenders.SINGLE``), takes
  part in every round like a contender, replaying the same steps; its sample is several
  such replays, so that it too lasts about ``repeat_s`` (one replay of a no-op episode
  takes well under a millisecond, too short to time). Efficiency =
  env-steps/s / (min(num_envs, cores) x the median of the reference's samples);
* a contender that leaves work running after a timed sample (first-ready keeps every env
  stepping, PufferLib's workers spin for half a second) finishes it untimed (``park()``)
  before the next contender is timed;
* a result is the median over repeats of env-steps per second, with min and max.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from gymnasium import Space

from contenders import SINGLE, Contender, InProcessEnv
from machine import cpu_count
from processes import safe_close
from report import exc_text

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # progress bars are a nicety
    _tqdm = None

MAX_REFERENCE_PASSES = 1000


@dataclass
class Timing:
    repeats: int = 3
    repeat_s: float = 0.5
    warmup_s: float = 0.3
    min_steps: int = 5
    max_steps: int = 200_000


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": list(values)}


def action_batches(single_space: Space, num_envs: int, count: int,
                   seed: int = 0) -> tuple[list, list]:
    """``count`` actions of one env, and the batches in which every env takes that action."""
    from gymnasium.vector.utils import concatenate, create_empty_array

    single_space.seed(seed)
    singles = [single_space.sample() for _ in range(count)]
    batches = [concatenate(single_space, [a] * num_envs,
                           create_empty_array(single_space, num_envs)) for a in singles]
    return singles, batches


def run_steps(env, actions: list, steps: int) -> float:
    """Seconds taken by ``steps`` calls of ``env.step``."""
    k = len(actions)
    step = env.step
    t0 = time.perf_counter()
    for i in range(steps):
        step(actions[i % k])
    return time.perf_counter() - t0


def step_latencies_ns(env, actions: list, steps: int) -> np.ndarray:
    """Wall time of each of ``steps`` single ``env.step`` calls, in nanoseconds."""
    k = len(actions)
    out = np.empty(steps, np.int64)
    clock = time.perf_counter_ns
    step = env.step
    for i in range(steps):
        t0 = clock()
        step(actions[i % k])
        out[i] = clock() - t0
    return out


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class Progress:
    """A tqdm bar on stderr when tqdm is installed and wanted; otherwise silent."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self.bar = (_tqdm(total=total, desc=desc, unit="run", file=sys.stderr, leave=False,
                          dynamic_ncols=True) if enabled and _tqdm is not None else None)

    def update(self, n: int = 1, note: str | None = None) -> None:
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def measure_cell(make_env_fns: Callable[[], list], contenders: list[Contender],
                 timing: Timing, progress: Progress | None = None, note: str = "",
                 min_steps: int = 0, reference: bool = True,
                 equal_steps: bool = True) -> dict[str, dict]:
    """Throughput of each contender on one (workload, num_envs) cell.

    ``reference``: also measure ``SINGLE`` (one env in this process) in every round, and
    give each contender ``efficiency`` = median env-steps/s / (min(num_envs, cores) x the
    reference's median). ``equal_steps``: every contender's repeat is the same number of
    steps, sized so the slowest lasts about ``repeat_s`` (and at least ``min_steps``);
    False sizes each contender's repeat from its own warm-up (for cells whose contenders
    differ 100x in speed and whose steps all cost the same, as on the no-op env).

    Returns ``{key: result}`` for the contenders and, with ``reference``, for
    ``SINGLE.key``; a result has ``sps`` (env-steps/s summary) or ``error`` (the
    contender failed to build, reset, step or close). Progress advances once per timed
    sample (``timing.repeats`` per contender and for the reference).
    """
    entries = ([SINGLE] if reference else []) + [c for c in contenders if c is not SINGLE]
    results: dict[str, dict] = {c.key: {"contender": c.key} for c in entries}
    if reference:
        results[SINGLE.key]["reference"] = True
    live: dict[str, Any] = {}
    per_step: dict[str, float] = {}
    acts: dict[str, list] = {}
    try:  # the actions every env takes, drawn once from a probe env's action space
        fns = make_env_fns()
        probe = fns[0]()
        try:
            singles, batches = action_batches(probe.action_space, len(fns), 64)
        finally:
            probe.close()
    except Exception as exc:  # noqa: BLE001 - every contender would fail the same way
        for res in results.values():
            res["error"] = f"build: probe env: {exc_text(exc)}"
        return results

    def fail(key: str, stage: str, exc: BaseException) -> None:
        results[key]["error"] = f"{stage}: {exc_text(exc)}"
        if key in live:
            safe_close(live.pop(key), terminate=True)

    try:
        for c in entries:
            try:
                env = live[c.key] = c.build(make_env_fns())
            except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                fail(c.key, "build", exc)
                continue
            try:
                acts[c.key] = singles if isinstance(env, InProcessEnv) else batches
                env.reset(seed=[0] * env.num_envs)
                n, spent = 1, run_steps(env, acts[c.key], 1)
                while spent < timing.warmup_s and n < timing.max_steps:
                    spent += run_steps(env, acts[c.key], n)
                    n *= 2
                per_step[c.key] = spent / n
                _park(env)
            except Exception as exc:  # noqa: BLE001
                fail(c.key, "warm-up", exc)
        order = [c.key for c in entries if c.key in live]
        steps, passes = _plan(order, per_step, timing, min_steps, equal_steps,
                              SINGLE.key if reference else None)
        samples: dict[str, list[float]] = {k: [] for k in order}
        faults = {k: 0 for k in order}
        for r in range(timing.repeats):
            shift = r % len(order) if order else 0
            for key in order[shift:] + order[:shift]:
                if key in live:
                    env = live[key]
                    try:
                        dt = 0.0
                        f0 = _minflt()
                        for _ in range(passes[key]):
                            env.reset(seed=[0] * env.num_envs)  # untimed: the same episode
                            dt += run_steps(env, acts[key], steps[key])
                        faults[key] += _minflt() - f0
                        samples[key].append(passes[key] * steps[key] * env.num_envs / dt)
                        _park(env)
                    except Exception as exc:  # noqa: BLE001
                        fail(key, "step", exc)
                if progress is not None:
                    progress.update(1, note)
        for key, vals in samples.items():
            res = results[key]
            if vals and "error" not in res:
                res["sps"] = summary(vals)
                res["steps_per_repeat"] = steps[key] * passes[key]
                if passes[key] > 1:
                    res["replays_per_repeat"] = passes[key]
                # Page faults of this (parent) process per vector step: fresh memory touched
                # on every step shows up here (it is slow in VMs).
                res["parent_minor_faults_per_step"] = faults[key] / (
                    steps[key] * passes[key] * len(vals))
        if reference:
            _add_efficiency(results, live)
    finally:
        for key, env in list(live.items()):
            problem = safe_close(env)
            if problem and "error" not in results[key]:
                results[key]["error"] = f"close: {problem}"
    return results


def _park(env) -> None:
    """Let a contender that leaves work behind a timed sample go quiet before the next one
    is timed (first-ready: steps still in flight; PufferLib: workers spinning on)."""
    park = getattr(env, "park", None)
    if park is not None:
        park()


def _plan(order: list[str], per_step: dict[str, float], timing: Timing, min_steps: int,
          equal_steps: bool, ref: str | None) -> tuple[dict[str, int], dict[str, int]]:
    """Steps per replay and replays per timed sample, for each key in ``order``."""
    def clamp(x: float) -> int:
        return int(min(timing.max_steps, max(timing.min_steps, min_steps, x)))

    if equal_steps:
        racers = [k for k in order if k != ref] or order
        slowest = max((per_step[k] for k in racers), default=1.0)
        steps = dict.fromkeys(order, clamp(timing.repeat_s / slowest))
    else:
        steps = {k: clamp(timing.repeat_s / per_step[k]) for k in order}
    passes = dict.fromkeys(order, 1)
    if ref in steps:
        # The reference replays the same steps as the contenders; repeat the replay until
        # its sample is as long as theirs.
        want = timing.repeat_s / (steps[ref] * per_step[ref])
        passes[ref] = max(1, min(MAX_REFERENCE_PASSES, round(want)))
    return steps, passes


def _add_efficiency(results: dict[str, dict], live: dict[str, Any]) -> None:
    """efficiency = median env-steps/s / (min(num_envs, cores) x the reference's median)."""
    ref = results.get(SINGLE.key, {}).get("sps", {}).get("median")
    cores = cpu_count()
    for key, res in results.items():
        med = res.get("sps", {}).get("median")
        n = getattr(live.get(key), "num_envs", None)
        if key != SINGLE.key and ref and med and n:
            res["efficiency"] = med / (min(n, cores) * ref)
            res["efficiency_cores"] = min(n, cores)
