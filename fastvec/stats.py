"""What a FastVectorEnv publishes of itself in its own shared memory, for readers outside
the job (``fastvec top``, ``fastvec export``): the stats header, the parent's side of a
slot's statistics, and the decoding of a control block copied by a reader.

    main segment: [ctl 0 .. ctl W-1][batch][data ...][stats header: its last 64 bytes]

    ctl lines 0-3   one generation of the worker: pid, heartbeat (count and time),
                    requests, episodes, RSS (csrc/ring.h)
    ctl lines 4-7   the parent's view of the slot, seqlock'd: state, restarts by reason,
                    last failure, what earlier generations finished (publish_slot, here)
    ctl lines 8-15  the worker's STEP durations: a log2 histogram in ns and their sum,
                    written in C next to where ring.c completes a request

Nothing here runs on the step path: the header is written once, a slot's statistics on
the failure path only. A reader maps the segment read-only and never writes.

Stats header (little endian, the segment's last HEADER_SIZE bytes, magic written last)::

    off size field
      0    4 magic            b"FVST"
      4    4 version          the layout version: FV_VERSION of csrc/ring.h
      8    4 header_size      64
     12    4 ctl_size         FV_CTL_SIZE; control block w at w * ctl_size
     16    4 num_workers
     20    4 num_envs
     24    4 envs_per_worker  k: worker w hosts envs w*k .. min((w+1)*k, num_envs) - 1
     28    4 hist_buckets     FV_HIST_BUCKETS
     32    8 owner_pid
     40    8 created_ns       CLOCK_REALTIME
     48    8 segment_size     the whole segment (the header's own end)
     56    4 spares_wanted    hot spares asked for (spares=n); 0 without
     60    4 spares_ready     spares built and waiting now (rewritten as they change)
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace

from fastvec import _ring
from fastvec.errors import StatsLayoutError

MAGIC = b"FVST"
VERSION = _ring.VERSION
HEADER_SIZE = 64
_HEADER = struct.Struct("<4sIIIIIIIqQQ8x")
_SPARES = struct.Struct("<II")  # at the header's offset 56: spares wanted, ready
_SPARES_AT = 56

STATES = {_ring.STATE_NONE: "new", _ring.STATE_STARTING: "starting",
          _ring.STATE_SERVING: "serving", _ring.STATE_REPLACING: "replacing",
          _ring.STATE_DISABLED: "disabled", _ring.STATE_RESUMED: "resumed"}
# Failure.reason (fastvec/failures.py) -> its code; anything else counts as "other"
REASON_CODES = {"died": _ring.REASON_DIED, "frozen": _ring.REASON_FROZEN,
                "hung": _ring.REASON_HUNG, "exception": _ring.REASON_EXCEPTION,
                "start": _ring.REASON_START, "mismatch": _ring.REASON_MISMATCH,
                "recycle": _ring.REASON_RECYCLE, "other": _ring.REASON_OTHER}
REASONS = {code: name for name, code in REASON_CODES.items()}


@dataclass(frozen=True)
class Header:
    """An instance's stats header, as read back."""

    version: int
    ctl_size: int
    num_workers: int
    num_envs: int
    envs_per_worker: int
    hist_buckets: int
    owner_pid: int
    created_ns: int
    segment_size: int

    def envs(self, worker: int) -> list[int]:
        k = self.envs_per_worker
        return list(range(worker * k, min((worker + 1) * k, self.num_envs)))


def write_header(buf, *, num_workers: int, num_envs: int, envs_per_worker: int,
                 owner_pid: int) -> None:
    """Write the stats header into the last HEADER_SIZE bytes of ``buf`` (the main segment,
    laid out by layout.Plan), the magic last so that a reader never takes half a header."""
    size = len(buf)
    offset = size - HEADER_SIZE
    _HEADER.pack_into(buf, offset, b"\0\0\0\0", VERSION, HEADER_SIZE, _ring.CTL_SIZE,
                      num_workers, num_envs, envs_per_worker, _ring.HIST_BUCKETS, owner_pid,
                      time.time_ns(), size)
    buf[offset:offset + 4] = MAGIC


def publish_spares(buf, wanted: int, ready: int) -> None:
    """The spares wanted and ready now, for readers outside the job (the pool's turns
    only: a spare ready, adopted or lost). Two aligned 32-bit stores."""
    _SPARES.pack_into(buf, len(buf) - HEADER_SIZE + _SPARES_AT, wanted, ready)


