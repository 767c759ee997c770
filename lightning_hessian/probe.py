"""Compatibility path: the public names of :mod:`lightning_hessian.callback.probe` (the Lightning floor)."""

from lightning_hessian.callback.probe import *  # noqa: F403
from lightning_hessian.callback.probe import __all__  # noqa: F401
