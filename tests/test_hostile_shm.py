"""A hostile /dev/shm: strangers' files that look like fastvec's, and another user who
guesses an instance's names.

Files planted to trip a sweep (a huge pid, a FIFO, symlinks) go into a private /dev/shm
(``unshare -m`` and a tmpfs) where that is permitted, so a sweep elsewhere on the machine
never meets them; the child Python that plants them removes them again either way.
Another user is ``nobody`` (uid 65534) through ``setpriv``: those tests need root.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import posix_ipc
import pytest

import fastvec.shm
from fastvec import FastVectorEnv
from conftest import replaced
from fastvec.shm import CREATE_TRIES, SHM_DIR, Names, create_semaphore, leftovers, new_prefix
from faults import CounterEnv
from test_shm import assert_ok
from test_shm import run_python as run_child

pytestmark = pytest.mark.timeout(120)

TESTS = os.path.dirname(os.path.abspath(__file__))
NOBODY = 65534
SWEEP_BOUND = 30.0  # seconds a sweep may take before the test calls it a hang


@functools.lru_cache(maxsize=None)
def private_shm_permitted() -> bool:
    try:
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {SHM_DIR}"],
            capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


@functools.lru_cache(maxsize=None)
def nobody_can_import_posix_ipc() -> bool:
    return subprocess.run(as_nobody(sys.executable, "-c", "import posix_ipc"), cwd="/",
                          capture_output=True, timeout=60).returncode == 0


def need_nobody() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user (nobody)")
    if not nobody_can_import_posix_ipc():
        why = (f"the user nobody cannot import posix_ipc with {sys.executable}: its venv "
               "is not readable by other users (chmod o+rx the folders above it)")
        if os.environ.get("CI") == "true":  # CI makes its venvs readable: never skip there
            pytest.fail(why)
        pytest.skip(why)


def run_python(code: str, *, private: bool, timeout: float = 90) -> subprocess.CompletedProcess:
    """test_shm's child Python, in a private /dev/shm of mode 1777 (so that nobody can
    create names in it) when ``private``. The child sees PRIVATE."""
    return run_child(f"PRIVATE = {private!r}\n" + textwrap.dedent(code),
                     shm_size="16m,mode=1777" if private else None, timeout=timeout)


def remove_entries(entries) -> None:
    for entry in entries:
        try:
            os.unlink(os.path.join(SHM_DIR, entry))
        except FileNotFoundError:
            pass


_AS_NOBODY = """
import sys, posix_ipc
for entry in sys.argv[1:]:  # entries of /dev/shm: "sem.<name>" is a semaphore
    if entry.startswith("sem."):
        posix_ipc.Semaphore("/" + entry[4:], posix_ipc.O_CREX).close()
    else:
        posix_ipc.SharedMemory("/" + entry, posix_ipc.O_CREX, size=1).close_fd()
