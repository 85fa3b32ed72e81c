"""Rebuilding an env's episode in a new worker, checked step by step: the worker's side of
resuming (the parent's log is fastvec/episodes.py, its decisions fastvec/resume.py).

What travels, per env of a REPLAY request (pickled in the side buffer, once per resume):

    Replay   how the episode began (``Start``), its actions, the calls made on the env in
             it, and what each step returned (reward, terminated, truncated) plus a digest
             of the last observation the parent handed out
    Fresh    no replay (nothing to replay from, or it cannot be trusted): the env starts a
             new episode at its next reset, with ``seed``; ``why`` says why

and back, per env: ``("resumed", steps, seconds, info)`` or ``("fallback", why)``.

A replay restores the start (a seeded reset, or the RNG state the env had just before an
unseeded reset, then that reset with the same options) and, if the env sent a snapshot of
the episode (``snapshot_every``), that snapshot, then steps the logged actions after it,
comparing every reward and flag with the log and the final observation's digest with the
parent's. Any difference, an exception, or running past the time budget stops it: the
env then falls back exactly as a ``Fresh`` plan does. Nothing of a replay is reported as
an episode start: it continues the episode the parent already knows.
"""

from __future__ import annotations

import hashlib
import math
import pickle
import time
from dataclasses import dataclass, field

import numpy as np

OP_CALL, OP_SET_ATTR = "call", "set_attr"  # the kinds of logged events


@dataclass(frozen=True)
class Start:
    """How an episode began: ``reset(seed=seed, options=options)``; with ``seed`` None,
    ``rng`` is the state of ``env.unwrapped.np_random``'s bit generator just before."""

    seed: int | None
    rng: dict | None
    options: dict | None = None


@dataclass(frozen=True)
class Snapshot:
    """An env's state after ``step`` steps of its episode: what its ``get_state()``
    returned, and its RNG state."""

    step: int
    state: object
    rng: dict | None


@dataclass
class Replay:
    start: Start
    actions: list  # per action leaf: an array (steps, *leaf shape), or None (pickled only)
    extras: dict  # step -> {leaf index: value} of leaves that travelled pickled
    events: list  # (before step, OP_CALL or OP_SET_ATTR, payload) in the order made
    reward: np.ndarray  # float64 (steps,)
    terminated: np.ndarray  # bool (steps,)
    truncated: np.ndarray
    digest: bytes  # of the last observation handed out (obs_digest)
    fallback_seed: int | None  # the seed of a fresh episode if the replay fails
    want_info: bool = False  # return the last info (load_state_dict reports it)
    snapshot: Snapshot | None = None  # restore it after the reset; the log goes on from it


@dataclass
class Fresh:
    seed: int | None
    why: str


@dataclass
class Outcome:
    """What became of one env's plan (built by the parent from the reply)."""

    resumed: bool
    why: str = ""
    steps: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def rng_state(env) -> dict | None:
    """The state of the env's ``np_random`` bit generator (None: the env has none)."""
    try:
        return env.unwrapped.np_random.bit_generator.state
    except AttributeError:
        return None


def set_rng_state(env, state: dict) -> None:
    bit_generator = getattr(np.random, state["bit_generator"])()
    bit_generator.state = state
    env.unwrapped.np_random = np.random.Generator(bit_generator)


