"""A user's program, for type checkers only: mypy must accept it (.ci/docs runs it).

It uses fastvec's public API as the docs show it, against the *installed* package, so it
also proves that the ``py.typed`` marker ships. The lines marked ``# type: ignore[...]``
are deliberate mistakes: with ``warn_unused_ignores`` (pyproject.toml) mypy fails if it
ever stops flagging them, e.g. because a signature lost its annotations or grew a
``**kwargs`` that swallows misspelt keywords.

Not a test module: pytest collects ``test_*.py`` only, and nothing here is meant to run
(it would start worker processes).
"""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

import fastvec
from fastvec import FastVectorEnv, make_vec, vector_entry_point


def cartpole() -> gym.Env:
    return gym.make("CartPole-v1")


def build() -> FastVectorEnv:
    return FastVectorEnv(
        [cartpole] * 4,
        context="fork",
        copy=False,
        autoreset_mode=AutoresetMode.SAME_STEP,
        envs_per_worker=2,
        on_failure="raise",
        on_budget_exhausted="disable",
        heartbeat_timeout=5.0,
        step_timeout=10.0,
        start_timeout=30.0,
        max_restarts=3,
        restart_window=60.0,
        ring_depth=3,
        max_payload_bytes=1 << 20,
        info_spec={"burned_cells": int, "heat": (np.float32, (8,))},
        spin_us="auto",
        daemon=True,
    )


def loop(envs: FastVectorEnv) -> int:
    obs, infos = envs.reset(seed=42)
    restarts = 0
    for _ in range(10):
        obs, rewards, terminated, truncated, infos = envs.step(envs.action_space.sample())
        if "worker_restarted" in infos:
            restarts += int(np.count_nonzero(infos["_worker_restarted"]))
    health: list[dict] = envs.health()
    n: int = envs.num_envs
    envs.close()
    return restarts + len(health) + n


def other_builders() -> list[FastVectorEnv]:
    auto = FastVectorEnv([functools.partial(gym.make, "CartPole-v1")] * 2,
                         step_timeout="auto", batch_size=1)
    off = FastVectorEnv([cartpole], step_timeout=None, context="serial")
    by_id = make_vec("CartPole-v1", 4, vector_kwargs={"envs_per_worker": 2})
    creator = vector_entry_point("CartPole-v1")
    gym.register("TypedCartPole-v1", entry_point="gymnasium.envs.classic_control:CartPoleEnv",
                 vector_entry_point=creator)
    return [auto, off, by_id]


def errors(envs: FastVectorEnv) -> str:
    try:
        envs.step(envs.action_space.sample())
    except fastvec.RestartBudgetExceeded as exc:
        return f"budget: {exc.reason} {exc.env_indices}"
    except fastvec.WorkerFailure as exc:
        reason: str = exc.reason
        code: int | None = exc.exitcode
        return f"{reason} {code} {exc.worker_index}"
    except fastvec.WaitTimeout:
        return "timeout"
    return ""


def mistakes() -> None:
    # A misspelt keyword (step_timout) must be an error...
    FastVectorEnv([cartpole], step_timout=10.0)  # type: ignore[call-arg]
    # ... and so must a value of the wrong type.
    FastVectorEnv([cartpole], envs_per_worker="2")  # type: ignore[arg-type]
