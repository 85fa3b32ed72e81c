"""FastVectorEnv: gymnasium's vector-env contract over shared-memory rings.

    step(actions)
      │ validate (ValueError before anything is sent)
      ▼
    action regions ──▶ ctl.request(seq, STEP, ring r) + post req_sem ──▶ worker w (k envs)
                                                                            │ env.step × k
    obs/reward/flags[r] ◀──────────────── written in place by the worker ◀──┘
      │ wait: done_sem, resp_seq == seq, watchdog findings (supervisor.py)
      ▼
    batch = views of ring slot r (copy=False) or a copy (copy=True); infos unpickled
    from the side buffer only when an env returned a non-empty info.

A failed worker (died, frozen, hung, raised) is replaced in place; its envs come back
in that step as truncated with ``infos["worker_restarted"]`` set (``on_failure="respawn"``),
or the step raises :class:`fastvec.WorkerFailure` (``on_failure="raise"``).
"""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import multiprocessing
import os
import weakref
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import CloudpickleWrapper, batch_space

from fastvec import _raster, _ring
from fastvec.errors import (AlreadyPendingCallError, ClosedEnvError, FastVecError,
                            InvalidActionError, NoAsyncCallError, RemoteTraceback,
                            RestartBudgetExceeded, SpaceMismatchError, WorkerFailure)
from fastvec.layout import Plan, check_actions, flatten, unflatten
from fastvec.shm import Names, Segment, get_pickle, new_prefix, put_pickle, sweep_stale
from fastvec.supervisor import Failure, Slot, Supervisor, log

__all__ = ["FastVectorEnv", "make_vec"]


class State(enum.Enum):
    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"


class _Resources:
    """What the finalizer must clean if the env is collected without close()."""

    def __init__(self):
        self.names = Names(new_prefix())
        self.supervisor: Supervisor | None = None
        self.main: Segment | None = None

    def cleanup(self, timeout: float | None = 0.0, terminate: bool = True) -> None:
        try:
            if self.supervisor is not None:
                self.supervisor.shutdown(timeout, terminate)
        finally:
            self.supervisor = None
            if self.main is not None:
                self.main.close()
                self.main = None
            self.names.unlink_all()


class _BatchInfos:
    """gymnasium's info batching (``VectorEnv._add_info``) sized to a partial batch."""

    _add_info = VectorEnv._add_info

    def __init__(self, n: int):
        self.num_envs = n


