"""Compatibility path: the public names of :mod:`lightning_hessian.callback.analyses` (the Lightning floor)."""

from lightning_hessian.callback.analyses import *  # noqa: F403
from lightning_hessian.callback.analyses import __all__  # noqa: F401
