"""The parent side of the worker processes: start, watch, kill or retire, shut down.

    FastVectorEnv ──Dispatcher.request(seq, op)──▶ Slot.ctl ──post req_sem──▶ worker
         ▲                                                                 │
         └── Dispatcher.wait: done_sem + resp_seq == seq ◀──post done_sem───┘
                           ▲
    Watchdog thread ───────┘  sentinels (death, as an event), heartbeat counters (frozen),
                              busy_since_ns (hung in a request); a verdict names the
                              request it judged, marks the slot, raises the step path's
                              alarm and posts done_sem so the waiting parent wakes at once.

A failed slot is dirty: its process is killed, its control block re-initialised and its
request semaphore recreated under a new name before a new process starts in it. Each slot
publishes its state, restarts and last failure in its control block at every such turn
(:meth:`Slot.publish`, never on the step path) for readers outside the job (fastvec top). Which
process to start and what it must do first is recovery's decision (fastvec/recovery.py);
how requests are numbered, sent and waited for is fastvec/dispatch.py's (``sup.dispatch``);
how workers are judged is fastvec/watchdog.py's; this module only runs processes.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time

import numpy as np
import posix_ipc

from fastvec import _ring, stats
from fastvec.dispatch import Dispatcher, get_error
from fastvec.errors import RingError, WaitTimeout
from fastvec.failures import Failure, describe_exit, sigkill
from fastvec.options import Options
from fastvec.shm import Names, Segment
from fastvec.spares import Spares
from fastvec.watchdog import Watchdog
from fastvec.worker import InProcess, WorkerSpec, worker_main

__all__ = ["Failure", "Slot", "Supervisor", "describe_exit", "get_error"]

log = logging.getLogger("fastvec")

_LATENCY_WINDOW = 512
SPARES_DUE_S = 1.0  # the longest a spare's start waits for the call that adopted one


class Slot:
    """One worker slot: a control block, a request semaphore, a side buffer, a process,
    and what it did so far (restarts, failures, request latencies: :meth:`health`)."""

    process = None
    req_sem = None  # the request semaphore (posix_ipc: created here, unlinked at the end)
    req_sem_name = None
    req_handle: _ring.SemHandle | None = None  # a C handle on it: posts, and the step path
    failure: Failure | None = None  # set by the watchdog (or a failed start)
    _disabled: Failure | None = None  # out of play: the restart budget ran out
    lost: Failure | None = None  # replaced outside a step: the next step reports it
    expected = 0  # seq of the request whose reply we wait for
    ready = False  # its process built its envs (await_ready)
    replayed = False  # its process serves episodes it replayed (published as "resumed")
    base_requests = base_episodes = 0  # what the slot's earlier generations finished

    def __init__(self, index: int, env_indices: tuple, env_fns: list, payload: Segment,
                 ctl: _ring.Ctl):
        self.index = index
        self.env_indices = env_indices
        self.env_fns = env_fns
        self.payload = payload
        self.ctl = ctl
        self.generation = 0
        self.restart_times: collections.deque = collections.deque()
        self.restarts = self.recycles = 0
        self.reasons: collections.Counter = collections.Counter()
        self.last_failure: Failure | None = None
        # resume (fastvec/resume.py): episodes resumed, and why the others were not
        self.resumed = 0
        self.replayed_steps = 0  # steps the replays of those episodes took
        self.not_resumed: collections.Counter = collections.Counter()
        self.latency = np.zeros(_LATENCY_WINDOW, np.int64)
        self.latency_count = 0

    @property
    def done(self) -> bool:
        return self.ctl.resp_seq == self.expected

    @property
    def disabled(self) -> Failure | None:
        """Why the slot is out of play (the restart budget ran out), or None."""
        return self._disabled

    @disabled.setter
    def disabled(self, failure: Failure | None) -> None:
        self._disabled = failure
        self.publish()

    def state(self) -> int:
        """The slot's state as published (``_ring.STATE_*``)."""
        if self._disabled is not None:
            return _ring.STATE_DISABLED
        if self.process is None or self.failure is not None:
            return _ring.STATE_REPLACING
        if not self.ready:
            return _ring.STATE_STARTING
        return _ring.STATE_RESUMED if self.replayed else _ring.STATE_SERVING

    def publish(self) -> None:
        """Publish the slot's state, restarts by reason and last failure in its control
        block for readers outside the job (fastvec top, fastvec export). Called where the
        slot turns (start, ready, kill, retire, disable), never on the step path."""
        try:
            stats.publish_slot(self.ctl, self.state(), self.reasons, recycles=self.recycles,
                               base_requests=self.base_requests,
                               base_episodes=self.base_episodes,
                               last_failure=self.last_failure)
        except RingError:  # the block was released: the env is closed
            pass

    def new_generation(self) -> None:
        """Before the control block is re-initialised for a new process: keep what the
        outgoing generation finished, which the init wipes (a fresh block counts 0)."""
        self.base_requests += int(self.ctl.progress)
        self.base_episodes += int(self.ctl.episodes)

    @property
    def serving(self) -> bool:
        """A process runs in the slot and nothing marks it failed or out of play."""
        return self.process is not None and self.failure is None and self.disabled is None

    def env_mask(self) -> int:
        return (1 << len(self.env_indices)) - 1

    def record_latency(self) -> None:
        """Keep how long the worker took for its last request (a window of the latest)."""
        self.latency[self.latency_count % _LATENCY_WINDOW] = self.ctl.last_request_ns
        self.latency_count += 1

    def health(self) -> dict:
        """This slot's entry of ``FastVectorEnv.health()``."""
        n = min(self.latency_count, _LATENCY_WINDOW)
        lat = self.latency[:n] / 1e6
        lf, proc, ctl = self.last_failure, self.process, self.ctl
        return {
            "worker": self.index,
            "spare": False,
            "state": stats.STATES[self.state()],
            "envs": list(self.env_indices),
            "pid": proc.pid if proc is not None else None,
            "alive": bool(proc is not None and proc.exitcode is None),
            "disabled": self.disabled is not None,
            "disabled_reason": (f"{self.disabled.reason}: {self.disabled.detail}"
                                if self.disabled else None),
            "generation": self.generation,
            "restarts": self.restarts,
            "recycles": self.recycles,
            "reasons": dict(self.reasons),
            "resumed": self.resumed,
            "replayed_steps": self.replayed_steps,
            "not_resumed": dict(self.not_resumed),
            "last_failure_time": lf.when if lf else None,
            "last_failure": f"{lf.reason}: {lf.detail}" if lf else None,
            "requests": int(ctl.progress),
            "episodes": int(ctl.episodes),
            "rss_bytes": int(ctl.rss_bytes),
            "heartbeat": int(ctl.heartbeat),
            "step_latency_ms": ({f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}
                                | {"max": float(lat.max()), "samples": int(n)}) if n else {},
        }


