"""Hot spares (``spares=n``): a failed worker's slot adopts a process whose envs are built.

Real faults only: SIGKILL of a worker or of a spare, a spare whose build raises, hangs or
fails after its adoption, the owner SIGKILLed under sleeping spares. Every run that meets
a fault is compared with SyncVectorEnv step for step. No timing asserts: that a spare saves
the build is shown by who built what (BuildProbe's files), the time it saves is measured
in benchmarks/survival.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gymnasium.vector import SyncVectorEnv

from conftest import process_gone, wait_until
from faults import BuildProbe, CounterEnv, builds
from fastvec import FastVectorEnv
from fastvec.stats import health_metrics
from test_equivalence import assert_same

pytestmark = pytest.mark.timeout(120)


def spares_of(env) -> list[dict]:
    return [h for h in env.health() if h["spare"]]


def ready_spare(env, timeout: float = 30.0) -> dict:
    assert wait_until(lambda: any(h["state"] == "ready" for h in spares_of(env)), timeout), \
        spares_of(env)
    return next(h for h in spares_of(env) if h["state"] == "ready")


def run_beside_sync(fast, steps: int, kill_at: dict, seed: int = 7,
                    after_reset=lambda: None) -> list[int]:
    """Step ``fast`` and a SyncVectorEnv of CounterEnvs with the same seeds and actions;
    at step t SIGKILL the worker ``kill_at[t]`` (a list of workers); returns the steps
    that reported envs resumed. Any truncation by a restart fails."""
    n = fast.num_envs
    sync = SyncVectorEnv([CounterEnv] * n)
    rng = np.random.default_rng(seed)
    resumed = []
    try:
        assert_same(sync.reset(seed=list(range(n))), fast.reset(seed=list(range(n))), "reset")
        after_reset()
        for t in range(steps):
            for w in kill_at.get(t, []):
                os.kill(fast.health()[w]["pid"], signal.SIGKILL)
            a = rng.integers(0, 5, n)
            expected, got = sync.step(a), fast.step(a)
            assert "worker_restarted" not in got[4], got[4].get("worker_restart_reason")
            assert_same(expected[:4], got[:4], f"step {t}")
            if "worker_resumed" in got[4]:
                resumed.append(t)
    finally:
        sync.close()
    return resumed


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_killed_worker_adopts_a_spare_that_built_its_envs(context, tmp_path):
    """Failed before spares existed: the replacement always built its env after the fault
    (a build by the worker's new pid after the SIGKILL)."""
    fast = FastVectorEnv([BuildProbe(str(tmp_path))] * 2, spares=1, context=context,
                         max_restarts=10)
    try:
        fast.reset(seed=[0, 1])
        spare = ready_spare(fast)
        assert spare["built_envs"] == 1 and spare["worker"] is None and spare["envs"] == []
        metrics = health_metrics(fast.health())
        assert metrics["spares_ready"] == 1 and metrics["restarts"] == 0
        built_before = builds(str(tmp_path))
        assert (spare["pid"], -1) in built_before  # built ahead, before any fault

        resumed = run_beside_sync(fast, 30, {5: [0]})
        assert resumed == [5]
        worker = fast.health()[0]
        assert worker["pid"] == spare["pid"] and worker["restarts"] == 1
        assert worker["state"] == "resumed" and worker["resumed"] == 1
        # the adopting process built nothing after the fault: its env was the spare's
        assert builds(str(tmp_path)).count((spare["pid"], -1)) == 1
        # and a new spare took its place
        assert wait_until(lambda: any(h["pid"] != spare["pid"] for h in spares_of(fast)), 10)
        pids = [h["pid"] for h in fast.health()]
    finally:
        fast.close()
    assert all(wait_until(lambda p=p: process_gone(p), 5) for p in pids)


def test_envs_from_different_functions_are_built_at_adoption(tmp_path):
    """Each env has its own function (its index): a spare cannot know which slot it will
    serve, so it starts the process only and builds that slot's env when it adopts it."""
    fast = FastVectorEnv([BuildProbe(str(tmp_path), i) for i in range(3)], spares=1)
    try:
        fast.reset(seed=[0, 1, 2])
        assert wait_until(lambda: len(spares_of(fast)) == 1, 10)
        spare = spares_of(fast)[0]
        assert spare["built_envs"] == 0
        assert not [b for b in builds(str(tmp_path)) if b[0] == spare["pid"]]
        assert run_beside_sync(fast, 12, {4: [1]}) == [4]
        assert fast.health()[1]["pid"] == spare["pid"]
        assert [b for b in builds(str(tmp_path)) if b[0] == spare["pid"]] == [(spare["pid"], 1)]
    finally:
        fast.close()


def test_two_workers_lost_with_one_spare(tmp_path):
    """One adopts the spare, the other starts a process as without spares; both resume."""
    fast = FastVectorEnv([BuildProbe(str(tmp_path))] * 3, spares=1)
    try:
        fast.reset(seed=0)
        spare = ready_spare(fast)
        assert run_beside_sync(fast, 20, {3: [0, 2]}) == [3]
        pids = {fast.health()[0]["pid"], fast.health()[2]["pid"]}
        assert spare["pid"] in pids
        other = (pids - {spare["pid"]}).pop()
        assert [b for b in builds(str(tmp_path)) if b[0] == other] == [(other, -1)]
    finally:
        fast.close()


def test_a_spare_killed_while_asleep_is_replaced(tmp_path, caplog):
    fast = FastVectorEnv([BuildProbe(str(tmp_path))] * 2, spares=1)
    try:
        fast.reset(seed=0)
        first = ready_spare(fast)["pid"]
        os.kill(first, signal.SIGKILL)
        # the watchdog notices and starts another, with no call from the user
        assert wait_until(lambda: any(h["pid"] != first and h["state"] == "ready"
                                      for h in spares_of(fast)), 30)
        assert f"spare process {first} exited with code -9" in caplog.text
        second = spares_of(fast)[0]["pid"]
        assert run_beside_sync(fast, 10, {2: [1]}) == [2]
        assert fast.health()[1]["pid"] == second
    finally:
        fast.close()


def test_spares_that_cannot_build_stop_after_the_budget(tmp_path, caplog):
    """Every spare's build raises: each counts, past max_restarts no spare starts, and a
    lost worker is replaced by a fresh process as without spares."""
    caplog.set_level("INFO", logger="fastvec")
    fast = FastVectorEnv([BuildProbe(str(tmp_path), spare_fault="raise")] * 2, spares=1,
                         max_restarts=2)
    try:
        assert wait_until(lambda: "no new spare starts" in caplog.text, 30)
        assert wait_until(lambda: not spares_of(fast), 10)
        assert caplog.text.count("building its envs raised:\n") == 3

        def stopped_again():  # the reset tried spares again, and they failed again
            assert "trying spares again" in caplog.text
            assert wait_until(lambda: caplog.text.count("no new spare starts") == 2, 30)
            assert caplog.text.count("building its envs raised:\n") == 6

        assert run_beside_sync(fast, 8, {2: [0]}, after_reset=stopped_again) == [2]
        worker = fast.health()[0]
        assert worker["restarts"] == 1 and worker["reasons"] == {"died": 1}  # not the spares'
        assert not spares_of(fast)
    finally:
        fast.close()


@pytest.mark.parametrize("fault", ["slow-raise", "sleep"])
def test_a_spare_that_fails_after_its_adoption_is_one_failed_start(fault, tmp_path, caplog):
    """The worker is lost while the spare still builds: the slot adopts it (it is ahead of
    a fresh start), the spare's build then raises (or hangs past start_timeout), and the
    slot starts a fresh process; the step returns with the episode resumed."""
    caplog.set_level("INFO", logger="fastvec")
    fast = FastVectorEnv([BuildProbe(str(tmp_path), spare_fault=fault)] * 2, spares=1,
                         start_timeout=3.0, max_restarts=10)
    try:
        spare = spares_of(fast)[0]
        assert spare["state"] == "building"
        assert run_beside_sync(fast, 6, {1: [0]}) == [1]
        worker = fast.health()[0]
        assert worker["pid"] != spare["pid"]
        assert worker["reasons"] == {"died": 1, "start": 1}
        assert f"spare process {spare['pid']} adopted (still building)" in caplog.text
        assert wait_until(lambda: process_gone(spare["pid"]), 10)
    finally:
        fast.close()


def test_a_spare_that_hangs_building_is_ended_at_start_timeout(tmp_path, caplog):
    fast = FastVectorEnv([BuildProbe(str(tmp_path), spare_fault="sleep")] * 1, spares=1,
                         start_timeout=1.0)
    try:
        pid = spares_of(fast)[0]["pid"]
        assert wait_until(lambda: process_gone(pid), 15)
        assert (f"spare process {pid} did not build its envs within start_timeout=1.0 s"
                in caplog.text)
        assert pid not in [h["pid"] for h in spares_of(fast)]  # another one builds
    finally:
        fast.close()


SLEEPING_OWNER = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{tests!r}]
    from faults import BuildProbe
    from fastvec import FastVectorEnv
    env = FastVectorEnv([BuildProbe({log!r})] * 2, spares=2)
    env.reset(seed=0)
    while sum(h["state"] == "ready" for h in env.health() if h["spare"]) < 2:
        time.sleep(0.05)
    print(" ".join(str(h["pid"]) for h in env.health() if h["spare"]), flush=True)
    time.sleep(600)
