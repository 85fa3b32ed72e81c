"""This user's live FastVectorEnv instances, as readers outside the job see them (``fastvec
top``, ``fastvec export``): found through their locks in /dev/shm, their main segments
mapped read-only, their statistics copied without writing, waiting or taking a lock.

    /dev/shm/fv<pid>_<hex>_lock          flock'ed by the owner (and its forked workers) for
                                         the instance's life: live while someone holds it
    /dev/shm/fv<pid>_<hex>_main_<token>  the main segment: W control blocks first (their
                                         statistics lines, csrc/ring.h), the stats header
                                         last (fastvec/stats.py)

What shm.py's sweep skips is skipped here too: names that do not parse, another user's,
FIFOs, symlinks. An instance still being built (no main segment yet, or no magic in its
header) is left out until it is; one whose header this fastvec cannot read (another
layout version, no magic) is *refused*, with the reason.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time
from dataclasses import dataclass

from fastvec import shm, stats
from fastvec.errors import RingError, StatsLayoutError

_MAIN = "main_"


@dataclass(frozen=True)
class Refused:
    """A live instance whose statistics this fastvec cannot read, and why."""

    instance: str
    error: str


class NotReady(Exception):
    """The instance is being built, or closed between two looks: look again later."""


class Instance:
    """One live instance, its main segment mapped read-only; :meth:`close` unmaps it."""

    mm: mmap.mmap | None = None
    header: stats.Header | None = None

    def __init__(self, name: str, main_entry: str):
        self.name = name  # the bare prefix without its trailing "_": fv<pid>_<hex>
        self.main_entry = main_entry
        fd = shm.open_entry(main_entry)
        if fd is None:
            raise NotReady(main_entry)  # gone, or not a regular file of ours
        try:
            size = os.fstat(fd).st_size
            if size < stats.HEADER_SIZE:
                raise NotReady(main_entry)  # created a moment ago, not sized yet
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            self.header = stats.read_header(self.mm)
        except BaseException:
            self.close()
            raise

    @property
    def ready(self) -> bool:
        """Whether its header is written (an instance being built has none yet)."""
        if self.header is None and self.mm is not None:
            self.header = stats.read_header(self.mm)
        return self.header is not None

    def workers(self) -> list[stats.WorkerStats]:
        """A look at every worker slot now. A slot whose statistics the parent kept
        rewriting through every try is left out of this look (the next one will do)."""
        h, now = self.header, time.monotonic_ns()
        out = []
        for w in range(h.num_workers):
            try:
                out.append(stats.read_worker(self.mm, h, w, now))
            except RingError:
                continue
        return out

    def spares(self) -> tuple[int, int]:
        """(wanted, ready) hot spares now."""
        return stats.read_spares(self.mm)

    def command(self) -> str | None:
        """The owner's command line, where this process can see it."""
        try:
            with open(f"/proc/{self.header.owner_pid}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip() or None
        except OSError:
            return None

    def close(self) -> None:
        mm, self.mm = self.mm, None
        if mm is not None:
            mm.close()


def _locked(bare: str, entries: list[str]) -> bool:
    """Whether someone holds the instance's lock: a non-blocking shared flock on our own
    descriptor fails. One we could take is let go at once (the descriptor is closed): its
    owner is gone, or has not locked it yet. The owner is never blocked."""
    lock = bare + shm.LOCK
    if lock not in entries or shm.owner_pid(bare) is None:
        return False
    fd = shm.open_entry(lock)
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


class Registry:
    """The live instances between two looks: :meth:`scan` opens new ones, keeps those
    still live mapped, and closes those gone; :meth:`close` closes every one."""

    def __init__(self):
        self.open: dict[str, Instance] = {}

    def scan(self) -> tuple[list[Instance], list[Refused]]:
        """The live instances now, ready to read (by name), and those refused."""
        live: dict[str, list[str]] = {bare: entries for bare, entries in shm.by_prefix().items()
                                      if _locked(bare, entries)}
        names = {bare.rstrip("_"): bare for bare in live}
        for name in [n for n in self.open if n not in names]:
            self.open.pop(name).close()
        ready, refused = [], []
        for name, bare in sorted(names.items()):
            inst = self.open.get(name)
            try:
                if inst is None:
                    mains = [e for e in live[bare] if e.startswith(bare + _MAIN)]
                    if len(mains) != 1:
                        if mains:
                            refused.append(Refused(name, f"{len(mains)} main segments"))
                        continue  # none: still being built (or closing)
                    inst = self.open[name] = Instance(name, mains[0])
                if inst.ready:
                    ready.append(inst)
            except NotReady:
                continue
            except (StatsLayoutError, OSError, ValueError) as exc:
                refused.append(Refused(name, str(exc)))
                if name in self.open:
                    self.open.pop(name).close()
        return ready, refused

    def close(self) -> None:
        for inst in self.open.values():
            inst.close()
        self.open.clear()
