"""Build of fastvec's C and Cython extensions.

Plain C lives in csrc/ (no Python.h); each .pyx is a thin wrapper that checks
arguments with the GIL held and calls the C code inside ``with nogil``.
Set FASTVEC_DEBUG=1 to build with bounds checks and assertions on.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTVEC_DEBUG") == "1"

# Compiler directives live here and only here.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
}
CFLAGS = ["-O0", "-g"] if DEBUG else ["-O3"]
CFLAGS += ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wno-unused-function"]


def ext(name, pyx, *c_sources):
    return Extension(
        name,
        sources=[pyx, *c_sources],
        include_dirs=["csrc"],
        extra_compile_args=CFLAGS,
        libraries=["pthread"],
        undef_macros=["NDEBUG"] if DEBUG else [],
    )


EXTENSIONS = [
    ext("fastvec._ring", "fastvec/_ring.pyx", "csrc/ring.c"),
    ext("fastvec._raster", "fastvec/_raster.pyx", "csrc/raster.c"),
    ext("fastvec._stepper", "fastvec/_stepper.pyx"),
    ext("fastvec._parent", "fastvec/_parent.pyx", "csrc/actions.c"),
    ext("fastvec.envs._fireobs", "fastvec/envs/_fireobs.pyx", "csrc/fireobs.c"),
]

setup(ext_modules=cythonize(EXTENSIONS, compiler_directives=DIRECTIVES))
