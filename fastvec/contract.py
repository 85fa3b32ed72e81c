"""What both backends promise: the gymnasium vector-env contract, apart from the transport.

FastVectorEnv (shared-memory rings, fastvec/vector_env.py) and RayVectorEnv (one
FastVectorEnv per node behind a Ray actor, fastvec/ray/) differ only in how requests reach
the envs. What a caller sees is decided here, once: the call state machine and its misuse
errors, how ``reset(seed=, options=)`` and ``set_attr`` values are read, what the env
declares (read from env 0), the infos that flag a replaced or disabled env, and the seeds a
replacement resets its envs with.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_differing_spaces, batch_space

from fastvec.errors import (AlreadyPendingCallError, ClosedEnvError, FastVecError,
                            NoAsyncCallError)

__all__ = ["State", "VectorContract", "EnvProbe", "probe_env", "check_observation_mode",
           "observation_spaces", "reset_arguments",
           "assert_callable", "attr_values", "assert_resets_done", "restart_info", "resumed_info",
           "disabled_info", "derive_seed", "InfoBatcher"]


class State(enum.Enum):
    """The call a vector env waits on; the value names it (``f"{value}_wait"``)."""

    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"


class VectorContract:
    """What a vector env does the same whatever its transport: the call state and its
    misuse checks, the synchronous calls made of the asynchronous ones, the context
    manager, and closing in stages.

    A subclass names itself in ``_kind`` (for messages), sets ``_state`` as its calls start
    and end, and says through :meth:`_is_open` and :meth:`_sending` whether it still holds
    its resources and whether envs are stepping after ``send()``.
    """

    _kind = "vector env"
    _state = State.DEFAULT

    def _take_spaces(self, env_fns: list, observation_mode="same") -> None:
        """Build env 0 once (:func:`probe_env`) and take its metadata, render mode and
        spaces, single and batched over ``env_fns`` as ``observation_mode`` says."""
        probe = probe_env(env_fns[0], self.autoreset_mode)
        self.metadata, self.render_mode = probe.metadata, probe.render_mode
        self.single_action_space = probe.action_space
        self.observation_mode = observation_mode
        self.observation_space, self.single_observation_space = observation_spaces(
            observation_mode, probe.observation_space, env_fns)
        self.action_space = batch_space(self.single_action_space, len(env_fns))

    def _is_open(self) -> bool:
        return not self.closed

    def _sending(self) -> bool:
        """Whether some envs were sent (``send``) and not yet received (``recv``)."""
        return False

    def _assert_open(self) -> None:
        if not self._is_open():
            raise ClosedEnvError(f"the {self._kind} is closed; create a new one")

    def _assert_idle(self, call: str) -> None:
        self._assert_open()
        if self._state is not State.DEFAULT:
            raise AlreadyPendingCallError(
                f"{call}() called while a {self._state.value}_async() is pending; call "
                f"{self._state.value}_wait() first", self._state.value)
        if self._sending():
            raise AlreadyPendingCallError(
                f"{call}() called while envs {self.stepping.tolist()} are stepping after "
                "send(); recv() them first", "recv")

    def _assert_waiting(self, state: State, call: str, needed: str) -> None:
        self._assert_open()
        if self._state is not state:
            raise NoAsyncCallError(f"{call}() called without a pending {needed}(); call "
                                   f"{needed}() first", state.value)

    # -- the synchronous calls -------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None):
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def render(self):
        return self.call("render")

    @property
    def np_random_seed(self) -> tuple[int, ...]:
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple[np.random.Generator, ...]:
        return self.get_attr("np_random")

    # -- closing -------------------------------------------------------------------------------
    def _settle_pending(self, timeout: float | None, terminate: bool) -> bool:
        """close()'s first stage: unless terminating, wait (at most ``timeout``) for the
        pending call. Returns whether to terminate (also when that wait failed)."""
        if self._state is not State.DEFAULT and not terminate:
            try:
                getattr(self, f"{self._state.value}_wait")(timeout)
            except Exception:  # noqa: BLE001 - closing anyway, in stages
                terminate = True
        self._state = State.DEFAULT
        return terminate

    def _close_broken(self) -> None:
        """The env cannot go on (a restart budget spent): close it, later calls raise."""
        self._state = State.DEFAULT
        self.close(terminate=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(terminate=exc_info[0] is not None)

    def __del__(self):
        # VectorEnv.__del__ would call close(); each backend's finalizer is the backstop.
        pass


@dataclass(frozen=True)
class EnvProbe:
    """What a vector env declares, read from one env (as gymnasium's AsyncVectorEnv does)."""

    metadata: dict
    render_mode: str | None
    observation_space: gym.Space
    action_space: gym.Space


def probe_env(env_fn: Callable[[], gym.Env], autoreset_mode: AutoresetMode) -> EnvProbe:
    """Build one env with ``env_fn``, read its spaces and metadata (with
    ``autoreset_mode`` put in), and close it."""
    env = env_fn()
    try:
        metadata = dict(env.metadata)
        metadata["autoreset_mode"] = autoreset_mode
        return EnvProbe(metadata, env.render_mode, env.observation_space, env.action_space)
    finally:
        env.close()


def check_observation_mode(observation_mode) -> None:
    """``observation_mode`` as gymnasium reads it: ``"same"``, ``"different"`` or a
    ``(batch space, single space)`` pair."""
    custom = isinstance(observation_mode, tuple) and len(observation_mode) == 2
    if not custom and observation_mode not in ("same", "different"):
        raise ValueError("Invalid `observation_mode`, expected: 'same' or 'different' or tuple "
                         "of single and batch observation space, actual got "
                         f"{observation_mode}")
    if custom and not all(isinstance(sp, gym.Space) for sp in observation_mode):
        raise TypeError("Expected both elements of observation_mode to be Spaces, got "
                        f"{type(observation_mode[0])} and {type(observation_mode[1])}")


def observation_spaces(observation_mode, single: gym.Space,
                       env_fns: list[Callable[[], gym.Env]]) -> tuple[gym.Space, gym.Space]:
    """(batch space, single space): ``"same"``, n copies of env 0's space ``single``;
    ``"different"``, every env's (same shape and dtype, other bounds), built and closed
    here; a pair: as given."""
    if isinstance(observation_mode, tuple):
        return observation_mode
    if observation_mode == "different":
        env_spaces = [single]
        for fn in env_fns[1:]:
            env = fn()
            try:
                env_spaces.append(env.observation_space)
            finally:
                env.close()
        return batch_differing_spaces(env_spaces), single
    return batch_space(single, len(env_fns)), single


def reset_arguments(seed, options: dict | None, n: int) -> tuple:
    """``reset(seed=..., options=...)`` as gymnasium's vector envs read it: one seed per env
    (an int seeds env i with ``seed + i``), the options without ``reset_mask`` (a copy; the
    caller's dict is left alone), and the validated mask (None: every env)."""
    if seed is None:
        seeds = [None] * n
    elif isinstance(seed, (int, np.integer)):
        seeds = [int(seed) + i for i in range(n)]
    else:
        seeds = list(seed)
        if len(seeds) != n:
            raise ValueError(f"If seeds are passed as a list the length must match "
                             f"num_envs={n} but got length={len(seeds)}.")
    options = dict(options) if options else None
    mask = options.pop("reset_mask", None) if options is not None else None
    if mask is not None:
        if not isinstance(mask, np.ndarray):
            raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
        if mask.shape != (n,):
            raise ValueError(f"`options['reset_mask']` must have shape `({n},)`, got {mask.shape}")
        if mask.dtype != np.bool_:
            raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
        if not mask.any():
            raise ValueError("`options['reset_mask']` must contain a boolean array with at "
                             f"least one True value, got reset_mask={mask}")
    return seeds, options, mask


def assert_callable(name: str) -> None:
    """``call(name)`` may not stand in for the calls that have their own method."""
    if name in ("reset", "step", "close"):
        raise ValueError(f"Trying to call function `{name}` with `call`, "
                         f"use `{name}` directly instead.")


def attr_values(values: Any, n: int) -> list:
    """``set_attr``'s values, one per env: a list or tuple of ``n``, or one value for all."""
    if not isinstance(values, (list, tuple)):
        values = [values] * n
    if len(values) != n:
        raise ValueError("Values must be a list or tuple with length equal to the number of "
                         f"environments. Got `{len(values)}` values for {n} environments.")
    return list(values)


def assert_resets_done(autoreset_mode: AutoresetMode, needs_reset: np.ndarray) -> None:
    """DISABLED: a step may not start while an env that ended its episode waits for its reset."""
    if autoreset_mode == AutoresetMode.DISABLED and needs_reset.any():
        raise FastVecError(
            f"envs {np.flatnonzero(needs_reset).tolist()} ended their episode and "
            "autoreset_mode is DISABLED: reset them first with "
            "reset(options={'reset_mask': mask})")


def restart_info(reason: str) -> dict:
    """The info of an env whose worker (or actor) was replaced; ``reason`` is
    ``"<reason>: <detail>"``."""
    return {"worker_restarted": True, "worker_restart_reason": reason}


def resumed_info(reason: str) -> dict:
    """The info of an env whose worker (or actor) was replaced and whose episode the
    replacement rebuilt and goes on with (resume); ``reason`` is the failure survived."""
    return {"worker_resumed": True, "worker_resumed_reason": reason}


def disabled_info(reason: str) -> dict:
    """The info of an env out of play (its restart budget spent, ``on_budget_exhausted=
    "disable"``); ``reason`` is ``"<reason>: <detail>"`` of its last failure."""
    return {"env_disabled": True, "env_disabled_reason": reason}


def derive_seed(base: int, env_index: int, generation: int) -> int:
    """The seed env ``env_index`` resets with when the worker or actor hosting it is in its
    ``generation``-th replacement, from the env's original seed: a rerun with the same seeds
    replays the same episodes."""
    seq = np.random.SeedSequence([base, env_index, generation])
    return int(seq.generate_state(1, np.uint32)[0])


class InfoBatcher:
    """gymnasium's info batching (``VectorEnv._add_info``) sized to a batch of ``n`` envs,
    e.g. the part of the envs a ``recv()`` returns."""

    _add_info = VectorEnv._add_info

    def __init__(self, n: int):
        self.num_envs = n

    def add(self, infos: dict, info: dict, row: int) -> dict:
        """Put one env's ``info`` at ``row`` of the batched ``infos`` (and its masks)."""
        return self._add_info(infos, info, row)
