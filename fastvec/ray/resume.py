"""The driver's copy of the episode logs, so that a lost actor's episodes go on in its
replacement (``resume="auto"``, the default; fastvec/resume.py does the same for a lost
worker inside a node).

    driver                                           node j (_NodeHost, its FastVectorEnv)
      step: actions ─────────────────────────────▶  step; its EpisodeLog logs it
      EpisodeMirror.record(actions, results)  ◀──  results + take_episode_notes()
      EpisodeMirror.apply(notes): starts,            (episode starts, ends, snapshots:
        ends, snapshots, as the node's log did        usually None)
      call / set_attr: logged once they reached the envs, as FastVectorEnv logs them

    actor j lost -> EpisodeMirror.state(slot): its envs' episodes, in the format of
      FastVectorEnv.state_dict(), each with the digest of the last observation the driver
      returned (fastvec.replay.obs_digest over the driver's arrays)
      -> replacement.resume(state, the lost step's actions): load_state_dict (replayed and
         checked step by step), then the step again: its real results, ``worker_resumed``
      -> an env that cannot be resumed: the whole actor is reset with derived seeds and
         its envs truncated, as with ``resume="off"`` (the reason after "not resumed:")
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from fastvec.episodes import EpisodeLog
from fastvec.layout import flatten, leaves, split_pickled
from fastvec.replay import obs_digest
from fastvec.resume import STATE_FORMAT


class EpisodeMirror:
    """Every env's episode as the nodes log it: the driver records the actions and results
    it hands out and applies the nodes' notes; ``state(slot)`` exports a lost actor's."""

    def __init__(self, obs_space: spaces.Space, act_space: spaces.Space, num_envs: int,
                 cap: int, autoreset_mode):
        self.obs_space, self.act_space = obs_space, act_space
        self.obs_leaves, self.act_leaves = leaves(obs_space), leaves(act_space)
        self.num_envs, self.mode = num_envs, autoreset_mode
        self.log = EpisodeLog([None if lf.pickled else np.zeros((num_envs, *lf.shape), lf.dtype)
                               for lf in self.act_leaves], num_envs, cap)
        #: NEXT_STEP: envs whose last step ended their episode (their next step resets them)
        self.due = np.zeros(num_envs, np.bool_)

    # -- writing ----------------------------------------------------------------------------
    def record(self, actions, reward, terminated, truncated, env_ids=None) -> None:
        """One step handed out: ``actions`` batched over every env, or over ``env_ids``
        (first-ready batches, in that order)."""
        n = self.num_envs
        ids = None if env_ids is None else np.asarray(env_ids, np.int64)
        rows, pickled = [], {}
        for k, (leaf, value) in enumerate(zip(self.act_leaves, flatten(self.act_space,
                                                                        actions))):
            if leaf.pickled:
                for i, item in zip(range(n) if ids is None else ids,
                                   split_pickled(leaf.space, value)):
                    pickled.setdefault(int(i), {})[k] = item
                rows.append(None)
            elif ids is None:
                rows.append(np.asarray(value))
            else:
                full = np.zeros((n, *leaf.shape), leaf.dtype)
                full[ids] = value
                rows.append(full)
        if ids is None:
            self.log.record_arrays(rows, reward, terminated, truncated, pickled=pickled)
        else:
            full = [np.zeros(n, np.float64), np.zeros(n, np.bool_), np.zeros(n, np.bool_)]
            for arr, part in zip(full, (reward, terminated, truncated)):
                arr[ids] = part
            self.log.record_arrays(rows, *full, env_ids=ids, pickled=pickled)
        if self.mode == AutoresetMode.NEXT_STEP:
            self.due[ids if ids is not None else slice(None)] = (
                np.asarray(terminated) | np.asarray(truncated))

    def apply(self, marks: list) -> None:
        """After :meth:`record`: the nodes' notes, ``(first env, notes)`` in order."""
        for lo, notes in marks:
            self.log.apply_notes(notes, lo)

    def reset(self, mask: np.ndarray) -> None:
        """A reset of the envs in ``mask`` (their starts come with its notes)."""
        self.due[mask] = False

    def end(self, env_ids, why: str) -> None:
        self.log.end(list(env_ids), why)

    def event(self, op: str, payload) -> None:
        """A call (``OP_CALL``: name, args, kwargs) or set_attr (``OP_SET_ATTR``: name,
        one value per env) that reached the envs."""
        self.log.event(op, payload)

    # -- a lost actor ---------------------------------------------------------------------
    def digest(self, obs, j: int) -> bytes:
        """``obs_digest`` of row ``j`` of a batch of observations, as a node's worker
        computes it over its ring slot (fixed leaves' bytes, then the pickled others)."""
        regions, pickled = [], None
        for leaf, value in zip(self.obs_leaves, flatten(self.obs_space, obs)):
            if leaf.pickled:
                pickled = (pickled or []) + [split_pickled(leaf.space, value)[j]]
                regions.append(None)
            else:
                regions.append(np.asarray(value, leaf.dtype)[None])
        return obs_digest(regions, 0, j, pickled)

    def state(self, envs: range, last_obs, needs_reset: np.ndarray, base_seeds: list) -> dict:
        """The episodes of ``envs`` (one actor's) as ``FastVectorEnv.load_state_dict``
        takes them; ``last_obs``: their observations the driver returned last."""
        return {
            "format": STATE_FORMAT,
            "num_envs": len(envs),
            "autoreset_mode": self.mode.value,
            "spaces": (repr(self.obs_space), repr(self.act_space)),
            "episodes": [self.log.export(i, self.digest(last_obs, j))
                         for j, i in enumerate(envs)],
            "due": self.due[envs.start:envs.stop].tolist(),
            "needs_reset": needs_reset[envs.start:envs.stop].tolist(),
            "base_seeds": [base_seeds[i] for i in envs],
        }
