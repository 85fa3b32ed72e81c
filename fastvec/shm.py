"""Owning POSIX shared memory and semaphores: names, create/attach, close/unlink, sweeps.

Every name of one instance is ``/fv<owner pid>_<random hex>_<what>``. The pid is there for
people reading /dev/shm. It never makes an owner count as dead, because a pid means
nothing in another PID namespace (two containers sharing /dev/shm with ``--ipc=host``).

Who removes a name, in the order it normally happens:

1. The owner, on close or collection: :meth:`Names.unlink_all`.
2. If the owner dies first (SIGTERM, SIGKILL, OOM killer): ``multiprocessing``'s resource
   tracker. Every tracked name is registered with it; its process unlinks whatever is
   still registered once every process holding its pipe (the owner and its workers) is
   gone. A normal unlink unregisters, so a clean run prints no "leaked objects" warning.
3. If the tracker could not run either (it was killed too): the next instance's
   :func:`sweep_stale`. ``Names`` creates ``<prefix>lock`` before any other name of the
   prefix, holds ``flock(LOCK_EX)`` on it for the instance's lifetime and unlinks it
   last. A sweep that can take the lock knows the owner is gone; a prefix without a lock
   file has only orphans left, removed once they are older than ``ORPHAN_AGE`` seconds
   (and no process with the pid in their name is visible: a fastvec older than the
   lock). Forked workers inherit the lock's fd, so the lock lives while any of them does.

The API the rest of the package uses::

    new_prefix()                       a fresh "/fv<pid>_<hex>_"
    names = Names(prefix)              creates and locks <prefix>lock; names.prefix
    names.track_segment(name)          unlink this segment in unlink_all (and on death)
    names.track_semaphore(name)        the same for a semaphore
    names.forget_semaphore(name)       unlink a semaphore now and stop tracking it
    names.unlink_all()                 unlink everything, the lock last; idempotent
    Segment(name, size, create=True)   create, allocate every byte, map; Segment(name) attaches
    create_semaphore(name)             a new semaphore with value 0
    sweep_stale() -> [entries]         unlink what dead owners left; the entries removed
    leftovers() -> [entries]           the entries of /dev/shm that look like fastvec's

Creating a segment allocates all of it (``posix_fallocate``), so a full /dev/shm is a
:class:`SharedMemoryFullError` when the env is built, never a SIGBUS on a later write.
``close()`` drops this process's handle; ``unlink()`` destroys the object; both are
idempotent, and attributes have class-level defaults so cleanup works half built.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import time
from multiprocessing import resource_tracker

import posix_ipc

from fastvec.errors import PayloadTooLargeError, SharedMemoryFullError

log = logging.getLogger(__name__)

NAME_PREFIX = "fv"
SHM_DIR = "/dev/shm"
LOCK = "lock"
# A name without a lock file is removed once it is this old (seconds): younger, it may
# belong to an instance being built right now (its lock is being created and locked).
ORPHAN_AGE = 5.0
_OWNED = re.compile(rf"^(?:sem\.)?({NAME_PREFIX}\d+_[0-9a-f]+_)")
_SEGMENT, _SEMAPHORE = "shared_memory", "semaphore"  # the resource tracker's types


def new_prefix() -> str:
    """A fresh per-instance name prefix carrying this process's pid."""
    return f"/{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"


