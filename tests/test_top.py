"""``fastvec top`` against real jobs in subprocesses: it lists a live instance with its
workers, shows a SIGKILLed worker's restart right after the respawn, forgets a job that
exited, refuses a header of another layout version, and is not broken or held up by
hostile files in /dev/shm."""

from __future__ import annotations

import json
import os
import signal
import struct
import time

import pytest

from conftest import process_gone, wait_until
from fastvec import shm, stats
from observed import Job, fastvec, hostile_names, instance_of, top_once


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path)
    try:
        yield j
    finally:
        j.kill()


def test_top_follows_a_job_through_a_worker_restart_to_its_exit(job, tmp_path):
    ready = job.wait_for("ready")
    report = top_once(cwd=tmp_path)
    inst = instance_of(report, job)
    assert inst is not None, report
    assert inst["owner_pid"] == job.proc.pid
    assert (inst["num_envs"], inst["num_workers"], inst["envs_per_worker"]) == (4, 2, 2)
    assert inst["layout_version"] == stats.VERSION == report["layout_version"]
    workers = inst["workers"]
    assert [w["worker"] for w in workers] == [0, 1]
    assert [w["pid"] for w in workers] == ready["pids"]
    assert [w["envs"] for w in workers] == [[0, 1], [2, 3]]
    for w in workers:
        assert w["state"] == "serving" and w["restarts"] == 0 and w["last_reason"] is None
        assert w["steps"] > 0 and w["steps_per_s"] > 0, w
        assert 0 < w["step_p50_ms"] <= w["step_p99_ms"] < 1000, w
        assert 0 <= w["heartbeat_age_s"] < 2.0, w
        assert w["rss_bytes"] > 1 << 20 and w["requests"] >= w["steps"]

    victim = ready["pids"][0]
    os.kill(victim, signal.SIGKILL)
    restarted = job.wait_for("restarted", timeout=30)
    assert restarted["envs"] == [0, 1] and restarted["pids"][0] != victim
    t0 = time.monotonic()
    report = top_once(cwd=tmp_path)  # started after the respawn: must show it already
    took = time.monotonic() - t0
    w0, w1 = instance_of(report, job)["workers"]
    assert w0["restarts"] == 1 and w0["restart_reasons"] == {"died": 1}, w0
    assert w0["last_reason"] == "died" and "SIGKILL" in w0["last_failure"], w0
    assert w0["pid"] == restarted["pids"][0] and w0["generation"] == 1
    assert w0["state"] == "resumed"  # the new process replayed its envs' episodes
    assert abs(w0["last_failure_time"] - restarted["time"]) < 5.0
    assert w1["restarts"] == 0 and w1["pid"] == ready["pids"][1]
    assert took < 5.0, f"top --once took {took:.1f} s"
    assert w0["steps"] >= workers[0]["steps"], "the step count survives the respawn"

    job.finish()
    assert wait_until(lambda: process_gone(job.proc.pid), 10)
    report = top_once(cwd=tmp_path)
    assert instance_of(report, job) is None, report
    assert not job.leftovers()


def test_top_shows_the_spares_of_a_job(tmp_path):
    """A job with spares=1: top says whether the spare is ready, and that it is ready
    again (another one) after a worker's slot adopted it."""
    job = Job(tmp_path, spares=1)
    try:
        ready = job.wait_for("ready")
        assert wait_until(lambda: instance_of(top_once(cwd=tmp_path), job)["spares_ready"] == 1,
                          30)
        inst = instance_of(top_once(cwd=tmp_path), job)
        assert inst["spares_wanted"] == 1 and len(inst["workers"]) == 2
        os.kill(ready["pids"][1], signal.SIGKILL)
        job.wait_for("restarted", timeout=30)
        assert wait_until(lambda: instance_of(top_once(cwd=tmp_path), job)["spares_ready"] == 1,
                          30)
        done = fastvec("top", "--once", "--window", "0.2", cwd=tmp_path)
        assert "spares 1/1 ready" in done.stdout, done.stdout
        job.finish()
        assert wait_until(lambda: process_gone(job.proc.pid), 10)
        assert not job.leftovers()
    finally:
        job.kill()


def test_the_table_view_shows_the_job(job, tmp_path):
    job.wait_for("ready")
    done = fastvec("top", "--once", "--window", "0.2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    name = f"fv{job.proc.pid}_"
    assert name in done.stdout and "serving" in done.stdout, done.stdout


def _fake_instance(header: bytes | None, size: int = 8192):
    """A live instance of this process (its lock held) whose main segment ends with
    ``header`` (None: garbage)."""
    names = shm.Names(shm.new_prefix())
    seg = names.new_segment("main", size)
    if header is None:
        seg.mm[:] = os.urandom(size)
    else:
        seg.mm[size - len(header):] = header
    return names, seg


def _header_of_version(version: int, size: int = 8192) -> bytes:
    buf = bytearray(size)
    stats.write_header(buf, num_workers=1, num_envs=1, envs_per_worker=1, owner_pid=os.getpid())
    struct.pack_into("<I", buf, size - stats.HEADER_SIZE + 4, version)
    return bytes(buf[size - stats.HEADER_SIZE:])


@pytest.mark.parametrize("kind", ["version", "garbage"])
def test_a_header_this_fastvec_cannot_read_is_refused_with_the_versions(kind, tmp_path):
    header = _header_of_version(stats.VERSION + 95) if kind == "version" else None
    names, seg = _fake_instance(header)
    name = names.prefix.strip("/").rstrip("_")
    try:
        done = fastvec("top", "--once", "--json", "--window", "0", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        refused = {r["instance"]: r["error"] for r in report["refused"]}
        assert name in refused, report
        assert not any(i["instance"] == name for i in report["instances"])
        if kind == "version":
            want = f"layout version {stats.VERSION + 95}; this fastvec reads layout version " \
                   f"{stats.VERSION}"
        else:
            want = f"reads layout version {stats.VERSION} only"
        assert want in refused[name], refused[name]
        assert name in done.stderr and want in done.stderr, done.stderr
        table = fastvec("top", "--once", "--window", "0", cwd=tmp_path)
        assert "refused" in table.stdout and name in table.stdout, table.stdout
    finally:
        seg.close()
        names.unlink_all()


def test_hostile_and_dead_names_neither_break_nor_hold_up_top(tmp_path):
    """A FIFO and a symlink named like locks, another user's lock, a dead owner's lock
    and main segment (nobody holds the lock), a held lock with a garbage or FIFO main
    segment, unparsable names: top lists none of them as live, refuses only what is live
    and unreadable, and returns promptly."""
    ours = f"fv{os.getpid()}_"
    with hostile_names() as unreadable:
        t0 = time.monotonic()
        report = top_once(cwd=tmp_path)
        assert time.monotonic() - t0 < 15
    assert not [i for i in report["instances"] if i["instance"].startswith(ours)], report
    refused = [r["instance"] for r in report["refused"] if r["instance"].startswith(ours)]
    assert refused == [unreadable], report
