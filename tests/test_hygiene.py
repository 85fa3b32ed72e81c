"""Operating-system hygiene: after close(), after garbage collection without close(), and
after a constructor that fails, nothing of the instance is left in /dev/shm, no worker
process, no watchdog thread, no mapping and no file descriptor; stale names of dead owners
(their prefix's lock is free) are swept by the next instance."""

from __future__ import annotations

import fcntl
import functools
import gc
import os
import secrets
import subprocess
import sys
import threading

import numpy as np
import posix_ipc
import psutil
import pytest

import envs as test_envs
import fastvec
from conftest import my_leftovers, wait_until, worker_children
from fastvec import FastVectorEnv
from fastvec.shm import SHM_DIR, create_semaphore, leftovers, sweep_stale

pytestmark = pytest.mark.timeout(120)

CYCLES = 20
CONTEXTS = ["fork", "spawn"]


def make(context, **kw):
    fns = [functools.partial(test_envs.AttrEnv, index=i) for i in range(3)]
    return FastVectorEnv(fns, context=context, envs_per_worker=2, **kw)


def use(env):
    env.reset(seed=0)
    env.step(np.array([0, 1, 2]))
    env.get_attr("index")


def instance_names(prefix: str) -> list[str]:
    bare = prefix.lstrip("/")
    return [n for n in os.listdir(SHM_DIR) if n.startswith((bare, "sem." + bare))]


def mapped(prefix: str) -> list[str]:
    bare = prefix.lstrip("/")
    with open("/proc/self/maps") as f:
        return [line.strip() for line in f if bare in line]


def watchdogs() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastvec-watchdog" and t.is_alive()]


def num_fds() -> int:
    return psutil.Process().num_fds()


def settle() -> bool:
    gc.collect()
    return wait_until(lambda: not worker_children() and not my_leftovers() and not watchdogs(),
                      10.0)


def assert_instance_gone(prefix: str) -> None:
    assert wait_until(lambda: not instance_names(prefix), 5.0), instance_names(prefix)
    assert wait_until(lambda: not worker_children(), 5.0), [p.pid for p in worker_children()]
    assert wait_until(lambda: not watchdogs(), 5.0), watchdogs()
    assert not mapped(prefix), mapped(prefix)


# -- close(), collection, failed constructor -------------------------------------------------


@pytest.mark.parametrize("context", CONTEXTS)
def test_close_leaves_nothing(context):
    env = make(context)
    use(env)
    prefix = env._sup.prefix
    pids = [h["pid"] for h in env.health()]
    assert instance_names(prefix) and mapped(prefix)
    env.close()
    assert_instance_gone(prefix)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


@pytest.mark.parametrize("context", CONTEXTS)
def test_collection_without_close_leaves_nothing(context):
    env = make(context)
    use(env)
    prefix = env._sup.prefix
    assert instance_names(prefix)
    del env
    gc.collect()
    assert_instance_gone(prefix)


@pytest.mark.parametrize("context", CONTEXTS)
def test_collection_with_a_pending_step_leaves_nothing(context):
    env = make(context)
    env.reset(seed=0)
    env.step_async(np.array([0, 1, 2]))
    prefix = env._sup.prefix
    del env
    gc.collect()
    assert_instance_gone(prefix)


@pytest.mark.parametrize("context", CONTEXTS)
def test_failed_constructor_leaves_nothing(context):
    before = set(os.listdir(SHM_DIR))
    fns = [test_envs.AttrEnv, test_envs.RaisingFactory()]
    with pytest.raises(fastvec.WorkerFailure):
        FastVectorEnv(fns, context=context)
    assert settle()
    assert not my_leftovers()
    # only this process's names: other fastvec users on the machine may create theirs
    assert not [n for n in set(os.listdir(SHM_DIR)) - before
                if n.startswith((f"fv{os.getpid()}_", f"sem.fv{os.getpid()}_"))]


# -- file descriptors over many cycles ---------------------------------------------------------


def _cycle_close(context):
    env = make(context)
    use(env)
    env.close()


def _cycle_collect(context):
    env = make(context)
    use(env)
    del env
    gc.collect()


def _cycle_fail(context):
    try:
        FastVectorEnv([test_envs.AttrEnv, test_envs.RaisingFactory()], context=context)
    except fastvec.WorkerFailure:
        pass
    else:  # pragma: no cover
        raise AssertionError("the constructor should have failed")


CYCLE_FNS = {"close": _cycle_close, "collect": _cycle_collect, "failed-constructor": _cycle_fail}


