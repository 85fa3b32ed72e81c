"""Stable-Baselines3 on fastvec: ``SB3VecEnv``, an SB3 ``VecEnv`` over a FastVectorEnv.

    SB3 algorithm --step_async/step_wait--> SB3VecEnv --step--> FastVectorEnv (SAME_STEP)
         ^                                      |                     | shared-memory rings
         '-- obs, rewards, dones, [info, ...] --'                     v
                                                        worker: _EnvBridge(env_fn())

Every env runs inside an ``_EnvBridge``, its outermost wrapper, in its worker. The bridge
does what FastVectorEnv's all-envs ``call``/``set_attr`` cannot: it acts on SB3's
``indices`` only (``env_method``, ``get_attr``, ``set_attr``, ``env_is_wrapped``), takes
per-env reset options, and ships each info dict as one opaque value, so gymnasium's info
batching (one typed array per key) never casts or reshapes what the env returned.

Importing ``fastvec`` never imports this module; this module imports SB3 (and so torch).
"""

from __future__ import annotations

import os
import pickle
import time
import warnings
from collections import Counter
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.vec_env import (VecCheckNan, VecEnvWrapper, VecMonitor,
                                              VecNormalize, VecTransposeImage)
from stable_baselines3.common.vec_env.base_vec_env import (VecEnv, VecEnvIndices, VecEnvObs,
                                                           VecEnvStepReturn)
from stable_baselines3.common.vec_env.patch_gym import _patch_env

from fastvec.stats import health_metrics
from fastvec.vector_env import FastVectorEnv

__all__ = ["SB3VecEnv", "EnvCheckpointCallback", "HealthCallback", "load_env_state"]

_INFO = "sb3_info"  # the boxed info dict of one env, in FastVectorEnv's batched infos
_OPTIONS = "fastvec_sb3_options"  # reset options: the list of per-env options
_ON_ENVS = "_fastvec_sb3_on_envs"  # the bridge method that serves indexed calls


class _Boxed:
    """An env's info dict; gymnasium's ``_add_info`` stores it as one object per env."""

    __slots__ = ("info",)

    def __init__(self, info: dict):
        self.info = info

    def __getstate__(self):
        return (self.info,)  # never falsy: pickle skips __setstate__ for a falsy state

    def __setstate__(self, state):
        self.info = state[0]


def _box(info: dict) -> dict:
    return {_INFO: _Boxed(info)} if info else {}  # empty infos cost nothing on the ring


def _call(env, name, args, kwargs):
    return env.get_wrapper_attr(name)(*args, **kwargs)


def _get(env, name, args, kwargs):
    return env.get_wrapper_attr(name)


def _set(env, name, args, kwargs):
    setattr(env, name, args[0])  # SB3 sets on the env its env_fn returned, not deeper


def _wrapped(env, name, args, kwargs):
    return is_wrapped(env, args[0])


_HANDLERS = {"call": _call, "get": _get, "set": _set, "wrapped": _wrapped}


class _EnvBridge(gym.Wrapper):
    """Outermost wrapper of each env inside its worker (see the module docstring)."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self._fastvec_index = index

    @property
    def spec(self):
        return self.env.spec  # the bridge is not part of the user's env

    def reset(self, *, seed=None, options=None):
        if options is not None and _OPTIONS in options:
            options = options[_OPTIONS][self._fastvec_index]
        # As DummyVecEnv: options are passed only when there are some.
        kwargs = {"options": options} if options else {}
        obs, info = self.env.reset(seed=seed, **kwargs)
        return obs, _box(info)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, _box(info)

    def _fastvec_sb3_on_envs(self, op: str, indices: list, name: str, args: tuple, kwargs: dict):
        """Run ``op`` once per occurrence of this env in ``indices`` (as DummyVecEnv does)."""
        handler = _HANDLERS[op]
        return [handler(self.env, name, args, kwargs)
                for _ in range(indices.count(self._fastvec_index))]


class _BridgedFn:
    """``env_fn`` with its env wrapped in the bridge (module level: it pickles for spawn)."""

    def __init__(self, fn: Callable[[], gym.Env], index: int):
        self.fn = fn
        self.index = index

    def __call__(self) -> gym.Env:
        return _EnvBridge(_patch_env(self.fn()), self.index)


def _unbatch(infos: dict, i: int) -> dict:
    """Env ``i``'s entries of gymnasium-batched ``infos`` (keys with their ``_key`` masks)."""
    out = {}
    for key, value in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue  # a mask
        mask = infos.get(f"_{key}")
        if mask is None or not mask[i]:
            continue
        if isinstance(value, dict):
            out[key] = _unbatch(value, i)
        elif value.dtype == object:
            out[key] = value[i]
        else:  # a typed array that _add_info built from scalars or same-shape arrays
            out[key] = value[i].item() if value.ndim == 1 else value[i].copy()
    return out


