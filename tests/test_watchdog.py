"""Real faults in a worker: the run continues with one flagged, truncated step for that env.

These tests pin the truncation path (``resume="off"``); with resume on, the same faults
resume the episode instead (tests/test_resume.py)."""

from __future__ import annotations

import functools
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.utils.env_checker import data_equivalence

import fastvec
from fastvec import FastVectorEnv, WorkerFailure
from fastvec.shm import leftovers
from conftest import process_gone, wait_until
from faults import FAULTS, AlwaysFailEnv, CounterEnv, FaultOnceEnv

HEARTBEAT_TIMEOUT = 1.0
STEP_TIMEOUT = 1.5
FAULT_AT = 5
SLACK = 3.0  # seconds on top of the configured timeouts, on a loaded 2-core machine


def make_fns(tmp_path, fault, n=3, faulty=1):
    fns = []
    for i in range(n):
        if i == faulty:
            fns.append(functools.partial(FaultOnceEnv, fault, FAULT_AT, str(tmp_path / "m")))
        else:
            fns.append(CounterEnv)
    return fns


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_gives_one_flagged_truncated_step(tmp_path, fault, context, caplog):
    fns = make_fns(tmp_path, fault)
    ref = SyncVectorEnv([CounterEnv] * 3)
    env = FastVectorEnv(fns, context=context, heartbeat_timeout=HEARTBEAT_TIMEOUT, resume="off",
                        step_timeout=STEP_TIMEOUT)
    try:
        obs, _ = env.reset(seed=7)
        ref_obs, _ = ref.reset(seed=7)
        assert data_equivalence(obs, ref_obs)
        rng = np.random.default_rng(0)
        flagged = []
        for t in range(30):
            actions = rng.integers(0, 5, 3)
            prev = obs
            start, began = time.monotonic(), time.time()  # Failure.when is wall-clock
            with caplog.at_level(logging.WARNING, logger="fastvec"):
                obs, rew, term, trunc, info = env.step(actions)
            took = time.monotonic() - start
            ref_step = ref.step(actions)
            mask = info.get("_worker_restarted", np.zeros(3, bool))
            if mask.any():
                flagged.append(t)
                assert mask.tolist() == [False, True, False]
                assert info["worker_restarted"][1]
                assert fault.split(":")[0] in ("sigkill", "exit", "segfault", "sigstop",
                                               "sleep", "busy", "exception")
                assert trunc[1] and not term[1] and rew[1] == 0.0
                np.testing.assert_array_equal(obs[1], prev[1])  # the last observation it produced
                # The bounds the options promise, not how fast (that is for benchmarks): the
                # fault is found within its timeout (a death or an exception at once), and
                # the replacement builds within start_timeout (under spawn: a new Python).
                limit = STEP_TIMEOUT if fault in ("sleep", "busy") else HEARTBEAT_TIMEOUT
                found = env.health()[1]["last_failure_time"] - began
                assert found < limit + SLACK, f"fault found {found:.2f} s into the step"
                assert took < limit + SLACK + env.options.start_timeout, \
                    f"flagged step took {took:.2f} s"
            for i in (0, 2):  # the healthy envs stay exact, step for step
                assert data_equivalence(obs[i], ref_step[0][i])
                assert rew[i] == ref_step[1][i] and term[i] == ref_step[2][i]
        assert flagged == [FAULT_AT - 1]
        h = env.health()
        assert h[1]["restarts"] == 1 and h[1]["alive"] and h[1]["generation"] == 1
        assert h[0]["restarts"] == 0 and h[2]["restarts"] == 0
        expected_reason = {"sigkill": "died", "exit": "died", "segfault": "died",
                           "sigstop": "frozen", "sleep": "hung", "busy": "hung",
                           "exception": "exception"}[fault]
        assert h[1]["reasons"] == {expected_reason: 1}
        if fault == "segfault":
            assert "SIGSEGV" in h[1]["last_failure"]
        if fault == "sigkill":
            assert "SIGKILL" in h[1]["last_failure"]
        logged = [r for r in caplog.records if r.name == "fastvec" and "failed" in r.getMessage()]
        assert len(logged) == 1 and "envs [1]" in logged[0].getMessage()
        assert "last actions" in logged[0].getMessage()
    finally:
        env.close()
        ref.close()


