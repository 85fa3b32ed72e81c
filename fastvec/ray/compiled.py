"""Steps over Ray's Compiled Graphs: one graph per actor, ``actor.step(actions)``.

A classic actor call costs about 1-2 ms of Ray's task machinery per step; a compiled graph
sets up the actor's call once (channels in shared memory, or pushed between raylets) and
then costs tens of microseconds per execution. ``step()``'s lockstep steps and
``send``/``recv``'s steps go through the graphs; everything else (start, reset, resume,
call, attributes, health, close) stays on the classic calls of calls.py, which Ray lets
through to an actor next to its graph.

First-ready batches (``send``/``recv``): a compiled result cannot be given to
``ray.wait`` (``CompiledDAGRef``, Ray 2.60: ``ray.wait() is not supported``) and can be
read once only, so each execution a ``send`` starts is read on its own helper thread at
once (Ray releases the GIL while a read waits); the threads notify one condition, which
``recv`` (calls.py's ``Calls.first``) waits on. Each read in flight spins a driver core
while it waits (Ray polls the channel with ``sched_yield``).

One graph per actor, not one for all: each actor's answer is read on its own, so a lost or
slow actor costs only its own envs (a read of several outputs that times out half way
drops what it had read), and only a lost actor's graph is torn down and compiled again,
for its replacement.

Pitfalls of Ray 2.60 this module is built around (see docs/ray.md):

- ``CompiledDAGRef.get`` may be called once: a read that times out loses its ref. So a
  read is only ever given up at the actor's deadline (the actor is then lost); a caller's
  shorter ``timeout`` waits on a reader thread instead, and the read goes on.
- Arrays read from a graph may be views of its channel's buffer: they are copied out
  before the next execution, and none survives ``ray.shutdown()`` (a view alive past it
  crashed the interpreter at exit).
- ``teardown()`` waits up to 30 s for the actor's loop to end: a lost actor is killed
  first, so that its loop's end is immediate.
"""

from __future__ import annotations

import collections
import importlib
import logging
import pickle
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import ray.exceptions

from fastvec.errors import WaitTimeout
from fastvec.ray.actors import Actors, Slot
from fastvec.ray.calls import Outcome, classify

log = logging.getLogger("fastvec.ray")

# Compiled Graphs are beta since Ray 2.44; fastvec is tested with them on 2.60.
MIN_RAY = (2, 44)
# Seconds a graph's first execution may take beyond actor_timeout (see Graphs._compile).
FIRST_RUN_WAIT = 60.0
READ_GRACE = 0.2


def unavailable() -> str | None:
    """Why this Ray cannot run compiled graphs, or None."""
    try:
        version = tuple(int(p) for p in ray.__version__.split(".")[:2])
    except ValueError:
        version = (0, 0)
    if version < MIN_RAY:
        return f"Ray {ray.__version__} has no Compiled Graphs (needs >= 2.44)"
    try:
        importlib.import_module("ray.dag")
    except ImportError as exc:  # pragma: no cover - a broken install
        return f"ray.dag cannot be imported: {exc}"
    return None


_PLAIN = (int, float, complex, str, bytes, bool, type(None), np.generic)


def copied(x):
    """``x`` with every array copied out of the channel's buffer: arrays (those inside
    object arrays too, e.g. SAME_STEP's ``final_obs``), tuples, lists and dicts are walked;
    any other object is copied whole through pickle (it may hold such a view)."""
    if isinstance(x, np.ndarray):
        if x.dtype != object:
            return x.copy()
        out = np.empty(x.shape, object)
        for i, v in np.ndenumerate(x):
            out[i] = copied(v)
        return out
    if isinstance(x, _PLAIN):
        return x
    if type(x) is tuple:
        return tuple(copied(v) for v in x)
    if type(x) is list:
        return [copied(v) for v in x]
    if type(x) is dict:
        return {k: copied(v) for k, v in x.items()}
    return pickle.loads(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL))


