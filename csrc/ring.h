/*
 * fastvec ring: the control block of one worker slot in shared memory.
 *
 * Shared-memory picture (one main segment per FastVectorEnv):
 *
 *   [ctl 0][ctl 1]...[ctl W-1]   FV_CTL_SIZE bytes each, one per worker process
 *   [batch]                      FV_BATCH_SIZE bytes: replies still owed in the current batch
 *   [data: per-leaf batched regions, see fastvec/layout.py]
 *        obs     [depth][num_envs][leaf shape]   ring of `depth` result slots
 *        action  [num_envs][leaf shape]
 *        reward  [depth][num_envs] float64, terminated/truncated [depth][num_envs] uint8
 *   [stats header]               the segment's last 64 bytes: magic "FVST", FV_VERSION, the
 *                                sizes above, num workers/envs, owner pid, created time
 *                                (fastvec/stats.py), so a reader (fastvec top) finds the
 *                                control blocks without knowing the spaces
 *
 * Byte layout of one control block (little endian, 64-byte aligned, FV_CTL_SIZE = 1024).
 * Fields written by the parent and by the worker sit on different cache lines (liveness
 * excepted: the parent stores it only at init). Lines 0-3 belong to one generation of the
 * slot's process and fv_ctl_init wipes them; lines 4-15 are the slot's statistics for
 * readers outside the job (fastvec top, fastvec export) and count over every generation:
 * fv_ctl_init leaves them alone.
 *
 *   off size  field             writer   meaning
 *     0    4  magic             parent   FV_MAGIC; anything else means "not initialised"
 *     4    4  version           parent   FV_VERSION
 *     8    4  worker_index      parent
 *    12    4  generation        parent   how many times this slot was respawned (as in liveness)
 *    16    8  owner_pid         parent   pid of the parent; the worker exits when it is gone
 *    24   40  (reserved)
 *    64    8  req_seq           parent   sequence number of the latest request (stored last, release)
 *    72    4  opcode            parent   FV_OP_*
 *    76    4  ring_index        parent   result slot (0..depth-1) the worker writes to
 *    80    8  req_payload_len   parent   bytes of pickled request arguments in the side buffer
 *    88    8  env_mask          parent   bit i: the request concerns the worker's env i
 *    96    4  flags             parent   FV_REQ_* bits
 *   100    4  batch_epoch       parent   the batch a FV_REQ_COUNTED request belongs to
 *   104   24  (reserved)
 *   128    8  resp_seq          worker   sequence number of the latest finished request (release)
 *   136    4  status            worker   FV_ST_*
 *   140    4  worker_pid        worker
 *   144    8  resp_payload_len  worker   bytes of pickled reply in the side buffer (0: none)
 *   152    8  busy_since_ns     worker   CLOCK_MONOTONIC ns the current request started; 0 when idle
 *   160    8  last_request_ns   worker   duration of the latest finished request (a REPLAY's
 *                                         excepted: it is many steps, not one)
 *   168    8  progress          worker   requests finished since start
 *   176    8  episodes          worker   episodes finished since start
 *   184    8  rss_bytes         worker   resident set size after the latest request
 *   192    8  liveness          both     generation << 32 | beats (beats at 192, generation
 *                                         at 196): the parent stores generation << 32 at init,
 *                                         the worker's heartbeat thread adds a beat per interval
 *   200    8  payload_cap       worker   current size of the worker's side buffer
 *   208    8  beat_ns           worker   CLOCK_MONOTONIC ns of the latest beat (0: none yet)
 *   216   40  (reserved)
 *  -- statistics (not wiped at init) --
 *   256    8  pub_seq           parent   seqlock of lines 4-7: odd while the parent writes them
 *   264    4  state             parent   FV_STATE_*
 *   268    4  last_reason       parent   FV_REASON_* of the latest failure or recycling (0: none)
 *   272    8  last_failure_ns   parent   CLOCK_REALTIME ns of it
 *   280    8  base_requests     parent   requests the slot's earlier generations finished
 *   288    8  base_episodes     parent   episodes the slot's earlier generations finished
 *   296    8  recycles          parent   planned replacements
 *   304   16  (reserved)
 *   320   64  restarts[8]       parent   restarts by reason: restarts[FV_REASON_x - 1]
 *   384  128  last_detail       parent   the latest failure's text, UTF-8, NUL-padded
 *   512    8  step_ns_sum       worker   sum of the durations of every STEP request
 *   520   56  (reserved)
 *   576  448  step_hist[56]     worker   STEP requests by duration d (ns): bucket b counts
 *                                         floor(log2(max(d, 1))) == b, the last one >= 2^55
 *
 * Statistics cost the step path two stores in fv_complete, after the reply is published.
 * The parent's lines 4-7 change only on the failure path, under a seqlock (fv_publish):
 * a reader copies the block with fv_ctl_snapshot and retries while pub_seq is odd or moved.
 * A late writer of a replaced generation can only add to a count that really happened.
 *
 * Protocol: the parent writes the request fields, then req_seq (release); posts the
 * worker's request semaphore. The worker reads req_seq (acquire), then the fields;
 * when done it writes the reply fields, then resp_seq = req_seq (release); posts the
 * shared done semaphore. A reply is valid only if resp_seq equals the seq the parent
 * is waiting for, so a late reply of a replaced worker is recognised and dropped.
 *
 * Batches: a request flagged FV_REQ_COUNTED belongs to the batch `batch_epoch`, whose size
 * the parent armed in the batch block (uint64 `state` at offset 0: epoch << 32 | remaining).
 * A worker leaves the batch after publishing its reply; the one whose decrement takes
 * `remaining` to exactly 0 posts the done semaphore, the others do not, so the parent wakes
 * once per batch instead of once per worker. A decrement carries the epoch of its request
 * and is dropped if the parent has armed a newer batch since, so a reply that is late
 * (its worker published, then was descheduled before leaving) can never count against the
 * next batch. A worker that dies owes its decrement forever: the watchdog posts instead,
 * and the parent finds the failure through resp_seq.
 *
 * The done semaphore is a wake-up hint, never a count of replies: the parent drains it
 * before each wait and then trusts resp_seq, so its count stays bounded by the number of
 * posts one wait can miss (one per worker at most).
 *
 * Heartbeat: a C thread of the worker counts beats in the low half of `liveness`; the high
 * half names the generation the beats belong to. A beat is one compare-and-swap that adds 1
 * only while the high half is the generation the thread started under, and fv_ctl_init
 * publishes (new generation << 32 | 0) in one atomic store before it wipes anything else.
 * So a retiring worker (planned recycling: its successor starts in the same control block
 * while it closes its envs) can never beat for its successor, not even one beat that
 * checked before the init and landed after it: a successor shows beats only once its own
 * heartbeat thread ran, and until then the parent judges it by start_timeout. The count
 * wraps from 2^32 - 1 to 1: 0 always means "this generation never beat".
 */
