"""The control block (fastvec._ring.Ctl over csrc/ring.h) and the slot layout of spaces
(fastvec.layout): byte offsets, field round trips, the heartbeat thread, and properties."""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import data_equivalence
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import envs as test_envs
from conftest import wait_until
from fastvec import _ring, layout
from fastvec.errors import InvalidActionError, RingError, SpaceMismatchError, UnsupportedSpaceError

U64 = st.integers(0, 2**64 - 1)
U32 = st.integers(0, 2**32 - 1)

# Byte offsets documented in csrc/ring.h: name -> (offset, struct format).
OFFSETS = {
    "magic": (0, "<I"), "version": (4, "<I"), "worker_index": (8, "<I"),
    "generation": (12, "<I"), "owner_pid": (16, "<q"),
    "req_seq": (64, "<Q"), "opcode": (72, "<I"), "ring_index": (76, "<I"),
    "req_payload_len": (80, "<Q"), "env_mask": (88, "<Q"), "flags": (96, "<I"),
    "batch_epoch": (100, "<I"),
    "resp_seq": (128, "<Q"), "status": (136, "<i"), "worker_pid": (140, "<i"),
    "resp_payload_len": (144, "<Q"), "busy_since_ns": (152, "<Q"),
    "last_request_ns": (160, "<Q"), "progress": (168, "<Q"), "episodes": (176, "<Q"),
    "rss_bytes": (184, "<Q"), "heartbeat": (192, "<I"), "payload_cap": (200, "<Q"),
    "beat_ns": (208, "<Q"),
    # the statistics lines: not wiped at init (fastvec/stats.py)
    "pub_seq": (256, "<Q"), "state": (264, "<I"), "last_reason": (268, "<I"),
    "last_failure_ns": (272, "<Q"), "base_requests": (280, "<Q"),
    "base_episodes": (288, "<Q"), "recycles": (296, "<Q"), "restarts": (320, "<8Q"),
    "last_detail": (384, "128s"), "step_ns_sum": (512, "<Q"), "step_hist": (576, "<56Q"),
}


def raw(buf, field, base=0):
    off, fmt = OFFSETS[field]
    values = struct.unpack_from(fmt, buf, base + off)
    return values[0] if len(values) == 1 else values


def put_raw(buf, field, value, base=0):
    off, fmt = OFFSETS[field]
    struct.pack_into(fmt, buf, base + off, value)


def remaining(buf, base=0):
    """Replies the batch block at ``base`` still owes (the low half of its state word)."""
    return struct.unpack_from("<Q", buf, base)[0] & 0xFFFFFFFF


def fresh(size=_ring.CTL_SIZE, offset=0, fill=0):
    buf = bytearray([fill]) * size
    return buf, _ring.Ctl(buf, offset)


# -- constants ---------------------------------------------------------------------------------


def test_constants_match_ring_h():
    assert _ring.CTL_SIZE == 1024 and _ring.VERSION == 4
    assert _ring.MAGIC == 0x31525646 and struct.pack("<I", _ring.MAGIC) == b"FVR1"
    assert (_ring.OP_NONE, _ring.OP_RESET, _ring.OP_STEP, _ring.OP_CALL, _ring.OP_SET_ATTR,
            _ring.OP_CLOSE) == (0, 1, 2, 3, 4, 5)
    assert (_ring.ST_OK, _ring.ST_ERROR, _ring.ST_MISMATCH) == (0, 1, 2)
    assert _ring.EXIT_ORPHANED == 75


def test_fields_sit_on_separate_cache_lines():
    parent = [o for f, (o, _) in OFFSETS.items() if o < 128]
    worker = [o for f, (o, _) in OFFSETS.items() if 128 <= o < 256]
    assert max(parent) < 128 <= min(worker)
    published = [o for f, (o, _) in OFFSETS.items() if 256 <= o < 512]  # the parent's
    assert min(published) == 256 and OFFSETS["step_ns_sum"][0] == 512  # then the worker's
    assert OFFSETS["req_seq"][0] % 64 == OFFSETS["resp_seq"][0] % 64 == 0
    assert OFFSETS["heartbeat"][0] == 192


# -- construction, init, check -------------------------------------------------------------------


@pytest.mark.parametrize("offset,size", [(-64, 256), (32, 512), (64, 256), (256, 300)])
def test_bad_offsets_are_refused(offset, size):
    with pytest.raises(ValueError):
        _ring.Ctl(bytearray(size), offset)


def test_read_only_buffer_is_refused():
    with pytest.raises((BufferError, ValueError, TypeError)):
        _ring.Ctl(bytes(256), 0)


def test_check_of_an_uninitialised_block_raises_ring_error():
    _, ctl = fresh()
    with pytest.raises(RingError, match="magic"):
        ctl.check()


