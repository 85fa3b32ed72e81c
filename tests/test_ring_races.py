"""Races on the ring's shared words (csrc/ring.c): a retiring worker's heartbeat against the
re-initialised control block of its successor, a StepPath's memory under a wait that
another thread closes, and the batch counter's CAS with several processes leaving at once.

What could crash runs in a forked child: a segfault there is an exit status (-11), not a
dead test run. Every name is made by the parent, which unlinks it whatever the child did.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import threading
import time

import posix_ipc
import pytest

from fastvec import _ring
from fastvec.errors import RingError
from fastvec.shm import Segment

pytestmark = pytest.mark.timeout(120)

LIVENESS = 192  # csrc/ring.h: generation << 32 | beats, little endian


def liveness(buf, base=0):
    """(generation, beats) of the liveness word."""
    word = struct.unpack_from("<Q", buf, base + LIVENESS)[0]
    return word >> 32, word & 0xFFFFFFFF


def run_forked(child, timeout=60.0, on_start=None):
    """Run ``child()`` in a forked process; returns its exit code (0: it returned True,
    1: False or an exception, -N: killed by signal N). ``on_start(pid)`` runs in the
    parent while the child runs."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            code = 0 if child() else 1
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    reaped = False
    try:
        if on_start is not None:
            on_start(pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                reaped = True
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        pytest.fail(f"forked child did not finish within {timeout} s")
    finally:
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def fresh_name(tag):
    # a name of this process's own kind, so the suite's leak checks see it
    return f"/fv{os.getpid()}_{os.urandom(4).hex()}_{tag}"


# -- the heartbeat word ----------------------------------------------------------------------------


def test_a_beat_of_an_older_generation_never_lands_on_a_newer_one():
    buf = bytearray(_ring.CTL_SIZE)
    ctl = _ring.Ctl(buf, 0)
    ctl.init(0, 4, 1, 0)
    assert liveness(buf) == (4, 0) and ctl.heartbeat == 0 and ctl.generation == 4
    assert ctl.beat(4) and ctl.beat(4)
    assert liveness(buf) == (4, 2) and ctl.heartbeat == 2
    ctl.init(0, 5, 1, 0)  # the successor: its generation is published with 0 beats
    assert liveness(buf) == (5, 0) and ctl.heartbeat == 0 and ctl.generation == 5
    assert not ctl.beat(4)  # the retiring worker's late beat: dropped
    assert liveness(buf) == (5, 0) and ctl.heartbeat == 0
    assert ctl.beat(5) and liveness(buf) == (5, 1) and ctl.heartbeat == 1
    # the count wraps past 0: a generation that beat never reads as "never started"
    struct.pack_into("<Q", buf, LIVENESS, (5 << 32) | 0xFFFFFFFF)
    assert ctl.beat(5) and liveness(buf) == (5, 1)
    ctl.release()


def test_reinit_under_a_running_heartbeat_thread_shows_no_beat_of_the_old_generation():
    """A worker's heartbeat thread (generation 0, every 1 ms) keeps beating while the block
    is re-initialised for generation 1 over and over, as the parent does for a recycled
    worker's successor: right after each init the new generation must show 0 beats. (With
    a plain memset and a check-then-add beat, 12 of 6.5 million inits in 2 s showed a beat
    of generation 0: such a replacement is judged by heartbeat_timeout instead of
    start_timeout.)"""
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED: the child's counts come back through it

    def child():
        ctl = _ring.Ctl(mm, 0)
        ctl.init(0, 0, 0, 0)
        ctl.start_heartbeat(1, 0)
        deadline = time.monotonic() + 10
        while ctl.heartbeat == 0:
            if time.monotonic() > deadline:
                return False  # the thread never beat: nothing was tested
        rounds = bad = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            for _ in range(1000):
                ctl.init(0, 0, 0, 0)  # generation 0 again: its thread may beat now
                ctl.init(0, 1, 0, 0)  # its successor
                if ctl.heartbeat:
                    bad += 1
            rounds += 1000
        # beats seen on generation 0 over the run, to prove the thread kept beating
        ctl.init(0, 0, 0, 0)
        t0 = time.monotonic()
        while ctl.heartbeat < 3 and time.monotonic() - t0 < 10:
            time.sleep(0.001)
        struct.pack_into("<QQQ", mm, 1024, rounds, bad, ctl.heartbeat)
        ctl.release()
        return bad == 0

    try:
        code = run_forked(child)
        rounds, bad, beats = struct.unpack_from("<QQQ", mm, 1024)
        assert beats >= 3, "the heartbeat thread stopped beating generation 0"
        assert code == 0 and bad == 0, \
            f"exit {code}: {bad} of {rounds} inits of generation 1 showed a beat of generation 0"
    finally:
        mm.close()


# -- a StepPath's memory under a sleeping wait ---------------------------------------------------


def _close_under_wait(main_name, req_names, done_name, ready_w):
    """The child of the test below: True if the waiting thread came back with a value
    (0: slot 0 never replied) or an error."""
    main = Segment(main_name)
    ctls = [_ring.Ctl(main.mm, w * _ring.CTL_SIZE) for w in range(len(req_names))]
    for w, ctl in enumerate(ctls):
        ctl.init(w, 0, os.getpid(), 10)
    batch = _ring.Batch(main.mm, len(req_names) * _ring.CTL_SIZE)
    reqs = [_ring.SemHandle(n) for n in req_names]
    done = _ring.SemHandle(done_name)
    path = _ring.StepPath(batch, done, ctls, reqs, [1 << w for w in range(len(ctls))])
    path.send_batch(1, 11, _ring.OP_STEP, 0)
    out = []

    def waiter():
        try:
            out.append(path.wait_all(0, timeout=1.0))
        except RingError as exc:  # an error is fine; a crash is not
            out.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)  # asleep in the C wait, without the GIL
    # what FastVectorEnv.close() does, from another thread
    for ctl in ctls:
        ctl.release()
    batch.release()
    for w in reqs:
        w.close()
    done.close()
    main.close()
    del ctls, batch, reqs, done, main
    os.write(ready_w, b"x")  # the parent now posts done by name: the wait wakes
    t.join(30)
    return not t.is_alive() and len(out) == 1 and (out[0] == 0 or isinstance(out[0], RingError))


