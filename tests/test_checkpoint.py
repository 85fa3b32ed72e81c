"""A whole job resumes: ``state_dict()`` saved with the model, ``load_state_dict()`` into a
new FastVectorEnv, every env replayed to its exact step and checked; and a job killed
with SIGKILL after a checkpoint continues the trajectories of a run that never stopped."""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space

from conftest import wait_until
from faults import CounterEnv, EntropyEnv, SnapshotEnv
from fastvec import FastVectorEnv
from fastvec.shm import leftovers
from test_equivalence import assert_same
from test_resume import MODES, without_resume_keys

pytestmark = pytest.mark.timeout(180)
HERE = Path(__file__).resolve().parent

FNS = {"cartpole": functools.partial(gym.make, "CartPole-v1"), "counter": CounterEnv}


def drive(envs, actions, steps, mode, out=None):
    """``steps`` steps with ``actions``; DISABLED: finished envs reset as a user would."""
    for _ in range(steps):
        result = envs.step(actions.sample())
        if out is not None:
            out.append(result)
        done = result[2] | result[3]
        if mode == AutoresetMode.DISABLED and done.any():
            reset = envs.reset(options={"reset_mask": done.copy()})
            if out is not None:
                out.append(reset)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize("envs_per_worker", [1, 2])
@pytest.mark.parametrize("name", list(FNS))
def test_a_new_vector_env_goes_on_where_the_saved_one_was(name, envs_per_worker, mode):
    fns = [FNS[name]] * 4
    a = FastVectorEnv(fns, autoreset_mode=mode, envs_per_worker=envs_per_worker)
    b = FastVectorEnv(fns, autoreset_mode=mode, envs_per_worker=envs_per_worker)
    try:
        actions = batch_space(a.single_action_space, 4)
        actions.seed(5)
        a.reset(seed=[7, 8, None, 9])  # env 2 unseeded: its RNG state is what is replayed
        drive(a, actions, 37, mode)
        state = pickle.loads(pickle.dumps(a.state_dict()))
        assert len(pickle.dumps(state)) < 64 * 1024, "a state_dict is small"
        expected = []  # the saved env keeps going...
        drive(a, actions, 41, mode, expected)
        actions.seed(5)  # ...and the new one is given the same actions from the save on
        for _ in range(37):
            actions.sample()
        obs, infos = b.load_state_dict(state)
        assert infos["_worker_resumed"].all(), infos
        got = []
        drive(b, actions, 41, mode, got)
        assert len(got) == len(expected)
        for t, (e, g) in enumerate(zip(expected, got)):
            assert_same(e[:-1], g[:-1], f"call {t} after the load")
            assert_same(without_resume_keys(e[-1]), without_resume_keys(g[-1]), f"infos {t}")
    finally:
        a.close()
        b.close()


def test_load_state_dict_checks_what_it_is_given():
    a = FastVectorEnv([CounterEnv] * 2)
    b = FastVectorEnv([CounterEnv] * 3)
    try:
        a.reset(seed=0)
        state = a.state_dict()
        with pytest.raises(ValueError, match="num_envs=2"):
            b.load_state_dict(state)
        with pytest.raises(ValueError, match="not a FastVectorEnv state_dict"):
            a.load_state_dict({"episodes": []})
        a.step_async(np.ones(2, np.int64))
        with pytest.raises(Exception, match="step_async"):
            a.state_dict()
        a.step_wait()
    finally:
        a.close()
        b.close()


def test_an_env_whose_replay_diverges_starts_a_new_episode_flagged():
    a = FastVectorEnv([CounterEnv, EntropyEnv])
    b = FastVectorEnv([CounterEnv, EntropyEnv])
    try:
        a.reset(seed=[3, 4])
        for _ in range(5):
            a.step(np.ones(2, np.int64))
        obs, infos = b.load_state_dict(a.state_dict())
        assert infos["_worker_resumed"].tolist() == [True, False]
        assert infos["_worker_restarted"].tolist() == [False, True]
        assert "replay diverged" in infos["worker_restart_reason"][1]
        assert obs[0, 1] == 5 and obs[1, 1] == 0  # env 1: a fresh episode, t = 0
        b.step(np.ones(2, np.int64))
    finally:
        a.close()
        b.close()


def test_a_killed_job_restarted_from_its_checkpoint_continues_the_same_trajectories(tmp_path):
    """The job is SIGKILLed (workers, shared memory and all) after saving its checkpoint;
    a new process loads it and must produce what a run that never stopped produced."""
    job = [sys.executable, str(HERE / "checkpoint_job.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    subprocess.run([*job, "reference"], check=True, timeout=120, env=env)
    first = subprocess.Popen([*job, "first"], env=env)
    try:
        assert wait_until(lambda: _progress(tmp_path) >= 35, 60.0), "the job never got there"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    # nothing of the killed job is left in /dev/shm once its resource tracker has run
    assert wait_until(lambda: not [n for n in leftovers() if n.startswith(f"fv{first.pid}_")],
                      20.0), [n for n in leftovers() if n.startswith(f"fv{first.pid}_")]
    subprocess.run([*job, "second"], check=True, timeout=120, env=env)
    ref = np.load(tmp_path / "reference.npz")
    second = np.load(tmp_path / "second.npz")
    first_t = int(second["t"][0])
    assert first_t == 30 and second["t"][-1] == 59
    for key in ("obs", "reward", "terminated", "truncated"):
        np.testing.assert_array_equal(second[key], ref[key][first_t:], err_msg=key)


def _progress(path: Path) -> int:
    try:
        return int((path / "progress").read_text() or -1)
    except (OSError, ValueError):
        return -1


def test_a_saved_snapshot_shortens_the_load():
    fns = [SnapshotEnv] * 2
    a = FastVectorEnv(fns, snapshot_every=4)
    b = FastVectorEnv(fns, snapshot_every=4)
    try:
        a.reset(seed=[1, 2])
        ones = np.ones(2, np.int64)
        for _ in range(14):
            a.step(ones)
        obs, infos = b.load_state_dict(pickle.loads(pickle.dumps(a.state_dict())))
        assert infos["_worker_resumed"].all()
        assert [h["replayed_steps"] for h in b.health()] == [2, 2]  # from step 12 on
        for t in range(10):
            assert_same(a.step(ones)[:4], b.step(ones)[:4], f"step {t} after the load")
    finally:
        a.close()
        b.close()
