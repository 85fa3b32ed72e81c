"""RayVectorEnv: fastvec's vector env spread over the nodes of a Ray cluster.

    driver: RayVectorEnv.step(actions)                      node j: one Ray actor (_NodeHost)
      validate, slice by actor ──▶ actor.step.remote(a_j) ──▶ FastVectorEnv (its k_j envs,
                                                               shared-memory rings, watchdog)
      ray.wait(all, deadline) ◀── one object per actor and step: (obs, rew, term, trunc, infos)
      concatenate the actors' parts (zero-copy reads of the object store, one copy into the batch)

Only batches cross the network; the rings and the watchdog that respawns a failed worker
stay inside the node. The driver watches the actors: one that is lost (its node crashed,
its process was killed, it did not answer within ``actor_timeout``) gets its envs'
step returned as truncated, reward 0, the last observation, with
``infos["worker_restarted"]`` and a reason (``"node_lost"``, ``"actor_died"``, ``"oom"``,
``"unresponsive"``), and a replacement actor (on another node if the node was lost) that
resets them with derived seeds. Every ``ray.get`` / ``ray.wait`` has a deadline.

Importing :mod:`fastvec` never imports this module (nor Ray); import ``fastvec.ray``.
"""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import logging
import os
import socket
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import gymnasium as gym
import numpy as np
import ray
import ray.exceptions
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from fastvec.errors import (AlreadyPendingCallError, ClosedEnvError, FastVecError,
                            InvalidActionError, NoAsyncCallError, RestartBudgetExceeded,
                            WaitTimeout, WorkerFailure)
from fastvec.vector_env import FastVectorEnv, reset_arguments

__all__ = ["RayVectorEnv"]

log = logging.getLogger("fastvec.ray")

# FastVectorEnv keywords the driver keeps for itself instead of forwarding to the nodes.
_DRIVER_ONLY = {"env_fns", "copy", "batch_size"}
_NODE_KWARGS = set(inspect.signature(FastVectorEnv).parameters) - _DRIVER_ONLY
# Seconds a replacement waits for its predecessor's process to end on the same machine.
_PREDECESSOR_WAIT = 10.0


def _host_key() -> tuple[str, str]:
    """Identifies one kernel and namespace: pids are comparable only within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return boot, socket.gethostname()


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists: a zombie still counts, as it does for
    FastVectorEnv's sweep of stale names (an orphan waits for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _NodeHost:
    """The Ray actor on a node: one FastVectorEnv holding a contiguous share of the envs."""

    _env: FastVectorEnv | None = None

    def start(self, env_fns: list, kwargs: dict, predecessor: tuple | None) -> dict:
        if predecessor is not None and predecessor[0] == _host_key():
            # The actor this one replaces ran on this machine: once its process is gone,
            # FastVectorEnv's start-up sweep removes the shared-memory names it left.
            deadline = time.monotonic() + _PREDECESSOR_WAIT
            while not _pid_gone(predecessor[1]) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._env = FastVectorEnv(env_fns, copy=False, **kwargs)
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "host": _host_key()}

    def reset(self, seeds, options):
        # copy=False: the observations are views of the ring slot, serialised into the
        # object store when this method returns, before the next call can touch the slot.
        return self._env.reset(seed=seeds, options=options)

    def step(self, actions):
        return self._env.step(actions)

    def call(self, name, args, kwargs):
        return self._env.call(name, *args, **kwargs)

    def get_attr(self, name):
        return self._env.get_attr(name)

    def set_attr(self, name, values):
        self._env.set_attr(name, values)

    def health(self) -> list[dict]:
        return self._env.health()

    def close(self, timeout, terminate):
        if self._env is not None:
            self._env.close(timeout=timeout, terminate=terminate)
            self._env = None


_Host = ray.remote(_NodeHost)


class State(enum.Enum):
    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"


@dataclass
class _Call:
    """One request to one actor: what its result will be and when it counts as lost."""

    ref: Any
    kind: str  # "step" or "reset" (a replacement's reset standing in for a step)
    deadline: float
    sent: float = field(default_factory=time.monotonic)


@dataclass
class _Outcome:
    value: Any = None
    lost: tuple[str, str] | None = None   # (reason, detail): the actor is gone
    error: BaseException | None = None    # raised by fastvec or env code inside the actor


@dataclass
class _Slot:
    """One actor position: a contiguous range of envs and the actor currently serving it."""

    index: int
    lo: int
    hi: int
    pin: str | dict  # a node id (soft affinity) or custom resources the actor needs
    handle: Any = None
    start_ref: Any = None
    generation: int = 0
    node_id: str | None = None
    pid: int | None = None
    host: tuple | None = None
    restarts: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)
    failures: collections.deque = field(default_factory=collections.deque)
    last_failure: str | None = None
    last_failure_time: float | None = None
    pending_reset: Any = None  # a replacement's reset: the result of this slot's next step
    last_obs: Any = None

    @property
    def envs(self) -> range:
        return range(self.lo, self.hi)


class _Resources:
    """What the finalizer must release if the env is collected without close()."""

    def __init__(self):
        self.handles: list = []

    def cleanup(self) -> None:
        for h in self.handles:
            try:  # queued behind any running call: close the rings, then leave gracefully
                h.close.remote(None, True)
                h.__ray_terminate__.remote()
            except Exception:  # noqa: BLE001 - Ray may already be shut down
                pass
        self.handles = []


class _BatchInfos:
    """gymnasium's info batching (``VectorEnv._add_info``) for a batch of ``n`` envs."""

    _add_info = VectorEnv._add_info

    def __init__(self, n: int):
        self.num_envs = n


