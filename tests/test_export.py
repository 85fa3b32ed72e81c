"""``fastvec export`` against a real job in a subprocess: what it serves parses as
Prometheus' text format, carries ``instance`` and ``worker`` labels, and its step counters
move between two scrapes while the job steps."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import pytest

from observed import Job, fastvec, fastvec_command, hostile_names

parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture
def job(tmp_path):
    j = Job(tmp_path)
    try:
        yield j
    finally:
        j.kill()


@pytest.fixture
def exporter(tmp_path):
    """``fastvec export --port 0`` in a subprocess; yields the URL it serves."""
    proc = subprocess.Popen([*fastvec_command(), "export", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving http://" in line, (line, proc.poll())
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def scrape(url: str) -> dict:
    """{family name: {sample name and labels: value}} of one scrape, for the job's
    instance only (other jobs of this user may be live too)."""
    with urllib.request.urlopen(url, timeout=20) as resp:
        assert resp.status == 200
        text = resp.read().decode("utf-8")
    out: dict = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(family.name, {})[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def ours(samples: dict, prefix: str) -> dict:
    return {k: v for k, v in samples.items() if dict(k[1]).get("instance", "").startswith(prefix)}


def test_export_serves_parsable_metrics_whose_step_counters_move(job, exporter):
    job.wait_for("ready")
    first = scrape(exporter)
    time.sleep(0.5)
    second = scrape(exporter)
    steps1 = ours(first["fastvec_worker_steps"], job.prefix)
    steps2 = ours(second["fastvec_worker_steps"], job.prefix)
    workers = sorted(dict(labels)["worker"] for _, labels in steps1)
    assert workers == ["0", "1"], steps1
    for key, value in steps1.items():
        assert key[0] == "fastvec_worker_steps_total"
        assert steps2[key] > value > 0, (key, value, steps2[key])
    # the latency histogram: cumulative buckets, +Inf equal to the count, a sum
    hist = ours(second["fastvec_worker_step_latency_seconds"], job.prefix)
    for w in ("0", "1"):
        buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in hist.items()
                         if name.endswith("_bucket") and dict(labels)["worker"] == w)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == float("inf")
        count = [v for (name, labels), v in hist.items()
                 if name.endswith("_count") and dict(labels)["worker"] == w]
        total = [v for (name, labels), v in hist.items()
                 if name.endswith("_sum") and dict(labels)["worker"] == w]
        assert count == [counts[-1]] and counts[-1] > 0 and total[0] > 0
    state = ours(second["fastvec_worker_state"], job.prefix)
    serving = {dict(labels)["worker"] for (_, labels), v in state.items()
               if v == 1 and dict(labels)["state"] == "serving"}
    assert serving == {"0", "1"}
    restarts = ours(second["fastvec_worker_restarts"], job.prefix)
    assert restarts and all(v == 0 for v in restarts.values())
    info = ours(second["fastvec_instance_info"], job.prefix)
    assert [dict(labels)["owner_pid"] for _, labels in info] == [str(job.proc.pid)]
    job.finish()
    assert not ours(scrape(exporter).get("fastvec_instance_info", {}), job.prefix)


def test_hostile_names_do_not_break_a_scrape(tmp_path):
    with hostile_names() as unreadable:
        done = fastvec("export", "--port", "0", "--once", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    families = {f.name: f for f in parser.text_string_to_metric_families(done.stdout)}
    refused = [s.labels["instance"] for s in families["fastvec_instance_refused"].samples
               if s.labels["instance"].startswith(f"fv{os.getpid()}_")]
    assert refused == [unreadable]
    assert not [s for s in families["fastvec_instance_info"].samples
                if s.labels["instance"].startswith(f"fv{os.getpid()}_")]