def test_init_then_check_and_corruption():
    buf, ctl = fresh()
    ctl.init(3, 7, 12345, 41)
    ctl.check()
    assert raw(buf, "magic") == _ring.MAGIC
    assert raw(buf, "version") == 4
    assert raw(buf, "worker_index") == 3 and raw(buf, "generation") == 7 == ctl.generation
    assert raw(buf, "owner_pid") == 12345 == ctl.owner_pid
    assert ctl.req_seq == ctl.resp_seq == 41
    buf[0] ^= 0xFF
    with pytest.raises(RingError, match="magic"):
        ctl.check()
    ctl.init(3, 8, 12345, 0)
    ctl.check()
    put_raw(buf, "version", 99)
    with pytest.raises(RingError, match="version"):
        ctl.check()
    assert isinstance(RingError("x"), Exception)


def test_init_wipes_a_dirty_block():
    buf, ctl = fresh(fill=0xAB)
    ctl.init(1, 2, 3, 10)
    for field in ("opcode", "ring_index", "req_payload_len", "env_mask", "status",
                  "worker_pid", "resp_payload_len", "busy_since_ns", "last_request_ns",
                  "progress", "episodes", "rss_bytes", "heartbeat", "payload_cap"):
        assert raw(buf, field) == 0, field
    assert bytes(buf[24:64]) == bytes(40), "reserved bytes wiped"
    assert bytes(buf[208:256]) == bytes(48), "beat_ns and the reserved bytes wiped"
    assert bytes(buf[256:]) == b"\xab" * (_ring.CTL_SIZE - 256), "statistics left alone"


def test_two_blocks_in_one_buffer_do_not_interfere():
    buf = bytearray(3 * _ring.CTL_SIZE)
    a, b = _ring.Ctl(buf, 0), _ring.Ctl(buf, _ring.CTL_SIZE)
    a.init(0, 0, 1, 0)
    b.init(1, 5, 1, 100)
    a.request(7, _ring.OP_STEP, 1, 0, 1)
    b.complete(101, _ring.ST_ERROR, 9)
    assert (a.req_seq, a.resp_seq, a.status, a.progress) == (7, 0, 0, 0)
    assert (b.req_seq, b.resp_seq, b.status, b.progress) == (100, 101, 1, 1)
    assert raw(buf, "req_seq", base=_ring.CTL_SIZE) == 100
    assert bytes(buf[2 * _ring.CTL_SIZE:]) == bytes(_ring.CTL_SIZE)


def test_release_then_use_raises_ring_error():
    _, ctl = fresh()
    ctl.init(0, 0, 0, 0)
    ctl.release()
    with pytest.raises(RingError):
        ctl.req_seq
    with pytest.raises(RingError):
        ctl.request(1, 1, 0)


def test_mmap_buffer_can_close_after_release():
    mm = mmap.mmap(-1, 4096)
    ctl = _ring.Ctl(mm, 512)
    ctl.init(2, 0, os.getpid(), 0)
    assert raw(mm, "worker_index", base=512) == 2
    ctl.release()
    mm.close()


# -- request and complete -------------------------------------------------------------------------


@settings(database=None, max_examples=200, deadline=None)
@given(seq=U64, op=U32, ring=U32, plen=U64, mask=U64)
def test_request_fields_round_trip(seq, op, ring, plen, mask):
    base = _ring.CTL_SIZE
    buf, ctl = fresh(2 * base, base)
    ctl.init(0, 0, 1, 0)
    ctl.request(seq, op, ring, plen, mask)
    assert (ctl.req_seq, ctl.opcode, ctl.ring_index, ctl.req_payload_len, ctl.env_mask) == \
        (seq, op, ring, plen, mask)
    assert struct.unpack_from("<QIIQQ", buf, base + 64) == (seq, op, ring, plen, mask)
    assert ctl.resp_seq == 0, "a request does not touch the reply line"
    assert bytes(buf[:base]) == bytes(base), "nothing written outside the block"


def test_request_defaults_and_overflow():
    _, ctl = fresh()
    ctl.init(0, 0, 1, 0)
    ctl.request(5, _ring.OP_RESET, 1)
    assert (ctl.req_payload_len, ctl.env_mask) == (0, 0)
    with pytest.raises(OverflowError):
        ctl.request(-1, 0, 0)
    with pytest.raises(OverflowError):
        ctl.request(1, 2**32, 0)