def read_spares(buf) -> tuple[int, int]:
    """(wanted, ready) as last published; (0, 0) for an instance without spares."""
    return _SPARES.unpack_from(buf, len(buf) - HEADER_SIZE + _SPARES_AT)


def read_header(buf) -> Header | None:
    """The stats header at the end of ``buf``; None while its magic is not written yet (an
    instance being built). Raises StatsLayoutError for anything this fastvec cannot read."""
    size = len(buf)
    if size < HEADER_SIZE:
        raise StatsLayoutError(f"a {size}-byte segment is too small to end with a stats header")
    (magic, version, header_size, ctl_size, workers, envs, k, buckets, owner, created,
     seg_size) = _HEADER.unpack_from(buf, size - HEADER_SIZE)
    if magic == b"\0\0\0\0":
        return None
    if magic != MAGIC:
        raise StatsLayoutError(
            f"no fastvec stats header (magic {magic!r}, expected {MAGIC!r}): a fastvec older "
            f"than layout version 4 wrote it, or something else did; this fastvec reads "
            f"layout version {VERSION} only")
    if version != VERSION:
        raise StatsLayoutError(
            f"stats header of layout version {version}; this fastvec reads layout version "
            f"{VERSION} only: run the fastvec release that the job runs")
    fits = (header_size == HEADER_SIZE and ctl_size == _ring.CTL_SIZE and seg_size == size
            and buckets == _ring.HIST_BUCKETS and 0 < k and 0 < workers == -(-envs // k)
            and workers * ctl_size <= size - HEADER_SIZE)
    if not fits:
        raise StatsLayoutError(
            f"inconsistent stats header of layout version {version}: header {header_size} "
            f"bytes, control blocks {ctl_size} x {workers}, {buckets} buckets, segment "
            f"{seg_size} bytes of {size}")
    return Header(version, ctl_size, workers, envs, k, buckets, owner, created, seg_size)


# -- the parent's side ---------------------------------------------------------------------------

def publish_slot(ctl: _ring.Ctl, state: int, reasons: Mapping[str, int], *, recycles: int,
                 base_requests: int, base_episodes: int, last_failure=None) -> None:
    """Publish one slot's statistics (lines 4-7 of its control block) from the parent's
    records: ``reasons`` counts restarts by Failure.reason; ``last_failure`` is a Failure
    or None. The failure path only: a handful of stores under the seqlock."""
    restarts = [0] * _ring.REASONS
    for name, n in list(reasons.items()):
        restarts[REASON_CODES.get(name, _ring.REASON_OTHER) - 1] += int(n)
    code, when, detail = 0, 0, b""
    if last_failure is not None:
        code = REASON_CODES.get(last_failure.reason, _ring.REASON_OTHER)
        when = int(last_failure.when * 1e9)
        detail = _cut(last_failure.detail, _ring.DETAIL_SIZE - 1)
    ctl.publish(state, restarts, recycles, base_requests, base_episodes, code, when, detail)


def _cut(text: str, limit: int) -> bytes:
    """``text`` as UTF-8 in at most ``limit`` bytes, never half a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


# -- the readers' side --------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerStats:
    """One worker slot as a reader sees it at one moment (see :func:`worker_stats`)."""

    worker: int
    envs: list
    pid: int | None
    state: str
    generation: int
    heartbeat_age: float | None  # seconds since its latest beat (None: none yet)
    requests: int  # every generation
    episodes: int  # every generation
    steps: int  # STEP requests, every generation: the histogram's total
    step_seconds: float  # their summed duration
    step_hist: tuple  # STEP requests by duration: bucket b holds [2^b, 2^(b+1)) ns
    restarts: dict  # by reason, only those that happened
    recycles: int
    last_reason: str | None
    last_failure: str | None
    last_failure_time: float | None  # seconds since the epoch
    rss_bytes: int
    busy_seconds: float | None  # how long the request in progress has run (None: idle)


def worker_stats(block: dict, now_ns: int | None = None) -> WorkerStats:
    """A reader's record of one control block copied by ``_ring.snapshot`` (its envs left
    empty: the header knows them). ``now_ns`` is CLOCK_MONOTONIC (``time.monotonic_ns()``),
    the clock of heartbeats and busy times. Lines 0-3 count only once the block carries
    this layout's magic (a slot never started has none)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    valid = block["magic"] == _ring.MAGIC and block["version"] == _ring.VERSION
    hist = tuple(block["step_hist"])
    restarts = {REASONS.get(code + 1, "other"): n
                for code, n in enumerate(block["restarts"]) if n}
    reason = block["last_reason"]
    beat, busy = block["beat_ns"], block["busy_since_ns"]
    return WorkerStats(
        worker=block["worker_index"] if valid else -1,
        envs=[],
        pid=(block["worker_pid"] or None) if valid else None,
        state=STATES.get(block["state"], f"unknown ({block['state']})"),
        generation=block["generation"] if valid else 0,
        heartbeat_age=max(0.0, (now - beat) / 1e9) if valid and beat else None,
        requests=block["base_requests"] + (block["progress"] if valid else 0),
        episodes=block["base_episodes"] + (block["episodes"] if valid else 0),
        steps=sum(hist),
        step_seconds=block["step_ns_sum"] / 1e9,
        step_hist=hist,
        restarts=restarts,
        recycles=block["recycles"],
        last_reason=REASONS.get(reason, "other") if reason else None,
        last_failure=block["last_detail"] if reason else None,
        last_failure_time=block["last_failure_ns"] / 1e9 if reason else None,
        rss_bytes=block["rss_bytes"] if valid else 0,
        busy_seconds=max(0.0, (now - busy) / 1e9) if valid and busy else None)


