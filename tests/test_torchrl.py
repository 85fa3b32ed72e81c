"""fastvec under TorchRL: ``GymWrapper(FastVectorEnv(...))`` in SAME_STEP and DISABLED mode.

TorchRL drives a gymnasium vector env itself: in SAME_STEP it swaps ``final_obs`` back into
the step that ended an episode; in DISABLED it resets only the done envs through
``reset(options={"reset_mask": done})``. These tests check both, and that a SIGKILLed worker
costs its env one truncated transition while the rollout or collector carries on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

_start_method = mp.get_start_method(allow_none=True)
torch = pytest.importorskip("torch")
pytest.importorskip("torchrl")
# Importing torchrl makes "spawn" the process-wide default start method; give the rest of the
# suite its default back (these tests name their context).
mp.set_start_method(_start_method, force=True)

from torchrl.collectors import Collector  # noqa: E402
from torchrl.data import Unbounded  # noqa: E402
from torchrl.envs import default_info_dict_reader  # noqa: E402
from torchrl.envs.libs.gym import GymWrapper  # noqa: E402

from fastvec import FastVectorEnv  # noqa: E402

N = 3        # envs
OBS = 4      # CartPole's observation size
MODES = [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


def cartpole():
    return gym.make("CartPole-v1")


def is_fresh_cartpole(obs) -> bool:
    """CartPole's reset draws every coordinate from [-0.05, 0.05]."""
    return bool(obs.abs().max() <= 0.05)


class Wrapped:
    """A GymWrapper over a FastVectorEnv, with the resets fastvec received and the
    ``worker_restarted`` info read into the tensordict."""

    def __init__(self, mode: AutoresetMode, resume: str = "off"):
        # resume="off": these tests pin the truncation path through TorchRL; with resume
        # a killed worker's episode goes on (test_worker_killed_mid_rollout_resumes_it)
        self.fast = FastVectorEnv([cartpole] * N, autoreset_mode=mode, context="fork",
                                  resume=resume)
        self.resets: list[np.ndarray | None] = []   # reset_mask of each reset, None: all
        reset = self.fast.reset

        def recording_reset(*args, **kwargs):
            options = kwargs.get("options") or {}
            mask = options.get("reset_mask")
            self.resets.append(None if mask is None else np.array(mask))
            return reset(*args, **kwargs)

        self.fast.reset = recording_reset
        self.env = GymWrapper(self.fast)
        self.env.set_info_dict_reader(default_info_dict_reader(
            ["worker_restarted"],
            spec={"worker_restarted": Unbounded(shape=(N,), dtype=torch.bool)}))

    def kill_worker(self, w: int) -> None:
        os.kill(self.fast.health()[w]["pid"], signal.SIGKILL)

    def close(self) -> None:
        self.env.close()
        self.fast.close()


@pytest.fixture
def wrapped():
    made = []

    def make(mode, resume="off"):
        made.append(Wrapped(mode, resume))
        return made[-1]

    yield make
    for w in made:
        w.close()


def check_shapes(td, steps: int) -> None:
    assert td.batch_size == (N, steps)
    assert td["observation"].shape == (N, steps, OBS)
    assert td["action"].shape == (N, steps, 2)        # one-hot over CartPole's 2 actions
    assert td["next", "observation"].shape == (N, steps, OBS)
    for key in ("reward", "done", "terminated", "truncated"):
        assert td["next", key].shape == (N, steps, 1)