def test_begin_and_complete_set_reply_and_progress():
    buf, ctl = fresh()
    ctl.init(0, 0, 1, 9)
    assert ctl.busy_since_ns == 0
    before = _ring.now_ns()
    ctl.begin()
    started = ctl.busy_since_ns
    assert started >= before and raw(buf, "busy_since_ns") == started
    ctl.complete(10, _ring.ST_ERROR, 1234)
    after = _ring.now_ns()
    assert ctl.resp_seq == 10 == raw(buf, "resp_seq")
    assert ctl.status == _ring.ST_ERROR == raw(buf, "status")
    assert ctl.resp_payload_len == 1234 == raw(buf, "resp_payload_len")
    assert ctl.progress == 1 == raw(buf, "progress")
    assert ctl.busy_since_ns == 0
    assert 0 <= ctl.last_request_ns <= after - started
    ctl.complete(11, _ring.ST_OK)  # no begin(): no duration
    assert (ctl.resp_seq, ctl.status, ctl.resp_payload_len, ctl.progress) == (11, 0, 0, 2)
    assert ctl.last_request_ns == 0
    assert ctl.req_seq == 9, "completing does not touch the request line"


@settings(database=None, max_examples=100, deadline=None)
@given(st.lists(st.tuples(U64, st.sampled_from([0, 1, 2]), U64), min_size=1, max_size=20))
def test_complete_sequence_counts_progress(replies):
    _, ctl = fresh()
    ctl.init(0, 0, 1, 0)
    for n, (seq, status, plen) in enumerate(replies, 1):
        ctl.begin()
        ctl.complete(seq, status, plen)
        assert (ctl.resp_seq, ctl.status, ctl.resp_payload_len, ctl.progress) == \
            (seq, status, plen, n)


@pytest.mark.parametrize("field,value", [("worker_pid", 4242), ("worker_pid", -1),
                                         ("episodes", 2**40), ("rss_bytes", 123456789),
                                         ("payload_cap", 65536)])
def test_worker_setters_write_their_offsets(field, value):
    buf, ctl = fresh()
    ctl.init(0, 0, 1, 0)
    setattr(ctl, field, value)
    assert getattr(ctl, field) == value == raw(buf, field)


@pytest.mark.parametrize("field", ["resp_seq", "heartbeat", "busy_since_ns", "progress",
                                   "last_request_ns", "episodes", "status"])
def test_raw_writes_are_read_by_the_properties(field):
    buf, ctl = fresh()
    ctl.init(0, 0, 1, 0)
    value = 77 if field != "status" else 2
    put_raw(buf, field, value)
    assert getattr(ctl, field) == value


def test_spin_until_returns_the_target_or_gives_up():
    _, ctl = fresh()
    ctl.init(0, 0, 1, 5)
    assert ctl.spin_resp_until(6, 0) == 5  # no spin: one look
    assert ctl.spin_resp_until(6, 20_000) == 5  # not reached: gives up, returns resp_seq
    ctl.complete(6, _ring.ST_OK)
    assert ctl.spin_resp_until(6, 10**12) == 6  # reached already: returns at once


def test_now_ns_does_not_go_backwards():
    values = [_ring.now_ns() for _ in range(1000)]
    assert values == sorted(values) and values[0] > 0


# -- the heartbeat thread in a child process ---------------------------------------------------


def _fork_heartbeat(mm, interval_ms, owner_pid, spin=True):
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            _ring.Ctl(mm, 0).start_heartbeat(interval_ms, owner_pid)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # hold the GIL: a pure Python busy loop
                if not spin:
                    time.sleep(0.01)
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def test_heartbeat_grows_in_a_child_while_its_main_thread_is_busy():
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED: visible across fork
    ctl = _ring.Ctl(mm, 0)
    ctl.init(0, 0, os.getpid(), 0)
    pid = _fork_heartbeat(mm, 2, os.getpid())
    try:
        assert wait_until(lambda: ctl.heartbeat >= 5, 10.0), ctl.heartbeat
        first = ctl.heartbeat
        assert wait_until(lambda: ctl.heartbeat > first + 3, 10.0)
        assert raw(mm, "heartbeat") >= first
        # a stall is a counter that stopped: a stopped process does not beat
        os.kill(pid, signal.SIGSTOP)
        os.waitpid(pid, os.WUNTRACED)
        stopped = ctl.heartbeat
        time.sleep(0.05)
        assert ctl.heartbeat == stopped
        os.kill(pid, signal.SIGCONT)
        assert wait_until(lambda: ctl.heartbeat > stopped, 10.0)
    finally:
        _reap(pid)
        ctl.release()
        mm.close()


def test_heartbeat_thread_exits_the_child_when_its_owner_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    mm = mmap.mmap(-1, 4096)
    ctl = _ring.Ctl(mm, 0)
    ctl.init(0, 0, dead, 0)
    pid = _fork_heartbeat(mm, 2, dead, spin=False)
    code = None

    def exited():
        nonlocal code
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
        return code is not None

    try:
        assert wait_until(exited, 10.0), "the orphaned child should exit on its own"
        assert code == _ring.EXIT_ORPHANED
        assert ctl.heartbeat >= 1
    finally:
        if code is None:
            _reap(pid)
        ctl.release()
        mm.close()