def _unbox(entry: dict | None) -> dict:
    boxed = entry.get(_INFO) if entry else None
    return boxed.info if boxed is not None else {}


class SB3VecEnv(VecEnv):
    """A Stable-Baselines3 ``VecEnv`` whose envs run in fastvec's crash-tolerant workers.

    Returns, step for step, what SB3's ``DummyVecEnv`` returns for the same seeds and
    actions: ``reset()`` returns the observations and fills ``reset_infos``; ``step`` returns
    ``(obs, rewards, dones, infos)`` with one info dict per env, ``terminal_observation`` when
    done and ``TimeLimit.truncated = truncated and not terminated``.

    An env whose worker failed comes back ``done`` with ``TimeLimit.truncated=True``, its last
    observation as ``terminal_observation``, reward 0, and ``worker_restarted`` /
    ``worker_restart_reason`` in its info, so algorithms bootstrap from it instead of learning
    a false terminal. An env taken out of play (``on_budget_exhausted="disable"``) is reported
    the same way, with ``env_disabled`` / ``env_disabled_reason``, at every step until a reset.

    Args:
        env_fns: functions that create the envs (as for ``DummyVecEnv``/``SubprocVecEnv``, so
            ``make_vec_env(..., vec_env_cls=SB3VecEnv, vec_env_kwargs={...})`` works).
        **fastvec_kwargs: keywords of ``FastVectorEnv`` (``step_timeout``, ``envs_per_worker``,
            ``context``, ...). ``autoreset_mode`` must be SAME_STEP (the default here: SB3
            resets a done env within the step) and ``copy`` True (SB3 keeps observations
            across steps, in rollout buffers and ``VecNormalize``).
    """

    _venv: FastVectorEnv | None = None

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], **fastvec_kwargs: Any):
        mode = AutoresetMode(fastvec_kwargs.pop("autoreset_mode", AutoresetMode.SAME_STEP))
        if mode != AutoresetMode.SAME_STEP:
            raise ValueError(f"SB3VecEnv needs autoreset_mode=SAME_STEP (SB3 resets a done env "
                             f"within the step that ended it), got {mode}")
        if not fastvec_kwargs.get("copy", True):
            raise ValueError("SB3VecEnv needs copy=True: SB3 keeps observations across steps "
                             "(rollout buffers, VecNormalize), and copy=False returns views "
                             "that later steps overwrite")
        fns = [_BridgedFn(fn, i) for i, fn in enumerate(env_fns)]
        self._venv = FastVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP, **fastvec_kwargs)
        self._waiting = False
        try:
            super().__init__(len(fns), self._venv.single_observation_space,
                             self._venv.single_action_space)
        except BaseException:
            self._venv.close(terminate=True)
            raise

    # -- fastvec -------------------------------------------------------------------------
    @property
    def fastvec_env(self) -> FastVectorEnv:
        """The FastVectorEnv underneath (its infos hold the envs' info dicts boxed)."""
        return self._venv

    def health(self) -> list[dict]:
        """Per worker: pid, restarts and their reasons, ... (``FastVectorEnv.health``)."""
        return self._venv.health()

    @property
    def closed(self) -> bool:
        return self._venv is None or self._venv.closed

    def state_dict(self) -> dict:
        """Every env's episode so far (``FastVectorEnv.state_dict``), to save with the model."""
        return self._venv.state_dict()

    def load_state_dict(self, state: dict) -> VecEnvObs:
        """Replay each env's saved episode (``FastVectorEnv.load_state_dict``); returns the
        current observations, as ``reset()`` does, and fills ``reset_infos``."""
        obs, infos = self._venv.load_state_dict(state)
        self.reset_infos = []
        for i in range(self.num_envs):
            entry = _unbatch(infos, i)
            info = dict(_unbox(entry))
            entry.pop(_INFO, None)
            info.update(entry)
            self.reset_infos.append(info)
        return obs

    # -- the SB3 contract ----------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        if self._waiting:  # SB3: a reset cancels a pending step; drop its results
            self.step_wait()
        options = None
        if any(self._options):
            options = {_OPTIONS: [dict(o) if o else None for o in self._options]}
        obs, infos = self._venv.reset(seed=list(self._seeds), options=options)
        self.reset_infos = []
        for i in range(self.num_envs):
            entry = _unbatch(infos, i)
            info = dict(_unbox(entry))
            entry.pop(_INFO, None)
            info.update(entry)  # fastvec's own flags (worker_restarted, env_disabled)
            self.reset_infos.append(info)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._venv.step_async(actions)
        self._waiting = True

    def step_wait(self) -> VecEnvStepReturn:
        self._waiting = False
        obs, rewards, terminated, truncated, infos = self._venv.step_wait()
        dones = terminated | truncated
        out = []
        for i in range(self.num_envs):
            entry = _unbatch(infos, i)
            current = _unbox(entry)
            entry.pop(_INFO, None)
            final_obs = entry.pop("final_obs", None)
            final_info = entry.pop("final_info", None)
            if dones[i]:  # SAME_STEP: the step's info is final_info, the top level the reset's
                info = dict(_unbox(final_info))
                self.reset_infos[i] = current
            else:
                info = current
            info.update(entry)  # fastvec's own flags (worker_restarted, env_disabled)
            info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
            if dones[i]:
                info["terminal_observation"] = final_obs
            out.append(info)
        return obs, rewards.astype(np.float32), dones, out

    def close(self) -> None:
        if self._venv is not None:
            self._waiting = False
            self._venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        if self.render_mode != "rgb_array":
            warnings.warn(f"The render mode is {self.render_mode}, but this method assumes it "
                          "is `rgb_array` to obtain images.")
            return [None] * self.num_envs
        return list(self._venv.render())

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._on_envs("get", indices, attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        self._on_envs("set", indices, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None,
                   **method_kwargs) -> list[Any]:
        return self._on_envs("call", indices, method_name, *method_args, **method_kwargs)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper],
                       indices: VecEnvIndices = None) -> list[bool]:
        return self._on_envs("wrapped", indices, "", wrapper_class)

    def _on_envs(self, op: str, indices: VecEnvIndices, name: str, *args, **kwargs) -> list:
        """Run ``op`` on the envs ``indices`` only (in order, repeats included).

        FastVectorEnv's ``call`` reaches every env, so each bridge acts only if its index
        is listed; the other envs return [] and are left untouched. An env out of play
        (disabled) gives None.
        """
        if isinstance(indices, (int, np.integer)):
            indices = [indices]
        idx = [range(self.num_envs)[i] for i in self._get_indices(indices)]
        if not idx:
            return []
        per_env = self._venv.call(_ON_ENVS, op, idx, name, args, kwargs)
        taken: Counter = Counter()
        out = []
        for i in idx:
            results = per_env[i]
            out.append(None if results is None else results[taken[i]])
            taken[i] += 1
        return out