""")


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def test_spares_sleep_and_end_with_their_owner(tmp_path):
    """Spares cost no CPU while they wait, and a SIGKILLed owner takes them along."""
    code = SLEEPING_OWNER.format(tests=os.path.dirname(__file__), log=str(tmp_path))
    # from tmp_path: the installed fastvec, not the source tree (-c puts the cwd first)
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=tmp_path)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2
        before = [_cpu_ticks(p) for p in pids]
        wait_until(lambda: False, 2.0)
        used = [_cpu_ticks(p) - b for p, b in zip(pids, before)]
        assert max(used) <= 2, used  # clock ticks (10 ms) in 2 s: asleep
    finally:
        owner.kill()
        owner.wait(10)
    assert all(wait_until(lambda p=p: process_gone(p), 10) for p in pids)


@pytest.mark.parametrize("bad, match", [(-1, "spares must be"), ("1", "spares must be")])
def test_spares_are_checked(bad, match):
    with pytest.raises(ValueError, match=match):
        FastVectorEnv([CounterEnv], spares=bad)


def test_spares_need_processes():
    with pytest.raises(ValueError, match="context='serial'"):
        FastVectorEnv([CounterEnv], spares=1, context="serial")


def test_a_recycled_worker_hands_its_slot_to_a_spare(tmp_path):
    """Planned recycling (recycle_after_episodes) adopts the spare too: the old worker
    closes its envs while the spare, envs built, takes the slot (the recycled env's next
    episode starts from its derived seed, as without spares)."""
    fast = FastVectorEnv([BuildProbe(str(tmp_path))] * 2, spares=1, recycle_after_episodes=1)
    try:
        fast.reset(seed=0)
        spare = ready_spare(fast)["pid"]
        adopted_by = None
        for _ in range(70):
            _, _, _, _, infos = fast.step(np.zeros(2, np.int64))
            assert "worker_restarted" not in infos and "worker_resumed" not in infos
            workers = [h for h in fast.health() if not h["spare"]]
            if adopted_by is None and any(h["recycles"] for h in workers):
                adopted_by = [h["worker"] for h in workers if h["pid"] == spare]
                assert adopted_by, (spare, workers)  # the first recycling adopted the spare
        assert sum(h["recycles"] for h in workers) >= 2
        assert sum(h["restarts"] for h in workers) == 0
        assert builds(str(tmp_path)).count((spare, -1)) == 1  # built once, ahead
    finally:
        fast.close()


def test_without_resume_the_adopting_spare_starts_a_fresh_episode(tmp_path):
    """resume="off": the lost env's episode ends truncated and flagged, as without spares;
    the spare that took the slot resets it with the derived seed at the next step."""
    fast = FastVectorEnv([BuildProbe(str(tmp_path))] * 2, spares=1, resume="off")
    try:
        fast.reset(seed=[3, 4])
        spare = ready_spare(fast)["pid"]
        fast.step(np.zeros(2, np.int64))
        os.kill(fast.health()[0]["pid"], signal.SIGKILL)
        obs, reward, _, truncated, infos = fast.step(np.zeros(2, np.int64))
        assert infos["_worker_restarted"].tolist() == [True, False]
        assert truncated.tolist() == [True, False] and reward[0] == 0.0
        assert fast.health()[0]["pid"] == spare
        obs, _, _, _, _ = fast.step(np.zeros(2, np.int64))
        assert obs[0][1] == 0.0  # the fresh episode's first observation (t = 0)
    finally:
        fast.close()