# -- layout: leaves, flatten, unflatten ----------------------------------------------------------


def test_leaves_of_a_nested_space():
    got = [(lf.path, lf.shape, lf.dtype) for lf in layout.leaves(test_envs.nested_obs_space())]
    assert got == [
        (("grid",), (2, 3), np.dtype(np.uint8)),
        (("mode",), (), np.dtype(np.int64)),
        (("parts", 0), (), np.dtype(np.int64)),
        (("parts", 1), (2,), np.dtype(np.int64)),
        (("parts", 2, "bits"), (4,), np.dtype(np.int8)),
        (("parts", 2, "vel"), (2, 2), np.dtype(np.float64)),
        (("pos",), (3,), np.dtype(np.float32)),
    ]


@pytest.mark.parametrize("space", [
    spaces.Text(3), spaces.Sequence(spaces.Discrete(2)),
    spaces.Graph(spaces.Box(0, 1, (2,)), None),
    spaces.Dict({"ok": spaces.Discrete(2), "bad": spaces.Text(2)}),
    spaces.Tuple((spaces.Discrete(2), spaces.Tuple((spaces.Text(2),)))),
], ids=["Text", "Sequence", "Graph", "Dict-Text", "Tuple-Tuple-Text"])
def test_spaces_without_fixed_size_are_pickled_leaves(space):
    lvs = layout.leaves(space)
    assert any(lf.pickled and lf.shape is None for lf in lvs)
    assert all(lf.shape is not None for lf in lvs if not lf.pickled)
    plan = layout.Plan(space, spaces.Discrete(2), 2, 2, 2)
    assert [r is None for r in plan.obs] == [lf.pickled for lf in lvs]


def test_a_non_space_is_refused():
    with pytest.raises(UnsupportedSpaceError):
        layout.leaves("not a space")


def leaf_spaces():
    return st.one_of(
        st.builds(lambda shape, dt: spaces.Box(0 if dt == np.uint8 else -5, 5, tuple(shape), dt),
                  st.lists(st.integers(1, 3), max_size=3),
                  st.sampled_from([np.float32, np.float64, np.uint8, np.int16])),
        st.builds(lambda n, s: spaces.Discrete(n, start=s), st.integers(1, 6),
                  st.integers(-3, 3)),
        st.builds(lambda nvec: spaces.MultiDiscrete(nvec),
                  st.lists(st.integers(1, 5), min_size=1, max_size=3)),
        st.builds(lambda n: spaces.MultiBinary(n),
                  st.one_of(st.integers(1, 4), st.lists(st.integers(1, 3), min_size=1,
                                                       max_size=2))),
    )


def nested_spaces():
    keys = st.text("abcdefgh", min_size=1, max_size=3)
    return st.recursive(
        leaf_spaces(),
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3).map(lambda xs: spaces.Tuple(xs)),
            st.dictionaries(keys, children, min_size=1, max_size=3).map(spaces.Dict),
        ),
        max_leaves=8,
    )


