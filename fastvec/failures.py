"""What went wrong with one worker: the record every part of the parent passes around."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

from fastvec import _ring

# Why a worker is replaced. The watchdog finds "died", "frozen" and "hung"; a reply says
# "exception" or "mismatch"; starting says "start"; recycling is planned ("recycle").
JUDGED = ("hung", "frozen")  # verdicts about one request: a reply to it voids them


@dataclass
class Failure:
    """What went wrong with one worker, as seen by the parent."""

    reason: str  # "died", "frozen", "hung", "exception", "start", "mismatch", "recycle"
    detail: str
    exitcode: int | None = None
    remote: tuple | None = None  # (exception or None, formatted traceback) from the worker
    cause: BaseException | None = None  # a local exception (fork failed, ...)
    seq: int = 0  # the request it is about; a "hung"/"frozen" verdict dies with its reply
    when: float = field(default_factory=time.time)

    def answered_by(self, resp_seq: int) -> bool:
        """Whether a reply numbered ``resp_seq`` voids this finding: the worker answered
        the request it was judged on (or a later one), so it was neither hung nor frozen
        then. A death stays: the process is gone either way."""
        return self.reason in JUDGED and resp_seq >= self.seq > 0

    def text(self) -> str:
        return f"{self.reason}: {self.detail}"


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


def sigkill(proc, wait: float = 5.0) -> bool:
    """SIGKILL a multiprocessing Process (unless it exited) and reap it within ``wait``
    seconds; False when it is still there (uninterruptible sleep): the caller keeps it."""
    if proc.exitcode is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.join(wait)
    if proc.exitcode is None:
        return False
    proc.close()
    return True
