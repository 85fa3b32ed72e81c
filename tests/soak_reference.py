"""The soak's reference: each env of the vector env mirrored by a CounterEnv in this
process, stepped with the same actions, as SyncVectorEnv would step it (NEXT_STEP).

Every transition fastvec returns is compared with its mirror's: obs, reward, terminated,
truncated exactly, and infos that hold nothing but fastvec's own flags. What the mirror
cannot know it is told by the rules of recovery, never by the env under test:

    flag in the step          what fastvec must return           the mirror
    none, worker_resumed      the mirror's transition            steps (or autoresets)
    worker_restarted          truncated, reward 0, the last obs  waits: its next episode
                              (its episode is lost)              begins with the seed below
    worker_restarted, and     the reset of a new episode, from   resets with that seed
    the env was due           the seed below
    env_disabled              truncated, reward 0, the last obs  waits for a reset

A replacement's new episode begins with ``derive_seed(base, i, generation)``
(fastvec/recovery.py ``derived_seeds``): ``base`` the env's latest seed from a reset,
``generation`` its worker's count of replacements (restarts + recycles, checked against
health()). The same holds after a recycling. Such a pending seed stands in for a reset
without one, as the worker's does. The re-sync is checked like any transition: a wrong
seed gives another ``obs[0]`` and another episode length.

A new worker whose reset had no seed at all (a reset() without seeds that lost its
worker, with resume off) starts from OS entropy: that episode cannot be mirrored, so the
env is *unsynced* and checked by CounterEnv's rules only (obs[0] fixed in an episode,
obs[1] counts steps, obs[2] sums actions, reward = action / 2 + t) until its next episode
begins from a seed (a fastvec bug, reported with issue 16: it should take the derived
seed, as every other replacement does).
"""

from __future__ import annotations

import numpy as np

from fastvec.contract import derive_seed
from soak_faults import SoakEnv

FLAG_KEYS = {f"{p}{k}" for k in ("worker_resumed", "worker_resumed_reason",
                                 "worker_restarted", "worker_restart_reason",
                                 "env_disabled", "env_disabled_reason") for p in ("", "_")}


class Mirror:
    """One env's reference and what the soak knows of its episode."""

    def __init__(self, base: int):
        self.env = SoakEnv()  # no command dir: no faults
        self.base = base  # the env's original seed, as fastvec keeps it
        self.obs = np.zeros(3)  # the last observation fastvec returned
        self.due = False  # its next step is its autoreset
        self.seed: int | None = None  # a pending seed: its next episode begins with it
        self.seed_from = ""  # "failure" or "recycle"
        self.synced = True
        self.logged = True  # fastvec's episode log holds its episode (resumable)
        self.own = False  # a call raised the env's own exception in this episode
        self.skew = 0.0  # hidden state change of its next step (soak_faults "skew")
        self.derived = 0  # episodes it began from a derived seed (re-synchronised)

    @property
    def t(self) -> int:
        """Steps of the env's current (or just ended) episode."""
        return int(self.obs[1])

    def pend(self, seed: int, source: str) -> None:
        self.seed, self.seed_from = seed, source

    def reset(self, seed: int | None) -> np.ndarray:
        if seed is None and self.seed is not None:
            seed = self.seed
            self.derived += 1
        obs, _ = self.env.reset(seed=seed)
        self.due, self.seed, self.seed_from, self.own = False, None, "", False
        self.logged = True
        if seed is not None:
            self.synced = True
        return obs

    def step(self, action: int):
        if self.due:
            return self.reset(None), 0.0, False, False
        if self.skew:
            self.env.skew(self.skew)
            self.skew = 0.0
        obs, reward, term, trunc, _ = self.env.step(action)
        self.due = bool(term or trunc)
        return obs, float(reward), bool(term), bool(trunc)


def check_rules(i: int, due: bool, prev, action: int, got, where: str) -> None:
    """CounterEnv's rules, for an env whose episode began from entropy."""
    obs, reward, term, trunc = got
    if due:
        assert obs[1] == 0 and obs[2] == 0 and reward == 0.0 and not term and not trunc, \
            f"env {i} (unsynced): expected a reset {where}: {got}"
        return
    assert obs[0] == prev[0] and obs[1] == prev[1] + 1 and obs[2] == prev[2] + action, \
        f"env {i} (unsynced): lost or repeated step {where}: {prev} -> {obs}"
    assert reward == action * 0.5 + obs[1] and not trunc, f"env {i} (unsynced) {where}: {got}"