#ifndef FASTVEC_RING_H
#define FASTVEC_RING_H

#include <semaphore.h>
#include <stdint.h>

#define FV_MAGIC 0x31525646u /* "FVR1" */
#define FV_VERSION 4u /* 3: liveness carries its generation; 4: statistics lines, stats header */
#define FV_CTL_SIZE 1024
#define FV_BATCH_SIZE 64
#define FV_REASONS 8
#define FV_DETAIL_SIZE 128
#define FV_HIST_BUCKETS 56

/* Opcodes: one place, shared by C and Python (fastvec/_ring.pxd re-exports them). */
enum {
    FV_OP_NONE = 0,
    FV_OP_RESET = 1,
    FV_OP_STEP = 2,
    FV_OP_CALL = 3,
    FV_OP_SET_ATTR = 4,
    FV_OP_CLOSE = 5,
    FV_OP_REPLAY = 6, /* rebuild episodes from the parent's log (fastvec/replay.py); its
                         duration is not a request's: last_request_ns keeps the previous */
};

/* Request flags. */
enum {
    FV_REQ_COUNTED = 1, /* part of an armed batch: post done only when the batch completes */
    FV_REQ_NO_SPIN = 2, /* no core to spare for spinning (the parent sleeps for this reply):
                           the worker sleeps for its next request too */
};

