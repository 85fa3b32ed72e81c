"""First-ready batches: ``send(actions, env_ids)`` / ``recv()`` beside lockstep ``step``.

Each env steps in its own ring slot (``env_ring[i]`` holds the slot of its latest row);
``recv`` returns the ``batch_size`` envs that finished first, oldest request first so no
env starves, gathering their rows with the C row-gather kernel. ``step``/``reset`` realign
the ring slots (``FastVectorEnv._align_rings``). NEXT_STEP and ``envs_per_worker=1`` only.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fastvec import _ring
from fastvec.contract import InfoBatcher, State, resumed_info
from fastvec.errors import AlreadyPendingCallError, FastVecError, NoAsyncCallError
from fastvec.failure_reports import disabled_flag, failure_error, raise_if_policy, restart_flag
from fastvec.infos import InfoColumns
from fastvec.layout import Views
from fastvec.observations import ObservationRing
from fastvec.recovery import Recovery, ReplacementPlan, When
from fastvec.resume import Resume
from fastvec.shm import get_pickle
from fastvec.supervisor import Slot, Supervisor


class FirstReady:
    """``send``/``recv`` of one env per worker, each in its own ring slot.

    ``inflight`` (envs sent and not yet received), ``env_ring`` and ``due`` are the vector
    env's per-env arrays, updated here in place; ``count_step()`` is called once per
    ``recv`` that got its envs (the clock of the action history).
    """

    def __init__(self, sup: Supervisor, recovery: Recovery, obs: ObservationRing, views: Views,
                 columns: InfoColumns, *, batch_size: int, ring_depth: int, recycling: bool,
                 on_failure: str, inflight: np.ndarray, env_ring: np.ndarray, due: np.ndarray,
                 count_step: Callable[[], None], resume: Resume | None = None):
        self.sup, self.recovery, self.obs, self.views = sup, recovery, obs, views
        self.columns = columns
        self.batch_size, self.ring_depth = batch_size, ring_depth
        self.recycling, self.on_failure = recycling, on_failure
        self.inflight, self.env_ring, self.due = inflight, env_ring, due
        self.count_step = count_step
        self.env_to_slot = [s for s in sup.slots for _ in s.env_indices]
        self.resume = resume  # resuming a lost worker's episode (fastvec/resume.py), or None
        self.log = resume.log if resume is not None else None
        self.parts: dict = {}  # env -> the pickled action leaves of the step in flight

    def env_ids(self, env_ids) -> np.ndarray:
        """``send``'s ``env_ids`` (None: every env) as distinct indices of envs not stepping."""
        n = len(self.inflight)
        ids = np.arange(n) if env_ids is None else np.asarray(env_ids).reshape(-1)
        if ids.dtype.kind not in "iu" or len(np.unique(ids)) != len(ids) or (
                len(ids) and (ids.min() < 0 or ids.max() >= n)):
            raise ValueError(f"env_ids must be distinct env indices in 0..{n - 1}, "
                             f"got {env_ids!r}")
        busy = ids[self.inflight[ids]]
        if len(busy):
            raise AlreadyPendingCallError(f"envs {busy.tolist()} are still stepping; recv() "
                                          "them before sending them again", "recv")
        return ids

    def send(self, ids: np.ndarray, pickled_actions: Callable[[Slot], int],
             parts: dict) -> None:
        """Start a step of envs ``ids`` (their actions already in shared memory;
        ``pickled_actions(slot)`` puts the rest, ``parts``, in the slot's side buffer)."""
        for i in ids:
            self.parts[int(i)] = parts.get(int(i))
            slot = self.env_to_slot[i]
            if slot.disabled is None and slot.lost is None:
                self.sup.dispatch.request(slot, _ring.OP_STEP,
                                 int((self.env_ring[i] + 1) % self.ring_depth),
                                 pickled_actions(slot))
        self.inflight[ids] = True

    def recv(self, timeout: float | None):
        """``(obs, rewards, terminations, truncations, infos, env_ids)`` of the first
        ``batch_size`` envs (of those stepping) to finish; see ``FastVectorEnv.recv``."""
        flying = [self.env_to_slot[i] for i in np.flatnonzero(self.inflight)]
        count = min(self.batch_size, len(flying))
        # Envs out of play (disabled, or replaced in a call) were never sent: they are
        # ready at once, with a truncation to report.
        synthetic = [s for s in flying if s.disabled is not None or s.lost is not None]
        live = [s for s in flying if s not in synthetic]
        ready, failed = [], []
        if len(synthetic) < count:
            ready, failed = self.sup.dispatch.wait_any(live, count - len(synthetic), timeout)
        # Exactly `count`, oldest requests first: nobody starves behind fast envs.
        chosen = synthetic + sorted(ready + failed, key=lambda s: s.expected)
        chosen = chosen[:count]
        ready = [s for s in ready if s in chosen]
        failed = [s for s in failed if s in chosen]
        self.count_step()
        for slot in ready:
            if slot.ctl.status == _ring.ST_MISMATCH and slot.failure is None:
                self.inflight[slot.env_indices[0]] = False
                raise failure_error(slot, self.sup.dispatch.failure_of(slot), "in step")
        crashed = [(slot, self.sup.dispatch.failure_of(slot)) for slot in failed]
        resumed: dict = {}
        lost = crashed
        if crashed and self.resume is not None:  # replay, re-send; what is left truncates
            done, ended, crashed, disabled = self.resume.first_ready(crashed, self.env_ring,
                                                                     self.parts)
            resumed = dict(done)
            lost = ended + crashed + disabled
        if crashed:
            self.recovery.replace([(s, f, ReplacementPlan(when=When.NEXT)) for s, f in crashed])
        reported = {slot: failure for slot, failure in lost}
        for slot in chosen:
            if slot.lost is not None:
                reported[slot] = slot.lost
                slot.lost = None
            elif slot.disabled is not None and slot not in reported:
                reported[slot] = None
        done_slots = sorted(chosen, key=lambda s: s.env_indices[0])
        ids = np.array([s.env_indices[0] for s in done_slots], np.int64)
        rings = (self.env_ring[ids] + 1) % self.ring_depth
        v = self.views
        infos: dict = {}
        starts: dict = {}
        snapshots: dict = {}
        rows = InfoBatcher(len(ids))  # infos batched over the envs returned
        for j, slot in enumerate(done_slots):
            i = int(ids[j])
            if slot in reported:
                self.obs.carry([i], int(rings[j]), self.env_ring)
                v.reward[rings[j], i], v.terminated[rings[j], i] = 0.0, False
                v.truncated[rings[j], i] = True
                failure = reported[slot]
                rows.add(infos, disabled_flag(slot.disabled) if slot.disabled
                         else restart_flag(failure), j)
            else:
                info = pobs = None
                if slot.ctl.resp_payload_len:
                    (info,), (pobs,), began = get_pickle(slot.payload,
                                                         slot.ctl.resp_payload_len)
                    if began and began[0] is not None:
                        starts[i], snapshots[i] = began[0]
                    if info:
                        self.columns.learn(info)
                typed = self.columns.env_info(int(rings[j]), i)
                if typed:
                    info = {**typed, **info} if info else typed
                if slot in resumed:
                    info = {**(info or {}), **resumed_info(resumed[slot].text())}
                if info:
                    rows.add(infos, info, j)
                if pobs is not None:
                    self.obs.pickled[rings[j]][i] = pobs
        obs = self.obs.gather(rings.tolist(), ids.tolist())
        rewards = v.reward[rings, ids].copy()
        terminated, truncated = v.terminated[rings, ids].copy(), v.truncated[rings, ids].copy()
        if self.log is not None:
            self.log.record_envs(v, rings.tolist(), ids.tolist(), self.parts)
            self.log.end([i for i, s in zip(ids, done_slots) if s in reported], "truncated")
            self.log.started({i: s for i, s in starts.items() if s is not None},
                             {i: s for i, s in snapshots.items() if s is not None})
        self.env_ring[ids] = rings
        self.inflight[ids] = False
        self.due[ids] = terminated | truncated
        self.sup.record_latency(ready)
        if self.recycling:
            recycled = [s for s in done_slots if s not in reported and s.serving
                        and (terminated | truncated)[list(ids).index(s.env_indices[0])]
                        and self.recovery.recycle_reason(s)]
            if recycled:
                if self.log is not None:  # its next episode starts from a derived seed
                    self.log.end([s.env_indices[0] for s in recycled], "recycled")
                self.recovery.recycle(recycled, ReplacementPlan(when=When.NEXT))
        if not self.inflight.any():  # workers read the schema when a request starts
            self.columns.publish()
        raise_if_policy(self.on_failure, crashed)
        return obs, rewards, terminated, truncated, infos, ids