class FastVectorEnv(VectorEnv):
    """Vectorized env whose workers exchange data through POSIX shared-memory rings.

    Args:
        env_fns: functions that create the envs (as for ``AsyncVectorEnv``).
        context: multiprocessing start method: ``"fork"``, ``"spawn"``, ``"forkserver"`` or None.
        copy: return copies of the observations (True) or views of the ring slot, valid
            until ``ring_depth`` further resets/steps (False).
        autoreset_mode: ``AutoresetMode`` (or its string value).
        envs_per_worker: envs stepped in turn by one worker process (one wake-up for all).
        on_failure: ``"respawn"`` (default) or ``"raise"``.
        heartbeat_interval / heartbeat_timeout: seconds between a worker's heartbeats and
            how long a stopped heartbeat is tolerated before the worker counts as frozen.
        step_timeout: seconds a step or reset may run before the worker counts as hung
            (None: no limit; a slow step under the limit is never touched).
        start_timeout: seconds a worker may take to start and build its envs.
        max_restarts / restart_window: at most this many restarts of one slot within the
            window (seconds); beyond that ``RestartBudgetExceeded`` is raised.
        recycle_after_episodes / max_worker_rss: replace a worker at an episode boundary
            after that many episodes / once its resident memory exceeds that many bytes
            (needs ``envs_per_worker=1``).
        ring_depth: result slots per env (>= 2).
        max_payload_bytes: ceiling of the side buffer that carries infos and call results.
        validate_actions: check actions against the action space before sending (bounds too).
        batch_size: enables ``send``/``recv``: ``recv`` returns the first ``batch_size`` envs
            to finish (NEXT_STEP only, ``envs_per_worker=1``); ``step`` stays lockstep.
        spin_us: microseconds the parent and workers spin on the ring before sleeping on
            the semaphore. 0 (default) always sleeps: measured on a loaded 2-core VM, a
            50 us spin made the round trip 5x slower because the spinner shared a core with
            the process it waited for. Use it only with cores to spare.
        daemon: start workers as daemon processes.
    """

    _closed_state = None
    _resources: _Resources | None = None

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        *,
        context: str | None = None,
        copy: bool = True,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        envs_per_worker: int = 1,
        on_failure: str = "respawn",
        heartbeat_interval: float = 0.05,
        heartbeat_timeout: float = 5.0,
        step_timeout: float | None = None,
        start_timeout: float = 60.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        recycle_after_episodes: int | None = None,
        max_worker_rss: int | None = None,
        ring_depth: int = 2,
        max_payload_bytes: int = 1 << 30,
        validate_actions: bool = True,
        spin_us: float = 0.0,
        batch_size: int | None = None,
        observation_mode: str = "same",
        daemon: bool = True,
    ):
        self._state = State.DEFAULT
        self.closed = False
        env_fns = list(env_fns)
        if not env_fns:
            raise ValueError("FastVectorEnv needs at least one env_fn")
        if envs_per_worker < 1 or envs_per_worker > 63:
            raise ValueError(f"envs_per_worker must be in 1..63, got {envs_per_worker}")
        if on_failure not in ("respawn", "raise"):
            raise ValueError(f"on_failure must be 'respawn' or 'raise', got {on_failure!r}")
        if ring_depth < 2:
            raise ValueError(f"ring_depth must be >= 2, got {ring_depth}")
        if observation_mode != "same":
            raise ValueError("FastVectorEnv supports observation_mode='same' only: every env must "
                             "have the observation space of env 0")
        if batch_size is not None:
            if not 1 <= batch_size <= len(env_fns):
                raise ValueError(f"batch_size must be in 1..{len(env_fns)}, got {batch_size}")
            if envs_per_worker != 1 or AutoresetMode(autoreset_mode) != AutoresetMode.NEXT_STEP:
                raise ValueError("batch_size (send/recv) needs envs_per_worker=1 and "
                                 "autoreset_mode=NEXT_STEP")
        if (recycle_after_episodes or max_worker_rss) and envs_per_worker != 1:
            raise ValueError("recycle_after_episodes / max_worker_rss replace a worker at an "
                             "episode boundary, which needs envs_per_worker=1")
        for name, value in (("heartbeat_interval", heartbeat_interval),
                            ("heartbeat_timeout", heartbeat_timeout),
                            ("start_timeout", start_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if heartbeat_timeout <= 2 * heartbeat_interval:
            raise ValueError("heartbeat_timeout must exceed two heartbeat intervals")
        if step_timeout is not None and not step_timeout > 0:
            raise ValueError(f"step_timeout must be > 0 or None, got {step_timeout}")

        self.env_fns = env_fns
        self.num_envs = len(env_fns)
        self.copy = copy
        self.context = context
        self.autoreset_mode = AutoresetMode(autoreset_mode)
        self.envs_per_worker = envs_per_worker
        self.on_failure = on_failure
        self.recycle_after_episodes = recycle_after_episodes
        self.max_worker_rss = max_worker_rss
        self.validate_actions = validate_actions
        self.ring_depth = ring_depth
        self.batch_size = batch_size

        dummy = env_fns[0]()
        try:
            self.metadata = dict(dummy.metadata)
            self.metadata["autoreset_mode"] = self.autoreset_mode
            self.render_mode = dummy.render_mode
            self.single_observation_space = dummy.observation_space
            self.single_action_space = dummy.action_space
        finally:
            dummy.close()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        k = envs_per_worker
        n_workers = -(-self.num_envs // k)
        if spin_us < 0:
            raise ValueError(f"spin_us must be >= 0, got {spin_us}")
        if spin_us and n_workers + 1 > len(os.sched_getaffinity(0)):
            log.warning("spin_us=%s with %d workers on %d cores: spinners outnumber cores, "
                        "throughput may collapse", spin_us, n_workers,
                        len(os.sched_getaffinity(0)))
        self.spin_us = spin_us
        slots_envs = [tuple(range(i, min(i + k, self.num_envs))) for i in range(0, self.num_envs, k)]
        self._plan = Plan(self.single_observation_space, self.single_action_space,
                          self.num_envs, len(slots_envs), ring_depth)

        sweep_stale()
        res = self._resources = _Resources()
        self._finalizer = weakref.finalize(self, res.cleanup)
        try:
            prefix = res.names.prefix
            res.names.track_segment(prefix + "main")
            res.main = Segment(prefix + "main", self._plan.size, create=True)
            self._views = self._plan.views(res.main.mm)
            res.supervisor = self._sup = Supervisor(
                ctx=multiprocessing.get_context(context), prefix=prefix, names=res.names,
                main=res.main, plan=self._plan, slots_envs=slots_envs,
                env_fns=[CloudpickleWrapper(fn) for fn in env_fns],
                autoreset_mode=self.autoreset_mode.value,
                single_spaces=(self.single_observation_space, self.single_action_space),
                heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                step_timeout=step_timeout, start_timeout=start_timeout,
                max_restarts=max_restarts, restart_window=restart_window,
                max_payload_bytes=max_payload_bytes, spin_us=spin_us, daemon=daemon)
            for slot in self._sup.slots:
                self._sup.start_slot(slot)
            self._sup.start_watchdog()
            failed = self._sup.wait(self._sup.slots, start_timeout)
            if failed:
                raise self._failure_error(failed[0], self._failure_of(failed[0]),
                                          "while starting its envs")
        except BaseException:
            self._views = None
            self._finalizer()
            self.closed = True
            raise

        self._ring = 0  # ring slot holding the latest results of a lockstep call
        self._env_ring = np.zeros(self.num_envs, np.int64)  # ... of each env (send/recv)
        self._inflight = np.zeros(self.num_envs, np.bool_)
        self._env_to_slot = [s for s in self._sup.slots for _ in s.env_indices]
        self._base_seeds: list[int | None] = [None] * self.num_envs
        self._restarts = np.zeros(self.num_envs, np.int64)
        self._needs_reset = np.zeros(self.num_envs, np.bool_)
        self._pending: tuple = ()
        self._action_history = [np.zeros((4, *a.shape), a.dtype) for a in self._views.act]
        self._steps = 0

    # -- properties of the contract ------------------------------------------------------
    @property
    def np_random_seed(self) -> tuple[int, ...]:
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple[np.random.Generator, ...]:
        return self.get_attr("np_random")

    def health(self) -> list[dict]:
        """Per worker: pid, restarts and their reasons, last failure, requests, episodes,
        resident memory and step-latency percentiles (ms) over the latest steps."""
        self._assert_open()
        return self._sup.health()

    # -- reset -------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None):
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed: int | Sequence[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        self._assert_idle("reset_async")
        n = self.num_envs
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
        mask = np.ones(n, np.bool_)
        if options is not None and "reset_mask" in options:
            mask = options.pop("reset_mask")
            if not isinstance(mask, np.ndarray):
                raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
            if mask.shape != (n,):
                raise ValueError(f"`options['reset_mask']` must have shape `({n},)`, got {mask.shape}")
            if mask.dtype != np.bool_:
                raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
            if not mask.any():
                raise ValueError("`options['reset_mask']` must contain a boolean array with at "
                                 f"least one True value, got reset_mask={mask}")
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._base_seeds[i] = int(seeds[i])

        if self.max_worker_rss or self.recycle_after_episodes:
            self._recycle_due(mask, None)
        self._align_rings()

        r = (self._ring + 1) % self.ring_depth
        requests = []
        for slot in self._sup.slots:
            bits = sum(1 << j for j, i in enumerate(slot.env_indices) if mask[i])
            if bits:
                payload = ([seeds[i] for i in slot.env_indices], options)
                requests.append((slot, bits, put_pickle(slot.payload, payload,
                                                        self._sup.max_payload_bytes)))
        self._sup.send([(slot, _ring.OP_RESET, r, nbytes, bits)  # all payloads fit: send
                        for slot, bits, nbytes in requests])
        active = [slot for slot, _, _ in requests]
        self._pending = (r, mask, active, seeds, options)
        self._state = State.WAITING_RESET

    def reset_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_RESET, "reset_wait", "reset_async")
        r, mask, active, seeds, options = self._pending
        failed = self._sup.wait(active, timeout)
        infos: dict = {}
        restarted = []
        while failed:
            slot = failed.pop()
            failure = self._failure_of(slot)
            if failure.reason == "mismatch":
                self._state = State.DEFAULT
                raise self._failure_error(slot, failure, "in reset")
            # A reset that failed is run again, with the same seeds, by the new worker.
            replay = ("now", [seeds[i] for i in slot.env_indices], r)
            self._replace(slot, failure, replay)
            restarted.append((slot, failure))
            failed += self._sup.wait([slot], self._sup.start_timeout)
        for slot in active:
            self._collect_infos(slot, infos)
        for slot, failure in restarted:
            for i in slot.env_indices:
                infos = self._add_info(infos, self._restart_info(failure), i)
        self._carry(np.flatnonzero(~mask), r)
        self._needs_reset[mask] = False
        self._ring = r
        self._env_ring[:] = r
        self._state = State.DEFAULT
        self._raise_if_policy(restarted)
        return self._observations(r), infos

    # -- step ----------------------------------------------------------------------------------
    def step(self, actions):
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions) -> None:
        self._assert_idle("step_async")
        if self.autoreset_mode == AutoresetMode.DISABLED and self._needs_reset.any():
            raise FastVecError(
                f"envs {np.flatnonzero(self._needs_reset).tolist()} ended their episode and "
                "autoreset_mode is DISABLED: reset them first with "
                "reset(options={'reset_mask': mask})")
        try:
            flat = flatten(self.single_action_space, actions)
        except SpaceMismatchError as exc:
            raise InvalidActionError(f"actions do not have the structure of {self.action_space}: "
                                     f"{exc}") from None
        if self.validate_actions:
            flat = check_actions(self._plan.act_leaves, flat, self.num_envs)
        else:
            flat = [np.asarray(a) for a in flat]
        h = self._steps % 4
        for view, hist, arr in zip(self._views.act, self._action_history, flat):
            np.copyto(view, arr, casting="unsafe")
            hist[h] = view
        self._align_rings()
        r = (self._ring + 1) % self.ring_depth
        self._sup.send([(slot, _ring.OP_STEP, r, 0, None) for slot in self._sup.slots])
        self._pending = (r,)
        self._state = State.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_STEP, "step_wait", "step_async")
        (r,) = self._pending
        v = self._views
        failed = self._sup.wait(self._sup.slots, timeout)
        self._steps += 1
        for slot in failed:
            if slot.ctl.status == _ring.ST_MISMATCH and slot.failure is None:
                self._state = State.DEFAULT
                raise self._failure_error(slot, self._failure_of(slot), "in step")
        infos: dict = {}
        restarted = []
        for slot in failed:
            failure = self._failure_of(slot)
            restarted.append((slot, failure))
            if self.autoreset_mode == AutoresetMode.SAME_STEP:
                self._respawn_same_step(slot, failure, r, infos)
            else:
                self._replace(slot, failure, ("pending", self._derived_seeds(slot)))
                self._carry(slot.env_indices, r)
            idx = list(slot.env_indices)
            v.reward[r, idx] = 0.0
            v.terminated[r, idx] = False
            v.truncated[r, idx] = True
        failed_set = set(failed)
        recycle = self.recycle_after_episodes or self.max_worker_rss
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        terminated = v.terminated[r].copy()
        truncated = v.truncated[r].copy()
        done = terminated | truncated
        for slot in self._sup.slots:
            if slot in failed_set:
                continue
            if recycle and same_step and done[slot.env_indices[0]] and self._recycle_reason(slot):
                self._recycle_same_step(slot, r, infos)
            else:
                self._collect_infos(slot, infos)
        for slot, failure in restarted:
            for i in slot.env_indices:
                infos = self._add_info(infos, self._restart_info(failure), i)
        self._sup.record_latency([s for s in self._sup.slots if s not in failed_set])
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= done
        elif recycle and not same_step and done.any():
            self._recycle_due(done, r)
        self._ring = r
        self._env_ring[:] = r
        self._state = State.DEFAULT
        self._raise_if_policy(restarted)
        return self._observations(r), v.reward[r].copy(), terminated, truncated, infos

    @property
    def stepping(self) -> np.ndarray:
        """Indices of the envs sent (``send``) and not yet received (``recv``)."""
        return np.flatnonzero(self._inflight)

    # -- first-ready batches (send/recv) ----------------------------------------------------------
    def send(self, actions, env_ids=None) -> None:
        """Start one step of the envs ``env_ids`` (default: all) with ``actions[j]`` for
        ``env_ids[j]``, and return at once. Needs ``batch_size``; see :meth:`recv`."""
        self._assert_open()
        if self.batch_size is None:
            raise FastVecError("send()/recv() need FastVectorEnv(..., batch_size=k)")
        if self._state != State.DEFAULT:
            raise AlreadyPendingCallError(f"send() called while a {self._state.value}_async() "
                                          f"is pending", self._state.value)
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids).reshape(-1)
        if ids.dtype.kind not in "iu" or len(np.unique(ids)) != len(ids) or (
                len(ids) and (ids.min() < 0 or ids.max() >= self.num_envs)):
            raise ValueError(f"env_ids must be distinct env indices in 0..{self.num_envs - 1}, "
                             f"got {env_ids!r}")
        busy = ids[self._inflight[ids]]
        if len(busy):
            raise AlreadyPendingCallError(f"envs {busy.tolist()} are still stepping; recv() "
                                          "them before sending them again", "recv")
        try:
            flat = flatten(self.single_action_space, actions)
        except SpaceMismatchError as exc:
            raise InvalidActionError(f"actions do not fit {self.single_action_space}: {exc}") from None
        flat = (check_actions(self._plan.act_leaves, flat, len(ids)) if self.validate_actions
                else [np.asarray(a) for a in flat])
        h = self._steps % 4
        for view, hist, arr in zip(self._views.act, self._action_history, flat):
            view[ids] = arr
            hist[h][ids] = arr
        for i in ids:
            slot = self._env_to_slot[i]
            self._sup.request(slot, _ring.OP_STEP, int((self._env_ring[i] + 1) % self.ring_depth))
        self._inflight[ids] = True

    def recv(self, timeout: float | None = None):
        """Results of ``batch_size`` envs that finished their step (fewer if fewer are
        stepping; the longest-waiting first), as ``(obs, rewards, terminations, truncations,
        infos, env_ids)``, batched over ``env_ids`` (ascending). Envs reset themselves as in
        NEXT_STEP mode. A failed worker's env comes back truncated and flagged, as in
        :meth:`step`."""
        self._assert_open()
        flying = [self._env_to_slot[i] for i in np.flatnonzero(self._inflight)]
        if not flying:
            raise NoAsyncCallError("recv() called with no env stepping; send() first", "send")
        count = min(self.batch_size, len(flying))
        ready, failed = self._sup.wait_any(flying, count, timeout)
        # Exactly `count`, oldest requests first: nobody starves behind fast envs.
        chosen = sorted(ready + failed, key=lambda s: s.expected)[:count]
        ready = [s for s in ready if s in chosen]
        failed = [s for s in failed if s in chosen]
        self._steps += 1
        for slot in ready:
            if slot.ctl.status == _ring.ST_MISMATCH and slot.failure is None:
                self._inflight[slot.env_indices[0]] = False
                raise self._failure_error(slot, self._failure_of(slot), "in step")
        done_slots = sorted(ready + failed, key=lambda s: s.env_indices[0])
        ids = np.array([s.env_indices[0] for s in done_slots], np.int64)
        rings = (self._env_ring[ids] + 1) % self.ring_depth
        v = self._views
        infos: dict = {}
        batch = _BatchInfos(len(ids))
        restarted = []
        for j, slot in enumerate(done_slots):
            i = int(ids[j])
            if slot in failed:
                failure = self._failure_of(slot)
                restarted.append((slot, failure))
                self._replace(slot, failure, ("pending", self._derived_seeds(slot)))
                self._carry([i], int(rings[j]))
                v.reward[rings[j], i], v.terminated[rings[j], i] = 0.0, False
                v.truncated[rings[j], i] = True
                batch._add_info(infos, self._restart_info(failure), j)
            elif slot.ctl.resp_payload_len:
                (info,) = get_pickle(slot.payload, slot.ctl.resp_payload_len)
                if info:
                    batch._add_info(infos, info, j)
        rows = rings * self.num_envs + ids
        obs = []
        for region in v.obs:
            flat_rows = region.reshape(self.ring_depth * self.num_envs, *region.shape[2:])
            out = np.empty((len(ids), *region.shape[2:]), region.dtype)
            _raster.gather_rows(out, flat_rows, rows)
            obs.append(out)
        rewards = v.reward[rings, ids].copy()
        terminated, truncated = v.terminated[rings, ids].copy(), v.truncated[rings, ids].copy()
        self._env_ring[ids] = rings
        self._inflight[ids] = False
        self._sup.record_latency(ready)
        if self.recycle_after_episodes or self.max_worker_rss:
            done = np.zeros(self.num_envs, np.bool_)
            done[ids] = terminated | truncated
            if done.any():
                self._recycle_due(done, 0)
        self._raise_if_policy(restarted)
        return (unflatten(self.single_observation_space, obs), rewards, terminated, truncated,
                infos, ids)

    # -- call / attributes -------------------------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        self._assert_idle("call_async")
        if name in ("reset", "step", "close"):
            raise ValueError(f"Trying to call function `{name}` with `call`, "
                             f"use `{name}` directly instead.")
        sizes = [put_pickle(slot.payload, (name, args, kwargs), self._sup.max_payload_bytes)
                 for slot in self._sup.slots]
        self._sup.send([(slot, _ring.OP_CALL, 0, n, None) for slot, n in zip(self._sup.slots, sizes)])
        self._state = State.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        self._assert_waiting(State.WAITING_CALL, "call_wait", "call_async")
        return self._gather_calls(self._sup.wait(self._sup.slots, timeout))

    def render(self):
        return self.call("render")

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        self._assert_idle("set_attr")
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError("Values must be a list or tuple with length equal to the number of "
                             f"environments. Got `{len(values)}` values for {self.num_envs} "
                             "environments.")
        sizes = [put_pickle(slot.payload, (name, [values[i] for i in slot.env_indices]),
                            self._sup.max_payload_bytes) for slot in self._sup.slots]
        self._sup.send([(slot, _ring.OP_SET_ATTR, 0, n, None)  # all payloads fit: send
                        for slot, n in zip(self._sup.slots, sizes)])
        self._state = State.WAITING_CALL
        self._gather_calls(self._sup.wait(self._sup.slots, None), results=False)

    def _gather_calls(self, failed: list[Slot], results: bool = True):
        self._state = State.DEFAULT
        for slot in failed:
            failure = self._failure_of(slot)
            if failure.reason == "exception":
                exc, tb = failure.remote
                if isinstance(exc, BaseException):
                    raise exc from RemoteTraceback(tb)
                raise self._failure_error(slot, failure, "in a call")
            # The worker itself is gone: replace it, then report.
            self._replace(slot, failure, ("pending", self._derived_seeds(slot)))
            raise self._failure_error(slot, failure, "in a call")
        if not results:
            return None
        out: list = []
        for slot in self._sup.slots:
            out.extend(get_pickle(slot.payload, slot.ctl.resp_payload_len))
        return tuple(out)

    # -- closing ---------------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False, **kwargs) -> None:
        if self._resources is None:
            return
        if self._state != State.DEFAULT and not terminate:
            try:
                getattr(self, f"{self._state.value}_wait")(timeout)
            except Exception:  # noqa: BLE001 - closing anyway, in stages
                terminate = True
        self._state = State.DEFAULT
        self._views = None
        self._finalizer.detach()
        self._resources.cleanup(timeout, terminate)
        self._resources = None

    def __enter__(self) -> "FastVectorEnv":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(terminate=exc_info[0] is not None)

    def __del__(self):
        # VectorEnv.__del__ would call close(); the finalizer is the backstop instead.
        pass

    # -- internals -------------------------------------------------------------------------------
    def _assert_open(self) -> None:
        if self.closed or self._resources is None:
            raise ClosedEnvError("the FastVectorEnv is closed; create a new one")

    def _assert_idle(self, call: str) -> None:
        self._assert_open()
        if self._state != State.DEFAULT:
            raise AlreadyPendingCallError(
                f"{call}() called while a {self._state.value}_async() is pending; call "
                f"{self._state.value}_wait() first", self._state.value)
        if self._inflight.any():
            raise AlreadyPendingCallError(
                f"{call}() called while envs {np.flatnonzero(self._inflight).tolist()} are "
                "stepping after send(); recv() them first", "recv")

    def _assert_waiting(self, state: State, call: str, needed: str) -> None:
        self._assert_open()
        if self._state != state:
            raise NoAsyncCallError(f"{call}() called without a pending {needed}(); call "
                                   f"{needed}() first", state.value)

    def _observations(self, r: int):
        leaves = [region[r] for region in self._views.obs]
        if self.copy:
            leaves = [np.array(x) for x in leaves]
        return unflatten(self.single_observation_space, leaves)

    def _carry(self, env_ids, r: int) -> None:
        """Copy the latest observation rows of ``env_ids`` into ring slot ``r``."""
        for i in env_ids:
            prev = self._env_ring[i]
            if prev != r:
                for region in self._views.obs:
                    region[r, i] = region[prev, i]

    def _align_rings(self) -> None:
        """After send/recv the envs' latest rows sit in different ring slots; a lockstep
        call needs them in one (self._ring) so that a batch is one slot."""
        if self._inflight.any():
            raise AlreadyPendingCallError(
                f"envs {np.flatnonzero(self._inflight).tolist()} are still stepping after "
                "send(); recv() them before a lockstep call", "recv")
        off = np.flatnonzero(self._env_ring != self._ring)
        if len(off):
            self._carry(off, self._ring)  # note: _carry reads self._env_ring per env
            self._env_ring[:] = self._ring

    def _collect_infos(self, slot: Slot, infos: dict) -> None:
        n = slot.ctl.resp_payload_len
        if not n:
            return
        for i, info in zip(slot.env_indices, get_pickle(slot.payload, n)):
            if info:
                self._add_info(infos, info, i)

    def _failure_of(self, slot: Slot) -> Failure:
        if slot.failure is not None:
            return slot.failure
        try:
            exc, tb = get_pickle(slot.payload, slot.ctl.resp_payload_len)
        except Exception as read_err:  # noqa: BLE001 - report, never crash the parent
            exc, tb = None, f"(the worker's error could not be read: {read_err!r})"
        if slot.ctl.status == _ring.ST_MISMATCH:
            return Failure("mismatch", str(exc), remote=(exc, tb))
        what = f"{type(exc).__name__}: {exc}" if exc is not None else tb.strip().splitlines()[-1]
        return Failure("exception", what, remote=(exc, tb))

    def _failure_error(self, slot: Slot, failure: Failure, when: str) -> FastVecError:
        if failure.reason == "mismatch":
            exc = failure.remote[0] if failure.remote else None
            err: FastVecError = (exc if isinstance(exc, FastVecError)
                                 else SpaceMismatchError(str(failure.detail)))
        else:
            err = WorkerFailure(
                f"worker {slot.index} (envs {list(slot.env_indices)}) failed {when}: "
                f"{failure.reason}: {failure.detail}", env_index=slot.env_indices[0],
                env_indices=slot.env_indices, worker_index=slot.index, reason=failure.reason,
                detail=failure.detail, exitcode=failure.exitcode)
        if failure.remote is not None:
            err.__cause__ = RemoteTraceback(failure.remote[1])
        return err

    def _derived_seeds(self, slot: Slot) -> list[int | None]:
        """Seeds for the envs of the slot's next worker, from the original seed and the
        number of replacements (restarts and recycles) of the slot."""
        out = []
        for i in slot.env_indices:
            base = self._base_seeds[i]
            if base is None:
                out.append(None)
            else:
                ss = np.random.SeedSequence([base, i, slot.generation + 1])
                out.append(int(ss.generate_state(1, np.uint32)[0]))
        return out

    def _replace(self, slot: Slot, failure: Failure, initial_reset, planned: bool = False) -> None:
        if not planned:
            self._restarts[list(slot.env_indices)] += 1
            self._log_failure(slot, failure)
        try:
            self._sup.replace(slot, failure, initial_reset, planned=planned)
        except RestartBudgetExceeded:
            self._state = State.DEFAULT
            self.close(terminate=True)  # broken for good: later calls raise ClosedEnvError
            raise

    def _recent_actions(self, i: int) -> list:
        """Env i's last (up to 4) actions, oldest first; one list of leaves per action."""
        n = min(4, self._steps)
        return [[h[(self._steps - n + t) % 4][i].tolist() for h in self._action_history]
                for t in range(n)]

    def _log_failure(self, slot: Slot, failure: Failure) -> None:
        recent = {i: self._recent_actions(i) for i in slot.env_indices}
        log.warning(
            "worker %d (envs %s, generation %d) failed: %s: %s; seeds %s; restart %d; "
            "last actions (oldest first) %s%s", slot.index, list(slot.env_indices),
            slot.generation, failure.reason, failure.detail,
            [self._base_seeds[i] for i in slot.env_indices],
            int(self._restarts[slot.env_indices[0]]), recent,
            f"\nremote traceback:\n{failure.remote[1]}" if failure.remote else "")

    def _respawn_same_step(self, slot: Slot, failure: Failure, r: int, infos: dict) -> None:
        """SAME_STEP: the new worker resets at once and the step returns that observation."""
        last = {i: self._row(self._env_ring[i], i) for i in slot.env_indices}
        self._replace(slot, failure, ("now", self._derived_seeds(slot), r))
        while self._sup.wait([slot], self._sup.start_timeout):
            failure2 = self._failure_of(slot)
            self._replace(slot, failure2, ("now", self._derived_seeds(slot), r))
        for i in slot.env_indices:
            self._add_info(infos, {"final_obs": last[i], "final_info": {}}, i)
        self._collect_infos(slot, infos)

    def _row(self, r: int, i: int):
        return unflatten(self.single_observation_space,
                         [np.array(region[r, i]) for region in self._views.obs])

    def _restart_info(self, failure: Failure) -> dict:
        return {"worker_restarted": True,
                "worker_restart_reason": f"{failure.reason}: {failure.detail}"}

    def _raise_if_policy(self, restarted: list) -> None:
        if restarted and self.on_failure == "raise":
            slot, failure = restarted[0]
            raise self._failure_error(slot, failure, "(the worker was replaced)")

    def _recycle_reason(self, slot: Slot) -> str | None:
        ctl = slot.ctl
        if self.recycle_after_episodes and ctl.episodes >= self.recycle_after_episodes:
            return f"recycled after {ctl.episodes} episodes"
        if self.max_worker_rss and ctl.rss_bytes > self.max_worker_rss:
            return f"recycled at {ctl.rss_bytes} bytes resident > max_worker_rss"
        return None

    def _recycle_same_step(self, slot: Slot, r: int, infos: dict) -> None:
        """SAME_STEP: the old worker's episode ended in this step; keep its final_obs and
        final_info, and let a new worker start the next episode in the same step."""
        (i,) = slot.env_indices
        n = slot.ctl.resp_payload_len
        (info,) = get_pickle(slot.payload, n) if n else (None,)
        self._add_info(infos, {key: info[key] for key in ("final_obs", "final_info")
                               if info and key in info}, i)
        reason = self._recycle_reason(slot)
        log.info("worker %d (env %d): %s", slot.index, i, reason)
        self._sup.replace(slot, Failure("recycle", reason), ("now", self._derived_seeds(slot), r),
                          planned=True)
        if self._sup.wait([slot], self._sup.start_timeout):
            raise self._failure_error(slot, self._failure_of(slot), "while recycling")
        self._collect_infos(slot, infos)

    def _recycle_due(self, done: np.ndarray, r: int | None) -> None:
        """Replace workers that reached their episode or memory limit, at an episode boundary
        (NEXT_STEP and DISABLED after a step, any mode at a reset)."""
        for slot in self._sup.slots:
            (i,) = slot.env_indices
            if not done[i]:
                continue
            reason = self._recycle_reason(slot)
            if reason is None:
                continue
            log.info("worker %d (env %d): %s", slot.index, i, reason)
            initial = ("pending", self._derived_seeds(slot)) if r is not None else None
            self._sup.replace(slot, Failure("recycle", reason), initial, planned=True)
            if r is None:  # reset path: the reset request follows; wait for the start first
                failed = self._sup.wait([slot], self._sup.start_timeout)
                if failed:
                    raise self._failure_error(slot, self._failure_of(slot), "while recycling")


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
