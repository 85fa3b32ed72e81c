"""Replacing failed (and recycled) workers: one typed, synchronous, bounded path.

A worker slot is replaced in stages, each under a bound:

    kill (failure) or retire (recycling: SIGUSR1, the old worker closes its envs and
    exits while its successor starts; SIGKILL after recycle_grace)
      -> start a process (fork/spawn may fail: that is a failed attempt, not a hang)
      -> await its ready reply, at most start_timeout (building never counts against
         step_timeout; a raising env_fn is a failed attempt)
      -> optionally reset it at once (ReplacementPlan.when is NOW)

Every failed attempt counts against the slot's restart budget and is retried; past the
budget, ``on_budget_exhausted`` decides: "raise" (``RestartBudgetExceeded``, the build
error chained, the vector env closes) or "disable" (the slot's envs stay in the batch,
out of play, until a later reset tries them again).

What a step, reset or call then returns for the replaced envs (truncated, reward 0, the
last observation, ``worker_restarted``) is decided in fastvec/outcomes.py from the
records here.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from fastvec import _ring
from fastvec.contract import derive_seed
from fastvec.errors import RemoteTraceback, RestartBudgetExceeded
from fastvec.failure_reports import failure_error, log_failure
from fastvec.options import Options
from fastvec.shm import put_pickle
from fastvec.supervisor import Failure, Slot, Supervisor

log = logging.getLogger("fastvec")


class When(enum.Enum):
    """When a replacement worker resets its envs."""

    BY_CALLER = "by caller"  # the caller resets them itself: its reset() is about to be sent
    NEXT = "next"  # at their next reset, with derived seeds (NEXT_STEP: the next step)
    NOW = "now"  # right after start, into ring slot ``ring``, before replace() returns
    REPLAY = "replay"  # not at all: the caller replays their episodes (fastvec/resume.py)


@dataclass(frozen=True)
class ReplacementPlan:
    when: When = When.NEXT
    ring: int = 0  # the ring slot a NOW reset writes its observations to
    seeds: dict = field(default_factory=dict)  # env position in the slot -> the user's seed
    options: dict = field(default_factory=dict)  # env position -> the user's reset options
    user_reset: bool = False  # replays a reset() the user made: its exceptions are the user's


@dataclass
class UserError:
    """An exception the env raised in a reset the user asked for (raised after recovery)."""

    slot: Slot
    failure: Failure


class Recovery:
    """Replaces the supervisor's workers; owns each env's original seed and restart count.

    ``recent_actions(slot)``: {env index: its last actions} for the failure log;
    ``close_broken()``: closes the vector env when a budget is spent (policy "raise").
    """

    #: called with (slot, failure) for each failure counted: crash bundles (fastvec/bundles.py)
    on_failure: Callable | None = None

    def __init__(self, sup: Supervisor, opts: Options, num_envs: int, *,
                 recent_actions: Callable[[Slot], dict], close_broken: Callable[[], None]):
        self.sup = sup
        self.opts = opts
        self._recent_actions = recent_actions
        self._close_broken = close_broken
        self._base_seeds: list[int | None] = [None] * num_envs
        self._restarts = np.zeros(num_envs, np.int64)

    @property
    def base_seeds(self) -> list:
        """Each env's original seed (the latest a reset gave it), or None."""
        return list(self._base_seeds)

    def restore_seeds(self, seeds: list) -> None:
        """Original seeds saved by ``FastVectorEnv.state_dict``."""
        self._base_seeds = [None if s is None else int(s) for s in seeds]

    def remember_seeds(self, seeds: list, mask: np.ndarray) -> None:
        """A reset's seeds: the masked envs' given seeds become their original seeds."""
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._base_seeds[i] = int(seeds[i])

    # -- seeds ---------------------------------------------------------------------------
    def derived_seeds(self, slot: Slot) -> list[int | None]:
        """Seeds for the envs of the slot's current generation, from each env's original
        seed and the number of replacements (restarts and recycles) of the slot."""
        out = []
        for i in slot.env_indices:
            base = self._base_seeds[i]
            out.append(None if base is None else derive_seed(base, i, slot.generation))
        return out

    # -- the budget ------------------------------------------------------------------------
    def _count(self, slot: Slot, failure: Failure) -> bool:
        """Count one restart; False when the slot is over its budget."""
        now = time.monotonic()
        slot.restart_times.append(now)
        while slot.restart_times and now - slot.restart_times[0] > self.opts.restart_window:
            slot.restart_times.popleft()
        slot.restarts += 1
        slot.reasons[failure.reason] += 1
        slot.last_failure = failure
        self._restarts[list(slot.env_indices)] += 1
        log_failure(slot, failure, [self._base_seeds[i] for i in slot.env_indices],
                    int(self._restarts[slot.env_indices[0]]), self._recent_actions(slot))
        if self.on_failure is not None:
            self.on_failure(slot, failure)
        return len(slot.restart_times) <= self.opts.max_restarts

    def _exhausted(self, slot: Slot, failure: Failure) -> None:
        self.sup.kill_slot(slot)
        msg = (f"worker {slot.index} (envs {list(slot.env_indices)}) failed "
               f"{len(slot.restart_times)} times within {self.opts.restart_window:.0f} s, more "
               f"than max_restarts={self.opts.max_restarts}; last failure: {failure.reason}: "
               f"{failure.detail}")
        if self.opts.on_budget_exhausted == "disable":
            slot.disabled = failure
            slot.failure = None
            slot.lost = None
            log.warning("%s. Its envs are out of play (truncated every step, "
                        "infos['env_disabled']) until a reset() tries them again.", msg)
            return
        err = RestartBudgetExceeded(
            f"{msg}. This looks like a deterministic bug in the env; fix it, raise "
            "max_restarts / restart_window, or pass on_budget_exhausted='disable' to go on "
            "without these envs.", env_index=slot.env_indices[0], env_indices=slot.env_indices,
            worker_index=slot.index, reason="budget", detail=failure.detail,
            exitcode=failure.exitcode)
        if failure.cause is not None:
            err.__cause__ = failure.cause
        elif failure.remote is not None:
            err.__cause__ = RemoteTraceback(failure.remote[1])
        self._close_broken()
        raise err

    # -- replacing ---------------------------------------------------------------------------
    def replace(self, items: list[tuple[Slot, Failure, ReplacementPlan]], *,
                planned: bool = False, retry: bool = False) -> list[UserError]:
        """Replace the workers of these slots, all in parallel; returns when every slot
        serves again or is disabled. ``planned``: recycling (the first attempt retires the
        old worker and does not count against the budget). ``retry``: a reset trying a
        disabled slot again (its first attempt does not count either: that failure was
        counted when it happened).

        Returns the user errors of replayed resets (the caller raises the first one).
        Raises RestartBudgetExceeded (policy "raise"), or a usage error (SpaceMismatchError)
        that a replayed reset reported.
        """
        user_errors: list[UserError] = []
        todo = [(slot, failure, plan, planned or retry) for slot, failure, plan in items]
        cold: set[int] = set()  # slots that tried a spare: a retry starts a fresh process
        while todo:
            started: list[tuple[Slot, ReplacementPlan]] = []
            retry: list[tuple[Slot, Failure, ReplacementPlan, bool]] = []
            for slot, failure, plan, first_planned in todo:
                if not first_planned and not self._count(slot, failure):
                    self._exhausted(slot, failure)
                    continue
                if first_planned and planned:
                    self.sup.retire_slot(slot)
                    slot.recycles += 1
                else:
                    self.sup.kill_slot(slot)
                slot.generation += 1
                slot.disabled = None
                pending = tuple(self.derived_seeds(slot)) if plan.when is When.NEXT else None
                try:
                    self.sup.start_process(slot, pending, spare=slot.index not in cold)
                    cold.add(slot.index)
                except Exception:  # noqa: BLE001 - fork/ENOMEM/EMFILE: a failed attempt
                    retry.append((slot, slot.failure, plan, False))
                    continue
                started.append((slot, plan))
            failures = self.sup.await_ready([slot for slot, _ in started])
            retry += [(slot, failures[slot], plan, False) for slot, plan in started
                      if slot in failures]
            now = [(slot, plan) for slot, plan in started
                   if slot not in failures and plan.when is When.NOW]
            for slot, failure, plan in self._reset_now(now, user_errors):
                retry.append((slot, failure, plan, False))
            todo = retry
        self.sup.fill_spares()  # the adopted spares' successors start in the background
        return user_errors

    def _reset_now(self, items: list[tuple[Slot, ReplacementPlan]], user_errors: list):
        """Reset freshly started workers at once; yields (slot, failure, plan) to retry."""
        if not items:
            return
        requests = []
        for slot, plan in items:
            derived = self.derived_seeds(slot)
            # a reset without a seed (None) in a new process takes the derived seed: the
            # RNG it would have continued is gone, and entropy would not repeat
            seeds = [derived[j] if plan.seeds.get(j) is None else plan.seeds[j]
                     for j in range(len(slot.env_indices))]
            options = [plan.options.get(j) for j in range(len(slot.env_indices))]
            n = put_pickle(slot.payload, (seeds, options), self.opts.max_payload_bytes)
            requests.append((slot, _ring.OP_RESET, plan.ring, n, None))
        self.sup.dispatch.send(requests)
        failed = set(self.sup.dispatch.wait([slot for slot, _ in items], None))
        for slot, plan in items:
            if slot not in failed:
                continue
            failure = self.sup.dispatch.failure_of(slot)
            if failure.reason == "mismatch":
                raise failure_error(slot, failure, "in reset")
            if failure.reason == "exception" and plan.user_reset:
                user_errors.append(UserError(slot, failure))  # the worker lives on
                continue
            yield slot, failure, plan

    def before_reset(self, slots: list[Slot]) -> None:
        """A reset of these slots' envs follows: try disabled slots again and recycle the
        workers due (their successors take the reset)."""
        self.sup.retry_spares()
        disabled = [s for s in slots if s.disabled is not None]
        if disabled:
            self.reenable(disabled)
        if self.opts.recycling:
            due = [s for s in slots if s.serving and self.recycle_reason(s)]
            if due:
                self.recycle(due, ReplacementPlan(when=When.BY_CALLER))

    def reenable(self, slots: list[Slot], when: When = When.BY_CALLER) -> None:
        """A reset() tries disabled slots again, with a fresh budget window."""
        items = []
        for slot in slots:
            failure = slot.disabled
            slot.restart_times.clear()
            items.append((slot, failure, ReplacementPlan(when=when)))
            log.info("worker %d (envs %s): trying disabled envs again", slot.index,
                     list(slot.env_indices))
        self.replace(items, retry=True)

    # -- recycling -------------------------------------------------------------------------
    def recycle_reason(self, slot: Slot) -> str | None:
        ctl = slot.ctl
        if self.opts.recycle_after_episodes and ctl.episodes >= self.opts.recycle_after_episodes:
            return f"recycled after {ctl.episodes} episodes"
        if self.opts.max_worker_rss and ctl.rss_bytes > self.opts.max_worker_rss:
            return f"recycled at {ctl.rss_bytes} bytes resident > max_worker_rss"
        return None

    def recycle(self, slots: list[Slot], plan: ReplacementPlan) -> None:
        """Replace workers that reached their episode or memory limit (at an episode
        boundary): the old ones close their envs and exit while the new ones start."""
        items = []
        for slot in slots:
            reason = self.recycle_reason(slot)
            log.info("worker %d (envs %s): %s", slot.index, list(slot.env_indices), reason)
            items.append((slot, Failure("recycle", reason), plan))
        self.replace(items, planned=True)
