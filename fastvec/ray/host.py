"""The Ray actor on a node: one FastVectorEnv holding a contiguous share of the envs.

The driver's calls map one to one onto its methods. A reset or step answers with the
episode notes of the node's log (starts, ends, snapshots; usually None), which the driver's
copy of the log applies (fastvec/ray/resume.py). A replacement that lands on the machine of
the actor it replaces first waits for that actor's process to end, so that FastVectorEnv's
start-up sweep removes the shared-memory names it left; a replacement that resumes its
envs' episodes gets them from the driver (:meth:`_NodeHost.resume`).
"""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import ray

from fastvec.vector_env import FastVectorEnv

# Seconds a replacement waits for its predecessor's process to end on the same machine.
PREDECESSOR_WAIT = 10.0


def host_key() -> tuple[str, str]:
    """Identifies one kernel and namespace: pids are comparable only within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return boot, socket.gethostname()


def _pid_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists: a zombie still counts, as it does for
    FastVectorEnv's sweep of stale names (an orphan waits for init to reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class _NodeHost:
    """The Ray actor on a node (its name shows in the process title, ``ray::_NodeHost``)."""

    _env: FastVectorEnv | None = None

    def start(self, env_fns: list, kwargs: dict, predecessor: tuple | None) -> dict:
        if predecessor is not None and predecessor[0] == host_key():
            deadline = time.monotonic() + PREDECESSOR_WAIT
            while not _pid_gone(predecessor[1]) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._env = FastVectorEnv(env_fns, copy=False, **kwargs)
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "host": host_key()}

    def reset(self, seeds, options):
        # copy=False: the observations are views of the ring slot, serialised into the
        # object store when this method returns, before the next call can touch the slot.
        obs, info = self._env.reset(seed=seeds, options=options)
        return obs, info, self._env.take_episode_notes()

    def step(self, actions):
        return (*self._env.step(actions), self._env.take_episode_notes())

    def run(self, actions):
        """A step, through the actor's compiled graph (fastvec/ray/compiled.py); ``None``
        is the graph's first execution, which only shows that it runs."""
        return None if actions is None else self.step(actions)

    def resume(self, state: dict, actions):
        """Replay the lost actor's episodes (``state``: the driver's log of them, in the
        format of ``FastVectorEnv.state_dict``); if every env resumed, send the lost step
        again: ``("resumed", step's answer)``; else ``("fallback", why per env or None)``
        and the driver resets them all as without resume."""
        n = self._env.num_envs
        try:
            _, infos = self._env.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - any reason is a reason not to resume
            why = f"the replacement could not load the episodes: {type(exc).__name__}: {exc}"
            return "fallback", [why] * n
        self._env.take_episode_notes()  # the episodes the driver's log holds already
        resumed = infos.get("_worker_resumed", np.zeros(n, np.bool_))
        if not resumed.all():
            reasons = infos.get("worker_restart_reason", [""] * n)
            return "fallback", [None if resumed[j] else
                                str(reasons[j]).split("not resumed: ", 1)[-1]
                                for j in range(n)]
        return "resumed", self.step(actions)

    def call(self, name, args, kwargs):
        return self._env.call(name, *args, **kwargs)

    def get_attr(self, name):
        return self._env.get_attr(name)

    def set_attr(self, name, values):
        self._env.set_attr(name, values)

    def health(self) -> list[dict]:
        return self._env.health()

    def close(self, timeout, terminate):
        if self._env is not None:
            self._env.close(timeout=timeout, terminate=terminate)
            self._env = None


Host = ray.remote(_NodeHost)
