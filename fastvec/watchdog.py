"""The watchdog: one thread that tells dead, frozen and hung workers apart.

    worker process ── sentinel (death is an event) ──────────┐
    worker's C heartbeat thread ── heartbeat counter ────────┤
    worker's request loop ── busy_since_ns, resp_seq ────────┤
                                                             ▼
                  Watchdog thread: judge a slot's request (under the supervisor's lock)
                        │  a verdict names the request it judged (Failure.seq)
                        ▼
                  flag: only if that request is still the slot's and still unanswered;
                  then raise the step path's alarm and post the done semaphore, so the
                  parent's wait wakes at once and looks at the slot

A verdict about a request ("hung", "frozen") dies with that request's reply
(:meth:`fastvec.failures.Failure.answered_by`): a worker that answered after all is
healthy, whatever the watchdog concluded a moment before. A death stays.

How long a request may run (``step_timeout``): a number is a fixed bound; ``"auto"``
learns it from the worker's own completed requests, :meth:`Options.hang_bound`; ``None``
never judges a worker hung (a frozen heartbeat still counts).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from fastvec import _ring
from fastvec.errors import FastVecError
from fastvec.failures import Failure, describe_exit
from fastvec.options import Options

if TYPE_CHECKING:  # pragma: no cover
    from fastvec.supervisor import Slot

log = logging.getLogger("fastvec")

_OP_NAMES = {_ring.OP_STEP: "step", _ring.OP_RESET: "reset", _ring.OP_CALL: "call",
             _ring.OP_SET_ATTR: "set_attr", _ring.OP_REPLAY: "replay"}


@dataclass
class Pulse:
    """What the watchdog remembers of one slot's process between two looks."""

    heartbeat: int = -1  # the counter at the last change
    since: float = 0.0  # monotonic time of that change (or of the start)
    slowest_ns: int = 0  # the slowest completed request seen (learns "auto" bounds)
    running_seq: int = 0  # a request seen running, and for how long, until it completes
    running_ns: int = 0
    replay_s: float | None = None  # the budget of the replay the slot was sent last


