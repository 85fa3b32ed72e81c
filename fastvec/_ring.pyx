"""Thin wrapper of csrc/ring.h: one control block per worker slot.

This is the one place where ring.h status codes become Python exceptions.
"""
cimport cython
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

cdef extern from "<semaphore.h>" nogil:
    sem_t *sem_open(const char *name, int oflag)
    int sem_close(sem_t *s)
    int sem_post(sem_t *s)
    sem_t *SEM_FAILED

from fastvec.errors import RingError

OP_NONE = FV_OP_NONE
OP_RESET = FV_OP_RESET
OP_STEP = FV_OP_STEP
OP_CALL = FV_OP_CALL
OP_SET_ATTR = FV_OP_SET_ATTR
OP_CLOSE = FV_OP_CLOSE
OP_REPLAY = FV_OP_REPLAY
ST_OK = FV_ST_OK
ST_ERROR = FV_ST_ERROR
ST_MISMATCH = FV_ST_MISMATCH
CTL_SIZE = FV_CTL_SIZE
BATCH_SIZE = FV_BATCH_SIZE
REQ_COUNTED = FV_REQ_COUNTED
REQ_NO_SPIN = FV_REQ_NO_SPIN
MAGIC = FV_MAGIC
VERSION = FV_VERSION
EXIT_ORPHANED = FV_EXIT_ORPHANED
# statistics (lines 4-15 of a control block): states, reasons, histogram
STATE_NONE = FV_STATE_NONE
STATE_STARTING = FV_STATE_STARTING
STATE_SERVING = FV_STATE_SERVING
STATE_REPLACING = FV_STATE_REPLACING
STATE_DISABLED = FV_STATE_DISABLED
STATE_RESUMED = FV_STATE_RESUMED
REASON_NONE = FV_REASON_NONE
REASON_DIED = FV_REASON_DIED
REASON_FROZEN = FV_REASON_FROZEN
REASON_HUNG = FV_REASON_HUNG
REASON_EXCEPTION = FV_REASON_EXCEPTION
REASON_START = FV_REASON_START
REASON_MISMATCH = FV_REASON_MISMATCH
REASON_RECYCLE = FV_REASON_RECYCLE
REASON_OTHER = FV_REASON_OTHER
REASONS = FV_REASONS
DETAIL_SIZE = FV_DETAIL_SIZE
HIST_BUCKETS = FV_HIST_BUCKETS

cdef dict _RC_MESSAGES = {
    FV_RC_BAD_MAGIC: "control block has no fastvec magic (never initialised or overwritten)",
    FV_RC_BAD_VERSION: "control block was written by another fastvec version",
    FV_RC_THREAD: "could not start the heartbeat thread",
    FV_RC_SYSCALL: "a system call failed",
    FV_RC_BUSY: "the parent kept publishing the block's statistics through every try",
}


cdef int _check(int rc) except -1:
    if rc != FV_RC_OK:
        raise RingError(_RC_MESSAGES.get(rc, f"ring error {rc}"))
    return 0


def now_ns():
    """CLOCK_MONOTONIC in nanoseconds (the clock of busy_since_ns)."""
    return fv_now_ns()


def stop_heartbeat():
    """Stop this process's heartbeat thread from beating (a retiring worker)."""
    fv_heartbeat_stop()


def hist_bucket(uint64_t ns):
    """The step_hist bucket of a duration of ``ns`` nanoseconds (floor(log2), capped)."""
    return fv_hist_bucket(ns)