class Reference:
    """The mirrors of all envs; ``check_step`` / ``check_reset`` judge fastvec's results
    and return per env what happened (``outcomes``), for the soak to hold against the
    faults it planted."""

    def __init__(self, n: int, seed: int):
        self.m = [Mirror(seed + i) for i in range(n)]
        self.n = n
        self.unsynced = 0  # episodes begun from entropy in a new worker

    @property
    def counts(self) -> dict:
        return {"derived_starts": sum(m.derived for m in self.m), "unsynced": self.unsynced}

    def first_reset(self, obs: np.ndarray, seed: int) -> None:
        for i, m in enumerate(self.m):
            want = m.reset(seed + i)
            np.testing.assert_array_equal(obs[i], want, f"env {i}: the first reset")
            m.obs = obs[i].copy()

    def check_step(self, where: str, actions, result, gens: dict, recycled: set) -> list:
        """One step of fastvec (``result``) against the mirrors. ``gens``: env -> its
        worker's generation now (given for envs flagged restarted or recycled).
        Returns per env: ("ok" | "resumed" | "truncated" | "reset_step" | "out", reason)."""
        obs, rew, term, trunc, info = result
        assert set(info) <= FLAG_KEYS, f"{where}: infos beyond fastvec's flags: {info}"
        none = np.zeros(self.n, bool)
        resumed = info.get("_worker_resumed", none)
        restarted = info.get("_worker_restarted", none)
        disabled = info.get("_env_disabled", none)
        out = []
        for i, m in enumerate(self.m):
            at = f"{where}, env {i}"
            got = (obs[i], float(rew[i]), bool(term[i]), bool(trunc[i]))
            assert resumed[i] + restarted[i] + disabled[i] <= 1, f"{at}: two flags {info}"
            if disabled[i] or (restarted[i] and not m.due):
                # out of play, or its episode lost: truncated, reward 0, the last obs
                assert trunc[i] and not term[i] and rew[i] == 0.0, f"{at}: {got}"
                np.testing.assert_array_equal(obs[i], m.obs, f"{at}: not the last obs")
                m.due, m.logged, m.own = True, False, False
                if disabled[i]:
                    out.append(("out", info["env_disabled_reason"][i]))
                    m.seed = None  # out of play: only a reset brings it back
                    continue
                m.pend(derive_seed(m.base, i, gens[i]), "failure")
                out.append(("truncated", info["worker_restart_reason"][i]))
                continue
            if restarted[i]:  # lost at its reset step: a new worker's fresh episode
                m.pend(derive_seed(m.base, i, gens[i]), "failure")
                out.append(("reset_step", info["worker_restart_reason"][i]))
            elif resumed[i]:
                out.append(("resumed", info["worker_resumed_reason"][i]))
            else:
                out.append(("ok", ""))
            action = int(actions[i])
            if not m.synced and (not m.due or m.seed is None):
                check_rules(i, m.due, m.obs, action, got, at)
                m.skew = 0.0
                m.due, m.own = (False, False) if m.due else (bool(term[i]), m.own)
            else:
                want = m.step(action)
                np.testing.assert_array_equal(obs[i], want[0], f"{at}: obs differ from "
                                              f"the reference ({out[-1][0]})")
                assert got[1:] == want[1:], f"{at}: {got[1:]} != reference {want[1:]} " \
                                            f"({out[-1][0]})"
            m.obs = obs[i].copy()
        for i in recycled:  # its next episode comes from the new worker: a derived seed
            m = self.m[i]
            assert m.due, f"{where}: env {i}'s worker recycled in the middle of an episode"
            m.pend(derive_seed(m.base, i, gens[i]), "recycle")
        return out

    def fail_reset(self, seeds: list, mask, raised: int) -> None:
        """A reset that raised in env ``raised``: the other masked envs did reset."""
        for i in np.flatnonzero(mask):
            if i != raised and self.m[i].synced:
                self.m[i].reset(seeds[i])

    def check_reset(self, where: str, seeds: list, mask, obs, infos: dict,
                    replaced: dict) -> list:
        """A masked reset against the mirrors. ``replaced``: env -> its worker's new
        generation, for envs whose worker was replaced during the reset. Returns per
        masked env ("ok" | "resumed" | "restarted", reason)."""
        assert set(infos) <= FLAG_KEYS, f"{where}: infos beyond fastvec's flags: {infos}"
        none = np.zeros(self.n, bool)
        resumed = infos.get("_worker_resumed", none)
        restarted = infos.get("_worker_restarted", none)
        out = {}
        for i, m in enumerate(self.m):
            at = f"{where}, env {i}"
            if not mask[i]:
                assert not (resumed[i] or restarted[i]), f"{at}: flagged, not reset: {infos}"
                np.testing.assert_array_equal(obs[i], m.obs, f"{at}: moved, not reset")
                continue
            if seeds[i] is not None:
                m.base = int(seeds[i])
            if restarted[i]:
                out[i] = ("restarted", infos["worker_restart_reason"][i])
            elif resumed[i]:
                out[i] = ("resumed", infos["worker_resumed_reason"][i])
            else:
                out[i] = ("ok", "")
            if i in replaced and not resumed[i] and seeds[i] is None:
                # A new process reset without a seed: if it took its derived seed, it is
                # mirrored from there; else its RNG came from entropy: unsynced.
                m.pend(derive_seed(m.base, i, replaced[i]), "failure")
                if not np.array_equal(obs[i], SoakEnv().reset(seed=m.seed)[0]):
                    m.seed, m.synced = None, False
                    self.unsynced += 1
            if m.synced or seeds[i] is not None or m.seed is not None:
                want = m.reset(seeds[i])
                np.testing.assert_array_equal(obs[i], want, f"{at}: obs differ from the "
                                              f"reference reset ({out[i][0]})")
            else:
                assert obs[i][1] == 0 and obs[i][2] == 0, f"{at} (unsynced): not a reset"
                m.due, m.seed, m.own, m.logged = False, None, False, True
            m.obs = obs[i].copy()
        return out
