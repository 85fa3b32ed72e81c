"""The parent side of the worker processes: start, watch, wait, replace, health.

    FastVectorEnv ──request(seq, op)──▶ Slot.ctl ──post req_sem──▶ worker
         ▲                                                          │
         └── wait: done_sem + resp_seq == seq ◀──post done_sem──────┘
                           ▲
    watchdog thread ───────┘  sentinels (death, as an event), heartbeat counters (frozen),
                              busy_since_ns (hung in a step); a finding marks the slot and
                              posts done_sem so the waiting parent wakes at once.

A failed slot is dirty: its process is killed, its control block re-initialised and its
request semaphore recreated under a new name before a new process starts in it.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import posix_ipc

from fastvec import _ring
from fastvec.errors import RestartBudgetExceeded, RingError, WaitTimeout
from fastvec.shm import Names, Segment, create_semaphore, unlink_semaphore
from fastvec.worker import WorkerSpec, worker_main

log = logging.getLogger("fastvec")

_LATENCY_WINDOW = 512


@dataclass
class Failure:
    reason: str  # "died", "frozen", "hung", "exception", "start"
    detail: str
    exitcode: int | None = None
    remote: tuple | None = None  # (exception or None, formatted traceback)
    when: float = field(default_factory=time.time)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {"SIGKILL": " (sent by a user or by the kernel's OOM killer)",
                "SIGSEGV": " (segmentation fault in native code)",
                "SIGBUS": " (bus error; is /dev/shm full?)",
                "SIGABRT": " (aborted)"}.get(name, "")
        return f"killed by {name}{hint}"
    if exitcode == _ring.EXIT_ORPHANED:
        return "exited: its parent disappeared"
    return f"exited with code {exitcode}"


class Slot:
    """One worker slot: a control block, a request semaphore, a side buffer, a process."""

    process = None
    req_sem = None
    req_sem_name = None
    failure: Failure | None = None
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
        self.reasons: collections.Counter = collections.Counter()
        self.last_failure: Failure | None = None
        self.started_at = 0.0
        self.hb_value = -1
        self.hb_time = 0.0
        self.recycles = 0

    @property
    def done(self) -> bool:
        return self.ctl.resp_seq == self.expected

    def env_mask(self) -> int:
        return (1 << len(self.env_indices)) - 1


class Supervisor:
    def __init__(self, *, ctx, prefix: str, names: Names, main: Segment, plan, slots_envs: list,
                 env_fns: list, autoreset_mode: str, single_spaces: tuple,
                 heartbeat_interval: float, heartbeat_timeout: float, step_timeout: float | None,
                 start_timeout: float, max_restarts: int, restart_window: float,
                 max_payload_bytes: int, spin_us: float = 0.0, daemon: bool = True):
        self.ctx = ctx
        self.prefix = prefix
        self.names = names
        self.main = main
        self.plan = plan
        self.autoreset_mode = autoreset_mode
        self.single_spaces = single_spaces
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.step_timeout = step_timeout
        self.start_timeout = start_timeout
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.max_payload_bytes = max_payload_bytes
        self.daemon = daemon
        self.spin_ns = int(spin_us * 1000)
        self.seq = 0
        self.lock = threading.RLock()
        self.slots: list[Slot] = []
        self.done_sem_name = prefix + "done"
        self.done_sem = create_semaphore(self.done_sem_name)
        names.track_semaphore(self.done_sem_name)
        self.batch = _ring.Batch(main.mm, plan.batch_offset)
        self.latency = np.zeros((len(slots_envs), _LATENCY_WINDOW), np.int64)
        self.latency_count = 0
        for w, env_indices in enumerate(slots_envs):
            pname = f"{prefix}p{w}"
            names.track_segment(pname)
            payload = Segment(pname, 64 * 1024, create=True)
            ctl = _ring.Ctl(main.mm, w * _ring.CTL_SIZE)
            self.slots.append(Slot(w, tuple(env_indices), [env_fns[i] for i in env_indices],
                                   payload, ctl))
        self.zombies: list = []
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    # -- sequence numbers and requests ---------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, slot: Slot, op: int, ring: int, payload_len: int = 0, mask: int | None = None):
        """One request outside any batch: the worker posts done when it answers."""
        seq = self.next_seq()
        slot.expected = seq
        slot.ctl.request(seq, op, ring, payload_len, slot.env_mask() if mask is None else mask)
        slot.req_sem.release()

    def send(self, items: list) -> None:
        """A batch of requests ``(slot, op, ring, payload_len, mask or None)``; the last
        worker to answer posts done, so the parent wakes once for the whole batch."""
        self.batch.arm(len(items))
        for slot, op, ring, payload_len, mask in items:
            seq = self.next_seq()
            slot.expected = seq
            slot.ctl.request(seq, op, ring, payload_len,
                             slot.env_mask() if mask is None else mask, _ring.REQ_COUNTED)
        for item in items:
            item[0].req_sem.release()

    # -- processes -------------------------------------------------------------------
    def start_slot(self, slot: Slot, initial_reset: tuple | None = None) -> None:
        """(Re)initialise the slot's control block and semaphore, start a process in it."""
        with self.lock:
            if slot.req_sem is not None:
                slot.req_sem.close()
                unlink_semaphore(slot.req_sem_name)
                self.names.forget_semaphore(slot.req_sem_name)
            slot.req_sem_name = f"{self.prefix}r{slot.index}g{slot.generation}"
            self.names.track_semaphore(slot.req_sem_name)
            slot.req_sem = create_semaphore(slot.req_sem_name)
            start_seq = self.next_seq()
            slot.ctl.init(slot.index, slot.generation, os.getpid(), start_seq - 1)
            slot.expected = start_seq
            slot.failure = None
            spec = WorkerSpec(
                worker_index=slot.index, env_indices=slot.env_indices, env_fns=slot.env_fns,
                plan=self.plan, main_name=self.main.name, payload_name=slot.payload.name,
                req_sem_name=slot.req_sem_name, done_sem_name=self.done_sem_name,
                autoreset_mode=self.autoreset_mode, owner_pid=os.getpid(),
                generation=slot.generation, start_seq=start_seq,
                heartbeat_ms=max(1, int(self.heartbeat_interval * 1000)),
                max_payload_bytes=self.max_payload_bytes, single_spaces=self.single_spaces,
                initial_reset=initial_reset, spin_ns=self.spin_ns)
            proc = self.ctx.Process(target=worker_main, args=(spec,), daemon=self.daemon,
                                    name=f"fastvec-worker-{slot.index}")
            proc.start()
            slot.process = proc
            slot.started_at = time.monotonic()
            slot.hb_value, slot.hb_time = -1, slot.started_at
        self._poke()

    def kill_slot(self, slot: Slot, grace: float = 0.0) -> None:
        proc = slot.process
        if proc is None:
            return
        if grace > 0:
            proc.join(grace)
        if proc.exitcode is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join(5.0)
        if proc.exitcode is not None:
            proc.close()
        else:  # SIGKILLed but not yet gone (uninterruptible sleep): reap it at shutdown
            log.error("worker %d (pid %d) survived SIGKILL for 5 s", slot.index, proc.pid)
            self.zombies.append(proc)
        slot.process = None

    def replace(self, slot: Slot, failure: Failure, initial_reset: tuple | None,
                planned: bool = False) -> None:
        """Kill what is left of the slot's process and start a new one in the same slot.

        Raises RestartBudgetExceeded (after cleaning up) when the slot restarted too often.
        """
        with self.lock:
            self.kill_slot(slot, grace=1.0 if planned else 0.0)
            slot.generation += 1
            if planned:
                slot.recycles += 1
            else:
                now = time.monotonic()
                slot.restart_times.append(now)
                while slot.restart_times and now - slot.restart_times[0] > self.restart_window:
                    slot.restart_times.popleft()
                slot.restarts += 1
                slot.reasons[failure.reason] += 1
                slot.last_failure = failure
                if len(slot.restart_times) > self.max_restarts:
                    slot.failure = failure
                    raise RestartBudgetExceeded(
                        f"worker {slot.index} (envs {list(slot.env_indices)}) failed "
                        f"{len(slot.restart_times)} times within {self.restart_window:.0f} s, "
                        f"more than max_restarts={self.max_restarts}; last failure: "
                        f"{failure.reason}: {failure.detail}. This looks like a deterministic "
                        "bug in the env; fix it or raise max_restarts / restart_window.",
                        env_index=slot.env_indices[0], env_indices=slot.env_indices,
                        worker_index=slot.index, reason="budget", detail=failure.detail,
                        exitcode=failure.exitcode)
            self.start_slot(slot, initial_reset)

    # -- waiting ---------------------------------------------------------------------
    def wait(self, slots: list[Slot], timeout: float | None) -> list[Slot]:
        """Wait until every slot answered its expected seq or failed; returns the failed ones.

        Raises WaitTimeout when ``timeout`` runs out first; the requests stay pending.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        failed = []
        sem, spin = self.done_sem, self.spin_ns
        # A failed worker never pays its share of the batch counter, so once a failure is
        # seen the others' replies post nothing: poll in short slices from then on.
        poll = 1.0
        for slot in slots:
            if spin:
                slot.ctl.spin_resp(slot.expected - 1, spin)
            while slot.ctl.resp_seq != slot.expected:
                if slot.failure is not None:
                    failed.append(slot)
                    poll = 0.002
                    break
                if poll > 0.002 and any(s.failure is not None for s in slots):
                    poll = 0.002
                if deadline is None:
                    wait = poll
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        raise WaitTimeout(f"no reply from worker {slot.index} "
                                          f"(envs {list(slot.env_indices)}) within {timeout} s")
                    wait = min(wait, poll)
                try:
                    sem.acquire(wait)
                except posix_ipc.BusyError:
                    pass
                except posix_ipc.SignalError:
                    pass  # Python runs the handler (e.g. KeyboardInterrupt) at the next bytecode
            else:
                if slot.ctl.status != _ring.ST_OK:
                    failed.append(slot)
        if spin:  # drain posts that spinning overtook, so the count stays bounded
            for _ in range(len(slots)):
                try:
                    sem.acquire(0)
                except posix_ipc.BusyError:
                    break
        return failed

    def wait_any(self, slots: list[Slot], count: int, timeout: float | None):
        """Wait until at least ``count`` of ``slots`` answered or failed; returns the
        (answered, failed) lists. Raises WaitTimeout, leaving the requests pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready = [s for s in slots if s.ctl.resp_seq == s.expected]
            failed = [s for s in slots if s.failure is not None and s not in ready]
            failed += [s for s in ready if s.ctl.status != _ring.ST_OK
                       and s.ctl.status != _ring.ST_MISMATCH]
            ready = [s for s in ready if s not in failed]
            if len(ready) + len(failed) >= count:
                return ready, failed
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise WaitTimeout(f"fewer than {count} of {len(slots)} envs answered within "
                                  f"{timeout} s")
            try:
                self.done_sem.acquire(wait)
            except (posix_ipc.BusyError, posix_ipc.SignalError):
                pass

    def record_latency(self, slots: list[Slot]) -> None:
        col = self.latency_count % _LATENCY_WINDOW
        for slot in slots:
            self.latency[slot.index, col] = slot.ctl.last_request_ns
        self.latency_count += 1

    # -- the watchdog ------------------------------------------------------------------
    def start_watchdog(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="fastvec-watchdog", daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _flag(self, slot: Slot, generation: int, failure: Failure) -> None:
        with self.lock:
            if slot.generation != generation or slot.failure is not None:
                return
            slot.failure = failure
        log.debug("watchdog: worker %d %s: %s", slot.index, failure.reason, failure.detail)
        self.done_sem.release()

    def _watch(self) -> None:
        interval = min(0.25, self.heartbeat_timeout / 4,
                       (self.step_timeout or 1.0) / 4)
        interval = max(interval, 0.01)
        while not self._stop.is_set():
            with self.lock:
                watched = {s.process.sentinel: (s, s.generation)
                           for s in self.slots if s.process is not None and s.failure is None}
            try:
                ready = multiprocessing.connection.wait([*watched, self._wake_r], interval)
            except OSError:
                ready = []  # a sentinel closed under us by a replacement; look again
            if self._stop.is_set():
                return
            for r in ready:
                if r == self._wake_r:
                    os.read(self._wake_r, 4096)
                    continue
                slot, gen = watched[r]
                with self.lock:  # the main thread may be replacing this very process
                    if slot.generation != gen or slot.process is None:
                        continue
                    slot.process.join(0.05)  # reap it, so the exit status is known
                    code = slot.process.exitcode
                    self._flag(slot, gen, Failure("died", describe_exit(code), code))
            self._check_liveness()

    def _check_liveness(self) -> None:
        now = time.monotonic()
        now_ns = _ring.now_ns()
        for slot in self.slots:
            gen = slot.generation
            if slot.process is None or slot.failure is not None:
                continue
            hb = slot.ctl.heartbeat
            if hb != slot.hb_value:
                slot.hb_value, slot.hb_time = hb, now
                busy = slot.ctl.busy_since_ns
                if (self.step_timeout is not None and busy and slot.ctl.resp_seq != slot.expected
                        and slot.ctl.opcode in (_ring.OP_STEP, _ring.OP_RESET)
                        and (now_ns - busy) / 1e9 > self.step_timeout):
                    self._flag(slot, gen, Failure(
                        "hung", f"a {'step' if slot.ctl.opcode == _ring.OP_STEP else 'reset'} "
                        f"ran {(now_ns - busy) / 1e9:.1f} s > step_timeout={self.step_timeout} s "
                        "(heartbeat alive)"))
                continue
            limit = self.start_timeout if hb <= 0 else self.heartbeat_timeout
            if now - slot.hb_time > limit:
                what = ("never started its heartbeat" if hb <= 0 else
                        f"heartbeat stopped for {now - slot.hb_time:.1f} s > "
                        f"heartbeat_timeout={self.heartbeat_timeout} s (stopped or frozen)")
                self._flag(slot, gen, Failure("frozen", what))

    # -- health ------------------------------------------------------------------------
    def health(self) -> list[dict]:
        n = min(self.latency_count, _LATENCY_WINDOW)
        out = []
        for slot in self.slots:
            lat = self.latency[slot.index, :n] / 1e6
            lf = slot.last_failure
            proc = slot.process
            out.append({
                "worker": slot.index,
                "envs": list(slot.env_indices),
                "pid": proc.pid if proc is not None else None,
                "alive": bool(proc is not None and proc.exitcode is None),
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
        """Ask, then terminate, then kill, then join."""
        self._stop.set()
        self._poke()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        live = [s for s in self.slots if s.process is not None and s.process.exitcode is None]
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
        for slot in live:
            slot.process.join(1.0)
        for slot in self.slots:
            self.kill_slot(slot)
        for proc in self.zombies:
            proc.join(5.0)
            if proc.exitcode is not None:
                proc.close()
        for slot in self.slots:
            if slot.req_sem is not None:
                slot.req_sem.close()
                slot.req_sem = None
            slot.ctl.release()
            slot.payload.close()
        self.batch.release()
        self.done_sem.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