def snapshot(const unsigned char[::1] buf not None, Py_ssize_t offset):
    """A copy of the control block at ``offset`` of ``buf`` (a read-only mapping will do)
    as a dict of its fields, the parent's statistics consistent (seqlock). For readers
    outside the job (fastvec top); it never writes. RingError if the parent kept
    publishing through every try."""
    cdef fv_ctl out
    cdef int rc
    cdef Py_ssize_t i
    if offset < 0 or offset % 64 or offset + FV_CTL_SIZE > buf.shape[0]:
        raise ValueError(f"control block at offset {offset} does not fit a "
                         f"{buf.shape[0]}-byte buffer at 64-byte alignment")
    with nogil:
        rc = fv_ctl_snapshot(<const fv_ctl *>&buf[offset], &out)
    _check(rc)
    detail = (<char *>out.pub.last_detail)[:FV_DETAIL_SIZE].split(b"\0", 1)[0]
    return {
        "magic": out.magic, "version": out.version, "worker_index": out.worker_index,
        "generation": out.generation, "owner_pid": out.owner_pid,
        "req_seq": out.req_seq, "opcode": out.opcode, "resp_seq": out.resp_seq,
        "status": out.status, "worker_pid": out.worker_pid,
        "busy_since_ns": out.busy_since_ns, "last_request_ns": out.last_request_ns,
        "progress": out.progress, "episodes": out.episodes, "rss_bytes": out.rss_bytes,
        "heartbeat": <uint32_t>out.liveness, "beat_ns": out.beat_ns,
        "payload_cap": out.payload_cap,
        "pub_seq": out.pub_seq, "state": out.pub.state, "last_reason": out.pub.last_reason,
        "last_failure_ns": out.pub.last_failure_ns, "base_requests": out.pub.base_requests,
        "base_episodes": out.pub.base_episodes, "recycles": out.pub.recycles,
        "restarts": [out.pub.restarts[i] for i in range(FV_REASONS)],
        "last_detail": detail.decode("utf-8", "replace"),
        "step_ns_sum": out.step_ns_sum,
        "step_hist": [out.step_hist[i] for i in range(FV_HIST_BUCKETS)],
    }


def set_parent_death_signal(int sig):
    """Ask the kernel to send ``sig`` to this process when its parent thread exits."""
    _check(fv_set_parent_death_signal(sig))


