"""The episode log: for each env, how its current episode began and every step since, so
that a new worker can rebuild the episode (fastvec/replay.py) instead of ending it.

Kept in the parent, written once per vector step in a few array copies:

    acts[k]     (cap, num_envs, *leaf shape)  the actions of fixed-size leaf k, row t % cap
    reward      (cap, num_envs) float64       what step t returned
    terminated  (cap, num_envs) bool
    truncated   (cap, num_envs) bool
    begin[i]    the clock t of env i's first step in its episode (-1: not resumable)
    starts[i]   how that episode began (replay.Start), as the worker reported it
    extras[i]   t -> {leaf: value}: action leaves that travelled pickled (rare)
    events[i]   calls and set_attr made on env i during its episode, replayed in order

``t`` counts lockstep steps; once first-ready batches (``send``/``recv``) step envs apart,
each env counts its own (``clock[i]``) and a lockstep step writes each env's row at its
own clock. An episode longer than ``cap`` (``max_replay_steps``) has lost its first rows
and is no longer resumable. The episode an env ended stays logged
until the reset that begins the next one reports its start: a worker lost between the
two replays it to its end, so the next reset draws from the same RNG state as it would
have.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from fastvec.replay import OP_CALL, Fresh, Replay, Start

# One step's results as batched arrays, shaped like ring slot 0 of a Views (record_arrays).
_Rows = namedtuple("_Rows", "act reward terminated truncated")
_NOT_RESET = "the env has not been reset yet"


class EpisodeLog:
    #: per env, the (start, latest snapshot, why ended) that take_notes() last reported
    _reported: list | None = None

    def __init__(self, act_views: list, num_envs: int, cap: int):
        self.cap, self.num_envs = cap, num_envs
        self.acts = [None if a is None else np.zeros((cap, *a.shape), a.dtype)
                     for a in act_views]
        self.reward = np.zeros((cap, num_envs), np.float64)
        self.terminated = np.zeros((cap, num_envs), np.bool_)
        self.truncated = np.zeros((cap, num_envs), np.bool_)
        self.t = 0
        self.clock: np.ndarray | None = None  # per env, once envs step apart (first-ready)
        self.begin = np.full(num_envs, -1, np.int64)
        self.starts: list[Start | None] = [None] * num_envs
        self.why: list[str] = [_NOT_RESET] * num_envs
        self.extras: list[dict] = [{} for _ in range(num_envs)]
        self.events: list[list] = [[] for _ in range(num_envs)]
        # the two latest Snapshots of each env's episode (a replay must step at least once
        # after its snapshot: the observation it ends on comes from that step)
        self.snaps: list[list] = [[] for _ in range(num_envs)]

    # -- writing ---------------------------------------------------------------------------
    def record(self, views, r: int, pickled: dict) -> None:
        """Log the lockstep step whose results sit in ring slot ``r`` (actions: the rows
        in shared memory; ``pickled``: env -> {leaf: value} of what travelled pickled)."""
        if self.clock is not None:
            self.record_envs(views, [r] * self.num_envs, range(self.num_envs), pickled)
            return
        row = self.t % self.cap
        for log, act in zip(self.acts, views.act):
            if log is not None:
                log[row] = act
        self.reward[row] = views.reward[r]
        self.terminated[row] = views.terminated[r]
        self.truncated[row] = views.truncated[r]
        for i, leaves in pickled.items():
            self._extra(i, self.t, leaves)
        self.t += 1

    def record_envs(self, views, rings, env_ids, pickled: dict) -> None:
        """Log one step of each env ``env_ids[j]``, whose results sit in ring slot
        ``rings[j]`` (first-ready batches: each env at its own clock)."""
        if self.clock is None:
            self.clock = np.full(self.num_envs, self.t, np.int64)
        for r, i in zip(rings, env_ids):
            row = self.clock[i] % self.cap
            for log, act in zip(self.acts, views.act):
                if log is not None:
                    log[row, i] = act[i]
            self.reward[row, i] = views.reward[r, i]
            self.terminated[row, i] = views.terminated[r, i]
            self.truncated[row, i] = views.truncated[r, i]
            if pickled.get(i):
                self._extra(i, int(self.clock[i]), pickled[i])
            self.clock[i] += 1

    def record_arrays(self, actions: list, reward, terminated, truncated, env_ids=None,
                      pickled: dict | None = None) -> None:
        """Log one step from batched arrays instead of ring slots (RayVectorEnv's driver,
        which holds no ring): ``actions`` per action leaf, one row per env (None for a
        leaf that travels pickled: its values in ``pickled``, env -> {leaf: value}),
        ``reward``/``terminated``/``truncated`` one value per env. ``env_ids``: only
        these envs stepped (first-ready batches); the other rows are not read."""
        rows = _Rows(actions, np.asarray(reward)[None], np.asarray(terminated)[None],
                     np.asarray(truncated)[None])
        if env_ids is None:
            self.record(rows, 0, pickled or {})
        else:
            self.record_envs(rows, [0] * len(env_ids), [int(i) for i in env_ids],
                             pickled or {})

    def _extra(self, i: int, t: int, leaves: dict) -> None:
        extras = self.extras[i]
        extras[t] = leaves
        if len(extras) > self.cap:  # an endless episode: keep the rows still logged
            for old in [s for s in extras if s <= t - self.cap]:
                del extras[old]

    def rewind(self, t: int) -> None:
        """Every env's clock at ``t`` again (load_state_dict: all envs in step)."""
        self.t, self.clock = t, None

    def now(self, i: int) -> int:
        """Env ``i``'s clock: the row its next step goes to (before the ring wraps)."""
        return self.t if self.clock is None else int(self.clock[i])

    def started(self, starts: dict, snapshots: dict | None = None) -> None:
        """Episodes that began (env -> Start): their first step is the next one; then
        the snapshots the envs sent (:meth:`snapshots`)."""
        for i, start in starts.items():
            self.starts[i] = start
            self.begin[i] = self.now(i)
            self.extras[i].clear()
            self.events[i].clear()
            self.snaps[i] = []
            if start.seed is None and start.rng is None:
                self.begin[i] = -1
                self.why[i] = ("the env has no np_random to restore before its unseeded "
                               "reset")
        if snapshots:
            self.snapshots(snapshots)

    def snapshots(self, snaps: dict) -> None:
        """Snapshots the envs sent (env -> Snapshot), each after its episode's step
        ``snap.step``: kept if that is the step the log is at (else it is not this one)."""
        for i, snap in snaps.items():
            if self.begin[i] >= 0 and snap.step == self.steps(i):
                self.snaps[i] = [*self.snaps[i][-1:], snap]

    def end(self, env_ids, why: str) -> None:
        """These envs' episodes ended without a reset reported (truncated by a failure,
        out of play): nothing to resume until their next reset."""
        for i in env_ids:
            self.begin[i] = -1
            self.starts[i] = None
            self.why[i] = why

    def event(self, op: str, payload) -> None:
        """A call made on every env (``OP_CALL``: name, args, kwargs) or a set_attr
        (``OP_SET_ATTR``: name, one value per env)."""
        for i in range(self.num_envs):
            if self.begin[i] < 0:
                continue
            events = self.events[i]
            if len(events) >= self.cap:
                self.end([i], f"more than max_replay_steps={self.cap} calls in one episode")
                continue
            mine = payload if op == OP_CALL else (payload[0], payload[1][i])
            events.append((int(self.now(i) - self.begin[i]), op, mine))

    # -- a copy kept elsewhere (RayVectorEnv's driver mirrors each node's log) -----------
    def take_notes(self) -> dict | None:
        """The episode starts, ends and snapshots logged since the previous call, as
        ``{"starts": {i: Start}, "ended": {i: why}, "snapshots": {i: Snapshot}}``, or None
        when there are none (the common case). A copy of this log that records the same
        steps stays equal to it by :meth:`apply_notes` after each of them."""
        if self._reported is None:
            self._reported = [(None, None, _NOT_RESET)] * self.num_envs
        notes = None
        for i in range(self.num_envs):
            start = self.starts[i]
            snap = self.snaps[i][-1] if self.snaps[i] else None
            why = self.why[i] if self.begin[i] < 0 else None
            old = self._reported[i]
            if start is old[0] and snap is old[1] and why == old[2]:
                continue
            self._reported[i] = (start, snap, why)
            notes = notes or {"starts": {}, "ended": {}, "snapshots": {}}
            if start is None:
                notes["ended"][i] = why
            elif start is not old[0]:
                notes["starts"][i] = start
            if snap is not None and snap is not old[1]:
                notes["snapshots"][i] = snap
        return notes

    def apply_notes(self, notes: dict | None, offset: int = 0) -> None:
        """Apply another log's :meth:`take_notes`, whose env ``j`` is this log's env
        ``offset + j``, after recording the same step."""
        if not notes:
            return
        for j, why in notes["ended"].items():
            self.end([offset + j], why)
        self.started({offset + j: s for j, s in notes["starts"].items()},
                     {offset + j: s for j, s in notes["snapshots"].items()})

    # -- reading ---------------------------------------------------------------------------
    def steps(self, i: int) -> int:
        return int(self.now(i) - self.begin[i]) if self.begin[i] >= 0 else -1

    def plan(self, i: int, fallback_seed, digest: bytes, want_info: bool = False):
        """Env ``i``'s REPLAY plan: a Replay of its episode, or Fresh with the reason."""
        if self.begin[i] < 0:
            return Fresh(fallback_seed, self.why[i])
        # From the latest snapshot, unless a call came before it (a snapshot need not
        # hold what a call changed): then from the start.
        n = self.steps(i)
        snap = next((s for s in reversed(self.snaps[i]) if s.step < n), None)
        if snap is not None and any(at < snap.step for at, _, _ in self.events[i]):
            snap = None
        skip = 0 if snap is None else snap.step
        if n - skip > self.cap:
            return Fresh(fallback_seed, f"its episode is {n} steps long, more than "
                                        f"max_replay_steps={self.cap}"
                                        + (f" after its snapshot at step {skip}" if skip
                                           else ""))
        b = int(self.begin[i]) + skip
        rows = np.arange(b, self.now(i)) % self.cap
        return Replay(
            start=self.starts[i], snapshot=snap,
            actions=[None if log is None else log[rows, i] for log in self.acts],
            extras={s - b: v for s, v in self.extras[i].items() if s >= b},
            events=[(at - skip, op, p) for at, op, p in self.events[i]],
            reward=self.reward[rows, i].copy(), terminated=self.terminated[rows, i].copy(),
            truncated=self.truncated[rows, i].copy(), digest=digest,
            fallback_seed=fallback_seed, want_info=want_info)

    # -- a whole job (FastVectorEnv.state_dict / load_state_dict) --------------------------
    def export(self, i: int, digest: bytes) -> dict | None:
        """Env ``i``'s episode as plain data (None: not resumable)."""
        plan = self.plan(i, None, digest)
        if isinstance(plan, Fresh):
            return {"why": plan.why}
        return {"start": plan.start, "snapshot": plan.snapshot, "actions": plan.actions,
                "extras": plan.extras, "events": plan.events, "reward": plan.reward,
                "terminated": plan.terminated, "truncated": plan.truncated, "digest": digest}

    def load(self, i: int, episode: dict) -> None:
        """Put an exported episode back as env ``i``'s, ending at the current clock."""
        if "start" not in episode:
            self.end([i], episode.get("why", "not resumable"))
            return
        n = len(episode["reward"])
        if n > self.cap:
            self.end([i], f"its episode is {n} steps long, more than max_replay_steps="
                          f"{self.cap}")
            return
        # Rows for this env's episode (after its snapshot, if any) end at the clock.
        self.started({i: episode["start"]})
        snap = episode.get("snapshot")
        skip = 0 if snap is None else snap.step
        self.begin[i] = self.now(i) - n - skip
        self.snaps[i] = [] if snap is None else [snap]
        rows = np.arange(self.now(i) - n, self.now(i)) % self.cap
        for log, acts in zip(self.acts, episode["actions"]):
            if log is not None:
                log[rows, i] = acts
        self.reward[rows, i] = episode["reward"]
        self.terminated[rows, i] = episode["terminated"]
        self.truncated[rows, i] = episode["truncated"]
        b = int(self.begin[i]) + skip
        self.extras[i] = {s + b: v for s, v in episode["extras"].items()}
        self.events[i] = [(at + skip, op, p) for at, op, p in episode["events"]]