@pytest.mark.parametrize("how", ["wake", "timeout"])
def test_closing_everything_under_a_sleeping_wait_all_is_not_a_crash(how):
    """close() of the vector env from another thread while step() sleeps in
    StepPath.wait_all: the control blocks released, the SemHandles closed, the segment closed.
    The wait must come back (a value or an exception), not touch unmapped memory."""
    main_name, done_name = fresh_name("m"), fresh_name("d")
    req_names = [fresh_name(f"r{w}") for w in range(2)]
    # made here and closed again, so that the child maps each of them only through its own
    # handles (a handle inherited over fork would keep a mapping alive behind its back)
    shm = posix_ipc.SharedMemory(main_name, posix_ipc.O_CREX, size=1 << 20)
    shm.close_fd()
    for name in (done_name, *req_names):
        posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0).close()
    ready_r, ready_w = os.pipe()

    def post_done(pid):
        if how == "wake" and select.select([ready_r], [], [], 30)[0]:
            time.sleep(0.05)
            sem = posix_ipc.Semaphore(done_name)
            sem.release()
            sem.close()

    try:
        code = run_forked(lambda: _close_under_wait(main_name, req_names, done_name, ready_w),
                          on_start=post_done)
        assert code == 0, f"the child exited {code} (-11: a segfault in the wait)"
    finally:
        os.close(ready_r)
        os.close(ready_w)
        posix_ipc.unlink_shared_memory(main_name)
        for name in (done_name, *req_names):
            posix_ipc.unlink_semaphore(name)