cdef class Ctl:
    """View of one control block inside a writable buffer (an mmap of the main segment)."""

    def __cinit__(self, buf, Py_ssize_t offset):
        cdef unsigned char[::1] mv = buf
        if offset < 0 or offset % 64 or offset + FV_CTL_SIZE > mv.shape[0]:
            raise ValueError(f"control block at offset {offset} does not fit a "
                             f"{mv.shape[0]}-byte buffer at 64-byte alignment")
        self._buf = mv
        self.c = <fv_ctl *>&mv[offset]

    def release(self):
        """Drop the reference to the buffer so that the mmap can be closed."""
        self._buf = None
        self.c = NULL

    cdef fv_ctl *_p(self) except NULL:
        if self.c == NULL:
            raise RingError("control block used after release()")
        return self.c

    # -- parent side -------------------------------------------------------
    def init(self, uint32_t worker_index, uint32_t generation, int64_t owner_pid,
             uint64_t start_seq):
        fv_ctl_init(self._p(), worker_index, generation, owner_pid, start_seq)

    def check(self):
        _check(fv_ctl_check(self._p()))

    def request(self, uint64_t seq, uint32_t opcode, uint32_t ring_index,
                uint64_t payload_len=0, uint64_t env_mask=0, uint32_t flags=0,
                uint32_t epoch=0):
        fv_request(self._p(), seq, opcode, ring_index, payload_len, env_mask, flags, epoch)

    def spin_resp_until(self, uint64_t target, uint64_t spin_ns):
        """Spin without the GIL until resp_seq == target or spin_ns pass; returns resp_seq."""
        cdef fv_ctl *c = self._p()
        cdef object keep = self._buf  # the mapping stays while we spin, whoever releases
        cdef uint64_t v
        with nogil:
            v = fv_spin_resp_until(c, target, spin_ns)
        return v

    # -- worker side -------------------------------------------------------
    def wait_request(self, SemHandle sem not None, uint64_t last, uint64_t spin_ns):
        """Wait (spin, then block on ``sem``) for a request newer than ``last``; returns
        its seq. Signal handlers run while waiting (within 50 ms of the signal, even one
        that lands during the spin); their exceptions propagate."""
        cdef fv_ctl *c = self._p()
        cdef object keep = self._buf  # the mapping stays while we wait, whoever releases
        cdef uint64_t v
        cdef uint64_t spin = spin_ns
        cdef sem_t *s = sem._enter()
        try:
            while True:
                with nogil:
                    v = fv_wait_request(c, s, last, spin, 50_000_000)
                if v != last:
                    return v
                spin = 0  # spun once already: block from now on
                _run_signal_handlers()
        finally:
            sem._leave()

    def reply(self, Batch batch, SemHandle done, uint64_t seq, int status,
              uint64_t payload_len, uint32_t flags, uint32_t epoch):
        """Publish the reply to ``seq`` and post ``done`` if the parent is owed a wake-up."""
        if batch.b == NULL or done.s == NULL:
            raise RingError("reply() after release()/close()")
        fv_reply(self._p(), batch.b, done.s, seq, status, payload_len, flags, epoch)

    def begin(self):
        fv_begin(self._p())

    def complete(self, uint64_t seq, int status, uint64_t payload_len=0):
        fv_complete(self._p(), seq, status, payload_len)

    def publish(self, uint32_t state, restarts, uint64_t recycles=0, uint64_t base_requests=0,
                uint64_t base_episodes=0, uint32_t last_reason=0,
                uint64_t last_failure_ns=0, bytes last_detail=b""):
        """Publish the slot's statistics (lines 4-7) for readers outside the job, under the
        seqlock: the parent, on the failure path. ``restarts``: FV_REASONS counts, the
        count of reason code r at r - 1; ``last_detail`` is cut to DETAIL_SIZE - 1 bytes."""
        cdef fv_pub p
        cdef Py_ssize_t i, n
        if len(restarts) != FV_REASONS:
            raise ValueError(f"restarts needs {FV_REASONS} counts, got {len(restarts)}")
        memset(&p, 0, sizeof(p))
        p.state = state
        p.last_reason = last_reason
        p.last_failure_ns = last_failure_ns
        p.base_requests = base_requests
        p.base_episodes = base_episodes
        p.recycles = recycles
        for i in range(FV_REASONS):
            p.restarts[i] = restarts[i]
        n = min(len(last_detail), FV_DETAIL_SIZE - 1)
        if n:
            memcpy(p.last_detail, <const char *>last_detail, n)
        fv_publish(self._p(), &p)

    def start_heartbeat(self, uint32_t interval_ms, int64_t owner_pid):
        """Start this process's heartbeat thread: it beats the generation now in the block."""
        _check(fv_heartbeat_start(self._p(), interval_ms, owner_pid))

    def beat(self, uint32_t generation):
        """One beat of ``generation``, as the heartbeat thread beats; False (nothing
        written) if the block belongs to another generation now."""
        return fv_heartbeat_beat(self._p(), generation) != 0

    # -- fields ------------------------------------------------------------
    @property
    def req_seq(self):
        return fv_req_seq(self._p())

    @property
    def resp_seq(self):
        return fv_resp_seq(self._p())

    @property
    def heartbeat(self):
        """Beats of the block's current generation (0: its heartbeat never ran)."""
        return fv_heartbeat(self._p())

    @property
    def busy_since_ns(self):
        return fv_busy_since(self._p())

    @property
    def opcode(self):
        return self._p().opcode

    @property
    def flags(self):
        return self._p().flags

    @property
    def batch_epoch(self):
        return self._p().batch_epoch

    @property
    def ring_index(self):
        return self._p().ring_index

    @property
    def env_mask(self):
        return self._p().env_mask

    @property
    def req_payload_len(self):
        return self._p().req_payload_len

    @property
    def status(self):
        return self._p().status

    @property
    def resp_payload_len(self):
        return self._p().resp_payload_len

    @property
    def generation(self):
        return self._p().generation

    @property
    def owner_pid(self):
        return self._p().owner_pid

    @property
    def last_request_ns(self):
        return self._p().last_request_ns

    @property
    def progress(self):
        return self._p().progress

    @property
    def worker_pid(self):
        return self._p().worker_pid

    @worker_pid.setter
    def worker_pid(self, int value):
        self._p().worker_pid = value

    @property
    def episodes(self):
        return self._p().episodes

    @episodes.setter
    def episodes(self, uint64_t value):
        self._p().episodes = value

    @property
    def rss_bytes(self):
        return self._p().rss_bytes

    @rss_bytes.setter
    def rss_bytes(self, uint64_t value):
        self._p().rss_bytes = value

    @property
    def payload_cap(self):
        return self._p().payload_cap

    @property
    def beat_ns(self):
        """CLOCK_MONOTONIC ns of the latest beat of this generation (0: none yet)."""
        return self._p().beat_ns

    @property
    def step_count(self):
        """STEP requests the slot finished, every generation (the histogram's total)."""
        cdef fv_ctl *c = self._p()
        return sum(c.step_hist[i] for i in range(FV_HIST_BUCKETS))

    @payload_cap.setter
    def payload_cap(self, uint64_t value):
        self._p().payload_cap = value


