"""context="serial": the envs run in the calling process, with the process modes' API, infos
and error semantics, so that a breakpoint in env code works."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs as test_envs
from fastvec import FastVectorEnv
from faults import CallFaultEnv, CounterEnv, ResetFaultEnv


@pytest.mark.parametrize("envs_per_worker", [1, 2])
@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_serial_matches_sync_and_fork_step_for_step(mode, envs_per_worker):
    fns = [CounterEnv] * 3
    envs = [FastVectorEnv(fns, context=ctx, autoreset_mode=mode,
                          envs_per_worker=envs_per_worker) for ctx in ("serial", "fork")]
    ref = SyncVectorEnv(fns, autoreset_mode=mode)
    try:
        results = [e.reset(seed=3) for e in envs]
        want = ref.reset(seed=3)
        assert all(data_equivalence(r, want) for r in results)
        ref.single_action_space.seed(1)
        for _ in range(60):
            a = np.array([ref.single_action_space.sample() for _ in range(3)])
            want = ref.step(a)
            for e in envs:
                assert data_equivalence(e.step(a), want)
            if mode == AutoresetMode.DISABLED and (want[2] | want[3]).any():
                mask = want[2] | want[3]
                want = ref.reset(options={"reset_mask": mask})
                for e in envs:
                    assert data_equivalence(e.reset(options={"reset_mask": mask}), want)
    finally:
        for e in envs:
            e.close()
        ref.close()


def test_serial_runs_env_code_in_this_process():
    with FastVectorEnv([CallFaultEnv] * 2, context="serial") as env:
        env.reset(seed=0)
        assert env.call("ping") == (0, 0)
        assert {h["pid"] for h in env.health()} == {os.getpid()}
        assert env.get_attr("np_random_seed") == (0, 1)


def test_serial_keeps_the_error_semantics():
    with FastVectorEnv([ResetFaultEnv] * 2, context="serial") as env:
        env.reset(seed=0)
        with pytest.raises(ValueError, match="bad reset options"):  # the env's own type
            env.reset(options={"bad": True})
        env.reset(seed=1)
    with FastVectorEnv([CallFaultEnv] * 2, context="serial") as env:
        env.reset(seed=0)
        with pytest.raises(KeyError):
            env.call("oops")
    fns = [test_envs.AttrEnv, functools.partial(test_envs.StepRaisesEnv, 2)]
    with FastVectorEnv(fns, context="serial", resume="off") as env:
        env.reset(seed=0)
        env.step(np.zeros(2, np.int64))
        obs, rew, term, trunc, info = env.step(np.zeros(2, np.int64))
        # an exception in a step: truncated and flagged, as with processes
        assert info["_worker_restarted"].tolist() == [False, True] and trunc[1]
        assert env.health()[1]["restarts"] == 1
        env.step(np.zeros(2, np.int64))


def test_serial_send_recv():
    with FastVectorEnv([CounterEnv] * 3, context="serial", batch_size=2) as env:
        env.reset(seed=0)
        env.send(np.ones(3, np.int64))
        seen = 0
        for _ in range(10):
            obs, rew, term, trunc, info, ids = env.recv()
            assert len(ids) >= 1
            seen += len(ids)
            env.send(np.ones(len(ids), np.int64), ids)
        while len(env.stepping):
            env.recv()
        assert seen >= 10
