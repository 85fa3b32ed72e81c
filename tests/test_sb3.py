"""fastvec.sb3.SB3VecEnv against Stable-Baselines3's own DummyVecEnv, step for step, and
under SB3's wrappers and PPO, with a worker killed mid-learn."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

pytest.importorskip("stable_baselines3")

from stable_baselines3 import PPO  # noqa: E402
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.monitor import Monitor  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor, VecNormalize  # noqa: E402

from fastvec.sb3 import (EnvCheckpointCallback, HealthCallback, SB3VecEnv,  # noqa: E402
                         load_env_state)

N = 4


def cartpole(max_steps: int = 25) -> gym.Env:
    return Monitor(gym.make("CartPole-v1", max_episode_steps=max_steps))


class KnobEnv(gym.Env):
    """Infos whose types and shapes vary between envs and steps, options echoed in the
    reset info, an attribute and a method with side effects, images from render()."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, render_mode=None):
        self.observation_space = spaces.Box(-10.0, 10.0, (3,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.render_mode = render_mode
        self.level = 0
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {"options": options, "seeded": seed is not None}

    def step(self, action):
        self.t += 1
        # an int in one env, a float in another; arrays of varying length
        x = 1 if self.np_random.random() < 0.5 else 1.5
        info = {"x": x, "arr": np.arange(self.t % 3)} if self.t % 2 else {}
        terminated = bool(self.np_random.random() < 0.1)
        return self._obs(), float(action) + 0.25, terminated, self.t >= 7, info

    def render(self):
        return np.full((4, 6, 3), self.level, np.uint8)

    def bump(self, k=1):
        self.level += k
        return self.level

    def _obs(self):
        return self.np_random.uniform(-1, 1, 3).astype(np.float32)


def knob(i: int, render_mode=None) -> gym.Env:
    env = KnobEnv(render_mode)
    return Monitor(env) if i % 2 == 0 else env


def assert_same_infos(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if key == "terminal_observation":
                np.testing.assert_array_equal(g[key], w[key])
            elif key == "episode":  # "t" is wall time
                assert (g[key]["r"], g[key]["l"]) == (w[key]["r"], w[key]["l"])
            elif isinstance(w[key], np.ndarray):
                assert g[key].dtype == w[key].dtype
                np.testing.assert_array_equal(g[key], w[key])
            else:
                assert g[key] == w[key] and type(g[key]) is type(w[key]), key


def test_import_fastvec_does_not_import_sb3_or_torch():
    code = ("import sys, fastvec; bad = [m for m in ('stable_baselines3', 'torch') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_matches_dummy_vec_env_step_for_step():
    fns = [cartpole] * N
    ours, ref = SB3VecEnv(fns), DummyVecEnv(fns)
    try:
        assert ours.seed(5) == ref.seed(5) == [5, 6, 7, 8]
        np.testing.assert_array_equal(ours.reset(), ref.reset())
        assert_same_infos(ours.reset_infos, ref.reset_infos)
        rng = np.random.default_rng(0)
        truncations = terminations = 0
        for t in range(300):
            if t == 150:  # seeds apply at the next reset, once
                ours.seed(11), ref.seed(11)
                np.testing.assert_array_equal(ours.reset(), ref.reset())
            actions = rng.integers(0, 2, N)
            (o1, r1, d1, i1), (o2, r2, d2, i2) = ours.step(actions), ref.step(actions)
            np.testing.assert_array_equal(o1, o2)
            assert r1.dtype == r2.dtype and d1.dtype == d2.dtype
            np.testing.assert_array_equal(r1, r2)
            np.testing.assert_array_equal(d1, d2)
            assert_same_infos(i1, i2)
            assert_same_infos(ours.reset_infos, ref.reset_infos)
            truncations += sum(i["TimeLimit.truncated"] for i in i1)
            terminations += sum(d and not i["TimeLimit.truncated"] for d, i in zip(d1, i1))
        assert truncations and terminations
    finally:
        ours.close()
        ref.close()


def test_infos_options_and_images_match_dummy_vec_env():
    fns = [functools.partial(knob, i, "rgb_array") for i in range(N)]
    ours, ref = SB3VecEnv(fns), DummyVecEnv(fns)
    try:
        for venv in (ours, ref):
            venv.seed(1)
            venv.set_options([{"level": i} if i != 2 else {} for i in range(N)])
        np.testing.assert_array_equal(ours.reset(), ref.reset())
        assert_same_infos(ours.reset_infos, ref.reset_infos)
        assert ours.reset_infos[1] == {"options": {"level": 1}, "seeded": True}
        assert ours.reset_infos[2]["options"] is None  # empty options are not passed
        ours.set_options({"level": 9}), ref.set_options({"level": 9})
        ours.reset(), ref.reset()
        assert_same_infos(ours.reset_infos, ref.reset_infos)
        assert ours.reset_infos[0] == {"options": {"level": 9}, "seeded": False}
        rng = np.random.default_rng(1)
        for _ in range(40):
            actions = rng.integers(0, 2, N)
            (o1, r1, d1, i1), (o2, r2, d2, i2) = ours.step(actions), ref.step(actions)
            np.testing.assert_array_equal(o1, o2)
            np.testing.assert_array_equal(r1, r2)
            np.testing.assert_array_equal(d1, d2)
            assert_same_infos(i1, i2)
        ours.env_method("bump", 3, indices=[1])
        ref.env_method("bump", 3, indices=[1])
        for a, b in zip(ours.get_images(), ref.get_images()):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ours.render(), ref.render())
    finally:
        ours.close()
        ref.close()


def test_indexed_calls_match_dummy_vec_env():
    fns = [functools.partial(knob, i) for i in range(N)]
    ours, ref = SB3VecEnv(fns), DummyVecEnv(fns)
    try:
        for venv in (ours, ref):
            venv.reset()
        calls = [
            ("env_method", ("bump", 2), {"indices": [1, 3]}),
            ("env_method", ("bump",), {"k": 5, "indices": 0}),
            ("env_method", ("bump",), {"indices": [2, 2, -1]}),  # repeats call twice
            ("get_attr", ("level",), {}),
            ("set_attr", ("level", 7), {"indices": [0, 2]}),
            ("get_attr", ("level",), {"indices": [2, 0, 1]}),
            ("set_attr", ("level", -1), {"indices": []}),
            ("get_attr", ("level",), {"indices": 3}),
            ("env_is_wrapped", (Monitor,), {}),
            ("env_is_wrapped", (Monitor,), {"indices": [1, 2]}),
            ("env_is_wrapped", (gym.Wrapper,), {"indices": [3]}),
            ("has_attr", ("level",), {}),
            ("has_attr", ("no_such_attr",), {}),
            ("get_attr", ("render_mode",), {}),
        ]
        for name, args, kwargs in calls:
            assert getattr(ours, name)(*args, **kwargs) == getattr(ref, name)(*args, **kwargs), name
        assert ours.get_attr("level") == [7, 2, 7, 3]
        assert ours.get_attr("level", indices=np.int64(3)) == [3]  # DummyVecEnv: TypeError
        with pytest.raises(AttributeError):
            ours.get_attr("no_such_attr", indices=[1])
        with pytest.raises(IndexError):
            ours.env_method("bump", indices=[N])
    finally:
        ours.close()
        ref.close()


def test_vec_normalize_and_vec_monitor_on_top_match_dummy_vec_env():
    fns = [functools.partial(gym.make, "CartPole-v1", max_episode_steps=30)] * N
    ours = VecNormalize(VecMonitor(SB3VecEnv(fns)), gamma=0.9)
    ref = VecNormalize(VecMonitor(DummyVecEnv(fns)), gamma=0.9)
    try:
        ours.seed(3), ref.seed(3)
        np.testing.assert_allclose(ours.reset(), ref.reset())
        rng = np.random.default_rng(2)
        episodes = 0
        for _ in range(200):
            actions = rng.integers(0, 2, N)
            (o1, r1, d1, i1), (o2, r2, d2, i2) = ours.step(actions), ref.step(actions)
            np.testing.assert_allclose(o1, o2)
            np.testing.assert_allclose(r1, r2)
            np.testing.assert_array_equal(d1, d2)
            for a, b in zip(i1, i2):
                assert ("episode" in a) == ("episode" in b)
                if "episode" in a:
                    episodes += 1
                    assert (a["episode"]["r"], a["episode"]["l"]) == \
                        (b["episode"]["r"], b["episode"]["l"])
                    np.testing.assert_allclose(a["terminal_observation"],
                                               b["terminal_observation"])
        assert episodes and ours.obs_rms.count == ref.obs_rms.count
        assert ours.unwrapped.health()[0]["restarts"] == 0  # reaches through the wrappers
    finally:
        ours.close()
        ref.close()


def _ppo(env) -> PPO:
    import torch

    torch.set_num_threads(1)
    return PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=2, seed=0, device="cpu",
               policy_kwargs={"net_arch": [32]})


def test_ppo_learns_on_cartpole():
    env = make_vec_env("CartPole-v1", n_envs=N, seed=0, vec_env_cls=SB3VecEnv,
                       vec_env_kwargs={"step_timeout": 30.0})
    try:
        model = _ppo(env).learn(total_timesteps=1024)
        assert model.num_timesteps >= 1024
        assert len(model.ep_info_buffer) > 0  # Monitor's episode infos reached PPO
    finally:
        env.close()


class KillWorker(BaseCallback):
    """SIGKILL worker ``w`` at the ``at``-th step of the rollout; record what follows."""

    def __init__(self, venv: SB3VecEnv, w: int, at: int):
        super().__init__()
        self.venv, self.w, self.at = venv, w, at
        self.calls = 0
        self.pid = None
        self.seen = []  # (info, done, reward) of the killed worker's env after the kill

    def _on_step(self) -> bool:
        self.calls += 1
        if self.pid is not None:
            i = self.w
            self.seen.append((self.locals["infos"][i], bool(self.locals["dones"][i]),
                              float(self.locals["rewards"][i])))
        if self.calls == self.at:
            self.pid = self.venv.health()[self.w]["pid"]
            os.kill(self.pid, signal.SIGKILL)
        return True


def test_ppo_keeps_learning_when_a_worker_is_killed_and_resumes_the_episode():
    venv = SB3VecEnv([cartpole] * N, step_timeout=30.0)
    try:
        venv.seed(0)
        cb = KillWorker(venv, w=1, at=20)
        model = _ppo(venv).learn(total_timesteps=1024, callback=cb)
        assert model.num_timesteps >= 1024
        resumed = [s for s in cb.seen if s[0].get("worker_resumed")]
        assert len(resumed) == 1 and not any(s[0].get("worker_restarted") for s in cb.seen)
        info, done, reward = resumed[0]
        assert reward == 1.0 and info["worker_resumed_reason"].startswith("died")
        assert venv.health()[1]["resumed"] == 1
    finally:
        venv.close()


def test_ppo_keeps_learning_when_a_worker_is_killed_without_resume():
    venv = SB3VecEnv([cartpole] * N, step_timeout=30.0, resume="off")
    try:
        venv.seed(0)
        cb = KillWorker(venv, w=1, at=20)
        model = _ppo(venv).learn(total_timesteps=1024, callback=cb)
        assert model.num_timesteps >= 1024
        restarted = [s for s in cb.seen if s[0].get("worker_restarted")]
        assert len(restarted) == 1
        info, done, reward = restarted[0]
        assert done and reward == 0.0
        assert info["TimeLimit.truncated"] is True
        assert info["terminal_observation"].shape == (4,)
        assert info["worker_restart_reason"].startswith("died")
        health = venv.health()[1]
        assert health["restarts"] == 1 and health["pid"] != cb.pid
    finally:
        venv.close()


def test_disabled_env_is_done_and_truncated_until_reset():
    venv = SB3VecEnv([cartpole] * 2, max_restarts=0, on_budget_exhausted="disable")
    try:
        venv.seed(0)
        venv.reset()
        obs, _, _, _ = venv.step(np.zeros(2, np.int64))
        os.kill(venv.health()[0]["pid"], signal.SIGKILL)
        for _ in range(2):
            new_obs, rewards, dones, infos = venv.step(np.zeros(2, np.int64))
            assert dones[0] and rewards[0] == 0.0
            assert infos[0]["env_disabled"] is True and infos[0]["TimeLimit.truncated"] is True
            np.testing.assert_array_equal(infos[0]["terminal_observation"], obs[0])
            np.testing.assert_array_equal(new_obs[0], obs[0])
            assert "env_disabled" not in infos[1]
        assert venv.health()[0]["disabled"]
        venv.reset()  # tries the env again
        assert not venv.health()[0]["disabled"]
        _, _, dones, infos = venv.step(np.zeros(2, np.int64))
        assert "env_disabled" not in infos[0]
    finally:
        venv.close()


@pytest.mark.parametrize("kwargs", [{"autoreset_mode": "NextStep"}, {"copy": False}])
def test_rejects_what_sb3_cannot_use(kwargs):
    with pytest.raises(ValueError, match="SB3VecEnv needs"):
        SB3VecEnv([cartpole] * 2, **kwargs)


class RecordAtSave(EnvCheckpointCallback):
    """The checkpoint callback, noting the observations the env had at each save."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_obs: dict[int, np.ndarray] = {}

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            self.saved_obs[self.num_timesteps] = self.locals["new_obs"].copy()
        return super()._on_step()


def test_env_state_is_checkpointed_with_the_model_and_loaded_back(tmp_path):
    """The model and the env state side by side; a fresh process's env is replayed to the
    checkpoint and the loaded model's next rollout starts from the same observations."""
    venv = SB3VecEnv([cartpole] * N)
    try:
        venv.seed(0)
        cb = RecordAtSave(save_freq=16, save_path=str(tmp_path), name_prefix="ppo")
        _ppo(venv).learn(total_timesteps=128, callback=cb)
    finally:
        venv.close()
    steps = sorted(cb.saved_obs)
    assert steps and all((tmp_path / f"ppo_{t}_steps.zip").exists() for t in steps)
    assert all((tmp_path / f"ppo_fastvec_env_{t}_steps.pkl").exists() for t in steps)
    t = steps[len(steps) // 2]
    fresh = SB3VecEnv([cartpole] * N)
    try:
        model = PPO.load(str(tmp_path / f"ppo_{t}_steps.zip"), env=fresh)
        obs = load_env_state(model, str(tmp_path / f"ppo_fastvec_env_{t}_steps.pkl"))
        np.testing.assert_array_equal(obs, cb.saved_obs[t])
        assert all(info["worker_resumed"] for info in fresh.reset_infos)
        model.learn(total_timesteps=64, reset_num_timesteps=False)  # no reset: goes on
        assert model.num_timesteps >= t + 64
    finally:
        fresh.close()


def test_load_env_state_refuses_an_env_that_is_not_fastvec(tmp_path):
    model = PPO("MlpPolicy", DummyVecEnv([cartpole]), n_steps=16, batch_size=16)
    with pytest.raises(TypeError, match="not fastvec.sb3.SB3VecEnv"):
        load_env_state(model, str(tmp_path / "nothing.pkl"))


def test_health_lands_in_tensorboard_beside_the_losses(tmp_path):
    """HealthCallback's figures, read back from the TensorBoard event files SB3 wrote."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing."
                                            "event_accumulator")
    venv = SB3VecEnv([cartpole] * N, step_timeout=30.0)
    try:
        venv.seed(0)
        model = PPO("MlpPolicy", venv, n_steps=64, batch_size=64, n_epochs=1, seed=0,
                    device="cpu", policy_kwargs={"net_arch": [16]},
                    tensorboard_log=str(tmp_path))
        kill = KillWorker(venv, w=1, at=80)  # in the second rollout (64 steps each)
        model.learn(total_timesteps=3 * 64 * N,
                    callback=[kill, HealthCallback(every=16)], tb_log_name="run")
    finally:
        venv.close()
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("run")]
    acc = event_accumulator.EventAccumulator(str(run))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags  # the losses, in the same files
    for tag in ("fastvec/restarts", "fastvec/restarts_died", "fastvec/resumed_episodes",
                "fastvec/step_latency_p99_ms", "fastvec/env_steps_per_s"):
        assert tag in tags, (tag, tags)
    restarts = [e.value for e in acc.Scalars("fastvec/restarts")]
    assert restarts[0] == 0 and restarts[-1] == 1  # the kill, as it happened
    assert [e.value for e in acc.Scalars("fastvec/resumed_episodes")][-1] == 1
    assert all(e.value > 0 for e in acc.Scalars("fastvec/env_steps_per_s"))