class Watchdog:
    """Watches the slots' processes from a thread of its own.

    ``slots`` and ``lock`` are the supervisor's (it replaces processes under the same
    lock); ``alarm()`` wakes the parent's wait after a verdict; ``tend()`` runs on every
    pass (reaping retiring processes) and returns more sentinels to wait on.
    """

    # Test seam: called with (slot, verdict) after judging and before flagging, outside
    # the lock, so a test can force the reply to land in between.
    on_judged: Callable[["Slot", Failure], None] | None = None

    def __init__(self, slots: list["Slot"], lock: threading.RLock, options: Options,
                 alarm: Callable[[], None], tend: Callable[[], list]):
        self.slots = slots
        self.lock = lock
        self.options = options
        self._alarm = alarm
        self._tend = tend
        self._pulses = [Pulse() for _ in slots]
        self.passes = 0  # completed looks, for tests that wait for one
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        opts = options
        fixed = opts.step_timeout if isinstance(opts.step_timeout, (int, float)) else 1.0
        self.interval = max(0.01, min(0.25, opts.heartbeat_timeout / 4, fixed / 4))

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fastvec-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.poke()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1

    def poke(self) -> None:
        """Look again now (a process was started or retired)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def check_alive(self) -> None:
        t = self._thread
        if t is not None and not t.is_alive() and not self._stop.is_set():
            raise FastVecError("fastvec's watchdog thread stopped, so failed workers can no "
                               "longer be detected; close this env and build a new one (and "
                               "report the log's traceback as a fastvec bug)")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def watch(self, slot: "Slot") -> None:
        """A new process in ``slot``: its heartbeat is judged against start_timeout until
        it first beats. What was learned of the slot's requests stays."""
        p = self._pulses[slot.index]
        p.heartbeat, p.since, p.running_seq, p.running_ns = -1, time.monotonic(), 0, 0

    def pulse(self, slot: "Slot") -> Pulse:
        return self._pulses[slot.index]

    def hang_bound(self, slot: "Slot") -> float | None:
        """Seconds a request of this slot may run before the worker counts as hung."""
        return self.options.hang_bound(self._pulses[slot.index].slowest_ns)

    def replay_budget(self, slot: "Slot", steps: int) -> float | None:
        """Seconds a replay of ``steps`` steps may take (None: no limit): one hang bound,
        plus twice the slowest request the slot completed for each step; noted, so that
        the replay is judged hung only past it (and one more bound)."""
        p = self._pulses[slot.index]
        bound = self.options.hang_bound(p.slowest_ns)
        p.replay_s = None if bound is None else bound + 2 * steps * p.slowest_ns / 1e9
        return p.replay_s

    # -- the thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.look(self.interval)
            except Exception:  # noqa: BLE001 - the watchdog must outlive its own bugs
                log.exception("fastvec watchdog: unexpected error (continuing)")
                self._stop.wait(self.interval)

    def look(self, timeout: float) -> None:
        """One pass: wait up to ``timeout`` for a death or a poke, then judge every slot."""
        with self.lock:
            watched = {s.process.sentinel: (s, s.generation)
                       for s in self.slots if s.process is not None and s.failure is None}
        extra = self._tend()
        try:
            ready = multiprocessing.connection.wait([*watched, *extra, self._wake_r], timeout)
        except (OSError, ValueError):
            ready = []  # a sentinel closed under us by a replacement; look again
        if self._stop.is_set():
            return
        for r in ready:
            if r == self._wake_r:
                os.read(self._wake_r, 4096)
            elif r in watched:
                self._died(*watched[r])
        self._tend()
        now, now_ns = time.monotonic(), _ring.now_ns()
        for slot in self.slots:
            verdict = self.judge(slot, now, now_ns)
            if verdict is not None:
                if self.on_judged is not None:
                    self.on_judged(slot, verdict)
                self.flag(slot, verdict)
        self.passes += 1

    def _died(self, slot: "Slot", generation: int) -> None:
        with self.lock:  # the main thread may be replacing this very process
            if slot.generation != generation or slot.process is None:
                return
            slot.process.join(0.05)  # reap it, so the exit status is known
            code = slot.process.exitcode
            verdict = Failure("died", describe_exit(code), code, seq=slot.expected)
        self.flag(slot, verdict, generation)

    def judge(self, slot: "Slot", now: float, now_ns: int) -> Failure | None:
        """A verdict about the slot's current request, or None. Reads the slot under the
        lock, so the request judged and the state read belong together."""
        with self.lock:
            if slot.process is None or slot.failure is not None:
                return None
            ctl, p = slot.ctl, self._pulses[slot.index]
            seq, resp = slot.expected, ctl.resp_seq
            if p.running_seq and resp >= p.running_seq:  # finished: it took at least that
                p.slowest_ns = max(p.slowest_ns, p.running_ns)
                p.running_seq = p.running_ns = 0
            p.slowest_ns = max(p.slowest_ns, ctl.last_request_ns)
            hb = ctl.heartbeat
            if hb != p.heartbeat:
                p.heartbeat, p.since = hb, now
                busy, op = ctl.busy_since_ns, ctl.opcode
                if not busy or resp == seq or op not in _OP_NAMES:
                    return None
                elapsed = now_ns - busy
                bound = self.options.hang_bound(p.slowest_ns)
                if op == _ring.OP_REPLAY:
                    # Many steps in one request: the worker gives up by itself after its
                    # budget (fastvec/resume.py); one more bound catches a step that hangs
                    # in it. Its duration teaches nothing about steps.
                    bound = None if bound is None else bound + (p.replay_s or bound)
                else:
                    p.running_ns = (elapsed if p.running_seq != seq
                                    else max(p.running_ns, elapsed))
                    p.running_seq = seq
                if bound is None or elapsed / 1e9 <= bound:
                    return None
                return Failure("hung", f"a {_OP_NAMES[op]} ran {elapsed / 1e9:.1f} s > "
                               f"{self.options.describe_hang_bound(bound)} (heartbeat alive)",
                               seq=seq)
            limit = self.options.start_timeout if hb <= 0 else self.options.heartbeat_timeout
            if now - p.since <= limit:
                return None
            what = ("never started its heartbeat" if hb <= 0 else
                    f"heartbeat stopped for {now - p.since:.1f} s > "
                    f"heartbeat_timeout={self.options.heartbeat_timeout} s (stopped or frozen)")
            # About the request in flight; an idle worker's verdict is about the next one.
            return Failure("frozen", what, seq=seq if resp != seq else seq + 1)

    def flag(self, slot: "Slot", verdict: Failure, generation: int | None = None) -> None:
        """Attach ``verdict`` to the slot if it still holds: same process, the request it
        judged still the slot's and still unanswered. Then wake the parent's wait."""
        with self.lock:
            if slot.failure is not None or slot.process is None:
                return
            if generation is not None and slot.generation != generation:
                return
            if verdict.reason != "died":
                expected = slot.expected
                if verdict.seq not in (expected, expected + 1):
                    return  # judged another request than the slot's current one
                if verdict.answered_by(slot.ctl.resp_seq):
                    return  # the reply came in between: the worker is fine
            slot.failure = verdict
        log.debug("watchdog: worker %d %s: %s", slot.index, verdict.reason, verdict.detail)
        self._alarm()