print("OK")
"""


def create_as_nobody(entries: list[str]) -> None:
    """Create these /dev/shm entries (semaphores and segments) as the user nobody."""
    proc = subprocess.run(as_nobody(sys.executable, "-c", _AS_NOBODY, *entries),
                          capture_output=True, text=True, timeout=60, cwd="/")
    assert_ok(proc)


# -- strangers' files that look like fastvec's -------------------------------------------------


def test_a_name_with_an_out_of_range_pid_does_not_break_a_sweep_or_a_constructor():
    assert_ok(run_python("""
        import os
        import numpy as np
        import fastvec
        from fastvec.shm import SHM_DIR, sweep_stale
        from faults import CounterEnv

        planted = ["fv99999999999999999999_a_x", "fv4294967296_ab_x", "fv0_abc_x"]
        try:
            for entry in planted:
                open(os.path.join(SHM_DIR, entry), "w").close()
            removed = sweep_stale(min_age=0 if PRIVATE else fastvec.shm.ORPHAN_AGE)
            assert not set(removed) & set(planted), removed
            env = fastvec.FastVectorEnv([CounterEnv] * 2, context="fork")
            env.reset(seed=0)
            env.step(np.ones(2, np.int64))
            env.close()
            left = [e for e in planted if os.path.exists(os.path.join(SHM_DIR, e))]
            assert left == planted, left  # malformed: skipped, not judged
        finally:
            for entry in planted:
                if os.path.exists(os.path.join(SHM_DIR, entry)):
                    os.unlink(os.path.join(SHM_DIR, entry))
        print("OK")
    """, private=private_shm_permitted()))


def test_a_fifo_or_a_symlink_named_like_a_lock_neither_blocks_nor_is_followed(tmp_path):
    """A FIFO opened for reading blocks until a writer comes: the sweep must not wait for
    one. A symlink is not followed: its target is not locked, read or removed."""
    target = tmp_path / "target"
    target.write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    planted = ["fv1_aa_lock", "fv1_aa_main", "fv1_bb_lock", "fv1_bb_main", "fv1_cc_lock",
               "fv1_cc_main"]
    code = f"""
        import os
        import fastvec.shm
        from fastvec.shm import SHM_DIR, sweep_stale

        planted = {planted!r}
        os.mkfifo(os.path.join(SHM_DIR, "fv1_aa_lock"))
        os.symlink({str(tmp_path / "fifo")!r}, os.path.join(SHM_DIR, "fv1_bb_lock"))
        os.symlink({str(target)!r}, os.path.join(SHM_DIR, "fv1_cc_lock"))
        for stem in ("fv1_aa_", "fv1_bb_", "fv1_cc_"):
            open(os.path.join(SHM_DIR, stem + "main"), "w").close()
        removed = sweep_stale(min_age=0 if PRIVATE else fastvec.shm.ORPHAN_AGE)
        assert not set(removed) & set(planted), removed
        left = [e for e in planted if os.path.lexists(os.path.join(SHM_DIR, e))]
        assert left == planted, left
        print("OK")
    """
    try:
        proc = run_python(code, private=private_shm_permitted(), timeout=SWEEP_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"sweep_stale() did not return within {SWEEP_BOUND} s (blocked on a FIFO?)")
    finally:
        if not private_shm_permitted():
            remove_entries(planted)
    assert_ok(proc)
    assert target.read_bytes() == b"x"


def test_a_sweep_never_unlinks_another_users_names():
    need_nobody()
    if not private_shm_permitted():
        pytest.skip("needs `unshare -m` for a private /dev/shm: min_age=0 sweeps everything")
    assert_ok(run_python("""
        import os, secrets, subprocess, sys
        from fastvec.shm import SHM_DIR, sweep_stale
        from test_hostile_shm import create_as_nobody

        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        def instance(with_lock):  # as fastvec names an instance whose owner is gone
            stem = f"fv{dead}_{secrets.token_hex(4)}_"
            return ([stem + "lock"] if with_lock else []) + [
                stem + "main", stem + "p0_0123", f"sem.{stem}done", f"sem.{stem}r0_4567"]
        theirs = instance(True) + instance(False)
        create_as_nobody(theirs)
        assert all(os.stat(os.path.join(SHM_DIR, e)).st_uid == 65534 for e in theirs)
        mine = instance(True)  # the same, ours: a sweep does remove these
        for entry in mine:
            with open(os.path.join(SHM_DIR, entry), "wb") as f:
                f.write(b"\\0" * (entry.endswith("lock")))  # size 1: a lock once held
        removed = sweep_stale(min_age=0)
        assert sorted(removed) == sorted(mine), removed
        assert sorted(os.listdir(SHM_DIR)) == sorted(theirs), os.listdir(SHM_DIR)
        print("OK")
    """, private=True))


# -- another user guessing an instance's names -------------------------------------------------


def visible_stem() -> str:
    """The prefix (without "/") of this process's one live instance, as /dev/shm shows it."""
    locks = [n for n in leftovers() if n.startswith(f"fv{os.getpid()}_") and n.endswith("_lock")]
    assert len(locks) == 1, locks
    return locks[0].removesuffix("lock")