/* Reply status. */
enum {
    FV_ST_OK = 0,
    FV_ST_ERROR = 1,     /* the env raised; pickled error in the side buffer */
    FV_ST_MISMATCH = 2,  /* the env returned data that does not fit its space */
};

/* Slot states (lines 4-7), published by the parent for readers outside the job. */
enum {
    FV_STATE_NONE = 0,      /* no process started yet */
    FV_STATE_STARTING = 1,  /* a process was started, its envs are being built */
    FV_STATE_SERVING = 2,
    FV_STATE_REPLACING = 3, /* failed or recycled: its process is being replaced */
    FV_STATE_DISABLED = 4,  /* out of play: the restart budget ran out */
    FV_STATE_RESUMED = 5,   /* serving an episode replayed after a replacement */
};

/* Why a slot's process was replaced (Failure.reason in fastvec/failures.py). */
enum {
    FV_REASON_NONE = 0,
    FV_REASON_DIED = 1,
    FV_REASON_FROZEN = 2,
    FV_REASON_HUNG = 3,
    FV_REASON_EXCEPTION = 4,
    FV_REASON_START = 5,
    FV_REASON_MISMATCH = 6,
    FV_REASON_RECYCLE = 7,
    FV_REASON_OTHER = 8,
};

/* Return codes of the C functions. */
enum {
    FV_RC_OK = 0,
    FV_RC_BAD_MAGIC = -1,
    FV_RC_BAD_VERSION = -2,
    FV_RC_THREAD = -3,
    FV_RC_SYSCALL = -4,
    FV_RC_BUSY = -5, /* fv_ctl_snapshot: the parent kept publishing */
};

/* Exit code of a worker whose parent disappeared. */
#define FV_EXIT_ORPHANED 75

/* What the parent publishes of a slot (lines 4-7 after pub_seq; see the table above). */
typedef struct fv_pub {
    uint32_t state;
    uint32_t last_reason;
    uint64_t last_failure_ns;
    uint64_t base_requests;
    uint64_t base_episodes;
    uint64_t recycles;
    uint8_t _r4[16];
    uint64_t restarts[FV_REASONS];
    char last_detail[FV_DETAIL_SIZE];
} fv_pub;

typedef struct fv_ctl {
    /* parent line 0 */
    uint32_t magic;
    uint32_t version;
    uint32_t worker_index;
    uint32_t generation;
    int64_t owner_pid;
    uint8_t _r0[40];
    /* parent line 1: request */
    uint64_t req_seq;
    uint32_t opcode;
    uint32_t ring_index;
    uint64_t req_payload_len;
    uint64_t env_mask;
    uint32_t flags;
    uint32_t batch_epoch;
    uint8_t _r1[24];
    /* worker line 2: reply */
    uint64_t resp_seq;
    int32_t status;
    int32_t worker_pid;
    uint64_t resp_payload_len;
    uint64_t busy_since_ns;
    uint64_t last_request_ns;
    uint64_t progress;
    uint64_t episodes;
    uint64_t rss_bytes;
    /* worker line 3: liveness */
    uint64_t liveness; /* generation << 32 | beats */
    uint64_t payload_cap;
    uint64_t beat_ns;
    uint8_t _r3[40];
    /* parent lines 4-7: the slot's statistics, seqlock'd (not wiped at init) */
    uint64_t pub_seq;
    fv_pub pub;
    /* worker lines 8-15: step latencies (not wiped at init) */
    uint64_t step_ns_sum;
    uint8_t _r8[56];
    uint64_t step_hist[FV_HIST_BUCKETS];
} fv_ctl;

