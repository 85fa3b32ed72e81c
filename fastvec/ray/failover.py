"""Lost actors: a node crashed, an actor's process was killed, an actor stopped answering.

The step that meets the loss returns normally (:meth:`Failover.assemble`): the lost actor's
envs come back truncated, reward 0, their last observation, with
``infos["worker_restarted"]`` and the reason. A replacement actor (away from the node, if
the node was lost) resets them with seeds derived as for a replaced worker inside a node
(:func:`fastvec.contract.derive_seed`). More than ``max_actor_restarts`` replacements of one
actor within ``actor_restart_window`` seconds raise RestartBudgetExceeded and close the env.

With resume on (the default), a step or ``recv`` that meets a lost actor first tries to
resume its envs instead (:meth:`Failover.resume`, the driver's log in fastvec/ray/resume.py):
the replacement replays their episodes and steps again, and the step returns its real
results with ``infos["worker_resumed"]``; only if that fails are they truncated as above.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np

from fastvec.contract import InfoBatcher, derive_seed, restart_info, resumed_info
from fastvec.errors import RestartBudgetExceeded, WorkerFailure
from fastvec.ray.actors import Actors, Slot
from fastvec.ray.calls import Call, Calls, Outcome
from fastvec.ray.nested import concat, merge_infos, row
from fastvec.ray.resume import EpisodeMirror
from fastvec.resume import not_resumed_kind

log = logging.getLogger("fastvec.ray")


class Failover:
    """Replaces lost actors within their budget; owns the envs' original seeds and the
    nodes that were lost. ``on_broken`` closes the vector env once a budget is spent;
    ``mirror`` (None: ``resume="off"``) is the driver's log of the episodes, and
    ``needs_reset`` the driver's array of envs awaiting a reset (DISABLED)."""

    def __init__(self, actors: Actors, calls: Calls, num_envs: int, max_actor_restarts: int,
                 actor_restart_window: float, on_broken: Callable[[], None],
                 mirror: EpisodeMirror | None = None, needs_reset: np.ndarray | None = None):
        self._actors = actors
        self._calls = calls
        self._mirror = mirror
        self._needs_reset = needs_reset
        self._max_restarts = max_actor_restarts
        self._window = actor_restart_window
        self._on_broken = on_broken
        self._base_seeds: list[int | None] = [None] * num_envs
        self._lost_nodes: set[str] = set()

    # -- seeds ----------------------------------------------------------------------------------
    def remember_seeds(self, seeds: Sequence[int | None], mask: np.ndarray) -> None:
        """The seeds of a reset of the envs in ``mask``: the base of their derived seeds."""
        for i in np.flatnonzero(mask):
            if seeds[i] is not None:
                self._base_seeds[i] = int(seeds[i])

    def derived_seeds(self, s: Slot) -> list[int | None]:
        """Seeds for the envs of the slot's current actor (a rerun replays the same)."""
        return [None if self._base_seeds[i] is None
                else derive_seed(self._base_seeds[i], i, s.generation) for i in s.envs]

    # -- starting and replacing -------------------------------------------------------------
    def start(self) -> None:
        """Start every slot's actor; one placed on a node that died starts elsewhere."""
        slots = self._actors.slots
        for s in slots:
            self._actors.launch(s)
        outs = self._calls.collect({s.index: self._calls.call(s.start_ref, "start")
                                    for s in slots}, None)
        for s in slots:
            out = outs[s.index]
            while out.lost:
                self.relaunch(s, *out.lost)
                out = self._calls.collect({s.index: self._calls.call(s.start_ref, "start")},
                                          None)[s.index]
            if out.error is not None:
                raise self.remote_error(s, out.error)
            self._actors.identify(s, out.value)

    def replace(self, s: Slot, reason: str, detail: str, seeds: list | None = None,
                options: dict | None = None, pending: bool = False):
        """Replace the slot's actor and submit the replacement's first reset (``seeds``
        None: derived). Returns that reset's ref (also kept as the slot's next step result
        when ``pending``)."""
        self.relaunch(s, reason, detail)
        return self.reset_fresh(s, seeds, options, pending)

    def reset_fresh(self, s: Slot, seeds: list | None = None, options: dict | None = None,
                    pending: bool = False):
        """Submit the reset of the slot's replacement: fresh episodes, ``seeds`` (None:
        derived). Returns its ref (also the slot's next step result when ``pending``)."""
        ref = s.handle.reset.remote(self.derived_seeds(s) if seeds is None else seeds, options)
        s.pending_reset = ref if pending else None
        return ref

    def resume(self, s: Slot, reason: str, detail: str) -> tuple[Outcome, str | None]:
        """Replace the slot's lost actor and have the replacement replay its envs' episodes
        from the driver's log, then take the lost step (``s.sent``) again, all within the
        actor deadline. Returns the step's outcome, or ``(Outcome(), why)`` when its envs
        cannot all be resumed: the replacement (a second one if it was lost too: one
        replay, not a storm) is then the caller's to reset as without resume."""
        state = self._mirror.state(s.envs, s.last_obs, self._needs_reset,
                                   self._base_seeds)
        self.relaunch(s, reason, detail)
        out = self.await_replacement(s, s.handle.resume.remote(state, s.sent), "resume")
        k = s.hi - s.lo
        if out.lost:
            why = f"the replacement was lost too ({out.lost[0]}: {out.lost[1]})"
            s.not_resumed["crash repeated"] += k
            self.relaunch(s, *out.lost)
            return Outcome(), why
        if out.error is not None:  # raised by the re-sent step: the caller raises it
            return out, None
        kind, value = out.value
        if kind == "resumed":
            s.resumed += k
            return Outcome(value=value), None
        lost = [why for why in value if why is not None]
        s.not_resumed.update(not_resumed_kind(why) for why in lost)
        if len(lost) < k:
            s.not_resumed["another env of its actor"] += k - len(lost)
        return Outcome(), lost[0]

    def relaunch(self, s: Slot, reason: str, detail: str) -> None:
        """Count the failure against the budget, kill the old actor and start its
        replacement (away from the node if the node was lost)."""
        now = time.monotonic()
        s.failures.append(now)
        while s.failures and s.failures[0] < now - self._window:
            s.failures.popleft()
        s.restarts += 1
        s.reasons[reason] += 1
        s.last_failure, s.last_failure_time = f"{reason}: {detail}", time.time()
        log.warning("actor %d (envs %s, node %s, pid %s, generation %d) lost: %s: %s; seeds %s",
                    s.index, list(s.envs), s.node_id, s.pid, s.generation, reason, detail,
                    [self._base_seeds[i] for i in s.envs])
        self._actors.kill(s)
        if len(s.failures) > self._max_restarts:
            err = RestartBudgetExceeded(
                f"actor {s.index} (envs {list(s.envs)}) failed {len(s.failures)} times within "
                f"{self._window} s (max_actor_restarts={self._max_restarts}); "
                f"last: {reason}: {detail}", env_index=s.lo, env_indices=tuple(s.envs),
                worker_index=s.index, reason="budget", detail=f"{reason}: {detail}")
            self._on_broken()  # broken for good: later calls raise ClosedEnvError
            raise err
        if reason in ("node_lost", "unresponsive") and s.node_id:
            self._lost_nodes.add(s.node_id)
        predecessor = (s.host, s.pid) if s.host and s.pid else None
        s.generation += 1
        self._actors.launch(s, predecessor, self._lost_nodes)
        s.node_id = s.pid = s.host = None

    def await_replacement(self, s: Slot, ref, kind: str = "reset") -> Outcome:
        """Wait (with the actor deadline) for a replacement to start (if it has not yet
        answered) and to answer ``ref``."""
        calls = {-1: self._calls.call(ref, kind)}
        if s.start_ref is not None:
            calls[s.index] = self._calls.call(s.start_ref, "start")
        outs = self._calls.collect(calls, None)
        start = outs.get(s.index)
        if start is None:
            return outs[-1]
        if start.value is not None:
            self._actors.identify(s, start.value)
        return outs[-1] if start.value is not None else start

    # -- errors ---------------------------------------------------------------------------------
    @staticmethod
    def actor_error(s: Slot, reason: str, detail: str, when: str) -> WorkerFailure:
        return WorkerFailure(f"actor {s.index} (envs {list(s.envs)}) failed {when}: "
                             f"{reason}: {detail}", env_index=s.lo, env_indices=tuple(s.envs),
                             worker_index=s.index, reason=reason, detail=detail)

    def remote_error(self, s: Slot, exc: BaseException) -> BaseException:
        """An error raised inside the actor's FastVectorEnv, with env indices made global."""
        if isinstance(exc, WorkerFailure):
            exc.env_index = s.lo + max(exc.env_index, 0)
            exc.env_indices = tuple(s.lo + i for i in exc.env_indices)
        if isinstance(exc, RestartBudgetExceeded):
            self._on_broken()  # that node's env closed itself: so does this one
        return exc

    # -- batches ----------------------------------------------------------------------------------
    def assemble(self, slots: list[Slot], calls: dict[int, Call], outs: dict[int, Outcome],
                 fresh_now: bool):
        """One step's batch over ``slots`` (in order) from their outcomes: a lost actor's
        envs are resumed by its replacement (:meth:`resume`), else truncated and flagged.
        ``fresh_now`` (SAME_STEP): a truncated actor's replacement's reset is awaited and
        its observations returned at once, with ``final_obs``; else it is the slot's next
        step result. Returns ``(obs, rewards, terminations, truncations, infos, restarted,
        marks)``: ``marks`` the episode notes, ``(first env, notes)`` in order, for the
        driver's log once it recorded the step."""
        size = sum(s.hi - s.lo for s in slots)
        batch = InfoBatcher(size)
        infos: dict = {}
        rew = np.zeros(size, np.float64)
        term = np.zeros(size, np.bool_)
        trunc = np.zeros(size, np.bool_)
        restarted, errors, marks = [], [], []
        at = 0
        for s in slots:
            k = s.hi - s.lo
            out, call = outs[s.index], calls[s.index]
            resumed = why = None
            if out.lost is not None and self._mirror is not None and call.kind == "step":
                resumed, why = self.resume(s, *out.lost)
                detail = out.lost[1] if why is None else f"{out.lost[1]}; not resumed: {why}"
                failure = (out.lost[0], detail)
                restarted.append((s, failure))
                out = resumed if why is None else Outcome(lost=failure)
            if out.error is not None:
                errors.append((s, out.error))
            elif out.lost is None:
                if call.kind == "reset":  # a replacement's fresh episode, as NEXT_STEP gives it
                    self._actors.resolve_start(s)
                    s.last_obs, info, notes = out.value
                else:
                    s.last_obs, r, te, tr, info, notes = out.value
                    rew[at:at + k], term[at:at + k], trunc[at:at + k] = r, te, tr
                merge_infos(infos, info, at, size)
                marks.append((s.lo, notes))
                if resumed is not None:
                    for j in range(k):
                        batch.add(infos, resumed_info(": ".join(restarted[-1][1])), at + j)
            else:
                reason, detail = out.lost
                if resumed is None:  # else counted and replaced by resume()
                    restarted.append((s, out.lost))
                    self.relaunch(s, reason, detail)
                marks.append((s.lo, {"starts": {}, "snapshots": {}, "ended": {
                    j: f"the actor was lost: {reason}: {detail}" for j in range(k)}}))
                last = s.last_obs
                ref = self.reset_fresh(s, pending=not fresh_now)
                trunc[at:at + k] = True
                if fresh_now:
                    fresh = self.await_replacement(s, ref)
                    while fresh.lost:
                        ref = self.replace(s, *fresh.lost)
                        fresh = self.await_replacement(s, ref)
                    if fresh.error is not None:
                        errors.append((s, fresh.error))
                        at += k
                        continue
                    s.last_obs, info, notes = fresh.value
                    for j in range(k):
                        batch.add(infos, {"final_obs": row(last, j), "final_info": {}}, at + j)
                    merge_infos(infos, info, at, size)
                    marks.append((s.lo, notes))
                for j in range(k):
                    batch.add(infos, restart_info(f"{reason}: {detail}"), at + j)
            at += k
        if errors:
            s, exc = errors[0]
            raise self.remote_error(s, exc)
        return (concat([s.last_obs for s in slots]), rew, term, trunc, infos, restarted,
                marks)