# -- checkpoints: the env state next to the model ------------------------------------------

# Wrappers load_env_state can see through: how each turns the observations a reset returns
# into what the model was given.
_PASS_THROUGH = (VecMonitor, VecCheckNan)


def _chain(env) -> tuple[SB3VecEnv, list]:
    wrappers = []
    while isinstance(env, VecEnvWrapper):
        wrappers.append(env)
        env = env.venv
    if not isinstance(env, SB3VecEnv):
        raise TypeError(f"the model's env is {type(env).__name__}, not fastvec.sb3.SB3VecEnv "
                        "(under VecEnvWrappers): only a fastvec env has a state to save")
    return env, wrappers


class EnvCheckpointCallback(CheckpointCallback):
    """SB3's ``CheckpointCallback`` that also writes the fastvec env's state next to each
    model checkpoint: ``<name_prefix>_fastvec_env_<steps>_steps.pkl`` beside
    ``<name_prefix>_<steps>_steps.zip``. Restart with :func:`load_env_state`."""

    def _on_step(self) -> bool:
        due = self.n_calls % self.save_freq == 0
        go_on = super()._on_step()
        if due:
            venv, _ = _chain(self.training_env)
            path = self._checkpoint_path("fastvec_env_", extension="pkl")
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(venv.state_dict(), f)
            os.replace(tmp, path)  # never a half-written state beside a whole model
            if self.verbose >= 2:
                print(f"Saving fastvec env state to {path}")
        return go_on