@settings(database=None, max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(nested_spaces(), st.integers(0, 2**32 - 1))
@pytest.mark.filterwarnings("ignore:.*Casting input x to numpy array")  # 0-d Box samples
def test_flatten_unflatten_round_trip(space, seed):
    space.seed(seed)
    value = space.sample()
    lvs = layout.leaves(space)
    flat = layout.flatten(space, value)
    assert len(flat) == len(lvs)
    for leaf, v in zip(lvs, flat):
        assert np.asarray(v).shape == leaf.shape
        assert leaf.space.contains(np.asarray(v) if isinstance(leaf.space, spaces.Box) else v)
    back = layout.unflatten(space, flat)
    assert data_equivalence(value, back, exact=True)
    assert space.contains(back)


def test_flatten_mismatches():
    space = spaces.Dict({"a": spaces.Discrete(2), "b": spaces.Tuple((spaces.Discrete(2),) * 2)})
    with pytest.raises(SpaceMismatchError, match="missing"):
        layout.flatten(space, {"a": 1})
    with pytest.raises(SpaceMismatchError):
        layout.flatten(space, [1, (0, 1)])
    with pytest.raises(SpaceMismatchError):
        layout.flatten(space, {"a": 1, "b": (0,)})


# -- layout: Plan ---------------------------------------------------------------------------------


def _regions(plan):
    return [*plan.obs, *plan.act, plan.reward, plan.terminated, plan.truncated]


@settings(database=None, max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(nested_spaces(), nested_spaces(), st.integers(1, 9), st.integers(1, 4),
       st.integers(2, 4))
def test_plan_regions_are_aligned_disjoint_and_inside(obs_space, act_space, num_envs,
                                                      workers, depth):
    workers = min(workers, num_envs)
    plan = layout.Plan(obs_space, act_space, num_envs, workers, depth)
    regions = _regions(plan)
    ctl_end = workers * _ring.CTL_SIZE
    spans = sorted((r.offset, r.offset + r.nbytes) for r in regions)
    assert spans[0][0] >= ctl_end
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0, "regions overlap"
    for r in regions:
        assert r.offset % 64 == 0
        assert r.offset + r.nbytes <= plan.size
    for r, lf in zip(plan.obs, plan.obs_leaves):
        assert r.shape == (depth, num_envs, *lf.shape) and r.dtype == lf.dtype
    for r, lf in zip(plan.act, plan.act_leaves):
        assert r.shape == (num_envs, *lf.shape) and r.dtype == lf.dtype
    assert plan.reward.shape == (depth, num_envs) and plan.reward.dtype == np.float64
    assert plan.terminated.dtype == np.bool_ and plan.truncated.shape == (depth, num_envs)
    # views over a buffer of plan.size: writing every region touches no other region
    buf = bytearray(plan.size)
    views = plan.views(buf)
    arrays = [*views.obs, *views.act, views.reward, views.terminated, views.truncated]
    for k, arr in enumerate(arrays):
        arr.reshape(-1).view(np.uint8)[:] = (k % 250) + 1 if arr.size else 0
    for k, arr in enumerate(arrays):
        if arr.size:
            assert (arr.reshape(-1).view(np.uint8) == (k % 250) + 1).all()
    assert bytes(buf[:ctl_end]) == bytes(ctl_end), "the control blocks are untouched"
    views.release()


def test_plan_pickles():
    plan = layout.Plan(test_envs.nested_obs_space(), test_envs.nested_act_space(), 5, 2, 3)
    again = pickle.loads(pickle.dumps(plan))
    assert again.size == plan.size
    assert [r.offset for r in _regions(again)] == [r.offset for r in _regions(plan)]


def test_write_leaf_into_a_ring_row_of_every_leaf_type():
    """What the worker does for each observation leaf: write one env's value into its row
    of a ring slot, for every leaf type including 0-d (Discrete) leaves."""
    space = test_envs.nested_obs_space()
    plan = layout.Plan(space, spaces.Discrete(2), 3, 1, 2)
    buf = bytearray(plan.size)
    views = plan.views(buf)
    space.seed(0)
    value = space.sample()
    for leaf, region, v in zip(plan.obs_leaves, views.obs, layout.flatten(space, value)):
        layout.write_leaf(region[1, 2, ...], leaf, v)  # as the worker does
    got = layout.unflatten(space, [np.array(region[1, 2]) for region in views.obs])
    for leaf, x, y in zip(plan.obs_leaves, layout.flatten(space, value),
                          layout.flatten(space, got)):
        np.testing.assert_array_equal(np.asarray(x), y, err_msg=str(leaf.path))
    assert not np.asarray(views.obs[0][0]).any(), "the other ring slot is untouched"
    views.release()


def test_write_leaf_errors_name_the_path():
    space = spaces.Dict({"img": spaces.Box(0, 255, (2, 2), np.uint8)})
    plan = layout.Plan(space, spaces.Discrete(2), 1, 1, 2)
    views = plan.views(bytearray(plan.size))
    (leaf,) = plan.obs_leaves
    with pytest.raises(SpaceMismatchError, match="img"):
        layout.write_leaf(views.obs[0][0, 0], leaf, np.zeros((2, 3), np.uint8))
    with pytest.raises(SpaceMismatchError, match="img"):
        layout.write_leaf(views.obs[0][0, 0], leaf, np.zeros((2, 2), np.float64))
    layout.write_leaf(views.obs[0][0, 0], leaf, np.full((2, 2), 9, np.uint8).T)
    assert (views.obs[0][0, 0] == 9).all()
    views.release()


# -- layout: check_actions -----------------------------------------------------------------------


ACT = spaces.Dict({
    "move": spaces.Box(-1.0, 1.0, (2,), np.float32),
    "pick": spaces.Discrete(3, start=-1),
    "md": spaces.MultiDiscrete([2, 5]),
    "mb": spaces.MultiBinary(3),
})


def good_batch(n=4):
    return {"md": np.array([[0, 4]] * n), "mb": np.array([[0, 1, 1]] * n, np.int8),
            "move": np.zeros((n, 2), np.float32), "pick": np.array([-1, 0, 1, 0][:n])}


def check(batch, n=4):
    lvs = layout.leaves(ACT)
    return layout.check_actions(lvs, layout.flatten(ACT, batch), n)


def test_check_actions_accepts_a_valid_batch():
    out = check(good_batch())
    assert [a.shape for a in out] == [(4, 3), (4, 2), (4, 2), (4,)]  # mb, md, move, pick
    out = check({**good_batch(), "move": [[1, -1]] * 4})  # lists and ints are fine
    assert out[2].shape == (4, 2)


@pytest.mark.parametrize("key,value,match", [
    ("move", np.zeros((4, 3), np.float32), r"shape \(4, 3\)"),
    ("move", np.zeros((3, 2), np.float32), r"shape \(3, 2\)"),
    ("move", np.array([[0, 0], [0, 1.5], [0, 0], [0, 0]], np.float32), r"env 1"),
    ("move", np.array([[0, 0], [0, 0], [np.nan, 0], [0, 0]], np.float32), r"env 2"),
    ("move", np.zeros((4, 2), np.complex64), r"dtype complex64"),
    ("pick", np.array([-1, 0, 2, 0]), r"env 2"),
    ("pick", np.array([-2, 0, 1, 0]), r"env 0"),
    ("pick", np.array([0.0, 0, 1, 0]), r"dtype float64"),
    ("md", np.array([[0, 4], [0, 4], [0, 4], [2, 0]]), r"env 3"),
    ("mb", np.array([[0, 1, 2]] * 4, np.int8), r"env 0"),
    ("mb", np.array([[0, 1, -1]] * 4, np.int8), r"env 0"),
])
def test_check_actions_errors(key, value, match):
    with pytest.raises(InvalidActionError, match=match) as info:
        check({**good_batch(), key: value})
    assert key in str(info.value), "the message names the path of the leaf"
    assert isinstance(info.value, ValueError)


# -- the batch counter -----------------------------------------------------------------------------


def test_request_carries_its_batch_epoch():
    buf, ctl = fresh()
    ctl.init(0, 0, 1, 0)
    ctl.request(3, _ring.OP_STEP, 1, 0, 1, _ring.REQ_COUNTED, 77)
    assert raw(buf, "batch_epoch") == 77 == ctl.batch_epoch
    assert raw(buf, "flags") == _ring.REQ_COUNTED


def test_batch_counter_completes_once_and_drops_stale_epochs():
    """The reply that completes batch e reports it once; a decrement carrying an older epoch
    (a reply published, then descheduled before leaving) never counts against batch e."""
    buf = bytearray(_ring.BATCH_SIZE)
    batch = _ring.Batch(buf, 0)
    batch.arm(3, 5)
    assert not batch.leave(4) and remaining(buf) == 3  # stale: dropped
    assert not batch.leave(5) and not batch.leave(5)
    assert batch.leave(5) and remaining(buf) == 0
    assert not batch.leave(5) and remaining(buf) == 0  # never below zero, never twice
    batch.arm(2, 6)
    assert not batch.leave(5) and remaining(buf) == 2 and batch.epoch == 6


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 3)), min_size=1, max_size=20))
def test_batch_counter_property(batches):
    """Whatever stale decrements interleave, batch e completes exactly after its n leaves."""
    buf = bytearray(_ring.BATCH_SIZE)
    counter = _ring.Batch(buf, 0)
    for epoch, (n, stale) in enumerate(batches, start=1):
        counter.arm(n, epoch)
        completions = 0
        for k in range(n):
            for _ in range(stale):
                assert not counter.leave(epoch - 1)
            completions += counter.leave(epoch)
            assert completions == (k == n - 1)
        assert remaining(buf) == 0


