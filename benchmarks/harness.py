"""What every benchmark script shares: thread limits, contenders, timing, facts, cleanup.

Import this module before numpy. It pins the BLAS / OpenMP thread pools of this process,
and so of every worker process it starts, to one thread (``setdefault``: a value already in
the environment wins and is recorded in the results). Without this, each of N worker
processes may start an OpenBLAS pool of one thread per core and oversubscribe the machine.

Method, shared by transport.py and compare.py (see ``measure_cell``):

* every contender of a cell is built, reset and warmed up before anything is timed; env
  construction, reset and close are never inside a timed section;
* the timed repeats are round-robin: repeat r runs every contender once, in an order
  rotated by r, so slow drift of the machine hits all contenders alike;
* every env of every contender does the same work: each repeat starts from
  ``reset(seed=0)`` for every env (not timed), and every env takes the same pre-drawn
  action sequence, so a deterministic env (the wildfire) replays one and the same episode
  everywhere; a repeat is the same number of steps for all contenders, chosen from the
  warm-up so that the slowest one's repeat lasts about ``repeat_s``;
* the reference is one env stepped in the benchmark process, measured in the same rounds:
  efficiency = env-steps/s / (min(num_envs, cores) x its steps/s);
* a result is the median over repeats of env-steps per second, with min and max.
"""

from __future__ import annotations

import os

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")
for _var in THREAD_VARS:
    os.environ.setdefault(_var, "1")

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def _import_fastvec():
    try:
        import fastvec
    except ImportError:
        # Running from a checkout: the package sits next to benchmarks/.
        sys.path.insert(0, str(REPO_ROOT))
        try:
            import fastvec
        except ImportError as exc:
            raise SystemExit(
                f"cannot import fastvec ({exc}); build it in place first:\n"
                f"  cd {REPO_ROOT.name} && python setup.py build_ext --inplace") from exc
    return fastvec


fastvec = _import_fastvec()

import gymnasium as gym  # noqa: E402
import psutil  # noqa: E402
from fastvec import FastVectorEnv  # noqa: E402
from fastvec.shm import leftovers as fastvec_leftovers  # noqa: E402

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # progress bars are a nicety
    _tqdm = None


