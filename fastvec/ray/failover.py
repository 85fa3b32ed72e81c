"""Lost actors: a node crashed, an actor's process was killed, an actor stopped answering.

The step that meets the loss returns normally (:meth:`Failover.assemble`): the lost actor's
envs come back truncated, reward 0, their last observation, with
``infos["worker_restarted"]`` and the reason. A replacement actor (away from the node, if
the node was lost) resets them with seeds derived as for a replaced worker inside a node
(:func:`fastvec.contract.derive_seed`). More than ``max_actor_restarts`` replacements of one
actor within ``actor_restart_window`` seconds raise RestartBudgetExceeded and close the env.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np

from fastvec.contract import InfoBatcher, derive_seed, restart_info
from fastvec.errors import RestartBudgetExceeded, WorkerFailure
from fastvec.ray.actors import Actors, Slot
from fastvec.ray.calls import Call, Calls, Outcome
from fastvec.ray.nested import concat, merge_infos, row

log = logging.getLogger("fastvec.ray")


class Failover:
    """Replaces lost actors within their budget; owns the envs' original seeds and the
    nodes that were lost. ``on_broken`` closes the vector env once a budget is spent."""

    def __init__(self, actors: Actors, calls: Calls, num_envs: int, max_actor_restarts: int,
                 actor_restart_window: float, on_broken: Callable[[], None]):
        self._actors = actors
        self._calls = calls
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
        ref = s.handle.reset.remote(self.derived_seeds(s) if seeds is None else seeds, options)
        s.pending_reset = ref if pending else None
        return ref

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

    def await_replacement(self, s: Slot, ref) -> Outcome:
        """Wait (with the actor deadline) for a replacement to start and reset."""
        outs = self._calls.collect({s.index: self._calls.call(s.start_ref, "start"),
                                    -1: self._calls.call(ref, "reset")}, None)
        start = outs[s.index]
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
        """One step's batch over ``slots`` (in order) from their outcomes: lost actors are
        replaced and their envs truncated and flagged. ``fresh_now`` (SAME_STEP): the
        replacement's reset is awaited and its observations returned at once, with
        ``final_obs``; else it is the slot's next step result. Returns ``(obs, rewards,
        terminations, truncations, infos, restarted)``."""
        size = sum(s.hi - s.lo for s in slots)
        batch = InfoBatcher(size)
        infos: dict = {}
        rew = np.zeros(size, np.float64)
        term = np.zeros(size, np.bool_)
        trunc = np.zeros(size, np.bool_)
        restarted = []
        errors = []
        at = 0
        for s in slots:
            k = s.hi - s.lo
            out, call = outs[s.index], calls[s.index]
            if out.error is not None:
                errors.append((s, out.error))
            elif out.lost is None:
                if call.kind == "reset":  # a replacement's fresh episode, as NEXT_STEP gives it
                    self._actors.resolve_start(s)
                    s.last_obs, info = out.value
                else:
                    s.last_obs, r, te, tr, info = out.value
                    rew[at:at + k], term[at:at + k], trunc[at:at + k] = r, te, tr
                merge_infos(infos, info, at, size)
            else:
                reason, detail = out.lost
                restarted.append((s, out.lost))
                last = s.last_obs
                ref = self.replace(s, reason, detail, pending=not fresh_now)
                trunc[at:at + k] = True
                if fresh_now:
                    fresh = self.await_replacement(s, ref)
                    while fresh.lost:
                        ref = self.replace(s, *fresh.lost)
                        fresh = self.await_replacement(s, ref)
                    if fresh.error is not None:
                        errors.append((s, fresh.error))
                        continue
                    s.last_obs, info = fresh.value
                    for j in range(k):
                        batch.add(infos, {"final_obs": row(last, j), "final_info": {}}, at + j)
                    merge_infos(infos, info, at, size)
                for j in range(k):
                    batch.add(infos, restart_info(f"{reason}: {detail}"), at + j)
            at += k
        if errors:
            s, exc = errors[0]
            raise self.remote_error(s, exc)
        return concat([s.last_obs for s in slots]), rew, term, trunc, infos, restarted
