"""The actors of a RayVectorEnv: one :class:`Slot` per contiguous range of envs and the
actor serving it now; starting an actor where placement says, learning where it runs, and
stopping them all (in stages on close, or from the finalizer if the env is dropped).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
import ray.exceptions

from fastvec.ray.calls import Calls
from fastvec.ray.host import Host
from fastvec.ray.placement import actor_options

log = logging.getLogger("fastvec.ray")


@dataclass
class Slot:
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
    sent: Any = None  # the actions of the step in flight (re-sent to a resumed replacement)
    resumed: int = 0  # episodes a replacement went on with (resume)
    not_resumed: collections.Counter = field(default_factory=collections.Counter)

    @property
    def envs(self) -> range:
        return range(self.lo, self.hi)


class Actors:
    """The slots and every actor handle started for them. Holds no reference to the vector
    env: :meth:`cleanup` is its finalizer's backstop."""

    def __init__(self, env_fns: list[Callable], pins: list, sizes: list[int],
                 node_kwargs: dict, options: dict, calls: Calls):
        self.slots: list[Slot] = []
        lo = 0
        for j, size in enumerate(sizes):
            self.slots.append(Slot(j, lo, lo + size, pins[j % len(pins)]))
            lo += size
        self.handles: list = []
        self._env_fns = env_fns
        self._node_kwargs = node_kwargs
        self._options = options
        self._calls = calls

    def launch(self, s: Slot, predecessor: tuple | None = None,
               avoid: set[str] = frozenset()) -> None:
        """Start the slot's actor (off the nodes in ``avoid``) and submit its start."""
        opts = actor_options(self._options, s.pin, set(avoid),
                             [t.node_id for t in self.slots if t is not s])
        log.debug("actor %d: starting with %s", s.index, opts)
        s.handle = Host.options(**opts).remote()
        self.handles.append(s.handle)
        s.start_ref = s.handle.start.remote(self._env_fns[s.lo:s.hi], dict(self._node_kwargs),
                                            predecessor)

    def identify(self, s: Slot, who: dict) -> None:
        """Record where the slot's actor runs, from its start's answer."""
        s.node_id, s.pid, s.host = who["node_id"], who["pid"], tuple(who["host"])
        s.start_ref = None

    def resolve_start(self, s: Slot) -> None:
        """Learn where a replacement runs once it answered (its start came first)."""
        if s.start_ref is not None:
            try:
                self.identify(s, self._calls.get(s.start_ref))
            except ray.exceptions.RayError:
                pass  # reported by the call that needs the actor

    @staticmethod
    def kill(s: Slot) -> None:
        try:
            ray.kill(s.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass

    def close(self, timeout: float | None, terminate: bool) -> None:
        """Ask every actor to close its FastVectorEnv (rings unlinked, workers joined), give
        them until the deadline (``actor_timeout`` if None), then kill the actors whatever
        they answered."""
        wait = self._calls.actor_timeout if timeout is None else timeout
        refs = []
        for s in self.slots:
            if s.handle is not None:
                try:
                    refs.append(s.handle.close.remote(timeout, terminate))
                except Exception:  # noqa: BLE001 - a dead actor: nothing to ask
                    pass
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=wait)
        for h in self.handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.handles = []

    def cleanup(self) -> None:
        """The finalizer's backstop: ask each actor to close, without waiting."""
        for h in self.handles:
            try:  # queued behind any running call: close the rings, then leave gracefully
                h.close.remote(None, True)
                h.__ray_terminate__.remote()
            except Exception:  # noqa: BLE001 - Ray may already be shut down
                pass
        self.handles = []