@dataclass
class Read:
    """One execution of an actor's graph, and its outcome once read."""

    ref: Any
    deadline: float
    outcome: Outcome | None = None
    done: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None
    answered: threading.Condition | None = None  # notified once the outcome is set

    def read(self) -> None:
        """Read the answer (at most until the deadline); the outcome is set in any case."""
        try:
            # At least READ_GRACE: a read made after another actor's deadline passed must
            # still find an answer that is there (Ray's zero-timeout read does not).
            value = ray.get(self.ref, timeout=max(READ_GRACE, self.deadline - time.monotonic()))
            out = Outcome(value=copied(value))
        except ray.exceptions.RayChannelTimeoutError:
            out = Outcome(lost=("unresponsive", "no answer to a step within actor_timeout"))
        except ray.exceptions.RayTaskError as exc:  # raised by env or fastvec code
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            out = Outcome(error=cause)
        except ray.exceptions.RayError as exc:
            out = Outcome(lost=classify(exc))
        except Exception as exc:  # noqa: BLE001 - the graph broke: the actor is lost to it
            out = Outcome(lost=("actor_died", f"its compiled graph failed: "
                                              f"{type(exc).__name__}: {exc}"[:300]))
        self.ref = None  # no view of the channel's buffer outlives the read
        self.outcome = out
        self.done.set()
        if self.answered is not None:
            with self.answered:
                self.answered.notify_all()

    def start(self, answered: threading.Condition | None = None) -> None:
        """Read on a helper thread (the read spins a core while it waits: Ray 2.60)."""
        self.answered = answered
        self.reader = threading.Thread(target=self.read, daemon=True,
                                       name="fastvec-ray-graph-read")
        self.reader.start()