def load_env_state(model, path: str) -> VecEnvObs:
    """Put a saved env state (:class:`EnvCheckpointCallback`) back into ``model``'s env, a
    fresh ``SB3VecEnv`` built with the same env fns: every env replayed to where it was,
    and the model's next rollout starting from those observations. Then call
    ``model.learn(..., reset_num_timesteps=False)``: it does not reset the env.

    Sees through ``VecMonitor``, ``VecCheckNan``, ``VecTransposeImage`` and ``VecNormalize``
    (whose statistics you load yourself, with ``VecNormalize.load``); another wrapper
    between the model and the env raises ``TypeError``.
    """
    venv, wrappers = _chain(model.get_env())
    for w in wrappers:
        if not isinstance(w, (*_PASS_THROUGH, VecTransposeImage, VecNormalize)):
            raise TypeError(f"load_env_state cannot rebuild what {type(w).__name__} makes of "
                            "the observations; load the state with SB3VecEnv.load_state_dict "
                            "and set the model's _last_obs yourself")
    with open(path, "rb") as f:
        obs = venv.load_state_dict(pickle.load(f))
    original = obs
    for w in reversed(wrappers):  # innermost first, as a reset passes through them
        if isinstance(w, VecTransposeImage):
            obs = w.transpose_observations(obs)
        elif isinstance(w, VecNormalize):
            w.old_obs = original = obs
            obs = w.normalize_obs(obs)
    model._last_obs = obs
    model._last_original_obs = original
    model._last_episode_starts = np.zeros(venv.num_envs, dtype=bool)
    return obs


# -- health where SB3 logs: TensorBoard, W&B, CSV ---------------------------------------------


class HealthCallback(BaseCallback):
    """Writes the fastvec env's health into the model's logger every ``every`` steps of
    the vector env, under ``fastvec/``: restarts (all, and by reason), episodes resumed and
    not resumed, envs out of play, the step latency's p99 (the slowest worker's, ms) and
    env-steps per second since the last record. SB3 writes them with its next ``dump``
    (each rollout for on-policy algorithms) to every output it was configured with:
    TensorBoard (``tensorboard_log=``), CSV, W&B's SB3 integration."""

    def __init__(self, every: int = 100, verbose: int = 0):
        super().__init__(verbose)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._since: tuple[float, int] | None = None

    def _on_step(self) -> bool:
        if self.n_calls % self.every == 0:
            self.record(self.logger)
        return True

    def record(self, logger) -> None:
        """Put the current figures into ``logger`` (``logger.record``)."""
        venv, _ = _chain(self.training_env)
        for key, value in health_metrics(venv.health()).items():
            logger.record(f"fastvec/{key}", value)
        now, steps = time.monotonic(), self.num_timesteps
        if self._since is not None and now > self._since[0]:
            logger.record("fastvec/env_steps_per_s",
                          (steps - self._since[1]) / (now - self._since[0]))
        self._since = (now, steps)