def test_after_restart_next_step_resets_with_derived_seed(tmp_path):
    """NEXT_STEP: the step after the flagged one is that env's reset, seeded deterministically."""
    runs = []
    for k in range(2):
        d = tmp_path / str(k)
        d.mkdir()
        env = FastVectorEnv(make_fns(d, "sigkill"), heartbeat_timeout=HEARTBEAT_TIMEOUT,
                            resume="off")
        try:
            env.reset(seed=3)
            seq = []
            for _ in range(FAULT_AT + 2):
                obs, rew, term, trunc, info = env.step(np.ones(3, np.int64))
                seq.append((obs[1].copy(), rew[1], term[1], trunc[1]))
            runs.append(seq)
        finally:
            env.close()
    after = runs[0][FAULT_AT]  # the step after the flagged one
    assert after[1] == 0.0 and not after[2] and not after[3]
    assert after[0][1] == 0  # t == 0: a fresh episode
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(runs[0], runs[1]))


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_fault_in_other_autoreset_modes(tmp_path, mode):
    env = FastVectorEnv(make_fns(tmp_path, "segfault"), autoreset_mode=mode, resume="off",
                        heartbeat_timeout=HEARTBEAT_TIMEOUT)
    try:
        obs, _ = env.reset(seed=1)
        for t in range(FAULT_AT):
            prev = obs
            obs, rew, term, trunc, info = env.step(np.ones(3, np.int64))
        assert info["_worker_restarted"].tolist() == [False, True, False]
        assert trunc[1] and rew[1] == 0.0
        if mode == AutoresetMode.SAME_STEP:
            assert obs[1][1] == 0  # already the next episode's first observation
            np.testing.assert_array_equal(info["final_obs"][1], prev[1])
            obs, *_ = env.step(np.ones(3, np.int64))
            assert obs[1][1] == 1
        else:
            np.testing.assert_array_equal(obs[1], prev[1])
            with pytest.raises(fastvec.FastVecError, match="reset_mask"):
                env.step(np.ones(3, np.int64))
            obs, _ = env.reset(options={"reset_mask": np.array([False, True, False])})
            assert obs[1][1] == 0
            obs, *_ = env.step(np.ones(3, np.int64))
            assert obs[1][1] == 1
    finally:
        env.close()


def test_on_failure_raise(tmp_path):
    env = FastVectorEnv(make_fns(tmp_path, "exception"), on_failure="raise", resume="off")
    try:
        env.reset(seed=0)
        with pytest.raises(WorkerFailure) as info:
            for _ in range(FAULT_AT):
                env.step(np.ones(3, np.int64))
        err = info.value
        assert err.env_index == 1 and err.reason == "exception"
        assert "injected fault" in str(err.__cause__)
        assert env.health()[1]["alive"]
        obs, *_ = env.step(np.ones(3, np.int64))  # still usable: the worker was replaced
        assert obs[1][1] == 0
    finally:
        env.close()


def test_on_failure_raise_on_death_decodes_signal(tmp_path):
    env = FastVectorEnv(make_fns(tmp_path, "segfault"), on_failure="raise", resume="off")
    try:
        env.reset(seed=0)
        with pytest.raises(WorkerFailure, match="SIGSEGV") as info:
            for _ in range(FAULT_AT):
                env.step(np.ones(3, np.int64))
        assert info.value.exitcode == -signal.SIGSEGV
    finally:
        env.close()


def test_restart_budget(tmp_path):
    env = FastVectorEnv([CounterEnv, AlwaysFailEnv], max_restarts=2, restart_window=60)
    try:
        env.reset(seed=0)
        with pytest.raises(fastvec.RestartBudgetExceeded, match="failed 3 times") as info:
            for _ in range(10):
                env.step(np.ones(2, np.int64))
        assert "max_restarts=2" in str(info.value) and info.value.env_index == 1
        assert env.closed  # broken for good: it closed itself
        with pytest.raises(fastvec.ClosedEnvError):
            env.step(np.ones(2, np.int64))
    finally:
        env.close()


def test_slow_step_under_timeout_is_not_touched(tmp_path):
    (tmp_path / "env1.cmd").write_text("slow:0.8")
    fns = [functools.partial(CounterEnv, str(tmp_path), i) for i in range(2)]
    env = FastVectorEnv(fns, heartbeat_timeout=0.5, step_timeout=1.5)
    try:
        env.reset(seed=0)
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert "worker_restarted" not in info and not trunc.any()
        assert env.health()[1]["restarts"] == 0
    finally:
        env.close()


