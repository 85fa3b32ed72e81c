"""FastVectorEnv next to gymnasium's SyncVectorEnv and AsyncVectorEnv, then under faults.

    python benchmarks/compare.py              # default run: about 5 minutes on 2 cores
    python benchmarks/compare.py --quick      # CI: about a minute on 2 cores
    python benchmarks/compare.py --out DIR    # results elsewhere (default benchmarks/results)

Measured 2026-11-26 on a 2-core AMD EPYC VM (23.5 GiB, Python 3.11, numpy 1.26.4, with
pyretechnics), while another engineer's tests used about a third of its CPU: the default
run took 314 s (wildfire cells 230 s of it, no-op and 1 ms cells 63 s, survival ~20 s), and
--quick 40 s; on a quiet machine 268 s. Without pyretechnics the wildfire cells are
skipped: 76 s, and --quick 15 s. The resume part (below) came later: on 2026-12-02, with
others using about half of the CPU, --quick took 69 s, and 57 s without it (the script
before, run back to back). Each run prints its wall time ("this run took N s", from
loading this script to the end) and stores it as ``runtime_s`` in compare.json.

Throughput (env-steps/s) of each contender on each workload and number of envs:

* ``wildfire_64`` (and ``wildfire_64_mixed``, each env on its own landscape, and
  ``wildfire_128`` in the default run): ``fastvec.envs.WildfireEnv``, when pyretechnics is
  importable in this Python; skipped with the reason otherwise;
* ``noop_7x64x64_float32``: a no-op env with the wildfire's 64x64 observation: the
  transport cost alone;
* ``cpu_1ms``: about 1 ms of Python work per step: how well the cores are used.

Every env replays the same episode (seed 0, same actions); "one env in-process", measured
in every round of the same cell, is the reference for efficiency = env-steps/s /
(min(n, cores) x the median of its rate). Medians are over 3 repeats. The fastvec
contenders run the constructor's default, resume="auto" (the episode log kept). At the
largest number of envs, the episode log's steady-state cost is measured too:
resume="auto" next to resume="off" in interleaved repeats (resume_cost.py) on the first
wildfire size, the no-op env and the CPU-bound env, k=1 and k=4, 7 repeats (--quick: k=4,
the wildfire and the no-op env, 3 repeats). Then the survival run (survival.py): the same
injected faults against AsyncVectorEnv and FastVectorEnv with resume off and on, on the
no-op env (survival.py alone covers more workloads). Method: see measure.py (warm-up,
round-robin repeats, medians with min/max, ratios against AsyncVectorEnv(shared_memory=True)
from the same run; construction, reset and close are never timed). BLAS / OpenMP pools
are pinned to one thread per process (``OPENBLAS_NUM_THREADS=1`` etc., set before numpy
loads and inherited by the workers).

Writes ``compare.json``, ``compare.csv``, ``compare.png`` (and ``survival-logs/``) into the
output directory. Exits 1 when a contender failed unexpectedly (a throughput contender
raised, FastVectorEnv died under faults) or processes or /dev/shm names were left behind.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from blas_threads import pin_blas_threads

_LOADED = time.time()  # the run's wall time counts from here (see _process_start)

if __name__ == "__main__":
    # Before numpy loads (the imports below load it): otherwise each of N worker processes
    # may start a BLAS pool of one thread per core and oversubscribe the cores being
    # measured. Workers inherit the setting; see blas_threads.py.
    pin_blas_threads()

import ray_cell  # noqa: E402
import resume_cost  # noqa: E402
import survival  # noqa: E402
import workloads  # noqa: E402
from checkout import BENCH_DIR  # noqa: E402
from contenders import (ASYNC_PIPE, ASYNC_SHM, BASELINE, SINGLE, SYNC,  # noqa: E402
                        fast, fast_ready)
from machine import CpuMeter, busy_warning, facts_line, machine_facts  # noqa: E402
from measure import Progress, Timing, measure_cell  # noqa: E402
from processes import leftover_report  # noqa: E402
from report import add_ratios, cell_text, table, write_json  # noqa: E402

# SINGLE, one env in-process, is measured in every cell as the reference (see measure.py)
CONTENDERS = [SYNC, ASYNC_SHM, ASYNC_PIPE, fast(1), fast(4), fast_ready(2)]

if ray_cell.RAY is not None:  # the Ray contender, each cell in a process of its own
    CONTENDERS.append(ray_cell.RAY)
LOCAL = [c for c in CONTENDERS if c is not ray_cell.RAY]  # measured in this process


def plan(args) -> tuple[list[workloads.Workload], list[dict]]:
    """The workloads of this run, and those skipped (with why)."""
    chosen, skipped = [], []
    ok, why = workloads.wildfire_available()
    for size in args.wildfire_sizes:
        if ok:
            chosen.append(workloads.wildfire(size, min_steps=args.wildfire_steps))
            if not args.quick and size == args.wildfire_sizes[0]:
                # envs on different landscapes: step times differ between envs, as in training
                chosen.append(workloads.wildfire(size, min_steps=args.wildfire_steps, mixed=True))
        else:
            skipped.append({"workload": f"wildfire_{size}", "reason": why})
    chosen.append(workloads.noop((7, 64, 64), "float32"))
    chosen.append(workloads.cpu_bound(1.0))
    return chosen, skipped


def run(args) -> dict:
    timing = Timing(repeats=args.repeats, repeat_s=args.repeat_s, warmup_s=args.warmup_s)
    chosen, skipped = plan(args)
    for s in skipped:
        print(f"skipping {s['workload']}: {s['reason']}\n  (install the fire extra, "
              f"pip install \"fastvec[fire]\", to include it)", file=sys.stderr)
    kinds = args.faults
    # the episode log's cost at the largest number of envs: one wildfire (the first size,
    # one landscape), the no-op env, and (not in --quick) the CPU-bound env
    first_fire = f"wildfire_{args.wildfire_sizes[0]}"
    resume_cells = [(wl, max(args.num_envs), k) for wl in chosen for k in args.resume_ks
                    if (wl.name == first_fire or wl.name.startswith("noop")
                        or (wl.name.startswith("cpu") and not args.quick))]
    total = (len(chosen) * len(args.num_envs) * (len(CONTENDERS) + 1) * timing.repeats
             + resume_cost.samples(resume_cells, args.resume_repeats)
             + survival.attempts(["noop"], kinds))
    data: dict = {
        "machine": machine_facts(),
        "config": {"quick": args.quick, "num_envs": args.num_envs, "timing": vars(timing),
                   "contenders": [c.describe() for c in CONTENDERS], "baseline": BASELINE,
                   "reference": SINGLE.describe(),
                   "workloads": [w.describe() for w in chosen], "skipped": skipped,
                   "resume_cost": {"num_envs": max(args.num_envs), "envs_per_worker":
                                   args.resume_ks, "repeats": args.resume_repeats},
                   "survival": {"faults": kinds, "budget_s": args.survival_budget_s,
                                "period": args.survival_period, "num_envs": 4,
                                "workloads": ["noop"]}},
        "cells": [], "resume_cost": [], "survival": [],
    }
    progress = Progress(total, not args.no_progress, "compare")
    whole, meter = CpuMeter(), CpuMeter()
    try:
        for wl in chosen:
            for n in args.num_envs:
                t0 = time.monotonic()
                res = measure_cell(lambda: wl.env_fns(n), LOCAL, timing, progress,
                                   f"{wl.name} n={n}", wl.min_steps, reference=True)
                add_ratios(res, BASELINE)
                if ray_cell.RAY is not None:  # its ratio: against its own process's Async
                    res[ray_cell.RAY.key] = ray_cell.measure(wl, n, timing, f"{wl.name} n={n}")
                    progress.update(timing.repeats, f"{wl.name} n={n} ray")
                for c in [SINGLE] + CONTENDERS:
                    res[c.key]["workers"] = c.workers(n)
                data["cells"].append({"workload": wl.name, "num_envs": n, "results": res,
                                      "foreign_cpu_share": meter.foreign_share(),
                                      "elapsed_s": time.monotonic() - t0})
        data["resume_cost"] = resume_cost.run(resume_cells, timing, args.resume_repeats,
                                              progress)
        meter.foreign_share()  # restart: the resume cells measured their own
        if kinds:
            data["survival"] = survival.run(kinds, args.survival_budget_s,
                                            args.survival_period, 4, progress,
                                            os.path.join(args.out, "survival-logs"))
    finally:
        progress.close()
    data["machine"]["foreign_cpu_share"] = whole.foreign_share(restart=False)
    data["machine"]["foreign_cpu_share_max"] = max(
        [c["foreign_cpu_share"] for c in data["cells"] + data["resume_cost"]], default=0.0)
    data["leftovers"] = leftover_report()
    return data


def errors_of(data: dict) -> list[str]:
    errs = []
    for cell in data["cells"]:
        for key, res in cell["results"].items():
            if "error" in res:
                errs.append(f"{cell['workload']} n={cell['num_envs']} {key}: {res['error']}")
    errs += resume_cost.errors_of(data["resume_cost"])
    errs += survival.unexpected(data["survival"])
    left = data["leftovers"]
    if left["stray_processes"] or left["shm_leftovers"]:
        errs.append(f"leftovers: {left}")
    return errs


# -- output ----------------------------------------------------------------------------------------

def report(data: dict) -> str:
    m = data["machine"]
    out = [f"compare   {facts_line(m)}"]
    warn = busy_warning(m)
    if warn:
        out.append(warn)
    for s in data["config"]["skipped"]:
        out.append(f"skipped {s['workload']}: {s['reason']}")
    out.append(
        "env-steps/s: median [min-max] of repeats (x vs gym Async shm), then efficiency = "
        f"median / (min(n, {m['cores']} cores) x one env in-process), the reference measured "
        "in every round of the same cell (median of its samples). Every env replays the same "
        "episode (seed 0, same actions). On the no-op env a step in-process costs next to "
        "nothing, so efficiency there only restates the transport cost: it is in the JSON and "
        "CSV, not below.")
    for wl in dict.fromkeys(c["workload"] for c in data["cells"]):
        cells = [c for c in data["cells"] if c["workload"] == wl]
        show_eff = not wl.startswith("noop")
        rows = [[SINGLE.label + " (reference)"]
                + [cell_text(cell["results"][SINGLE.key]) for cell in cells]]
        for c in CONTENDERS:
            rows.append([c.label] + [cell_text(cell["results"][c.key], BASELINE, show_eff)
                                     for cell in cells])
        heads = [f"n={c['num_envs']}" + ("*" if c.get("foreign_cpu_share", 0) > 0.1 else "")
                 for c in cells]
        out += ["", wl, table(["contender"] + heads, rows)]
        busy = [f"n={c['num_envs']}: {100 * c['foreign_cpu_share']:.0f}%" for c in cells
                if c.get("foreign_cpu_share", 0) > 0.1]
        if busy:
            out.append(f"* other processes used this share of the CPU: {', '.join(busy)}")
    if data["resume_cost"]:
        out += ["", resume_cost.report(data["resume_cost"])]
    if data["survival"]:
        out += ["", survival.report(data["survival"])]
    return "\n".join(out)


CSV_FIELDS = ["workload", "num_envs", "contender", "label", "envs_per_worker", "copy",
              "workers", "median_sps", "min_sps", "max_sps", "repeats", "steps_per_repeat",
              "ratio_vs_" + BASELINE, "efficiency", "efficiency_cores", "reference_median_sps",
              "error"]


def write_csv(path: Path, data: dict) -> None:
    """One row per contender and cell; the reference's row has key ``single``."""
    labels = {c.key: c for c in [SINGLE] + CONTENDERS}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for cell in data["cells"]:
            ref = cell["results"].get(SINGLE.key, {}).get("sps", {}).get("median")
            for key, res in cell["results"].items():
                c = labels[key]
                s = res.get("sps", {})
                w.writerow({
                    "workload": cell["workload"], "num_envs": cell["num_envs"],
                    "contender": key, "label": c.label,
                    "envs_per_worker": c.kwargs.get("envs_per_worker", ""),
                    "copy": c.kwargs.get("copy", True), "workers": res.get("workers"),
                    "median_sps": s.get("median"), "min_sps": s.get("min"),
                    "max_sps": s.get("max"), "repeats": len(s.get("values", [])),
                    "steps_per_repeat": res.get("steps_per_repeat"),
                    "ratio_vs_" + BASELINE: res.get("ratio_vs_" + BASELINE),
                    "efficiency": res.get("efficiency"),
                    "efficiency_cores": res.get("efficiency_cores"),
                    "reference_median_sps": ref, "error": res.get("error", ""),
                })