# -- contenders ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contender:
    """One vector-env implementation with its settings."""

    key: str
    label: str
    kind: str  # "sync", "async", "fast"
    kwargs: dict = field(default_factory=dict)

    def build(self, env_fns: list[Callable]) -> gym.vector.VectorEnv:
        if self.kind == "single":
            return InProcessEnv(env_fns[0])
        if self.kind == "sync":
            return gym.vector.SyncVectorEnv(env_fns, **self.kwargs)
        if self.kind == "async":
            return gym.vector.AsyncVectorEnv(env_fns, **self.kwargs)
        if self.kind == "fast":
            return FastVectorEnv(env_fns, **self.kwargs)
        if self.kind == "fast_ready":
            batch = max(1, len(env_fns) // self.kwargs.get("batch_div", 2))
            return FirstReady(FastVectorEnv(env_fns, batch_size=batch))
        raise ValueError(f"unknown contender kind {self.kind!r}")

    def workers(self, num_envs: int) -> int:
        if self.kind in ("sync", "single"):
            return 0
        k = self.kwargs.get("envs_per_worker", 1)
        return -(-num_envs // k)

    def describe(self) -> dict:
        return {"key": self.key, "label": self.label, "kind": self.kind,
                "kwargs": dict(self.kwargs)}


SINGLE = Contender("single", "one env in-process", "single")  # the reference, not a vectorizer
SYNC = Contender("sync", "gym Sync", "sync")
ASYNC_SHM = Contender("async_shm", "gym Async shm", "async", {"shared_memory": True})
ASYNC_PIPE = Contender("async_pipe", "gym Async pipe", "async", {"shared_memory": False})
BASELINE = ASYNC_SHM.key  # ratios are taken against this contender


class InProcessEnv:
    """One env stepped directly in this process, with a vector env's NEXT_STEP autoreset.

    The reference of a cell: every env of a vector env in that cell replays exactly this
    env's episode (same seed, same actions), so ``min(num_envs, cores)`` times its rate is
    what perfect parallelism would reach.
    """

    num_envs = 1

    def __init__(self, env_fn: Callable):
        self.env = env_fn()
        self._ended = False

    def reset(self, *, seed=None, options=None):
        if isinstance(seed, (list, tuple)):
            seed = seed[0]
        self._ended = False
        return self.env.reset(seed=seed, options=options)

    def step(self, action):
        if self._ended:
            self._ended = False
            return self.env.reset()
        out = self.env.step(action)
        self._ended = bool(out[2] or out[3])
        return out

    def close(self, **kwargs):
        self.env.close()


class FirstReady:
    """FastVectorEnv driven by send/recv instead of lockstep steps.

    ``step(actions)`` returns once ``num_envs`` env-steps came back, from any envs; each env
    is sent again as soon as it returns, so a slow step holds up only its own env. The
    throughput is counted in env-steps like every other contender's.
    """

    def __init__(self, env: FastVectorEnv):
        self.env = env
        self.num_envs = env.num_envs
        self._primed = False

    def reset(self, *, seed=None, options=None):
        self._drain()
        return self.env.reset(seed=seed, options=options)

    def step(self, actions):
        env = self.env
        if not self._primed:
            env.send(actions)
            self._primed = True
        done = 0
        while done < self.num_envs:
            out = env.recv()
            ids = out[-1]
            done += len(ids)
            env.send(actions[ids], ids)
        return out

    def _drain(self) -> None:
        while len(self.env.stepping):
            self.env.recv()
        self._primed = False

    def close(self, **kwargs):
        if not kwargs.get("terminate"):
            self._drain()
        self.env.close(**kwargs)


def fast_ready(div: int = 2) -> Contender:
    """fastvec with first-ready batches of num_envs // div envs (send/recv)."""
    return Contender(f"fast_ready{div}", f"fastvec first-ready n/{div}", "fast_ready",
                     {"batch_div": div})


def fast(k: int, copy: bool = True) -> Contender:
    key = f"fast_k{k}" + ("" if copy else "_nocopy")
    label = f"fastvec k={k}" + ("" if copy else " copy=False")
    return Contender(key, label, "fast", {"envs_per_worker": k, "copy": copy})


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


def worker_pids(env) -> set[int]:
    """Pids of the worker processes of a gymnasium AsyncVectorEnv or a FastVectorEnv."""
    env = env.env if isinstance(env, FirstReady) else env
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


# -- processes and shared memory ---------------------------------------------------------------

def children() -> list[psutil.Process]:
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


def leftover_report(grace: float = 5.0) -> dict:
    """Stray child processes and this process's fastvec names in /dev/shm.

    Children that are still there after ``grace`` seconds are killed (and reported).
    """
    import gc

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


# -- machine facts -------------------------------------------------------------------------------

def cpu_count() -> int:
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


def _git_commit() -> str | None:
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (REPO_ROOT / ".git" / ref[5:]).read_text().strip()
        return ref
    except OSError:
        return None


def machine_facts() -> dict:
    import multiprocessing

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
        "fastvec_commit": _git_commit(),
        "start_method": multiprocessing.get_start_method(),
        "thread_env": {v: os.environ.get(v) for v in THREAD_VARS},
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


# -- timing --------------------------------------------------------------------------------------

def action_batches(single_space: gym.Space, num_envs: int, count: int,
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


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": list(values)}


@dataclass
class Timing:
    repeats: int = 3
    repeat_s: float = 0.5
    warmup_s: float = 0.3
    min_steps: int = 5
    max_steps: int = 200_000


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
                 timing: Timing, progress: Progress | None = None,
                 note: str = "", min_steps: int = 0) -> dict[str, dict]:
    """Throughput of each contender on one (workload, num_envs) cell.

    Every env of every contender does the same work: each repeat starts from
    ``reset(seed=0)`` for every env (not timed) and every env takes the same action
    sequence, so a deterministic env replays one and the same episode everywhere; the
    ``SINGLE`` contender (one env stepped in this process) is the reference for
    ``efficiency`` = env-steps/s / (min(num_envs, cores) x its env-steps/s). The step count
    makes the slowest contender's repeat last about ``repeat_s`` (and at least
    ``min_steps``).

    Returns ``{contender key: result}``; a result has ``sps`` (env-steps/s summary) or
    ``error`` (the contender failed to build, reset, step or close).
    """
    results: dict[str, dict] = {c.key: {"contender": c.key} for c in contenders}
    live: dict[str, Any] = {}
    per_step: dict[str, float] = {}
    acts: dict[str, list] = {}
    singles = batches = None

    def fail(key: str, stage: str, exc: BaseException) -> None:
        results[key]["error"] = f"{stage}: {exc_text(exc)}"
        if key in live:
            safe_close(live.pop(key), terminate=True)

    try:
        for c in contenders:
            try:
                env = live[c.key] = c.build(make_env_fns())
            except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                fail(c.key, "build", exc)
                continue
            try:
                if singles is None:
                    fns = make_env_fns()
                    probe = fns[0]()
                    try:
                        singles, batches = action_batches(probe.action_space, len(fns), 64)
                    finally:
                        probe.close()
                acts[c.key] = singles if isinstance(env, InProcessEnv) else batches
                env.reset(seed=[0] * env.num_envs)
                n, spent = 1, run_steps(env, acts[c.key], 1)
                while spent < timing.warmup_s and n < timing.max_steps:
                    spent += run_steps(env, acts[c.key], n)
                    n *= 2
                per_step[c.key] = spent / n
            except Exception as exc:  # noqa: BLE001
                fail(c.key, "warm-up", exc)
        order = [c.key for c in contenders if c.key in live]
        steps = 0
        if order:
            slowest = max(per_step[k] for k in order)
            steps = int(min(timing.max_steps, max(timing.min_steps, min_steps,
                                                  timing.repeat_s / slowest)))
        samples: dict[str, list[float]] = {k: [] for k in order}
        faults = {k: 0 for k in order}
        for r in range(timing.repeats):
            shift = r % len(order) if order else 0
            for key in order[shift:] + order[:shift]:
                if key not in live:
                    continue
                env = live[key]
                try:
                    env.reset(seed=[0] * env.num_envs)  # untimed: the same episode every time
                    f0 = _minflt()
                    dt = run_steps(env, acts[key], steps)
                    faults[key] += _minflt() - f0
                    samples[key].append(steps * env.num_envs / dt)
                except Exception as exc:  # noqa: BLE001
                    fail(key, "step", exc)
                if progress is not None:
                    progress.update(1, note)
        for key, vals in samples.items():
            if vals and "error" not in results[key]:
                results[key]["sps"] = summary(vals)
                results[key]["steps_per_repeat"] = steps
                # Page faults of this (parent) process per vector step: fresh memory touched
                # on every step shows up here (it is slow in VMs).
                results[key]["parent_minor_faults_per_step"] = faults[key] / (steps * len(vals))
        ref = results.get(SINGLE.key, {}).get("sps", {}).get("median")
        cores = cpu_count()
        for key, res in results.items():
            med = res.get("sps", {}).get("median")
            n = getattr(live.get(key), "num_envs", None)
            if ref and med and n:
                res["efficiency"] = med / (min(n, cores) * ref)
    finally:
        for key, env in list(live.items()):
            problem = safe_close(env)
            if problem and "error" not in results[key]:
                results[key]["error"] = f"close: {problem}"
    return results


def add_ratios(results: dict[str, dict], baseline: str = BASELINE) -> None:
    base = results.get(baseline, {}).get("sps", {}).get("median")
    for res in results.values():
        med = res.get("sps", {}).get("median")
        res["ratio_vs_" + baseline] = (med / base) if (med and base) else None


# -- output ----------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.0f}k"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def cell_text(res: dict, baseline: str = BASELINE) -> str:
    """``median [min-max] (ratio x)`` of one contender's result, or ERROR."""
    if "error" in res:
        return "ERROR"
    s = res.get("sps")
    if not s:
        return "-"
    ratio = res.get("ratio_vs_" + baseline)
    r = f" ({ratio:.1f}x)" if ratio is not None else ""
    return f"{fmt_rate(s['median'])} [{fmt_rate(s['min'])}-{fmt_rate(s['max'])}]{r}"


def exc_text(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    line = "  ".join(str(h).rjust(w) if i else str(h).ljust(w)
                     for i, (h, w) in enumerate(zip(headers, widths)))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(v).rjust(w) if i else str(v).ljust(w)
                             for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(out)