class FirstReadyCalls:
    """``send``/``recv``/``stepping`` of FastVectorEnv (a mixin, as fastvec/contract.py's
    VectorContract is: it reads the vector env's own state and collaborators)."""

    @property
    def stepping(self) -> np.ndarray:
        """Indices of the envs sent (``send``) and not yet received (``recv``)."""
        return np.flatnonzero(self._inflight)

    def send(self, actions, env_ids=None) -> None:
        """Start one step of the envs ``env_ids`` (default: all) with ``actions[j]`` for
        ``env_ids[j]``, and return at once. Needs ``batch_size``; see :meth:`recv`."""
        self._assert_open()
        if self._first_ready is None:
            raise FastVecError("send()/recv() need FastVectorEnv(..., batch_size=k)")
        if self._state is not State.DEFAULT:
            raise AlreadyPendingCallError(f"send() called while a {self._state.value}_async() "
                                          f"is pending", self._state.value)
        ids = self._first_ready.env_ids(env_ids)
        self._actions.write(actions, ids, self._steps)
        self._first_ready.send(ids, self._actions.put_pickled, self._actions.pickled)

    def recv(self, timeout: float | None = None):
        """Results of ``batch_size`` envs that finished their step (fewer if fewer are
        stepping; the longest-waiting first), as ``(obs, rewards, terminations, truncations,
        infos, env_ids)``, batched over ``env_ids`` (ascending). Envs reset themselves as in
        NEXT_STEP mode. A failed worker's env comes back resumed or truncated, flagged, as in
        :meth:`step`; a disabled one truncated with ``infos["env_disabled"]``."""
        return self._guarded(self._recv, timeout)

    def _recv(self, timeout: float | None):
        self._assert_open()
        if not self._inflight.any():
            raise NoAsyncCallError("recv() called with no env stepping; send() first", "send")
        return self._first_ready.recv(timeout)