def test_spin_resp_until_waits_for_the_target_not_any_change():
    buf, ctl = fresh()
    ctl.init(0, 0, 1, 5)
    put_raw(buf, "resp_seq", 6)
    assert ctl.spin_resp_until(9, 20_000) == 6  # changed, but not to 9: gives up
    put_raw(buf, "resp_seq", 9)
    assert ctl.spin_resp_until(9, 10**12) == 9


# -- the batched calls of the step path ------------------------------------------------------------


@pytest.fixture
def named_semaphores():
    """Fresh named semaphores (value 0), unlinked at teardown; returns a factory."""
    import posix_ipc
    made = []

    def make():
        # a name of this process's own kind, so the suite's leak checks see it
        sem = posix_ipc.Semaphore(f"/fv{os.getpid()}_{os.urandom(4).hex()}_t{len(made)}",
                                  posix_ipc.O_CREX, initial_value=0)
        made.append(sem)
        return sem, _ring.SemHandle(sem.name)

    yield make
    for sem in made:
        sem.unlink()
        sem.close()


def blocks(n):
    buf = bytearray(n * _ring.CTL_SIZE + _ring.BATCH_SIZE)
    ctls = [_ring.Ctl(buf, w * _ring.CTL_SIZE) for w in range(n)]
    for w, ctl in enumerate(ctls):
        ctl.init(w, 0, 1, 10)
    return buf, ctls, _ring.Batch(buf, n * _ring.CTL_SIZE)


