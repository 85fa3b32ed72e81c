"""fastvec.shm under real faults: a full /dev/shm, owners in another PID namespace, owners
killed by SIGKILL and SIGTERM.

A small /dev/shm is a private tmpfs in a private mount namespace (``unshare -m``), so these
tests never fill or sweep the machine's /dev/shm; they are skipped where ``unshare`` is not
permitted. Each scenario runs in a child Python and reports back through its exit status.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from fastvec.shm import LOCK, SHM_DIR, Names, Segment, create_semaphore, leftovers, new_prefix

pytestmark = pytest.mark.timeout(120)

TESTS = os.path.dirname(os.path.abspath(__file__))
CONTEXTS = ["fork", "spawn"]


@functools.lru_cache(maxsize=None)
def _permitted(*cmd: str) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def need_private_shm() -> None:
    if not _permitted("unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"):
        pytest.skip("needs `unshare -m` and mount (root or CAP_SYS_ADMIN) for a private /dev/shm")


def need_pid_namespace() -> None:
    need_private_shm()
    if not _permitted("unshare", "-pf", "--mount-proc", "true"):
        pytest.skip("needs `unshare -pf --mount-proc` for a PID namespace")


def run_python(code: str, *, shm_size: str | None = None, timeout: float = 90,
               wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a child Python (with tests/ importable), in a private /dev/shm of
    ``shm_size`` if given."""
    cmd = [*wrap, sys.executable, "-c", textwrap.dedent(code)]
    if shm_size is not None:
        cmd = ["unshare", "-m", "sh", "-c",
               f'mount -t tmpfs -o size={shm_size} tmpfs {SHM_DIR} && exec "$@"', "sh", *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
        TESTS, os.environ.get("PYTHONPATH")])))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=TESTS)


def assert_ok(proc: subprocess.CompletedProcess) -> str:
    detail = f"rc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, detail  # -7 would be SIGBUS
    assert "OK" in proc.stdout, detail
    return proc.stdout


# -- a full /dev/shm ---------------------------------------------------------------------------


def test_a_layout_larger_than_dev_shm_is_an_error_with_the_numbers_not_sigbus():
    need_private_shm()
    out = assert_ok(run_python("""
        import errno, functools, os, re
        import numpy as np
        from gymnasium import spaces
        import envs, fastvec

        big = spaces.Box(0, 255, (4 << 20,), np.uint8)  # 4 envs x 2 ring slots x 4 MiB > 8 MiB
        fns = [functools.partial(envs.SpaceEnv, big)] * 4
        try:
            env = fastvec.FastVectorEnv(fns, context="fork")
        except fastvec.SharedMemoryFullError as exc:
            msg = str(exc)
            needed, free = [int(n) for n in re.findall(r"(\\d+) bytes", msg)][:2]
            assert needed >= 32 << 20 and free <= 8 << 20, msg
            assert "--shm-size" in msg and "64 MiB" in msg and "ring_depth" in msg, msg
            assert exc.errno == errno.ENOSPC and isinstance(exc, OSError)
            assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
            print("OK", msg)
        else:
            env.reset(seed=0)  # without fallocate this write was the SIGBUS
            raise SystemExit("no SharedMemoryFullError for a layout larger than /dev/shm")
    """, shm_size="8m"))
    assert "/dev/shm has" in out


def test_a_segment_or_semaphore_on_a_full_dev_shm_is_an_error_and_leaves_nothing():
    need_private_shm()
    assert_ok(run_python("""
        import os
        import fastvec
        from fastvec.shm import Names, Segment, create_semaphore, free_bytes, new_prefix

        fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR)
        os.posix_fallocate(fd, 0, free_bytes())  # nothing left
        names = Names(new_prefix())  # the lock takes no pages: it still works
        for make in (lambda: create_semaphore(names.prefix + "done"),
                     lambda: Segment(names.prefix + "main", 4096, create=True)):
            try:
                make()
            except fastvec.SharedMemoryFullError as exc:
                assert "0 bytes (0.0 MiB) free" in str(exc), exc
            else:
                raise SystemExit("created on a full /dev/shm")
        names.unlink_all()
        assert os.listdir("/dev/shm") == ["filler"], os.listdir("/dev/shm")
        print("OK")
    """, shm_size="8m"))