class Supervisor:
    """The worker processes of one FastVectorEnv, their semaphores and their watchdog.

    Requests and waits are its :class:`~fastvec.dispatch.Dispatcher`'s (``sup.dispatch``),
    which shares its slots and lock.
    """

    def __init__(self, *, options: Options, ctx, prefix: str, names: Names, main: Segment,
                 plan, slots_envs: list, env_fns: list, single_spaces: tuple,
                 observation_mode: str = "same"):
        self.options = options
        self.ctx = ctx
        self.serial = options.context == "serial"  # workers run in this process
        self.prefix = prefix
        self.names = names
        self.main = main
        self.plan = plan
        self.single_spaces = single_spaces
        self.observation_mode = observation_mode
        self.lock = threading.RLock()
        self.slots: list[Slot] = []
        self.retiring: list[tuple] = []  # (process, SIGKILL deadline) of recycled workers
        self.zombies: list = []
        self.done_sem = names.new_semaphore("done")
        self.done_sem_name = self.done_sem.name
        self.done_handle = _ring.SemHandle(self.done_sem_name)  # waits that let signals through
        self.batch = _ring.Batch(main.mm, plan.batch_offset)
        self.closing = False  # shutdown began: slots no longer publish their turns
        self.spares_due: float | None = None  # since when spares wait for a call to return
        stats.write_header(main.mm, num_workers=len(slots_envs), num_envs=plan.num_envs,
                           envs_per_worker=max(len(e) for e in slots_envs),
                           owner_pid=os.getpid())
        for w, env_indices in enumerate(slots_envs):
            payload = names.new_segment(f"p{w}", 64 * 1024)
            ctl = _ring.Ctl(main.mm, w * _ring.CTL_SIZE)
            self.slots.append(Slot(w, tuple(env_indices), [env_fns[i] for i in env_indices],
                                   payload, ctl))
        # hot spares (fastvec/spares.py): processes started ahead of any failure
        self.spares = (Spares(ctx=ctx, options=options, env_fns=env_fns,
                              template=self.worker_spec(self.slots[0], 0),
                              envs_per_worker=max(len(e) for e in slots_envs),
                              publish=self._publish_spares)
                       if options.spares and not self.serial else None)
        self.watchdog = Watchdog(self.slots, self.lock, options, alarm=self._alarm,
                                 tend=self._tend)
        self.dispatch = Dispatcher(slots=self.slots, options=options, serial=self.serial,
                                   batch=self.batch, done_handle=self.done_handle,
                                   wake=self.done_sem.release, lock=self.lock,
                                   watchdog=self.watchdog)

    def record_latency(self, slots: list[Slot]) -> None:
        for slot in slots:
            slot.record_latency()

    def health(self) -> list[dict]:
        out = [slot.health() for slot in self.slots]
        return out + self.spares.health() if self.spares is not None else out

    def fill_spares(self, now: bool = False) -> None:
        """Start the spares that are missing: ``now`` in this thread (after construction,
        the workers' builds first), else in the background, once the call that adopted
        one has returned (:meth:`call_returned`): a fork holds the GIL for milliseconds
        (4-5 of a 13 ms recovery, measured), whichever thread makes it."""
        if self.spares is None or self.closing:
            return
        if now:
            self.spares.fill()
        elif self.spares_due is None:
            self.spares_due = time.monotonic()

    def call_returned(self) -> None:
        """A call that waited for workers returned: spares due start now, in the watchdog's
        thread (a call that is not followed by this one delays them at most SPARES_DUE_S)."""
        if self.spares_due is not None:
            self.spares_due = None
            self.watchdog.poke()

    def retry_spares(self) -> None:
        """A reset: spares stopped by their failure budget are tried again."""
        if self.spares is not None and self.spares.retry():
            self.watchdog.poke()

    def _alarm(self) -> None:
        """The watchdog flagged a slot: a sleeping wait returns to look at it (and readers
        outside the job see the slot being replaced)."""
        self.dispatch.alarm()
        for slot in self.slots:
            if slot.failure is not None and not self.closing:
                slot.publish()

    # -- processes -------------------------------------------------------------------
    def worker_spec(self, slot: Slot, start_seq: int,
                    pending_seeds: tuple | None = None) -> WorkerSpec:
        """What a process started in ``slot`` needs (a spare gets the same, less what it
        knows already: fastvec/spares.py)."""
        opts = self.options
        return WorkerSpec(
            worker_index=slot.index, env_indices=slot.env_indices,
            env_fns=slot.env_fns, plan=self.plan, main_name=self.main.name,
            payload_name=slot.payload.name, req_sem_name=slot.req_sem_name,
            done_sem_name=self.done_sem_name,
            autoreset_mode=opts.autoreset_mode.value, owner_pid=os.getpid(),
            generation=slot.generation, start_seq=start_seq,
            heartbeat_ms=max(1, int(opts.heartbeat_interval * 1000)),
            max_payload_bytes=opts.max_payload_bytes, single_spaces=self.single_spaces,
            # the window; whether to spin at all comes with each request (REQ_NO_SPIN)
            spin_ns=opts.spin_ns(2), pending_seeds=pending_seeds,
            observation_mode=self.observation_mode, report_starts=opts.resuming,
            snapshot_every=opts.snapshot_every,
            parent_death_signal=threading.current_thread() is threading.main_thread())

    def start_process(self, slot: Slot, pending_seeds: tuple | None = None,
                      spare: bool = True) -> None:
        """Re-initialise the slot's control block and semaphore and start a process in it,
        or hand the slot to a spare (``spare``: when there is one; fastvec/spares.py).

        Returns once the process exists; :meth:`await_ready` waits for its envs. Raises
        whatever starting it raised (fork failing with ENOMEM, no fds left, ...), leaving
        the slot without a process and marked failed.
        """
        opts = self.options
        with self.lock:
            try:
                self.dispatch.forget_step_path()  # a new semaphore: new C arrays
                if slot.req_sem is not None:
                    slot.req_sem.close()
                    slot.req_handle.close()
                    self.names.forget_semaphore(slot.req_sem_name)
                    slot.req_sem = slot.req_handle = None
                # a fresh unguessable name: one another user made first is retried, not failed
                slot.req_sem = self.names.new_semaphore(f"r{slot.index}")
                slot.req_sem_name = slot.req_sem.name
                slot.req_handle = _ring.SemHandle(slot.req_sem_name)
                start_seq = self.dispatch.next_seq()
                slot.new_generation()
                slot.ctl.init(slot.index, slot.generation, os.getpid(), start_seq - 1)
                slot.expected = start_seq
                slot.failure = None
                spec = self.worker_spec(slot, start_seq, pending_seeds)
                proc = None
                taken = self.spares.take() if spare and self.spares is not None else None
                if taken is not None:
                    self.fill_spares()  # its successor: once this call has returned
                    proc = self.spares.adopt(taken, spec)
                if self.serial:
                    proc = InProcess(spec)
                elif proc is None:
                    proc = self.ctx.Process(target=worker_main, args=(spec,),
                                            daemon=opts.daemon,
                                            name=f"fastvec-worker-{slot.index}")
                    proc.start()
            except BaseException as exc:
                slot.failure = Failure("start", f"could not start a worker process: "
                                       f"{type(exc).__name__}: {exc}", cause=exc)
                raise
            slot.process = proc
            slot.ready = slot.replayed = False  # a new process: "resumed" once it replays
            slot.publish()
            self.watchdog.watch(slot)
        self.watchdog.poke()

    def await_ready(self, slots: list[Slot]) -> dict[Slot, Failure]:
        """Wait, at most ``start_timeout``, for freshly started slots to build their envs.

        Returns the failures by slot: a process that died or raised while building, or
        did not finish within ``start_timeout`` (building never counts against
        ``step_timeout``)."""
        timeout = self.options.start_timeout
        deadline = time.monotonic() + timeout
        out: dict[Slot, Failure] = {}
        for slot in slots:
            try:
                failed = self.dispatch.wait([slot], max(0.0, deadline - time.monotonic()))
            except WaitTimeout:
                out[slot] = Failure("start", f"did not build its envs within "
                                    f"start_timeout={timeout} s", seq=slot.expected)
                continue
            if failed:
                out[slot] = self.dispatch.failure_of(slot, "start")
            else:
                slot.ready = True
                slot.publish()
        return out

    def kill_slot(self, slot: Slot) -> None:
        """SIGKILL the slot's process (a failed one: nothing of it is worth keeping)."""
        with self.lock:
            proc, slot.process = slot.process, None
        if not self.closing:
            slot.publish()
        if proc is not None:
            self._kill(proc)

    def retire_slot(self, slot: Slot) -> None:
        """Planned recycling: ask the worker to close its envs and exit (SIGUSR1), without
        waiting; the watchdog reaps it, with SIGKILL after ``recycle_grace``."""
        if self.serial:
            self.kill_slot(slot)  # closes its envs, in this process
            return
        with self.lock:
            proc, slot.process = slot.process, None
            if proc is None:
                return
            slot.publish()
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            self.retiring.append((proc, time.monotonic() + self.options.recycle_grace))
        self.watchdog.poke()

    def _publish_spares(self, wanted: int, ready: int) -> None:
        try:
            stats.publish_spares(self.main.mm, wanted, ready)
        except (ValueError, TypeError):  # the segment is closed: the env is
            pass

    def _tend(self) -> list:
        """The watchdog's turn on everything that is not a slot: recycled workers still
        closing, and the spares; returns what its wait should wake on too."""
        extra = self._reap_retiring()
        if self.spares is not None:
            due = self.spares_due
            if not self.closing and (due is None or time.monotonic() - due > SPARES_DUE_S):
                self.spares_due = None
                self.spares.fill()
            extra += self.spares.tend()
        return extra

    def _reap_retiring(self) -> list:
        """Join recycled workers that exited, SIGKILL those past recycle_grace; returns
        the sentinels of those still closing (the watchdog's thread waits on them too)."""
        now = time.monotonic()
        with self.lock:
            keep = []
            for proc, deadline in self.retiring:
                proc.join(0)
                if proc.exitcode is not None:
                    proc.close()
                elif now >= deadline:
                    log.warning("recycled worker (pid %d) did not exit within recycle_grace="
                                "%s s after closing its envs: SIGKILL", proc.pid,
                                self.options.recycle_grace)
                    self._kill(proc)
                else:
                    keep.append((proc, deadline))
            self.retiring = keep
            return [proc.sentinel for proc, _ in keep]

    def _kill(self, proc) -> None:
        if isinstance(proc, InProcess):
            proc.close()
            return
        if not sigkill(proc):  # not yet gone (uninterruptible sleep): reap it at shutdown
            log.error("worker process %d survived SIGKILL for 5 s", proc.pid)
            self.zombies.append(proc)

    # -- the watchdog ------------------------------------------------------------------
    def start_watchdog(self) -> None:
        if not self.serial:  # in serial mode nothing runs outside this thread
            self.watchdog.start()

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self, timeout: float | None, terminate: bool) -> None:
        """Ask, then terminate, then kill, then join: at most ``timeout`` (default 5 s) for
        the workers to close their envs, then about 1 s more per stage."""
        self.closing = True
        if self.spares is not None:  # before the watchdog's thread, which started some
            self.spares.close(None if timeout is None else min(timeout, 1.0))
        self.watchdog.stop()
        live = [s for s in self.slots if s.process is not None and s.process.exitcode is None
                and not self.serial]
        if not terminate:
            asked = []
            for slot in live:
                if slot.failure is None and slot.done:
                    try:
                        self.dispatch.request(slot, _ring.OP_CLOSE, 0)
                        asked.append(slot)
                    except (RingError, posix_ipc.Error):
                        pass
            deadline = time.monotonic() + (5.0 if timeout is None else timeout)
            for slot in asked:
                slot.process.join(max(0.0, deadline - time.monotonic()))
        for slot in live:
            if slot.process.exitcode is None:
                slot.process.terminate()
        deadline = time.monotonic() + 1.0
        for slot in live:
            slot.process.join(max(0.0, deadline - time.monotonic()))
        for slot in self.slots:
            self.kill_slot(slot)
        for proc, _ in self.retiring:
            self._kill(proc)
        self.retiring = []
        for proc in self.zombies:
            proc.join(5.0)
            if proc.exitcode is not None:
                proc.close()
        for slot in self.slots:
            if slot.req_sem is not None:
                slot.req_sem.close()
                slot.req_handle.close()
                slot.req_sem = slot.req_handle = None
            slot.ctl.release()
            slot.payload.close()
        self.batch.release()
        self.dispatch.forget_step_path()  # its pointers go with the semaphores
        self.done_handle.close()
        self.done_sem.close()
