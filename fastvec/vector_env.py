"""FastVectorEnv: gymnasium's vector-env contract over shared-memory rings.

This module keeps the contract: the call states, argument checks, the three autoreset
modes and the results of reset, step and call. Its collaborators, each owned by the env:
the OS resources (fastvec/resources.py), the processes (fastvec/supervisor.py), actions on
their way out (fastvec/actions.py), observations (fastvec/observations.py) and infos
(fastvec/infos.py) on their way back, replacing failed workers (fastvec/recovery.py), what
a reset, step or call returns for their envs (fastvec/outcomes.py), the errors and logs of
failures (fastvec/failure_reports.py) and ``send``/``recv`` (fastvec/first_ready.py). The
byte layout lives in csrc/ring.h; construction helpers in fastvec/registration.py.

A failed worker (died, frozen, hung, raised) is replaced in place; its envs come back
in that step as truncated with ``infos["worker_restarted"]`` set (``on_failure="respawn"``),
or the step raises :class:`fastvec.WorkerFailure` (``on_failure="raise"``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from fastvec import _ring
from fastvec.actions import Actions
from fastvec.bundles import CrashBundles
from fastvec.checkpoint import Checkpoints
from fastvec.contract import (State, VectorContract, assert_callable, assert_resets_done,
                              attr_values, check_observation_mode, reset_arguments)
from fastvec.episodes import EpisodeLog
from fastvec.errors import AlreadyPendingCallError
from fastvec.failure_reports import raise_if_policy
from fastvec.first_ready import FirstReady, FirstReadyCalls
from fastvec.infos import InfoColumns, ReplyInfos
from fastvec.layout import Plan
from fastvec.observations import ObservationRing
from fastvec.options import Options
from fastvec.outcomes import Outcomes, PendingReset, PendingStep
from fastvec.recovery import Recovery
from fastvec.replay import OP_CALL, OP_SET_ATTR
from fastvec.resume import Resume
from fastvec.resources import Resources
from fastvec.shm import put_pickle, sweep_stale
from fastvec.supervisor import Slot, Supervisor

__all__ = ["FastVectorEnv"]

# health()'s step-latency percentiles sample one step in this many on the common path
# (reading every worker's latency each step costs more than the rest of step_wait).
_LATENCY_SAMPLE = 4


def _weak(method):
    """``method`` of an object, called without keeping the object alive."""
    ref = weakref.WeakMethod(method)
    return lambda *args: ref()(*args)


class FastVectorEnv(Checkpoints, FirstReadyCalls, VectorContract, VectorEnv):
    """Vectorized env whose workers exchange data through POSIX shared-memory rings.

    Args:
        env_fns: functions that create the envs (as for ``AsyncVectorEnv``).
        context: multiprocessing start method: ``"fork"``, ``"spawn"``, ``"forkserver"`` or None
            (the platform's default); or ``"serial"``: the envs run in this process, one
            after the other, with the same API, infos and error semantics (for debugging:
            a breakpoint in env code works; nothing watches for hangs or crashes).
        copy: return copies of the observations (True) or views of the ring slot, valid
            until ``ring_depth`` further resets/steps (False).
        autoreset_mode: ``AutoresetMode`` (or its string value).
        envs_per_worker: envs stepped in turn by one worker process (one wake-up for all).
        on_failure: ``"respawn"`` (default) or ``"raise"``: what a step or autoreset that
            hit a failed worker does (an exception the env raises in a ``reset()`` or
            ``call()`` you made is always raised, with the env's own type).
        on_budget_exhausted: ``"raise"`` (default: ``RestartBudgetExceeded`` and the env
            closes) or ``"disable"`` (the slot's envs stay in the batch out of play,
            truncated every step with ``infos["env_disabled"]``, until a reset tries again).
        heartbeat_interval / heartbeat_timeout: seconds between a worker's heartbeats and
            how long a stopped heartbeat is tolerated before the worker counts as frozen.
        step_timeout: how long a request (step, reset, call, get_attr, set_attr, render)
            may run before its worker counts as hung and is replaced. ``"auto"``
            (default): 20x the slowest request that worker completed, at least 60 s; a
            number: that many seconds; None: no limit (a deadlock in env code then hangs
            the call). A slow request under the bound is never touched.
        start_timeout: seconds a worker may take to start and build its envs (a
            replacement's build counts against this, never against ``step_timeout``).
        max_restarts / restart_window: at most this many restarts of one slot within the
            window (seconds); beyond that ``on_budget_exhausted`` applies.
        recycle_after_episodes / max_worker_rss: replace a worker at an episode boundary
            after that many episodes / once its resident memory exceeds that many bytes
            (needs ``envs_per_worker=1``).
        recycle_grace: seconds a recycled worker may take to close its envs and exit
            before it is killed (it does so while its successor starts).
        ring_depth: result slots per env (>= 2).
        max_payload_bytes: ceiling of the side buffer that carries infos and call results.
        validate_actions: check actions against the action space before sending (bounds too).
        info_spec: ``{key: type}`` of info values that travel in typed shared-memory
            columns from the first step (``int``, ``float``, ``bool``, numpy integer/float
            scalar types, or ``(dtype, shape)`` of a numeric array). Without it, such keys
            get columns once seen (fastvec/infos.py); other values are pickled. Results are
            the same either way.
        batch_size: enables ``send``/``recv``: ``recv`` returns the first ``batch_size`` envs
            to finish (NEXT_STEP only, ``envs_per_worker=1``); ``step`` stays lockstep.
        spin_us: microseconds the parent and workers spin on the ring before sleeping on
            the semaphore; ``"auto"`` (default) spins 100 us, or not at all with one usable
            core. Spinners yield their core (``sched_yield``) between rounds of polls, so
            oversubscription costs a little, never a timeslice per hand-over. 0 always sleeps.
        observation_mode: as gymnasium's: ``"same"`` (every env has env 0's observation
            space), ``"different"`` (same shape and dtype, other bounds; batched with
            ``batch_differing_spaces``), or a ``(batch_space, single_space)`` pair.
        daemon: start workers as daemon processes.
        resume: ``"auto"`` (default): keep each env's episode log so that a lost worker's
            envs are replayed, checked, and go on (``infos["worker_resumed"]``) where the
            replay matches, else end truncated (fastvec/resume.py); ``"off"``: no log.
        snapshot_every: every this many steps, snapshot the envs that offer
            ``get_state()``/``set_state()``: replays start there (None: never).
        max_replay_steps: longest episode (steps) the log keeps; a longer one ends
            truncated on a failure, as with ``resume="off"``.
        crash_dir: a directory where each failure leaves a crash bundle per env of the
            failed worker, for ``fastvec replay`` (fastvec/bundles.py); None: none.
        spares: worker processes kept started (their envs built, when every env comes
            from one function) that a failed worker's slot adopts at once instead of
            starting and building a new one (fastvec/spares.py); 0: none.
    """

    _kind = "FastVectorEnv"
    _resources: Resources | None = None
    _sup: Supervisor | None = None
    _first_ready: FirstReady | None = None  # send/recv (batch_size set)
    _waiting = 0  # calls of any thread waiting for workers (close() from another wakes them)
    _event: tuple | None = None  # the call or set_attr in flight, for the episode log
    _request: tuple | None = None  # (opcode, payload of a slot) of the call in flight
    _waiter = 0  # the thread that entered the latest of them

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]],
        *,
        context: str | None = None,
        copy: bool = True,
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        envs_per_worker: int = 1,
        on_failure: str = "respawn",
        on_budget_exhausted: str = "raise",
        heartbeat_interval: float = 0.05,
        heartbeat_timeout: float = 5.0,
        step_timeout: float | str | None = "auto",
        start_timeout: float = 60.0,
        max_restarts: int = 5,
        restart_window: float = 60.0,
        recycle_after_episodes: int | None = None,
        max_worker_rss: int | None = None,
        recycle_grace: float = 5.0,
        ring_depth: int = 2,
        max_payload_bytes: int = 1 << 30,
        validate_actions: bool = True,
        spin_us: float | str = "auto",
        info_spec: dict | None = None,
        batch_size: int | None = None,
        observation_mode: str | tuple = "same",
        daemon: bool = True,
        resume: str = "auto",
        max_replay_steps: int = 10_000,
        snapshot_every: int | None = None,
        crash_dir: str | None = None,
        spares: int = 0,
    ):
        self._state = State.DEFAULT
        self.closed = False
        env_fns = list(env_fns)
        check_observation_mode(observation_mode)
        opts = self.options = Options(
            context=context, copy=copy, autoreset_mode=autoreset_mode,
            envs_per_worker=envs_per_worker, on_failure=on_failure,
            on_budget_exhausted=on_budget_exhausted, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout, step_timeout=step_timeout,
            start_timeout=start_timeout, max_restarts=max_restarts,
            restart_window=restart_window, recycle_after_episodes=recycle_after_episodes,
            max_worker_rss=max_worker_rss, recycle_grace=recycle_grace, ring_depth=ring_depth,
            max_payload_bytes=max_payload_bytes, validate_actions=validate_actions,
            spin_us=spin_us, info_spec=info_spec, batch_size=batch_size, daemon=daemon,
            resume=resume, max_replay_steps=max_replay_steps, snapshot_every=snapshot_every,
            crash_dir=None if crash_dir is None else os.fspath(crash_dir), spares=spares)
        opts.check_num_envs(len(env_fns))

        self.env_fns = env_fns
        self.num_envs = len(env_fns)
        self.copy = opts.copy
        self.autoreset_mode = opts.autoreset_mode
        self.batch_size = opts.batch_size

        self._take_spaces(env_fns, observation_mode)

        k = opts.envs_per_worker
        slots_envs = [tuple(range(i, min(i + k, self.num_envs)))
                      for i in range(0, self.num_envs, k)]
        self._plan = Plan(self.single_observation_space, self.single_action_space,
                          self.num_envs, len(slots_envs), opts.ring_depth)

        sweep_stale()
        res = self._resources = Resources()
        self._finalizer = weakref.finalize(self, res.cleanup)
        try:
            self._views = self._plan.views(res.open_main(self._plan).mm)
            self._infos = InfoColumns(self._views, self.num_envs, opts.info_spec)
            self._sup = res.start(opts, self._plan, slots_envs, env_fns,
                                  (self.single_observation_space, self.single_action_space),
                                  observation_mode)
        except BaseException:
            self._views = self._infos = None
            self._finalizer()
            self.closed = True
            raise

        self._ring = 0  # ring slot holding the latest results of a lockstep call
        self._env_ring = np.zeros(self.num_envs, np.int64)  # ... of each env (send/recv)
        self._inflight = np.zeros(self.num_envs, np.bool_)
        self._all_envs = np.arange(self.num_envs)
        self._needs_reset = np.zeros(self.num_envs, np.bool_)
        # NEXT_STEP: envs whose next step is their autoreset (their last one ended an
        # episode). A worker lost while all its envs are due costs no episode: its
        # replacement resets them in that step, which is their reset step anyway.
        self._next_step = self.autoreset_mode == AutoresetMode.NEXT_STEP
        self._due = np.zeros(self.num_envs, np.bool_)
        self._pending: PendingReset | PendingStep | None = None
        self._obs = ObservationRing(self._plan, self._views, self.single_observation_space,
                                    self.num_envs, opts.ring_depth, self.copy)
        self._actions = Actions(self._plan, self._views, self.single_action_space,
                                self.num_envs, opts.validate_actions, opts.max_payload_bytes)
        # the compiled step path (fastvec/_parent.pyx) where the spaces allow it
        self._act_writer = self._actions.compiled()
        self._steps = 0
        self._recovery = Recovery(self._sup, opts, self.num_envs,
                                  recent_actions=_weak(self._recent_actions),
                                  close_broken=_weak(self._close_broken))
        self._replies = ReplyInfos(self._infos, self._obs.pickled, self.num_envs)
        self._episodes = self._resume = None
        if opts.resuming:
            self._episodes = EpisodeLog(self._views.act, self.num_envs, opts.max_replay_steps)
            self._resume = Resume(self._sup, self._recovery, self._episodes, self._obs,
                                  self._views, self._replies, opts, self._actions.put_pickled)
        self._outcomes = Outcomes(self._sup, self._recovery, self._obs, self._views,
                                  self._replies, opts, self._resume)
        if opts.crash_dir is not None:
            self._recovery.on_failure = CrashBundles(opts.crash_dir, self._episodes,
                                                     self._views, self._actions,
                                                     self.single_action_space).write
        if self.batch_size is not None:
            self._first_ready = FirstReady(
                self._sup, self._recovery, self._obs, self._views, self._infos,
                batch_size=self.batch_size, ring_depth=opts.ring_depth, resume=self._resume,
                recycling=opts.recycling, on_failure=opts.on_failure, inflight=self._inflight,
                env_ring=self._env_ring, due=self._due, count_step=_weak(self._count_step))

    # -- properties of the contract ------------------------------------------------------
    def health(self) -> list[dict]:
        """Per worker: pid, whether it is disabled, restarts and their reasons, last
        failure, requests, episodes, resident memory and step-latency percentiles (ms)."""
        self._assert_open()
        return self._sup.health()

    # -- reset -------------------------------------------------------------------------------
    def reset_async(self, seed: int | Sequence[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        self._assert_idle("reset_async")
        n = self.num_envs
        seeds, options, mask = reset_arguments(seed, options, n)
        if mask is None:
            mask = np.ones(n, np.bool_)
        self._recovery.remember_seeds(seeds, mask)
        self._align_rings()

        touched = [s for s in self._sup.slots if any(mask[i] for i in s.env_indices)]
        self._recovery.before_reset(touched)

        r = (self._ring + 1) % self.options.ring_depth
        requests = []
        for slot in touched:
            if slot.disabled is not None:
                continue
            bits = sum(1 << j for j, i in enumerate(slot.env_indices) if mask[i])
            payload = ([seeds[i] for i in slot.env_indices],
                       [options] * len(slot.env_indices))
            requests.append((slot, _ring.OP_RESET, r,
                             put_pickle(slot.payload, payload, self.options.max_payload_bytes),
                             bits))
        self._sup.dispatch.send(requests)  # all payloads fit: send
        self._pending = PendingReset(r, mask, [item[0] for item in requests], seeds, options)
        self._state = State.WAITING_RESET

    def reset_wait(self, timeout: float | None = None):
        return self._guarded(self._reset_wait, timeout)

    def _reset_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_RESET, "reset_wait", "reset_async")
        p: PendingReset = self._pending
        failed = self._sup.dispatch.wait(p.slots, timeout)
        self._state = State.DEFAULT
        infos, keep, crashed = self._outcomes.reset(p, failed, self._env_ring)
        if self._episodes is not None:
            starts, _ = self._replies.take_notes()
            self._episodes.end([i for i in np.flatnonzero(~keep) if i not in starts],
                               "its reset reported no start")
            self._episodes.started(starts)
        self._needs_reset[p.mask] = False
        self._due[~keep] = False
        self._ring = p.ring
        self._env_ring[:] = p.ring
        self._infos.publish()
        raise_if_policy(self.options.on_failure, crashed)
        return self._obs.batch(p.ring), infos

    # -- step ----------------------------------------------------------------------------------
    def step_async(self, actions) -> None:
        self._assert_idle("step_async")
        assert_resets_done(self.autoreset_mode, self._needs_reset)
        r = (self._ring + 1) % self.options.ring_depth
        sup, dispatch = self._sup, self._sup.dispatch
        if (self._act_writer is not None and dispatch.batchable() and self._aligned()
                and dispatch.send_all(_ring.OP_STEP, r, self._act_writer, actions, self._steps)):
            # actions checked, stored and sent: one compiled call
            self._actions.pickled = {}
            self._pending = PendingStep(r, sup.slots, sent_to_all=True)
            self._state = State.WAITING_STEP
            return
        self._actions.write(actions, self._all_envs, self._steps)
        self._align_rings()
        if not self._actions.pickled and dispatch.batchable():
            dispatch.send_all(_ring.OP_STEP, r)
            self._pending = PendingStep(r, sup.slots, sent_to_all=True)
            self._state = State.WAITING_STEP
            return
        self._pending = self._outcomes.send_step(r, self._actions.put_pickled, self._due)
        self._state = State.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        return self._guarded(self._step_wait, timeout)

    def _step_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_STEP, "step_wait", "step_async")
        p: PendingStep = self._pending
        r, v = p.ring, self._views
        if p.sent_to_all:
            failed = self._sup.dispatch.wait_all(timeout)
            if not failed and not self.options.recycling:
                return self._step_result(r)
        else:
            failed = self._sup.dispatch.wait(p.slots, timeout)
        self._state = State.DEFAULT
        self._steps += 1
        infos, restarted, done = self._outcomes.step(p, failed, self._env_ring, self._due)
        self._log_step(r)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            disabled = np.zeros(self.num_envs, np.bool_)
            for slot in self._sup.slots:
                if slot.disabled is not None:
                    disabled[list(slot.env_indices)] = True
            self._needs_reset |= done & ~disabled
        elif self._next_step:
            self._due[:] = done
        self._ring = r
        self._env_ring[:] = r
        self._infos.publish()
        raise_if_policy(self.options.on_failure, restarted)
        return (self._obs.batch(r), v.reward[r].copy(), v.terminated[r].copy(),
                v.truncated[r].copy(), infos)

    def _step_result(self, r: int):
        """step_wait's common case: every worker answered OK, nothing to replace or recycle."""
        self._state = State.DEFAULT
        self._steps += 1
        slots = self._sup.slots
        if self._infos.n or self._sup.dispatch.payload_replies():
            infos = self._replies.step(slots, r)
        else:
            infos = {}
        if self._steps % _LATENCY_SAMPLE == 1:  # the first step, then every 4th
            self._sup.record_latency(slots)
        if self._episodes is not None:
            self._log_step(r)
        if self._obs.results is not None:
            obs, reward, terminated, truncated = self._obs.results.get(r)
        else:
            v = self._views
            obs, reward = self._obs.batch(r), v.reward[r].copy()
            terminated, truncated = v.terminated[r].copy(), v.truncated[r].copy()
        if self._next_step:
            np.logical_or(terminated, truncated, out=self._due)
        elif self.autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= terminated | truncated
        self._ring = r
        self._env_ring[:] = r
        self._infos.publish()
        return obs, reward, terminated, truncated, infos

    # -- call / attributes -------------------------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        self._assert_idle("call_async")
        assert_callable(name)
        self._send_to_all(_ring.OP_CALL, lambda slot: (name, args, kwargs))
        self._event = (OP_CALL, (name, args, kwargs))
        self._state = State.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        return self._guarded(self._call_wait, timeout)

    def _call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        self._assert_waiting(State.WAITING_CALL, "call_wait", "call_async")
        return self._gather_calls(self._sup.dispatch.wait(self._pending, timeout))

    def _log_call(self) -> None:
        """A call or set_attr reached the envs: their episode logs replay it, in order."""
        if self._episodes is not None and self._event is not None:
            self._episodes.event(*self._event)
        self._event = None

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        self._assert_idle("set_attr")
        values = attr_values(values, self.num_envs)
        self._send_to_all(_ring.OP_SET_ATTR,
                          lambda slot: (name, [values[i] for i in slot.env_indices]))
        self._event = (OP_SET_ATTR, (name, values))
        self._state = State.WAITING_CALL
        self._guarded(lambda: self._gather_calls(self._sup.dispatch.wait(self._pending, None),
                                                 results=False))

    def _send_to_all(self, op: int, payload_of) -> None:
        slots = [s for s in self._sup.slots if s.disabled is None]
        sizes = [put_pickle(slot.payload, payload_of(slot), self.options.max_payload_bytes)
                 for slot in slots]
        # every payload fitted: send
        self._sup.dispatch.send([(slot, op, 0, n, None) for slot, n in zip(slots, sizes)])
        self._pending = slots
        self._request = (op, payload_of)  # re-sent to a worker resumed (fastvec/resume.py)

    def _gather_calls(self, failed: list[Slot], results: bool = True):
        self._state = State.DEFAULT
        try:
            return self._outcomes.call(failed, results, self._request,
                                       (self._ring + 1) % self.options.ring_depth,
                                       self._env_ring)
        finally:
            self._log_call()

    # -- closing ---------------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False, **kwargs) -> None:
        """Close in stages, bounded: wait (at most ``timeout``) for a pending call, ask the
        workers to close their envs (at most ``timeout``, default 5 s), then terminate and
        kill whatever is left."""
        if self._resources is None:
            return
        if self._waiting and self._waiter != threading.get_ident():
            # Another thread waits in a call: wake it (it raises ClosedEnvError) and let it
            # leave before the memory it reads goes.
            self._sup.dispatch.interrupt()
            deadline = time.monotonic() + 5.0
            while self._waiting and time.monotonic() < deadline:
                time.sleep(0.001)
            terminate = True
        terminate = self._settle_pending(5.0 if timeout is None else timeout, terminate)
        if getattr(self, "_obs", None) is not None:
            self._obs.release()
        self._views = self._infos = self._act_writer = self._obs = None
        if getattr(self, "_actions", None) is not None:
            self._actions.release()
        self._replies = self._outcomes = self._first_ready = self._resume = None  # views too
        if getattr(self, "_recovery", None) is not None:
            self._recovery.on_failure = None  # crash bundles hold views
        self._finalizer.detach()
        self._resources.cleanup(timeout, terminate)
        self._resources = None

    # -- internals -------------------------------------------------------------------------------
    def _guarded(self, wait, *args):
        """Run a call that waits for workers, counted, so that close() from another
        thread wakes it (ClosedEnvError) and lets it leave before releasing memory."""
        self._waiting += 1
        self._waiter = threading.get_ident()
        try:
            return wait(*args)
        finally:
            self._waiting -= 1
            if self._sup is not None:
                self._sup.call_returned()  # spares adopted in the call: start successors

    def _is_open(self) -> bool:  # the misuse checks are fastvec/contract.py's
        return not self.closed and self._resources is not None

    def _sending(self) -> bool:
        return self.batch_size is not None and bool(self._inflight.any())

    def _aligned(self) -> bool:
        """Whether every env's latest row sits in ``self._ring`` (always, without
        send/recv); else step_async's Python path aligns them first."""
        return self.batch_size is None or not (self._inflight.any()
                                               or (self._env_ring != self._ring).any())

    def _align_rings(self) -> None:
        """After send/recv the envs' latest rows sit in different ring slots; a lockstep
        call needs them in one (self._ring) so that a batch is one slot."""
        if self.batch_size is None:
            return  # without send()/recv() every env's latest row is in self._ring
        if self._inflight.any():
            raise AlreadyPendingCallError(
                f"envs {np.flatnonzero(self._inflight).tolist()} are still stepping after "
                "send(); recv() them before a lockstep call", "recv")
        off = np.flatnonzero(self._env_ring != self._ring)
        if len(off):
            self._obs.carry(off, self._ring, self._env_ring)
            self._env_ring[:] = self._ring

    def _log_step(self, r: int) -> None:
        """Log the lockstep step in ring slot ``r`` (and the episodes its replies began)."""
        if self._episodes is not None:
            self._episodes.record(self._views, r, self._actions.pickled)
            if self._replies.starts or self._replies.snapshots:
                self._episodes.started(*self._replies.take_notes())

    def _count_step(self) -> None:
        self._steps += 1

    def _recent_actions(self, slot: Slot) -> dict:
        return self._actions.recent(slot.env_indices, self._steps)
