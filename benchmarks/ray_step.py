"""What a Ray step costs: a local FastVectorEnv, RayVectorEnv on classic actor calls and
RayVectorEnv on Ray's Compiled Graphs, over the same envs, in one run, rounds interleaved.

    python benchmarks/ray_step.py [--cluster] [--wildfire] [--slow-node] [--rounds 15] [--json]

Run it from outside the source tree with the package installed, or with PYTHONPATH set to
a built checkout (Ray's workers inherit the environment). ``--cluster``: Ray's multi-node
test cluster (``ray.cluster_utils.Cluster``, three raylets with one CPU each on this
machine), one actor per raylet; else ``ray.init`` on this machine, one actor.

Workloads: CartPole-v1, 4 envs (the time per vector step: a median over every step of
every round); with ``--wildfire`` also fastvec's wildfire 64x64, 8 envs (throughput in
env-steps/s per round, each round the same episode from ``reset(seed=0)`` with the same
actions, median over rounds). All three contenders exist at once and take turns, in an
order that rotates each round, so a machine's drift hits them alike. Reported: medians,
the ratios to the local env, and the per-step overhead (median Ray step - median local).

With ``--slow-node`` (instead of the above): one slow actor among fast ones, the stall of
a slow node. Four actors of one env each, CartPole paced by a sleep, one env 10x slower than
the three others (``PACE``); the fast envs' env-steps/s through lockstep ``step()`` (every
step waits for the slow one) and through first-ready ``send``/``recv`` (``batch_size=1``:
each env is sent again as soon as it is received), on classic actor calls and on compiled
graphs. The compiled env's idle actors spin (below), so the two envs do not live at once:
blocks of rounds alternate classic, compiled, classic, compiled; lockstep and send/recv
alternate inside each block. Medians over rounds, ratios to classic lockstep.

Caveat: an idle compiled-graph actor spins a core while it waits for its next input (Ray
2.60), so on a small machine the compiled contender also slows the two others while they
take their turns; the ratios then flatter it a little.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import gymnasium as gym
import numpy as np

CONTENDERS = ("local", "classic", "compiled")


def make_envs(fns, nodes: int, **kwargs) -> dict:
    from fastvec import FastVectorEnv
    from fastvec.ray import RayVectorEnv

    placement = [{f"node{i}": 0.01} for i in range(nodes)] if nodes > 1 else None
    envs = {"local": FastVectorEnv(fns, **kwargs)}
    for name in ("classic", "compiled"):
        envs[name] = RayVectorEnv(fns, placement=placement, compiled=name == "compiled",
                                  actor_timeout=120.0, **kwargs)
    return envs


def time_steps(env, actions: np.ndarray, seed: int | None) -> list[float]:
    """Seconds per vector step, one per row of ``actions`` (after ``reset(seed)`` if not None)."""
    if seed is not None:
        env.reset(seed=seed)
    out = []
    for a in actions:
        t = time.perf_counter()
        env.step(a)
        out.append(time.perf_counter() - t)
    return out


def run_workload(name: str, fns, nodes: int, rounds: int, steps: int, per_round: bool,
                 **kwargs) -> dict:
    envs = make_envs(fns, nodes, **kwargs)
    n = len(fns)
    try:
        space = envs["local"].action_space
        space.seed(0)
        actions = np.stack([space.sample() for _ in range(steps)])
        for env in envs.values():  # warm up (and compile the graphs), untimed
            env.reset(seed=0)
            time_steps(env, actions[: min(20, steps)], None)
        samples = {c: [] for c in CONTENDERS}
        for r in range(rounds):
            order = CONTENDERS[r % 3:] + CONTENDERS[:r % 3]
            for c in order:
                ts = time_steps(envs[c], actions, 0 if per_round else None)
                if per_round:
                    samples[c].append(n * len(ts) / sum(ts))  # env-steps/s
                else:
                    samples[c].extend(ts)
        med = {c: statistics.median(samples[c]) for c in CONTENDERS}
        out = {"workload": name, "num_envs": n, "nodes": nodes, "rounds": rounds,
               "steps": steps, "kwargs": {k: str(v) for k, v in kwargs.items()}}
        if per_round:
            out["env_steps_per_s"] = med
            out["ratio_to_local"] = {c: med[c] / med["local"] for c in CONTENDERS}
        else:
            out["ms_per_step"] = {c: med[c] * 1e3 for c in CONTENDERS}
            out["ratio_to_local"] = {c: med[c] / med["local"] for c in CONTENDERS}
            out["overhead_ms"] = {c: (med[c] - med["local"]) * 1e3 for c in CONTENDERS[1:]}
            out["p90_ms"] = {c: float(np.percentile(samples[c], 90)) * 1e3 for c in CONTENDERS}
        return out
    finally:
        for env in envs.values():
            env.close()


# -- one slow node among fast ones (--slow-node) ---------------------------------------------

PACE = (0.02, 0.002, 0.002, 0.002)  # seconds per step of each actor's env: actor 0 is slow
SLOW_CONTENDERS = ("classic step", "classic send/recv", "compiled step",
                   "compiled send/recv")


class PacedEnv(gym.Wrapper):
    """CartPole whose steps take at least ``seconds`` (a sleep: the pace of a remote
    simulator, without taking a core from the others on a small machine). Defined in the
    script: Ray ships it to the actors by value."""

    def __init__(self, seconds: float):
        super().__init__(gym.make("CartPole-v1"))
        self.seconds = seconds

    def step(self, action):
        time.sleep(self.seconds)
        return self.env.step(action)


def fast_rate_lockstep(env, actions: np.ndarray, fast: np.ndarray) -> tuple[float, float]:
    """The fast envs' env-steps/s over ``len(actions)`` lockstep steps, and the driver
    process's CPU seconds per second meanwhile (all its threads)."""
    t, cpu = time.perf_counter(), time.process_time()
    for a in actions:
        env.step(a)
    wall = time.perf_counter() - t
    return len(actions) * len(fast) / wall, (time.process_time() - cpu) / wall


