"""What a reset, step or call returns for envs whose worker failed, was lost, disabled or
recycled.

The common step (every worker answered, nothing to replace or recycle) never comes here;
FastVectorEnv returns it directly. For the rest, each env of such a worker ends its episode
truncated with reward 0 and its last observation (``final_obs`` in SAME_STEP) and is flagged
(``worker_restarted`` or ``env_disabled``), unless its replacement reset it at once because
no episode was lost (NEXT_STEP, every env of the worker due). A reset replays the user's
seeds and options in a replacement; a call's failed worker is replaced and its envs are
reported by the next step, which sends them a reset instead of a step when their next
episode starts now. Recycling at an episode boundary happens here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from gymnasium.vector import AutoresetMode

from fastvec import _ring
from fastvec.contract import InfoBatcher
from fastvec.failure_reports import disabled_flag, failure_error, raise_user_error, restart_flag
from fastvec.infos import ReplyInfos
from fastvec.layout import Views
from fastvec.observations import ObservationRing
from fastvec.options import Options
from fastvec.recovery import Recovery, ReplacementPlan, When
from fastvec.resume import Resume
from fastvec.shm import get_pickle, put_pickle
from fastvec.supervisor import Slot, Supervisor


@dataclass
class PendingReset:
    ring: int
    mask: np.ndarray
    slots: list
    seeds: list
    options: dict | None


@dataclass
class PendingStep:
    ring: int
    slots: list  # the slots a request went to
    lost: list = field(default_factory=list)  # slots replaced earlier, reported in this step
    sent_to_all: bool = False  # by Supervisor.send_all (the common case)
    reset: list = field(default_factory=list)  # lost slots sent a RESET: a new episode now


class Outcomes:
    """Results of a reset, step or call that met a failed, lost, disabled or recycled worker.

    ``env_ring`` (each env's ring slot of its latest row) and ``due`` (NEXT_STEP: envs
    whose next step is their autoreset) are the vector env's arrays, passed per call.
    """

    def __init__(self, sup: Supervisor, recovery: Recovery, obs: ObservationRing, views: Views,
                 replies: ReplyInfos, opts: Options, resume: Resume | None = None):
        self.sup, self.recovery, self.obs, self.views = sup, recovery, obs, views
        self.replies = replies
        self.resume = resume  # resuming lost episodes (fastvec/resume.py), or None
        self.log = resume.log if resume is not None else None
        self._add_info = InfoBatcher(obs.num_envs).add
        self.same_step = opts.autoreset_mode == AutoresetMode.SAME_STEP
        self.next_step = opts.autoreset_mode == AutoresetMode.NEXT_STEP
        self.recycling = opts.recycling
        self.max_payload_bytes = opts.max_payload_bytes

    # -- step ------------------------------------------------------------------------------
    def send_step(self, r: int, pickled_actions: Callable[[Slot], int],
                  due: np.ndarray) -> PendingStep:
        """Send a step to the slots one by one: none to a disabled slot; to a slot whose
        worker was replaced in a call, a reset if its new worker starts the next episode
        now (SAME_STEP, or NEXT_STEP with all its envs due), else nothing (the step
        reports them). ``pickled_actions(slot)``: the request's side-buffer part."""
        requests, lost, reset = [], [], []
        for slot in self.sup.slots:
            if slot.disabled is not None:
                continue
            if slot.lost is not None:
                lost.append(slot)
                if self.same_step or self._all_due(slot, due):
                    none = [None] * len(slot.env_indices)
                    n = put_pickle(slot.payload, (none, none), self.max_payload_bytes)
                    requests.append((slot, _ring.OP_RESET, r, n, None))
                    reset.append(slot)
                continue
            requests.append((slot, _ring.OP_STEP, r, pickled_actions(slot), None))
        self.sup.dispatch.send(requests)
        return PendingStep(r, [item[0] for item in requests], lost, reset=reset)

    def step(self, p: PendingStep, failed: list[Slot], env_ring: np.ndarray,
             due: np.ndarray) -> tuple[dict, list, np.ndarray]:
        """The infos of step ``p`` whose workers ``failed``, after replacing them and
        writing the truncations into ring slot ``p.ring``; also the (slot, failure) pairs
        restarted (for the ``on_failure`` policy) and which envs ended their episode."""
        sup, r, v = self.sup, p.ring, self.views
        for slot in failed:
            failure = sup.dispatch.failure_of(slot)
            if failure.reason == "mismatch":
                raise failure_error(slot, failure, "in step")
        same_step = self.same_step
        infos: dict = {}
        # Workers that failed in this step, and those replaced earlier (in a call): each of
        # their envs ends its episode truncated, reward 0, with its last observation. In
        # NEXT_STEP, a worker whose envs all ended their episode in the last step loses
        # nothing: its replacement resets them now, and this step is their reset step.
        crashed = [(slot, sup.dispatch.failure_of(slot)) for slot in failed]
        lost = [slot for slot in p.lost if slot not in failed]
        last = {i: self.obs.row(env_ring[i], i)
                for slot in [*failed, *lost] for i in slot.env_indices}
        # With resume, the replacements first replay their envs' episodes; what is left
        # (the crash repeated) or out of play (budget spent) goes on as without it.
        resumed, replaced = [], []
        if crashed and self.resume is not None:
            resumed, crashed, replaced = self.resume.step(r, crashed, env_ring, due, infos)
        now = {slot for slot, _ in crashed
               if same_step or self._all_due(slot, due)} | set(p.reset)
        if crashed:
            self.recovery.replace([(slot, failure, ReplacementPlan(
                when=When.NOW if slot in now else When.NEXT, ring=r))
                for slot, failure in crashed])
        restarted = crashed + replaced + [(slot, slot.lost) for slot in lost]
        for slot in p.lost:
            slot.lost = None
        reported = {slot for slot, _ in resumed}
        for slot, failure in restarted:
            reported.add(slot)
            if not same_step and slot in now and slot.disabled is None:
                self._truncate(slot, r, truncated=False)  # no episode lost: flagged, reset infos
                for i in slot.env_indices:
                    infos = self._add_info(infos, restart_flag(failure), i)
                self.replies.collect(slot, infos, r)
                continue
            self._truncate(slot, r, why=failure.text())
            fresh = same_step and slot.disabled is None  # a new episode started in this step
            if not fresh:
                self.obs.carry(slot.env_indices, r, env_ring)
            for i in slot.env_indices:
                if same_step:
                    infos = self._add_info(infos, {"final_obs": last[i], "final_info": {}}, i)
                infos = self._add_info(infos, disabled_flag(slot.disabled) if slot.disabled
                                       else restart_flag(failure), i)
            if fresh:
                self.replies.collect(slot, infos, r)
        for slot in sup.slots:
            if slot.disabled is not None and slot not in reported:
                reported.add(slot)
                self._report_disabled(slot, r, infos, env_ring)
        done = v.terminated[r] | v.truncated[r]
        recycled = []
        if self.recycling:
            recycled = [s for s in sup.slots if s not in reported and s.serving
                        and done[s.env_indices[0]] and self.recovery.recycle_reason(s)]
        for slot in sup.slots:
            if slot in reported:
                continue
            if same_step and slot in recycled:
                self.replies.keep_final(slot, infos)  # the new worker's reset infos follow
            else:
                self.replies.collect(slot, infos, r)
        if recycled:
            if same_step:  # the next episode must come from the new worker: it resets now
                self.recovery.recycle(recycled, ReplacementPlan(when=When.NOW, ring=r))
                for slot in recycled:
                    self.replies.collect(slot, infos, r)
            else:
                if self.log is not None:  # its next episode starts from a derived seed
                    self.log.end([i for s in recycled for i in s.env_indices], "recycled")
                self.recovery.recycle(recycled, ReplacementPlan(when=When.NEXT))
        sup.record_latency([s for s in p.slots if s not in reported])
        return infos, restarted + resumed, done

    def _all_due(self, slot: Slot, due: np.ndarray) -> bool:
        """NEXT_STEP: whether every env of ``slot`` is due for its autoreset."""
        return self.next_step and bool(due[list(slot.env_indices)].all())

    def _truncate(self, slot: Slot, r: int, truncated: bool = True, why: str = "") -> None:
        """The slot's envs in ring slot ``r``: reward 0, not terminated, ``truncated``
        (False: they were just reset, and this is their reset step)."""
        idx = list(slot.env_indices)
        v = self.views
        v.reward[r, idx] = 0.0
        v.terminated[r, idx] = False
        v.truncated[r, idx] = truncated
        if truncated and self.log is not None:
            self.log.end(idx, f"its episode ended truncated ({why})")

    def _report_disabled(self, slot: Slot, r: int, infos: dict, env_ring: np.ndarray) -> None:
        self._truncate(slot, r, why="out of play")
        for i in slot.env_indices:
            if self.same_step:
                self._add_info(infos, {"final_obs": self.obs.row(env_ring[i], i),
                                       "final_info": {}}, i)
            self._add_info(infos, disabled_flag(slot.disabled), i)
        self.obs.carry(slot.env_indices, r, env_ring)

    # -- reset -----------------------------------------------------------------------------
    def reset(self, p: PendingReset, failed: list[Slot],
              env_ring: np.ndarray) -> tuple[dict, np.ndarray, list]:
        """The infos of reset ``p`` whose workers ``failed``, after replaying it in their
        replacements; also which envs kept their observation (carried into ``p.ring``:
        unmasked or disabled) and the (slot, failure) pairs restarted."""
        r, mask = p.ring, p.mask
        usage, user_errors, crashed = [], [], []
        for slot in failed:
            failure = self.sup.dispatch.failure_of(slot)
            if failure.reason == "mismatch":
                usage.append((slot, failure))
            elif failure.reason == "exception":
                user_errors.append((slot, failure))  # the env raised: the worker lives on
            else:
                crashed.append((slot, failure))
        # A worker that died, froze or hung in this reset: with resume, its replacement
        # replays its envs' episodes and the reset is re-sent (fastvec/resume.py); else (or
        # if that fails again) the replacement replays the reset (the user's seeds and
        # options for the masked envs, derived seeds for the others of that worker, which
        # lose their episode and are flagged).
        infos: dict = {}
        resumed, replaced_once, fresh = [], [], []
        if crashed and self.resume is not None:
            resumed, crashed, replaced_once, errors, fresh = self.resume.reset(
                r, crashed, mask, p.seeds, p.options, env_ring, infos)
            user_errors += errors
        items = []
        for slot, failure in crashed:
            pos = [j for j, i in enumerate(slot.env_indices) if mask[i]]
            items.append((slot, failure, ReplacementPlan(
                when=When.NOW, ring=r, user_reset=True,
                seeds={j: p.seeds[slot.env_indices[j]] for j in pos},
                options={j: p.options for j in pos})))
        if items:
            user_errors += [(e.slot, e.failure) for e in self.recovery.replace(items)]
        if usage:
            raise failure_error(*usage[0], "in reset")
        if user_errors:
            raise_user_error(*user_errors[0])

        replaced = {slot for slot, _ in crashed if slot.disabled is None}
        keep = ~mask
        keep[fresh] = False  # envs outside the mask that could not be resumed: new episodes
        for slot in p.slots:
            if slot in replaced:
                keep[list(slot.env_indices)] = False
            if slot.disabled is None:
                self.replies.collect(slot, infos, r)
        crashed = crashed + replaced_once
        for slot, failure in crashed:
            flag = disabled_flag(slot.disabled) if slot.disabled else restart_flag(failure)
            for i in slot.env_indices:
                infos = self._add_info(infos, flag, i)
        for slot in self.sup.slots:
            if slot.disabled is not None:
                keep[list(slot.env_indices)] = True
                if slot not in {s for s, _ in crashed}:
                    for i in slot.env_indices:
                        if mask[i]:
                            infos = self._add_info(infos, disabled_flag(slot.disabled), i)
            elif slot.lost is not None and all(mask[i] for i in slot.env_indices):
                slot.lost = None  # its envs were just reset: nothing left to report
        self.obs.carry(np.flatnonzero(keep), r, env_ring)
        return infos, keep, crashed + resumed

    # -- call ------------------------------------------------------------------------------
    def call(self, failed: list[Slot], results: bool = True, request: tuple | None = None,
             r: int = 0, env_ring: np.ndarray | None = None) -> tuple | None:
        """A call's results, one per env (None for a disabled env), after its ``failed``
        workers: the env's own exception raised with its type; a worker that is gone
        replaced and, with resume, its envs replayed and the call (``request``: opcode and
        payload per slot) re-sent, scratch rows in ring slot ``r``; else (or if that fails
        again) its envs' episodes are lost (the next step reports them) and it is raised."""
        errors = [(slot, self.sup.dispatch.failure_of(slot)) for slot in failed]
        crashed = [(s, f) for s, f in errors if f.reason not in ("exception", "mismatch")]
        if crashed and self.resume is not None and request is not None:
            _, crashed, replaced, user = self.resume.call(r, crashed, *request, env_ring)
            errors = [(s, f) for s, f in errors if f.reason in ("exception", "mismatch")]
            errors += user + crashed + replaced
        if crashed:
            self.recovery.replace([(s, f, ReplacementPlan(when=When.NEXT)) for s, f in crashed])
            for slot, failure in crashed:
                if slot.disabled is None:
                    slot.lost = failure
        for slot, failure in errors:
            if failure.reason == "exception":
                raise_user_error(slot, failure)
        if errors:
            raise failure_error(*errors[0], "in a call")
        if not results:
            return None
        out: list = []
        for slot in self.sup.slots:
            if slot.disabled is not None:
                out.extend([None] * len(slot.env_indices))
            else:
                out.extend(get_pickle(slot.payload, slot.ctl.resp_payload_len))
        return tuple(out)