def test_kill_between_steps_is_answered_at_next_step(tmp_path):
    env = FastVectorEnv([CounterEnv] * 2, resume="off")
    try:
        env.reset(seed=0)
        env.step(np.ones(2, np.int64))
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        # between steps: the watchdog has seen the death before the next step starts
        slot = env._sup.slots[0]
        assert wait_until(lambda: slot.failure is not None, 10.0), "the death was not seen"
        assert slot.failure.reason == "died"
        obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
        assert info["_worker_restarted"].tolist() == [True, False]
        assert trunc.tolist() == [True, False]
        assert env.health()[0]["reasons"] == {"died": 1}
    finally:
        env.close()


def test_respawns_do_not_accumulate_resources(tmp_path):
    me = psutil.Process()
    env = FastVectorEnv([CounterEnv] * 2, max_restarts=20)
    try:
        env.reset(seed=0)

        def kill_and_step():
            os.kill(env.health()[0]["pid"], signal.SIGKILL)
            for _ in range(3):
                env.step(np.ones(2, np.int64))

        kill_and_step()
        mine = lambda: [n for n in leftovers() if n.startswith(  # noqa: E731 - not others'
            (env._sup.prefix[1:], "sem." + env._sup.prefix[1:]))]
        fds, names = me.num_fds(), len(mine())
        for _ in range(6):
            kill_and_step()
        assert env.health()[0]["restarts"] == 7
        assert me.num_fds() == fds
        assert len(mine()) == names
    finally:
        env.close()


def same_fastvec_env() -> dict:
    """Environment for a child Python that imports the fastvec this test imported."""
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(fastvec.__file__)))


PARENT_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from fastvec import FastVectorEnv
    from faults import CounterEnv
    env = FastVectorEnv([CounterEnv] * 2, context={context!r})
    env.reset(seed=0)
    print(" ".join(str(h["pid"]) for h in env.health()), flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_parent_sigkill_leaves_no_worker_and_next_instance_sweeps(context):
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT.format(tests=tests, context=context)],
                            stdout=subprocess.PIPE, text=True, cwd=tests, env=same_fastvec_env())
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        owned = [n for n in leftovers() if n.startswith((f"fv{proc.pid}_", f"sem.fv{proc.pid}_"))]
        assert owned
        proc.kill()
        proc.wait(10)
        assert wait_until(lambda: all(process_gone(p) for p in pids), 5.0)
        env = FastVectorEnv([CounterEnv])  # the next instance sweeps the dead owner's names
        env.close()
        assert not [n for n in leftovers() if n.startswith((f"fv{proc.pid}_", f"sem.fv{proc.pid}_"))]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_recycle_after_episodes_at_boundary():
    env = FastVectorEnv([CounterEnv] * 2, recycle_after_episodes=2)
    try:
        obs, _ = env.reset(seed=0)
        episodes = 0
        for _ in range(400):
            prev = obs
            obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
            assert "worker_restarted" not in info
            assert not trunc.any()
            # every step is a real transition or a reset: no step is interrupted
            for i in range(2):
                assert obs[i][1] in (prev[i][1] + 1, 0)
            episodes += int(term[0])
        h = env.health()
        assert h[0]["recycles"] >= episodes // 2 - 1 >= 2
        assert h[0]["restarts"] == 0
    finally:
        env.close()


def test_max_worker_rss_recycles():
    env = FastVectorEnv([CounterEnv], max_worker_rss=1)  # any worker is over one byte
    try:
        env.reset(seed=0)
        for _ in range(150):
            env.step(np.ones(1, np.int64))
        assert env.health()[0]["recycles"] >= 2
    finally:
        env.close()


def test_recycle_in_same_step_mode_keeps_final_obs():
    env = FastVectorEnv([CounterEnv] * 2, recycle_after_episodes=1,
                        autoreset_mode=AutoresetMode.SAME_STEP)
    try:
        obs, _ = env.reset(seed=0)
        ends = 0
        for _ in range(300):
            prev = obs
            obs, rew, term, trunc, info = env.step(np.ones(2, np.int64))
            assert "worker_restarted" not in info
            for i in range(2):
                if term[i]:  # the step ended the episode and already started the next one
                    ends += i == 0
                    assert obs[i][1] == 0
                    np.testing.assert_array_equal(info["final_obs"][i][1], prev[i][1] + 1)
                else:
                    assert obs[i][1] == prev[i][1] + 1
        assert env.health()[0]["recycles"] == ends >= 3
    finally:
        env.close()

