"""The statistics a FastVectorEnv publishes for readers outside the job (fastvec/stats.py,
csrc/ring.h lines 4-15): the histogram's buckets and percentiles by known answers, the
seqlock under a concurrent writer, the header's refusals, and a real env's slots as a
reader in this process sees them (found through the instance's own lock)."""

from __future__ import annotations

import os
import signal
import struct
import threading

import numpy as np
import pytest

from conftest import wait_until
from fastvec import FastVectorEnv, _ring, stats
from fastvec.errors import StatsLayoutError
from fastvec.failures import Failure
from fastvec.instances import Registry
from fastvec.layout import Plan
from faults import BuildFailsAfterFirst, CounterEnv


def block(offset: int = 0, fill: int = 0):
    buf = bytearray([fill]) * (offset + _ring.CTL_SIZE)
    return buf, _ring.Ctl(buf, offset)


# -- the histogram ----------------------------------------------------------------------------


@pytest.mark.parametrize("ns,bucket", [(0, 0), (1, 0), (2, 1), (3, 1), (1023, 9), (1024, 10),
                                       (1025, 10), (2**40, 40), (2**55 - 1, 54), (2**55, 55),
                                       (2**63, 55), (2**64 - 1, 55)])
def test_hist_bucket_is_floor_log2_capped(ns, bucket):
    assert _ring.hist_bucket(ns) == bucket
    assert _ring.HIST_BUCKETS == 56


def test_complete_counts_step_requests_only_and_keeps_their_sum():
    buf, ctl = block()
    ctl.init(0, 0, 1, 0)
    for seq, op in enumerate([_ring.OP_STEP, _ring.OP_RESET, _ring.OP_STEP, _ring.OP_CALL], 1):
        ctl.request(seq, op, 0)
        ctl.begin()
        ctl.complete(seq, _ring.ST_OK)
    snap = _ring.snapshot(bytes(buf), 0)
    assert ctl.progress == 4 and ctl.step_count == 2 == sum(snap["step_hist"])
    took = ctl.last_request_ns  # the last request (a call) is not in the histogram
    assert snap["step_ns_sum"] > 0 and took > 0
    ctl.complete(5, _ring.ST_OK)  # no begin(): a start-up reply, no duration
    assert ctl.step_count == 2


def test_percentile_interpolates_within_log2_buckets():
    hist = [0] * _ring.HIST_BUCKETS
    assert stats.percentile(hist, 50) is None
    hist[10] = 100  # 100 durations in [1024, 2048) ns
    assert stats.percentile(hist, 50) == pytest.approx((1024 + 1024 * 0.5) / 1e9)
    assert stats.percentile(hist, 100) == pytest.approx(2048 / 1e9)
    hist[20] = 1  # one slow outlier: p99 stays in bucket 10, p100 is the outlier's bucket
    assert stats.percentile(hist, 99) < 2048 / 1e9 < stats.percentile(hist, 100)
    assert stats.hist_delta(hist, None) == tuple(hist)
    later = list(hist)
    later[10] += 5
    assert stats.hist_delta(later, hist)[10] == 5 and sum(stats.hist_delta(later, hist)) == 5


# -- publishing, and reading back -----------------------------------------------------------------


def test_publish_round_trips_and_init_leaves_the_statistics_alone():
    buf, ctl = block(_ring.CTL_SIZE)
    ctl.init(3, 0, 1, 0)
    failure = Failure("hung", "a step ran 9.0 s > step_timeout=8 s " + "é" * 200)
    stats.publish_slot(ctl, _ring.STATE_SERVING, {"died": 2, "hung": 1, "weird": 4},
                       recycles=3, base_requests=10, base_episodes=7, last_failure=failure)
    ctl.init(3, 1, 1, 0)  # a respawn wipes the generation's lines only
    ctl.beat(1)
    snap = _ring.snapshot(bytes(buf), _ring.CTL_SIZE)
    assert bytes(buf[:_ring.CTL_SIZE]) == bytes(_ring.CTL_SIZE)
    ws = stats.worker_stats(snap)
    assert ws.state == "serving" and ws.generation == 1 and ws.worker == 3
    assert ws.restarts == {"died": 2, "hung": 1, "other": 4} and ws.recycles == 3
    assert ws.requests == 10 and ws.episodes == 7
    assert ws.last_reason == "hung" and ws.last_failure_time == pytest.approx(failure.when)
    assert ws.last_failure.startswith("a step ran 9.0 s")
    assert len(ws.last_failure.encode()) <= _ring.DETAIL_SIZE - 1  # cut, never mid-character
    assert ws.last_failure.endswith("é")
    assert 0 <= ws.heartbeat_age < 5 and ws.busy_seconds is None


def test_snapshot_never_sees_a_half_published_block():
    """A writer thread publishes blocks whose every field carries the same number; a
    reader copying at the same time must always find one number throughout."""
    buf, ctl = block()
    ctl.init(0, 0, 1, 0)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            i += 1
            ctl.publish(i & 0xFFFF, [i] * _ring.REASONS, i, i, i, i & 0xFFFF, i,
                        str(i).encode() * 8)

    t = threading.Thread(target=writer)
    t.start()
    try:
        seen = set()
        for _ in range(3000):
            snap = _ring.snapshot(buf, 0)
            i = snap["recycles"]
            assert snap["restarts"] == [i] * _ring.REASONS
            assert (snap["base_requests"], snap["base_episodes"], snap["last_failure_ns"]) == \
                (i, i, i)
            assert snap["state"] == snap["last_reason"] == i & 0xFFFF
            assert snap["last_detail"] == (str(i) * 8 if i else "")
            seen.add(i)
        assert len(seen) > 1, "the writer never ran while the reader read"
    finally:
        stop.set()
        t.join()
    assert snap["pub_seq"] % 2 == 0