cdef class Batch:
    """The batch block: how many counted replies the current batch still owes."""

    def __cinit__(self, buf, Py_ssize_t offset):
        cdef unsigned char[::1] mv = buf
        if offset < 0 or offset % 64 or offset + FV_BATCH_SIZE > mv.shape[0]:
            raise ValueError(f"batch block at offset {offset} does not fit the buffer")
        self._buf = mv
        self.b = <fv_batch *>&mv[offset]

    def release(self):
        self._buf = None
        self.b = NULL

    def arm(self, uint32_t n, uint32_t epoch=0):
        """Start batch ``epoch`` owing ``n`` replies (any older batch's decrements drop)."""
        if self.b == NULL:
            raise RingError("batch block used after release()")
        fv_batch_arm(self.b, epoch, n)

    def leave(self, uint32_t epoch=0):
        """Count one reply of batch ``epoch``; True if it completed the batch (post the
        done semaphore). A stale epoch counts nothing."""
        if self.b == NULL:
            raise RingError("batch block used after release()")
        return fv_batch_leave(self.b, epoch) != 0

    def leave_many(self, uint32_t epoch, uint32_t times):
        """Leave batch ``epoch`` ``times`` times in a row without the GIL; returns how many
        of those leaves completed it (0 or 1). For stress tests: several processes doing
        this at once put the counter's compare-and-swap under real contention."""
        cdef fv_batch *b = self.b
        cdef object keep = self._buf
        cdef uint32_t i, completed = 0
        if b == NULL:
            raise RingError("batch block used after release()")
        with nogil:
            for i in range(times):
                completed += fv_batch_leave(b, epoch)
        return completed

    @property
    def epoch(self):
        return (self.b.state >> 32) if self.b != NULL else 0



cdef int _run_signal_handlers() except -1:
    return PyErr_CheckSignals()


