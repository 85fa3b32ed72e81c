"""Requests to the workers and the waits for their replies, by sequence number.

Every request carries the next number of one counter (``seq``); a slot expects the reply to
its latest request (``Slot.expected``) and a reply is the worker setting ``resp_seq`` to
it, so a late reply of a replaced worker never passes for a new one. The done semaphore
is a wake-up hint, never the truth. Three ways to send:

- :meth:`Dispatcher.request`: one slot, outside any batch (start, close, a first-ready env);
- :meth:`Dispatcher.send`: a counted batch, the last worker to answer posts done once;
- :meth:`Dispatcher.send_all`: the step path, every slot in one C call (``_ring.StepPath``),
  and :meth:`Dispatcher.wait_all` for its replies in one C call (spin, then sleep).

Every wait has a bound: it looks at the watchdog's findings at least once a second and
gives up at once when another thread closes the env (:meth:`Dispatcher.interrupt`).
The processes behind the slots and the semaphores are the supervisor's
(fastvec/supervisor.py); this module only numbers, sends and waits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastvec import _ring
from fastvec.errors import ClosedEnvError, WaitTimeout
from fastvec.failures import Failure
from fastvec.options import Options
from fastvec.shm import get_pickle
from fastvec.watchdog import Watchdog

if TYPE_CHECKING:  # pragma: no cover
    from fastvec.supervisor import Slot

__all__ = ["Dispatcher", "get_error"]

_SLICE = 1.0  # the step path's longest sleep in C before it looks at the watchdog
_SPIN_RECHECK = 256  # batches between two looks at the cores in reach (Options.spin_ns)
_FAILED_POLL = 0.002  # once a worker failed, the batch counter never completes: poll


class Dispatcher:
    """Numbers, sends and waits for the requests of ``slots``.

    ``lock`` is the supervisor's (the watchdog flags slots under it); ``wake()`` posts the
    done semaphore that ``done_handle`` waits on; ``watchdog`` is asked whether it still
    runs while a wait goes on. ``serial``: the workers run in this process, and a request
    is served at once.
    """

    def __init__(self, *, slots: list[Slot], options: Options, serial: bool, batch: _ring.Batch,
                 done_handle: _ring.SemHandle, wake: Callable[[], None],
                 lock: threading.RLock, watchdog: Watchdog):
        self.slots = slots
        self.options = options
        self.serial = serial
        self.batch = batch
        self.done_handle = done_handle
        self.wake = wake
        self.lock = lock
        self.watchdog = watchdog
        self.seq = 0
        self.epoch = 0
        self.spin_ns = options.spin_ns(len(os.sched_getaffinity(0)))
        self.closing = False  # close() began: waits of other threads give up
        self._step_path: _ring.StepPath | None = None
        self._batches = 0  # send_all calls, to look at the cores again now and then

    # -- sequence numbers and requests ---------------------------------------------
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def request(self, slot: Slot, op: int, ring: int, payload_len: int = 0,
                mask: int | None = None) -> None:
        """One request outside any batch: the worker posts done when it answers."""
        seq = self.next_seq()
        slot.expected = seq
        slot.ctl.request(seq, op, ring, payload_len, slot.env_mask() if mask is None else mask)
        slot.req_handle.post()
        if self.serial and slot.process is not None:
            slot.process.serve_one()

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

    # -- the step path -------------------------------------------------------------
    def forget_step_path(self) -> None:
        """A slot got a new request semaphore (or all are closing): the C arrays of the
        step path point at the old ones, rebuild them before the next step."""
        self._step_path = None

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

    # -- alarms ----------------------------------------------------------------------
    def alarm(self) -> None:
        """A slot was flagged (or the env is closing): a sleeping wait returns to look."""
        path = self._step_path
        if path is not None:
            path.raise_alarm()
        self.wake()

    def alarm_raised(self) -> bool:
        """Whether the step path's next wait will go straight to the failures."""
        return self._step_path is not None and self._step_path.alarm_raised

    def interrupt(self) -> None:
        """close() from another thread: every wait in progress returns at once (its call
        raises ClosedEnvError) before the memory it reads goes."""
        self.closing = True
        self.alarm()

    def _check_open(self) -> None:
        if self.closing:
            raise ClosedEnvError("the FastVectorEnv was closed (by another thread) while this "
                                 "call waited for its workers")

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

    def _answered(self, slot: Slot) -> bool:
        """Whether the slot's reply is in; a verdict it voids goes."""
        if slot.ctl.resp_seq != slot.expected:
            return False
        self._settle(slot)
        return True

    def _pause(self, deadline: float | None, poll: float) -> bool:
        """Sleep on the done semaphore until a post, ``poll`` or ``deadline``, after making
        sure the watchdog still runs and the env is still open; False: the time is up."""
        self.watchdog.check_alive()
        self._check_open()
        wait = poll
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return False
            wait = min(wait, poll)
        self.done_handle.acquire(wait)  # a signal handler's exception propagates from here
        return True

    def wait(self, slots: list[Slot], timeout: float | None, spin: bool = True) -> list[Slot]:
        """Wait until every slot answered its expected seq or failed; returns the failed ones.

        Raises WaitTimeout when ``timeout`` runs out first; the requests stay pending.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        path = self._step_path
        if path is not None:
            path.clear_alarm()  # every failure of these slots is looked at below
        try:
            return self._wait(slots, deadline, timeout, self.spin_ns if spin else 0)
        finally:
            # A failure outside these slots (a masked reset, a call that skipped a slot)
            # is still unseen: keep the alarm up, or the next step sleeps a whole slice.
            if path is not None and path is self._step_path and any(
                    s.failure is not None for s in self.slots if s not in slots):
                path.raise_alarm()

    def _wait(self, slots, deadline, timeout, spin) -> list[Slot]:
        self._check_open()
        for slot in self.slots:
            self._settle(slot)  # verdicts a later reply voided
        self._drain()
        failed = []
        poll = _FAILED_POLL if any(s.failure is not None for s in slots) else 1.0
        for slot in slots:
            if spin:
                slot.ctl.spin_resp_until(slot.expected, spin)
            while True:
                if self._answered(slot):
                    if slot.ctl.status != _ring.ST_OK:
                        failed.append(slot)
                    break
                if slot.failure is not None:
                    failed.append(slot)
                    poll = _FAILED_POLL
                    break
                if not self._pause(deadline, poll):
                    raise WaitTimeout(f"no reply from worker {slot.index} "
                                      f"(envs {list(slot.env_indices)}) within {timeout} s")
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
                if self._answered(s):
                    ok = s.ctl.status in (_ring.ST_OK, _ring.ST_MISMATCH)
                    (ready if ok else failed).append(s)
                elif s.failure is not None:
                    failed.append(s)
            if len(ready) + len(failed) >= count:
                return ready, failed
            if not self._pause(deadline, 1.0):
                raise WaitTimeout(f"fewer than {count} of {len(slots)} envs answered within "
                                  f"{timeout} s")

    # -- what a reply says -------------------------------------------------------------
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


def get_error(slot: Slot):
    """The (exception or None, traceback text) a worker put in its side buffer."""
    return get_pickle(slot.payload, slot.ctl.resp_payload_len)