def test_snapshot_of_a_read_only_buffer_and_bad_offsets():
    buf, ctl = block()
    ctl.init(0, 0, 1, 0)
    assert _ring.snapshot(bytes(buf), 0)["magic"] == _ring.MAGIC
    for offset in (-64, 32, 64):
        with pytest.raises(ValueError):
            _ring.snapshot(bytes(buf), offset)


# -- the header -----------------------------------------------------------------------------------


def header_buf(size: int = 8192, **fields):
    buf = bytearray(size)
    kw = {"num_workers": 2, "num_envs": 3, "envs_per_worker": 2, "owner_pid": 77, **fields}
    stats.write_header(buf, **kw)
    return buf


def test_header_round_trip_and_envs_of_each_worker():
    h = stats.read_header(header_buf())
    assert (h.version, h.ctl_size, h.num_workers, h.num_envs, h.owner_pid) == \
        (stats.VERSION, _ring.CTL_SIZE, 2, 3, 77)
    assert h.envs(0) == [0, 1] and h.envs(1) == [2]
    assert stats.read_header(bytearray(8192)) is None, "no magic yet: being built"


@pytest.mark.parametrize("offset,value,match", [
    (4, 3, "layout version 3; this fastvec reads layout version 4"),
    (0, b"XXXX", "no fastvec stats header"),
    (12, 256, "inconsistent"),
    (16, 100, "inconsistent"),  # more control blocks than the segment holds
    (16, 1, "inconsistent"),  # 3 envs, 2 per worker: 2 workers, not 1
    (48, 4096, "inconsistent"),  # the header's own idea of the segment's size
])
def test_headers_this_fastvec_cannot_read_are_refused(offset, value, match):
    buf = header_buf()
    base = len(buf) - stats.HEADER_SIZE
    if isinstance(value, bytes):
        buf[base + offset:base + offset + len(value)] = value
    else:
        struct.pack_into("<Q" if offset >= 32 else "<I", buf, base + offset, value)
    with pytest.raises(StatsLayoutError, match=match):
        stats.read_header(buf)


def test_the_plan_ends_with_the_header():
    plan = Plan(CounterEnv().observation_space, CounterEnv().action_space, 5, 2, 2)
    assert plan.stats_offset % 64 == 0 and plan.size == plan.stats_offset + stats.HEADER_SIZE
    assert plan.info_arrays.offset + plan.info_arrays.nbytes <= plan.stats_offset


# -- a real env, read through its lock by a reader in this process ---------------------------------


def looks(registry: Registry, env: FastVectorEnv):
    ready, refused = registry.scan()
    mine = [i for i in ready if i.header.owner_pid == os.getpid()]
    assert not [r for r in refused if r.instance.startswith(f"fv{os.getpid()}_")], refused
    assert len(mine) == 1, [i.name for i in ready]
    return mine[0].workers()


def test_a_live_env_as_readers_see_it_through_restart_disable_and_close(tmp_path):
    marker = tmp_path / "m"
    fns = [CounterEnv, CounterEnv, BuildFailsAfterFirst(str(marker)), CounterEnv]
    env = FastVectorEnv(fns, envs_per_worker=2, max_restarts=1, on_budget_exhausted="disable")
    registry = Registry()
    try:
        env.reset(seed=0)
        for _ in range(10):
            env.step(np.ones(4, np.int64))
        w = looks(registry, env)
        assert [x.state for x in w] == ["serving", "serving"]
        assert [x.pid for x in w] == [h["pid"] for h in env.health()]
        assert [x.envs for x in w] == [[0, 1], [2, 3]]
        assert all(x.steps == 10 and x.requests == 12 for x in w), w  # start, reset, steps
        os.kill(env.health()[0]["pid"], signal.SIGKILL)
        env.step(np.ones(4, np.int64))
        w = looks(registry, env)
        assert w[0].restarts == {"died": 1} and w[0].last_reason == "died"
        # the new process replayed its envs' episodes and goes on with them
        assert w[0].state == "resumed" and w[0].generation == 1 and w[0].steps >= 10
        assert w[0].pid == env.health()[0]["pid"] and w[1].restarts == {}
        os.kill(env.health()[1]["pid"], signal.SIGKILL)  # its rebuild raises: disabled
        env.step(np.ones(4, np.int64))
        w = looks(registry, env)
        assert w[1].state == "disabled" and w[1].last_reason == "start", w[1]
        assert w[1].restarts == {"died": 1, "start": 1}
        assert env.health()[1]["disabled"]
    finally:
        env.close()
    ready, _ = registry.scan()
    assert not [i for i in ready if i.header.owner_pid == os.getpid()]
    assert not [name for name in registry.open if name.startswith(f"fv{os.getpid()}_")]
    registry.close()


def test_the_state_turns_replacing_while_the_parent_replaces(tmp_path):
    env = FastVectorEnv([CounterEnv] * 2, step_timeout=None)
    registry = Registry()
    try:
        env.reset(seed=0)
        os.kill(env.health()[1]["pid"], signal.SIGKILL)
        # the watchdog flags the death on its own; the parent replaces at its next step
        assert wait_until(lambda: looks(registry, env)[1].state == "replacing", 5.0)
        env.step(np.ones(2, np.int64))
        assert looks(registry, env)[1].state == "resumed"  # its episode replayed
    finally:
        env.close()
        registry.close()
