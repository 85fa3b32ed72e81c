"""Transport micro-benchmark: what a vectorizer costs when the env itself costs nothing.

    python benchmarks/transport.py            # full run: about 2 minutes on 2 cores
    python benchmarks/transport.py --quick    # short repeats, fewer sizes: 20-30 s

(Measured 2026-11-26 on a 2-core AMD EPYC VM, Python 3.11, shared with other work: 126 s
and 29 s with PufferLib installed, 19 s for --quick without it.)

Five parts, all measured in one run so their ratios compare like with like:

1. no-op env (obs (4,) float32, 4x128x128 uint8, 8x128x128 float32) at 2, 8 and 16 envs:
   env-steps/s of gymnasium Sync, Async (shared memory / pipes) and FastVectorEnv
   (k = envs_per_worker 1, 4, 4 with copy=False, and 8 with copy=False: one worker for
   all 8 envs); ratio vs Async(shared memory).
   FastVectorEnv k=1 at 16 envs runs 16 workers on the machine's cores: a vectorizer that
   busy-waits collapses there; one that blocks does not.
2. CPU-bound env (about 1 ms of Python per step) at 8 envs: efficiency =
   throughput / (cores x rate of one env stepped in this process), that env measured in
   every round of the same cell (as compare.py does; see measure.py).
3. single-env round trip: median wall time of one step() with one env, next to a bare
   posix_ipc semaphore ping-pong between two processes (the floor of one request and one
   reply), measured alternately in the same run.
4. the episode log's steady-state cost (resume_cost.py): FastVectorEnv resume="auto" next
   to resume="off", k=1 and k=4, at 8 no-op envs (obs (4,) float32 and 4x128x128 uint8),
   repeats interleaved (``--resume-repeats``): env-steps/s, ratio on/off, and the parent's
   CPU time per vector step. The fastvec rows of parts 1-3 run the constructor's default,
   resume="auto" (the episode log kept).
5. peers, where installed: PufferLib's Multiprocessing vectorizer with 1 and with 2
   workers next to Async(shm) and fastvec k=1 / k=4, at 8 no-op envs (4x128x128 uint8;
   also obs (4,) in the full run). Its workers busy-wait, so every PufferLib step has a
   deadline and every repeat a time budget (``--puffer-budget-s``): one that runs over is
   shown with its timeout and measured rate, never hangs the run (see puffer.py). Without
   pufferlib the part is skipped with the import error.

Ratios and efficiencies are reported as measured: targets belong to the issue that sets
them, not to this script. Results: console tables and ``<out>/transport.json``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import sys
import time
from pathlib import Path

from blas_threads import pin_blas_threads

_LOADED = time.time()  # the run's wall time counts from here (see compare._process_start)

if __name__ == "__main__":
    # Before numpy loads (the imports below load it): otherwise each of N worker processes
    # may start a BLAS pool of one thread per core and oversubscribe the cores being
    # measured. Workers inherit the setting; see blas_threads.py.
    pin_blas_threads()

import numpy as np  # noqa: E402
import posix_ipc  # noqa: E402
import psutil  # noqa: E402

import puffer  # noqa: E402
import resume_cost  # noqa: E402
import workloads  # noqa: E402
from checkout import BENCH_DIR  # noqa: E402
from contenders import ASYNC_PIPE, ASYNC_SHM, BASELINE, SINGLE, SYNC, fast  # noqa: E402
from machine import CpuMeter, busy_warning, cpu_count, facts_line, machine_facts  # noqa: E402
from measure import Progress, Timing, measure_cell, step_latencies_ns, summary  # noqa: E402
from processes import leftover_report, safe_close, worker_pids  # noqa: E402
from report import (add_ratios, cell_text, exc_text, fmt_rate, fmt_share, table,  # noqa: E402
                    write_json)

SHAPES = (((4,), "float32"), ((4, 128, 128), "uint8"), ((8, 128, 128), "float32"))
# fast(8, copy=False): at 8 envs one worker steps them all (PufferLib's best placement here)
CONTENDERS = [SYNC, ASYNC_SHM, ASYNC_PIPE, fast(1), fast(4), fast(4, copy=False),
              fast(8, copy=False)]
# PufferLib next to the others on the no-op env at 8 envs, with 1 worker and with 2 (its
# workers busy-wait: with as many workers as cores, the parent's spin is one too many)
PEER_SHAPES = (((4,), "float32"), ((4, 128, 128), "uint8"))
PEER_NUM_ENVS = 8
PEER_WORKERS = (1, 2)
# the episode log's cost (resume on vs off) where it is most visible: the no-op env
RESUME_SHAPES = (((4,), "float32"), ((4, 128, 128), "uint8"))
RESUME_NUM_ENVS = 8
RESUME_KS = (1, 4)


# -- the semaphore ping-pong floor --------------------------------------------------------------

def _pong(ping_name: str, pong_name: str, stop) -> None:
    ping, pong = posix_ipc.Semaphore(ping_name), posix_ipc.Semaphore(pong_name)
    try:
        while True:
            ping.acquire(5.0)  # a parent that vanished leaves us here at most 5 s
            if stop.value:
                return
            pong.release()
    except posix_ipc.BusyError:
        return
    finally:
        ping.close()
        pong.close()


class SemPingPong:
    """Two processes, two semaphores: ``step()`` posts one and waits for the other."""

    num_envs = 1

    def __init__(self):
        ctx = multiprocessing.get_context()
        base = f"/fvbench{os.getpid()}_{secrets.token_hex(4)}_"
        self.names = (base + "ping", base + "pong")
        self.ping = posix_ipc.Semaphore(self.names[0], posix_ipc.O_CREX)
        try:
            self.pong = posix_ipc.Semaphore(self.names[1], posix_ipc.O_CREX)
        except BaseException:
            self.ping.unlink()
            self.ping.close()
            raise
        self.stop = ctx.RawValue("b", 0)
        self.proc = ctx.Process(target=_pong, args=(*self.names, self.stop), daemon=True,
                                name="bench-pong")
        self.proc.start()

    def reset(self, seed=None):
        return None, {}

    def step(self, _action):
        self.ping.release()
        self.pong.acquire(10.0)

    def close(self, terminate: bool = False):
        if self.proc is not None:
            self.stop.value = 1
            self.ping.release()
            self.proc.join(5.0)
            if self.proc.exitcode is None:
                self.proc.kill()
                self.proc.join(5.0)
            self.proc = None
        for sem in (self.ping, self.pong):
            try:
                sem.unlink()
            except posix_ipc.ExistentialError:
                pass
            sem.close()


def _pin(pid: int, cpus: set[int]) -> None:
    """Pin every thread of process ``pid`` to ``cpus``."""
    for t in psutil.Process(pid).threads():
        try:
            os.sched_setaffinity(t.id, cpus)
        except OSError:  # a thread that just ended
            pass


def placements() -> list[tuple[str, set | None, set | None]]:
    """(name, parent cpus, child cpus): as the scheduler likes, one core, two cores."""
    cpus = sorted(os.sched_getaffinity(0))
    out: list = [("unpinned", None, None)]
    if len(cpus) >= 1:
        out.append(("same core", {cpus[0]}, {cpus[0]}))
    if len(cpus) >= 2:
        out.append(("cross core", {cpus[0]}, {cpus[1]}))
    return out


def measure_latency(repeats: int, steps: int, progress: Progress) -> dict:
    """Median single-step round trip (µs) of one env per contender, and of the ping-pong.

    Waking a process on another core costs far more than on the same core in a VM, so the
    round trip is measured in three placements: unpinned, parent and worker pinned to one
    core, and to two different cores; ratios compare like with like.
    """
    wl = workloads.noop((4,), "float32")
    contenders = {c.key: c for c in (SYNC, ASYNC_SHM, ASYNC_PIPE, fast(1))}
    live: dict = {}
    out: dict = {"errors": {}}
    all_cpus = os.sched_getaffinity(0)
    try:
        try:
            live["sem_pingpong"] = SemPingPong()
        except Exception as exc:  # noqa: BLE001
            out["errors"]["sem_pingpong"] = exc_text(exc)
        for key, c in contenders.items():
            try:
                env = live[key] = c.build(wl.env_fns(1))
                env.reset(seed=0)
            except Exception as exc:  # noqa: BLE001
                out["errors"][key] = exc_text(exc)
                if key in live:
                    safe_close(live.pop(key), terminate=True)
        kids = {k: ({env.proc.pid} if isinstance(env, SemPingPong) else worker_pids(env))
                for k, env in live.items()}
        actions = [np.zeros(1, np.int64)]
        order = list(live)
        for name, parent_cpus, child_cpus in placements():
            os.sched_setaffinity(0, parent_cpus or all_cpus)
            for pids in kids.values():
                for pid in pids:
                    _pin(pid, child_cpus or all_cpus)
            for env in live.values():  # warm-up in this placement
                step_latencies_ns(env, actions, max(100, steps // 5))
            samples: dict = {k: [] for k in order}
            for r in range(repeats):
                for key in order[r % len(order):] + order[:r % len(order)]:
                    lat = step_latencies_ns(live[key], actions, steps)
                    samples[key].append(float(np.median(lat)) / 1e3)
                    progress.update(1, f"latency {name}")
            out[name] = {key: summary(vals) for key, vals in samples.items()}
    finally:
        os.sched_setaffinity(0, all_cpus)
        for env in live.values():
            safe_close(env)
    return out


def _ceiling_worker(wl, seconds, conn) -> None:
    conn.send(workloads.single_env_rate(wl, seconds))
    conn.close()


def parallel_ceiling(wl, procs: int, seconds: float) -> float:
    """Steps/s of ``procs`` processes each stepping one env directly, all at once."""
    ctx = multiprocessing.get_context()
    pipes, ps = [], []
    for _ in range(procs):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_ceiling_worker, args=(wl, seconds, w), daemon=True)
        p.start()
        w.close()
        pipes.append(r)
        ps.append(p)
    try:
        rates = []
        for r in pipes:
            if not r.poll(seconds + 30):  # every wait has a deadline
                raise TimeoutError(f"a ceiling process did not report within {seconds + 30:g} s")
            rates.append(r.recv())
        return sum(rates)
    finally:
        for p in ps:
            p.join(10)
            if p.exitcode is None:
                p.kill()
                p.join()


# -- the run ---------------------------------------------------------------------------------------

def run(args) -> dict:
    cores = cpu_count()
    timing = Timing(repeats=args.repeats, repeat_s=args.repeat_s, warmup_s=args.warmup_s)
    nums = args.num_envs
    lat_reps, lat_steps = (3, 300) if args.quick else (5, 1000)
    peer_shapes = PEER_SHAPES[1:] if args.quick else PEER_SHAPES
    have_puffer, puffer_note = puffer.available() if args.peers else (False, "--no-peers")
    peers = ([ASYNC_SHM, fast(1), fast(4)]
             + [puffer.puffer(w, args.puffer_budget_s) for w in PEER_WORKERS]
             if have_puffer else [])
    resume_cells = [(workloads.noop(shape, dtype), RESUME_NUM_ENVS, k)
                    for shape, dtype in RESUME_SHAPES for k in RESUME_KS]
    total = (len(SHAPES) * len(nums) * len(CONTENDERS) * timing.repeats
             + (len(CONTENDERS) + 1) * timing.repeats + 5 * lat_reps * len(placements())
             + resume_cost.samples(resume_cells, args.resume_repeats)
             + len(peer_shapes) * len(peers) * timing.repeats)
    progress = Progress(total, not args.no_progress, "transport")
    data: dict = {"machine": machine_facts(),
                  "config": {"quick": args.quick, "num_envs": nums, "timing": vars(timing),
                             "contenders": [c.describe() for c in CONTENDERS],
                             "baseline": BASELINE, "reference": SINGLE.describe()},
                  "noop": [], "cpu_bound": {}, "latency": {}, "resume_cost": [],
                  "peers": {"pufferlib": puffer_note if not have_puffer else None,
                            "pufferlib_version": puffer_note if have_puffer else None,
                            "contenders": [c.describe() for c in peers], "cells": []}}
    if not have_puffer:
        print(f"PufferLib left out: {puffer_note}", file=sys.stderr)
    whole, meter = CpuMeter(), CpuMeter()
    shares = []
    try:
        for shape, dtype in SHAPES:
            wl = workloads.noop(shape, dtype)
            for n in nums:
                res = measure_cell(lambda: wl.env_fns(n), CONTENDERS, timing, progress,
                                   f"{wl.name} n={n}", reference=False)
                add_ratios(res, BASELINE)
                for c in CONTENDERS:
                    res[c.key]["workers"] = c.workers(n)
                shares.append(meter.foreign_share())
                data["noop"].append({"workload": wl.describe(), "num_envs": n, "results": res,
                                     "foreign_cpu_share": shares[-1]})

        cpu = workloads.cpu_bound(1.0)
        ceiling = parallel_ceiling(cpu, cores, 0.5 if args.quick else 1.0)
        n = 8
        res = measure_cell(lambda: cpu.env_fns(n), CONTENDERS, timing, progress, "cpu n=8",
                           reference=True)
        add_ratios(res, BASELINE)
        for c in CONTENDERS:
            med = res[c.key].get("sps", {}).get("median")
            res[c.key]["workers"] = c.workers(n)
            res[c.key]["vs_parallel_ceiling"] = med / ceiling if med else None
        shares.append(meter.foreign_share())
        data["cpu_bound"] = {"workload": cpu.describe(), "num_envs": n, "cores": cores,
                             "single_env_rate": res[SINGLE.key].get("sps", {}).get("median"),
                             "parallel_ceiling": ceiling, "results": res,
                             "foreign_cpu_share": shares[-1]}

        data["latency"] = measure_latency(lat_reps, lat_steps, progress)
        shares.append(meter.foreign_share())
        data["latency_foreign_cpu_share"] = shares[-1]

        data["resume_cost"] = resume_cost.run(resume_cells, timing, args.resume_repeats,
                                              progress)
        shares += [c["foreign_cpu_share"] for c in data["resume_cost"]]
        meter.foreign_share()  # restart: the resume cells measured their own

        # Last: importing pufferlib imports torch into this process.
        for shape, dtype in peer_shapes if peers else ():
            wl = workloads.noop(shape, dtype)
            n = PEER_NUM_ENVS
            # Each contender's repeat is sized from its own warm-up: PufferLib with as many
            # workers as cores may run 100x slower than the rest, and equal step counts
            # would leave the fast ones a millisecond to be timed in.
            res = measure_cell(lambda: wl.env_fns(n), peers, timing, progress,
                               f"peers {wl.name} n={n}", reference=False, equal_steps=False)
            add_ratios(res, BASELINE)
            for c in peers:
                res[c.key]["workers"] = c.workers(n)
            shares.append(meter.foreign_share())
            data["peers"]["cells"].append({"workload": wl.describe(), "num_envs": n,
                                           "results": res, "foreign_cpu_share": shares[-1]})
    finally:
        progress.close()
    data["machine"]["foreign_cpu_share"] = whole.foreign_share(restart=False)
    data["machine"]["foreign_cpu_share_max"] = max(shares, default=0.0)
    data["leftovers"] = leftover_report()
    data["leftovers"]["bench_semaphores"] = [
        n for n in os.listdir("/dev/shm") if n.startswith(f"sem.fvbench{os.getpid()}_")]
    return data


def errors_of(data: dict) -> list[str]:
    """Failures of fastvec or gymnasium contenders, and leftovers. A PufferLib contender's
    failure (a timeout, most likely) is its result, shown in the table, not an error here."""
    errs = []
    cells = [("", c) for c in data["noop"]] + [("peers ", c) for c in data["peers"]["cells"]]
    for prefix, cell in cells:
        for key, res in cell["results"].items():
            if "error" in res and not key.startswith("puffer"):
                errs.append(f"{prefix}{cell['workload']['name']} n={cell['num_envs']} {key}: "
                            f"{res['error']}")
    for key, res in data["cpu_bound"].get("results", {}).items():
        if "error" in res:
            errs.append(f"cpu n=8 {key}: {res['error']}")
    for key, err in data["latency"].get("errors", {}).items():
        errs.append(f"latency {key}: {err}")
    errs += resume_cost.errors_of(data["resume_cost"])
    left = data["leftovers"]
    if left["stray_processes"] or left["shm_leftovers"] or left["bench_semaphores"]:
        errs.append(f"leftovers: {left}")
    return errs


def _busy_mark(cell: dict) -> str:
    return "*" if cell.get("foreign_cpu_share", 0) > 0.1 else ""


def report(data: dict) -> str:
    out = [f"transport benchmark   {facts_line(data['machine'])}"]
    warn = busy_warning(data["machine"])
    if warn:
        out.append(warn)
    out.append("")
    labels = {c.key: c.label for c in CONTENDERS}
    out.append("no-op env, env-steps/s: median [min-max] (x vs Async shm)")
    for shape, dtype in SHAPES:
        cells = [c for c in data["noop"]
                 if tuple(c["workload"]["kwargs"]["obs_shape"]) == shape]
        if not cells:
            continue
        name = cells[0]["workload"]["name"]
        rows = [[labels[c.key]] + [cell_text(cell["results"][c.key], BASELINE)
                                   for cell in cells] for c in CONTENDERS]
        heads = [f"n={c['num_envs']}{_busy_mark(c)}" for c in cells]
        out += ["", name, table(["contender"] + heads, rows)]

    big = [c for c in data["noop"]
           if tuple(c["workload"]["kwargs"]["obs_shape"]) == SHAPES[-1][0]]
    if big:
        out += ["", f"{big[0]['workload']['name']}: minor page faults of the parent process "
                    "per vector step (fresh memory touched on every step; slow in a VM)"]
        rows = []
        for c in CONTENDERS:
            row = [labels[c.key]]
            for cell in big:
                f = cell["results"][c.key].get("parent_minor_faults_per_step")
                row.append("-" if f is None else f"{f:.1f}")
            rows.append(row)
        out.append(table(["contender"] + [f"n={c['num_envs']}" for c in big], rows))

    nums = sorted({c["num_envs"] for c in data["noop"]})
    cores = data["machine"]["cores"]
    if len(nums) > 1:
        lo, hi = nums[0], nums[-1]
        out += ["", f"more workers than cores: fastvec k=1 with {hi} workers vs {lo} workers on "
                    f"{cores} cores (a design that busy-waits collapses ~100x there; on the (4,) "
                    "obs a step is nothing but wake-ups):"]
        for cell_lo in [c for c in data["noop"] if c["num_envs"] == lo]:
            name = cell_lo["workload"]["name"]
            cell_hi = next(c for c in data["noop"]
                           if c["num_envs"] == hi and c["workload"]["name"] == name)
            a = cell_lo["results"]["fast_k1"].get("sps", {}).get("median")
            b = cell_hi["results"]["fast_k1"].get("sps", {}).get("median")
            if a and b:
                out.append(f"  {name}: {fmt_rate(a)} -> {fmt_rate(b)} env-steps/s "
                           f"({b / a:.2f}x)")

    cpu = data["cpu_bound"]
    if cpu:
        ref = cpu["results"].get(SINGLE.key, {})
        rate = cpu["single_env_rate"] or 0
        out += ["", f"CPU-bound env ({cpu['workload']['kwargs']['ms']:g} ms/step, "
                    f"{cpu['workload']['kwargs']['iters']} iterations), {cpu['num_envs']} envs, "
                    f"{cpu['cores']} cores. One env in-process, measured in every round: "
                    f"{cell_text(ref)} steps/s, so {min(cpu['num_envs'], cpu['cores'])} x its "
                    f"median = {min(cpu['num_envs'], cpu['cores']) * rate:.0f}; {cpu['cores']} "
                    f"processes stepping one env each, measured once before the rounds: "
                    f"{cpu['parallel_ceiling']:.0f}"]
        rows = []
        for c in CONTENDERS:
            res = cpu["results"][c.key]
            vs = res.get("vs_parallel_ceiling")
            rows.append([labels[c.key], cell_text(res, BASELINE),
                         fmt_share(res.get("efficiency")), fmt_share(vs)])
        out.append(table(["contender", "env-steps/s", "efficiency", "of measured ceiling"],
                         rows))
        if cpu.get("foreign_cpu_share", 0) > 0.1:
            out.append(f"* other processes used {100 * cpu['foreign_cpu_share']:.0f}% of the "
                       "CPU during this part")

    lat = data["latency"]
    names = [name for name, _, _ in placements() if name in lat]
    if names:
        out += ["", "single-env round trip, median µs of one step(), median of repeats "
                    "(x ping-pong in the same placement); same/cross core: parent and "
                    "worker pinned to one core / to two cores"]
        rows = []
        for key, label in (("sem_pingpong", "posix_ipc semaphore ping-pong"),
                           ("sync", "gym Sync (no IPC)"), ("async_shm", "gym Async shm"),
                           ("async_pipe", "gym Async pipe"), ("fast_k1", "fastvec k=1")):
            row = [label]
            for name in names:
                s = lat[name].get(key)
                pp = lat[name].get("sem_pingpong", {}).get("median")
                if not s:
                    row.append(lat.get("errors", {}).get(key, "-"))
                    continue
                rel = f" ({s['median'] / pp:.1f}x)" if pp else ""
                row.append(f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]{rel}")
            rows.append(row)
        out.append(table(["µs"] + names, rows))
        if data.get("latency_foreign_cpu_share", 0) > 0.1:
            out.append(f"* other processes used {100 * data['latency_foreign_cpu_share']:.0f}% "
                       "of the CPU during this part")
        for name in names:
            f = lat[name].get("fast_k1", {}).get("median")
            pp = lat[name].get("sem_pingpong", {}).get("median")
            if f and pp:
                out.append(f"{name}: fastvec k=1 round trip / (2 x ping-pong) = {f / (2 * pp):.2f}")

    if data.get("resume_cost"):
        out += ["", resume_cost.report(data["resume_cost"])]

    peers = data["peers"]
    out += [""]
    if not peers["cells"]:
        out.append(f"PufferLib Multiprocessing: left out ({peers['pufferlib']})")
    else:
        plabels = {c["key"]: c["label"] for c in peers["contenders"]}
        cells = peers["cells"]
        out.append(f"peers at {cells[0]['num_envs']} envs, pufferlib "
                   f"{peers['pufferlib_version']}: env-steps/s, median [min-max] (x vs Async "
                   "shm); each contender's repeat sized to its own speed; a PufferLib repeat "
                   "or step over its time bound is shown as its error")
        rows = []
        for key, label in plabels.items():
            row = [label]
            for cell in cells:
                res = cell["results"][key]
                row.append(res["error"].split(": ", 1)[-1][:90] if "error" in res
                           else cell_text(res, BASELINE))
            rows.append(row)
        out.append(table(["contender"] + [f"{c['workload']['name']}{_busy_mark(c)}"
                                          for c in cells], rows))
    return "\n".join(out)


def main(argv=None) -> int:
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short repeats, 2 and 16 envs only")
    p.add_argument("--out", default=str(BENCH_DIR / "results"),
                   help="output directory (default: benchmarks/results)")
    p.add_argument("--repeats", type=int, help="timed repeats per contender")
    p.add_argument("--repeat-s", type=float, help="seconds per timed repeat")
    p.add_argument("--warmup-s", type=float, help="seconds of warm-up per contender")
    p.add_argument("--num-envs", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated env counts (default 2,8,16)")
    p.add_argument("--no-peers", dest="peers", action="store_false",
                   help="leave out PufferLib even where it is installed")
    p.add_argument("--puffer-budget-s", type=float,
                   help="hard bound on one PufferLib repeat, seconds (default 10, quick 5)")
    p.add_argument("--resume-repeats", type=int,
                   help="interleaved repeats of resume on / off (default 9, quick 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    quick = args.quick
    args.resume_repeats = args.resume_repeats or (5 if quick else 9)
    args.repeats = args.repeats or (3 if quick else 5)
    args.repeat_s = args.repeat_s or (0.12 if quick else 0.4)
    args.warmup_s = args.warmup_s or (0.1 if quick else 0.3)
    args.num_envs = args.num_envs or ([2, 16] if quick else [2, 8, 16])
    args.puffer_budget_s = args.puffer_budget_s or (5.0 if quick else 10.0)

    data = run(args)
    # The run's real wall time: from the interpreter's start when run as a script.
    start = _LOADED if __name__ == "__main__" else started  # not the process's start: see compare.py
    data["runtime_s"] = time.time() - start
    out = Path(args.out) / "transport.json"
    write_json(out, data)
    print(report(data))
    errs = errors_of(data)
    for e in errs:
        print(f"ERROR: {e}", file=sys.stderr)
    print(f"\nwrote {out}\nthis run took {data['runtime_s']:.0f} s")
    return 1 if errs else 0


if __name__ == "__main__":
    sys.exit(main())
