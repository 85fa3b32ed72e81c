"""The soak's env: real faults in every phase of a worker's life, not only in its steps.

A fault is a command file ``<command_dir>/env<i>.<phase>`` holding one fault kind; the env
reads and deletes it when it reaches that phase, so it fires once, in whichever process
gets there first:

    init    the constructor (planted with a failure: it hits the replacement's build)
    cmd     a step (CounterEnv's own, tests/faults.py)
    reset   reset(), before any state changes: a reset that raises leaves the episode as it was
    close   close()

A call carries its fault in its arguments instead: ``env.call("soak_fault", i, kind)``.
"""

from __future__ import annotations

import os

from faults import CounterEnv, do_fault


class InjectedError(Exception):
    """An exception type of the env's own, which a call must propagate as it is."""


def fire(kind: str) -> None:
    """do_fault, plus the exception types the soak expects back from reset() and call()."""
    if kind == "valueerror":
        raise ValueError("injected fault: ValueError in reset")
    if kind == "own":
        raise InjectedError("injected fault: the env's own exception in a call")
    do_fault(kind)


def plant(command_dir: str, index: int, phase: str, kind: str) -> None:
    """Write the command file whole (a rename), so no env ever reads it half written."""
    path = os.path.join(command_dir, f"env{index}.{phase}")
    with open(path + ".tmp", "w") as f:
        f.write(kind)
    os.replace(path + ".tmp", path)


class SoakEnv(CounterEnv):
    """CounterEnv that also faults in its constructor, reset(), close() and a call."""

    def __init__(self, command_dir: str | None = None, index: int = 0):
        super().__init__(command_dir, index)
        self._fire("init")

    def reset(self, *, seed=None, options=None):
        self._fire("reset")
        return super().reset(seed=seed, options=options)

    def close(self):
        self._fire("close")
        super().close()

    def soak_fault(self, index: int, kind: str) -> int:
        if index == self.index and kind != "none":
            fire(kind)
        return self.index

    def _fire(self, phase: str) -> None:
        if not self.command_dir:
            return
        path = os.path.join(self.command_dir, f"env{self.index}.{phase}")
        try:
            with open(path) as f:
                kind = f.read().strip()
            os.unlink(path)
        except FileNotFoundError:
            return
        fire(kind)