def kill_and_step_until_restarted(env, w: int = 0) -> None:
    os.kill(env.health()[w]["pid"], signal.SIGKILL)
    for _ in range(50):
        *_, info = env.step(np.ones(env.num_envs, np.int64))
        if replaced(info, env.num_envs)[w]:
            return
        time.sleep(0.02)
    raise AssertionError(f"worker {w} was not reported restarted: {env.health()[w]}")


def test_every_object_gets_a_fresh_token_and_clashes_are_bounded_and_left_alone(monkeypatch):
    names = Names(new_prefix())
    squatter = names.prefix + "r1_" + "0" * 16
    try:
        seg, sems = names.new_segment("main", 4096), [names.new_semaphore("r0") for _ in range(2)]
        made = [seg.name] + [sem.name for sem in sems]
        assert len(set(made)) == 3 and all(
            n.startswith(names.prefix) and fastvec.shm._OWNED.match(n[1:]) for n in made), made
        seg.close()
        for sem in sems:
            sem.close()
        create_semaphore(squatter).close()  # not tracked: someone else's
        drawn = []
        monkeypatch.setattr(fastvec.shm, "new_token", lambda: drawn.append(1) or "0" * 16)
        with pytest.raises(posix_ipc.ExistentialError, match="existed already"):
            names.new_semaphore("r1")
        assert len(drawn) == CREATE_TRIES
        names.unlink_all()
        assert not [n for n in leftovers() if n.startswith(names.prefix[1:])]
        assert os.path.exists(f"{SHM_DIR}/sem.{squatter[1:]}"), "a clashing name was unlinked"
    finally:
        names.unlink_all()
        remove_entries([f"sem.{squatter[1:]}"])


def test_names_pre_created_by_another_user_do_not_stop_a_respawn():
    need_nobody()
    env = FastVectorEnv([CounterEnv] * 2, context="fork", max_restarts=5)
    planted: list[str] = []
    try:
        env.reset(seed=0)
        stem = visible_stem()
        # the old predictable respawn names, many generations ahead, and guesses at the
        # new scheme's names under the same visible prefix
        planted = [f"sem.{stem}r{w}g{g}" for w in range(2) for g in range(1, 121)]
        planted += [f"sem.{stem}r{w}_{secrets.token_hex(8)}" for w in range(2) for _ in range(20)]
        planted += [f"sem.{stem}r{w}_{'0' * n}" for w in range(2) for n in (8, 16)]
        create_as_nobody(planted)
        kill_and_step_until_restarted(env, 0)
        assert env.health()[0]["restarts"] == 1, env.health()[0]
        env.step(np.ones(2, np.int64))
        assert all(h["alive"] for h in env.health())
    finally:
        env.close()
        remove_entries(planted)


def test_a_name_clash_is_retried_and_is_not_a_failed_restart(monkeypatch):
    env = FastVectorEnv([CounterEnv] * 2, context="fork", max_restarts=5)
    clash = "c1a5" * 4
    squatter = None
    try:
        env.reset(seed=0)
        squatter = f"/{visible_stem()}r0_{clash}"
        posix_ipc.Semaphore(squatter, posix_ipc.O_CREX).close()
        real, drawn = fastvec.shm.new_token, []

        def token() -> str:  # the first draw names the squatter's semaphore
            drawn.append(clash if not drawn else real())
            return drawn[-1]

        monkeypatch.setattr(fastvec.shm, "new_token", token)
        kill_and_step_until_restarted(env, 0)
        assert len(drawn) >= 2 and drawn[0] == clash, drawn
        assert env.health()[0]["restarts"] == 1, env.health()[0]
        env.step(np.ones(2, np.int64))
    finally:
        env.close()
        if squatter is not None:
            assert os.path.exists(f"{SHM_DIR}/sem.{squatter[1:]}"), "the clashing name was unlinked"
            posix_ipc.unlink_semaphore(squatter)
