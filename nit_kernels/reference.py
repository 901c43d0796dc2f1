"""The reference backend under its historical name: see nit_kernels/backends/reference.py."""
from .backends.reference import *  # noqa: F401,F403
from .backends.reference import __all__  # noqa: F401
