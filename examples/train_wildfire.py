"""PPO (Stable-Baselines3) on fastvec/Wildfire-v0, as a long training job would run it.

    python examples/train_wildfire.py --steps 50000 --out runs/plain
    python examples/train_wildfire.py --steps 50000 --out runs/chaos --chaos 5
    python examples/train_wildfire.py --steps 50000 --out runs/plain --resume   # after a kill

- fastvec's health goes to TensorBoard beside the losses (``fastvec.sb3.HealthCallback``):
  ``tensorboard --logdir runs``.
- A checkpoint every ``--save-every`` vector steps writes the model and the env state side by
  side (``fastvec.sb3.EnvCheckpointCallback``); ``--resume`` loads the latest pair and goes
  on: every fire continues where it was (``fastvec.sb3.load_env_state``).
- ``--chaos S`` SIGKILLs a random worker every S seconds from a thread, as a flaky cluster
  would: fastvec replays the lost episodes and training goes on
  (``fastvec/resumed_episodes`` in TensorBoard). The learning curves with and without chaos
  are in the README's "Training under faults" section (``--plot`` draws them).

Needs the extras ``fire`` and ``sb3``: ``pip install ".[fire,sb3]"``.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import signal
import threading
import time

import gymnasium as gym
import numpy as np


class WildfireFn:
    """The env_fn (a class, not a closure: it pickles for any start method)."""

    def __init__(self, size: int, max_steps: int):
        self.size, self.max_steps = size, max_steps

    def __call__(self) -> gym.Env:
        return gym.make("fastvec/Wildfire-v0", size=self.size, max_steps=self.max_steps)


class Chaos(threading.Thread):
    """SIGKILLs a random worker of ``venv`` every ``every`` seconds until stopped."""

    def __init__(self, venv, every: float, seed: int = 0):
        super().__init__(daemon=True)
        self.venv, self.every, self.rng = venv, every, random.Random(seed)
        self.stop, self.kills = threading.Event(), 0

    def run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                pid = self.rng.choice([h["pid"] for h in self.venv.health() if h["pid"] and not h["spare"]])
                os.kill(pid, signal.SIGKILL)
                self.kills += 1
            except (ProcessLookupError, RuntimeError, ValueError):
                pass  # a worker being replaced, or the env closing


def latest_checkpoint(out: str) -> tuple[str, str] | None:
    steps = [int(m.group(1)) for p in glob.glob(os.path.join(out, "ppo_*_steps.zip"))
             if (m := re.search(r"ppo_(\d+)_steps\.zip$", p))]
    for n in sorted(steps, reverse=True):
        model, env = (os.path.join(out, f"ppo_{n}_steps.zip"),
                      os.path.join(out, f"ppo_fastvec_env_{n}_steps.pkl"))
        if os.path.exists(env):
            return model, env
    return None


def train(args) -> None:
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecMonitor

    from fastvec.sb3 import EnvCheckpointCallback, HealthCallback, SB3VecEnv, load_env_state

    torch.set_num_threads(1)
    venv = SB3VecEnv([WildfireFn(args.size, args.max_steps)] * args.envs,
                     envs_per_worker=args.envs_per_worker, max_restarts=10_000)
    env = VecMonitor(venv, os.path.join(args.out, "monitor.csv"))
    save = EnvCheckpointCallback(save_freq=args.save_every, save_path=args.out,
                                 name_prefix="ppo")
    callbacks = [save, HealthCallback(every=args.health_every)]
    found = latest_checkpoint(args.out) if args.resume else None
    if found:
        model = PPO.load(found[0], env=env, device="cpu")
        load_env_state(model, found[1])
        print(f"resumed from {found[0]} ({model.num_timesteps} steps)")
    else:
        venv.seed(args.seed)
        try:
            import tensorboard  # noqa: F401  (with the sb3 extra)
            tb = os.path.join(args.out, "tb")
        except ImportError:
            print("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
            tb = None
        model = PPO("MlpPolicy", env, n_steps=args.n_steps, batch_size=args.n_steps,
                    n_epochs=4, seed=args.seed, device="cpu", verbose=0, tensorboard_log=tb,
                    policy_kwargs={"net_arch": [64, 64]})
    chaos = Chaos(venv, args.chaos, args.seed) if args.chaos else None
    if chaos:
        chaos.start()
    started = time.monotonic()
    try:
        model.learn(total_timesteps=args.steps, callback=callbacks,
                    reset_num_timesteps=not found, tb_log_name="ppo")
    finally:
        if chaos:
            chaos.stop.set()
            chaos.join(5)
        health = venv.health()
        venv.close()
    print(f"{model.num_timesteps} steps in {time.monotonic() - started:.0f} s; "
          f"{chaos.kills if chaos else 0} workers killed; "
          f"{sum(h['restarts'] for h in health)} restarts, "
          f"{sum(h['resumed'] for h in health)} episodes resumed, "
          f"{sum(sum(h['not_resumed'].values()) for h in health)} not resumed")


def plot(runs: list[str], path: str) -> None:
    """Mean episode return over env-steps (monitor.csv of each run), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n, run in enumerate(runs):
        data = np.genfromtxt(os.path.join(run, "monitor.csv"), delimiter=",", skip_header=2)
        returns, lengths = data[:, 0], data[:, 1]
        steps = np.cumsum(lengths)
        window = max(1, len(returns) // 20)
        smooth = np.convolve(returns, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, label=os.path.basename(run.rstrip("/")),
                lw=4 if n == 0 else 1.2, alpha=0.45 if n == 0 else 1.0)  # equal runs show
    ax.set_xlabel("env steps")
    ax.set_ylabel(f"episode return (moving mean of {window})")
    ax.set_title("PPO on fastvec/Wildfire-v0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50_000,
                   help="env steps to train for (with --resume: more steps, from the checkpoint)")
    p.add_argument("--out", default="runs/wildfire", help="checkpoints, TensorBoard, monitor")
    p.add_argument("--envs", type=int, default=4)
    p.add_argument("--envs-per-worker", type=int, default=1)
    p.add_argument("--size", type=int, default=24, help="raster size of the landscape")
    p.add_argument("--max-steps", type=int, default=20, help="steps per episode at most")
    p.add_argument("--n-steps", type=int, default=128, help="PPO rollout length per env")
    p.add_argument("--save-every", type=int, default=1000, help="vector steps per checkpoint")
    p.add_argument("--health-every", type=int, default=100)
    p.add_argument("--chaos", type=float, default=0.0, metavar="S",
                   help="SIGKILL a random worker every S seconds (0: never)")
    p.add_argument("--resume", action="store_true", help="go on from the latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", nargs="+", metavar="RUN", help="plot these runs' curves and exit")
    p.add_argument("--plot-to", default="docs/train_wildfire.png")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot, args.plot_to)
        return 0
    os.makedirs(args.out, exist_ok=True)
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
