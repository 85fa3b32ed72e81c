/* fastvec ring: control-block protocol. See ring.h for the byte layout. */
#include "ring.h"

#include <errno.h>
#include <stdint.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

_Static_assert(sizeof(fv_ctl) == FV_CTL_SIZE, "fv_ctl must be FV_CTL_SIZE bytes");
_Static_assert(offsetof(fv_ctl, req_seq) == 64, "request line at 64");
_Static_assert(offsetof(fv_ctl, flags) == 96, "flags at 96");
_Static_assert(offsetof(fv_ctl, batch_epoch) == 100, "batch_epoch at 100");
_Static_assert(sizeof(fv_pub) % 8 == 0, "fv_pub is copied in words");
_Static_assert(sizeof(fv_batch) == FV_BATCH_SIZE, "fv_batch must be FV_BATCH_SIZE bytes");
_Static_assert(offsetof(fv_ctl, resp_seq) == 128, "reply line at 128");
_Static_assert(offsetof(fv_ctl, liveness) == 192, "liveness line at 192");
_Static_assert(offsetof(fv_ctl, beat_ns) == 208, "beat_ns at 208");
_Static_assert(offsetof(fv_ctl, pub_seq) == 256, "statistics lines at 256");
_Static_assert(offsetof(fv_ctl, pub.restarts) == 320, "restarts at 320");
_Static_assert(offsetof(fv_ctl, pub.last_detail) == 384, "last_detail at 384");
_Static_assert(offsetof(fv_ctl, step_ns_sum) == 512, "step latencies at 512");
_Static_assert(offsetof(fv_ctl, step_hist) == 576, "step_hist at 576");

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define RELAXED(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

uint64_t fv_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void fv_ctl_init(fv_ctl *c, uint32_t worker_index, uint32_t generation, int64_t owner_pid,
                 uint64_t start_seq) {
    /* The new generation first, in one store: from here on a beat of any older generation
       (a retiring worker's thread, even one that loaded the word before this store) fails
       its compare-and-swap, so the successor's count stays 0 until its own thread beats. */
    STORE(&c->liveness, (uint64_t)generation << 32);
    /* A respawned slot is dirty: wipe every other field (a late writer of the old
       generation may still store into them: atomics, never memset), the magic last. */
    RELAXED(&c->magic, 0u);
    RELAXED(&c->version, FV_VERSION);
    RELAXED(&c->worker_index, worker_index);
    RELAXED(&c->generation, generation);
    RELAXED(&c->owner_pid, owner_pid);
    RELAXED(&c->req_seq, start_seq);
    RELAXED(&c->opcode, 0u);
    RELAXED(&c->ring_index, 0u);
    RELAXED(&c->req_payload_len, 0);
    RELAXED(&c->env_mask, 0);
    RELAXED(&c->flags, 0u);
    RELAXED(&c->batch_epoch, 0u);
    RELAXED(&c->resp_seq, start_seq);
    RELAXED(&c->status, 0);
    RELAXED(&c->worker_pid, 0);
    RELAXED(&c->resp_payload_len, 0);
    RELAXED(&c->busy_since_ns, 0);
    RELAXED(&c->last_request_ns, 0);
    RELAXED(&c->progress, 0);
    RELAXED(&c->episodes, 0);
    RELAXED(&c->rss_bytes, 0);
    RELAXED(&c->payload_cap, 0);
    RELAXED(&c->beat_ns, 0);
    /* lines 4-15 count over the slot's life: left alone. Nobody reads or writes the
       reserved bytes */
    memset(c->_r0, 0, sizeof c->_r0);
    memset(c->_r1, 0, sizeof c->_r1);
    memset(c->_r3, 0, sizeof c->_r3);
    STORE(&c->magic, FV_MAGIC);
}

int fv_ctl_check(const fv_ctl *c) {
    if (LOAD(&c->magic) != FV_MAGIC) return FV_RC_BAD_MAGIC;
    if (c->version != FV_VERSION) return FV_RC_BAD_VERSION;
    return FV_RC_OK;
}

void fv_request(fv_ctl *c, uint64_t seq, uint32_t opcode, uint32_t ring_index,
                uint64_t payload_len, uint64_t env_mask, uint32_t flags, uint32_t epoch) {
    RELAXED(&c->opcode, opcode);
    RELAXED(&c->flags, flags);
    RELAXED(&c->batch_epoch, epoch);
    RELAXED(&c->ring_index, ring_index);
    RELAXED(&c->req_payload_len, payload_len);
    RELAXED(&c->env_mask, env_mask);
    STORE(&c->req_seq, seq);
}

void fv_batch_arm(fv_batch *b, uint32_t epoch, uint32_t n) {
    STORE(&b->state, ((uint64_t)epoch << 32) | n);
}

int fv_batch_leave(fv_batch *b, uint32_t epoch) {
    uint64_t cur = LOAD(&b->state);
    for (;;) {
        if ((uint32_t)(cur >> 32) != epoch || (uint32_t)cur == 0) return 0; /* stale */
        uint64_t next = cur - 1;
        if (__atomic_compare_exchange_n(&b->state, &cur, next, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return (uint32_t)next == 0;
    }
}

uint64_t fv_resp_seq(const fv_ctl *c) { return LOAD(&c->resp_seq); }
uint32_t fv_heartbeat(const fv_ctl *c) { return (uint32_t)LOAD(&c->liveness); }
uint64_t fv_busy_since(const fv_ctl *c) { return LOAD(&c->busy_since_ns); }
uint64_t fv_req_seq(const fv_ctl *c) { return LOAD(&c->req_seq); }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Between rounds of 64 polls: give the core away if another runnable process wants it
   (spinners may outnumber cores), then check the deadline. */
static inline int spin_round_over(uint64_t deadline) {
    sched_yield();
    return fv_now_ns() >= deadline;
}

static uint64_t spin_until_changed(const uint64_t *p, uint64_t seq, uint64_t spin_ns) {
    uint64_t v = LOAD(p);
    if (v != seq || spin_ns == 0) return v;
    uint64_t deadline = fv_now_ns() + spin_ns;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            cpu_relax();
            v = LOAD(p);
            if (v != seq) return v;
        }
        if (spin_round_over(deadline)) return v;
    }
}

uint64_t fv_spin_resp_until(const fv_ctl *c, uint64_t target, uint64_t spin_ns) {
    uint64_t v = LOAD(&c->resp_seq);
    if (v == target || spin_ns == 0) return v;
    uint64_t deadline = fv_now_ns() + spin_ns;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            cpu_relax();
            v = LOAD(&c->resp_seq);
            if (v == target) return v;
        }
        if (spin_round_over(deadline)) return v;
    }
}

