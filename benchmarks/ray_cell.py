"""compare.py's Ray contender, measured in a process of its own for each cell.

Ray does not support a fork after ``ray.init``, and every other contender forks its
workers from the benchmark's process. Both ways round failed here: fastvec workers
forked from a process running Ray wedged Ray's GCS client within three cells
(``ray.nodes()`` never answered again), and workers forked after ``ray.shutdown()`` hung
in their start (``start_timeout``). So the Ray contender runs each cell in a fresh
process (``spawn``), next to ``AsyncVectorEnv(shared_memory=True)`` and the one-env
reference measured there, round-robin as in every cell: its ratio and efficiency are
against those, from the same process and minute, not against the main cell's.
"""

from __future__ import annotations

import multiprocessing
import os

from checkout import BENCH_DIR
from contenders import ASYNC_SHM, BASELINE, Contender
from machine import cpu_count
from measure import Timing, measure_cell
from report import add_ratios

try:  # the Ray backend joins when the [ray] extra is installed
    import ray
    from fastvec.ray import RayVectorEnv
except ImportError:
    ray = None

CELL_TIMEOUT_S = 1200.0  # bound on one cell's process (the wildfire's take a few minutes)


class RayContender(Contender):
    """fastvec.ray.RayVectorEnv on a local one-node Ray: one actor holding a FastVectorEnv
    with k=1 workers, i.e. fastvec k=1 plus Ray's actor call and object store per step.

    The classic calls only: an idle compiled-graph actor (``compiled=True``) spins a core,
    which every other contender of the cell, all alive at once, would pay for;
    benchmarks/ray_step.py measures the compiled path on its own."""

    def build(self, env_fns):
        if not ray.is_initialized():
            # Actors import the workloads module by name, as the fastvec workers do.
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(BENCH_DIR)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
            # Ray puts the driver's working directory on its workers' sys.path: from the
            # repository root that is the uncompiled source tree, which would shadow the
            # installed fastvec. Start Ray from this directory instead (no fastvec/ in it).
            here = os.getcwd()
            os.chdir(BENCH_DIR)
            try:
                ray.init(num_cpus=cpu_count(), log_to_driver=False,
                         include_dashboard=False, logging_level="error")
            finally:
                os.chdir(here)
        return RayVectorEnv(env_fns, envs_per_actor=len(env_fns))


RAY = RayContender("ray_1actor", "fastvec.ray, 1 local actor", "ray") if ray else None


def _cell_main(conn, workload, num_envs: int, timing: Timing, note: str) -> None:
    try:
        res = measure_cell(lambda: workload.env_fns(num_envs), [ASYNC_SHM, RAY], timing,
                           None, note, workload.min_steps, reference=True)
        add_ratios(res, BASELINE)
        out = dict(res[RAY.key])
        out["own_process"] = {"baseline_sps": res[BASELINE].get("sps"),
                              "baseline_error": res[BASELINE].get("error")}
        conn.send(out)
    finally:
        if ray.is_initialized():
            ray.shutdown()


def measure(workload, num_envs: int, timing: Timing, note: str) -> dict:
    """The Ray contender's result on one cell (``error`` when it failed or ran out of
    CELL_TIMEOUT_S), from a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_cell_main, args=(w, workload, num_envs, timing, note),
                    name="compare-ray-cell")
    p.start()
    w.close()
    try:
        if r.poll(CELL_TIMEOUT_S):
            return r.recv()
        return {"contender": RAY.key, "error": f"no result within {CELL_TIMEOUT_S:g} s"}
    except EOFError:
        p.join(5.0)
        return {"contender": RAY.key, "error": f"its process died (exit code {p.exitcode})"}
    finally:
        r.close()
        p.join(30.0)
        if p.is_alive():
            p.kill()
            p.join(5.0)