cdef class SemHandle:
    """A handle on a named semaphore (posix_ipc creates and owns it) for waiting on it and
    posting it from C: the parent's done semaphore, the workers' request semaphores.

    Unlike posix_ipc's acquire, a signal interrupts the wait only to run Python's signal
    handlers: an exception they raise (KeyboardInterrupt, SystemExit from a SIGTERM handler,
    a deadline of the caller's) propagates; otherwise the wait goes on for the rest of its
    time. ``timeout``: None waits forever, 0 tries once, > 0 waits at most that long.

    ``close()`` while another thread waits on it (without the GIL), or while a StepPath
    built on it lives, closes it at once for every later call and sem_closes the handle
    when the last of those lets go.
    """

    def __cinit__(self, name: str):
        self.s = sem_open(name.encode(), 0)
        if self.s == SEM_FAILED:
            self.s = NULL
            raise OSError(errno, f"cannot open semaphore {name}")

    cdef sem_t *_enter(self) except NULL:
        """The handle, for use without the GIL (a wait, a StepPath); pair with _leave()."""
        if self.s == NULL:
            raise RingError("semaphore used after close()")
        self._users += 1
        return self.s

    cdef void _leave(self) noexcept:
        self._users -= 1
        if self._users == 0 and self._closing != NULL:
            sem_close(self._closing)
            self._closing = NULL

    def acquire(self, timeout=None) -> bool:
        """True if the semaphore was taken, False if the time ran out."""
        cdef sem_t *s = self._enter()
        cdef int rc
        cdef int64_t ns
        cdef uint64_t deadline = 0
        try:
            if timeout is not None:
                deadline = fv_now_ns() + <uint64_t>(max(0.0, timeout) * 1e9)
            while True:
                if timeout is None:
                    ns = -1
                else:
                    ns = <int64_t>deadline - <int64_t>fv_now_ns()
                    if ns < 0:
                        ns = 0
                with nogil:
                    rc = fv_sem_trywait(s) if ns == 0 else fv_sem_wait(s, ns)
                if rc == FV_WAIT_OK:
                    return True
                if rc == FV_WAIT_TIMEOUT:
                    return False
                if rc == FV_WAIT_INTR:
                    _run_signal_handlers()
                    continue
                raise OSError(errno, "sem_wait failed")
        finally:
            self._leave()

    def post(self):
        """Post the semaphore once (sem_post)."""
        if self.s == NULL:
            raise RingError("semaphore used after close()")
        if sem_post(self.s) != 0:
            raise OSError(errno, "sem_post failed")

    def drain(self) -> int:
        """Take every pending post without waiting; returns how many there were."""
        cdef int n = 0
        if self.s == NULL:
            return 0
        while True:
            rc = fv_sem_trywait(self.s)
            if rc == FV_WAIT_OK:
                n += 1
            elif rc == FV_WAIT_INTR:
                continue
            else:
                return n

    def close(self):
        if self.s == NULL:
            return
        if self._users:
            self._closing = self.s  # in use without the GIL: the last _leave() closes
        else:
            sem_close(self.s)
        self.s = NULL

    def __dealloc__(self):
        # (nothing can be using it: each user holds a reference)
        if self.s != NULL:
            sem_close(self.s)
        if self._closing != NULL:
            sem_close(self._closing)


# -- batched calls: one C call per batch on the step path ------------------------------------

