"""Hot spares: worker processes started, and their envs built, before any worker fails.

    parent                                          spare process (sleeping)
    Spares.fill() ── ctx.Process(spare_main) ──────▶ build k envs from env_fns[0]
                  ◀──────────── ("ready",) or ("failed", traceback) ─┘
    a slot fails: start_process takes a spare:
    adopt(spare, WorkerSpec) ── the slot's WorkerSpec ─▶ run_worker(spec, built envs)
                                                        (fastvec/worker.py: the same
                                                        start reply, then serve)

A lost worker costs a process start plus its envs' build before the step that meets the
loss returns; a spare has paid both in advance, so the slot's replacement answers its
start at once and resets or replays (fastvec/resume.py) as any replacement would. The
envs are built ahead only when every slot's envs come from the same env function (equal
pickles: one callable, or one gymnasium id); otherwise the spare starts the process and
builds the slot's own envs when it adopts it.

A spare holds no shared memory and no semaphore until it adopts a slot (then the slot's);
it sleeps in ``poll`` on its pipe, waking once a second to see that its owner lives. Its
start is bounded like a worker's (``start_timeout``) and its failures are budgeted like a
slot's (``max_restarts`` within ``restart_window``); past that budget no new spare starts
(a failed worker is then replaced by a cold start, as without spares) until a reset tries
again. The first spares start after the workers have built their envs; those that replace
an adopted or lost spare start from the watchdog's thread, off the step path. The pipe
carries only the adoption, never a step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import cloudpickle

from fastvec import _ring
from fastvec.failures import sigkill
from fastvec.options import Options
from fastvec.worker import WorkerSpec, run_worker

log = logging.getLogger("fastvec")

_OWNER_CHECK_S = 1.0  # how often a sleeping spare looks whether its owner still lives


# What a WorkerSpec says of its slot; the rest is the same for every slot of an env, and
# a spare has it from its start (SpareSpec.template): the adoption carries only these.
SLOT_FIELDS = ("worker_index", "env_indices", "payload_name", "req_sem_name", "generation",
               "start_seq", "pending_seeds")


@dataclass
class SpareSpec:
    """What a spare needs before it knows its slot (pickled under spawn and forkserver)."""

    env_fns: list  # every env's function (CloudpickleWrapper), by env index
    build: int  # envs to build ahead from env_fns[0] (0: build at adoption)
    template: WorkerSpec  # a worker's spec, but SLOT_FIELDS
    parent_death_signal: bool = True


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's (pid reuse): not ours any more
        return False
    return True


def spare_main(spec: SpareSpec, conn) -> None:
    """Entry point of a spare process: build, say so, sleep until adopted or closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.parent_death_signal and sys.platform.startswith("linux"):
        _ring.set_parent_death_signal(signal.SIGKILL)
    built: list = []
    error: BaseException | None = None
    try:
        built = [spec.env_fns[0]() for _ in range(spec.build)]
        conn.send(("ready", None))
    except BaseException as exc:  # noqa: BLE001 - reported, and again to an adopting slot
        error = exc
        try:
            conn.send(("failed", "".join(traceback.format_exception(exc))))
        except OSError:
            pass
    slot = None
    try:
        while slot is None:
            if conn.poll(_OWNER_CHECK_S):
                slot = conn.recv()
                if slot is None:  # closed by the parent
                    break
            elif not _owner_alive(spec.template.owner_pid):
                break
    except (EOFError, OSError):
        slot = None
    conn.close()
    if slot is None:
        for env in built:
            try:
                env.close()
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        os._exit(0)
    run_worker(dataclasses.replace(spec.template, **slot,
                                   env_fns=[spec.env_fns[i] for i in slot["env_indices"]]),
               built, error)


def same_function(env_fns: list) -> bool:
    """Whether every env comes from the same function: equal pickles (one callable, a
    gymnasium id, or lambdas that do the same); False when one cannot be pickled."""
    try:
        first = cloudpickle.dumps(getattr(env_fns[0], "fn", env_fns[0]))
        return all(cloudpickle.dumps(getattr(fn, "fn", fn)) == first for fn in env_fns[1:])
    except Exception:  # noqa: BLE001 - anything unpicklable: build at adoption
        return False