def test_a_step_path_keeps_its_mappings_and_semaphores():
    """While a StepPath lives, the mmap behind its control blocks cannot be unmapped
    (BufferError, which Segment.close tolerates) and its semaphores stay open: its waits
    and sends work after every Ctl, Batch and SemHandle it was built from is gone. (It needs
    no names: they may be unlinked already.)"""
    main_name, done_name, req_name = fresh_name("m"), fresh_name("d"), fresh_name("r")
    main = Segment(main_name, 4096, create=True)
    done = posix_ipc.Semaphore(done_name, posix_ipc.O_CREX, initial_value=0)
    req = posix_ipc.Semaphore(req_name, posix_ipc.O_CREX, initial_value=0)
    try:
        ctl = _ring.Ctl(main.mm, 0)
        ctl.init(0, 0, 1, 10)
        batch = _ring.Batch(main.mm, _ring.CTL_SIZE)
        done_w, req_w = _ring.SemHandle(done_name), _ring.SemHandle(req_name)
        done.unlink()
        req.unlink()
        path = _ring.StepPath(batch, done_w, [ctl], [req_w], [1])
        mm = main.mm
        ctl.release()
        batch.release()
        done_w.close()
        req_w.close()
        with pytest.raises(RingError, match="after close"):
            done_w.acquire(0)  # closed for its own callers at once, pinned or not
        with pytest.raises(BufferError):
            mm.close()
        main.close()  # tolerated: the mapping stays for the path
        path.send_batch(3, 11, _ring.OP_STEP, 0)
        assert req.value == 1
        view = _ring.Ctl(mm, 0)
        assert view.req_seq == 11
        view.complete(11, _ring.ST_OK)
        view.release()
        assert path.wait_all(0, timeout=1.0) == -1
        del path
        mm.close()  # the last export went with the path
    finally:
        main.close()
        main.unlink()
        for sem, name in ((done, done_name), (req, req_name)):
            sem.close()
            try:
                posix_ipc.unlink_semaphore(name)
            except posix_ipc.ExistentialError:
                pass


def test_closing_a_waiter_under_its_own_acquire_is_not_a_crash():
    """SemHandle.close() from another thread while acquire() sleeps on it: the sem_close waits
    for the wait to come back, so the sleeping sem_wait never loses its semaphore."""
    name = fresh_name("w")
    posix_ipc.Semaphore(name, posix_ipc.O_CREX, initial_value=0).close()

    def child():
        w = _ring.SemHandle(name)
        out = []
        t = threading.Thread(target=lambda: out.append(w.acquire(1.0)))
        t.start()
        time.sleep(0.2)
        w.close()
        t.join(30)
        return not t.is_alive() and out == [False]

    try:
        assert run_forked(child) == 0
    finally:
        posix_ipc.unlink_semaphore(name)


# -- the batch counter under contention -----------------------------------------------------------


def test_batch_counter_under_concurrent_leaves_of_several_processes():
    """N processes start leaving batch r at the same moment (all spin on a shared start
    word), K times each without the GIL, while one more process keeps leaving batch r - 1:
    the counter's compare-and-swap under real contention. A batch armed for exactly N*K
    leaves completes exactly once and ends at 0; one armed for N*K + 1 ends at exactly 1
    with no completion (a lost decrement leaves more, a stale one that counted, less);
    no stale leave ever counts."""
    n, k, rounds = 3, 500_000, 20
    base = 1000  # batch r has epoch base + r
    mm = mmap.mmap(-1, 4096)
    words = memoryview(mm).cast("q")
    start = 8  # words[start]: the round the children may leave now
    results = 16  # words[results + (n + 1) * r + c]: 1 + completions child c saw in round r
    assert results + (n + 1) * rounds <= len(words)
    batch = _ring.Batch(mm, 0)
    words[start] = -1

    def child(c):
        for r in range(rounds):
            while words[start] < r:  # the barrier: every child sees the word change at once
                pass
            epoch = base + r if c < n else base + r - 1  # the last child is always stale
            words[results + (n + 1) * r + c] = 1 + batch.leave_many(epoch, k)
        return True

    pids = []
    try:
        for c in range(n + 1):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = 0 if child(c) else 1
                finally:
                    os._exit(code)
            pids.append(pid)
        for r in range(rounds):
            extra = r % 2  # odd rounds owe one leave more than the children make
            batch.arm(n * k + extra, base + r)
            words[start] = r
            got = words[results + (n + 1) * r: results + (n + 1) * (r + 1)]
            deadline = time.monotonic() + 60
            while 0 in got.tolist():
                assert time.monotonic() < deadline, f"round {r}: {got.tolist()}"
                time.sleep(0.001)
            completions = [v - 1 for v in got.tolist()]
            state = struct.unpack_from("<Q", mm, 0)[0]
            assert completions[n] == 0, f"round {r}: a stale leave completed the batch"
            assert sum(completions[:n]) == 1 - extra, f"round {r}: completions {completions}"
            assert state == ((base + r) << 32) | extra, \
                f"round {r}: {state & 0xFFFFFFFF} leaves owed at the end, expected {extra}"
            if extra:
                assert batch.leave(base + r)  # the last one owed
            del got
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        pids = []
        assert codes == [0] * (n + 1)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        batch.release()
        words.release()
        mm.close()