def free_bytes() -> int | None:
    """Bytes an unprivileged process may still allocate on /dev/shm (None: unknown)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _amount(nbytes: int | None) -> str:
    if nbytes is None:
        return "an unknown number of bytes"
    return f"{nbytes} bytes ({nbytes / 2**20:.1f} MiB)"


def _full_error(what: str, needed: int, exc: BaseException) -> SharedMemoryFullError:
    return SharedMemoryFullError(
        getattr(exc, "errno", None) or errno.ENOSPC,
        f"cannot create {what}: it needs {_amount(needed)} and {SHM_DIR} has "
        f"{_amount(free_bytes())} free ({exc}). Run the container with a larger --shm-size "
        "(Docker's default is 64 MiB), or use fewer envs, a smaller ring_depth or smaller "
        "observations")


class Segment:
    """A shared-memory segment mapped into this process."""

    name: str | None = None
    mm: mmap.mmap | None = None
    _owner = False

    def __init__(self, name: str, size: int | None = None, *, create: bool = False):
        self.name = name
        if not create:
            shm = posix_ipc.SharedMemory(name)
            try:
                self.mm = mmap.mmap(shm.fd, os.fstat(shm.fd).st_size)
            finally:
                shm.close_fd()
            return
        size = max(int(size), 1)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=0)
        except posix_ipc.ExistentialError:
            raise  # someone else's name: not ours to unlink
        except (OSError, posix_ipc.Error) as exc:
            raise _full_error(f"segment {name}", size, exc) from exc
        self._owner = True
        try:
            os.ftruncate(shm.fd, size)
            # Every page now: ENOSPC here instead of SIGBUS at the first write past the
            # free space of /dev/shm.
            os.posix_fallocate(shm.fd, 0, size)
            self.mm = mmap.mmap(shm.fd, size)
        except BaseException as exc:
            unlink_segment(name)
            if isinstance(exc, OSError):
                raise _full_error(f"segment {name}", size, exc) from exc
            raise
        finally:
            shm.close_fd()

    @property
    def size(self) -> int:
        return 0 if self.mm is None else len(self.mm)

    def ensure(self, nbytes: int, limit: int) -> None:
        """Make the mapping at least ``nbytes`` long, growing the segment if needed.

        A grow that /dev/shm cannot hold raises PayloadTooLargeError and leaves the segment
        at its old size, still usable by both sides.
        """
        if nbytes <= self.size:
            return
        if nbytes > limit:
            raise PayloadTooLargeError(
                f"a payload of {nbytes} bytes exceeds max_payload_bytes={limit}; raise the "
                "limit in FastVectorEnv(...) or return less data from the env")
        shm = posix_ipc.SharedMemory(self.name)
        try:
            current = os.fstat(shm.fd).st_size
            if current < nbytes:
                new = min(max(nbytes, 2 * current), limit)
                try:
                    os.ftruncate(shm.fd, new)
                    os.posix_fallocate(shm.fd, 0, new)  # ENOSPC now, not SIGBUS later
                except OSError as exc:
                    # Back to the old size: left longer, the next grow would take the
                    # unallocated tail for room and SIGBUS on writing it.
                    os.ftruncate(shm.fd, current)
                    raise PayloadTooLargeError(
                        f"cannot grow the side buffer {self.name} from {current} to {new} "
                        f"bytes: {SHM_DIR} has {_amount(free_bytes())} free ({exc}). Return "
                        "less data from the env, or run with a larger --shm-size"
                    ) from exc
                current = new
            self._remap(shm.fd, current)
        finally:
            shm.close_fd()

    def remap(self) -> None:
        """Follow a growth made by the other side."""
        shm = posix_ipc.SharedMemory(self.name)
        try:
            self._remap(shm.fd, os.fstat(shm.fd).st_size)
        finally:
            shm.close_fd()

    def _remap(self, fd: int, size: int) -> None:
        old, self.mm = self.mm, mmap.mmap(fd, size)
        _close_mmap(old)

    def close(self) -> None:
        mm, self.mm = self.mm, None
        _close_mmap(mm)

    def unlink(self) -> None:
        unlink_segment(self.name)


def _close_mmap(mm: mmap.mmap | None) -> None:
    if mm is None:
        return
    try:
        mm.close()
    except BufferError:
        # The caller still holds a view (copy=False observations): the mapping stays valid
        # for it and goes when the last view does. The name is unlinked regardless.
        pass


def unlink_segment(name: str | None) -> bool:
    """Unlink a segment; False if it was already gone (or not ours to remove)."""
    if not name:
        return False
    try:
        posix_ipc.unlink_shared_memory(name)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return False
    return True


def unlink_semaphore(name: str | None) -> bool:
    """Unlink a semaphore; False if it was already gone (or not ours to remove)."""
    if not name:
        return False
    try:
        posix_ipc.unlink_semaphore(name)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        return False
    return True


def create_semaphore(name: str) -> posix_ipc.Semaphore:
    """A new semaphore with value 0; SharedMemoryFullError if /dev/shm cannot hold it."""
    try:
        return posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
    except posix_ipc.ExistentialError:
        raise  # someone else's name: not ours to unlink
    except (OSError, posix_ipc.Error) as exc:
        unlink_semaphore(name)  # glibc builds it under a temporary name; this is a backstop
        raise _full_error(f"semaphore {name}", mmap.PAGESIZE, exc) from exc


def _create_lock(name: str) -> int:
    """Create the lock segment ``name`` and lock it; returns the fd that holds the lock."""
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=0)
    except posix_ipc.ExistentialError:
        raise
    except (OSError, posix_ipc.Error) as exc:
        raise _full_error(f"lock {name}", 1, exc) from exc
    try:
        # os.dup's fd is close-on-exec: spawned workers and the resource tracker, which
        # exec, never hold the lock; forked workers do, which is meant.
        fd = os.dup(shm.fd)
    except OSError as exc:
        unlink_segment(name)
        raise _full_error(f"lock {name}", 1, exc) from exc
    finally:
        shm.close_fd()
    try:
        # Blocks only while a sweep looks at this lock: it sees size 0, takes it for an
        # instance being built, and lets go.
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 1)  # size 1 says "locked by its owner" to a later sweep
    except OSError as exc:
        os.close(fd)
        unlink_segment(name)
        raise _full_error(f"lock {name}", 1, exc) from exc
    return fd


class Names:
    """Every name one instance created, under one locked prefix; the finalizer's view of
    what to unlink. Create it before any other name of ``prefix``."""

    prefix: str = ""
    _lock_name: str | None = None
    _lock_fd = -1
    _pid = -1

    def __init__(self, prefix: str):
        self._segments: set[str] = set()
        self._semaphores: set[str] = set()
        self._registered: set[str] = set()
        self.prefix = prefix
        self._pid = os.getpid()
        self._lock_fd = _create_lock(prefix + LOCK)
        self._lock_name = prefix + LOCK
        self._register(self._lock_name, _SEGMENT)

    def track_segment(self, name: str) -> None:
        """Unlink segment ``name`` in unlink_all(), or through the tracker if we die first."""
        if name not in self._segments:
            self._segments.add(name)
            self._register(name, _SEGMENT)

    def track_semaphore(self, name: str) -> None:
        """Unlink semaphore ``name`` in unlink_all(), or through the tracker if we die first."""
        if name not in self._semaphores:
            self._semaphores.add(name)
            self._register(name, _SEMAPHORE)

    def forget_semaphore(self, name: str) -> None:
        """Unlink semaphore ``name`` now (e.g. a replaced worker's) and stop tracking it."""
        unlink_semaphore(name)
        self._semaphores.discard(name)
        self._unregister(name, _SEMAPHORE)

    def unlink_all(self) -> None:
        """Unlink every tracked name, then the lock, and let go of the lock. Idempotent."""
        fd, self._lock_fd = self._lock_fd, -1
        lock, self._lock_name = self._lock_name, None
        if self._pid == os.getpid():
            for names, unlink, rtype in ((self._segments, unlink_segment, _SEGMENT),
                                         (self._semaphores, unlink_semaphore, _SEMAPHORE)):
                for name in list(names):
                    unlink(name)
                    self._unregister(name, rtype)
                names.clear()
            if lock is not None:
                unlink_segment(lock)
                self._unregister(lock, _SEGMENT)
        # else: a forked copy of the owner. Its names are the owner's; closing this copy
        # of the fd leaves the owner's lock in place.
        if fd >= 0:
            os.close(fd)

    def _register(self, name: str, rtype: str) -> None:
        try:
            resource_tracker.register(name, rtype)
        except Exception as exc:  # e.g. no usable sys.executable: sweeps remain the backstop
            log.warning("cannot register %s with the resource tracker (%s): if this process "
                        "dies it stays in %s until a later fastvec instance sweeps it",
                        name, exc, SHM_DIR)
        else:
            self._registered.add(name)

    def _unregister(self, name: str, rtype: str) -> None:
        # Only what was registered: the tracker prints a KeyError for anything else.
        if name in self._registered:
            self._registered.discard(name)
            try:
                resource_tracker.unregister(name, rtype)
            except Exception as exc:
                log.warning("cannot unregister %s from the resource tracker: %s", name, exc)


def leftovers() -> list[str]:
    """Entries of /dev/shm that look like fastvec's (any owner)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if _OWNED.match(n))
    except FileNotFoundError:
        return []


def _unlink_entry(entry: str) -> bool:
    if entry.startswith("sem."):
        return unlink_semaphore("/" + entry[4:])
    return unlink_segment("/" + entry)


def _age(entry: str) -> float:
    try:
        return time.time() - os.lstat(os.path.join(SHM_DIR, entry)).st_ctime
    except OSError:
        return 0.0


def _sweep_locked(lock: str, entries: list[str], min_age: float) -> list[str]:
    """Unlink ``entries`` and ``lock`` if nobody holds the lock; the entries removed."""
    try:
        fd = os.open(os.path.join(SHM_DIR, lock), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # closed meanwhile, or another user's
        return []
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # held by the owner or one of its forked workers: live
        if os.fstat(fd).st_size == 0 and _age(lock) < min_age:
            return []  # created a moment ago, its owner has not locked it yet
        removed = [e for e in entries if _unlink_entry(e)]
        if _unlink_entry(lock):
            removed.append(lock)
        return removed
    finally:
        os.close(fd)


def _pid_visible(bare_prefix: str) -> bool:
    """Whether the pid in a prefix is a process we can see. It can only veto removing
    names that have no lock; it never decides that an owner is dead."""
    pid = int(bare_prefix[len(NAME_PREFIX):].split("_", 1)[0])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sweep_stale(min_age: float = ORPHAN_AGE) -> list[str]:
    """Unlink the names of instances whose owner is gone; returns the entries removed.

    An instance whose lock can be taken has no live process left. Names of a prefix
    without a lock file are orphans (the lock is created first and unlinked last) and go
    once older than ``min_age`` seconds, unless a process with the pid in their name is
    visible: an instance of a fastvec that predates the lock has no lock file while alive.
    """
    by_prefix: dict[str, list[str]] = {}
    for entry in leftovers():
        by_prefix.setdefault(_OWNED.match(entry).group(1), []).append(entry)
    removed: list[str] = []
    for bare, entries in by_prefix.items():
        lock = bare + LOCK
        if lock in entries:
            entries.remove(lock)
            removed += _sweep_locked(lock, entries, min_age)
        elif not _pid_visible(bare):
            removed += [e for e in entries if _age(e) >= min_age and _unlink_entry(e)]
    if removed:
        log.info("swept %d shared-memory names left by dead owners: %s", len(removed), removed)
    return removed


def put_pickle(seg: Segment, obj, limit: int) -> int:
    """Pickle ``obj`` into the side buffer ``seg``; returns the byte count (grows, never truncates)."""
    import pickle

    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    seg.ensure(len(data), limit)
    seg.mm[: len(data)] = data
    return len(data)


def get_pickle(seg: Segment, nbytes: int):
    """Unpickle ``nbytes`` from the side buffer ``seg`` (remapping if the other side grew it)."""
    import pickle

    if nbytes > seg.size:
        seg.remap()
    with memoryview(seg.mm) as mv:
        return pickle.loads(mv[:nbytes])