typedef struct fv_batch {
    uint64_t state; /* epoch << 32 | remaining */
    uint8_t _r[56];
} fv_batch;

/* Parent side. */
void fv_ctl_init(fv_ctl *c, uint32_t worker_index, uint32_t generation, int64_t owner_pid,
                 uint64_t start_seq);
int fv_ctl_check(const fv_ctl *c);
void fv_request(fv_ctl *c, uint64_t seq, uint32_t opcode, uint32_t ring_index,
                uint64_t payload_len, uint64_t env_mask, uint32_t flags, uint32_t epoch);
void fv_batch_arm(fv_batch *b, uint32_t epoch, uint32_t n);
uint64_t fv_resp_seq(const fv_ctl *c);
/* Beats of the generation now in the block (the low half of liveness). */
uint32_t fv_heartbeat(const fv_ctl *c);
uint64_t fv_busy_since(const fv_ctl *c);

/* Worker side. */
uint64_t fv_req_seq(const fv_ctl *c);
void fv_begin(fv_ctl *c);
void fv_complete(fv_ctl *c, uint64_t seq, int32_t status, uint64_t payload_len);
/* 1 if this reply completed batch `epoch` (the caller posts the done semaphore); 0 if the
   batch still owes replies or a newer batch was armed since (the decrement is dropped). */
int fv_batch_leave(fv_batch *b, uint32_t epoch);
/* Start a thread that beats the generation now in `c` every interval_ms (one per process). */
int fv_heartbeat_start(fv_ctl *c, uint32_t interval_ms, int64_t owner_pid);
/* One beat of `generation`, as the heartbeat thread beats: 1 if it counted, 0 if the block
   belongs to another generation now (nothing written). */
int fv_heartbeat_beat(fv_ctl *c, uint32_t generation);
/* Stop beating (a retiring worker, before it closes its envs). */
void fv_heartbeat_stop(void);
int fv_set_parent_death_signal(int sig);

/* Spins. Waking a sleeping process costs tens of microseconds on some VMs, so a short spin
   before blocking on the semaphore pays off. Every 64 polls a spinner calls sched_yield():
   when spinners outnumber cores, a process with real work on this core runs instead of
   waiting out a timeslice (a pure spinner there costs ~8 ms per hand-over).
   fv_spin_resp_until: spin until resp_seq == target or spin_ns pass; returns resp_seq.
   (The parent waits for a known seq: sequence numbers are global, so "differs from the
   previous" says nothing.) */
uint64_t fv_spin_resp_until(const fv_ctl *c, uint64_t target, uint64_t spin_ns);

/* Semaphore waits for the parent. They return FV_WAIT_INTR on a signal instead of retrying,
   so the caller (with the GIL) can run Python's signal handlers and let their exceptions
   (KeyboardInterrupt, SystemExit from a SIGTERM handler, a deadline) propagate, then wait
   on for the rest of its time. timeout_ns < 0 waits forever. */
enum { FV_WAIT_OK = 0, FV_WAIT_TIMEOUT = 1, FV_WAIT_INTR = 2, FV_WAIT_ERROR = 3 };
int fv_sem_wait(sem_t *s, int64_t timeout_ns);
int fv_sem_trywait(sem_t *s);

