"""The one error hierarchy of fastvec: everything raised on purpose derives from FastVecError.

Where gymnasium's vector envs raise a specific class, the fastvec class also derives from
it, so code written against ``AsyncVectorEnv`` keeps catching what it caught.
"""

from __future__ import annotations

import multiprocessing

from gymnasium import error as gym_error


class FastVecError(Exception):
    """Base class of every error fastvec raises on purpose."""


class ClosedEnvError(FastVecError, gym_error.ClosedEnvironmentError):
    """The vector env was closed (or broke for good) and cannot take this call."""


class AlreadyPendingCallError(FastVecError, gym_error.AlreadyPendingCallError):
    """An ``*_async`` call was made while another call is still pending."""

    def __init__(self, message: str, name: str):
        super().__init__(message, name)


class NoAsyncCallError(FastVecError, gym_error.NoAsyncCallError):
    """A ``*_wait`` call was made without the matching ``*_async`` call."""

    def __init__(self, message: str, name: str):
        super().__init__(message, name)


class WaitTimeout(FastVecError, multiprocessing.TimeoutError, TimeoutError):
    """A ``*_wait(timeout)`` ran out of time; the call stays pending and can be waited on again."""


class InvalidActionError(FastVecError, ValueError):
    """The batch of actions does not belong to the action space; nothing was sent."""


class ActionBatchTypeError(InvalidActionError, TypeError):
    """A single action was passed where a batch (one action per env) is needed."""


class EnvSpacesError(FastVecError, RuntimeError):
    """The envs' spaces cannot be batched together (as gymnasium, a ``RuntimeError``)."""


class SpaceMismatchError(FastVecError, ValueError):
    """An env returned data that does not fit its declared space."""


class UnsupportedSpaceError(FastVecError, TypeError):
    """Something that is not a gymnasium Space was given as a space."""


class UnpicklableInfoError(FastVecError, TypeError):
    """An env returned an info value that cannot be pickled to cross the process boundary."""


class PayloadTooLargeError(FastVecError):
    """A pickled payload does not fit the side buffer and the buffer could not grow."""


class RingError(FastVecError):
    """A control block in shared memory is not what it should be (corrupt or foreign)."""


class StatsLayoutError(FastVecError):
    """A shared-memory stats header this fastvec cannot read: another layout version, no
    fastvec magic, or inconsistent sizes (``fastvec top`` and ``fastvec export`` refuse it)."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker; chained as ``__cause__``."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class WorkerFailure(FastVecError):
    """A worker died, froze, hung in a step or raised, and the policy says raise.

    Attributes:
        env_index: the first env index the failed worker hosted (``env_indices`` has all).
        worker_index: the worker slot.
        reason: ``"died"``, ``"frozen"``, ``"hung"``, ``"exception"``, ``"start"`` (a
            replacement could not be started or could not build its envs) or ``"budget"``.
        detail: a human-readable description (signal name, exit code, exception text).
        exitcode: the process exit code (negative: killed by that signal), if it exited.
    """

    def __init__(self, message: str, *, env_index: int = -1, env_indices: tuple[int, ...] = (),
                 worker_index: int = -1, reason: str = "", detail: str = "",
                 exitcode: int | None = None):
        super().__init__(message)
        self.env_index = env_index
        self.env_indices = env_indices
        self.worker_index = worker_index
        self.reason = reason
        self.detail = detail
        self.exitcode = exitcode


class RestartBudgetExceeded(WorkerFailure):
    """Too many restarts of one worker slot within the budget window: likely a deterministic bug."""


class SharedMemoryFullError(FastVecError, OSError):
    """A shared-memory segment or semaphore could not be created: /dev/shm is full (or
    refused). ``errno`` is the operating system's; the message says how much was needed,
    how much was free, and how to make room."""
