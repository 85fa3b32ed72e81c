"""Owning POSIX shared memory and semaphores: names, create/attach, close/unlink, sweeps.

Every name of one instance starts with its prefix ``/fv<owner pid>_<random hex>_``; the
lock is ``<prefix>lock`` and every other object is ``<prefix><what>_<token>``, ``what``
saying what it is (``main``, ``done``, ``p0`` a payload segment, ``r0`` a worker's request
semaphore) and ``token`` drawn afresh for each object. A prefix is visible in /dev/shm as
soon as its lock exists, so the token is what keeps another user from creating a name
before we do (and so failing every respawn); a clash, by chance or by guessing, is retried
under a new token. The pid is there for people reading /dev/shm. It never makes an owner
count as dead, because a pid means nothing in another PID namespace (two containers
sharing /dev/shm with ``--ipc=host``).

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
   A sweep judges only regular files of its own user (another user's names, FIFOs and
   symlinks are never opened or unlinked) and skips a name it cannot parse.

The API the rest of the package uses::

    new_prefix()                       a fresh "/fv<pid>_<hex>_"
    names = Names(prefix)              creates and locks <prefix>lock; names.prefix
    names.new_segment(what, size)      create, track and map <prefix><what>_<token>
    names.new_semaphore(what)          create and track semaphore <prefix><what>_<token>
    names.track_segment(name)          unlink this segment in unlink_all (and on death)
    names.track_semaphore(name)        the same for a semaphore
    names.forget_semaphore(name)       unlink a semaphore now and stop tracking it
    names.unlink_all()                 unlink everything, the lock last; idempotent
    Segment(name, size, create=True)   create, allocate every byte, map; Segment(name) attaches
    create_semaphore(name)             a new semaphore with value 0
    sweep_stale() -> [entries]         unlink what dead owners left; the entries removed
    leftovers() -> [entries]           the entries of /dev/shm that look like fastvec's
    by_prefix() -> {prefix: [entries]} the same by bare prefix; owner_pid(prefix) its pid
    open_entry(entry) -> fd or None    read-only, if a regular file of ours (never waits)

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
import stat
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
TOKEN_BYTES = 8  # a name's token: 16 hex digits, beyond guessing
CREATE_TRIES = 8  # tokens tried for one object before its creation fails
_PID_MAX = 2**31 - 1  # pid_t; a name with a larger "pid" is not fastvec's
_OWNED = re.compile(rf"^(?:sem\.)?({NAME_PREFIX}[0-9]+_[0-9a-f]+_)")
_SEGMENT, _SEMAPHORE = "shared_memory", "semaphore"  # the resource tracker's types


def new_prefix() -> str:
    """A fresh per-instance name prefix carrying this process's pid."""
    return f"/{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(4)}_"


def new_token() -> str:
    """A fresh unpredictable token for the name of one object under a prefix."""
    return secrets.token_hex(TOKEN_BYTES)


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
    return _unlink(posix_ipc.unlink_shared_memory, name)


def unlink_semaphore(name: str | None) -> bool:
    """Unlink a semaphore; False if it was already gone (or not ours to remove)."""
    return _unlink(posix_ipc.unlink_semaphore, name)


def _unlink(unlink, name: str | None) -> bool:
    if not name:
        return False
    try:
        unlink(name)
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

    def new_segment(self, what: str, size: int) -> Segment:
        """Create, track and map a segment of ``size`` bytes named ``<prefix><what>_<token>``."""
        return self._new(what, _SEGMENT, lambda name: Segment(name, size, create=True))

    def new_semaphore(self, what: str) -> posix_ipc.Semaphore:
        """Create and track a semaphore (value 0) named ``<prefix><what>_<token>``; the
        name is its ``.name``."""
        return self._new(what, _SEMAPHORE, create_semaphore)

    def _new(self, what: str, rtype: str, create):
        # Tracked before it exists, so a death in between leaves nothing the tracker does
        # not know. A name that exists is someone else's (or a clash by chance): it is
        # dropped untouched and the next token tried; it is not a failure of ours.
        for _ in range(CREATE_TRIES):
            name = f"{self.prefix}{what}_{new_token()}"
            self._track(name, rtype)
            try:
                return create(name)
            except posix_ipc.ExistentialError:
                self._untrack(name, rtype)
                log.debug("%s exists already (another user's, or a clash): trying another "
                          "token", name)
        raise posix_ipc.ExistentialError(
            f"{CREATE_TRIES} fresh names {self.prefix}{what}_<token> all existed already: "
            f"someone else creates names under this instance's prefix in {SHM_DIR}")

    def track_segment(self, name: str) -> None:
        """Unlink segment ``name`` in unlink_all(), or through the tracker if we die first."""
        self._track(name, _SEGMENT)

    def track_semaphore(self, name: str) -> None:
        """Unlink semaphore ``name`` in unlink_all(), or through the tracker if we die first."""
        self._track(name, _SEMAPHORE)

    def forget_semaphore(self, name: str) -> None:
        """Unlink semaphore ``name`` now (e.g. a replaced worker's) and stop tracking it."""
        unlink_semaphore(name)
        self._untrack(name, _SEMAPHORE)

    def _track(self, name: str, rtype: str) -> None:
        names = self._segments if rtype == _SEGMENT else self._semaphores
        if name not in names:
            names.add(name)
            self._register(name, rtype)

    def _untrack(self, name: str, rtype: str) -> None:
        """Stop tracking ``name`` without unlinking it."""
        (self._segments if rtype == _SEGMENT else self._semaphores).discard(name)
        self._unregister(name, rtype)

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


