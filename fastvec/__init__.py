"""fastvec: a crash-tolerant gymnasium VectorEnv over POSIX shared-memory rings."""

import gymnasium as _gym

try:
    from fastvec import _raster, _ring  # noqa: F401  (compiled; there is no Python fallback)
except ImportError as _exc:  # pragma: no cover - depends on how fastvec was installed
    import os as _os

    raise ImportError(
        f"fastvec's compiled extensions are missing from {_os.path.dirname(__file__)}. This "
        "is the source tree: run from another directory after `pip install .`, or build in "
        "place with `python setup.py build_ext --inplace`.") from _exc

from fastvec.errors import (ActionBatchTypeError, AlreadyPendingCallError, ClosedEnvError,
                            EnvSpacesError, FastVecError,
                            InvalidActionError, NoAsyncCallError, PayloadTooLargeError,
                            RestartBudgetExceeded, SharedMemoryFullError, SpaceMismatchError,
                            UnpicklableInfoError, UnsupportedSpaceError, WaitTimeout,
                            WorkerFailure)
from fastvec.registration import make_vec, vector_entry_point
from fastvec.stats import health_metrics
from fastvec.vector_env import FastVectorEnv

__version__ = "0.1.0"

__all__ = [
    "FastVectorEnv", "make_vec", "vector_entry_point", "health_metrics", "FastVecError",
    "WorkerFailure",
    "ActionBatchTypeError", "EnvSpacesError",
    "RestartBudgetExceeded", "ClosedEnvError", "AlreadyPendingCallError", "NoAsyncCallError",
    "WaitTimeout", "InvalidActionError", "SpaceMismatchError", "UnsupportedSpaceError",
    "PayloadTooLargeError", "SharedMemoryFullError", "UnpicklableInfoError",
]

WILDFIRE_ID = "fastvec/Wildfire-v0"
if WILDFIRE_ID not in _gym.registry:
    _gym.register(WILDFIRE_ID, entry_point="fastvec.envs.wildfire:WildfireEnv",
                  vector_entry_point=vector_entry_point(WILDFIRE_ID))
