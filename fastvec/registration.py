"""Building FastVectorEnvs from registered gymnasium ids: ``make_vec`` and the creator
that ``gymnasium.register(..., vector_entry_point=...)`` takes."""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import gymnasium as gym

from fastvec.vector_env import FastVectorEnv

__all__ = ["make_vec", "vector_entry_point"]


def make_vec(env_id: str, num_envs: int = 1, *, vector_kwargs: dict | None = None,
             wrappers: Sequence[Callable] | None = None, **env_kwargs) -> FastVectorEnv:
    """A FastVectorEnv of ``num_envs`` copies of a registered gymnasium env.

    ``env_kwargs`` go to ``gymnasium.make``; ``vector_kwargs`` to FastVectorEnv.
    """
    fn = functools.partial(_make_wrapped, env_id, tuple(wrappers or ()), env_kwargs)
    return FastVectorEnv([fn] * num_envs, **(vector_kwargs or {}))


def _make_wrapped(env_id, wrappers, env_kwargs):
    env = gym.make(env_id, **env_kwargs)
    for wrapper in wrappers:
        env = wrapper(env)
    return env


_VECTOR_ARGS = set(inspect.signature(FastVectorEnv).parameters) - {"env_fns"}


def vector_entry_point(env_id: str):
    """A creator for ``gymnasium.register(..., vector_entry_point=...)``.

    gymnasium calls it as ``creator(num_envs=n, **kwargs)``; kwargs that name a
    FastVectorEnv parameter go to it, the rest to the env.
    """
    def creator(num_envs: int = 1, **kwargs):
        vec = {k: kwargs.pop(k) for k in list(kwargs) if k in _VECTOR_ARGS}
        return make_vec(env_id, num_envs, vector_kwargs=vec, **kwargs)

    return creator
