"""Workload environments for fastvec.

``WildfireEnv`` needs the optional extra (``pip install "fastvec[fire]"``); it is imported
on first use, so ``import fastvec.envs`` works without pyretechnics.
"""

__all__ = ["WildfireEnv"]


def __getattr__(name):
    if name == "WildfireEnv":
        # wildfire.py raises an ImportError that names the extra when pyretechnics is absent.
        from fastvec.envs.wildfire import WildfireEnv

        return WildfireEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
