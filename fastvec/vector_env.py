"""FastVectorEnv: gymnasium's vector-env contract over shared-memory rings.

The byte layout lives in csrc/ring.h, the process picture in fastvec/supervisor.py, the
replacement of failed workers in fastvec/recovery.py, first-ready batches in
fastvec/batches.py, construction helpers in fastvec/registration.py. This module keeps
the contract: what reset, step and call return, including for envs whose worker failed.

A failed worker (died, frozen, hung, raised) is replaced in place; its envs come back
in that step as truncated with ``infos["worker_restarted"]`` set (``on_failure="respawn"``),
or the step raises :class:`fastvec.WorkerFailure` (``on_failure="raise"``).
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import CloudpickleWrapper, batch_differing_spaces, batch_space

from fastvec import _parent, _ring
from fastvec.batches import FirstReadyBatches
from fastvec.contract import (State, VectorContract, assert_callable, assert_resets_done,
                              attr_values, disabled_info, probe_env, reset_arguments,
                              restart_info)
from fastvec.errors import (AlreadyPendingCallError, EnvSpacesError, FastVecError,
                            InvalidActionError, RemoteTraceback, SpaceMismatchError,
                            WorkerFailure)
from fastvec.infos import InfoColumns
from fastvec.layout import Plan, check_actions, flatten, split_pickled
from fastvec.observations import ObservationRing
from fastvec.options import Options
from fastvec.recovery import Recovery, ReplacementPlan, When
from fastvec.shm import Names, Segment, get_pickle, new_prefix, put_pickle, sweep_stale
from fastvec.supervisor import Failure, Slot, Supervisor

__all__ = ["FastVectorEnv"]

log = logging.getLogger("fastvec")
# health()'s step-latency percentiles sample one step in this many on the common path
# (reading every worker's latency each step costs more than the rest of step_wait).
_LATENCY_SAMPLE = 4


@dataclass
class PendingReset:
    ring: int
    mask: np.ndarray
    slots: list
    seeds: list
    options: dict | None


@dataclass
class PendingStep:
    ring: int
    slots: list  # the slots a request went to
    lost: list = field(default_factory=list)  # slots replaced earlier, reported in this step
    batched: bool = False  # sent to every slot by Supervisor.send_all (the common case)
    reset: list = field(default_factory=list)  # lost slots sent a RESET: a new episode now


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


class FastVectorEnv(FirstReadyBatches, VectorContract, VectorEnv):
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
    """

    _kind = "FastVectorEnv"
    _resources: _Resources | None = None
    _sup: Supervisor | None = None
    _waiting = 0  # calls of any thread waiting for workers (close() from another wakes them)
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
    ):
        self._state = State.DEFAULT
        self.closed = False
        env_fns = list(env_fns)
        custom_spaces = isinstance(observation_mode, tuple) and len(observation_mode) == 2
        if not custom_spaces and observation_mode not in ("same", "different"):
            raise ValueError("Invalid `observation_mode`, expected: 'same' or 'different' or tuple "
                             "of single and batch observation space, actual got "
                             f"{observation_mode}")
        if custom_spaces and not all(isinstance(sp, gym.Space) for sp in observation_mode):
            raise TypeError("Expected both elements of observation_mode to be Spaces, got "
                            f"{type(observation_mode[0])} and {type(observation_mode[1])}")
        opts = self.options = Options(
            context=context, copy=copy, autoreset_mode=autoreset_mode,
            envs_per_worker=envs_per_worker, on_failure=on_failure,
            on_budget_exhausted=on_budget_exhausted, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout, step_timeout=step_timeout,
            start_timeout=start_timeout, max_restarts=max_restarts,
            restart_window=restart_window, recycle_after_episodes=recycle_after_episodes,
            max_worker_rss=max_worker_rss, recycle_grace=recycle_grace, ring_depth=ring_depth,
            max_payload_bytes=max_payload_bytes, validate_actions=validate_actions,
            spin_us=spin_us, info_spec=info_spec, batch_size=batch_size, daemon=daemon)
        opts.check_num_envs(len(env_fns))

        self.env_fns = env_fns
        self.num_envs = len(env_fns)
        self.copy = opts.copy
        self.autoreset_mode = opts.autoreset_mode
        self.batch_size = opts.batch_size

        probe = probe_env(env_fns[0], self.autoreset_mode)
        self.metadata, self.render_mode = probe.metadata, probe.render_mode
        self.single_observation_space = probe.observation_space
        self.single_action_space = probe.action_space
        # observation_mode, as gymnasium defines it: "same" (n copies of env 0's space),
        # "different" (same shape and dtype, other bounds), or (batch space, single space).
        self.observation_mode = observation_mode
        if custom_spaces:
            self.observation_space, self.single_observation_space = observation_mode
        elif observation_mode == "different":
            env_spaces = [self.single_observation_space]
            for fn in env_fns[1:]:
                env = fn()
                try:
                    env_spaces.append(env.observation_space)
                finally:
                    env.close()
            self.observation_space = batch_differing_spaces(env_spaces)
        else:
            self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        k = opts.envs_per_worker
        slots_envs = [tuple(range(i, min(i + k, self.num_envs))) for i in range(0, self.num_envs, k)]
        self._plan = Plan(self.single_observation_space, self.single_action_space,
                          self.num_envs, len(slots_envs), opts.ring_depth)

        sweep_stale()
        res = self._resources = _Resources()
        self._finalizer = weakref.finalize(self, res.cleanup)
        try:
            prefix = res.names.prefix
            res.main = res.names.new_segment("main", self._plan.size)
            self._views = self._plan.views(res.main.mm)
            self._infos = InfoColumns(self._views, self.num_envs, opts.info_spec)
            res.supervisor = self._sup = Supervisor(
                options=opts, prefix=prefix,
                ctx=None if opts.context == "serial" else multiprocessing.get_context(opts.context),
                names=res.names, main=res.main, plan=self._plan, slots_envs=slots_envs,
                env_fns=[CloudpickleWrapper(fn) for fn in env_fns],
                single_spaces=(self.single_observation_space, self.single_action_space),
                observation_mode="same" if observation_mode == "same" else "different")
            for slot in self._sup.slots:
                self._sup.start_process(slot)
            self._sup.start_watchdog()
            failures = self._sup.await_ready(self._sup.slots)
            if failures:
                slot, failure = min(failures.items(), key=lambda item: item[0].index)
                exc = failure.remote[0] if failure.remote else None
                if isinstance(exc, EnvSpacesError):  # as gymnasium: a RuntimeError
                    raise exc from RemoteTraceback(failure.remote[1])
                raise self._failure_error(slot, failure, "while starting its envs")
        except BaseException:
            self._views = self._infos = None
            self._finalizer()
            self.closed = True
            raise

        self._recovery = Recovery(self)
        self._ring = 0  # ring slot holding the latest results of a lockstep call
        self._env_ring = np.zeros(self.num_envs, np.int64)  # ... of each env (send/recv)
        self._inflight = np.zeros(self.num_envs, np.bool_)
        self._all_envs = np.arange(self.num_envs)
        self._env_to_slot = [s for s in self._sup.slots for _ in s.env_indices]
        self._base_seeds: list[int | None] = [None] * self.num_envs
        self._restarts = np.zeros(self.num_envs, np.int64)
        self._needs_reset = np.zeros(self.num_envs, np.bool_)
        # NEXT_STEP: envs whose next step is their autoreset (their last one ended an
        # episode). A worker lost while all its envs are due costs no episode: its
        # replacement resets them in that step, which is their reset step anyway.
        self._next_step = self.autoreset_mode == AutoresetMode.NEXT_STEP
        self._due = np.zeros(self.num_envs, np.bool_)
        self._pending: PendingReset | PendingStep | None = None
        self._obs = ObservationRing(self._plan, self._views, self.single_observation_space,
                                    self.num_envs, opts.ring_depth, self.copy)
        self._action_history = [np.zeros((4, *a.shape), a.dtype) for a in self._views.act
                                if a is not None]
        # the compiled step path (fastvec/_parent.pyx) where the spaces allow it
        self._act_writer = self._action_writer()
        self._steps = 0

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
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._base_seeds[i] = int(seeds[i])
        self._align_rings()

        touched = [s for s in self._sup.slots if any(mask[i] for i in s.env_indices)]
        disabled = [s for s in touched if s.disabled is not None]
        if disabled:
            self._recovery.reenable(disabled)
        if self.options.recycling:
            due = [s for s in touched if s.serving and self._recovery.recycle_reason(s)]
            if due:
                self._recovery.recycle(due, ReplacementPlan(when=When.BY_CALLER))

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
        self._sup.send(requests)  # all payloads fit: send
        self._pending = PendingReset(r, mask, [item[0] for item in requests], seeds, options)
        self._state = State.WAITING_RESET

    def reset_wait(self, timeout: float | None = None):
        return self._guarded(self._reset_wait, timeout)

    def _reset_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_RESET, "reset_wait", "reset_async")
        p: PendingReset = self._pending
        failed = self._sup.wait(p.slots, timeout)
        self._state = State.DEFAULT
        r, mask = p.ring, p.mask
        usage, user_errors, crashed = [], [], []
        for slot in failed:
            failure = self._sup.failure_of(slot)
            if failure.reason == "mismatch":
                usage.append((slot, failure))
            elif failure.reason == "exception":
                user_errors.append((slot, failure))  # the env raised: the worker lives on
            else:
                crashed.append((slot, failure))
        # A worker that died, froze or hung in this reset: its replacement replays the
        # reset (the user's seeds and options for the masked envs, derived seeds for the
        # others of that worker, which lose their episode and are flagged).
        items = []
        for slot, failure in crashed:
            pos = [j for j, i in enumerate(slot.env_indices) if mask[i]]
            items.append((slot, failure, ReplacementPlan(
                when=When.NOW, ring=r, user_reset=True,
                seeds={j: p.seeds[slot.env_indices[j]] for j in pos},
                options={j: p.options for j in pos})))
        if items:
            user_errors += [(e.slot, e.failure) for e in self._recovery.replace(items)]
        if usage:
            raise self._failure_error(*usage[0], "in reset")
        if user_errors:
            self._raise_user_error(*user_errors[0])

        infos: dict = {}
        replaced = {slot for slot, _ in crashed if slot.disabled is None}
        keep = ~mask
        for slot in p.slots:
            if slot in replaced:
                keep[list(slot.env_indices)] = False
            if slot.disabled is None:
                self._collect_infos(slot, infos, r)
        for slot, failure in crashed:
            flag = self._disabled_info(slot.disabled) if slot.disabled else self._restart_info(failure)
            for i in slot.env_indices:
                infos = self._add_info(infos, flag, i)
        for slot in self._sup.slots:
            if slot.disabled is not None:
                keep[list(slot.env_indices)] = True
                if slot not in {s for s, _ in crashed}:
                    for i in slot.env_indices:
                        if mask[i]:
                            infos = self._add_info(infos, self._disabled_info(slot.disabled), i)
            elif slot.lost is not None and all(mask[i] for i in slot.env_indices):
                slot.lost = None  # its envs were just reset: nothing left to report
        self._obs.carry(np.flatnonzero(keep), r, self._env_ring)
        self._needs_reset[mask] = False
        self._due[~keep] = False
        self._ring = r
        self._env_ring[:] = r
        self._infos.publish()
        self._raise_if_policy([(s, f) for s, f in crashed])
        return self._obs.batch(r), infos

    # -- step ----------------------------------------------------------------------------------
    def step_async(self, actions) -> None:
        self._assert_idle("step_async")
        assert_resets_done(self.autoreset_mode, self._needs_reset)
        r = (self._ring + 1) % self.options.ring_depth
        sup = self._sup
        if (self._act_writer is not None and sup.batchable() and self._aligned()
                and sup.send_all(_ring.OP_STEP, r, self._act_writer, actions, self._steps)):
            self._pacts = {}  # actions checked, stored and sent: one compiled call
            self._pending = PendingStep(r, sup.slots, batched=True)
            self._state = State.WAITING_STEP
            return
        flat = self._flat_actions(actions, self.num_envs)
        self._write_actions(flat, self._all_envs)
        self._align_rings()
        if not self._pacts and sup.batchable():
            sup.send_all(_ring.OP_STEP, r)
            self._pending = PendingStep(r, sup.slots, batched=True)
            self._state = State.WAITING_STEP
            return
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        requests, lost, reset = [], [], []
        for slot in self._sup.slots:
            if slot.disabled is not None:
                continue
            if slot.lost is not None:
                lost.append(slot)
                if same_step or self._all_due(slot):  # its new worker starts the next
                    n = put_pickle(slot.payload, ([None] * len(slot.env_indices),  # episode
                                                  [None] * len(slot.env_indices)),  # now
                                   self.options.max_payload_bytes)
                    requests.append((slot, _ring.OP_RESET, r, n, None))
                    reset.append(slot)
                continue
            requests.append((slot, _ring.OP_STEP, r, self._put_pickled_actions(slot), None))
        self._sup.send(requests)
        self._pending = PendingStep(r, [item[0] for item in requests], lost, reset=reset)
        self._state = State.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        return self._guarded(self._step_wait, timeout)

    def _step_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_STEP, "step_wait", "step_async")
        p: PendingStep = self._pending
        r, v = p.ring, self._views
        if p.batched:
            failed = self._sup.wait_all(timeout)
            if not failed and not self.options.recycling:
                return self._step_result(r)
        else:
            failed = self._sup.wait(p.slots, timeout)
        self._state = State.DEFAULT
        self._steps += 1
        for slot in failed:
            failure = self._sup.failure_of(slot)
            if failure.reason == "mismatch":
                raise self._failure_error(slot, failure, "in step")
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        infos: dict = {}
        # Workers that failed in this step, and those replaced earlier (in a call): each of
        # their envs ends its episode truncated, reward 0, with its last observation. In
        # NEXT_STEP, a worker whose envs all ended their episode in the last step loses
        # nothing: its replacement resets them now, and this step is their reset step.
        crashed = [(slot, self._sup.failure_of(slot)) for slot in failed]
        lost = [slot for slot in p.lost if slot not in failed]
        last = {i: self._obs.row(self._env_ring[i], i)
                for slot in [*failed, *lost] for i in slot.env_indices}
        now = {slot for slot, _ in crashed if same_step or self._all_due(slot)} | set(p.reset)
        if crashed:
            self._recovery.replace([(slot, failure, ReplacementPlan(
                when=When.NOW if slot in now else When.NEXT, ring=r))
                for slot, failure in crashed])
        restarted = crashed + [(slot, slot.lost) for slot in lost]
        for slot in p.lost:
            slot.lost = None
        reported = set()
        for slot, failure in restarted:
            reported.add(slot)
            if not same_step and slot in now and slot.disabled is None:
                self._truncate(slot, r, truncated=False)  # no episode lost: flagged, reset infos
                for i in slot.env_indices:
                    infos = self._add_info(infos, self._restart_info(failure), i)
                self._collect_infos(slot, infos, r)
                continue
            self._truncate(slot, r)
            fresh = same_step and slot.disabled is None  # a new episode started in this step
            if not fresh:
                self._obs.carry(slot.env_indices, r, self._env_ring)
            for i in slot.env_indices:
                if same_step:
                    infos = self._add_info(infos, {"final_obs": last[i], "final_info": {}}, i)
                infos = self._add_info(infos, self._disabled_info(slot.disabled) if slot.disabled
                                       else self._restart_info(failure), i)
            if fresh:
                self._collect_infos(slot, infos, r)
        for slot in self._sup.slots:
            if slot.disabled is not None and slot not in reported:
                reported.add(slot)
                self._report_disabled(slot, r, infos)
        terminated = v.terminated[r].copy()
        truncated = v.truncated[r].copy()
        done = terminated | truncated
        due = []
        if self.options.recycling:
            due = [s for s in self._sup.slots if s not in reported and s.serving
                   and done[s.env_indices[0]] and self._recovery.recycle_reason(s)]
        for slot in self._sup.slots:
            if slot in reported:
                continue
            if same_step and slot in due:
                self._keep_final(slot, infos)  # the new worker's reset infos follow
            else:
                self._collect_infos(slot, infos, r)
        if due:
            if same_step:  # the next episode must come from the new worker: it resets now
                self._recovery.recycle(due, ReplacementPlan(when=When.NOW, ring=r))
                for slot in due:
                    self._collect_infos(slot, infos, r)
            else:
                self._recovery.recycle(due, ReplacementPlan(when=When.NEXT))
        self._sup.record_latency([s for s in p.slots if s not in reported])
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
        self._raise_if_policy(restarted)
        return (self._obs.batch(r), v.reward[r].copy(), v.terminated[r].copy(),
                v.truncated[r].copy(), infos)

    def _step_result(self, r: int):
        """step_wait's common case: every worker answered OK, nothing to replace or recycle."""
        self._state = State.DEFAULT
        self._steps += 1
        slots = self._sup.slots
        if self._infos.n or self._sup.payload_replies():
            infos = self._step_infos(slots, r)
        else:
            infos = {}
        if self._steps % _LATENCY_SAMPLE == 1:  # the first step, then every 4th
            self._sup.record_latency(slots)
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

    def _step_infos(self, slots: list[Slot], r: int) -> dict:
        """Every env's infos of ring slot ``r``: the typed columns in a few array
        operations, then what came pickled. If a key came both ways (a value whose type
        differs from its column's), env by env instead, so the arrays' dtypes are the ones
        gymnasium's ``_add_info`` picks."""
        cols = self._infos
        pickled: dict[int, dict] = {}
        for slot in slots:
            n = slot.ctl.resp_payload_len
            if not n:
                continue
            got, pobs = get_pickle(slot.payload, n)
            for j, i in enumerate(slot.env_indices):
                if got[j]:
                    pickled[i] = got[j]
                    cols.learn(got[j])
                if pobs[j] is not None:
                    self._obs.pickled[r][i] = pobs[j]
        infos: dict = {}
        if cols.n and pickled and cols.collides(list(pickled.values())):
            for i in range(self.num_envs):
                info = {**cols.env_info(r, i), **pickled.get(i, {})}
                if info:
                    self._add_info(infos, info, i)
            return infos
        cols.batch(r, infos)
        for i in sorted(pickled):
            self._add_info(infos, pickled[i], i)
        return infos

    # -- call / attributes -------------------------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        self._assert_idle("call_async")
        assert_callable(name)
        self._send_to_all(_ring.OP_CALL, lambda slot: (name, args, kwargs))
        self._state = State.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        return self._guarded(self._call_wait, timeout)

    def _call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        self._assert_waiting(State.WAITING_CALL, "call_wait", "call_async")
        return self._gather_calls(self._sup.wait(self._pending, timeout))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        self._assert_idle("set_attr")
        values = attr_values(values, self.num_envs)
        self._send_to_all(_ring.OP_SET_ATTR,
                          lambda slot: (name, [values[i] for i in slot.env_indices]))
        self._state = State.WAITING_CALL
        self._guarded(lambda: self._gather_calls(self._sup.wait(self._pending, None),
                                                 results=False))

    def _send_to_all(self, op: int, payload_of) -> None:
        slots = [s for s in self._sup.slots if s.disabled is None]
        sizes = [put_pickle(slot.payload, payload_of(slot), self.options.max_payload_bytes)
                 for slot in slots]
        self._sup.send([(slot, op, 0, n, None) for slot, n in zip(slots, sizes)])  # all fit
        self._pending = slots

    def _gather_calls(self, failed: list[Slot], results: bool = True):
        self._state = State.DEFAULT
        errors = [(slot, self._sup.failure_of(slot)) for slot in failed]
        crashed = [(s, f) for s, f in errors if f.reason not in ("exception", "mismatch")]
        if crashed:
            # The worker itself is gone: replace it now (its envs' episodes are lost and the
            # next step reports them), then report the call's failure.
            self._recovery.replace([(s, f, ReplacementPlan(when=When.NEXT)) for s, f in crashed])
            for slot, failure in crashed:
                if slot.disabled is None:
                    slot.lost = failure
        for slot, failure in errors:
            if failure.reason == "exception":
                self._raise_user_error(slot, failure)
        if errors:
            raise self._failure_error(*errors[0], "in a call")
        if not results:
            return None
        out: list = []
        for slot in self._sup.slots:
            if slot.disabled is not None:
                out.extend([None] * len(slot.env_indices))
            else:
                out.extend(get_pickle(slot.payload, slot.ctl.resp_payload_len))
        return tuple(out)

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
            self._sup.interrupt()
            deadline = time.monotonic() + 5.0
            while self._waiting and time.monotonic() < deadline:
                time.sleep(0.001)
            terminate = True
        terminate = self._settle_pending(5.0 if timeout is None else timeout, terminate)
        if getattr(self, "_obs", None) is not None:
            self._obs.release()
        self._views = self._infos = self._act_writer = self._obs = None
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

    def _is_open(self) -> bool:  # the misuse checks are fastvec/contract.py's
        return not self.closed and self._resources is not None

    def _sending(self) -> bool:
        return self.batch_size is not None and bool(self._inflight.any())

    def _flat_actions(self, actions, n: int) -> list:
        try:
            flat = flatten(self.single_action_space, actions)
        except SpaceMismatchError as exc:
            raise InvalidActionError(f"actions do not have the structure of "
                                     f"{self.single_action_space} (batched): {exc}") from None
        if self.options.validate_actions:
            return check_actions(self._plan.act_leaves, flat, n)
        return [split_pickled(leaf.space, a) if leaf.pickled else np.asarray(a)
                for leaf, a in zip(self._plan.act_leaves, flat)]

    def _action_writer(self) -> _parent.ActionWriter | None:
        """The compiled action check and copy, for a space with one fixed leaf whose
        bounds it can check (see fastvec/_parent.pyx); None: the Python path."""
        leaves = self._plan.act_leaves
        if len(leaves) != 1 or leaves[0].pickled or leaves[0].path != ():
            return None
        check = self.options.validate_actions
        if check and _parent.bounds(leaves[0].space, leaves[0].dtype) is None:
            return None
        return _parent.ActionWriter(leaves[0], self._views.act[0], self._action_history[0],
                                    check)

    def _write_actions(self, flat: list, ids: np.ndarray) -> None:
        """Fixed action leaves into their shared-memory rows (and the failure log's
        history). Leaves without a fixed size, and arrays whose dtype is not the space's
        (gymnasium hands the env the caller's element type: ``np.float64`` where the space
        says float32), also travel per env through :meth:`_put_pickled_actions`."""
        h = self._steps % 4
        hist = iter(self._action_history)
        self._pacts = {}
        for k, (leaf, view, arr) in enumerate(zip(self._plan.act_leaves, self._views.act, flat)):
            if view is None or arr.dtype != leaf.dtype:
                for i, item in zip(ids, arr):
                    self._pacts.setdefault(int(i), {})[k] = item
            if view is None:
                continue
            if len(ids) == self.num_envs:
                np.copyto(view, arr, casting="unsafe")
                next(hist)[h] = view
            else:
                view[ids] = arr
                next(hist)[h][ids] = view[ids]

    def _put_pickled_actions(self, slot: Slot) -> int:
        """A step request's side-buffer part, per env: {leaf index: value} of the leaves
        that do not travel through shared memory (nothing at all in the common case)."""
        if not self._pacts:
            return 0
        payload = [self._pacts.get(i) for i in slot.env_indices]
        return put_pickle(slot.payload, payload, self.options.max_payload_bytes)

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

    def _all_due(self, slot: Slot) -> bool:
        """NEXT_STEP: whether every env of ``slot`` is due for its autoreset."""
        return self._next_step and bool(self._due[list(slot.env_indices)].all())

    def _truncate(self, slot: Slot, r: int, truncated: bool = True) -> None:
        """The slot's envs in ring slot ``r``: reward 0, not terminated, ``truncated``
        (False: they were just reset, and this is their reset step)."""
        idx = list(slot.env_indices)
        v = self._views
        v.reward[r, idx] = 0.0
        v.terminated[r, idx] = False
        v.truncated[r, idx] = truncated

    def _report_disabled(self, slot: Slot, r: int, infos: dict) -> None:
        self._truncate(slot, r)
        same_step = self.autoreset_mode == AutoresetMode.SAME_STEP
        for i in slot.env_indices:
            if same_step:
                self._add_info(infos, {"final_obs": self._obs.row(self._env_ring[i], i),
                                       "final_info": {}}, i)
            self._add_info(infos, self._disabled_info(slot.disabled), i)
        self._obs.carry(slot.env_indices, r, self._env_ring)

    def _collect_infos(self, slot: Slot, infos: dict, r: int) -> None:
        """Read a reset/step reply: its typed info columns and its side-buffer part (the
        rest of the infos, the values of pickled observation leaves, kept per ring slot and
        env like the rows in shared memory), batched env by env as gymnasium does."""
        n = slot.ctl.resp_payload_len
        got, pobs = get_pickle(slot.payload, n) if n else (None, None)
        cols = self._infos
        for j, i in enumerate(slot.env_indices):
            info = got[j] if got else None
            if info:
                cols.learn(info)
            if cols.n:  # typed values in shared memory (fastvec/infos.py), env by env
                typed = cols.env_info(r, i)
                if typed:
                    info = {**typed, **info} if info else typed
            if info:
                self._add_info(infos, info, i)
            if pobs is not None and pobs[j] is not None:
                self._obs.pickled[r][i] = pobs[j]

    def _keep_final(self, slot: Slot, infos: dict) -> None:
        """SAME_STEP recycling: keep the old worker's final_obs / final_info only."""
        n = slot.ctl.resp_payload_len
        if not n:
            return
        got, _ = get_pickle(slot.payload, n)
        for i, info in zip(slot.env_indices, got):
            if info:
                self._add_info(infos, {key: info[key] for key in ("final_obs", "final_info")
                                       if key in info}, i)

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
        elif failure.cause is not None:
            err.__cause__ = failure.cause
        return err

    def _raise_user_error(self, slot: Slot, failure: Failure):
        """The env raised in a reset or call the user made: raise it with its own type,
        the worker's traceback chained (the worker lives on)."""
        exc, tb = failure.remote or (None, failure.detail)
        if isinstance(exc, BaseException):
            raise exc from RemoteTraceback(tb)
        raise self._failure_error(slot, failure, "in a call")

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

    @staticmethod
    def _restart_info(failure: Failure) -> dict:
        return restart_info(f"{failure.reason}: {failure.detail}")

    @staticmethod
    def _disabled_info(failure: Failure) -> dict:
        return disabled_info(f"{failure.reason}: {failure.detail}")

    def _raise_if_policy(self, restarted: list) -> None:
        if restarted and self.options.on_failure == "raise":
            slot, failure = restarted[0]
            raise self._failure_error(slot, failure, "(the worker was replaced)")