def write_plot(path: Path, data: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot: {exc}"
    wls = list(dict.fromkeys(c["workload"] for c in data["cells"]))
    if not wls:
        return "no plot: no results"
    fig, axes = plt.subplots(2, len(wls), figsize=(4.2 * len(wls), 7), squeeze=False)
    for j, wl in enumerate(wls):
        cells = [c for c in data["cells"] if c["workload"] == wl]
        top, bottom = axes[0][j], axes[1][j]
        if not wl.startswith("noop"):  # the ideal: min(n, cores) x one env in-process
            pts = [(cell["num_envs"], min(cell["num_envs"], data["machine"]["cores"])
                    * cell["results"][SINGLE.key]["sps"]["median"])
                   for cell in cells if cell["results"][SINGLE.key].get("sps")]
            if pts:
                top.plot(*zip(*pts), color="grey", ls=":", label="ideal (cores x one env)")
        for c in CONTENDERS:
            xs, med, lo, hi, ratio = [], [], [], [], []
            for cell in cells:
                res = cell["results"][c.key]
                s = res.get("sps")
                if not s:
                    continue
                xs.append(cell["num_envs"])
                med.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
                ratio.append(res.get("ratio_vs_" + BASELINE))
            if not xs:
                continue
            style = "-" if c.kind == "fast" else "--"
            top.errorbar(xs, med, yerr=[lo, hi], label=c.label, marker="o", ls=style,
                         capsize=3)
            bottom.plot(xs, ratio, label=c.label, marker="o", ls=style)
        top.set_title(wl)
        top.set_yscale("log")
        top.set_ylabel("env-steps/s (median, min-max)")
        bottom.axhline(1.0, color="grey", lw=0.8)
        bottom.set_ylim(bottom=0)
        bottom.set_ylabel("x gym Async shm")
        for ax in (top, bottom):
            ax.set_xlabel("num_envs")
            ax.set_xticks(sorted({c["num_envs"] for c in cells}))
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = data["machine"]
    fig.suptitle(f"fastvec {m['fastvec']} vs gymnasium {m['gymnasium']}: {m['cores']} cores "
                 f"({m['cpu_model']}), Python {m['python']}, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CI run: fewer sizes, short repeats, short survival run")
    p.add_argument("--out", default=str(BENCH_DIR / "results"),
                   help="output directory (default: benchmarks/results)")
    p.add_argument("--num-envs", type=_ints, help="comma-separated (default 2,4,8; quick 2,8)")
    p.add_argument("--wildfire-sizes", type=_ints,
                   help="grid sizes of the wildfire env (default 64,128; quick 64)")
    p.add_argument("--wildfire-steps", type=int,
                   help="vector steps per timed repeat on the wildfire, at least "
                        "(default 100, a whole episode; quick 15)")
    p.add_argument("--repeats", type=int, help="timed repeats per contender (default 3)")
    p.add_argument("--repeat-s", type=float, help="seconds per repeat (default 0.5)")
    p.add_argument("--warmup-s", type=float, help="seconds of warm-up (default 0.3)")
    p.add_argument("--faults", type=lambda s: [x for x in s.split(",") if x],
                   help=f"survival fault kinds, from {','.join(workloads.FAULT_KINDS)}; "
                        "empty to skip (default all; quick segfault,sigkill)")
    p.add_argument("--survival-budget-s", type=float, help="seconds per survival attempt")
    p.add_argument("--survival-period", type=int, default=500,
                   help="steps of the faulty env between faults (default 500)")
    p.add_argument("--resume-ks", type=_ints,
                   help="envs per worker of the resume on/off pairs (default 1,4; quick 4)")
    p.add_argument("--resume-repeats", type=int,
                   help="interleaved repeats of each resume on/off pair (default 7, quick 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    q = args.quick
    args.num_envs = args.num_envs or ([2, 8] if q else [2, 4, 8])
    args.wildfire_sizes = args.wildfire_sizes or ([64] if q else [64, 128])
    args.wildfire_steps = args.wildfire_steps or (15 if q else 100)
    args.repeats = args.repeats or 3
    args.repeat_s = args.repeat_s or (0.12 if q else 0.5)
    args.warmup_s = args.warmup_s or (0.08 if q else 0.3)
    args.resume_ks = args.resume_ks or ([4] if q else [1, 4])
    args.resume_repeats = args.resume_repeats or (3 if q else 7)
    if args.faults is None:
        args.faults = list(survival.QUICK_KINDS if q else workloads.FAULT_KINDS)
    bad = set(args.faults) - set(workloads.FAULT_KINDS)
    if bad:
        p.error(f"unknown fault kinds {sorted(bad)}")
    args.survival_budget_s = args.survival_budget_s or (1.5 if q else 3.0)

    data = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", data)
    plot_problem = write_plot(out / "compare.png", data)
    # The run's real wall time: from the interpreter's start when run as a script.
    data["runtime_s"] = time.time() - (_process_start() if __name__ == "__main__" else started)
    write_json(out / "compare.json", data)
    print(report(data))
    errs = errors_of(data)
    for e in errs:
        print(f"ERROR: {e}", file=sys.stderr)
    print(f"\nwrote {out / 'compare.json'}, compare.csv"
          f"{', compare.png' if not plot_problem else ' (' + plot_problem + ')'}\n"
          f"this run took {data['runtime_s']:.0f} s")
    return 1 if errs else 0


def _process_start() -> float:
    # When this script was loaded, not when its process began: a shell that runs
    # `pip install ... && python benchmarks/compare.py` may exec python in its own process,
    # whose start time would then count the install too.
    return _LOADED


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


if __name__ == "__main__":
    sys.exit(main())