def test_a_side_buffer_grow_beyond_free_space_raises_and_keeps_the_old_size():
    need_private_shm()
    assert_ok(run_python("""
        import os
        import fastvec
        from fastvec.shm import Names, Segment, get_pickle, new_prefix, put_pickle

        names = Names(new_prefix())
        names.track_segment(names.prefix + "p0")
        seg = Segment(names.prefix + "p0", 64 << 10, create=True)
        peer = Segment(seg.name)
        # The second grow is smaller than the failed first one: a segment left at the
        # failed size would look big enough and SIGBUS on the unallocated tail.
        for nbytes in (16 << 20, 12 << 20):
            try:
                put_pickle(seg, b"x" * nbytes, 1 << 30)
            except fastvec.PayloadTooLargeError as exc:
                assert "MiB) free" in str(exc) and "--shm-size" in str(exc), exc
            else:
                raise SystemExit(f"grew the side buffer to {nbytes} bytes on an 8 MiB /dev/shm")
            peer.remap()
            assert seg.size == peer.size == 64 << 10, (seg.size, peer.size)
        n = put_pickle(seg, {"still": "usable"}, 1 << 30)
        assert get_pickle(peer, n) == {"still": "usable"}
        seg.close(); peer.close()
        names.unlink_all()
        assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
        print("OK")
    """, shm_size="8m"))


def test_payloads_that_outgrow_dev_shm_raise_and_the_env_keeps_its_workers():
    need_private_shm()
    assert_ok(run_python("""
        import functools, os
        import numpy as np
        import envs, fastvec

        fns = [functools.partial(envs.AttrEnv, info_bytes=12 << 20)] * 2
        env = fastvec.FastVectorEnv(fns, context="fork", max_payload_bytes=64 << 20)
        env.reset(seed=0)
        pids = [h["pid"] for h in env.health()]
        for _ in range(2):  # grown by the workers (step infos)
            try:
                env.step(np.array([0, 1]))
            except fastvec.PayloadTooLargeError:
                pass
            else:
                raise SystemExit("a 12 MiB info fit an 8 MiB /dev/shm")
        env.set_attr("info_bytes", 0)
        env.step(np.array([0, 1]))
        try:  # grown by the parent (call arguments)
            env.call("echo", np.zeros(12 << 20, np.uint8))
        except fastvec.PayloadTooLargeError:
            pass
        else:
            raise SystemExit("a 12 MiB argument fit an 8 MiB /dev/shm")
        assert env.call("add", 1) == (1, 1)
        assert [h["pid"] for h in env.health()] == pids, "a worker died"
        env.close()
        assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
        print("OK")
    """, shm_size="8m"))


# -- ownership: the lock, sweeps, PID namespaces -------------------------------------------


def test_names_create_the_lock_first_and_unlink_it_last_and_twice_is_harmless():
    names = Names(new_prefix())
    bare = names.prefix.lstrip("/")
    assert [n for n in leftovers() if n.startswith(bare)] == [bare + LOCK]
    names.track_segment(names.prefix + "main")
    Segment(names.prefix + "main", 4096, create=True).close()
    names.track_semaphore(names.prefix + "done")
    create_semaphore(names.prefix + "done").close()
    names.track_semaphore(names.prefix + "r0g0")
    create_semaphore(names.prefix + "r0g0").close()
    names.forget_semaphore(names.prefix + "r0g0")
    assert not os.path.exists(f"{SHM_DIR}/sem.{bare}r0g0")
    fds = psutil.Process().num_fds()
    names.unlink_all()
    assert psutil.Process().num_fds() == fds - 1  # the lock's fd
    assert not [n for n in leftovers() if bare in n]
    names.unlink_all()


