"""fastvec.shm under real faults: a full /dev/shm.

A small /dev/shm is a private tmpfs in a private mount namespace (``unshare -m``), so these
tests never fill the machine's /dev/shm; they are skipped where ``unshare`` is not
permitted. Each scenario runs in a child Python and reports back through its exit status.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import pytest

from fastvec.shm import SHM_DIR

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