def obs_digest(regions: list, ring: int, i: int, pickled) -> bytes:
    """A 64-bit digest of env ``i``'s observation in ring slot ``ring``: the bytes of its
    fixed-size leaves (``regions``: the ring's per-leaf regions, None for pickled leaves),
    then the pickle of its other leaves (``pickled``)."""
    h = hashlib.blake2b(digest_size=8)
    for region in regions:
        if region is not None:
            h.update(np.ascontiguousarray(region[ring, i]).view(np.uint8).data)
    if pickled is not None:
        h.update(pickle.dumps(pickled, protocol=5))
    return h.digest()


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def run_plan(worker, j: int, ring: int, plan, deadline: float) -> tuple:
    """Carry out ``plan`` for the worker's env ``j`` (its observation goes to ring slot
    ``ring``); returns the reply entry."""
    i = worker.spec.env_indices[j]
    worker.info_writer.write(ring, i, None)  # a masked re-sent step leaves this row alone
    if isinstance(plan, Fresh):
        worker.start_fresh(j, plan.seed)
        return ("fallback", plan.why)
    started = time.monotonic()
    try:
        why, info = _replay(worker, j, ring, plan, deadline)
    except Exception as exc:  # noqa: BLE001 - env code: a failed replay, not a failed worker
        why, info = f"the replay raised {type(exc).__name__}: {exc}", None
    if why is not None:
        worker.start_fresh(j, plan.fallback_seed)
        worker.info_writer.write(ring, i, None)
        return ("fallback", why)
    return ("resumed", len(plan.reward), time.monotonic() - started,
            info if plan.want_info else None)


def _replay(worker, j: int, ring: int, plan: Replay, deadline: float) -> tuple:
    env = worker.envs[j]
    start = plan.start
    if start.seed is None:
        set_rng_state(env, start.rng)
    if start.options is None:
        obs, info = env.reset(seed=start.seed)
    else:
        obs, info = env.reset(seed=start.seed, options=start.options)
    worker.autoreset[j] = False
    worker.pending_seed[j] = None
    worker.episode_steps[j] = 0
    if plan.snapshot is not None:  # the reset restored the wrappers; this, the env
        env.set_state(plan.snapshot.state)
        if plan.snapshot.rng is not None:
            set_rng_state(env, plan.snapshot.rng)
        worker.episode_steps[j] = plan.snapshot.step
    events = list(plan.events)
    n = len(plan.reward)
    for t in range(n):
        while events and events[0][0] <= t:
            replay_event(env, events.pop(0))
        if time.monotonic() > deadline:
            return (f"the replay ran past its time budget at step {t} of {n} (one hang "
                    "bound plus twice the slowest step seen per step replayed; see "
                    "step_timeout)"), None
        action = worker.logged_action(plan.actions, plan.extras.get(t), t)
        obs, reward, terminated, truncated, info = env.step(action)
        worker.episode_steps[j] += 1
        expected = (float(plan.reward[t]), bool(plan.terminated[t]), bool(plan.truncated[t]))
        got = (float(reward), bool(terminated), bool(truncated))
        if not _same(got[0], expected[0]) or got[1:] != expected[1:]:
            return (f"the replay diverged at step {t + 1} of {n}: (reward, terminated, "
                    f"truncated) {got} where the log has {expected}; the env is not "
                    "deterministic given its seed, RNG state and actions"), None
        if (terminated or truncated) and t != n - 1:
            return f"the replay diverged: the episode ended at step {t + 1} of {n}", None
    for event in events:
        replay_event(env, event)
    pickled = worker.write_obs(worker.spec.env_indices[j], ring, obs)
    if obs_digest(worker.views.obs, ring, worker.spec.env_indices[j], pickled) != plan.digest:
        return (f"the replay diverged: after {n} steps the observation differs from the "
                "one returned before the failure"), None
    if n and (plan.terminated[-1] or plan.truncated[-1]):
        worker.episode_over(j)  # NEXT_STEP: its next step is the autoreset
    return None, info


def replay_event(env, event: tuple) -> None:
    """Make a logged call or set_attr on ``env`` again."""
    _, op, payload = event
    if op == OP_SET_ATTR:
        name, value = payload
        env.set_wrapper_attr(name, value)
        return
    name, args, kwargs = payload
    try:
        attr = env.get_wrapper_attr(name)
        if callable(attr):
            attr(*args, **kwargs)
    except Exception:  # noqa: BLE001 - it raised to its caller the first time too, most
        pass  # likely; if not, the replayed steps after it are checked as ever
