"""One BLAS / OpenMP thread per process, for a benchmark and every worker it starts.

Each script calls :func:`pin_blas_threads` before it imports numpy (or anything that loads
numpy): OpenBLAS, OpenMP and MKL size their thread pools from these variables when they
load, one thread per core by default, so N worker processes would start N pools of that
size and oversubscribe the cores they are being measured on. The workers inherit the
environment, so one call in the parent covers them.

This used to happen as a side effect of importing the shared helper module; an explicit
call shows where the process's environment changes, and importing a helper no longer does.
"""

from __future__ import annotations

import os
import sys
import warnings

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def pin_blas_threads() -> dict[str, str | None]:
    """Default each of ``THREAD_VARS`` to "1"; returns the values now in force.

    A value already in the environment wins; the results record what was used. Warns when
    it has to set one after numpy was loaded: this process's own pool is sized by then, only
    processes started afterwards get the setting.
    """
    unset = [var for var in THREAD_VARS if var not in os.environ]
    if unset and "numpy" in sys.modules:
        warnings.warn("pin_blas_threads() called after numpy was imported: this process's "
                      "BLAS pool is already sized; call it before importing numpy",
                      RuntimeWarning, stacklevel=2)
    for var in unset:
        os.environ[var] = "1"
    return thread_settings()


def thread_settings() -> dict[str, str | None]:
    return {var: os.environ.get(var) for var in THREAD_VARS}
