"""fastvec under RLlib's new API stack: PPO samples through ``gym_env_vectorize_mode=
"vector_entry_point"``, and a SIGKILLed worker costs no episode (it is resumed), not a rebuilt
EnvRunner.

RLlib's SingleAgentEnvRunner calls ``gymnasium.make_vec(config.env, num_envs=
num_envs_per_env_runner, vectorization_mode=VECTOR_ENTRY_POINT, **env_config)``, so a
registered id's ``vector_entry_point`` builds the vector env and ``env_config`` keys that
name a FastVectorEnv parameter reach it. RLlib assumes gymnasium's default autoreset mode
(NEXT_STEP), which is fastvec's default too.
"""

from __future__ import annotations

import gc
import os
import signal

import gymnasium as gym
import psutil
import pytest

pytest.importorskip("torch")
ray = pytest.importorskip("ray")
# Imported without a skip: with ray present, an RLlib that cannot import (e.g. pyarrow built
# for numpy 2 next to numpy 1) is a broken install to report, not a reason to skip.
from ray.rllib.algorithms.ppo import PPOConfig  # noqa: E402
from ray.rllib.utils.metrics import (ENV_RUNNER_RESULTS, LEARNER_RESULTS,  # noqa: E402
                                     NUM_ENV_STEPS_SAMPLED_LIFETIME)

import fastvec  # noqa: E402
from conftest import my_leftovers, wait_until, worker_children  # noqa: E402

ENV_ID = "fastvec-test/CartPole-v1"
if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="gymnasium.envs.classic_control.cartpole:CartPoleEnv",
                 max_episode_steps=500, vector_entry_point=fastvec.vector_entry_point(ENV_ID))

NUM_ENVS = 2
BATCH = 64


@pytest.fixture(scope="module")
def ray_processes():
    """One local Ray for the module; the pids of the processes it started."""
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    # "local": a new instance even where a cluster's address is lying around (RAY_ADDRESS,
    # /tmp/ray/ray_current_cluster left by another run)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        yield {p.pid for p in me.children()} - before
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def no_leaks(ray_processes):
    """conftest's leak check, less Ray's own processes (they live as long as the module)."""
    def not_ray(proc):
        try:
            return not ({proc.pid} | {p.pid for p in proc.parents()}) & ray_processes
        except psutil.Error:
            return False

    yield
    gc.collect()
    assert wait_until(lambda: not my_leftovers(), 5.0), f"leaked in /dev/shm: {my_leftovers()}"
    leaked = lambda: [p.pid for p in worker_children() if not_ray(p)]  # noqa: E731
    assert wait_until(lambda: not leaked(), 5.0), f"leaked processes: {leaked()}"


class Recorder:
    """What the local EnvRunner's callbacks saw; optionally kills one fastvec worker from
    inside sampling (at the next episode step once armed)."""

    def __init__(self):
        self.envs_created = []
        self.episodes_ended = []        # (terminated, truncated, last infos)
        self.kill_worker = None         # worker index to SIGKILL at its env's next mid-episode step


# RLlib deep-copies its config, bound methods and their instance with it: the callbacks are
# module functions writing to the one current Recorder.
REC = Recorder()


def on_environment_created(*, env, **kwargs):
    REC.envs_created.append(env)


def on_episode_step(*, env, env_index, episode, **kwargs):
    # Kill worker w (it hosts env w) while env w is mid-episode: killed right after its
    # episode ended, it would cost no episode (its next step is the reset step anyway).
    if REC.kill_worker == env_index and not episode.is_done:
        os.kill(env.health()[REC.kill_worker]["pid"], signal.SIGKILL)
        REC.kill_worker = None


def log_fastvec_health(*, env_runner, metrics_logger, **kwargs):
    """docs/observe.md's RLlib recipe: fastvec's health in the env runner's metrics."""
    for key, value in fastvec.health_metrics(env_runner.env.unwrapped.health()).items():
        metrics_logger.log_value(("fastvec", key), value, reduce="max", window=1)


def on_episode_end(*, episode, **kwargs):
    REC.episodes_ended.append((episode.is_terminated, episode.is_truncated,
                               episode.get_infos(-1)))


@pytest.fixture
def ppo():
    """A PPO on the new API stack whose local EnvRunner samples from a FastVectorEnv."""
    global REC
    rec = REC = Recorder()
    config = (
        PPOConfig()
        # "context": the test id is registered here, so workers must be forked to know it
        .environment(ENV_ID, env_config={"context": "fork"})
        .env_runners(num_env_runners=0, num_envs_per_env_runner=NUM_ENVS,
                     gym_env_vectorize_mode="vector_entry_point",
                     rollout_fragment_length=BATCH // NUM_ENVS)
        .training(train_batch_size_per_learner=BATCH, minibatch_size=BATCH // 2, num_epochs=1)
        .callbacks(on_environment_created=on_environment_created,
                   on_episode_step=on_episode_step, on_episode_end=on_episode_end,
                   on_sample_end=log_fastvec_health)
    )
    algo = config.build_algo()
    try:
        yield algo, rec
    finally:
        algo.stop()


def test_ppo_iteration_samples_from_fastvec(ppo, ray_processes):
    algo, rec = ppo
    runner = algo.env_runner                      # the local one: num_env_runners=0
    fast = runner.env.unwrapped
    assert isinstance(fast, fastvec.FastVectorEnv)
    assert fast.num_envs == NUM_ENVS
    assert fast.autoreset_mode == gym.vector.AutoresetMode.NEXT_STEP
    assert rec.envs_created == [fast]
    result = algo.train()
    assert result["training_iteration"] == 1
    assert result[ENV_RUNNER_RESULTS][NUM_ENV_STEPS_SAMPLED_LIFETIME] >= BATCH
    assert LEARNER_RESULTS in result
    algo.stop()
    assert fast.closed                            # stopping the algorithm closes fastvec


def test_worker_killed_while_sampling_costs_no_episode(ppo):
    """With resume (the default) the killed worker's episode is replayed and goes on: no
    truncated episode reaches RLlib (with resume="off" it would be one, flagged)."""
    algo, rec = ppo
    runner = algo.env_runner
    fast = runner.env.unwrapped
    algo.train()
    before = len(rec.episodes_ended)
    rec.kill_worker = 1                           # killed inside the next sample()
    result = algo.train()
    assert rec.kill_worker is None, "the kill did not happen"
    assert result["training_iteration"] == 2
    assert not [e for e in rec.episodes_ended[before:] if e[2].get("worker_restarted")]
    assert fast.health()[1]["resumed"] == 1
    # the recipe in docs/observe.md: the same figures in RLlib's own results
    health = result[ENV_RUNNER_RESULTS]["fastvec"]
    assert health["restarts"] == 1 and health["resumed_episodes"] == 1, health
    # the same runner and env went on: no env rebuilt, no step failure seen by RLlib
    assert algo.env_runner is runner and runner.env.unwrapped is fast
    assert rec.envs_created == [fast]
    assert result[ENV_RUNNER_RESULTS].get("num_env_step_failures", 0) == 0
    assert [h["restarts"] for h in fast.health()] == [0, 1]