def read_worker(buf, header: Header, worker: int, now_ns: int | None = None) -> WorkerStats:
    """Copy worker ``worker``'s control block out of ``buf`` and decode it. Raises
    RingError if the parent kept publishing through every try (the next look will do)."""
    block = _ring.snapshot(buf, worker * header.ctl_size)
    return replace(worker_stats(block, now_ns), worker=worker, envs=header.envs(worker))


def percentile(hist, q: float) -> float | None:
    """The ``q``-th percentile (0-100), in seconds, of the durations a log2 histogram counts
    (bucket b: [2^b, 2^(b+1)) ns), interpolated within its bucket; None when it is empty."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = max(1.0, q / 100.0 * total)
    seen = 0
    for b, n in enumerate(hist):
        if n and seen + n >= rank:
            lo = 0 if b == 0 else 2 ** b
            return (lo + (2 ** (b + 1) - lo) * (rank - seen) / n) / 1e9
        seen += n
    return 2.0 ** len(hist) / 1e9


def hist_delta(new, old) -> tuple:
    """What a histogram counted between two looks (a counter never goes down; one that did
    belongs to another slot's life: then the new one whole)."""
    if old is None or len(old) != len(new) or any(a < b for a, b in zip(new, old)):
        return tuple(new)
    return tuple(a - b for a, b in zip(new, old))


__all__ = ["publish_spares", "read_spares", "HEADER_SIZE", "MAGIC", "REASONS", "REASON_CODES", "STATES", "VERSION", "Header",
           "WorkerStats", "hist_delta", "percentile", "publish_slot", "read_header",
           "read_worker", "worker_stats", "write_header"]


def health_metrics(health: list[dict]) -> dict[str, float]:
    """``FastVectorEnv.health()`` as flat numbers for a training logger (TensorBoard, W&B,
    CSV; fastvec.sb3.HealthCallback writes them under ``fastvec/``): ``restarts`` and
    ``restarts_<reason>``, ``resumed_episodes``, ``not_resumed_episodes``,
    ``disabled_envs``, ``step_latency_p99_ms`` (the slowest worker's, when measured) and,
    with hot spares, ``spares_ready`` and ``spares_building``."""
    reasons: Counter = Counter()
    not_resumed = 0
    for h in health:
        reasons.update(h["reasons"])
        not_resumed += sum(h.get("not_resumed", {}).values())
    out: dict[str, float] = {"restarts": sum(h["restarts"] for h in health)}
    out.update({f"restarts_{reason}": n for reason, n in sorted(reasons.items())})
    out["resumed_episodes"] = sum(h.get("resumed", 0) for h in health)
    out["not_resumed_episodes"] = not_resumed
    out["disabled_envs"] = sum(len(h["envs"]) for h in health if h["disabled"])
    p99 = [h["step_latency_ms"]["p99"] for h in health if h["step_latency_ms"]]
    if p99:
        out["step_latency_p99_ms"] = max(p99)
    spares = [h["state"] for h in health if h.get("spare")]
    if spares:
        out["spares_ready"] = spares.count("ready")
        out["spares_building"] = spares.count("building")
    return out
