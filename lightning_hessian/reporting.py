"""Compatibility path: the public names of :mod:`lightning_hessian.callback.reporting` (the Lightning floor)."""

from lightning_hessian.callback.reporting import *  # noqa: F403
from lightning_hessian.callback.reporting import __all__  # noqa: F401
