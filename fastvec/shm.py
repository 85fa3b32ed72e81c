"""Owning POSIX shared memory and semaphores: names, create/attach, close/unlink, sweeps.

Every name is ``/fv<owner pid>_<random>_<what>``: the owner pid lets the next instance
sweep what a dead owner left behind (:func:`sweep_stale`). ``close()`` drops this
process's handle; ``unlink()`` destroys the object; both are idempotent, and every
attribute has a class-level default so cleanup works on a half-built object.

Creating a segment allocates all of it (``posix_fallocate``), so a full /dev/shm is a
:class:`SharedMemoryFullError` when the env is built, never a SIGBUS on a later write.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import secrets

import posix_ipc

from fastvec.errors import PayloadTooLargeError, SharedMemoryFullError

log = logging.getLogger(__name__)

NAME_PREFIX = "fv"
SHM_DIR = "/dev/shm"
_OWNED = re.compile(rf"^(?:sem\.)?{NAME_PREFIX}(\d+)_[0-9a-f]+_")


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


def unlink_segment(name: str | None) -> None:
    if name:
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            pass


def unlink_semaphore(name: str | None) -> None:
    if name:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass


def create_semaphore(name: str) -> posix_ipc.Semaphore:
    """A new semaphore with value 0; SharedMemoryFullError if /dev/shm cannot hold it."""
    try:
        return posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0)
    except posix_ipc.ExistentialError:
        raise  # someone else's name: not ours to unlink
    except (OSError, posix_ipc.Error) as exc:
        unlink_semaphore(name)  # glibc builds it under a temporary name; this is a backstop
        raise _full_error(f"semaphore {name}", mmap.PAGESIZE, exc) from exc


class Names:
    """Every name one instance created; the finalizer's view of what to unlink."""

    def __init__(self):
        self.segments: set[str] = set()
        self.semaphores: set[str] = set()

    def unlink_all(self) -> None:
        for name in list(self.segments):
            unlink_segment(name)
        for name in list(self.semaphores):
            unlink_semaphore(name)
        self.segments.clear()
        self.semaphores.clear()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leftovers() -> list[str]:
    """Entries of /dev/shm that look like fastvec's (any owner)."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if _OWNED.match(n))
    except FileNotFoundError:
        return []


def sweep_stale() -> list[str]:
    """Unlink segments and semaphores whose owner process no longer exists."""
    removed = []
    for entry in leftovers():
        pid = int(_OWNED.match(entry).group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if entry.startswith("sem."):
            unlink_semaphore("/" + entry[4:])
        else:
            unlink_segment("/" + entry)
        removed.append(entry)
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
