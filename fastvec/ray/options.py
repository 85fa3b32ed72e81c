"""RayVectorEnv's keywords, checked once: what the driver keeps, what each node's
FastVectorEnv is built with, and the Ray options of the actors."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
from gymnasium.vector import AutoresetMode

from fastvec.vector_env import FastVectorEnv

# FastVectorEnv keywords the driver keeps for itself instead of forwarding to the nodes.
_DRIVER_ONLY = {"env_fns", "copy", "batch_size"}
_NODE_PARAMETERS = inspect.signature(FastVectorEnv).parameters
NODE_KWARGS = set(_NODE_PARAMETERS) - _DRIVER_ONLY


def check_node_kwargs(fastvec_kwargs: Mapping[str, Any]) -> None:
    unknown = set(fastvec_kwargs) - NODE_KWARGS
    if unknown:
        raise TypeError(f"RayVectorEnv got unexpected keywords {sorted(unknown)}; the "
                        f"nodes' FastVectorEnv takes {sorted(NODE_KWARGS)}")


def env_fns_of(env_fns: Sequence[Callable[[], gym.Env]] | str, num_envs: int | None,
               env_kwargs: Mapping[str, Any] | None) -> list:
    """The env functions: ``env_fns`` itself, or ``num_envs`` makers of an env id."""
    if isinstance(env_fns, str):
        if num_envs is None:
            raise ValueError("num_envs is needed when env_fns is an env id")
        env_fns = [functools.partial(gym.make, env_fns, **dict(env_kwargs or {}))] * num_envs
    else:
        env_fns = list(env_fns)
        if num_envs is not None and num_envs != len(env_fns):
            raise ValueError(f"num_envs={num_envs} but {len(env_fns)} env_fns")
        if env_kwargs:
            raise ValueError("env_kwargs go with an env id, not with env_fns")
    if not env_fns:
        raise ValueError("RayVectorEnv needs at least one env_fn")
    return env_fns


@dataclass(frozen=True)
class RayOptions:
    autoreset_mode: AutoresetMode
    on_failure: str
    validate_actions: bool
    batch_size: int | None
    actor_timeout: float
    max_actor_restarts: int
    actor_restart_window: float
    node_kwargs: dict  # each node's FastVectorEnv keywords
    resume: bool  # the driver keeps the episode logs: a lost actor's episodes go on
    max_replay_steps: int
    actor_options: dict  # Ray's ActorClass.options() of every actor

    @classmethod
    def of(cls, num_envs: int, fastvec_kwargs: dict, *, actor_timeout: float,
           max_actor_restarts: int, actor_restart_window: float, batch_size: int | None,
           actor_options: Mapping[str, Any] | None) -> "RayOptions":
        mode = AutoresetMode(fastvec_kwargs.get("autoreset_mode", AutoresetMode.NEXT_STEP))
        start_timeout = fastvec_kwargs.get("start_timeout", 60.0)
        step_timeout = fastvec_kwargs.get("step_timeout")
        step_bound = step_timeout if isinstance(step_timeout, (int, float)) else 0.0  # "auto"
        if not actor_timeout > max(start_timeout, step_bound):
            raise ValueError(f"actor_timeout ({actor_timeout}) must exceed start_timeout "
                             f"({start_timeout}) and step_timeout ({step_timeout})")
        if max_actor_restarts < 0 or not actor_restart_window > 0:
            raise ValueError("max_actor_restarts must be >= 0 and actor_restart_window > 0")
        if batch_size is not None:
            if not 1 <= batch_size <= num_envs:
                raise ValueError(f"batch_size must be in 1..{num_envs}, got {batch_size}")
            if mode != AutoresetMode.NEXT_STEP:
                raise ValueError("batch_size (send/recv) needs autoreset_mode=NEXT_STEP")
        return cls(
            autoreset_mode=mode, on_failure=fastvec_kwargs.get("on_failure", "respawn"),
            validate_actions=fastvec_kwargs.get("validate_actions", True),
            batch_size=batch_size, actor_timeout=float(actor_timeout),
            max_actor_restarts=max_actor_restarts,
            actor_restart_window=float(actor_restart_window),
            node_kwargs={**fastvec_kwargs, "autoreset_mode": mode},
            resume=fastvec_kwargs.get("resume", _NODE_PARAMETERS["resume"].default) != "off",
            max_replay_steps=fastvec_kwargs.get(
                "max_replay_steps", _NODE_PARAMETERS["max_replay_steps"].default),
            # A sliver of a CPU, not 0: Ray forwards an actor that needs no resource to a
            # random node for scheduling, and that can be a node that just died but is
            # still listed.
            actor_options={"num_cpus": 0.01, **dict(actor_options or {}),
                           "max_restarts": 0, "max_task_retries": 0})
