# Mirror of csrc/ring.h, one to one.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

cdef extern from "<semaphore.h>" nogil:
    ctypedef struct sem_t:
        pass

cdef extern from "ring.h" nogil:
    enum:
        FV_MAGIC
        FV_VERSION
        FV_CTL_SIZE
        FV_BATCH_SIZE
        FV_EXIT_ORPHANED
        FV_REASONS
        FV_DETAIL_SIZE
        FV_HIST_BUCKETS
    enum:
        FV_OP_NONE
        FV_OP_RESET
        FV_OP_STEP
        FV_OP_CALL
        FV_OP_SET_ATTR
        FV_OP_CLOSE
        FV_OP_REPLAY
    enum:
        FV_REQ_COUNTED
        FV_REQ_NO_SPIN
    enum:
        FV_ST_OK
        FV_ST_ERROR
        FV_ST_MISMATCH
    enum:
        FV_RC_OK
        FV_RC_BAD_MAGIC
        FV_RC_BAD_VERSION
        FV_RC_THREAD
        FV_RC_SYSCALL
        FV_RC_BUSY
    enum:
        FV_STATE_NONE
        FV_STATE_STARTING
        FV_STATE_SERVING
        FV_STATE_REPLACING
        FV_STATE_DISABLED
        FV_STATE_RESUMED
    enum:
        FV_REASON_NONE
        FV_REASON_DIED
        FV_REASON_FROZEN
        FV_REASON_HUNG
        FV_REASON_EXCEPTION
        FV_REASON_START
        FV_REASON_MISMATCH
        FV_REASON_RECYCLE
        FV_REASON_OTHER

    ctypedef struct fv_pub:
        uint32_t state
        uint32_t last_reason
        uint64_t last_failure_ns
        uint64_t base_requests
        uint64_t base_episodes
        uint64_t recycles
        uint64_t restarts[FV_REASONS]
        char last_detail[FV_DETAIL_SIZE]

    ctypedef struct fv_ctl:
        uint32_t magic
        uint32_t version
        uint32_t worker_index
        uint32_t generation
        int64_t owner_pid
        uint64_t req_seq
        uint32_t opcode
        uint32_t ring_index
        uint64_t req_payload_len
        uint64_t env_mask
        uint32_t flags
        uint32_t batch_epoch
        uint64_t resp_seq
        int32_t status
        int32_t worker_pid
        uint64_t resp_payload_len
        uint64_t busy_since_ns
        uint64_t last_request_ns
        uint64_t progress
        uint64_t episodes
        uint64_t rss_bytes
        uint64_t liveness
        uint64_t payload_cap
        uint64_t beat_ns
        uint64_t pub_seq
        fv_pub pub
        uint64_t step_ns_sum
        uint64_t step_hist[FV_HIST_BUCKETS]

    void fv_ctl_init(fv_ctl *c, uint32_t worker_index, uint32_t generation,
                     int64_t owner_pid, uint64_t start_seq) noexcept
    int fv_ctl_check(const fv_ctl *c) noexcept
    ctypedef struct fv_batch:
        uint64_t state

    void fv_request(fv_ctl *c, uint64_t seq, uint32_t opcode, uint32_t ring_index,
                    uint64_t payload_len, uint64_t env_mask, uint32_t flags,
                    uint32_t epoch) noexcept
    void fv_batch_arm(fv_batch *b, uint32_t epoch, uint32_t n) noexcept
    int fv_batch_leave(fv_batch *b, uint32_t epoch) noexcept
    uint64_t fv_resp_seq(const fv_ctl *c) noexcept
    uint32_t fv_heartbeat(const fv_ctl *c) noexcept
    uint64_t fv_busy_since(const fv_ctl *c) noexcept
    uint64_t fv_req_seq(const fv_ctl *c) noexcept
    void fv_begin(fv_ctl *c) noexcept
    void fv_complete(fv_ctl *c, uint64_t seq, int32_t status, uint64_t payload_len) noexcept
    int fv_heartbeat_start(fv_ctl *c, uint32_t interval_ms, int64_t owner_pid) noexcept
    int fv_heartbeat_beat(fv_ctl *c, uint32_t generation) noexcept
    void fv_heartbeat_stop() noexcept
    int fv_set_parent_death_signal(int sig) noexcept
    uint64_t fv_spin_resp_until(const fv_ctl *c, uint64_t target, uint64_t spin_ns) noexcept
    uint64_t fv_now_ns() noexcept
    enum:
        FV_WAIT_OK
        FV_WAIT_TIMEOUT
        FV_WAIT_INTR
        FV_WAIT_ERROR
    void fv_send_batch(fv_batch *b, uint32_t epoch, fv_ctl **ctls, sem_t **sems,
                       const uint64_t *seqs, const uint64_t *masks, const uint64_t *lens,
                       uint32_t n, uint32_t opcode, uint32_t ring_index,
                       uint32_t flags) noexcept
    int64_t fv_spin_all(fv_ctl **ctls, const uint64_t *seqs, uint32_t n,
                        uint64_t spin_ns) noexcept
    int64_t fv_await_all(fv_ctl **ctls, const uint64_t *seqs, uint32_t n, uint64_t spin_ns,
                         sem_t *done, int64_t block_ns,
                         const uint32_t *alarm, int *why) noexcept
    void fv_alarm_set(uint32_t *alarm, uint32_t value) noexcept
    int64_t fv_first_payload(fv_ctl **ctls, uint32_t n) noexcept
    uint32_t fv_sem_drain(sem_t *s) noexcept
    uint64_t fv_wait_request(const fv_ctl *c, sem_t *s, uint64_t last, uint64_t spin_ns,
                             int64_t block_ns) noexcept
    void fv_reply(fv_ctl *c, fv_batch *b, sem_t *done, uint64_t seq, int32_t status,
                  uint64_t payload_len, uint32_t flags, uint32_t epoch) noexcept
    int fv_sem_wait(sem_t *s, int64_t timeout_ns) noexcept
    int fv_sem_trywait(sem_t *s) noexcept
    void fv_publish(fv_ctl *c, const fv_pub *p) noexcept
    int fv_ctl_snapshot(const fv_ctl *c, fv_ctl *out) noexcept
    uint32_t fv_hist_bucket(uint64_t ns) noexcept


cdef class Ctl:
    cdef fv_ctl *c
    cdef object _buf
    cdef fv_ctl *_p(self) except NULL


cdef class Batch:
    cdef fv_batch *b
    cdef object _buf


cdef class SemHandle:
    cdef sem_t *s
    cdef int _users         # users of s without the GIL: waits in flight, StepPaths
    cdef sem_t *_closing    # s, closed while it had users: the last one out sem_closes it
    cdef sem_t *_enter(self) except NULL
    cdef void _leave(self) noexcept


cdef class StepPath:
    # Every pointer points into what the path holds itself: exported buffers of the
    # mappings (_keep) and pinned SemHandles (_pinned: their close() is deferred until the
    # path goes), so a close() by another thread cannot unmap them under a nogil wait.
    cdef fv_ctl **ctls
    cdef sem_t **sems
    cdef uint64_t *seqs
    cdef uint64_t *masks
    cdef uint64_t *lens
    cdef uint32_t n
    cdef uint32_t alarm
    cdef fv_batch *b
    cdef sem_t *done
    cdef list _keep
    cdef list _pinned
    cdef sem_t *_pin(self, SemHandle w) except NULL
    cdef int send(self, uint32_t epoch, uint64_t first_seq, uint32_t opcode,
                  uint32_t ring_index, uint32_t flags) except -1
    cdef int64_t await_all(self, uint64_t spin_ns, double timeout) except -2
