"""Saving and resuming a whole job: ``state_dict()`` / ``load_state_dict()`` of a
FastVectorEnv, over its episode log (fastvec/episodes.py) and its resume path
(fastvec/resume.py).

A mixin of FastVectorEnv, as fastvec/contract.py's VectorContract is: it reads the vector
env's own per-env arrays (ring slots, due autoresets, pending resets).
"""

from __future__ import annotations

from fastvec.errors import FastVecError
from fastvec.resume import Resume


class Checkpoints:
    def state_dict(self) -> dict:
        """Every env's episode so far (how it began, its actions and results, calls made
        on it) as small, picklable data: save it with the model, and give it to
        :meth:`load_state_dict` of a new FastVectorEnv built from the same env fns."""
        self._assert_idle("state_dict")
        self._align_rings()
        return self._resumer("state_dict").export(
            self._env_ring, self._due, self._needs_reset,
            (self.single_observation_space, self.single_action_space))

    def load_state_dict(self, state: dict):
        """Replay each env's saved episode to the step it was at, checked step by step
        (an env that does not match starts a new episode, flagged); returns the current
        observations and infos, as ``reset`` does (``infos["worker_resumed"]``)."""
        self._assert_idle("load_state_dict")
        resume = self._resumer("load_state_dict")
        resume.check(state, (self.single_observation_space, self.single_action_space))
        r = (self._ring + 1) % self.options.ring_depth
        infos = self._guarded(resume.load, state, r)
        self._episodes.started(*self._replies.take_notes())
        self._ring = r
        self._env_ring[:] = r
        self._due[:] = state["due"]
        self._needs_reset[:] = state["needs_reset"]
        self._infos.publish()
        return self._obs.batch(r), infos

    def take_episode_notes(self) -> dict | None:
        """The episode starts, ends and snapshots this env's episode log noted since the
        previous call (:meth:`fastvec.episodes.EpisodeLog.take_notes`; None: none, the
        common case, or ``resume="off"``): a copy of the log kept elsewhere (RayVectorEnv's
        driver) applies them after each step to stay equal to it."""
        return None if self._episodes is None else self._episodes.take_notes()

    def _resumer(self, what: str) -> Resume:
        if self._resume is None:
            raise FastVecError(f"{what}() needs the episode log: build the vector env with "
                               "resume='auto' (the default), not 'off'")
        return self._resume