@pytest.mark.parametrize("how", list(CYCLE_FNS))
@pytest.mark.parametrize("context", CONTEXTS)
def test_fd_count_returns_to_baseline(context, how):
    cycle = CYCLE_FNS[how]
    cycle(context)  # warm-up: lazily created helpers (resource tracker, imports) settle here
    assert settle()
    baseline = num_fds()
    threads = threading.active_count()
    for _ in range(CYCLES):
        cycle(context)
    assert settle()
    assert wait_until(lambda: num_fds() <= baseline, 5.0), \
        f"fds grew from {baseline} to {num_fds()}: {psutil.Process().open_files()}"
    assert wait_until(lambda: threading.active_count() <= threads, 5.0)


# -- sweep of stale names ----------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


_HELD: dict[str, int] = {}  # lock name -> the fd holding it for a planted live owner


def plant(pid: int, owner_alive: bool = False) -> tuple[str, str]:
    """A segment and a semaphore named as fastvec names them, with pid ``pid`` in the name
    and the prefix's lock file, held (as a live owner holds it) when ``owner_alive``."""
    stem = f"/fv{pid}_{secrets.token_hex(4)}_"
    lock = posix_ipc.SharedMemory(stem + "lock", posix_ipc.O_CREX, size=1)
    if owner_alive:
        _HELD[stem + "lock"] = os.dup(lock.fd)
        fcntl.flock(_HELD[stem + "lock"], fcntl.LOCK_EX)
    lock.close_fd()
    seg = posix_ipc.SharedMemory(stem + "main", posix_ipc.O_CREX, size=4096)
    seg.close_fd()
    create_semaphore(stem + "done").close()
    return stem + "main", stem + "done"


def exists(seg: str, sem: str) -> tuple[bool, bool]:
    return (os.path.exists(SHM_DIR + seg), os.path.exists(SHM_DIR + "/sem." + sem.lstrip("/")))


def unlink_quietly(seg: str, sem: str) -> None:
    lock = seg.removesuffix("main") + "lock"
    if lock in _HELD:
        os.close(_HELD.pop(lock))
    for fn, name in ((posix_ipc.unlink_shared_memory, seg), (posix_ipc.unlink_semaphore, sem),
                     (posix_ipc.unlink_shared_memory, lock)):
        try:
            fn(name)
        except posix_ipc.ExistentialError:
            pass


def test_stale_names_of_a_dead_owner_are_swept_by_the_next_instance():
    seg, sem = plant(dead_pid())
    try:
        env = make("fork")
        try:
            assert exists(seg, sem) == (False, False)
            use(env)
        finally:
            env.close()
    finally:
        unlink_quietly(seg, sem)


def test_names_of_live_owners_are_not_swept():
    other = plant(os.getppid(), owner_alive=True)  # a live owner that is not us
    mine = plant(os.getpid(), owner_alive=True)  # this process: live, never swept
    try:
        env = make("fork")
        env.close()
        assert exists(*other) == (True, True)
        assert exists(*mine) == (True, True)
        removed = sweep_stale()
        assert not [n for n in removed if n.removeprefix("sem.").startswith(
            (f"fv{os.getppid()}_", f"fv{os.getpid()}_"))]
        assert exists(*other) == (True, True) and exists(*mine) == (True, True)
    finally:
        unlink_quietly(*other)
        unlink_quietly(*mine)


def test_a_second_instance_does_not_sweep_the_first():
    first = make("fork")
    try:
        use(first)
        prefix = first._sup.prefix
        names = sorted(instance_names(prefix))
        second = make("fork")
        second.close()
        assert sorted(instance_names(prefix)) == names
        use(first)
    finally:
        first.close()


def test_sweep_stale_reports_what_it_removed():
    seg, sem = plant(dead_pid())
    try:
        removed = sweep_stale()
        assert seg.lstrip("/") in removed and "sem." + sem.lstrip("/") in removed
        assert exists(seg, sem) == (False, False)
        assert not [n for n in leftovers() if n in removed]
    finally:
        unlink_quietly(seg, sem)


@pytest.mark.parametrize("nested", [False, True])
def test_returned_batches_are_freed_without_the_cycle_collector(nested):
    """A reference cycle on the step path keeps every copied batch alive until gc runs:
    gigabytes of heap and page faults on every step with large observations."""
    import weakref

    fn = test_envs.NestedEnv if nested else test_envs.RasterInfoEnv
    env = FastVectorEnv([fn] * 2)
    gc.disable()
    try:
        env.reset(seed=0)
        refs = []
        for _ in range(5):
            obs, *_ = env.step(env.action_space.sample())
            leaf = next(iter(obs.values())) if isinstance(obs, dict) else obs
            refs.append(weakref.ref(leaf))
            del obs, leaf, _
        assert [r() is None for r in refs[:-1]] == [True] * 4
    finally:
        gc.enable()
        env.close()