class Graphs:
    """The compiled graph of each actor that has one, and the step each one has in flight.

    ``actor_timeout`` bounds every read; a graph that cannot be compiled leaves its actor
    on the classic calls (logged) until the actor is replaced."""

    def __init__(self, actors: Actors, actor_timeout: float):
        self._actors = actors
        self._timeout = actor_timeout
        self._graphs: dict[int, Any] = {}
        self._reads: dict[int, Read] = {}
        self._failed: dict[int, int] = {}  # slot -> generation whose compile failed
        self._answered = threading.Condition()  # a background read has its outcome
        self.executions: collections.Counter = collections.Counter()  # per slot, all actors

    def has(self, s: Slot) -> bool:
        """Whether the slot's actor steps through its graph (compiled now if it can be:
        once its start has answered and nothing else of it is pending)."""
        if s.index in self._graphs:
            return True
        if s.start_ref is not None or s.pending_reset is not None \
                or self._failed.get(s.index) == s.generation:
            return False
        why = self._compile(s)
        if why is not None:
            self._failed[s.index] = s.generation
            log.warning("actor %d: no compiled graph (%s); it stays on classic calls",
                        s.index, why)
            return False
        return True

    def _compile(self, s: Slot) -> str | None:
        """Compile the slot's graph and run it once (None), or say why it could not be.
        Ray's compile waits on the actor without a deadline: it runs on a thread, and an
        actor that lets it wait past ``actor_timeout`` is killed (the step then finds it
        lost); the first execution may wait for Ray's start of the graph's driver-side
        helper actor (seconds, once per driver): ``FIRST_RUN_WAIT`` more."""
        from ray.dag import InputNode

        box: dict = {}

        def compile_() -> None:
            try:
                with InputNode() as inp:
                    node = s.handle.run.bind(inp)
                box["graph"] = node.experimental_compile()
            except Exception as exc:  # noqa: BLE001 - reported below
                box["error"] = exc

        t = threading.Thread(target=compile_, daemon=True, name="fastvec-ray-compile")
        t.start()
        t.join(self._timeout)
        if t.is_alive():
            self._actors.kill(s)  # ends Ray's wait on it
            t.join(self._timeout)
            graph = box.get("graph")
            if graph is not None:
                self._teardown(s, graph)
            return f"the compile took over actor_timeout={self._timeout} s: actor killed"
        if "error" in box:
            exc = box["error"]
            return f"{type(exc).__name__}: {exc}"[:300]
        graph = box["graph"]
        first = Read(graph.execute(None), time.monotonic() + self._timeout + FIRST_RUN_WAIT)
        first.read()
        out = first.outcome
        if out.lost or out.error is not None:
            if out.lost:
                self._actors.kill(s)  # the step then finds it lost
            self._teardown(s, graph)
            return f"its first run failed: {out.lost or out.error!r}"[:300]
        self._graphs[s.index] = graph
        return None

    @staticmethod
    def _teardown(s: Slot, graph) -> None:
        try:
            graph.teardown()
        except Exception as exc:  # noqa: BLE001 - tearing down a broken graph
            log.debug("actor %d: graph teardown: %s: %s", s.index, type(exc).__name__, exc)

    def active(self, s: Slot) -> bool:
        """Whether the slot's actor has a graph now (nothing is compiled)."""
        return s.index in self._graphs

    def submit(self, s: Slot, actions, background: bool = False) -> None:
        """Execute the slot's graph on ``actions`` (``has(s)`` first); ``background``:
        read its answer on a helper thread from now on (first-ready batches)."""
        ref = self._graphs[s.index].execute(actions)
        read = self._reads[s.index] = Read(ref, time.monotonic() + self._timeout)
        self.executions[s.index] += 1
        if background:
            read.start(self._answered)

    @property
    def in_flight(self) -> set[int]:
        return set(self._reads)

    def answered(self, indices) -> set[int]:
        """Those of the slots (with an execution in flight) whose read has its outcome."""
        return {a for a in indices if self._reads[a].done.is_set()}

    def wait_any(self, indices, timeout: float | None) -> None:
        """Until one of the slots' background reads has its outcome, at most ``timeout``
        (None: until the last of their actor deadlines, which ends every read)."""
        reads = [self._reads[a] for a in indices]
        if not reads:
            return
        bound = max(r.deadline for r in reads) + READ_GRACE - time.monotonic()
        wait = bound if timeout is None else min(timeout, bound)
        with self._answered:
            self._answered.wait_for(lambda: any(r.done.is_set() for r in reads),
                                    max(0.0, wait))

    def collect(self, indices, timeout: float | None) -> dict[int, Outcome]:
        """The outcomes of the slots' executions. ``timeout`` (the caller's) raises
        WaitTimeout first, the reads going on in the background."""
        reads = {a: self._reads[a] for a in indices}
        if timeout is None:
            for r in reads.values():
                if r.reader is None and r.outcome is None:
                    r.read()
        else:
            deadline = time.monotonic() + timeout
            for r in reads.values():
                if r.reader is None and r.outcome is None:
                    r.start()
            for r in reads.values():
                if not r.done.wait(max(0.0, deadline - time.monotonic())):
                    raise WaitTimeout(f"no answer within timeout={timeout} s; the call is "
                                      "still pending: wait for it again")
        outs = {}
        for a, r in reads.items():
            r.done.wait()  # set by the read, itself bounded by the actor's deadline
            outs[a] = r.outcome
            del self._reads[a]
            if r.outcome.lost is not None:
                self.drop(self._actors.slots[a], kill=True)
        return outs

    def drop(self, s: Slot, kill: bool = False) -> None:
        """Tear the slot's graph down and forget it: its actor is lost (``kill``: killed
        first, so that the teardown need not wait for its loop) or the env closes. A read
        still in flight ends with the teardown (its channel closes)."""
        if kill:
            self._actors.kill(s)
        graph = self._graphs.pop(s.index, None)
        read = self._reads.pop(s.index, None)
        if graph is not None:
            self._teardown(s, graph)
        if read is not None and read.reader is not None:
            read.reader.join(self._timeout)

    def close(self) -> None:
        """Tear every graph down (before the actors are closed and Ray is shut down) and
        drop every reference to them."""
        for s in self._actors.slots:
            self.drop(s)
        self._graphs, self._reads = {}, {}
