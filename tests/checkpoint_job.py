"""A training job that saves the vector env's state with its "model" and can be killed.

    python checkpoint_job.py OUT reference   steps 0..STEPS-1, results in OUT/reference.npz
    python checkpoint_job.py OUT first       saves OUT/state.pkl after SAVE_AT steps, goes on
                                             (slowly, OUT/progress says where) until killed
    python checkpoint_job.py OUT second      loads OUT/state.pkl into a new vector env and
                                             steps SAVE_AT..STEPS-1, results in OUT/second.npz

Actions depend only on the step number (what a policy restored from its checkpoint would
give), so the second run must continue the reference's trajectories exactly.
"""

from __future__ import annotations

import os
import pickle
import sys
import time

import gymnasium as gym
import numpy as np

from fastvec import FastVectorEnv

STEPS, SAVE_AT, NUM_ENVS = 60, 30, 4


def make():
    return gym.make("CartPole-v1")


def action(t: int) -> np.ndarray:
    return np.random.default_rng(t).integers(0, 2, NUM_ENVS)


def record(results: dict, t: int, out) -> None:
    obs, reward, terminated, truncated, _ = out
    results.setdefault("t", []).append(t)
    for key, value in (("obs", obs), ("reward", reward), ("terminated", terminated),
                       ("truncated", truncated)):
        results.setdefault(key, []).append(np.array(value))


def save(path: str, results: dict) -> None:
    np.savez(path, **{k: np.array(v) for k, v in results.items()})


def main(out: str, phase: str) -> None:
    envs = FastVectorEnv([make] * NUM_ENVS, envs_per_worker=2)
    results: dict = {}
    try:
        if phase == "second":
            with open(os.path.join(out, "state.pkl"), "rb") as f:
                checkpoint = pickle.load(f)
            obs, infos = envs.load_state_dict(checkpoint["envs"])
            assert infos["_worker_resumed"].all(), infos
            np.testing.assert_array_equal(obs, checkpoint["obs"])
            start = checkpoint["step"]
        else:
            obs, _ = envs.reset(seed=[1, 2, 3, 4])
            start = 0
        for t in range(start, STEPS if phase != "first" else 10**9):
            if phase == "first" and t == SAVE_AT:
                tmp = os.path.join(out, "state.tmp")
                with open(tmp, "wb") as f:  # with the model, in a real job
                    pickle.dump({"envs": envs.state_dict(), "step": t, "obs": obs}, f)
                os.replace(tmp, os.path.join(out, "state.pkl"))
            if phase == "first" and t >= SAVE_AT:
                with open(os.path.join(out, "progress"), "w") as f:
                    f.write(str(t))
                time.sleep(0.01)
            result = envs.step(action(t))
            obs = result[0]
            record(results, t, result)
        save(os.path.join(out, f"{phase}.npz"), results)
    finally:
        envs.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