int fv_sem_wait(sem_t *s, int64_t timeout_ns) {
    int rc;
    if (timeout_ns < 0) {
        rc = sem_wait(s);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t ns = (int64_t)ts.tv_nsec + timeout_ns % 1000000000LL;
        ts.tv_sec += (time_t)(timeout_ns / 1000000000LL + ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        rc = sem_clockwait(s, CLOCK_MONOTONIC, &ts);
    }
    if (rc == 0) return FV_WAIT_OK;
    if (errno == ETIMEDOUT) return FV_WAIT_TIMEOUT;
    if (errno == EINTR) return FV_WAIT_INTR;
    return FV_WAIT_ERROR;
}

int fv_sem_trywait(sem_t *s) {
    if (sem_trywait(s) == 0) return FV_WAIT_OK;
    if (errno == EAGAIN) return FV_WAIT_TIMEOUT;
    if (errno == EINTR) return FV_WAIT_INTR;
    return FV_WAIT_ERROR;
}

void fv_begin(fv_ctl *c) { STORE(&c->busy_since_ns, fv_now_ns()); }

uint32_t fv_hist_bucket(uint64_t ns) {
    uint32_t b = 63u - (uint32_t)__builtin_clzll(ns | 1u);
    return b < FV_HIST_BUCKETS ? b : FV_HIST_BUCKETS - 1;
}

void fv_complete(fv_ctl *c, uint64_t seq, int32_t status, uint64_t payload_len) {
    uint64_t started = LOAD(&c->busy_since_ns);
    uint64_t now = fv_now_ns();
    uint64_t took = started ? now - started : 0;
    /* read before the reply goes out: the parent may write its next request right after */
    int step = started && c->opcode == FV_OP_STEP;
    RELAXED(&c->status, status);
    RELAXED(&c->resp_payload_len, payload_len);
    if (LOAD(&c->opcode) != FV_OP_REPLAY) /* a replay is many steps, not one */
        RELAXED(&c->last_request_ns, took);
    RELAXED(&c->progress, c->progress + 1);
    RELAXED(&c->busy_since_ns, 0);
    STORE(&c->resp_seq, seq);
    if (step) { /* statistics, after the reply: they never delay it (only this worker writes) */
        uint32_t b = fv_hist_bucket(took);
        RELAXED(&c->step_ns_sum, c->step_ns_sum + took);
        RELAXED(&c->step_hist[b], c->step_hist[b] + 1);
    }
}

void fv_send_batch(fv_batch *b, uint32_t epoch, fv_ctl *const *ctls, sem_t *const *sems,
                   const uint64_t *seqs, const uint64_t *masks, const uint64_t *lens,
                   uint32_t n, uint32_t opcode, uint32_t ring_index, uint32_t flags) {
    fv_batch_arm(b, epoch, n);
    for (uint32_t i = 0; i < n; i++)
        fv_request(ctls[i], seqs[i], opcode, ring_index, lens[i], masks[i],
                   FV_REQ_COUNTED | flags, epoch);
    for (uint32_t i = 0; i < n; i++) sem_post(sems[i]);
}

static int64_t first_owing(fv_ctl *const *ctls, const uint64_t *seqs, uint32_t from,
                           uint32_t n) {
    for (uint32_t i = from; i < n; i++)
        if (LOAD(&ctls[i]->resp_seq) != seqs[i]) return (int64_t)i;
    return -1;
}

/* A reply is expected "within microseconds" when the worker's previous request took less
   than the spin window; after a slow one (a simulator's millisecond step) spinning would
   only take CPU from the workers, so we sleep at once. */
static inline int worth_spinning(const fv_ctl *c, uint64_t spin_ns) {
    return LOAD(&c->last_request_ns) <= spin_ns;
}

int64_t fv_spin_all(fv_ctl *const *ctls, const uint64_t *seqs, uint32_t n, uint64_t spin_ns) {
    int64_t i = first_owing(ctls, seqs, 0, n);
    if (i < 0 || spin_ns == 0) return i;
    for (uint32_t k = 0; k < n; k++)
        if (!worth_spinning(ctls[k], spin_ns)) return i;
    uint64_t deadline = fv_now_ns() + spin_ns;
    for (;;) {
        for (int k = 0; k < 64; k++) {
            cpu_relax();
            i = first_owing(ctls, seqs, (uint32_t)i, n);
            if (i < 0) return i;
        }
        if (spin_round_over(deadline)) return i;
    }
}

static int64_t first_not_ok(fv_ctl *const *ctls, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        if (LOAD(&ctls[i]->status) != FV_ST_OK) return (int64_t)i;
    return -1;
}

int64_t fv_await_all(fv_ctl *const *ctls, const uint64_t *seqs, uint32_t n, uint64_t spin_ns,
                     sem_t *done, int64_t block_ns, const uint32_t *alarm, int *why) {
    *why = FV_WAIT_OK;
    int64_t i = fv_spin_all(ctls, seqs, n, spin_ns);
    if (i >= 0) {
        uint64_t deadline = block_ns < 0 ? UINT64_MAX : fv_now_ns() + (uint64_t)block_ns;
        for (;;) {
            if (LOAD(alarm)) return i;
            int64_t left = block_ns < 0 ? -1 : (int64_t)(deadline - fv_now_ns());
            if (block_ns >= 0 && left < 0) left = 0;
            int rc = left == 0 ? fv_sem_trywait(done) : fv_sem_wait(done, left);
            i = first_owing(ctls, seqs, (uint32_t)i, n);
            if (i < 0) break;
            if (rc != FV_WAIT_OK) {
                *why = rc;
                return i;
            }
            /* woken, batch still owing: a stale post, or the watchdog's (alarm up) */
        }
    }
    if (LOAD(alarm)) return 0;
    return first_not_ok(ctls, n); /* resp_seq was loaded with acquire: status is current */
}

void fv_alarm_set(uint32_t *alarm, uint32_t value) { STORE(alarm, value); }

int64_t fv_first_payload(fv_ctl *const *ctls, uint32_t n) {
    for (uint32_t i = 0; i < n; i++)
        if (ctls[i]->resp_payload_len != 0) return (int64_t)i;
    return -1;
}

uint32_t fv_sem_drain(sem_t *s) {
    uint32_t n = 0;
    for (;;) {
        int rc = fv_sem_trywait(s);
        if (rc == FV_WAIT_OK) n++;
        else if (rc != FV_WAIT_INTR) return n;
    }
}

uint64_t fv_wait_request(const fv_ctl *c, sem_t *s, uint64_t last, uint64_t spin_ns,
                         int64_t block_ns) {
    /* after a slow request of ours, the others' are slow too: the next one is far off */
    if (!worth_spinning(c, spin_ns)) spin_ns = 0;
    uint64_t v = spin_until_changed(&c->req_seq, last, spin_ns);
    if (v != last) {
        /* Take the post that came with it (if it is there yet; if not, a later wait
           returns once, early): the count stays bounded either way. */
        sem_trywait(s);
        return v;
    }
    if (fv_sem_wait(s, block_ns) != FV_WAIT_OK) return last; /* timeout or signal */
    return LOAD(&c->req_seq);
}

void fv_reply(fv_ctl *c, fv_batch *b, sem_t *done, uint64_t seq, int32_t status,
              uint64_t payload_len, uint32_t flags, uint32_t epoch) {
    fv_complete(c, seq, status, payload_len);
    if (!(flags & FV_REQ_COUNTED) || fv_batch_leave(b, epoch)) sem_post(done);
}

/* ---- heartbeat: a plain pthread, so it beats while the main thread holds the GIL ---- */

typedef struct {
    fv_ctl *ctl;
    uint32_t interval_ms;
    uint32_t generation;
    int64_t owner_pid;
} hb_args;

static hb_args g_hb; /* one heartbeat per worker process */
static int g_hb_stop;

void fv_heartbeat_stop(void) { __atomic_store_n(&g_hb_stop, 1, __ATOMIC_RELEASE); }

int fv_heartbeat_beat(fv_ctl *c, uint32_t generation) {
    uint64_t cur = __atomic_load_n(&c->liveness, __ATOMIC_RELAXED);
    for (;;) {
        /* A retired worker's slot belongs to its successor: never beat for it. The check
           and the add are one CAS: an init between them makes the CAS fail. */
        if ((uint32_t)(cur >> 32) != generation) return 0;
        uint32_t beats = (uint32_t)cur + 1;
        if (beats == 0) beats = 1; /* 0 means "never beat" */
        uint64_t next = ((uint64_t)generation << 32) | beats;
        if (__atomic_compare_exchange_n(&c->liveness, &cur, next, 0, __ATOMIC_RELEASE,
                                        __ATOMIC_RELAXED)) {
            /* for readers' "heartbeat age"; a retiring worker (CAS failed) never gets here */
            RELAXED(&c->beat_ns, fv_now_ns());
            return 1;
        }
    }
}

static void *heartbeat_main(void *arg) {
    hb_args *a = (hb_args *)arg;
    struct timespec ts = {a->interval_ms / 1000, (long)(a->interval_ms % 1000) * 1000000L};
    for (;;) {
        if (!__atomic_load_n(&g_hb_stop, __ATOMIC_ACQUIRE))
            fv_heartbeat_beat(a->ctl, a->generation);
        /* The parent check backs up PR_SET_PDEATHSIG, which follows the forking thread
           (and, under forkserver, the server rather than the vector env's process). */
        if (a->owner_pid > 0 && kill((pid_t)a->owner_pid, 0) != 0 && errno == ESRCH)
            _exit(FV_EXIT_ORPHANED);
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int fv_heartbeat_start(fv_ctl *c, uint32_t interval_ms, int64_t owner_pid) {
    pthread_t tid;
    pthread_attr_t attr;
    sigset_t all, old;
    g_hb.ctl = c;
    g_hb.interval_ms = interval_ms ? interval_ms : 1;
    g_hb.generation = (uint32_t)(LOAD(&c->liveness) >> 32);
    g_hb.owner_pid = owner_pid;
    if (pthread_attr_init(&attr) != 0) return FV_RC_THREAD;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    /* Keep signals on the main thread, where Python expects them. */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&tid, &attr, heartbeat_main, &g_hb);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&attr);
    return rc == 0 ? FV_RC_OK : FV_RC_THREAD;
}

/* ---- statistics: the parent publishes (seqlock), readers copy ---- */

void fv_publish(fv_ctl *c, const fv_pub *p) {
    uint64_t seq = LOAD(&c->pub_seq);
    for (;;) { /* take the write side: even -> odd (another thread of the parent may publish) */
        if (!(seq & 1) && __atomic_compare_exchange_n(&c->pub_seq, &seq, seq + 1, 0,
                                                      __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
            break;
        sched_yield();
        seq = LOAD(&c->pub_seq);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the odd seq before any field */
    const uint64_t *src = (const uint64_t *)p;
    uint64_t *dst = (uint64_t *)&c->pub;
    for (size_t i = 0; i < sizeof *p / 8; i++) RELAXED(&dst[i], src[i]);
    STORE(&c->pub_seq, seq + 2);
}

static void copy_words(const fv_ctl *c, fv_ctl *out) {
    const uint64_t *src = (const uint64_t *)c;
    uint64_t *dst = (uint64_t *)out;
    for (size_t i = 0; i < sizeof *c / 8; i++) dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

int fv_ctl_snapshot(const fv_ctl *c, fv_ctl *out) {
    for (int tries = 0; tries < 1000; tries++) {
        uint64_t seq = LOAD(&c->pub_seq);
        if (!(seq & 1)) {
            copy_words(c, out);
            __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy before the second look */
            if (__atomic_load_n(&c->pub_seq, __ATOMIC_RELAXED) == seq) return FV_RC_OK;
        }
        sched_yield();
    }
    return FV_RC_BUSY;
}

int fv_set_parent_death_signal(int sig) {
    return prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 ? FV_RC_OK : FV_RC_SYSCALL;
}