class RayVectorEnv(VectorEnv):
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
            replacement always fits; keep it above 0, see ``__init__``).
        actor_timeout: seconds any call to an actor may take before the actor counts as
            lost (a partition, a frozen node); it must exceed ``start_timeout`` and
            ``step_timeout``, and your slowest step plus a worker restart.
        max_actor_restarts / actor_restart_window: more replacements of one actor within
            the window (seconds) raise :class:`fastvec.RestartBudgetExceeded` and close
            the env.
        batch_size: enables ``send``/``recv``: ``recv`` returns the envs of the actors that
            finished first, at least ``batch_size`` envs (NEXT_STEP only).
        env_kwargs: keywords for ``gymnasium.make`` when ``env_fns`` is an id.
        **fastvec_kwargs: every other FastVectorEnv keyword (``autoreset_mode``,
            ``envs_per_worker``, ``step_timeout``, ``max_restarts``, ``on_failure``,
            ...), given to each node's FastVectorEnv. ``copy`` is not accepted: batches
            are always fresh arrays.

    Ray is initialised with its defaults (``RAY_ADDRESS`` or a local instance) if it is not
    yet; call ``ray.init(address=...)`` first to choose the cluster.
    """

    _resources: _Resources | None = None
    _slots: tuple = ()
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
        env_kwargs: Mapping[str, Any] | None = None,
        **fastvec_kwargs: Any,
    ):
        self._state = State.DEFAULT
        self.closed = False
        unknown = set(fastvec_kwargs) - _NODE_KWARGS
        if unknown:
            raise TypeError(f"RayVectorEnv got unexpected keywords {sorted(unknown)}; the "
                            f"nodes' FastVectorEnv takes {sorted(_NODE_KWARGS)}")
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
        n = self.num_envs = len(env_fns)
        self.autoreset_mode = AutoresetMode(fastvec_kwargs.get("autoreset_mode",
                                                               AutoresetMode.NEXT_STEP))
        fastvec_kwargs["autoreset_mode"] = self.autoreset_mode
        self.on_failure = fastvec_kwargs.get("on_failure", "respawn")
        self.validate_actions = fastvec_kwargs.get("validate_actions", True)
        start_timeout = fastvec_kwargs.get("start_timeout", 60.0)
        step_timeout = fastvec_kwargs.get("step_timeout")
        if not actor_timeout > max(start_timeout, step_timeout or 0.0):
            raise ValueError(f"actor_timeout ({actor_timeout}) must exceed start_timeout "
                             f"({start_timeout}) and step_timeout ({step_timeout})")
        if max_actor_restarts < 0 or not actor_restart_window > 0:
            raise ValueError("max_actor_restarts must be >= 0 and actor_restart_window > 0")
        if batch_size is not None:
            if not 1 <= batch_size <= n:
                raise ValueError(f"batch_size must be in 1..{n}, got {batch_size}")
            if self.autoreset_mode != AutoresetMode.NEXT_STEP:
                raise ValueError("batch_size (send/recv) needs autoreset_mode=NEXT_STEP")
        self.batch_size = batch_size
        self.actor_timeout = float(actor_timeout)
        self.max_actor_restarts = max_actor_restarts
        self.actor_restart_window = float(actor_restart_window)
        self.env_fns = env_fns
        self._node_kwargs = fastvec_kwargs
        # A sliver of a CPU, not 0: Ray forwards an actor that needs no resource to a random
        # node for scheduling, and that can be a node that just died but is still listed.
        self._actor_options = {"num_cpus": 0.01, **dict(actor_options or {}),
                               "max_restarts": 0, "max_task_retries": 0}

        dummy = env_fns[0]()
        try:
            self.metadata = dict(dummy.metadata)
            self.metadata["autoreset_mode"] = self.autoreset_mode
            self.render_mode = dummy.render_mode
            self.single_observation_space = dummy.observation_space
            self.single_action_space = dummy.action_space
        finally:
            dummy.close()
        self.observation_space = batch_space(self.single_observation_space, n)
        self.action_space = batch_space(self.single_action_space, n)

        if not ray.is_initialized():
            ray.init(log_to_driver=False)
        pins = self._initial_pins(envs_per_actor, placement)
        sizes = ([min(envs_per_actor, n - lo) for lo in range(0, n, envs_per_actor)]
                 if envs_per_actor else [n // len(pins) + (j < n % len(pins))
                                          for j in range(len(pins))])
        self._slots = []
        lo = 0
        for j, size in enumerate(sizes):
            self._slots.append(_Slot(j, lo, lo + size, pins[j % len(pins)]))
            lo += size
        self._base_seeds: list[int | None] = [None] * n
        self._needs_reset = np.zeros(n, np.bool_)
        self._lost_nodes: set[str] = set()
        self._pending: dict[int, _Call] = {}
        self._flying: dict[int, _Call] = {}  # send/recv

        res = self._resources = _Resources()
        self._finalizer = weakref.finalize(self, res.cleanup)
        try:
            for s in self._slots:
                self._launch(s, None)
            outs = self._collect({s.index: self._call(s.start_ref, "start")
                                  for s in self._slots}, None)
            for s in self._slots:
                out = outs[s.index]
                while out.lost:  # e.g. placed on a node that died: start it elsewhere
                    self._relaunch(s, *out.lost)
                    out = self._collect({s.index: self._call(s.start_ref, "start")},
                                        None)[s.index]
                if out.error is not None:
                    raise self._remote_error(s, out.error)
                self._identify(s, out.value)
        except BaseException:
            self.close(terminate=True)
            raise

    # -- placement ---------------------------------------------------------------------------
    def _initial_pins(self, envs_per_actor, placement) -> list:
        if envs_per_actor is not None and envs_per_actor < 1:
            raise ValueError(f"envs_per_actor must be >= 1, got {envs_per_actor}")
        if placement is not None:
            pins = [p if isinstance(p, str) else dict(p) for p in placement]
            actors = -(-self.num_envs // envs_per_actor) if envs_per_actor else len(pins)
            if not pins or len(pins) != actors or actors > self.num_envs:
                raise ValueError(f"placement has {len(pins)} entries for {actors} actors "
                                 f"({self.num_envs} envs)")
            return pins
        nodes = [nd["NodeID"] for nd in ray.nodes() if nd.get("Alive")]
        if not nodes:
            raise FastVecError("the Ray cluster has no alive node")
        if envs_per_actor is None:
            return nodes[:self.num_envs]
        return [nodes[j % len(nodes)] for j in range(-(-self.num_envs // envs_per_actor))]

    def _options(self, s: _Slot, avoid: set[str]) -> dict:
        """Actor options for slot ``s``, keeping it off the nodes in ``avoid``."""
        opts = dict(self._actor_options)
        pin = s.pin
        if not avoid:
            if isinstance(pin, dict):
                opts["resources"] = {**opts.get("resources", {}), **pin}
            else:
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pin, soft=True)
            return opts
        nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
        usable = [nd for nd in nodes if nd["NodeID"] not in avoid] or nodes
        load = collections.Counter(t.node_id for t in self._slots if t is not s)
        if isinstance(pin, dict):
            offer = [nd for nd in usable
                     if all(nd.get("Resources", {}).get(k, 0) >= v for k, v in pin.items())]
            if offer:
                target = min(offer, key=lambda nd: load[nd["NodeID"]])["NodeID"]
                opts["resources"] = {**opts.get("resources", {}), **pin}
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(target, soft=False)
                return opts
        elif pin not in avoid and any(nd["NodeID"] == pin for nd in usable):
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pin, soft=True)
            return opts
        # The pinned node is gone and no other node offers the pin: the least loaded node.
        target = min(usable, key=lambda nd: load[nd["NodeID"]])["NodeID"] if usable else None
        if target is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(target, soft=True)
        return opts

    def _launch(self, s: _Slot, predecessor: tuple | None, avoid: set[str] = frozenset()) -> None:
        opts = self._options(s, set(avoid))
        log.debug("actor %d: starting with %s", s.index, opts)
        s.handle = _Host.options(**opts).remote()
        self._resources.handles.append(s.handle)
        kwargs = dict(self._node_kwargs)
        s.start_ref = s.handle.start.remote(self.env_fns[s.lo:s.hi], kwargs, predecessor)

    def _resolve_start(self, s: _Slot) -> None:
        """Learn where a replacement runs once it answered (its start came first)."""
        if s.start_ref is not None:
            try:
                self._identify(s, ray.get(s.start_ref, timeout=self.actor_timeout))
            except ray.exceptions.RayError:
                pass  # reported by the call that needs the actor

    def _identify(self, s: _Slot, who: dict) -> None:
        s.node_id, s.pid, s.host = who["node_id"], who["pid"], tuple(who["host"])
        s.start_ref = None

    # -- properties of the contract ------------------------------------------------------------
    @property
    def np_random_seed(self) -> tuple[int, ...]:
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple[np.random.Generator, ...]:
        return self.get_attr("np_random")

    def health(self) -> list[dict]:
        """Per actor: node, pid, generation, actor-level restarts and reasons, and the
        ``health()`` of its FastVectorEnv's workers (with global env indices)."""
        self._assert_idle("health")
        for s in self._slots:
            self._resolve_start(s)
        calls = {s.index: self._call(s.handle.health.remote(), "health") for s in self._slots}
        outs = self._collect(calls, None)
        report = []
        for s in self._slots:
            out = outs[s.index]
            workers = []
            if out.value is not None:
                for w in out.value:
                    workers.append({**w, "envs": [s.lo + i for i in w["envs"]]})
            report.append({
                "actor": s.index, "envs": list(s.envs), "node_id": s.node_id, "pid": s.pid,
                "alive": out.value is not None, "generation": s.generation,
                "restarts": s.restarts, "reasons": dict(s.reasons),
                "last_failure": s.last_failure, "last_failure_time": s.last_failure_time,
                "worker_restarts": sum(w["restarts"] for w in workers),
                "workers": workers,
            })
        return report

    # -- reset --------------------------------------------------------------------------------
    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None):
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed: int | Sequence[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        self._assert_idle("reset_async")
        n = self.num_envs
        seeds, options, mask = reset_arguments(seed, options, n)
        options = options or {}
        full = np.ones(n, np.bool_) if mask is None else mask
        for i in np.flatnonzero(full):
            if seeds[i] is not None:
                self._base_seeds[i] = int(seeds[i])
        calls = {}
        for s in self._slots:
            part = full[s.lo:s.hi]
            if not part.any():
                continue
            opts = dict(options)
            if mask is not None:
                opts["reset_mask"] = part.copy()
            s.pending_reset = None  # the user's reset supersedes a replacement's own
            calls[s.index] = self._call(s.handle.reset.remote(seeds[s.lo:s.hi], opts or None),
                                        "reset")
        self._pending = calls
        self._reset_args = (seeds, options, mask)
        self._state = State.WAITING_RESET

    def reset_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_RESET, "reset_wait", "reset_async")
        outs = self._collect(self._pending, timeout)
        self._pending = {}
        self._state = State.DEFAULT
        seeds, options, mask = self._reset_args
        infos: dict = {}
        restarted = []
        for a, out in outs.items():
            s = self._slots[a]
            while out.lost:
                # The reset is run again, with the same seeds, by the replacement.
                failure = out.lost
                opts = dict(options)
                if mask is not None:
                    opts["reset_mask"] = mask[s.lo:s.hi].copy()
                ref = self._replace(s, *failure, seeds[s.lo:s.hi], opts or None)
                restarted.append((s, failure))
                out = self._await_replacement(s, ref)
            if out.error is not None:
                raise self._remote_error(s, out.error)
            s.last_obs, info = out.value
            _merge_infos(infos, info, s.lo, self.num_envs)
        for s, (reason, detail) in restarted:
            for i in s.envs:
                infos = self._add_info(infos, _restart_info(reason, detail), i)
        if mask is None:
            self._needs_reset[:] = False
        else:
            self._needs_reset[mask] = False
        self._raise_if_policy(restarted)
        return _concat([s.last_obs for s in self._slots]), infos

    # -- step -----------------------------------------------------------------------------------
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
        actions = self._conform(self.action_space, actions)
        calls = {}
        for s in self._slots:
            if s.pending_reset is not None and self.autoreset_mode != AutoresetMode.DISABLED:
                # NEXT_STEP after a replacement: this step returns the fresh episode's start.
                calls[s.index] = self._call(s.pending_reset, "reset")
                s.pending_reset = None
            else:
                calls[s.index] = self._call(s.handle.step.remote(_slice(actions, s.lo, s.hi)),
                                            "step")
        self._pending = calls
        self._state = State.WAITING_STEP

    def step_wait(self, timeout: float | None = None):
        self._assert_waiting(State.WAITING_STEP, "step_wait", "step_async")
        outs = self._collect(self._pending, timeout)
        calls, self._pending = self._pending, {}
        self._state = State.DEFAULT
        obs, rew, term, trunc, infos, restarted = self._assemble(self._slots, calls, outs,
                                                                 same_step=True)
        if self.autoreset_mode == AutoresetMode.DISABLED:
            self._needs_reset |= term | trunc
        self._raise_if_policy(restarted)
        return obs, rew, term, trunc, infos

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
        if self._state != State.DEFAULT:
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
        order = np.argsort(ids, kind="stable")
        actions = _take(actions, order)  # rows in ascending env order
        row = 0
        for s in slots:
            if s.pending_reset is not None:
                self._flying[s.index] = self._call(s.pending_reset, "reset")
                s.pending_reset = None
            else:
                part = _slice(actions, row, row + (s.hi - s.lo))
                self._flying[s.index] = self._call(s.handle.step.remote(part), "step")
            row += s.hi - s.lo

    def recv(self, timeout: float | None = None):
        """Results of the actors that finished first, at least ``batch_size`` envs (fewer
        if fewer are stepping; the longest-waiting first), as ``(obs, rewards,
        terminations, truncations, infos, env_ids)`` over ``env_ids`` (ascending)."""
        self._assert_open()
        if not self._flying:
            raise NoAsyncCallError("recv() called with no env stepping; send() first", "send")
        need = min(self.batch_size, sum(self._slots[a].hi - self._slots[a].lo
                                        for a in self._flying))
        user_deadline = np.inf if timeout is None else time.monotonic() + timeout
        done: set = set()
        while True:
            now = time.monotonic()
            over = {a for a, c in self._flying.items() if c.deadline <= now}
            have = [a for a, c in self._flying.items() if c.ref in done or a in over]
            if sum(self._slots[a].hi - self._slots[a].lo for a in have) >= need:
                break
            waiting = [c for a, c in self._flying.items() if c.ref not in done and a not in over]
            if now >= user_deadline:
                raise WaitTimeout(f"recv(timeout={timeout}) ran out of time; the envs keep "
                                  "stepping: call recv() again")
            until = min(user_deadline, min(c.deadline for c in waiting))
            refs = [c.ref for c in waiting]
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, until - now))
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            done.update(ready)
        chosen, count = [], 0
        for a in sorted(have, key=lambda a: self._flying[a].sent):
            if count >= need:
                break
            chosen.append(a)
            count += self._slots[a].hi - self._slots[a].lo
        chosen.sort()
        calls = {a: self._flying.pop(a) for a in chosen}
        outs = self._outcomes(calls, done)
        slots = [self._slots[a] for a in chosen]
        obs, rew, term, trunc, infos, restarted = self._assemble(slots, calls, outs,
                                                                 same_step=False)
        self._raise_if_policy(restarted)
        ids = np.array([i for s in slots for i in s.envs], np.int64)
        return obs, rew, term, trunc, infos, ids

    # -- call / attributes ------------------------------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        self._assert_idle("call")
        if name in ("reset", "step", "close"):
            raise ValueError(f"Trying to call function `{name}` with `call`, "
                             f"use `{name}` directly instead.")
        return self._on_all(lambda s: s.handle.call.remote(name, args, kwargs), "a call")

    def render(self):
        return self.call("render")

    def get_attr(self, name: str) -> tuple[Any, ...]:
        self._assert_idle("get_attr")
        return self._on_all(lambda s: s.handle.get_attr.remote(name), "get_attr")

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | Any) -> None:
        self._assert_idle("set_attr")
        if not isinstance(values, (list, tuple)):
            values = [values] * self.num_envs
        if len(values) != self.num_envs:
            raise ValueError("Values must be a list or tuple with length equal to the number of "
                             f"environments. Got `{len(values)}` values for {self.num_envs} "
                             "environments.")
        self._on_all(lambda s: s.handle.set_attr.remote(name, list(values[s.lo:s.hi])),
                     "set_attr", results=False)

    def _on_all(self, submit, what: str, results: bool = True):
        calls = {s.index: self._call(submit(s), "call") for s in self._slots}
        outs = self._collect(calls, None)
        lost = [(self._slots[a], out.lost) for a, out in outs.items() if out.lost]
        for s, (reason, detail) in lost:
            self._replace(s, reason, detail, self._derived_seeds(s), None, pending=True)
        if lost:
            s, (reason, detail) = lost[0]
            raise self._actor_error(s, reason, detail, f"in {what} (the actor was replaced)")
        for a, out in outs.items():
            if out.error is not None:
                raise self._remote_error(self._slots[a], out.error)
        if not results:
            return None
        return tuple(x for s in self._slots for x in outs[s.index].value)

    # -- closing ------------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False, **kwargs) -> None:
        if self._resources is None:
            return
        if self._state != State.DEFAULT and not terminate:
            try:
                getattr(self, f"{self._state.value}_wait")(timeout)
            except Exception:  # noqa: BLE001 - closing anyway, in stages
                terminate = True
        self._state = State.DEFAULT
        self._pending, self._flying = {}, {}
        self._finalizer.detach()
        # Ask every actor to close its FastVectorEnv (rings unlinked, workers joined), give
        # them until the deadline, then kill the actors whatever they answered.
        wait = self.actor_timeout if timeout is None else timeout
        refs = []
        for s in self._slots:
            if s.handle is not None:
                try:
                    refs.append(s.handle.close.remote(timeout, terminate))
                except Exception:  # noqa: BLE001 - a dead actor: nothing to ask
                    pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=wait)
        for h in self._resources.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self._resources.handles = []
        self._resources = None

    def __enter__(self) -> "RayVectorEnv":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(terminate=exc_info[0] is not None)

    def __del__(self):
        # VectorEnv.__del__ would call close(); the finalizer is the backstop instead.
        pass

    # -- internals: waiting ---------------------------------------------------------------------
    def _call(self, ref, kind: str) -> _Call:
        # A replacement may first wait for its predecessor's process to end (see start()).
        slack = _PREDECESSOR_WAIT if kind in ("start", "reset") else 0.0
        return _Call(ref, kind, time.monotonic() + self.actor_timeout + slack)

    def _collect(self, calls: dict[int, _Call], timeout: float | None) -> dict[int, _Outcome]:
        """Every call's outcome; an actor that misses its deadline counts as lost.
        ``timeout`` (the caller's) raises WaitTimeout first, leaving the calls pending."""
        user_deadline = np.inf if timeout is None else time.monotonic() + timeout
        done: set = set()
        while True:
            now = time.monotonic()
            waiting = [c for c in calls.values() if c.ref not in done and c.deadline > now]
            if not waiting:
                break
            if now >= user_deadline:
                raise WaitTimeout(f"no answer within timeout={timeout} s; the call is still "
                                  "pending: wait for it again")
            until = min(user_deadline, min(c.deadline for c in waiting))
            refs = [c.ref for c in waiting]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, until - now))
            done.update(ready)
        return self._outcomes(calls, done)

    def _outcomes(self, calls: dict[int, _Call], done: set) -> dict[int, _Outcome]:
        ready = [c.ref for c in calls.values() if c.ref in done]
        values: dict = {}
        try:  # one call for all: the common case, and the cheapest
            values = dict(zip(ready, ray.get(ready, timeout=self.actor_timeout)))
        except Exception:  # noqa: BLE001 - sorted out one by one below
            pass
        outs = {}
        for a, c in calls.items():
            if c.ref not in done:
                outs[a] = _Outcome(lost=("unresponsive", f"no answer to a {c.kind} within "
                                                         f"actor_timeout={self.actor_timeout} s"))
            elif c.ref in values:
                outs[a] = _Outcome(value=values[c.ref])
            else:
                try:
                    outs[a] = _Outcome(value=ray.get(c.ref, timeout=self.actor_timeout))
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    outs[a] = _Outcome(error=cause)
                except ray.exceptions.GetTimeoutError:
                    outs[a] = _Outcome(lost=("unresponsive", "its result could not be fetched"))
                except ray.exceptions.RayError as exc:
                    outs[a] = _Outcome(lost=_classify(exc))
        return outs

    # -- internals: batches ----------------------------------------------------------------------
    def _assemble(self, slots: list[_Slot], calls: dict[int, _Call], outs: dict[int, _Outcome],
                  same_step: bool):
        """One batch over ``slots`` (in order) from their outcomes; lost actors are replaced
        and their envs flagged."""
        size = sum(s.hi - s.lo for s in slots)
        batch = _BatchInfos(size)
        infos: dict = {}
        rew = np.zeros(size, np.float64)
        term = np.zeros(size, np.bool_)
        trunc = np.zeros(size, np.bool_)
        restarted = []
        errors = []
        row = 0
        for s in slots:
            k = s.hi - s.lo
            out, call = outs[s.index], calls[s.index]
            if out.error is not None:
                errors.append((s, out.error))
            elif out.lost is None:
                if call.kind == "reset":  # a replacement's fresh episode, as NEXT_STEP gives it
                    self._resolve_start(s)
                    s.last_obs, info = out.value
                else:
                    s.last_obs, r, te, tr, info = out.value
                    rew[row:row + k], term[row:row + k], trunc[row:row + k] = r, te, tr
                _merge_infos(infos, info, row, size)
            else:
                reason, detail = out.lost
                restarted.append((s, out.lost))
                last = s.last_obs
                ref = self._replace(s, reason, detail, self._derived_seeds(s), None,
                                    pending=not (same_step and self.autoreset_mode
                                                 == AutoresetMode.SAME_STEP))
                trunc[row:row + k] = True
                if same_step and self.autoreset_mode == AutoresetMode.SAME_STEP:
                    fresh = self._await_replacement(s, ref)
                    while fresh.lost:
                        ref = self._replace(s, *fresh.lost, self._derived_seeds(s), None,
                                            pending=False)
                        fresh = self._await_replacement(s, ref)
                    if fresh.error is not None:
                        errors.append((s, fresh.error))
                        continue
                    s.last_obs, info = fresh.value
                    for j in range(k):
                        batch._add_info(infos, {"final_obs": _row(last, j), "final_info": {}},
                                        row + j)
                    _merge_infos(infos, info, row, size)
                for j in range(k):
                    batch._add_info(infos, _restart_info(reason, detail), row + j)
            row += k
        if errors:
            s, exc = errors[0]
            raise self._remote_error(s, exc)
        return _concat([s.last_obs for s in slots]), rew, term, trunc, infos, restarted

    # -- internals: failures --------------------------------------------------------------------
    def _derived_seeds(self, s: _Slot) -> list[int | None]:
        """Seeds for a replacement's envs, from the original seed, the env index and the
        slot's generation (so a rerun replays the same seeds)."""
        out = []
        for i in s.envs:
            base = self._base_seeds[i]
            if base is None:
                out.append(None)
            else:
                ss = np.random.SeedSequence([base, i, s.generation + 1, 0x7A7])
                out.append(int(ss.generate_state(1, np.uint32)[0]))
        return out

    def _replace(self, s: _Slot, reason: str, detail: str, seeds, options,
                 pending: bool = False):
        """Replace the slot's actor and submit the replacement's first reset. Returns that
        reset's ref (also kept as the slot's next step result when ``pending``)."""
        self._relaunch(s, reason, detail)
        ref = s.handle.reset.remote(seeds, options)
        s.pending_reset = ref if pending else None
        return ref

    def _relaunch(self, s: _Slot, reason: str, detail: str) -> None:
        """Count the failure against the budget, kill the old actor and start its
        replacement (away from the node if the node was lost)."""
        now = time.monotonic()
        s.failures.append(now)
        while s.failures and s.failures[0] < now - self.actor_restart_window:
            s.failures.popleft()
        s.restarts += 1
        s.reasons[reason] += 1
        s.last_failure, s.last_failure_time = f"{reason}: {detail}", time.time()
        log.warning("actor %d (envs %s, node %s, pid %s, generation %d) lost: %s: %s; seeds %s",
                    s.index, list(s.envs), s.node_id, s.pid, s.generation, reason, detail,
                    [self._base_seeds[i] for i in s.envs])
        try:
            ray.kill(s.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if len(s.failures) > self.max_actor_restarts:
            err = RestartBudgetExceeded(
                f"actor {s.index} (envs {list(s.envs)}) failed {len(s.failures)} times within "
                f"{self.actor_restart_window} s (max_actor_restarts={self.max_actor_restarts}); "
                f"last: {reason}: {detail}", env_index=s.lo, env_indices=tuple(s.envs),
                worker_index=s.index, reason="budget", detail=f"{reason}: {detail}")
            self._state = State.DEFAULT
            self.close(terminate=True)  # broken for good: later calls raise ClosedEnvError
            raise err
        if reason in ("node_lost", "unresponsive") and s.node_id:
            self._lost_nodes.add(s.node_id)
        predecessor = (s.host, s.pid) if s.host and s.pid else None
        s.generation += 1
        self._launch(s, predecessor, self._lost_nodes)
        s.node_id = s.pid = s.host = None

    def _await_replacement(self, s: _Slot, ref) -> _Outcome:
        """Wait (with the actor deadline) for a replacement to start and reset."""
        outs = self._collect({s.index: self._call(s.start_ref, "start"),
                              -1: self._call(ref, "reset")}, None)
        start = outs[s.index]
        if start.value is not None:
            self._identify(s, start.value)
        return outs[-1] if start.value is not None else start

    def _actor_error(self, s: _Slot, reason: str, detail: str, when: str) -> WorkerFailure:
        return WorkerFailure(f"actor {s.index} (envs {list(s.envs)}) failed {when}: "
                             f"{reason}: {detail}", env_index=s.lo, env_indices=tuple(s.envs),
                             worker_index=s.index, reason=reason, detail=detail)

    def _remote_error(self, s: _Slot, exc: BaseException) -> BaseException:
        """An error raised inside the actor's FastVectorEnv, with env indices made global."""
        if isinstance(exc, WorkerFailure):
            exc.env_index = s.lo + max(exc.env_index, 0)
            exc.env_indices = tuple(s.lo + i for i in exc.env_indices)
        if isinstance(exc, RestartBudgetExceeded):
            self._state = State.DEFAULT
            self.close(terminate=True)  # that node's env closed itself: so does this one
        return exc

    def _raise_if_policy(self, restarted: list) -> None:
        if restarted and self.on_failure == "raise":
            s, (reason, detail) = restarted[0]
            raise self._actor_error(s, reason, detail, "(the actor was replaced)")

    # -- internals: checks ---------------------------------------------------------------------
    def _assert_open(self) -> None:
        if self.closed or self._resources is None:
            raise ClosedEnvError("the RayVectorEnv is closed; create a new one")

    def _assert_idle(self, call: str) -> None:
        self._assert_open()
        if self._state != State.DEFAULT:
            raise AlreadyPendingCallError(
                f"{call}() called while a {self._state.value}_async() is pending; call "
                f"{self._state.value}_wait() first", self._state.value)
        if self._flying:
            raise AlreadyPendingCallError(
                f"{call}() called while envs {self.stepping.tolist()} are stepping after "
                "send(); recv() them first", "recv")

    def _assert_waiting(self, state: State, call: str, needed: str) -> None:
        self._assert_open()
        if self._state != state:
            raise NoAsyncCallError(f"{call}() called without a pending {needed}(); call "
                                   f"{needed}() first", state.value)

    def _conform(self, space: spaces.Space, actions):
        """Actions as arrays of the space's dtypes; checked against the space when
        ``validate_actions`` (before anything is sent, so no actor steps alone)."""
        try:
            out = _conform(space, actions)
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidActionError(f"actions do not have the structure of {space}: "
                                     f"{exc}") from None
        if self.validate_actions and not space.contains(out):
            raise InvalidActionError(f"actions are not in the action space {space}")
        return out


# -- helpers on batched structures -------------------------------------------------------------

def _conform(space: spaces.Space, x):
    if isinstance(space, spaces.Dict):
        if not isinstance(x, Mapping):
            raise TypeError(f"expected a dict, got {type(x).__name__}")
        return {k: _conform(sub, x[k]) for k, sub in space.spaces.items()}
    if isinstance(space, spaces.Tuple):
        if not isinstance(x, (tuple, list)) or len(x) != len(space.spaces):
            raise TypeError(f"expected a tuple of {len(space.spaces)}")
        return tuple(_conform(sub, v) for sub, v in zip(space.spaces, x))
    a = np.asarray(x)
    want = space.dtype
    if want is not None and a.dtype != want:
        ok = "biuf" if want.kind == "f" else "biu" if want.kind in "iub" else ""
        if a.dtype.kind not in ok:
            raise TypeError(f"dtype {a.dtype} cannot become {want}")
        a = a.astype(want)
    return a


def _slice(x, lo: int, hi: int):
    if isinstance(x, dict):
        return {k: _slice(v, lo, hi) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_slice(v, lo, hi) for v in x)
    return x[lo:hi]


def _take(x, order):
    if isinstance(x, dict):
        return {k: _take(v, order) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_take(v, order) for v in x)
    return x[order]


def _row(x, j: int):
    if isinstance(x, dict):
        return {k: _row(v, j) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_row(v, j) for v in x)
    return np.array(x[j])


def _concat(parts: list):
    """One batch from the actors' batches: a fresh, writable array per leaf."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: _concat([p[k] for p in parts]) for k in first}
    if isinstance(first, tuple):
        return tuple(_concat([p[i] for p in parts]) for i in range(len(first)))
    return np.concatenate(parts) if len(parts) > 1 else np.array(first)


def _merge_infos(dst: dict, src: dict, lo: int, n: int) -> dict:
    """Place an actor's batched infos (over its k envs) at rows ``lo..lo+k`` of a batch of
    ``n``: arrays and ``_key`` masks as gymnasium's ``_add_info`` builds them env by env."""
    for key, value in src.items():
        if key.startswith("_") and key[1:] in src:
            continue  # a mask; handled with its key
        mask = src.get(f"_{key}")
        if isinstance(value, dict):
            dst[key] = _merge_infos(dst.get(key, {}), value, lo, n)
        else:
            k = len(value)
            arr = dst.get(key)
            if arr is None:
                arr = (np.full((n, *value.shape[1:]), None, object) if value.dtype == object
                       else np.zeros((n, *value.shape[1:]), value.dtype))
            arr[lo:lo + k] = value
            dst[key] = arr
        if mask is not None:
            m = dst.get(f"_{key}")
            if m is None:
                m = np.zeros(n, np.bool_)
            m[lo:lo + len(mask)] = mask
            dst[f"_{key}"] = m
    return dst


def _restart_info(reason: str, detail: str) -> dict:
    return {"worker_restarted": True, "worker_restart_reason": f"{reason}: {detail}"}


def _classify(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) for an actor that Ray reports gone."""
    msg = str(exc)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    detail = (lines[-1] if lines else type(exc).__name__)[:300]
    if isinstance(exc, ray.exceptions.ActorUnavailableError):
        return "node_lost", f"actor unreachable: {detail}"
    low = msg.lower()
    if "out_of_memory" in low or "outofmemory" in low or "memory pressure" in low:
        return "oom", detail
    if getattr(exc, "preempted", False) or "node has died" in low or "node died" in low \
            or "node is dead" in low:
        return "node_lost", detail
    if isinstance(exc, ray.exceptions.RayActorError):
        return "actor_died", detail
    return "actor_died", f"{type(exc).__name__}: {detail}"
