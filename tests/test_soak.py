"""Long fault-injection soak: ``pytest -m soak`` (FASTVEC_SOAK_SECONDS sets the duration).

Random real faults hit random envs: SIGKILL and SIGSTOP from outside, and from inside
the env a segfault, os._exit, an endless sleep, a busy loop, an exception, or a slow step
that must NOT be touched. Every transition of every env is checked against the
CounterEnv rules, so a lost, duplicated or misread step fails the run at once.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import signal
import time

import numpy as np
import psutil
import pytest

from conftest import my_leftovers, wait_until, worker_children
from fastvec import FastVectorEnv
from faults import CounterEnv

pytestmark = pytest.mark.soak

KINDS = ("sigkill", "sigstop", "segfault", "exit", "sleep", "busy", "exception", "slow:0.4")
N_ENVS = 6


def open_fds() -> dict:
    """This process's open file descriptors and what they point to."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            pass
    return out


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_soak(tmp_path, context):
    seconds = float(os.environ.get("FASTVEC_SOAK_SECONDS", "60")) / 2  # split over contexts
    rng = np.random.default_rng(int(os.environ.get("FASTVEC_SOAK_SEED", "12345")))
    fns = [functools.partial(CounterEnv, str(tmp_path), i) for i in range(N_ENVS)]
    me = psutil.Process()
    FastVectorEnv([CounterEnv], context=context).close()  # multiprocessing's one-time helpers
    fds0 = open_fds()
    env = FastVectorEnv(fns, context=context, heartbeat_timeout=1.0, step_timeout=2.0,
                        max_restarts=10**6, restart_window=1.0)
    stats = {"context": context, "steps": 0, "episodes": 0, "faults": {}, "flagged": 0,
             "slow_untouched": 0}
    try:
        obs, _ = env.reset(seed=2026)
        fresh = np.zeros(N_ENVS, bool)  # the next step of this env is its reset
        pending: dict[int, str] = {}  # env -> fault injected, to be answered by the next step
        rss_base = None
        next_fault = 50
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if stats["steps"] == next_fault:
                kind = str(rng.choice(KINDS))
                # An env whose next step is its autoreset calls reset(), not step(), so a
                # fault planted in its step would fire a step late: pick another env.
                candidates = np.flatnonzero(~fresh) if kind not in ("sigkill", "sigstop") \
                    else np.arange(N_ENVS)
                i = int(rng.choice(candidates))
                pending[i] = kind
                stats["faults"][kind] = stats["faults"].get(kind, 0) + 1
                if kind == "sigkill":
                    os.kill(env.health()[i]["pid"], signal.SIGKILL)
                elif kind == "sigstop":
                    os.kill(env.health()[i]["pid"], signal.SIGSTOP)
                else:
                    (tmp_path / f"env{i}.cmd").write_text(kind)
                next_fault += int(rng.integers(20, 200))
            actions = rng.integers(0, 5, N_ENVS)
            prev = obs
            obs, rew, term, trunc, info = env.step(actions)
            stats["steps"] += 1
            flagged = info.get("_worker_restarted", np.zeros(N_ENVS, bool))
            for i in range(N_ENVS):
                kind = pending.pop(i, None)
                if flagged[i]:
                    assert kind is not None and not kind.startswith("slow"), \
                        f"env {i} flagged without a fault at step {stats['steps']}"
                    assert trunc[i] and not term[i] and rew[i] == 0.0
                    np.testing.assert_array_equal(obs[i], prev[i])
                    stats["flagged"] += 1
                    fresh[i] = True
                    continue
                assert kind is None or kind.startswith("slow"), \
                    f"fault {kind} of env {i} was not answered at step {stats['steps']}"
                stats["slow_untouched"] += kind is not None
                if fresh[i]:
                    assert obs[i][1] == 0 and rew[i] == 0.0, f"env {i}: expected a reset"
                else:
                    assert obs[i][0] == prev[i][0] and obs[i][1] == prev[i][1] + 1, \
                        f"env {i}: lost or repeated step at {stats['steps']}"
                    assert obs[i][2] == prev[i][2] + actions[i]
                    assert rew[i] == actions[i] * 0.5 + obs[i][1]
                fresh[i] = term[i] or trunc[i]
                stats["episodes"] += int(term[i])
            if stats["steps"] == 300:
                gc.collect()
                rss_base = me.memory_info().rss
        health = env.health()
        stats["restarts"] = sum(h["restarts"] for h in health)
        stats["rss_growth_mb"] = (me.memory_info().rss - rss_base) / 2**20 if rss_base else 0.0
        expected_flags = sum(n for k, n in stats["faults"].items() if not k.startswith("slow"))
        assert stats["flagged"] == stats["restarts"] == expected_flags
        assert len(worker_children()) == N_ENVS
        assert stats["rss_growth_mb"] < 50, stats
    finally:
        env.close()
    assert wait_until(lambda: not my_leftovers() and not worker_children(), 5.0)
    gc.collect()
    wait_until(lambda: open_fds() == fds0, 5.0)
    fds1 = open_fds()
    assert fds1 == fds0, f"fds opened and not closed: {sorted(set(fds1.items()) - set(fds0.items()))}"
    stats["leaks"] = {"shm": my_leftovers(), "fds": len(fds1) - len(fds0),
                      "processes": len(worker_children())}
    print(json.dumps(stats))
    report = os.environ.get("FASTVEC_SOAK_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(json.dumps(stats) + "\n")