def check_episode_boundaries(td) -> None:
    """Each env continues from its next observation, except after a done, where it starts
    a fresh episode; the done step keeps the episode's own last observation."""
    done = td["next", "done"].squeeze(-1)[:, :-1]
    assert done.any(), "no episode ended: the rollout is too short to test resets"
    nxt, following = td["next", "observation"][:, :-1], td["observation"][:, 1:]
    assert torch.equal(following[~done], nxt[~done])
    for i, t in done.nonzero().tolist():
        assert is_fresh_cartpole(following[i, t]), (i, t)
        assert not torch.equal(following[i, t], nxt[i, t]), (i, t)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_rollout_resets_done_envs(wrapped, mode):
    w = wrapped(mode)
    torch.manual_seed(0)
    w.env.set_seed(0)
    steps = 60
    w.resets.clear()                                  # GymWrapper resets while it builds specs
    td = w.env.rollout(steps, break_when_any_done=False)
    check_shapes(td, steps)
    check_episode_boundaries(td)
    assert not td["next", "worker_restarted"].any()
    done = td["next", "done"].squeeze(-1).numpy()
    if mode == AutoresetMode.DISABLED:
        # one full reset, then exactly the done envs of each step (the last step is not reset)
        expected = [done[:, t] for t in range(steps - 1) if done[:, t].any()]
        assert w.resets[0] is None
        assert len(w.resets) == 1 + len(expected)
        for got, want in zip(w.resets[1:], expected):
            np.testing.assert_array_equal(got, want)
    else:
        assert w.resets == [None]                     # fastvec reset the done envs itself


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_worker_killed_mid_rollout_truncates_its_env(wrapped, mode):
    w = wrapped(mode)
    torch.manual_seed(0)
    w.env.set_seed(0)
    steps, victim, kill_after = 30, 1, 5
    calls = [0]

    def kill_during_rollout(env, td):
        calls[0] += 1
        if calls[0] == kill_after:
            w.kill_worker(victim)

    td = w.env.rollout(steps, break_when_any_done=False, callback=kill_during_rollout)
    check_shapes(td, steps)
    t = kill_after                                    # the step after the kill
    restarted = td["next", "worker_restarted"]
    assert restarted.nonzero().tolist() == [[victim, t]]
    assert td["next", "truncated"][victim, t].item()
    assert not td["next", "terminated"][victim, t].item()
    assert td["next", "reward"][victim, t].item() == 0.0
    # the killed env did not move: its last observation comes back, then a new episode starts
    assert torch.equal(td["next", "observation"][victim, t], td["observation"][victim, t])
    assert is_fresh_cartpole(td["observation"][victim, t + 1])
    check_episode_boundaries(td)
    assert [h["restarts"] for h in w.fast.health()] == [0, 1, 0]
    if mode == AutoresetMode.DISABLED:
        assert any(m is not None and m[victim] for m in w.resets[1:])


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_worker_killed_mid_rollout_resumes_it(wrapped, mode):
    """With resume (the default) the rollout is the one a run without the kill gives."""
    tds = []
    for kill in (False, True):
        w = wrapped(mode, resume="auto")
        torch.manual_seed(0)
        w.env.set_seed(0)
        calls = [0]

        def kill_during_rollout(env, td):
            calls[0] += 1
            if kill and calls[0] == 5:
                w.kill_worker(1)

        tds.append(w.env.rollout(30, break_when_any_done=False, callback=kill_during_rollout))
        assert not tds[-1]["next", "worker_restarted"].any()
    plain, killed = tds
    for key in (("observation",), ("next", "observation"), ("next", "reward"),
                ("next", "terminated"), ("next", "truncated"), ("action",)):
        assert torch.equal(plain[key], killed[key]), key
    assert [h["resumed"] for h in w.fast.health()] == [0, 1, 0]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_collector_survives_a_worker_killed_between_batches(wrapped, mode):
    w = wrapped(mode)
    torch.manual_seed(0)
    w.env.set_seed(0)
    victim, frames = 0, 30
    collector = Collector(w.env, None, frames_per_batch=frames, total_frames=3 * frames)
    try:
        batches = []
        for i, batch in enumerate(collector):        # policy None: random actions
            assert batch.batch_size == (N, frames // N)
            batches.append(batch.clone())
            if i == 0:
                w.kill_worker(victim)
            elif i == 1:                              # the last batch closes the env
                restarts = [h["restarts"] for h in w.fast.health()]
    finally:
        collector.shutdown()
    assert len(batches) == 3
    first, second = batches[0], batches[1]
    assert not first["next", "worker_restarted"].any()
    # the first step after the kill truncates the victim's episode and nothing else
    assert second["next", "worker_restarted"].nonzero().tolist() == [[victim, 0]]
    assert second["next", "truncated"][victim, 0].item()
    assert second["next", "reward"][victim, 0].item() == 0.0
    assert is_fresh_cartpole(second["observation"][victim, 1])
    assert restarts == [1, 0, 0]


def test_next_step_mode_is_refused_by_torchrl():
    """TorchRL reads ``autoreset_mode`` off the vector env and accepts only SAME_STEP and
    DISABLED: fastvec's default (NEXT_STEP) must be changed for it."""
    fast = FastVectorEnv([cartpole] * 2, context="fork")
    try:
        with pytest.raises(RuntimeError, match="SAME_STEP or DISABLED"):
            GymWrapper(fast)
    finally:
        fast.close()
