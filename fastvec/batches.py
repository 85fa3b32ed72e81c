"""First-ready batches: ``send(actions, env_ids)`` / ``recv()`` beside lockstep ``step``.

Each env steps in its own ring slot (``_env_ring[i]`` holds the slot of its latest row);
``recv`` returns the ``batch_size`` envs that finished first, oldest request first so no
env starves, gathering their rows with the C row-gather kernel. ``step``/``reset`` realign
the ring slots (``FastVectorEnv._align_rings``). NEXT_STEP and ``envs_per_worker=1`` only.
"""

from __future__ import annotations

import numpy as np

from fastvec import _ring
from fastvec.contract import BatchInfos, State
from fastvec.errors import AlreadyPendingCallError, FastVecError, NoAsyncCallError
from fastvec.recovery import ReplacementPlan, When
from fastvec.shm import get_pickle


class FirstReadyBatches:
    """``send``/``recv`` of FastVectorEnv (a mixin: it works on the env's own state)."""

    @property
    def stepping(self) -> np.ndarray:
        """Indices of the envs sent (``send``) and not yet received (``recv``)."""
        return np.flatnonzero(self._inflight)

    def send(self, actions, env_ids=None) -> None:
        """Start one step of the envs ``env_ids`` (default: all) with ``actions[j]`` for
        ``env_ids[j]``, and return at once. Needs ``batch_size``; see :meth:`recv`."""
        self._assert_open()
        if self.batch_size is None:
            raise FastVecError("send()/recv() need FastVectorEnv(..., batch_size=k)")
        if self._state is not State.DEFAULT:
            raise AlreadyPendingCallError(f"send() called while a {self._state.value}_async() "
                                          f"is pending", self._state.value)
        ids = np.arange(self.num_envs) if env_ids is None else np.asarray(env_ids).reshape(-1)
        if ids.dtype.kind not in "iu" or len(np.unique(ids)) != len(ids) or (
                len(ids) and (ids.min() < 0 or ids.max() >= self.num_envs)):
            raise ValueError(f"env_ids must be distinct env indices in 0..{self.num_envs - 1}, "
                             f"got {env_ids!r}")
        busy = ids[self._inflight[ids]]
        if len(busy):
            raise AlreadyPendingCallError(f"envs {busy.tolist()} are still stepping; recv() "
                                          "them before sending them again", "recv")
        flat = self._flat_actions(actions, len(ids))
        self._write_actions(flat, ids)
        for i in ids:
            slot = self._env_to_slot[i]
            if slot.disabled is None and slot.lost is None:
                self._sup.request(slot, _ring.OP_STEP,
                                  int((self._env_ring[i] + 1) % self.options.ring_depth),
                                  self._put_pickled_actions(slot))
        self._inflight[ids] = True

    def recv(self, timeout: float | None = None):
        """Results of ``batch_size`` envs that finished their step (fewer if fewer are
        stepping; the longest-waiting first), as ``(obs, rewards, terminations, truncations,
        infos, env_ids)``, batched over ``env_ids`` (ascending). Envs reset themselves as in
        NEXT_STEP mode. A failed worker's env comes back truncated and flagged, as in
        :meth:`step`; a disabled one truncated with ``infos["env_disabled"]``."""
        return self._guarded(self._recv, timeout)

    def _recv(self, timeout: float | None):
        self._assert_open()
        flying = [self._env_to_slot[i] for i in np.flatnonzero(self._inflight)]
        if not flying:
            raise NoAsyncCallError("recv() called with no env stepping; send() first", "send")
        count = min(self.batch_size, len(flying))
        # Envs out of play (disabled, or replaced in a call) were never sent: they are
        # ready at once, with a truncation to report.
        synthetic = [s for s in flying if s.disabled is not None or s.lost is not None]
        live = [s for s in flying if s not in synthetic]
        ready, failed = [], []
        if len(synthetic) < count:
            ready, failed = self._sup.wait_any(live, count - len(synthetic), timeout)
        # Exactly `count`, oldest requests first: nobody starves behind fast envs.
        chosen = synthetic + sorted(ready + failed, key=lambda s: s.expected)
        chosen = chosen[:count]
        ready = [s for s in ready if s in chosen]
        failed = [s for s in failed if s in chosen]
        self._steps += 1
        for slot in ready:
            if slot.ctl.status == _ring.ST_MISMATCH and slot.failure is None:
                self._inflight[slot.env_indices[0]] = False
                raise self._failure_error(slot, self._sup.failure_of(slot), "in step")
        crashed = [(slot, self._sup.failure_of(slot)) for slot in failed]
        if crashed:
            self._recovery.replace([(s, f, ReplacementPlan(when=When.NEXT)) for s, f in crashed])
        reported = {slot: failure for slot, failure in crashed}
        for slot in chosen:
            if slot.lost is not None:
                reported[slot] = slot.lost
                slot.lost = None
            elif slot.disabled is not None and slot not in reported:
                reported[slot] = None
        done_slots = sorted(chosen, key=lambda s: s.env_indices[0])
        ids = np.array([s.env_indices[0] for s in done_slots], np.int64)
        rings = (self._env_ring[ids] + 1) % self.options.ring_depth
        v = self._views
        infos: dict = {}
        batch = BatchInfos(len(ids))
        for j, slot in enumerate(done_slots):
            i = int(ids[j])
            if slot in reported:
                self._obs.carry([i], int(rings[j]), self._env_ring)
                v.reward[rings[j], i], v.terminated[rings[j], i] = 0.0, False
                v.truncated[rings[j], i] = True
                failure = reported[slot]
                batch.add(infos, self._disabled_info(slot.disabled) if slot.disabled
                          else self._restart_info(failure), j)
            else:
                info = pobs = None
                if slot.ctl.resp_payload_len:
                    (info,), (pobs,) = get_pickle(slot.payload, slot.ctl.resp_payload_len)
                    if info:
                        self._infos.learn(info)
                typed = self._infos.env_info(int(rings[j]), i)
                if typed:
                    info = {**typed, **info} if info else typed
                if info:
                    batch.add(infos, info, j)
                if pobs is not None:
                    self._obs.pickled[rings[j]][i] = pobs
        obs = self._obs.gather(rings.tolist(), ids.tolist())
        rewards = v.reward[rings, ids].copy()
        terminated, truncated = v.terminated[rings, ids].copy(), v.truncated[rings, ids].copy()
        self._env_ring[ids] = rings
        self._inflight[ids] = False
        self._due[ids] = terminated | truncated
        self._sup.record_latency(ready)
        if self.options.recycling:
            due = [s for s in done_slots if s not in reported and s.serving
                   and (terminated | truncated)[list(ids).index(s.env_indices[0])]
                   and self._recovery.recycle_reason(s)]
            if due:
                self._recovery.recycle(due, ReplacementPlan(when=When.NEXT))
        if not self._inflight.any():  # workers read the schema when a request starts
            self._infos.publish()
        self._raise_if_policy([(s, f) for s, f in crashed])
        return obs, rewards, terminated, truncated, infos, ids
