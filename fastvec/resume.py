"""Resuming episodes: a lost worker's envs go on where they were, checked, or end as before.

When a step meets a failed worker (died, frozen, hung) and resume is on, before anything
is truncated:

    replace the worker (bounded and budgeted as always), its envs built, none reset
      -> REPLAY: each env rebuilds its episode from the parent's log (fastvec/episodes.py),
         every step checked against it (fastvec/replay.py); one request per worker
      -> re-send the failed step to the envs it resumed (and to those whose next episode
         starts in this step): its real results come back, ``infos["worker_resumed"]``
      -> an env that could not be resumed (diverged, too long, over its time budget, the
         env raised) ends its episode truncated, as without resume, and says why in
         ``infos["worker_restart_reason"]``
      -> a worker that fails again during its replay or its re-sent step (a crash that
         repeats) is replaced once more and its envs truncated: one replay, not a storm

A whole job resumes the same way: ``FastVectorEnv.state_dict()`` exports the log and
``load_state_dict`` replays it into new workers (:meth:`Resume.load`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from gymnasium.vector import AutoresetMode

from fastvec import _ring
from fastvec.contract import InfoBatcher, resumed_info
from fastvec.episodes import EpisodeLog
from fastvec.failure_reports import failure_error, restart_flag
from fastvec.failures import Failure
from fastvec.infos import ReplyInfos
from fastvec.layout import Views
from fastvec.observations import ObservationRing
from fastvec.options import Options
from fastvec.recovery import Recovery, ReplacementPlan, When
from fastvec.replay import Fresh, Outcome, Replay, obs_digest
from fastvec.shm import get_pickle, put_pickle
from fastvec.supervisor import Slot, Supervisor

STATE_FORMAT = "fastvec.state/1"


def not_resumed_kind(why: str) -> str:
    """The short name of a reason an episode was not resumed (``health()`` counts them;
    the last two are RayVectorEnv's: a replacement lost too, a load that raised)."""
    for key, kind in (("diverged", "diverged"), ("time budget", "over budget"),
                      ("max_replay_steps", "too long"), ("raised", "raised"),
                      ("again", "crash repeated"), ("lost too", "crash repeated"),
                      ("could not load", "raised")):
        if key in why:
            return kind
    return "nothing to replay"


class Resume:
    """The resume path of one FastVectorEnv; ``pickled_actions(slot)`` puts a step
    request's pickled action part in the slot's side buffer again (its re-send)."""

    def __init__(self, sup: Supervisor, recovery: Recovery, log: EpisodeLog,
                 obs: ObservationRing, views: Views, replies: ReplyInfos, opts: Options,
                 pickled_actions: Callable[[Slot], int]):
        self.sup, self.recovery, self.log = sup, recovery, log
        self.obs, self.views, self.replies, self.opts = obs, views, replies, opts
        self.pickled_actions = pickled_actions
        self._add_info = InfoBatcher(obs.num_envs).add
        self.same_step = opts.autoreset_mode == AutoresetMode.SAME_STEP
        self.next_step = opts.autoreset_mode == AutoresetMode.NEXT_STEP

    def digest(self, r: int, i: int) -> bytes:
        """Digest of env ``i``'s observation in ring slot ``r`` (what the replay must end on)."""
        return obs_digest(self.views.obs, r, i, self.obs.pickled[r][i]
                          if self.obs.plan.pickled_obs else None)

    # -- a step that met failed workers ----------------------------------------------------
    def step(self, r: int, crashed: list, env_ring: np.ndarray, due: np.ndarray,
             infos: dict) -> tuple[list, list, list]:
        """Try to resume the ``crashed`` (slot, failure) pairs of the step into ring slot
        ``r``. Returns ``(resumed, again, disabled)``: pairs whose step results are now in
        the ring and whose infos are in ``infos``; pairs that failed again (the caller
        replaces and truncates them as without resume); pairs out of play (the
        replacement spent the budget; already replaced)."""
        last = {i: self.obs.row(env_ring[i], i) for s, _ in crashed for i in s.env_indices}

        def plans(slot: Slot) -> list:
            return [self.log.plan(i, seed, self.digest(env_ring[i], i))
                    for i, seed in zip(slot.env_indices, self.recovery.derived_seeds(slot))]

        def resend(slot: Slot, outcomes: list):  # the step, to the envs it goes on with
            mask = sum(1 << j for j, (i, o) in enumerate(zip(slot.env_indices, outcomes))
                       if o.resumed or self.same_step or (self.next_step and due[i]))
            return (_ring.OP_STEP, self.pickled_actions(slot), mask) if mask else None

        live, outcomes, again, disabled, sent, errors = self._rebuild(r, crashed, plans, resend)
        for slot, failure in errors.items():
            if failure.reason == "mismatch":
                raise failure_error(slot, failure, "in step")
            again[slot] = _again(failure, "in the step re-sent after its replay")
        resumed = []
        for slot, failure in live:
            if slot in again:
                slot.not_resumed["crash repeated"] += len(slot.env_indices)
                continue
            resumed.append((slot, failure))
            self._report(slot, failure, r, outcomes[slot], env_ring, due, last, infos)
            if slot in sent:  # the re-sent step's reply: its envs' infos (and new episodes)
                self.replies.collect(slot, infos, r)
        return resumed, [(s, again[s]) for s, _ in live if s in again], disabled

    # -- a reset or a call that met failed workers ------------------------------------------
    def reset(self, r: int, crashed: list, mask: np.ndarray, seeds: list, options,
              env_ring: np.ndarray, infos: dict) -> tuple[list, list, list, list, list]:
        """A reset whose ``crashed`` workers are replaced: each env the reset leaves alone
        is replayed to where it was; each env it resets without a seed is replayed first,
        so that its reset draws from the RNG it had; then the reset is re-sent. Returns
        ``(resumed, again, disabled)`` as :meth:`step` does, the (slot, failure) of env
        exceptions the re-sent reset raised (the user's), and the envs outside the mask
        that could not be resumed (they began a new episode in the re-sent reset)."""
        def plans(slot: Slot) -> list:
            out = []
            for i, seed in zip(slot.env_indices, self.recovery.derived_seeds(slot)):
                if mask[i] and seeds[i] is not None:
                    out.append(Fresh(None, "reset with a seed"))
                else:
                    out.append(self.log.plan(i, seed, self.digest(env_ring[i], i)))
            return out

        def resend(slot: Slot, outcomes: list):  # the reset, and fresh episodes for the lost
            bits = sum(1 << j for j, (i, o) in enumerate(zip(slot.env_indices, outcomes))
                       if mask[i] or not o.resumed)
            payload = ([seeds[i] if mask[i] else None for i in slot.env_indices],
                       [options if mask[i] else None for i in slot.env_indices])
            n = put_pickle(slot.payload, payload, self.opts.max_payload_bytes)
            return _ring.OP_RESET, n, bits

        live, outcomes, again, disabled, _, errors = self._rebuild(r, crashed, plans, resend)
        user_errors = []
        for slot, failure in errors.items():
            if failure.reason == "mismatch":
                raise failure_error(slot, failure, "in reset")
            if failure.reason == "exception":
                user_errors.append((slot, failure))
            else:
                again[slot] = _again(failure, "in the reset re-sent after its replay")
        resumed, fresh = [], []
        for slot, failure in live:
            if slot in again:
                continue
            resumed.append((slot, failure))
            for i, o in zip(slot.env_indices, outcomes[slot]):
                # a reset with a seed loses nothing; one without loses the RNG it had
                self._flag(slot, failure, i, o, infos, lost=not mask[i] or seeds[i] is None)
                if not mask[i] and not o.resumed:
                    fresh.append(i)
        again_pairs = [(s, again[s]) for s, _ in live if s in again]
        return resumed, again_pairs, disabled, user_errors, fresh

    def call(self, r: int, crashed: list, op: int, payload_of: Callable[[Slot], object],
             env_ring: np.ndarray) -> tuple[list, list, list, list]:
        """A call whose ``crashed`` workers are replaced: their envs are replayed to where
        they were (scratch observations into ring slot ``r``, the next step's) and the call
        is re-sent (its real result returned). Returns
        ``(resumed, again, disabled, user_errors)`` as :meth:`reset` does; envs that could
        not be resumed are ``slot.lost`` (the next step reports them truncated)."""
        def plans(slot: Slot) -> list:
            return [self.log.plan(i, seed, self.digest(env_ring[i], i))
                    for i, seed in zip(slot.env_indices, self.recovery.derived_seeds(slot))]

        def resend(slot: Slot, outcomes: list):
            return op, put_pickle(slot.payload, payload_of(slot),
                                  self.opts.max_payload_bytes), None

        live, outcomes, again, disabled, _, errors = self._rebuild(r, crashed, plans, resend)
        user_errors = []
        for slot, failure in errors.items():
            if failure.reason in ("exception", "mismatch"):
                user_errors.append((slot, failure))
            else:
                again[slot] = _again(failure, "in the call re-sent after its replay")
        resumed = []
        for slot, failure in live:
            if slot in again:
                slot.not_resumed["crash repeated"] += len(slot.env_indices)
                continue
            resumed.append((slot, failure))
            lost = [o.why for o in outcomes[slot] if not o.resumed]
            slot.resumed += len(outcomes[slot]) - len(lost)
            slot.replayed_steps += sum(o.steps for o in outcomes[slot])
            if lost:  # reported by the next step, as a call's lost worker always was
                slot.not_resumed.update(not_resumed_kind(why) for why in lost)
                slot.lost = Failure(failure.reason, f"{failure.detail}; not resumed: "
                                    f"{lost[0]}", exitcode=failure.exitcode)
        return resumed, [(s, again[s]) for s, _ in live if s in again], disabled, user_errors

    def first_ready(self, crashed: list, env_ring: np.ndarray,
                    parts: dict) -> tuple[list, list, list, list]:
        """``recv`` met these ``crashed`` (slot, failure) pairs (one env each): replay each
        env's episode and re-send its step into its own next ring slot (``parts``: env ->
        the step's pickled action leaves). Returns ``(resumed, ended, again, disabled)``:
        pairs whose result is in their ring slot; pairs whose episode ends truncated (the
        new worker starts the next one at its next step); pairs that failed again (to
        replace once more, then truncate); pairs out of play."""
        rings = {s: int((env_ring[s.env_indices[0]] + 1) % self.obs.depth) for s, _ in crashed}

        def plans(slot: Slot) -> list:
            i = slot.env_indices[0]
            return [self.log.plan(i, self.recovery.derived_seeds(slot)[0],
                                  self.digest(int(env_ring[i]), i))]

        def resend(slot: Slot, outcomes: list):
            if not outcomes[0].resumed:
                return None
            leaves = parts.get(slot.env_indices[0])
            n = (put_pickle(slot.payload, [leaves], self.opts.max_payload_bytes)
                 if leaves else 0)
            return _ring.OP_STEP, n, None

        live, outcomes, again, disabled, sent, errors = self._rebuild(rings, crashed, plans,
                                                                      resend)
        for slot, failure in errors.items():
            if failure.reason == "mismatch":
                raise failure_error(slot, failure, "in step")
            again[slot] = _again(failure, "in the step re-sent after its replay")
        resumed, ended = [], []
        for slot, failure in live:
            if slot in again:
                slot.not_resumed["crash repeated"] += 1
            elif slot in sent:
                slot.resumed += 1
                slot.replayed_steps += outcomes[slot][0].steps
                resumed.append((slot, failure))
            else:  # not resumed: its episode ends here, truncated (recv reports it)
                why = outcomes[slot][0].why
                slot.not_resumed[not_resumed_kind(why)] += 1
                self.log.end(slot.env_indices, why)
                ended.append((slot, Failure(failure.reason, f"{failure.detail}; not "
                                            f"resumed: {why}", exitcode=failure.exitcode)))
        return resumed, ended, [(s, again[s]) for s, _ in live if s in again], disabled

    def _rebuild(self, r, crashed: list, plans_of, resend):
        """Replace the ``crashed`` workers (no reset), replay ``plans_of(slot)`` into ring
        slot ``r`` (or ``r[slot]``), then send ``resend(slot, outcomes)`` -> (op, payload
        bytes, mask) or None. Returns (live pairs, {slot: [Outcome]}, {slot: failure} that
        failed in the replay, disabled pairs, slots re-sent, {slot: failure} of their
        re-sent request)."""
        ring = r.get if isinstance(r, dict) else (lambda slot: r)
        self.recovery.replace([(s, f, ReplacementPlan(when=When.REPLAY)) for s, f in crashed])
        disabled = [(s, f) for s, f in crashed if s.disabled is not None]
        live = [(s, f) for s, f in crashed if s.disabled is None]
        outcomes, again = self._replay(r, {s: plans_of(s) for s, _ in live})
        requests = []
        for slot, _ in live:
            if slot not in again:
                req = resend(slot, outcomes[slot])
                if req is not None:
                    op, n, mask = req
                    requests.append((slot, op, ring(slot), n, mask))
        self.sup.dispatch.send(requests)
        sent = [q[0] for q in requests]
        errors = {slot: self.sup.dispatch.failure_of(slot)
                  for slot in self.sup.dispatch.wait(sent, None)}
        return live, outcomes, again, disabled, set(sent), errors

    def _replay(self, r, plans: dict) -> tuple[dict, dict]:
        """Send each slot its REPLAY plans (observations into ring slot ``r``, or
        ``r[slot]``); ({slot: [Outcome]}, {slot: failure} of the workers that failed
        during their replay)."""
        requests = []
        for slot, slot_plans in plans.items():
            steps = sum(len(p.reward) for p in slot_plans if isinstance(p, Replay))
            budget = self.sup.watchdog.replay_budget(slot, steps)
            n = put_pickle(slot.payload, (slot_plans, budget), self.opts.max_payload_bytes)
            requests.append((slot, _ring.OP_REPLAY, r[slot] if isinstance(r, dict) else r,
                             n, None))
        self.sup.dispatch.send(requests)
        failed = set(self.sup.dispatch.wait(list(plans), None))
        outcomes, again = {}, {}
        for slot in plans:
            if slot in failed:
                again[slot] = _again(self.sup.dispatch.failure_of(slot), "during its replay")
                continue
            slot.replayed = True  # published as "resumed" (fastvec top)
            slot.publish()
            outcomes[slot] = [Outcome(True, steps=e[1], seconds=e[2], info=e[3] or {})
                              if e[0] == "resumed" else Outcome(False, why=e[1])
                              for e in get_pickle(slot.payload, slot.ctl.resp_payload_len)]
        return outcomes, again

    def _report(self, slot: Slot, failure: Failure, r: int, outcomes: list,
                env_ring: np.ndarray, due: np.ndarray, last: dict, infos: dict) -> None:
        """The rows and infos of a resumed slot's envs in ring slot ``r``."""
        v = self.views
        for i, o in zip(slot.env_indices, outcomes):
            self._flag(slot, failure, i, o, infos)
            if o.resumed:
                continue
            if self.same_step:  # its new episode began in the re-sent step
                v.reward[r, i], v.terminated[r, i], v.truncated[r, i] = 0.0, False, True
                self._add_info(infos, {"final_obs": last[i], "final_info": {}}, i)
            elif not (self.next_step and due[i]):  # else this step was its reset step
                v.reward[r, i], v.terminated[r, i], v.truncated[r, i] = 0.0, False, True
                self.obs.carry([i], r, env_ring)

    def _flag(self, slot: Slot, failure: Failure, i: int, o: Outcome, infos: dict,
              lost: bool = True) -> None:
        """Env ``i``'s flag and counts: resumed, or its episode ended (``lost``: it had
        one going, which the log now forgets) and why."""
        if o.resumed or not lost:
            if o.resumed:
                slot.resumed += 1
                slot.replayed_steps += o.steps
            self._add_info(infos, resumed_info(failure.text()), i)
            return
        slot.not_resumed[not_resumed_kind(o.why)] += 1
        self.log.end([i], o.why)
        self._add_info(infos, restart_flag(Failure(
            failure.reason, f"{failure.detail}; not resumed: {o.why}")), i)

    # -- a whole job -------------------------------------------------------------------------
    def export(self, env_ring: np.ndarray, due: np.ndarray, needs_reset: np.ndarray,
               spaces: tuple) -> dict:
        """``FastVectorEnv.state_dict()``: plain, picklable data."""
        return {
            "format": STATE_FORMAT,
            "num_envs": self.obs.num_envs,
            "autoreset_mode": self.opts.autoreset_mode.value,
            "spaces": tuple(repr(s) for s in spaces),
            "episodes": [self.log.export(i, self.digest(int(env_ring[i]), i))
                         for i in range(self.obs.num_envs)],
            "due": due.tolist(),
            "needs_reset": needs_reset.tolist(),
            "base_seeds": self.recovery.base_seeds,
        }

    def check(self, state: dict, spaces: tuple) -> None:
        """Raise ValueError if ``state`` is not one this vector env can load."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a FastVectorEnv state_dict (format {STATE_FORMAT!r} "
                             "expected); pass what envs.state_dict() returned")
        mine = {"num_envs": self.obs.num_envs,
                "autoreset_mode": self.opts.autoreset_mode.value,
                "spaces": tuple(repr(s) for s in spaces)}
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"this state_dict was saved from a vector env with "
                                 f"{key}={state[key]!r}, this one has {value!r}; build it "
                                 "with the same env fns and options")

    def load(self, state: dict, r: int) -> dict:
        """Replay every env's saved episode into ring slot ``r``; an env that cannot be
        resumed starts a fresh episode there (its derived seed). Returns the infos."""
        self.recovery.restore_seeds(state["base_seeds"])
        episodes = state["episodes"]
        self.log.rewind(max((len(e["reward"]) + (e["snapshot"].step if e.get("snapshot") else 0)
                             for e in episodes if "reward" in e), default=0))
        for i, episode in enumerate(episodes):
            self.log.load(i, episode)
        slots = [s for s in self.sup.slots if s.disabled is None]
        plans = {s: [self.log.plan(i, seed, episodes[i].get("digest", b""), want_info=True)
                     for i, seed in zip(s.env_indices, self.recovery.derived_seeds(s))]
                 for s in slots}
        outcomes, again = self._replay(r, plans)
        infos: dict = {}
        if again:  # the crash repeats: fresh episodes in a new worker
            self.recovery.replace([(s, f, ReplacementPlan(when=When.NOW, ring=r))
                                   for s, f in again.items()])
        fresh = []
        for slot in slots:
            if slot in again:
                for i in slot.env_indices:
                    self.log.end([i], again[slot].detail)
                    self._add_info(infos, restart_flag(again[slot]), i)
                fresh.append((slot, 0))
                continue
            bits = 0
            for j, (i, o) in enumerate(zip(slot.env_indices, outcomes[slot])):
                if o.resumed:
                    slot.resumed += 1
                    slot.replayed_steps += o.steps
                    if o.info:
                        self._add_info(infos, o.info, i)
                    self._add_info(infos, resumed_info("load_state_dict"), i)
                else:
                    bits |= 1 << j
                    slot.not_resumed[not_resumed_kind(o.why)] += 1
                    self.log.end([i], o.why)
                    self._add_info(infos, restart_flag(Failure(
                        "load_state_dict", f"not resumed: {o.why}")), i)
            if bits:
                fresh.append((slot, bits))
        requests = []
        for slot, bits in fresh:
            if bits:  # the pending seed from the replay stands in for None
                none = [None] * len(slot.env_indices)
                n = put_pickle(slot.payload, (none, none), self.opts.max_payload_bytes)
                requests.append((slot, _ring.OP_RESET, r, n, bits))
        self.sup.dispatch.send(requests)
        for slot in self.sup.dispatch.wait([q[0] for q in requests], None):
            raise failure_error(slot, self.sup.dispatch.failure_of(slot),
                                "in the reset of an env load_state_dict could not resume")
        for slot, _ in fresh:
            self.replies.collect(slot, infos, r)
        return infos


def _again(failure: Failure, where: str) -> Failure:
    """``failure`` of a worker that was resuming: the crash repeats, so it is not resumed."""
    return Failure(failure.reason, f"{failure.detail} (again, {where}: a crash that "
                   "repeats; the episode ends here)", exitcode=failure.exitcode,
                   remote=failure.remote, cause=failure.cause, seq=failure.seq)
