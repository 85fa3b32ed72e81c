# Type stub of the compiled module fastvec._stepper (fastvec/_stepper.pyx): type checkers cannot read
# Cython. It declares the module and leaves its contents untyped (Any); it is internal, and
# the public API (fastvec/__init__.py) is typed in the Python modules.
from typing import Any

def __getattr__(name: str) -> Any: ...