@cython.no_gc_clear  # __dealloc__ unpins the SemHandles in _pinned
cdef class StepPath:
    """The step path of a fixed set of worker slots, as C arrays built once: every call
    then covers all the workers in one C call without the GIL.

    ``ctls``, ``sems`` (each slot's request semaphore, a SemHandle) and ``masks`` (each
    slot's env mask) are per slot, in order; ``done`` is the parent's done semaphore.
    Build a new one whenever a slot gets a new process (a new request semaphore).

    The path keeps what its pointers point into for as long as it lives: a buffer export
    of each mapping (closing the mmap raises BufferError, which Segment.close tolerates)
    and a pin on each SemHandle (its close() then sem_closes only when the path is gone).
    Releasing the Ctl and Batch objects or closing the SemHandles, from any thread, even
    while a wait sleeps here without the GIL, unmaps nothing under it.
    """

    def __cinit__(self, Batch batch not None, SemHandle done not None, list ctls, list sems,
                  masks):
        cdef Py_ssize_t n = len(ctls), i
        cdef Ctl ctl
        if len(sems) != n or len(masks) != n:
            raise ValueError("StepPath: every argument needs one entry per control block")
        if batch.b == NULL:
            raise RingError("batch block used after release()")
        self.ctls = <fv_ctl **>calloc(max(n, 1), sizeof(fv_ctl *))
        self.sems = <sem_t **>calloc(max(n, 1), sizeof(sem_t *))
        self.seqs = <uint64_t *>calloc(max(n, 1), sizeof(uint64_t))
        self.masks = <uint64_t *>calloc(max(n, 1), sizeof(uint64_t))
        self.lens = <uint64_t *>calloc(max(n, 1), sizeof(uint64_t))
        if not (self.ctls and self.sems and self.seqs and self.masks and self.lens):
            raise MemoryError()
        self.n = <uint32_t>n
        self._keep = [batch._buf]
        self._pinned = []
        self.b = batch.b
        self.done = self._pin(done)
        for i in range(n):
            ctl = <Ctl?>ctls[i]
            if ctl.c == NULL:
                raise RingError("control block used after release()")
            self._keep.append(ctl._buf)
            self.ctls[i] = ctl.c
            self.sems[i] = self._pin(<SemHandle?>sems[i])
            self.masks[i] = <uint64_t>masks[i]

    cdef sem_t *_pin(self, SemHandle w) except NULL:
        if w is None:
            raise TypeError("StepPath needs SemHandles, not None")
        cdef sem_t *s = w._enter()
        self._pinned.append(w)
        return s

    def __dealloc__(self):
        # (a half-built path comes here too: _pinned holds what was pinned)
        cdef SemHandle w
        if self._pinned is not None:
            for w in self._pinned:
                w._leave()
        free(self.ctls)
        free(self.sems)
        free(self.seqs)
        free(self.masks)
        free(self.lens)

    cdef int send(self, uint32_t epoch, uint64_t first_seq, uint32_t opcode,
                  uint32_t ring_index, uint32_t flags) except -1:
        cdef uint32_t i
        for i in range(self.n):
            self.seqs[i] = first_seq + i
        with nogil:
            fv_send_batch(self.b, epoch, self.ctls, self.sems, self.seqs, self.masks,
                          self.lens, self.n, opcode, ring_index, flags)
        return 0

    cdef int64_t await_all(self, uint64_t spin_ns, double timeout) except -2:
        """-1 when every slot replied OK; else (``timeout`` s ran out, a reply is not OK,
        the alarm is up) the index of the first slot still owing its reply or not OK, and
        the caller takes the careful path. Signal handlers run on EINTR; their exceptions
        propagate."""
        cdef int why = FV_WAIT_OK
        cdef int64_t i, block
        cdef uint64_t deadline = fv_now_ns() + <uint64_t>(max(0.0, timeout) * 1e9)
        if self.n == 0:
            return -1
        while True:
            block = <int64_t>deadline - <int64_t>fv_now_ns()
            with nogil:
                fv_sem_drain(self.done)  # posts a finished wait did not need
                i = fv_await_all(self.ctls, self.seqs, self.n, spin_ns, self.done,
                                 block if block > 0 else 0, &self.alarm, &why)
            if i < 0 or why != FV_WAIT_INTR:
                return i
            _run_signal_handlers()
            spin_ns = 0

    def send_batch(self, uint32_t epoch, uint64_t first_seq, uint32_t opcode,
                   uint32_t ring_index, uint32_t flags=0):
        """Arm batch ``epoch``, write request ``first_seq + i`` (flagged REQ_COUNTED |
        ``flags``) into slot i's control block, post every request semaphore."""
        self.send(epoch, first_seq, opcode, ring_index, flags)

    def wait_all(self, uint64_t spin_ns, double timeout=0.0):
        """Spin up to ``spin_ns``, then sleep on the done semaphore up to ``timeout`` s or
        until the alarm is raised. -1 when every slot replied its request of the last
        send_batch with ST_OK (and no alarm is up), else the index of the first slot that
        did not."""
        return self.await_all(spin_ns, timeout)

    def raise_alarm(self):
        """Send a wait (this one, or the next) back to its caller: call it (from any
        thread) after flagging a failure, before posting the done semaphore."""
        fv_alarm_set(&self.alarm, 1)

    def clear_alarm(self):
        """The caller is looking at every failure now."""
        fv_alarm_set(&self.alarm, 0)

    @property
    def alarm_raised(self):
        """Whether a wait would go back to its caller for a failure (the alarm is up)."""
        return self.alarm != 0

    def first_payload(self):
        """Index of the first slot whose reply carries side-buffer bytes, or -1."""
        return fv_first_payload(self.ctls, self.n)
