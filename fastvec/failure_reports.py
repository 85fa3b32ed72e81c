"""How a worker's failure reaches the user: the exception raised, the infos that flag the
envs, the ``on_failure`` policy, and the log line (seeds, restart count, last actions)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fastvec.contract import disabled_info, restart_info
from fastvec.errors import FastVecError, RemoteTraceback, SpaceMismatchError, WorkerFailure
from fastvec.failures import Failure

if TYPE_CHECKING:  # pragma: no cover
    from fastvec.supervisor import Slot

log = logging.getLogger("fastvec")


def failure_error(slot: Slot, failure: Failure, when: str) -> FastVecError:
    """The exception for ``failure`` of ``slot``'s worker ``when`` (e.g. ``"in step"``),
    the worker's traceback (or the local cause) chained."""
    if failure.reason == "mismatch":
        exc = failure.remote[0] if failure.remote else None
        err: FastVecError = (exc if isinstance(exc, FastVecError)
                             else SpaceMismatchError(str(failure.detail)))
    else:
        err = WorkerFailure(
            f"worker {slot.index} (envs {list(slot.env_indices)}) failed {when}: "
            f"{failure.reason}: {failure.detail}", env_index=slot.env_indices[0],
            env_indices=slot.env_indices, worker_index=slot.index, reason=failure.reason,
            detail=failure.detail, exitcode=failure.exitcode)
    if failure.remote is not None:
        err.__cause__ = RemoteTraceback(failure.remote[1])
    elif failure.cause is not None:
        err.__cause__ = failure.cause
    return err


def raise_user_error(slot: Slot, failure: Failure):
    """The env raised in a reset or call the user made: raise it with its own type,
    the worker's traceback chained (the worker lives on)."""
    exc, tb = failure.remote or (None, failure.detail)
    if isinstance(exc, BaseException):
        raise exc from RemoteTraceback(tb)
    raise failure_error(slot, failure, "in a call")


def raise_if_policy(on_failure: str, restarted: list) -> None:
    """``on_failure="raise"``: raise for the first (slot, failure) whose worker was replaced."""
    if restarted and on_failure == "raise":
        slot, failure = restarted[0]
        raise failure_error(slot, failure, "(the worker was replaced)")


def restart_flag(failure: Failure) -> dict:
    """The info of an env whose worker was replaced after ``failure``."""
    return restart_info(f"{failure.reason}: {failure.detail}")


def disabled_flag(failure: Failure) -> dict:
    """The info of an env out of play since ``failure``."""
    return disabled_info(f"{failure.reason}: {failure.detail}")


def log_failure(slot: Slot, failure: Failure, seeds: list, restart: int, recent: dict) -> None:
    """One warning per failure: the worker, its envs' seeds, the restart count and each
    env's last actions (``recent``: env index -> actions, oldest first)."""
    log.warning(
        "worker %d (envs %s, generation %d) failed: %s: %s; seeds %s; restart %d; "
        "last actions (oldest first) %s%s", slot.index, list(slot.env_indices),
        slot.generation, failure.reason, failure.detail, seeds, restart, recent,
        f"\nremote traceback:\n{failure.remote[1]}" if failure.remote else "")