def step_path(n, named_semaphores):
    buf, ctls, batch = blocks(n)
    sems = [named_semaphores() for _ in range(n)]
    done, done_w = named_semaphores()
    path = _ring.StepPath(batch, done_w, ctls, [w for _, w in sems], [1, 3, 7][:n])
    return buf, ctls, batch, sems, (done, done_w), path


def test_step_path_send_arms_writes_every_request_and_posts_every_semaphore(named_semaphores):
    buf, ctls, batch, sems, _, path = step_path(3, named_semaphores)
    path.send_batch(9, 11, _ring.OP_STEP, 1, _ring.REQ_NO_SPIN)
    assert remaining(buf, 3 * _ring.CTL_SIZE) == 3 and batch.epoch == 9
    for w, ctl in enumerate(ctls):
        assert (ctl.req_seq, ctl.opcode, ctl.ring_index) == (11 + w, _ring.OP_STEP, 1)
        assert (ctl.env_mask, ctl.req_payload_len) == ([1, 3, 7][w], 0)
        assert ctl.flags == _ring.REQ_COUNTED | _ring.REQ_NO_SPIN and ctl.batch_epoch == 9
    assert [sem.value for sem, _ in sems] == [1, 1, 1]
    with pytest.raises(ValueError, match="one entry per control block"):
        _ring.StepPath(batch, sems[0][1], ctls, [w for _, w in sems][:2], [1, 3, 7])
    ctls[0].release()
    with pytest.raises(RingError, match="after release"):
        _ring.StepPath(batch, sems[0][1], ctls, [w for _, w in sems], [1, 3, 7])


def test_step_path_wait_spins_sleeps_and_checks_every_status(named_semaphores):
    buf, ctls, batch, sems, (done, done_w), path = step_path(3, named_semaphores)
    path.send_batch(4, 11, _ring.OP_STEP, 0)
    assert path.wait_all(0) == 0  # nothing replied, no time to wait
    ctls[0].complete(11, _ring.ST_OK)
    ctls[2].complete(13, _ring.ST_ERROR)
    t0 = time.monotonic()
    assert path.wait_all(20_000, 0.05) == 1  # spins, sleeps 50 ms, gives up on 1
    assert 0.04 < time.monotonic() - t0 < 5
    ctls[1].complete(12, _ring.ST_OK)
    assert path.wait_all(10**12) == 2  # all replied: the first that is not OK
    ctls[2].complete(13, _ring.ST_OK)
    assert path.wait_all(10**12) == -1
    assert path.first_payload() == -1
    ctls[1].complete(12, _ring.ST_OK, 5)
    assert path.first_payload() == 1


def test_step_path_wait_wakes_on_the_done_post_and_drains_stale_posts(named_semaphores):
    buf, ctls, batch, sems, (done, done_w), path = step_path(2, named_semaphores)
    path.send_batch(5, 21, _ring.OP_STEP, 0)
    done.release()
    done.release()  # stale posts of earlier batches: drained, not taken for this one
    ctls[0].complete(21, _ring.ST_OK)
    timer = threading.Timer(0.05, lambda: (ctls[1].complete(22, _ring.ST_OK), done.release()))
    t0 = time.monotonic()
    timer.start()
    try:
        assert path.wait_all(0, 30.0) == -1  # woken by the post, long before 30 s
    finally:
        timer.join()
    assert time.monotonic() - t0 < 5
    path.send_batch(6, 23, _ring.OP_STEP, 0)
    timer = threading.Timer(0.05, done.release)  # a stale post: sleeps on
    timer.start()
    try:
        assert path.wait_all(0, 0.3) == 0
    finally:
        timer.join()
    assert 0.25 < time.monotonic() - t0 < 10
    t0 = time.monotonic()
    timer = threading.Timer(0.05, lambda: (path.raise_alarm(), done.release()))
    timer.start()  # the watchdog found a failure: back to the caller at once
    try:
        assert path.wait_all(0, 30.0) == 0
    finally:
        timer.join()
    assert time.monotonic() - t0 < 5
    ctls[0].complete(23, _ring.ST_OK)
    ctls[1].complete(24, _ring.ST_OK)
    assert path.wait_all(0) == 0  # all OK, but the alarm is up: the careful path
    path.clear_alarm()
    assert path.wait_all(0) == -1


def test_step_path_wait_runs_signal_handlers(named_semaphores):
    buf, ctls, batch, sems, _, path = step_path(1, named_semaphores)
    path.send_batch(7, 11, _ring.OP_STEP, 0)

    def handler(signum, frame):
        raise TimeoutError("deadline")

    old = signal.signal(signal.SIGUSR2, handler)
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(TimeoutError, match="deadline"):
            path.wait_all(0, 60.0)
        assert time.monotonic() - t0 < 5
    finally:
        timer.join()
        signal.signal(signal.SIGUSR2, old)