class Spare:
    """The parent's handle on one spare process."""

    def __init__(self, process, conn, started: float):
        self.process = process
        self.conn = conn
        self.started = started
        self.pid = process.pid  # kept: the process object is closed once it is reaped
        self.state = "building"  # -> "ready"; a failed one leaves the pool


class Spares:
    """A pool of ``options.spares`` spare processes for one FastVectorEnv's slots.

    ``fill()`` (the main thread: a fork happens there) starts what is missing;
    ``take()`` hands the oldest ready spare (else one still building) to a failed slot;
    ``tend()`` (the watchdog's thread) notes spares that finished building, failed, died
    or overran ``start_timeout``, and returns what to wait on; ``close()`` ends them all.
    """

    def __init__(self, *, ctx, options: Options, env_fns: list, template: WorkerSpec,
                 envs_per_worker: int, publish=None):
        self.ctx = ctx
        self.options = options
        self.wanted = options.spares
        self.spec = SpareSpec(env_fns=env_fns,
                              build=envs_per_worker if same_function(env_fns) else 0,
                              template=dataclasses.replace(template, env_fns=None))
        self.lock = threading.Lock()
        self.pool: list[Spare] = []
        self.failure_times: collections.deque = collections.deque()
        self.off: str | None = None  # why no new spare starts (the budget ran out)
        self.started = self.adopted = self.failed = 0
        self.closed = False
        # called with (wanted, ready) as the pool turns: the stats header (fastvec top)
        self.publish = publish or (lambda wanted, ready: None)
        self._published: tuple | None = None

    @property
    def builds_ahead(self) -> bool:
        """Whether spares build their envs before adoption (one env function for all)."""
        return self.spec.build > 0

    # -- the main thread ---------------------------------------------------------------
    def fill(self) -> None:
        """Start spares until ``wanted`` exist (none past the failure budget)."""
        with self.lock:
            self._tend()
            while not self.closed and self.off is None and len(self.pool) < self.wanted:
                self.spec.parent_death_signal = threading.current_thread() is threading.main_thread()
                parent, child = self.ctx.Pipe(duplex=True)
                try:
                    proc = self.ctx.Process(target=spare_main, args=(self.spec, child),
                                            daemon=self.options.daemon, name="fastvec-spare")
                    proc.start()
                except Exception as exc:  # noqa: BLE001 - fork/ENOMEM: counted, not raised
                    parent.close()
                    self._failed(f"could not start a spare process: {type(exc).__name__}: {exc}")
                    break
                finally:
                    child.close()
                self.pool.append(Spare(proc, parent, time.monotonic()))
                self.started += 1

    def retry(self) -> bool:
        """A reset: spares stopped by their failure budget get a fresh one; returns
        whether they had been stopped."""
        with self.lock:
            if self.off is None:
                return False
            log.info("fastvec: trying spares again (stopped after: %s)", self.off)
            self.off = None
            self.failure_times.clear()
            return True

    def take(self) -> Spare | None:
        """The spare a failed slot adopts: the oldest ready one, else the oldest still
        building (it is ahead of a fresh start), else None."""
        with self.lock:
            self._tend()
            if not self.pool:
                return None
            ready = [s for s in self.pool if s.state == "ready"]
            spare = (ready or self.pool)[0]
            self.pool.remove(spare)
            self._publish()
            return spare

    def adopt(self, spare: Spare, spec: WorkerSpec):
        """Hand ``spec``'s slot to ``spare``; returns its process, or None when the spare
        is gone (the caller starts a process instead)."""
        # the slot's fields only: the spare has the rest (and every env_fn: some cannot
        # be pickled)
        message = {name: getattr(spec, name) for name in SLOT_FIELDS}
        try:
            spare.conn.send(message)
        except (OSError, ValueError) as exc:
            log.warning("spare process %d could not adopt worker %d (%s); starting a "
                        "process instead", spare.pid, spec.worker_index, exc)
            self._end(spare)
            return None
        finally:
            spare.conn.close()
        with self.lock:
            self.adopted += 1
        log.info("worker %d (envs %s): spare process %d adopted (%s)", spec.worker_index,
                 list(spec.env_indices), spare.pid,
                 "envs built" if spare.state == "ready" else "still building")
        return spare.process

    # -- the watchdog's thread -----------------------------------------------------------
    def tend(self) -> list:
        """Take in what the spares reported; returns their pipes and sentinels (the
        watchdog wakes on either)."""
        with self.lock:
            self._tend()
            return [w for s in self.pool for w in (s.conn, s.process.sentinel)]

    def _tend(self) -> None:
        now = time.monotonic()
        for spare in list(self.pool):
            problem = None
            try:
                while spare.conn.poll(0):
                    what, detail = spare.conn.recv()
                    if what == "ready":
                        spare.state = "ready"
                    else:
                        problem = f"building its envs raised:\n{detail}"
            except (EOFError, OSError):
                pass  # it died: the exit code says more
            if problem is None and spare.process.exitcode is not None:
                problem = f"exited with code {spare.process.exitcode}"
            if (problem is None and spare.state == "building"
                    and now - spare.started > self.options.start_timeout):
                problem = f"did not build its envs within start_timeout={self.options.start_timeout} s"
            if problem is not None:
                self.pool.remove(spare)
                self._end(spare)
                self._failed(f"spare process {spare.pid} {problem}")
        self._publish()

    def _publish(self) -> None:
        now = (0 if self.closed else self.wanted,
               sum(s.state == "ready" for s in self.pool))
        if now != self._published:
            self._published = now
            self.publish(*now)

    def _failed(self, detail: str) -> None:
        now = time.monotonic()
        self.failed += 1
        self.failure_times.append(now)
        while self.failure_times and now - self.failure_times[0] > self.options.restart_window:
            self.failure_times.popleft()
        log.warning("fastvec: %s", detail)
        if len(self.failure_times) > self.options.max_restarts and self.off is None:
            self.off = detail.splitlines()[0]
            log.warning("fastvec: %d spare failures within %.0f s (max_restarts=%d): no new "
                        "spare starts until a reset; failed workers are replaced by fresh "
                        "processes",
                        len(self.failure_times), self.options.restart_window,
                        self.options.max_restarts)

    @staticmethod
    def _end(spare: Spare, grace: float = 0.0) -> None:
        proc = spare.process
        if grace and proc.exitcode is None:
            proc.join(grace)
        if not sigkill(proc):
            log.error("spare process %d survived SIGKILL for 5 s", spare.pid)
        try:
            spare.conn.close()
        except OSError:
            pass

    # -- the end ------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> None:
        """Ask every spare to close its envs and exit, at most ``timeout`` (default 1 s)
        in all, then SIGKILL; safe to call twice."""
        with self.lock:
            self.closed = True
            pool, self.pool = self.pool, []
            self._publish()
        for spare in pool:
            try:
                spare.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + (1.0 if timeout is None else timeout)
        for spare in pool:
            self._end(spare, max(0.0, deadline - time.monotonic()) or 1e-3)

    def health(self) -> list[dict]:
        """One entry per spare for ``FastVectorEnv.health()``: the keys of a worker's
        entry (zeros where a spare has none), ``spare: True`` and its state."""
        now = time.monotonic()
        with self.lock:
            pool = list(self.pool)
        return [{"worker": None, "spare": True, "state": s.state, "envs": [], "pid": s.pid,
                 "alive": s.process.exitcode is None, "disabled": False,
                 "disabled_reason": None, "generation": 0, "restarts": 0, "recycles": 0,
                 "reasons": {}, "resumed": 0, "replayed_steps": 0, "not_resumed": {},
                 "last_failure_time": None, "last_failure": None, "requests": 0,
                 "episodes": 0, "rss_bytes": _rss_of(s.pid), "heartbeat": 0,
                 "step_latency_ms": {}, "built_envs": self.spec.build,
                 "age_s": now - s.started} for s in pool]


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
