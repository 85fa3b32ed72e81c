"""RayVectorEnv: the gymnasium contract (fastvec/contract.py) over one actor per node.

The driver validates and slices the actions, sends one request per actor and assembles
the actors' answers into one batch; where the actors go is placement.py's, the deadlines
calls.py's, and what a lost actor means for the batch failover.py's.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np
import ray
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from fastvec.contract import (State, VectorContract, assert_callable, assert_resets_done,
                              attr_values, reset_arguments, restart_info)
from fastvec.errors import (AlreadyPendingCallError, FastVecError, InvalidActionError,
                            NoAsyncCallError)
from fastvec.ray.actors import Actors
from fastvec.ray.calls import Calls
from fastvec.ray.compiled import Graphs, unavailable
from fastvec.ray.failover import Failover
from fastvec.ray.nested import concat, conform, merge_infos, rows, take
from fastvec.ray.options import RayOptions, check_node_kwargs, env_fns_of
from fastvec.ray.placement import actor_sizes, initial_pins
from fastvec.ray.resume import EpisodeMirror
from fastvec.replay import OP_CALL, OP_SET_ATTR

log = logging.getLogger("fastvec.ray")


class RayVectorEnv(VectorContract, VectorEnv):
    """A gymnasium VectorEnv whose envs live in FastVectorEnvs on the nodes of a Ray cluster.

    Args:
        env_fns: functions that create the envs, or a registered env id (then ``num_envs``
            copies are made with ``gymnasium.make(env_id, **env_kwargs)``).
        num_envs: number of envs when ``env_fns`` is an id.
        envs_per_actor: envs per actor. ``None``: one actor per node alive at construction
            (or per ``placement`` entry), envs split evenly and in order.
        placement: one entry per actor: a node id (hex; the actor prefers that node) or a
            dict of resources the actor needs (e.g. custom ``{"rack_a": 0.01}``).
            ``None``: actors go round-robin over the alive nodes.
        actor_options: extra ``ActorClass.options()``, e.g. ``{"num_cpus": 4}`` to reserve
            the CPUs its workers use (default 0.01: Ray does not count the workers, and a
            replacement always fits; keep it above 0, see fastvec/ray/options.py).
        actor_timeout: seconds any call to an actor may take before the actor counts as
            lost (a partition, a frozen node); it must exceed ``start_timeout`` and
            ``step_timeout``, and your slowest step plus a worker restart.
        max_actor_restarts / actor_restart_window: more replacements of one actor within
            the window (seconds) raise :class:`fastvec.RestartBudgetExceeded` and close
            the env.
        batch_size: enables ``send``/``recv``: ``recv`` returns the envs of the actors that
            finished first, at least ``batch_size`` envs (NEXT_STEP only).
        compiled: ``step()`` and ``send``/``recv`` through Ray's Compiled Graphs
            (fastvec/ray/compiled.py), one per actor: ``"auto"`` when this Ray has them
            (>= 2.44; else the classic calls, logged), ``True`` (raise if it has not),
            ``False`` (the default: classic calls only; an idle compiled actor spins a
            whole core between steps, docs/ray.md).
        env_kwargs: keywords for ``gymnasium.make`` when ``env_fns`` is an id.
        **fastvec_kwargs: every other FastVectorEnv keyword (``autoreset_mode``,
            ``envs_per_worker``, ``step_timeout``, ``max_restarts``, ``on_failure``,
            ...), given to each node's FastVectorEnv. ``copy`` is not accepted: batches
            are always fresh arrays.

    Ray is initialised with its defaults (``RAY_ADDRESS`` or a local instance) if it is not
    yet; call ``ray.init(address=...)`` first to choose the cluster.
    """

    _kind = "RayVectorEnv"
    _actors: Actors | None = None
    _slots: tuple = ()
    _graphs: Graphs | None = None
    closed = True

    def __init__(
        self,
        env_fns: Sequence[Callable[[], gym.Env]] | str,
        num_envs: int | None = None,
        *,
        envs_per_actor: int | None = None,
        placement: Sequence[str | Mapping[str, float]] | None = None,
        actor_options: Mapping[str, Any] | None = None,
        actor_timeout: float = 120.0,
        max_actor_restarts: int = 5,
        actor_restart_window: float = 300.0,
        batch_size: int | None = None,
        compiled: bool | str = False,
        env_kwargs: Mapping[str, Any] | None = None,
        **fastvec_kwargs: Any,
    ):
        self._state = State.DEFAULT
        self.closed = False
        check_node_kwargs(fastvec_kwargs)
        env_fns = self.env_fns = env_fns_of(env_fns, num_envs, env_kwargs)
        n = self.num_envs = len(env_fns)
        opts = self.options = RayOptions.of(
            n, fastvec_kwargs, actor_timeout=actor_timeout,
            max_actor_restarts=max_actor_restarts, actor_restart_window=actor_restart_window,
            batch_size=batch_size, actor_options=actor_options)
        self.autoreset_mode = opts.autoreset_mode
        self.on_failure = opts.on_failure
        self.validate_actions = opts.validate_actions
        self.batch_size = opts.batch_size
        self.actor_timeout = opts.actor_timeout
        self.max_actor_restarts = opts.max_actor_restarts
        self.actor_restart_window = opts.actor_restart_window

        why_not = unavailable()
        if compiled not in ("auto", True, False):
            raise ValueError(f'compiled must be "auto", True or False, got {compiled!r}')
        if compiled is True and why_not:
            raise FastVecError(f"compiled=True: {why_not}")
        if compiled == "auto" and why_not:
            log.info("RayVectorEnv: classic actor calls: %s", why_not)
        self.compiled = bool(compiled) and not why_not

        self._take_spaces(env_fns)

        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        pins = initial_pins(n, envs_per_actor, placement)
        calls = self._calls = Calls(self.actor_timeout)
        actors = self._actors = Actors(env_fns, pins, actor_sizes(n, envs_per_actor, len(pins)),
                                       opts.node_kwargs, opts.actor_options, calls)
        self._slots = actors.slots
        self._graphs = Graphs(actors, self.actor_timeout) if self.compiled else None
        self._needs_reset = np.zeros(n, np.bool_)
        # the driver's copy of the nodes' episode logs (fastvec/ray/resume.py)
        self._mirror = (EpisodeMirror(self.single_observation_space, self.single_action_space,
                                      n, opts.max_replay_steps, self.autoreset_mode)
                        if opts.resume else None)
        self._failover = Failover(actors, calls, n, self.max_actor_restarts,
                                  self.actor_restart_window, self._close_broken,
                                  self._mirror, self._needs_reset)
        self._pending: dict = {}
        self._flying: dict = {}  # send/recv
        self._finalizer = weakref.finalize(self, actors.cleanup)
        try:
            self._failover.start()
            for s in self._slots if self._graphs is not None else ():
                self._graphs.has(s)  # compiled now: not in the first step's deadline
        except BaseException:
            self.close(terminate=True)
            raise

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> list[dict]:
        """Per actor: node, pid, generation, whether its steps go through a compiled
        graph (``compiled``) and how many did (``compiled_steps``, over all its actors),
        actor-level restarts and reasons, the episodes its replacements resumed
        (``resumed``) and those they could not (``not_resumed``, by reason), and the
        ``health()`` of its FastVectorEnv's workers (with global env indices)."""
        self._assert_idle("health")
        for s in self._slots:
            self._actors.resolve_start(s)
        outs = self._calls.collect({s.index: self._calls.call(s.handle.health.remote(), "health")
                                    for s in self._slots}, None)
        report = []
        for s in self._slots:
            out = outs[s.index]
            workers = [{**w, "envs": [s.lo + i for i in w["envs"]]} for w in out.value or ()]
            report.append({
                "actor": s.index, "envs": list(s.envs), "node_id": s.node_id, "pid": s.pid,
                "alive": out.value is not None, "generation": s.generation,
                "compiled": self._graphs is not None and self._graphs.active(s),
                "compiled_steps": self._graphs.executions[s.index] if self._graphs else 0,
                "restarts": s.restarts, "reasons": dict(s.reasons),
                "resumed": s.resumed, "not_resumed": dict(s.not_resumed),
                "last_failure": s.last_failure, "last_failure_time": s.last_failure_time,
                "worker_restarts": sum(w["restarts"] for w in workers),
                "workers": workers,
            })
        return report

    # -- reset (reset() is the contract's: reset_async, then reset_wait) ----------------------
    def reset_async(self, seed: int | Sequence[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        self._assert_idle("reset_async")
        n = self.num_envs
        seeds, options, mask = reset_arguments(seed, options, n)
        options = options or {}
        full = np.ones(n, np.bool_) if mask is None else mask
        self._failover.remember_seeds(seeds, full)
        calls = {}
        for s in self._slots:
            part = full[s.lo:s.hi]
            if not part.any():
                continue
            opts = dict(options)
            if mask is not None:
                opts["reset_mask"] = part.copy()
            s.pending_reset = None  # the user's reset supersedes a replacement's own
            calls[s.index] = self._calls.call(
                s.handle.reset.remote(seeds[s.lo:s.hi], opts or None), "reset")
        self._pending = calls
        self._reset_args = (seeds, options, mask)
        self._state = State.WAITING_RESET

    def reset_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_RESET, "reset_wait", "reset_async")
        outs = self._calls.collect(self._pending, timeout)
        self._pending = {}
        self._state = State.DEFAULT
        seeds, options, mask = self._reset_args
        infos: dict = {}
        restarted, marks = [], []
        for a, out in outs.items():
            s = self._slots[a]
            if out.lost and self._mirror is not None:
                self._mirror.end(s.envs, f"the actor was lost in a reset: {out.lost[0]}")
            while out.lost:
                # The reset is run again, with the same seeds, by the replacement.
                failure = out.lost
                opts = dict(options)
                if mask is not None:
                    opts["reset_mask"] = mask[s.lo:s.hi].copy()
                ref = self._failover.replace(s, *failure, seeds[s.lo:s.hi], opts or None)
                restarted.append((s, failure))
                out = self._failover.await_replacement(s, ref)
            if out.error is not None:
                raise self._failover.remote_error(s, out.error)
            s.last_obs, info, notes = out.value
            merge_infos(infos, info, s.lo, self.num_envs)
            marks.append((s.lo, notes))
        if self._mirror is not None:
            self._mirror.reset(np.ones(self.num_envs, np.bool_) if mask is None else mask)
            self._mirror.apply(marks)
        for s, (reason, detail) in restarted:
            for i in s.envs:
                infos = self._add_info(infos, restart_info(f"{reason}: {detail}"), i)
        if mask is None:
            self._needs_reset[:] = False
        else:
            self._needs_reset[mask] = False
        self._raise_if_policy(restarted)
        return concat([s.last_obs for s in self._slots]), infos

    # -- step (step() is the contract's: step_async, then step_wait) ---------------------------
    def step_async(self, actions) -> None:
        self._assert_idle("step_async")
        assert_resets_done(self.autoreset_mode, self._needs_reset)
        actions = self._conform(self.action_space, actions)
        calls = {}
        self._sent = actions
        for s in self._slots:
            s.sent = rows(actions, s.lo, s.hi)
            if s.pending_reset is not None and self.autoreset_mode != AutoresetMode.DISABLED:
                # NEXT_STEP after a replacement: this step returns the fresh episode's start.
                calls[s.index] = self._calls.call(s.pending_reset, "reset")
                s.pending_reset = None
            elif self._graphs is not None and self._graphs.has(s):
                self._graphs.submit(s, s.sent)
                calls[s.index] = self._calls.call(None, "step")  # read by the graph
            else:
                calls[s.index] = self._calls.call(s.handle.step.remote(s.sent), "step")
        self._pending = calls
        self._state = State.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_STEP, "step_wait", "step_async")
        outs = self._collect_step(timeout)
        calls, self._pending = self._pending, {}
        self._state = State.DEFAULT
        obs, rew, term, trunc, infos, restarted, marks = self._failover.assemble(
            self._slots, calls, outs, fresh_now=self.autoreset_mode == AutoresetMode.SAME_STEP)
        if self._mirror is not None:
            self._mirror.record(self._sent, rew, term, trunc)
            self._mirror.apply(marks)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= term | trunc
        self._raise_if_policy(restarted)
        return obs, rew, term, trunc, infos

    def _collect_step(self, timeout: float | None) -> dict:
        """The outcomes of the pending step: classic calls first (their refs can be waited
        on again after a WaitTimeout), then the graphs' reads (which go on after one)."""
        graphed = set() if self._graphs is None else self._graphs.in_flight & set(self._pending)
        until = None if timeout is None else time.monotonic() + timeout
        classic = {a: c for a, c in self._pending.items() if a not in graphed}
        outs = self._calls.collect(classic, timeout) if classic else {}
        if graphed:
            left = None if until is None else max(0.0, until - time.monotonic())
            outs.update(self._graphs.collect(graphed, left))
        return outs

    # -- first-ready batches (send / recv) -------------------------------------------------------
    @property
    def stepping(self) -> np.ndarray:
        """Indices of the envs sent (``send``) and not yet received (``recv``)."""
        return np.array([i for a in sorted(self._flying) for i in self._slots[a].envs], np.int64)

    def send(self, actions, env_ids=None) -> None:
        """Start one step of the envs ``env_ids`` (default: all) with ``actions[j]`` for
        ``env_ids[j]``. ``env_ids`` must be whole actors' envs (as ``recv`` returns them)."""
        self._assert_open()
        if self.batch_size is None:
            raise FastVecError("send()/recv() need RayVectorEnv(..., batch_size=k)")
        if self._state is not State.DEFAULT:
            raise AlreadyPendingCallError(f"send() called while a {self._state.value}_async() "
                                          "is pending", self._state.value)
        ids = (np.arange(self.num_envs) if env_ids is None
               else np.asarray(env_ids, np.int64).reshape(-1))
        slots = [s for s in self._slots if s.lo in ids]
        if sorted(ids.tolist()) != [i for s in slots for i in s.envs]:
            raise ValueError("env_ids must be the envs of whole actors "
                             f"{[list(s.envs) for s in self._slots]}, got {env_ids!r}")
        busy = [s.index for s in slots if s.index in self._flying]
        if busy:
            raise AlreadyPendingCallError(f"the envs of actors {busy} are still stepping; "
                                          "recv() them before sending them again", "recv")
        actions = self._conform(batch_space(self.single_action_space, len(ids)), actions)
        actions = take(actions, np.argsort(ids, kind="stable"))  # rows in ascending env order
        at = 0
        for s in slots:
            s.sent = rows(actions, at, at + (s.hi - s.lo))
            if s.pending_reset is not None:
                self._flying[s.index] = self._calls.call(s.pending_reset, "reset")
                s.pending_reset = None
            elif self._graphs is not None and self._graphs.has(s):
                self._graphs.submit(s, s.sent, background=True)
                self._flying[s.index] = self._calls.call(None, "step")  # read by the graph
            else:
                self._flying[s.index] = self._calls.call(s.handle.step.remote(s.sent), "step")
            at += s.hi - s.lo

    def recv(self, timeout: float | None = None):
        """Results of the actors that finished first, at least ``batch_size`` envs (fewer
        if fewer are stepping; the longest-waiting first), as ``(obs, rewards,
        terminations, truncations, infos, env_ids)`` over ``env_ids`` (ascending)."""
        self._assert_open()
        if not self._flying:
            raise NoAsyncCallError("recv() called with no env stepping; send() first", "send")
        sizes = {a: self._slots[a].hi - self._slots[a].lo for a in self._flying}
        need = min(self.batch_size, sum(sizes.values()))
        have, done = self._calls.first(self._flying, sizes, need, timeout, self._graphs)
        chosen, count = [], 0
        for a in sorted(have, key=lambda a: self._flying[a].sent):
            if count >= need:
                break
            chosen.append(a)
            count += sizes[a]
        chosen.sort()
        calls = {a: self._flying.pop(a) for a in chosen}
        graphed = [a for a in chosen if calls[a].ref is None]
        outs = self._calls.outcomes({a: c for a, c in calls.items() if c.ref is not None},
                                    done)
        if graphed:  # their reads have their outcomes: nothing waits here
            outs.update(self._graphs.collect(graphed, None))
        slots = [self._slots[a] for a in chosen]
        obs, rew, term, trunc, infos, restarted, marks = self._failover.assemble(
            slots, calls, outs, fresh_now=False)
        ids = np.array([i for s in slots for i in s.envs], np.int64)
        if self._mirror is not None:
            self._mirror.record(concat([s.sent for s in slots]), rew, term, trunc, ids)
            self._mirror.apply(marks)
        self._raise_if_policy(restarted)
        return obs, rew, term, trunc, infos, ids

    # -- call / attributes ------------------------------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self._assert_idle("call")
        assert_callable(name)
        return self._on_all(lambda s: s.handle.call.remote(name, args, kwargs), "a call",
                            (OP_CALL, (name, args, kwargs)))

    def get_attr(self, name: str) -> tuple[Any, ...]:
        self._assert_idle("get_attr")
        return self._on_all(lambda s: s.handle.get_attr.remote(name), "get_attr",
                            (OP_CALL, (name, (), {})))  # the nodes' get_attr is a call

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        self._assert_idle("set_attr")
        values = attr_values(values, self.num_envs)
        self._on_all(lambda s: s.handle.set_attr.remote(name, values[s.lo:s.hi]),
                     "set_attr", (OP_SET_ATTR, (name, values)), results=False)

    def _on_all(self, submit, what: str, event: tuple, results: bool = True):
        outs = self._calls.collect({s.index: self._calls.call(submit(s), "call")
                                    for s in self._slots}, None)
        lost = [(self._slots[a], out.lost) for a, out in outs.items() if out.lost]
        if self._mirror is not None:  # logged once it reached the envs, as the nodes log it
            for s, (reason, _) in lost:
                self._mirror.end(s.envs, f"the actor was lost in {what}: {reason}")
            self._mirror.event(*event)
        for s, (reason, detail) in lost:
            self._failover.replace(s, reason, detail, pending=True)
        if lost:
            s, (reason, detail) = lost[0]
            raise self._failover.actor_error(s, reason, detail,
                                             f"in {what} (the actor was replaced)")
        for a, out in outs.items():
            if out.error is not None:
                raise self._failover.remote_error(self._slots[a], out.error)
        if not results:
            return None
        return tuple(x for s in self._slots for x in outs[s.index].value)

    # -- closing ------------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False, **kwargs) -> None:
        if self._actors is None:
            return
        terminate = self._settle_pending(timeout, terminate)
        self._pending, self._flying = {}, {}
        if self._graphs is not None:  # before the actors close and before Ray shuts down
            self._graphs.close()
            self._graphs = None
        self._finalizer.detach()
        self._actors.close(timeout, terminate)
        self._actors = None

    # -- internals ---------------------------------------------------------------------------
    def _is_open(self) -> bool:  # the misuse checks are fastvec/contract.py's
        return not self.closed and self._actors is not None

    def _sending(self) -> bool:
        return bool(self._flying)

    def _raise_if_policy(self, restarted: list) -> None:
        if restarted and self.on_failure == "raise":
            s, (reason, detail) = restarted[0]
            raise self._failover.actor_error(s, reason, detail, "(the actor was replaced)")

    def _conform(self, space: spaces.Space, actions):
        """Actions as arrays of the space's dtypes; checked against the space when
        ``validate_actions`` (before anything is sent, so no actor steps alone)."""
        try:
            out = conform(space, actions)
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidActionError(f"actions do not have the structure of {space}: "
                                     f"{exc}") from None
        if self.validate_actions and not space.contains(out):
            raise InvalidActionError(f"actions are not in the action space {space}")
        return out