/* Batched forms of the above, so that one call of the parent covers every worker.
   fv_send_batch: arm batch `epoch` for n requests, write each (seq seqs[i], mask masks[i],
   side-buffer bytes lens[i]) flagged FV_REQ_COUNTED | flags, then post every request
   semaphore.
   fv_spin_all: spin up to spin_ns until every ctls[i]->resp_seq == seqs[i]; returns the
   index of the first one still owing its reply, or -1 when all replied. It does not spin
   when a worker's previous request took longer than spin_ns (last_request_ns): a reply
   is worth spinning for only when it is expected within the spin window.
   fv_await_all: the parent's whole wait for a batch: fv_spin_all, then sleep on `done`
   (posted by the batch's last replier) for at most block_ns (< 0: no limit). A post that
   is not the batch's (a stale one) sends it back to sleep; `*alarm` non-zero (the
   watchdog found a failure, then posted) sends it back to the caller. Returns -1 when
   every ctls[i] replied seqs[i] with FV_ST_OK and no alarm is up. Otherwise returns the
   index of the first one still owing its reply or not OK (0 when all replied OK but the
   alarm is up) and sets *why: FV_WAIT_OK (the replies are in, or the alarm is up),
   FV_WAIT_TIMEOUT, FV_WAIT_INTR (run the signal handlers, call again with spin_ns 0) or
   FV_WAIT_ERROR.
   fv_first_payload: index of the first reply carrying side-buffer bytes, or -1.
   fv_sem_drain: take every pending post of `s` without blocking; returns how many. */
void fv_send_batch(fv_batch *b, uint32_t epoch, fv_ctl *const *ctls, sem_t *const *sems,
                   const uint64_t *seqs, const uint64_t *masks, const uint64_t *lens,
                   uint32_t n, uint32_t opcode, uint32_t ring_index, uint32_t flags);
int64_t fv_spin_all(fv_ctl *const *ctls, const uint64_t *seqs, uint32_t n, uint64_t spin_ns);
int64_t fv_await_all(fv_ctl *const *ctls, const uint64_t *seqs, uint32_t n, uint64_t spin_ns,
                     sem_t *done, int64_t block_ns, const uint32_t *alarm, int *why);
/* The alarm word of fv_await_all, set from another thread. */
void fv_alarm_set(uint32_t *alarm, uint32_t value);
int64_t fv_first_payload(fv_ctl *const *ctls, uint32_t n);
uint32_t fv_sem_drain(sem_t *s);

/* Worker: wait for a request newer than `last`: spin up to spin_ns on req_seq, then block
   on the request semaphore `s` (a wake-up hint: a post a spin overtook is taken here, a
   stale one only repeats the wait) for at most block_ns. No spin after a request of ours
   that took longer than spin_ns: the next one waits for equally slow siblings. Returns the new req_seq, or
   `last` when the time ran out or a signal came: the caller runs Python's signal handlers
   and calls again. (A signal that lands while the spin runs interrupts no system call, so
   the block is bounded: its handler runs within block_ns.) */
uint64_t fv_wait_request(const fv_ctl *c, sem_t *s, uint64_t last, uint64_t spin_ns,
                         int64_t block_ns);
/* Worker: publish the reply to request `seq` and wake the parent if it is owed a wake-up
   (not counted, or this reply completed its batch). */
void fv_reply(fv_ctl *c, fv_batch *b, sem_t *done, uint64_t seq, int32_t status,
              uint64_t payload_len, uint32_t flags, uint32_t epoch);

/* CLOCK_MONOTONIC in ns: the clock both sides compare busy_since_ns against. */
uint64_t fv_now_ns(void);

/* Statistics. fv_publish (parent, failure path): copy *p into the block's lines 4-7 under
   the seqlock (writers exclude each other, so any thread of the parent may publish).
   fv_ctl_snapshot (any reader, a read-only mapping will do): copy the whole block into
   *out word by word, lines 4-7 consistent; FV_RC_BUSY if the parent kept publishing
   through every try. fv_hist_bucket: the step_hist bucket of a duration. */
void fv_publish(fv_ctl *c, const fv_pub *p);
int fv_ctl_snapshot(const fv_ctl *c, fv_ctl *out);
uint32_t fv_hist_bucket(uint64_t ns);

#endif
