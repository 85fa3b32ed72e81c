"""A real training-like job in a subprocess, and the ``fastvec`` command run against it, for
the tests of ``fastvec top`` and ``fastvec export`` (no mocks: the job's own shared memory).

Run as a script, this file is the job::

    python observed.py STOP_FILE [NUM_ENVS ENVS_PER_WORKER [SPARES]]

It builds a FastVectorEnv of CartPole envs and steps it (about 1 ms apart) until STOP_FILE
exists or 120 s pass, then closes it. It prints one JSON line per event: ``ready`` (the
workers' pids), ``restarted`` (a worker was replaced: when, which, the new pids),
``closed``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_SECONDS = 120.0


def job_main(argv: list[str]) -> None:
    import gymnasium as gym
    import numpy as np

    from fastvec import FastVectorEnv

    stop = argv[0]
    num_envs, k = (int(argv[1]), int(argv[2])) if len(argv) > 2 else (4, 2)
    spares = int(argv[3]) if len(argv) > 3 else 0

    def say(event: str, **fields) -> None:
        print(json.dumps({"event": event, "time": time.time(), **fields}), flush=True)

    env = FastVectorEnv([lambda: gym.make("CartPole-v1")] * num_envs, envs_per_worker=k,
                        spares=spares)

    def pids() -> list:
        return [h["pid"] for h in env.health() if not h["spare"]]

    try:
        env.reset(seed=0)
        say("ready", pids=pids())
        deadline = time.monotonic() + MAX_SECONDS
        while not os.path.exists(stop) and time.monotonic() < deadline:
            for _ in range(20):
                _, _, _, _, infos = env.step(env.action_space.sample())
                if "worker_restarted" in infos or "worker_resumed" in infos:
                    none = np.zeros(env.num_envs, bool)
                    envs = np.flatnonzero(infos.get("_worker_restarted", none)
                                          | infos.get("_worker_resumed", none)).tolist()
                    say("restarted", envs=envs, pids=pids())
                time.sleep(0.001)
    finally:
        env.close()
    say("closed")


class Job:
    """The job above in a subprocess; its events are read by a thread."""

    def __init__(self, tmp_path, num_envs: int = 4, envs_per_worker: int = 2, spares: int = 0):
        self.stop_file = str(tmp_path / "stop")
        self.events: queue.Queue = queue.Queue()
        # From tmp_path, so that the installed fastvec is imported, not the source tree.
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "observed.py"), self.stop_file,
             str(num_envs), str(envs_per_worker), str(spares)],
            cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        self.prefix = f"fv{self.proc.pid}_"
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                pass

    def wait_for(self, event: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the job did not report {event!r} within {timeout} s")
            try:
                got = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if got["event"] == event:
                return got

    def finish(self, timeout: float = 30.0) -> None:
        """Ask the job to close its env and exit; wait for it."""
        open(self.stop_file, "w").close()
        self.proc.wait(timeout)

    def kill(self) -> None:
        """Teardown backstop: a job still running is killed; its names go with the
        resource tracker, or here."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        deadline = time.monotonic() + 10
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        for entry in self.leftovers():
            try:
                os.unlink(os.path.join("/dev/shm", entry))
            except OSError:
                pass

    def leftovers(self) -> list[str]:
        try:
            return [n for n in os.listdir("/dev/shm")
                    if n.startswith((self.prefix, "sem." + self.prefix))]
        except OSError:
            return []


def fastvec_command() -> list[str]:
    """The installed ``fastvec`` console script (next to this Python)."""
    script = shutil.which("fastvec", path=os.path.dirname(sys.executable))
    assert script, "the `fastvec` console script is not installed next to " + sys.executable
    return [script]


def fastvec(*args: str, timeout: float = 30.0, cwd=None) -> subprocess.CompletedProcess:
    """Run ``fastvec ARGS`` to completion; a hang fails the test (timeout). Tables are
    160 columns wide (as printed to a pipe without COLUMNS)."""
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([*fastvec_command(), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, check=False)


def top_once(cwd=None) -> dict:
    """``fastvec top --once --json``, parsed."""
    done = fastvec("top", "--once", "--json", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def instance_of(report: dict, job: Job) -> dict | None:
    """The job's instance in a report of ``fastvec top``, or None."""
    for inst in report["instances"]:
        if inst["instance"].startswith(job.prefix):
            return inst
    return None


@contextlib.contextmanager
def hostile_names():
    """Names in /dev/shm that look like this process's fastvec instances and are not: a
    FIFO and a symlink named like locks, another user's lock (nobody, uid 65534), a dead
    owner's lock and main segment (nobody holds the lock), unparsable names, held locks
    whose main segment is garbage, a FIFO, or missing. Yields the one instance a reader
    must refuse (live, its main segment unreadable); removes every name afterwards."""
    pid = os.getpid()
    made: list[str] = []
    held: list[int] = []

    def path(name: str) -> str:
        made.append(name)
        return os.path.join("/dev/shm", name)

    try:
        os.mkfifo(path(f"fv{pid}_a1_lock"))
        os.symlink(path(f"fv{pid}_a1_lock"), path(f"fv{pid}_a2_lock"))
        for name in (f"fv{pid}_a3_lock", f"fv{pid}_a3_main_00", f"fv{pid}_a4_lock",
                     f"fv{pid}_zz_lock", f"fv{pid}x_lock", f"fv{2**40}_a5_lock"):
            with open(path(name), "wb") as f:
                f.write(os.urandom(4096))
        os.chown(os.path.join("/dev/shm", f"fv{pid}_a4_lock"), 65534, 65534)
        for bare, main in ((f"fv{pid}_b1_", "garbage"), (f"fv{pid}_b2_", "fifo"),
                           (f"fv{pid}_b3_", None)):
            fd = os.open(path(bare + "lock"), os.O_RDWR | os.O_CREAT, 0o600)
            held.append(fd)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if main == "garbage":
                with open(path(bare + "main_00"), "wb") as f:
                    f.write(os.urandom(4096))
            elif main == "fifo":
                os.mkfifo(path(bare + "main_00"))
        yield f"fv{pid}_b1"
    finally:
        for fd in held:
            os.close(fd)
        for name in made:
            try:
                os.unlink(os.path.join("/dev/shm", name))
            except OSError:
                pass


if __name__ == "__main__":
    job_main(sys.argv[1:])