def test_a_sweep_keeps_a_live_instance_and_orphans_younger_than_min_age():
    need_private_shm()  # sweep_stale(min_age=0) would also sweep other users' orphans
    assert_ok(run_python("""
        import os, subprocess, sys
        from fastvec.shm import Names, Segment, create_semaphore, new_prefix, sweep_stale

        names = Names(new_prefix())
        names.track_segment(names.prefix + "main")
        Segment(names.prefix + "main", 4096, create=True).close()
        assert sweep_stale(min_age=0) == []  # locked: live
        # orphans (no lock file): one with a dead pid in its name, one with a live pid
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()
        for stem in (f"/fv{dead}_00000001_", f"/fv{os.getppid()}_00000002_"):
            create_semaphore(stem + "done").close()
        assert sweep_stale() == []  # younger than ORPHAN_AGE: maybe being built right now
        # a visible pid vetoes: an instance of an older fastvec has no lock file
        assert sweep_stale(min_age=0) == [f"sem.fv{dead}_00000001_done"]
        names.unlink_all()
        assert os.listdir("/dev/shm") == [f"sem.fv{os.getppid()}_00000002_done"]
        print("OK")
    """, shm_size="1m"))


# The scenarios below run in a private /dev/shm: their sweeps touch nothing else on the
# machine, and nothing else (another fastvec's sweep) can clean up in their place. They
# sweep from a new PID namespace, where no pid of the owner is visible.
_SWEEP_ELSEWHERE = """
    import ast, subprocess, sys
    def sweep_elsewhere():
        code = ("import os, sys; from fastvec.shm import sweep_stale; "
                f"assert not os.path.exists('/proc/{os.getpid()}'); "
                "print(sweep_stale(min_age=0))")
        out = subprocess.run(["unshare", "-pf", "--mount-proc", sys.executable, "-c", code],
                             capture_output=True, text=True, check=True).stdout
        return ast.literal_eval(out.strip().splitlines()[-1])
"""


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_sweep_from_another_pid_namespace_leaves_a_live_instance_alone(context):
    need_pid_namespace()
    assert_ok(run_python(_SWEEP_ELSEWHERE + f"""
    import os
    import numpy as np
    import envs, fastvec
    if __name__ == "__main__":
        env = fastvec.FastVectorEnv([envs.AttrEnv] * 2, context={context!r})
        env.reset(seed=0)
        before = sorted(os.listdir("/dev/shm"))
        assert any(n.endswith("_lock") for n in before), before
        removed = sweep_elsewhere()
        assert removed == [] and sorted(os.listdir("/dev/shm")) == before, (removed, before)
        env.step(np.array([0, 1]))
        env.close()
        assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
        print("OK")
    """, shm_size="16m"))


_WAITS = """
    import time
    import psutil
    def wait_until(pred, timeout):
        deadline = time.monotonic() + timeout
        while not pred() and time.monotonic() < deadline:
            time.sleep(0.02)
        return pred()
    def alive(tid):
        try:
            return psutil.Process(tid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    def gone(pid):  # every thread: a zombie leader's siblings may still hold its fds
        try:
            return not any(alive(t.id) for t in psutil.Process(pid).threads())
        except psutil.NoSuchProcess:
            return True
"""


def test_a_sweep_from_another_pid_namespace_removes_a_killed_owners_names():
    need_pid_namespace()
    assert_ok(run_python(_SWEEP_ELSEWHERE + _WAITS + """
    import os, signal, subprocess, sys
    OWNER = '''
    import os, sys, time
    from multiprocessing import resource_tracker
    import numpy as np
    import envs, fastvec
    env = fastvec.FastVectorEnv([envs.AttrEnv] * 2, context="fork")
    env.reset(seed=0)
    print(resource_tracker._resource_tracker._pid, *[h["pid"] for h in env.health()], flush=True)
    time.sleep(300)
    '''
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        tracker, *workers = [int(p) for p in owner.stdout.readline().split()]
        names = sorted(os.listdir("/dev/shm"))
        assert len(names) == 7, names  # lock, main, p0, p1, done, r0, r1 (+ tokens)
        os.kill(tracker, signal.SIGKILL)  # the tracker dies too: only a sweep can clean up now
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        # forked workers hold the lock until they exit
        assert wait_until(lambda: all(gone(p) for p in workers), 30.0), workers
        assert sorted(os.listdir("/dev/shm")) == names, os.listdir("/dev/shm")
        removed = sweep_elsewhere()
        assert sorted(removed) == names and os.listdir("/dev/shm") == [], (removed, names)
    finally:
        owner.kill()
        owner.wait()
    print("OK")
    """, shm_size="16m"))


