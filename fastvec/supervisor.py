"""The parent side of the worker processes: start, watch, wait, kill or retire, health.

    FastVectorEnv ──request(seq, op)──▶ Slot.ctl ──post req_sem──▶ worker
         ▲                                                          │
         └── wait: done_sem + resp_seq == seq ◀──post done_sem──────┘
                           ▲
    watchdog thread ───────┘  sentinels (death, as an event), heartbeat counters (frozen),
                              busy_since_ns (hung in a step); a finding marks the slot and
                              posts done_sem so the waiting parent wakes at once.

A failed slot is dirty: its process is killed, its control block re-initialised and its
request semaphore recreated under a new name before a new process starts in it. Which
process to start and what it must do first is recovery's decision (fastvec/recovery.py);
this module only runs processes and tells how they are doing. Every wait here has a bound.
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

from fastvec import _ring
from fastvec.errors import ClosedEnvError, RingError, WaitTimeout
from fastvec.failures import Failure, describe_exit
from fastvec.options import Options
from fastvec.shm import Names, Segment, get_pickle
from fastvec.watchdog import Watchdog
from fastvec.worker import InProcess, WorkerSpec, worker_main

__all__ = ["Failure", "Slot", "Supervisor", "describe_exit", "get_error"]

log = logging.getLogger("fastvec")

_LATENCY_WINDOW = 512
_SLICE = 1.0  # the step path's longest sleep in C before it looks at the watchdog
_SPIN_RECHECK = 256  # batches between two looks at the cores in reach (Options.spin_ns)
_FAILED_POLL = 0.002  # once a worker failed, the batch counter never completes: poll


class Slot:
    """One worker slot: a control block, a request semaphore, a side buffer, a process."""

    process = None
    req_sem = None  # the request semaphore (posix_ipc: created here, unlinked at the end)
    req_sem_name = None
    req_handle: _ring.SemHandle | None = None  # a C handle on it: posts, and the step path
    failure: Failure | None = None  # set by the watchdog (or a failed start)
    disabled: Failure | None = None  # out of play: the restart budget ran out
    lost: Failure | None = None  # replaced outside a step: the next step reports it
    expected = 0  # seq of the request whose reply we wait for

    def __init__(self, index: int, env_indices: tuple, env_fns: list, payload: Segment,
                 ctl: _ring.Ctl):
        self.index = index
        self.env_indices = env_indices
        self.env_fns = env_fns
        self.payload = payload
        self.ctl = ctl
        self.generation = 0
        self.restart_times: collections.deque = collections.deque()
        self.restarts = 0
        self.recycles = 0
        self.reasons: collections.Counter = collections.Counter()
        self.last_failure: Failure | None = None
        self.latency = np.zeros(_LATENCY_WINDOW, np.int64)
        self.latency_count = 0

    @property
    def done(self) -> bool:
        return self.ctl.resp_seq == self.expected

    @property
    def serving(self) -> bool:
        """A process runs in the slot and nothing marks it failed or out of play."""
        return self.process is not None and self.failure is None and self.disabled is None

    def env_mask(self) -> int:
        return (1 << len(self.env_indices)) - 1


class Supervisor:
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
        self.seq = 0
        self.epoch = 0
        self.lock = threading.RLock()
        self.slots: list[Slot] = []
        self.retiring: list[tuple] = []  # (process, SIGKILL deadline) of recycled workers
        self.zombies: list = []
        self.done_sem = names.new_semaphore("done")
        self.done_sem_name = self.done_sem.name
        self.done_handle = _ring.SemHandle(self.done_sem_name)  # waits that let signals through
        self.batch = _ring.Batch(main.mm, plan.batch_offset)
        for w, env_indices in enumerate(slots_envs):
            payload = names.new_segment(f"p{w}", 64 * 1024)
            ctl = _ring.Ctl(main.mm, w * _ring.CTL_SIZE)
            self.slots.append(Slot(w, tuple(env_indices), [env_fns[i] for i in env_indices],
                                   payload, ctl))
        self._step_path: _ring.StepPath | None = None
        self.spin_ns = options.spin_ns(len(os.sched_getaffinity(0)))
        self._batches = 0  # send_all calls, to look at the cores again now and then
        self.closing = False  # close() began: waits of other threads give up
        self.watchdog = Watchdog(self.slots, self.lock, options, alarm=self._alarm,
                                 tend=self._reap_retiring)

    # -- sequence numbers and requests ---------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, slot: Slot, op: int, ring: int, payload_len: int = 0, mask: int | None = None):
        """One request outside any batch: the worker posts done when it answers."""
        seq = self.next_seq()
        slot.expected = seq
        slot.ctl.request(seq, op, ring, payload_len, slot.env_mask() if mask is None else mask)
        slot.req_handle.post()
        if self.serial and slot.process is not None:
            slot.process.serve_one()

    def _path(self) -> _ring.StepPath:
        """The C arrays of the step path, rebuilt whenever a slot got a new process."""
        if self._step_path is None:
            self._step_path = _ring.StepPath(self.batch, self.done_handle,
                                             [s.ctl for s in self.slots],
                                             [s.req_handle for s in self.slots],
                                             [s.env_mask() for s in self.slots])
            if any(s.failure is not None for s in self.slots):
                self._step_path.raise_alarm()  # flagged before this path existed
        return self._step_path

    def batchable(self) -> bool:
        """Whether the next step can go to every slot in one C call (no slot replaced
        since the last step, none disabled, workers in their own processes)."""
        return not (self.serial or any(s.lost is not None or s.disabled is not None
                                       for s in self.slots))

    def _spin_flags(self) -> int:
        return _ring.REQ_NO_SPIN if self.spin_ns == 0 else 0

    def cores_in_reach(self) -> int:
        """How many cores this process and its workers may run on together (their
        affinities, which a user or a benchmark may pin after construction)."""
        cpus = set(os.sched_getaffinity(0))
        for slot in self.slots:
            if slot.process is not None and slot.process.pid is not None:
                try:
                    cpus |= os.sched_getaffinity(slot.process.pid)
                except OSError:  # the worker just exited: the watchdog will say so
                    pass
        return len(cpus)

    def send_all(self, op: int, ring: int, writer=None, actions=None, h: int = 0) -> bool:
        """The step path: the same request to every slot, in one C call (fv_send_batch).
        With ``writer`` (a ``_parent.ActionWriter``) the same call first checks and stores
        ``actions``; False: it did not take them, nothing was sent. Every _SPIN_RECHECK
        batches the spin policy follows the cores in reach, and the workers follow the
        parent's (REQ_NO_SPIN)."""
        if self._batches % _SPIN_RECHECK == 0 and not self.serial:
            self.spin_ns = self.options.spin_ns(self.cores_in_reach())
        path = self._path()
        n = len(self.slots)
        epoch = (self.epoch + 1) & 0xFFFFFFFF
        first = self.seq + 1
        if writer is None:
            path.send_batch(epoch, first, op, ring, self._spin_flags())
        elif not writer.send(path, actions, h, epoch, first, op, ring, self._spin_flags()):
            return False  # declined (an invalid action): nothing sent, nothing expected
        # Only a request sent is expected (close() asks workers that owe nothing to close
        # their envs). The watchdog judges `expected`; a moment with the old value only
        # defers its look: the old request is answered, so nothing is judged hung.
        for slot, seq in zip(self.slots, range(first, first + n)):
            slot.expected = seq
        self._batches += 1
        self.epoch = epoch
        self.seq += n
        return True

    def wait_all(self, timeout: float | None) -> list[Slot]:
        """Wait for the replies to :meth:`send_all` in one C call: spin while that pays
        (see ``Options.spin_ns``), then sleep on the done semaphore. When every slot
        answered OK and none is flagged, return at once; else (a reply not OK, the
        watchdog's alarm, a second without replies) take :meth:`wait`'s careful path."""
        path = self._step_path
        if path is not None:
            if timeout is None:
                if path.wait_all(self.spin_ns, _SLICE) < 0:
                    return []
            else:
                t0 = time.monotonic()
                if path.wait_all(self.spin_ns, min(max(timeout, 0.0), _SLICE)) < 0:
                    return []
                timeout = max(0.0, timeout - (time.monotonic() - t0))
        return self.wait(self.slots, timeout, spin=False)  # spun already: sleep now

    def payload_replies(self) -> bool:
        """Whether a reply of the last :meth:`send_all` carries side-buffer bytes."""
        return self._step_path is None or self._step_path.first_payload() >= 0

    def send(self, items: list) -> None:
        """A batch of requests ``(slot, op, ring, payload_len, mask or None)``; the last
        worker to answer posts done, so the parent wakes once for the whole batch."""
        if not items:
            return
        self.epoch = (self.epoch + 1) & 0xFFFFFFFF
        self.batch.arm(len(items), self.epoch)
        for slot, op, ring, payload_len, mask in items:
            seq = self.next_seq()
            slot.expected = seq
            slot.ctl.request(seq, op, ring, payload_len,
                             slot.env_mask() if mask is None else mask,
                             _ring.REQ_COUNTED | self._spin_flags(), self.epoch)
        for item in items:
            item[0].req_handle.post()
        if self.serial:
            for item in items:
                if item[0].process is not None:
                    item[0].process.serve_one()

    # -- processes -------------------------------------------------------------------
    def start_process(self, slot: Slot, pending_seeds: tuple | None = None) -> None:
        """Re-initialise the slot's control block and semaphore and start a process in it.

        Returns once the process exists; :meth:`await_ready` waits for its envs. Raises
        whatever starting it raised (fork failing with ENOMEM, no fds left, ...), leaving
        the slot without a process and marked failed.
        """
        opts = self.options
        with self.lock:
            try:
                self._step_path = None  # a new semaphore: rebuild the C arrays
                if slot.req_sem is not None:
                    slot.req_sem.close()
                    slot.req_handle.close()
                    self.names.forget_semaphore(slot.req_sem_name)
                    slot.req_sem = slot.req_handle = None
                # a fresh unguessable name: one another user made first is retried, not failed
                slot.req_sem = self.names.new_semaphore(f"r{slot.index}")
                slot.req_sem_name = slot.req_sem.name
                slot.req_handle = _ring.SemHandle(slot.req_sem_name)
                start_seq = self.next_seq()
                slot.ctl.init(slot.index, slot.generation, os.getpid(), start_seq - 1)
                slot.expected = start_seq
                slot.failure = None
                spec = WorkerSpec(
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
                    observation_mode=self.observation_mode,
                    parent_death_signal=threading.current_thread() is threading.main_thread())
                if self.serial:
                    proc = InProcess(spec)
                else:
                    proc = self.ctx.Process(target=worker_main, args=(spec,),
                                            daemon=opts.daemon,
                                            name=f"fastvec-worker-{slot.index}")
                    proc.start()
            except BaseException as exc:
                slot.failure = Failure("start", f"could not start a worker process: "
                                       f"{type(exc).__name__}: {exc}", cause=exc)
                raise
            slot.process = proc
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
                failed = self.wait([slot], max(0.0, deadline - time.monotonic()))
            except WaitTimeout:
                out[slot] = Failure("start", f"did not build its envs within "
                                    f"start_timeout={timeout} s", seq=slot.expected)
                continue
            if failed:
                out[slot] = self.failure_of(slot, "start")
        return out

    def failure_of(self, slot: Slot, reason: str | None = None) -> Failure:
        """The failure of a slot that did not answer OK: the watchdog's finding, or the
        error its worker reported (read from the side buffer)."""
        if slot.failure is not None:
            return slot.failure
        try:
            exc, tb = get_error(slot)
        except Exception as read_err:  # noqa: BLE001 - report, never crash the parent
            exc, tb = None, f"(the worker's error could not be read: {read_err!r})"
        if slot.ctl.status == _ring.ST_MISMATCH:
            return Failure("mismatch", str(exc), remote=(exc, tb), seq=slot.expected)
        what = f"{type(exc).__name__}: {exc}" if exc is not None else tb.strip().splitlines()[-1]
        if reason == "start":
            what = f"its env_fn raised: {what}"
        return Failure(reason or "exception", what, remote=(exc, tb), seq=slot.expected)

    def kill_slot(self, slot: Slot) -> None:
        """SIGKILL the slot's process (a failed one: nothing of it is worth keeping)."""
        with self.lock:
            proc, slot.process = slot.process, None
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
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
            self.retiring.append((proc, time.monotonic() + self.options.recycle_grace))
        self.watchdog.poke()

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
        if proc.exitcode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join(5.0)
        if proc.exitcode is not None:
            proc.close()
        else:  # SIGKILLed but not yet gone (uninterruptible sleep): reap it at shutdown
            log.error("worker process %d survived SIGKILL for 5 s", proc.pid)
            self.zombies.append(proc)

    # -- waiting ---------------------------------------------------------------------
    def _drain(self) -> None:
        """Empty the done semaphore: it is a wake-up hint, resp_seq is the truth. Posts a
        previous wait did not need (it found the replies already there) go here, so the
        count stays bounded however the caller interleaves its own work."""
        self.done_handle.drain()

    def _settle(self, slot: Slot) -> None:
        """A reply arrived: a hung/frozen verdict about that request (or an earlier one)
        is void (the worker answered after all). A death stays."""
        f = slot.failure
        if f is not None and f.answered_by(slot.ctl.resp_seq):
            with self.lock:
                if slot.failure is f:
                    slot.failure = None

    def wait(self, slots: list[Slot], timeout: float | None, spin: bool = True) -> list[Slot]:
        """Wait until every slot answered its expected seq or failed; returns the failed ones.

        Raises WaitTimeout when ``timeout`` runs out first; the requests stay pending.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = []
        sem, spin = self.done_handle, self.spin_ns if spin else 0
        path = self._step_path
        if path is not None:
            path.clear_alarm()  # every failure of these slots is looked at below
        try:
            return self._wait(slots, deadline, timeout, failed, sem, spin)
        finally:
            # A failure outside these slots (a masked reset, a call that skipped a slot)
            # is still unseen: keep the alarm up, or the next step sleeps a whole slice.
            if path is not None and path is self._step_path and any(
                    s.failure is not None for s in self.slots if s not in slots):
                path.raise_alarm()

    def _wait(self, slots, deadline, timeout, failed, sem, spin) -> list[Slot]:
        self._check_open()
        for slot in self.slots:
            self._settle(slot)  # verdicts a later reply voided
        self._drain()
        poll = _FAILED_POLL if any(s.failure is not None for s in slots) else 1.0
        for slot in slots:
            if spin:
                slot.ctl.spin_resp_until(slot.expected, spin)
            while True:
                if slot.ctl.resp_seq == slot.expected:
                    self._settle(slot)
                    if slot.ctl.status != _ring.ST_OK:
                        failed.append(slot)
                    break
                if slot.failure is not None:
                    failed.append(slot)
                    poll = _FAILED_POLL
                    break
                self.watchdog.check_alive()
                self._check_open()
                wait = poll
                if deadline is not None:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise WaitTimeout(f"no reply from worker {slot.index} "
                                          f"(envs {list(slot.env_indices)}) within {timeout} s")
                    wait = min(wait, poll)
                sem.acquire(wait)  # a signal handler's exception propagates from here
                if poll > _FAILED_POLL and any(s.failure is not None for s in slots):
                    poll = _FAILED_POLL
        return failed

    def wait_any(self, slots: list[Slot], count: int, timeout: float | None):
        """Wait until at least ``count`` of ``slots`` answered or failed; returns the
        (answered, failed) lists. Raises WaitTimeout, leaving the requests pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._drain()
            ready, failed = [], []
            for s in slots:
                if s.ctl.resp_seq == s.expected:
                    self._settle(s)
                    st = s.ctl.status
                    (ready if st in (_ring.ST_OK, _ring.ST_MISMATCH) else failed).append(s)
                elif s.failure is not None:
                    failed.append(s)
            if len(ready) + len(failed) >= count:
                return ready, failed
            self.watchdog.check_alive()
            self._check_open()
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise WaitTimeout(f"fewer than {count} of {len(slots)} envs answered within "
                                  f"{timeout} s")
            self.done_handle.acquire(wait)

    def record_latency(self, slots: list[Slot]) -> None:
        for slot in slots:
            slot.latency[slot.latency_count % _LATENCY_WINDOW] = slot.ctl.last_request_ns
            slot.latency_count += 1

    # -- the watchdog ------------------------------------------------------------------
    def start_watchdog(self) -> None:
        if not self.serial:  # in serial mode nothing runs outside this thread
            self.watchdog.start()

    def interrupt(self) -> None:
        """close() from another thread: every wait in progress returns at once (its call
        raises ClosedEnvError) before the memory it reads goes."""
        self.closing = True
        self._alarm()

    def _check_open(self) -> None:
        if self.closing:
            raise ClosedEnvError("the FastVectorEnv was closed (by another thread) while this "
                                 "call waited for its workers")

    def alarm_raised(self) -> bool:
        """Whether the step path's next wait will go straight to the failures."""
        return self._step_path is not None and self._step_path.alarm_raised

    def _alarm(self) -> None:
        """The watchdog flagged a slot: a sleeping wait_all returns to look at it."""
        path = self._step_path
        if path is not None:
            path.raise_alarm()
        self.done_sem.release()

    # -- health ------------------------------------------------------------------------
    def health(self) -> list[dict]:
        out = []
        for slot in self.slots:
            n = min(slot.latency_count, _LATENCY_WINDOW)
            lat = slot.latency[:n] / 1e6
            lf = slot.last_failure
            proc = slot.process
            out.append({
                "worker": slot.index,
                "envs": list(slot.env_indices),
                "pid": proc.pid if proc is not None else None,
                "alive": bool(proc is not None and proc.exitcode is None),
                "disabled": slot.disabled is not None,
                "disabled_reason": (f"{slot.disabled.reason}: {slot.disabled.detail}"
                                    if slot.disabled else None),
                "generation": slot.generation,
                "restarts": slot.restarts,
                "recycles": slot.recycles,
                "reasons": dict(slot.reasons),
                "last_failure_time": lf.when if lf else None,
                "last_failure": f"{lf.reason}: {lf.detail}" if lf else None,
                "requests": int(slot.ctl.progress),
                "episodes": int(slot.ctl.episodes),
                "rss_bytes": int(slot.ctl.rss_bytes),
                "heartbeat": int(slot.ctl.heartbeat),
                "step_latency_ms": ({f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)}
                                    | {"max": float(lat.max()), "samples": int(n)}) if n else {},
            })
        return out

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self, timeout: float | None, terminate: bool) -> None:
        """Ask, then terminate, then kill, then join: at most ``timeout`` (default 5 s) for
        the workers to close their envs, then about 1 s more per stage."""
        self.watchdog.stop()
        live = [s for s in self.slots if s.process is not None and s.process.exitcode is None
                and not self.serial]
        if not terminate:
            asked = []
            for slot in live:
                if slot.failure is None and slot.done:
                    try:
                        self.request(slot, _ring.OP_CLOSE, 0)
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
        self._step_path = None  # its pointers go with the semaphores
        self.done_handle.close()
        self.done_sem.close()


def get_error(slot: Slot):
    """The (exception or None, traceback text) a worker put in its side buffer."""
    return get_pickle(slot.payload, slot.ctl.resp_payload_len)