def by_prefix() -> dict[str, list[str]]:
    """:func:`leftovers` grouped by bare prefix (``fv<pid>_<hex>_``)."""
    out: dict[str, list[str]] = {}
    for entry in leftovers():
        out.setdefault(_OWNED.match(entry).group(1), []).append(entry)
    return out


def _mine(entry: str) -> bool:
    """Whether ``entry`` is a regular file of this user. A symlink is not followed, and
    another user's name, a FIFO or a device node is never ours to open or unlink (root
    could unlink anything in /dev/shm)."""
    try:
        st = os.lstat(os.path.join(SHM_DIR, entry))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def owner_pid(bare_prefix: str) -> int | None:
    """The pid in a prefix; None where it cannot be a pid (then the prefix is not fastvec's)."""
    try:
        pid = int(bare_prefix[len(NAME_PREFIX):].split("_", 1)[0])
    except ValueError:
        return None
    return pid if 0 < pid <= _PID_MAX else None


def _age(entry: str) -> float:
    try:
        return time.time() - os.lstat(os.path.join(SHM_DIR, entry)).st_ctime
    except OSError:
        return 0.0


def open_entry(entry: str) -> int | None:
    """A read-only descriptor on /dev/shm/<entry> if it is a regular file of this user, else
    None. It never follows a symlink and never waits: O_NONBLOCK, for a name that became a
    FIFO since it was checked (opening one would wait for a writer)."""
    if not _mine(entry):
        return None
    try:
        fd = os.open(os.path.join(SHM_DIR, entry),
                     os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # gone meanwhile, or a symlink now
        return None
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
        return fd
    os.close(fd)  # replaced since the lstat by something not ours
    return None


def _sweep_locked(lock: str, entries: list[str], min_age: float) -> list[str]:
    """Unlink ``entries`` and ``lock`` if nobody holds the lock; the entries removed."""
    fd = open_entry(lock)
    if fd is None:
        return []
    try:
        st = os.fstat(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return []  # held by the owner or one of its forked workers: live
        if st.st_size == 0 and _age(lock) < min_age:
            return []  # created a moment ago, its owner has not locked it yet
        removed = [e for e in entries if _unlink_entry(e)]
        if _unlink_entry(lock):
            removed.append(lock)
        return removed
    finally:
        os.close(fd)


def _pid_visible(pid: int) -> bool:
    """Whether the pid in a prefix is a process we can see. It can only veto removing
    names that have no lock; it never decides that an owner is dead."""
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

    Only regular files of this user are judged; anything else that looks like a name of
    fastvec's (another user's, a FIFO, a symlink, a pid out of range) is skipped, never
    raised about.
    """
    removed: list[str] = []
    for bare, entries in by_prefix().items():
        pid = owner_pid(bare)
        if pid is None:
            log.debug("sweep: skipped %s*: the pid in the name is out of range", bare)
            continue
        lock = bare + LOCK
        has_lock = lock in entries
        mine = [e for e in entries if e != lock and _mine(e)]
        try:
            if has_lock:
                if _mine(lock):
                    removed += _sweep_locked(lock, mine, min_age)
                else:
                    log.debug("sweep: skipped %s*: its lock is not a regular file of ours", bare)
            elif not _pid_visible(pid):
                removed += [e for e in mine if _age(e) >= min_age and _unlink_entry(e)]
        except (OSError, posix_ipc.Error) as exc:
            log.debug("sweep: skipped %s*: %s", bare, exc)
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
