"""Requests to the actors and what became of them: every wait on Ray has a deadline.

A request (:class:`Call`) is lost once its actor has not answered within
``actor_timeout`` (a partition, a frozen node). Ray's errors are sorted into an actor that
is gone (:attr:`Outcome.lost`: ``node_lost``, ``actor_died``, ``oom``, ``unresponsive``)
and an exception that fastvec or env code raised inside the actor (:attr:`Outcome.error`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import ray
import ray.exceptions

from fastvec.errors import WaitTimeout
from fastvec.ray.host import PREDECESSOR_WAIT

# Seconds of one wait on classic calls while compiled graphs' reads are in flight too.
MIXED_SLICE = 0.002


@dataclass
class Call:
    """One request to one actor: what its result will be and when it counts as lost."""

    ref: Any
    kind: str  # "start", "step", "reset" (also a replacement's reset standing in for a step),
    # "resume" (a replacement replaying its envs' episodes, then the lost step)...
    deadline: float
    sent: float = field(default_factory=time.monotonic)


@dataclass
class Outcome:
    value: Any = None
    lost: tuple[str, str] | None = None   # (reason, detail): the actor is gone
    error: BaseException | None = None    # raised by fastvec or env code inside the actor


class Calls:
    """Deadlines for requests to actors, and bounded waits for their outcomes."""

    def __init__(self, actor_timeout: float):
        self.actor_timeout = actor_timeout

    def call(self, ref, kind: str) -> Call:
        # A replacement may first wait for its predecessor's process to end (host.py).
        slack = PREDECESSOR_WAIT if kind in ("start", "reset", "resume") else 0.0
        return Call(ref, kind, time.monotonic() + self.actor_timeout + slack)

    def get(self, ref):
        """One result, within ``actor_timeout`` (Ray's errors are the caller's)."""
        return ray.get(ref, timeout=self.actor_timeout)

    def collect(self, calls: dict[int, Call], timeout: float | None) -> dict[int, Outcome]:
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
        return self.outcomes(calls, done)

    def first(self, flying: dict[int, Call], sizes: Mapping[int, int], need: int,
              timeout: float | None, reads=None) -> tuple[list[int], set]:
        """Wait until the actors in ``flying`` that answered or missed their deadline hold
        at least ``need`` envs (``sizes``: envs per actor). Returns those actors and the
        refs that are ready; ``timeout`` raises WaitTimeout, leaving every call in flight.
        A call without a ref is a compiled graph's execution: ``reads`` (compiled.py's
        Graphs) says when its background read has its outcome (the read itself gives up
        at the actor's deadline)."""
        user_deadline = np.inf if timeout is None else time.monotonic() + timeout
        graphed = {a for a, c in flying.items() if c.ref is None}
        classic = {a: c for a, c in flying.items() if c.ref is not None}
        done: set = set()
        while True:
            now = time.monotonic()
            over = {a for a, c in classic.items() if c.deadline <= now}
            answered = reads.answered(graphed) if graphed else set()
            have = [a for a in flying
                    if a in answered or a in over or (a in classic and classic[a].ref in done)]
            if sum(sizes[a] for a in have) >= need:
                return have, done
            if now >= user_deadline:
                raise WaitTimeout(f"recv(timeout={timeout}) ran out of time; the envs keep "
                                  "stepping: call recv() again")
            waiting = [c for a, c in classic.items() if c.ref not in done and a not in over]
            refs = [c.ref for c in waiting]
            reading = graphed - answered
            until = min([user_deadline] + [c.deadline for c in waiting])
            if not refs:
                reads.wait_any(reading, None if until == np.inf else until - now)
                continue
            # Both kinds in flight (a replacement's reset next to graphs): Ray cannot wait
            # on both, so its wait is cut into slices between looks at the graphs' reads.
            left = until - now if not reading else min(until - now, MIXED_SLICE)
            ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, left))
            if ready:
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            done.update(ready)

    def outcomes(self, calls: dict[int, Call], done: set) -> dict[int, Outcome]:
        """The outcome of each call; those whose ref is not in ``done`` are lost."""
        ready = [c.ref for c in calls.values() if c.ref in done]
        values: dict = {}
        try:  # one call for all: the common case, and the cheapest
            values = dict(zip(ready, ray.get(ready, timeout=self.actor_timeout)))
        except Exception:  # noqa: BLE001 - sorted out one by one below
            pass
        outs = {}
        for a, c in calls.items():
            if c.ref not in done:
                outs[a] = Outcome(lost=("unresponsive", f"no answer to a {c.kind} within "
                                                        f"actor_timeout={self.actor_timeout} s"))
            elif c.ref in values:
                outs[a] = Outcome(value=values[c.ref])
            else:
                try:
                    outs[a] = Outcome(value=ray.get(c.ref, timeout=self.actor_timeout))
                except ray.exceptions.RayTaskError as exc:
                    cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                    outs[a] = Outcome(error=cause)
                except ray.exceptions.GetTimeoutError:
                    outs[a] = Outcome(lost=("unresponsive", "its result could not be fetched"))
                except ray.exceptions.RayError as exc:
                    outs[a] = Outcome(lost=classify(exc))
        return outs


def classify(exc: BaseException) -> tuple[str, str]:
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
