"""send/recv: the first-ready batches (``batch_size``), next to lockstep ``step``."""

from __future__ import annotations

import functools
import os
import signal

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.utils.env_checker import data_equivalence

import fastvec
from fastvec import FastVectorEnv
from conftest import wait_until
from faults import CounterEnv


def action_of(i: int, t: int) -> int:
    return (3 * i + t) % 5


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_each_env_follows_its_own_sync_trajectory(context):
    """An env's trajectory depends only on its own actions: under send/recv it must be the
    one a SyncVectorEnv of that env alone gives for the same actions and seed."""
    n, per_env = 5, 60
    env = FastVectorEnv([CounterEnv] * n, batch_size=2, context=context)
    got = {i: [] for i in range(n)}
    try:
        obs, _ = env.reset(seed=10)
        first = {i: obs[i].copy() for i in range(n)}
        t = np.zeros(n, np.int64)
        env.send(np.array([action_of(i, 0) for i in range(n)]))
        while (t < per_env).any() or env._inflight.any():
            stepping = int(env._inflight.sum())
            o, r, term, trunc, info, ids = env.recv()
            assert len(ids) == min(2, stepping) and list(ids) == sorted(ids)
            again = []
            for j, i in enumerate(ids):
                got[i].append((o[j].copy(), r[j], term[j], trunc[j]))
                t[i] += 1
                if t[i] < per_env:
                    again.append(i)
            if again:
                env.send(np.array([action_of(i, t[i]) for i in again]), again)
    finally:
        env.close()
    for i in range(n):
        ref = SyncVectorEnv([CounterEnv])
        try:
            o, _ = ref.reset(seed=10 + i)
            assert data_equivalence(o[0], first[i])
            for k in range(per_env):
                o, r, term, trunc, _ = ref.step(np.array([action_of(i, k)]))
                assert data_equivalence(o[0], got[i][k][0]), (i, k)
                assert (r[0], term[0], trunc[0]) == got[i][k][1:], (i, k)
        finally:
            ref.close()


def test_slow_env_does_not_hold_the_others(tmp_path):
    fns = [functools.partial(CounterEnv, str(tmp_path), i) for i in range(3)]
    env = FastVectorEnv(fns, batch_size=1)
    try:
        env.reset(seed=0)
        (tmp_path / "env0.cmd").write_text("slow:0.5")
        env.send(np.ones(3, np.int64))
        others = 0
        while True:
            _, _, _, _, _, ids = env.recv()
            if ids[0] == 0:
                break
            others += 1
            env.send(np.ones(1, np.int64), ids)
        assert others > 10  # the fast envs kept stepping while env 0 was busy
        while env._inflight.any():
            env.recv()
        obs, *_ = env.step(np.ones(3, np.int64))  # lockstep again: rings realigned
        assert obs.shape == (3, 3)
    finally:
        env.close()


def test_failed_worker_comes_back_flagged():
    """The truncation path (resume="off"); with resume: tests/test_resume.py."""
    env = FastVectorEnv([CounterEnv] * 3, batch_size=3, resume="off")
    try:
        obs, _ = env.reset(seed=0)
        env.send(np.ones(3, np.int64))
        o, *_ = env.recv()
        os.kill(env.health()[1]["pid"], signal.SIGKILL)
        # killed between calls: the watchdog has seen the death before the next send
        slot = env._sup.slots[1]
        assert wait_until(lambda: slot.failure is not None, 10.0), "the death was not seen"
        assert slot.failure.reason == "died"
        env.send(np.ones(3, np.int64))
        o2, r, term, trunc, info, ids = env.recv()
        assert ids.tolist() == [0, 1, 2]
        assert info["_worker_restarted"].tolist() == [False, True, False]
        assert trunc.tolist() == [False, True, False] and r[1] == 0.0
        np.testing.assert_array_equal(o2[1], o[1])  # its last observation
        env.send(np.ones(3, np.int64))
        o3, *_ = env.recv()
        assert o3[1][1] == 0  # NEXT_STEP: the step after the flagged one is the reset
    finally:
        env.close()


def test_misuse_is_refused_with_clear_errors():
    with pytest.raises(ValueError, match="envs_per_worker=1"):
        FastVectorEnv([CounterEnv] * 2, batch_size=1, envs_per_worker=2)
    with pytest.raises(ValueError, match="NEXT_STEP"):
        FastVectorEnv([CounterEnv] * 2, batch_size=1, autoreset_mode=AutoresetMode.SAME_STEP)
    plain = FastVectorEnv([CounterEnv])
    try:
        plain.reset(seed=0)
        with pytest.raises(fastvec.FastVecError, match="batch_size"):
            plain.send(np.ones(1, np.int64))
    finally:
        plain.close()
    env = FastVectorEnv([CounterEnv] * 3, batch_size=1)
    try:
        env.reset(seed=0)
        with pytest.raises(fastvec.NoAsyncCallError):
            env.recv()
        with pytest.raises(ValueError, match="distinct env indices"):
            env.send(np.ones(2, np.int64), [0, 0])
        with pytest.raises(ValueError, match="distinct env indices"):
            env.send(np.ones(1, np.int64), [3])
        with pytest.raises(fastvec.InvalidActionError):
            env.send(np.full(2, 9), [0, 1])
        env.send(np.ones(2, np.int64), [0, 1])
        with pytest.raises(fastvec.AlreadyPendingCallError):
            env.send(np.ones(1, np.int64), [1])
        with pytest.raises(fastvec.AlreadyPendingCallError):
            env.step(np.ones(3, np.int64))
        with pytest.raises(fastvec.AlreadyPendingCallError):
            env.get_attr("index")
        assert len(env.recv()[-1]) == 1
        assert len(env.recv()[-1]) == 1
        assert env.get_attr("index") == (0, 0, 0)
    finally:
        env.close()