def fast_rate_first_ready(env, actions: np.ndarray, fast: np.ndarray,
                          batches: int) -> tuple[float, float]:
    """The fast envs' env-steps/s over ``batches`` first-ready batches, each env received
    sent again at once (the slow env stays in flight from round to round), and the driver's
    CPU seconds per second meanwhile."""
    stepping = set(env.stepping.tolist())
    idle = [i for i in range(env.num_envs) if i not in stepping]
    if idle:
        env.send(actions[0][idle], idle)
    got = 0
    t, cpu = time.perf_counter(), time.process_time()
    for j in range(batches):
        *_, ids = env.recv(timeout=120.0)
        got += int(np.isin(ids, fast).sum())
        env.send(actions[j % len(actions)][ids], ids)
    wall = time.perf_counter() - t
    return got / wall, (time.process_time() - cpu) / wall


def drain(env) -> None:
    while len(env.stepping):
        env.recv(timeout=120.0)


def run_slow_node(nodes: int, rounds: int, steps: int) -> dict:
    from fastvec.ray import RayVectorEnv

    fns = [functools.partial(PacedEnv, s) for s in PACE]
    fast = np.flatnonzero(np.asarray(PACE) < max(PACE))
    placement = ([{f"node{i % nodes}": 0.01} for i in range(len(fns))] if nodes > 1
                 else None)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, (steps, len(fns)))
    samples = {c: [] for c in SLOW_CONTENDERS}
    cpu = {c: [] for c in SLOW_CONTENDERS}
    for block in range(4):
        kind = ("classic", "compiled")[block % 2]
        env = RayVectorEnv(fns, envs_per_actor=1, placement=placement, batch_size=1,
                           compiled=kind == "compiled", actor_timeout=120.0)
        try:
            env.reset(seed=0)
            fast_rate_lockstep(env, actions[:5], fast)  # warm up, untimed
            for r in range(rounds):
                order = ("step", "send/recv") if r % 2 == 0 else ("send/recv", "step")
                for how in order:
                    if how == "step":
                        drain(env)
                        rate, busy = fast_rate_lockstep(env, actions, fast)
                    else:
                        rate, busy = fast_rate_first_ready(env, actions, fast,
                                                           steps * len(fast))
                    samples[f"{kind} {how}"].append(rate)
                    cpu[f"{kind} {how}"].append(busy)
            drain(env)
            if kind == "compiled":
                assert all(a["compiled"] for a in env.health())
        finally:
            env.close()
    med = {c: statistics.median(samples[c]) for c in SLOW_CONTENDERS}
    base = med["classic step"]
    return {"workload": "slow_node", "num_envs": len(fns), "nodes": nodes,
            "pace_s": list(PACE), "rounds": 2 * rounds, "steps": steps,
            "fast_env_steps_per_s": med,
            "ratio_to_classic_step": {c: med[c] / base for c in SLOW_CONTENDERS},
            "compiled_vs_classic_send_recv": med["compiled send/recv"]
            / med["classic send/recv"],
            "driver_cpu_per_s": {c: statistics.median(cpu[c]) for c in SLOW_CONTENDERS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", action="store_true", help="3 raylets, one actor on each")
    p.add_argument("--wildfire", action="store_true", help="also wildfire 64x64, 8 envs")
    p.add_argument("--slow-node", action="store_true",
                   help="one slow actor among three fast ones: lockstep vs first-ready")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=100, help="CartPole steps per round")
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)

    import ray

    cluster = None
    nodes = 3 if args.cluster else 1
    if args.cluster:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True,
                          head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
        for i in (1, 2):
            cluster.add_node(num_cpus=1, resources={f"node{i}": 1})
        ray.init(address=cluster.address, log_to_driver=False, logging_level="error")
    else:
        ray.init(num_cpus=2, log_to_driver=False, logging_level="error")
    results = {"ray": ray.__version__, "cpus": os.cpu_count(), "cluster": args.cluster,
               "workloads": []}
    try:
        if args.slow_node:
            results["workloads"].append(run_slow_node(nodes, max(2, args.rounds // 3),
                                                      min(args.steps, 40)))
            return report(results, args.json)
        cartpole = [functools.partial(gym.make, "CartPole-v1")] * 4
        results["workloads"].append(run_workload("cartpole", cartpole, nodes, args.rounds,
                                                 args.steps, per_round=False))
        if args.wildfire:
            from fastvec.envs.wildfire import WildfireEnv

            fire = [functools.partial(WildfireEnv, size=64)] * 8
            results["workloads"].append(run_workload("wildfire_64", fire, nodes,
                                                     max(3, args.rounds // 3), 60,
                                                     per_round=True))
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    return report(results, args.json)


def report(results: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"ray {results['ray']}, {results['cpus']} CPUs, "
          f"{'3 raylets (Cluster)' if results['cluster'] else 'one node'}")
    for w in results["workloads"]:
        if "fast_env_steps_per_s" in w:
            print(f"slow node (paces {w['pace_s']} s): fast envs' env-steps/s (median) "
                  + ", ".join(f"{c} {w['fast_env_steps_per_s'][c]:.0f}"
                              for c in SLOW_CONTENDERS)
                  + "; ratio to classic step " + ", ".join(
                      f"{c} {w['ratio_to_classic_step'][c]:.2f}x" for c in SLOW_CONTENDERS[1:])
                  + f"; compiled/classic send/recv {w['compiled_vs_classic_send_recv']:.2f}x"
                  + "; driver CPU s/s " + ", ".join(
                      f"{c} {w['driver_cpu_per_s'][c]:.2f}" for c in SLOW_CONTENDERS))
        elif "ms_per_step" in w:
            print(f"{w['workload']} x{w['num_envs']}: ms per step (median) "
                  + ", ".join(f"{c} {w['ms_per_step'][c]:.3f}" for c in CONTENDERS)
                  + "; ratio to local " + ", ".join(f"{c} {w['ratio_to_local'][c]:.2f}x"
                                                    for c in CONTENDERS[1:])
                  + "; overhead ms " + ", ".join(f"{c} {w['overhead_ms'][c]:.3f}"
                                                 for c in CONTENDERS[1:]))
        else:
            print(f"{w['workload']} x{w['num_envs']}: env-steps/s (median) "
                  + ", ".join(f"{c} {w['env_steps_per_s'][c]:.0f}" for c in CONTENDERS)
                  + "; ratio to local " + ", ".join(f"{c} {w['ratio_to_local'][c]:.2f}x"
                                                    for c in CONTENDERS[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