def test_reply_posts_done_once_per_batch(named_semaphores):
    buf, ctls, batch = blocks(2)
    done, done_w = named_semaphores()
    batch.arm(2, 4)
    ctls[0].reply(batch, done_w, 11, _ring.ST_OK, 0, _ring.REQ_COUNTED, 4)
    assert done.value == 0 and ctls[0].resp_seq == 11
    ctls[1].reply(batch, done_w, 12, _ring.ST_OK, 0, _ring.REQ_COUNTED, 4)
    assert done.value == 1 and remaining(buf, 2 * _ring.CTL_SIZE) == 0
    ctls[1].reply(batch, done_w, 13, _ring.ST_OK, 0, 0, 0)  # not counted: always posts
    assert done.value == 2


def test_wait_request_spins_or_blocks_and_keeps_the_semaphore_bounded(named_semaphores):
    buf, ctls, _ = blocks(1)
    ctl = ctls[0]
    sem, waiter = named_semaphores()
    ctl.request(11, _ring.OP_STEP, 0)
    sem.release()
    assert ctl.wait_request(waiter, 10, 10**6) == 11
    assert sem.value == 0  # the post the spin overtook was taken
    ctl.request(12, _ring.OP_STEP, 0)
    sem.release()
    sem.release()  # a stale post too (a hint, never a count)
    assert ctl.wait_request(waiter, 11, 0) == 12
    assert sem.value == 1
    ctl.request(13, _ring.OP_STEP, 0)  # the parent published, its post not yet made
    assert ctl.wait_request(waiter, 12, 0) == 13 and sem.value == 0


def test_wait_request_runs_signal_handlers_and_lets_their_exceptions_out(named_semaphores):
    buf, ctls, _ = blocks(1)
    _, waiter = named_semaphores()
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        if len(calls) == 2:
            raise TimeoutError("deadline")

    old = signal.signal(signal.SIGUSR2, handler)  # SIGALRM belongs to pytest-timeout
    timers = [threading.Timer(0.05 * k, os.kill, (os.getpid(), signal.SIGUSR2)) for k in (1, 2)]
    try:
        t0 = time.monotonic()
        for t in timers:
            t.start()
        with pytest.raises(TimeoutError, match="deadline"):
            ctls[0].wait_request(waiter, 10, 0)
        assert calls == [signal.SIGUSR2] * 2 and time.monotonic() - t0 < 5
    finally:
        for t in timers:
            t.join()
        signal.signal(signal.SIGUSR2, old)


def test_a_signal_that_lands_during_the_spin_still_reaches_its_handler(named_semaphores):
    """A signal during the spin interrupts no system call: the blocking wait that follows
    is bounded, so the handler runs (a retiring worker's SIGUSR1 landed there and waited
    for a request that never came)."""
    buf, ctls, _ = blocks(1)
    _, waiter = named_semaphores()

    def handler(signum, frame):
        raise TimeoutError("handled")

    old = signal.signal(signal.SIGUSR2, handler)
    timer = threading.Timer(0.02, os.kill, (os.getpid(), signal.SIGUSR2))  # during the spin
    try:
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(TimeoutError, match="handled"):
            ctls[0].wait_request(waiter, 10, 300_000_000)
        assert time.monotonic() - t0 < 2.0
    finally:
        timer.join()
        signal.signal(signal.SIGUSR2, old)


def test_no_spin_for_replies_expected_after_a_slow_request(named_semaphores):
    """Spinning pays only for a reply expected within the spin window: after a request that
    took longer (last_request_ns), both sides sleep at once instead of taking CPU from the
    workers. (With the spin, each call below would spin for 500 s.)"""
    buf, ctls, batch, sems, _, path = step_path(2, named_semaphores)
    path.send_batch(3, 11, _ring.OP_STEP, 0)
    ctls[0].complete(11, _ring.ST_OK)
    put_raw(buf, "last_request_ns", 10**12, base=_ring.CTL_SIZE)  # worker 1 was slow
    t0 = time.monotonic()
    assert path.wait_all(5 * 10**11, 0.0) == 1
    _, waiter = named_semaphores()

    def handler(signum, frame):
        raise TimeoutError("slept")

    old = signal.signal(signal.SIGUSR2, handler)
    timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR2))
    try:
        timer.start()
        with pytest.raises(TimeoutError, match="slept"):
            ctls[1].wait_request(waiter, 12, 5 * 10**11)
    finally:
        timer.join()
        signal.signal(signal.SIGUSR2, old)
    assert time.monotonic() - t0 < 60