# -- the resource tracker: memory back when the owner dies -------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("context", CONTEXTS)
def test_a_killed_owners_names_and_workers_are_gone_without_another_run(context, sig):
    need_private_shm()  # where only the owner's resource tracker can clean up
    assert_ok(run_python(_WAITS + f"""
    import os, subprocess, sys
    OWNER = '''
    import sys, time
    import envs, fastvec
    if __name__ == "__main__":
        env = fastvec.FastVectorEnv([envs.AttrEnv] * 2, context={context!r})
        env.reset(seed=0)
        print(*[h["pid"] for h in env.health()], flush=True)
        time.sleep(300)
    '''
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(p) for p in owner.stdout.readline().split()]
        assert len(workers) == 2 and len(os.listdir("/dev/shm")) == 7, os.listdir("/dev/shm")
        owner.send_signal({int(sig)})
        assert owner.wait(30) == -{int(sig)}, owner.returncode
        assert wait_until(lambda: all(gone(p) for p in workers), 5.0), workers
        assert wait_until(lambda: not os.listdir("/dev/shm"), 5.0), os.listdir("/dev/shm")
    finally:
        owner.kill()
        owner.wait()
    print("OK")
    """, shm_size="16m"))


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_clean_run_leaves_no_warning_from_the_resource_tracker(context):
    """Every normal unlink is unregistered: no "leaked objects" warning when the tracker
    exits, no KeyError for a name it never had (a respawned worker's semaphore)."""
    proc = run_python(f"""
        import os, signal
        import numpy as np
        import envs, fastvec
        if __name__ == "__main__":
            env = fastvec.FastVectorEnv([envs.AttrEnv] * 2, context={context!r})
            env.reset(seed=0)
            os.kill(env.health()[0]["pid"], signal.SIGKILL)  # respawn: a new semaphore
            for _ in range(3):
                env.step(np.array([0, 1]))
            assert env.health()[0]["restarts"] >= 1, env.health()
            env.close()
            print("OK")
    """)
    assert_ok(proc)
    assert "resource_tracker" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_full_dev_shm_while_a_spare_would_adopt_disables_and_a_reset_recovers():
    """With spares=1, /dev/shm fills up, then a worker is SIGKILLed: its slot cannot get a
    new semaphore, so no spare is handed over (none is lost), every attempt fails fast and
    counted, and the env goes out of play (on_budget_exhausted="disable"); the step
    returns. With space again, a reset tries the slot again, and it adopts the spare."""
    need_private_shm()
    assert_ok(run_python("""
        import os, signal, time
        import numpy as np
        import fastvec
        from faults import CounterEnv
        from fastvec.shm import free_bytes

        env = fastvec.FastVectorEnv([CounterEnv] * 2, context="fork", spares=1,
                                    max_restarts=2, on_budget_exhausted="disable")
        env.reset(seed=0)
        deadline = time.monotonic() + 30
        while not [h for h in env.health() if h["spare"] and h["state"] == "ready"]:
            assert time.monotonic() < deadline, env.health()
            time.sleep(0.05)
        spare = [h["pid"] for h in env.health() if h["spare"]][0]
        fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR)
        os.posix_fallocate(fd, 0, free_bytes())
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        _, _, _, truncated, infos = env.step(np.zeros(2, np.int64))
        took = time.monotonic() - t0
        assert infos["_env_disabled"].tolist() == [True, False], infos
        worker = env.health()[0]
        assert truncated[0] and worker["reasons"] == {"died": 1, "start": 2}, worker
        assert "could not start a worker process" in worker["last_failure"], worker
        assert "SharedMemoryFullError" in worker["last_failure"], worker
        assert [h["pid"] for h in env.health() if h["spare"]] == [spare]  # not used up
        os.close(fd)
        os.unlink("/dev/shm/filler")
        env.reset(seed=1)
        assert env.health()[0]["pid"] == spare and not env.health()[0]["disabled"]
        env.close()
        assert os.listdir("/dev/shm") == [], os.listdir("/dev/shm")
        print("OK", f"{took:.2f} s")
    """, shm_size="8m"))
