"""Validated configuration of :class:`~lightning_hessian.callback.HessianSpectrum`.

:class:`ProbeConfig` holds every argument of the callback after validation: numbers are normalised to Python types
(numpy scalars are accepted wherever Python ones are), and every invalid value raises :class:`HessianConfigError`
naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_hessian.powerlaw import KS_CRITICAL_CONSTANTS, ks_critical_value

__all__ = ["MAX_TOP_K_FRACTION", "RANDOM_INIT_KS_DISTANCE", "HessianConfigError", "ProbeConfig", "min_powerful_k"]

#: Smallest KS distance of a random-init network seen in the evidence (digits FCN, K = 200: 0.103; Xie et al.'s
#: random-init LeNets at K = 1000: 0.066-0.097). The test has power only if d_c(K) = c(alpha)/sqrt(K) is below it.
RANDOM_INIT_KS_DISTANCE = 0.10
#: Above this fraction of all parameters the top-K leaves the power-law top of the spectrum (digits: K = 16% failed).
MAX_TOP_K_FRACTION = 0.10


class HessianConfigError(MisconfigurationException, ValueError):
    """Invalid ``HessianSpectrum`` configuration (a ``MisconfigurationException`` and a ``ValueError``)."""


def _integer(name: str, value: Any, minimum: int | None, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
    ):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise HessianConfigError(f"{name} must be {allowed}{' or None' if optional else ''}, got {value!r}.")
    return int(value)


def _real(name: str, value: Any, upper: float = math.inf, optional: bool = False) -> float | None:
    """A real number in the open interval ``(0, upper)``."""
    if value is None and optional:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not 0 < float(value) < upper:
        allowed = "a positive number" if upper == math.inf else f"a number in (0, {upper:g})"
        raise HessianConfigError(f"{name} must be {allowed}{' or None' if optional else ''}, got {value!r}.")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise HessianConfigError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    if value not in allowed:
        raise HessianConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
    return value


@dataclass
class ProbeConfig:
    """Every argument of ``HessianSpectrum``, validated and normalised (see the callback for their meaning)."""

    top_k: int = 200
    every_n_epochs: int = 1
    probe_samples: int = 512
    seed: int = 0
    dtype: Literal["float32", "float64"] | None = None
    when: Literal["train_epoch_end", "validation_epoch_end"] = "train_epoch_end"
    density: bool = True
    trace: bool = True
    ks_level: float = 0.05
    prefix: str = "hessian"
    max_hvps: int | None = None
    max_seconds: float | None = None
    strict: bool = False
    loss_fn: Callable[..., Any] | None = None
    powerlaw_every_n_epochs: int | None = 10
    num_tracked: int = 8
    tol: float = 1e-6
    trace_samples: int = 24
    density_probes: int = 4
    density_steps: int = 64
    probe_batch_size: int | None = None
    per_layer: bool = False
    nan_on_failure: bool = True
    tensorboard: bool = True
    max_overhead: float | None = 0.2
    jacobian: bool = True
    embedding: bool = True
    near_zero: bool = True
    near_zero_threshold: float = 1e-3
    condensation_tol: float = 1e-3
    cache_graph: bool | Literal["auto"] = "auto"
    verbose: bool = False
    probe_at_init: bool = True
    batch_size_fn: Callable[..., Any] | None = None
    max_basis_bytes: int | None = None
    block_size: int | None = None
    cheap_tol: float | None = None
    checkpoint_subspace: bool = False

    def __post_init__(self) -> None:
        for name in ("top_k", "every_n_epochs", "probe_samples", "num_tracked", "trace_samples", "density_probes"):
            minimum = {"top_k": 3, "num_tracked": 2}.get(name, 1)
            setattr(self, name, _integer(name, getattr(self, name), minimum))
        self.seed = _integer("seed", self.seed, None)
        self.density_steps = _integer("density_steps", self.density_steps, 2)
        for name in ("max_hvps", "probe_batch_size", "powerlaw_every_n_epochs", "max_basis_bytes", "block_size"):
            setattr(self, name, _integer(name, getattr(self, name), 1, optional=True))
        self.dtype = _choice("dtype", self.dtype, (None, "float32", "float64"))
        self.when = _choice("when", self.when, ("train_epoch_end", "validation_epoch_end"))
        for f in fields(self):
            if f.type == "bool":
                setattr(self, f.name, _boolean(f.name, getattr(self, f.name)))
        self.ks_level = self._ks_level(self.ks_level)
        if not isinstance(self.prefix, str) or not self.prefix.strip("/") or self.prefix != self.prefix.strip("/ "):
            raise HessianConfigError(
                f"prefix must be a non-empty string without leading/trailing '/', got {self.prefix!r}."
            )
        self.max_seconds = _real("max_seconds", self.max_seconds, optional=True)
        self.max_overhead = _real("max_overhead", self.max_overhead, optional=True)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise HessianConfigError(
                f"loss_fn must be callable(pl_module, batch) -> Tensor or None, got {self.loss_fn!r}."
            )
        if self.batch_size_fn is not None and not callable(self.batch_size_fn):
            raise HessianConfigError(
                f"batch_size_fn must be callable(batch) -> int or None, got {self.batch_size_fn!r}."
            )
        if self.powerlaw_every_n_epochs is not None and self.powerlaw_every_n_epochs % self.every_n_epochs:
            raise HessianConfigError(
                f"powerlaw_every_n_epochs={self.powerlaw_every_n_epochs} must be a multiple of "
                f"every_n_epochs={self.every_n_epochs} (or None)."
            )
        self.tol = _real("tol", self.tol, upper=1.0)
        self.cheap_tol = _real("cheap_tol", self.cheap_tol, upper=1.0, optional=True)
        if not isinstance(self.cache_graph, (bool, np.bool_)) and not (
            isinstance(self.cache_graph, str) and self.cache_graph == "auto"
        ):
            raise HessianConfigError(f"cache_graph must be True, False or 'auto', got {self.cache_graph!r}.")
        self.cache_graph = self.cache_graph if self.cache_graph == "auto" else bool(self.cache_graph)
        self.near_zero_threshold = _real("near_zero_threshold", self.near_zero_threshold, upper=1.0)
        self.condensation_tol = _real("condensation_tol", self.condensation_tol, upper=1.0)

    @staticmethod
    def _ks_level(value: Any) -> float:
        allowed = sorted(KS_CRITICAL_CONSTANTS)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise HessianConfigError(f"ks_level must be one of {allowed}, got {value!r}.")
        for level in allowed:
            if math.isclose(float(value), level):
                return float(level)
        raise HessianConfigError(f"ks_level must be one of {allowed}, got {value!r}.")

    @property
    def cheap_tolerance(self) -> float:
        """Residual tolerance of the cheap probe's top-``num_tracked`` solve (``cheap_tol``, else ``tol``)."""
        return self.tol if self.cheap_tol is None else self.cheap_tol

    @property
    def full_every(self) -> int | None:
        """A full probe every this many probes (``None``: never)."""
        if self.powerlaw_every_n_epochs is None:
            return None
        return self.powerlaw_every_n_epochs // self.every_n_epochs

    def low_power_warning(self) -> str | None:
        """The warning for a ``top_k`` whose KS test cannot reject a random-init spectrum, or ``None``."""
        critical = ks_critical_value(self.top_k, self.ks_level)
        if self.powerlaw_every_n_epochs is None or critical < RANDOM_INIT_KS_DISTANCE:
            return None
        return (
            f"HessianSpectrum(top_k={self.top_k}): the KS critical value d_c = {critical:.3f} is above the d_ks ~ "
            f"{RANDOM_INIT_KS_DISTANCE} of a random-init network, so the power-law test cannot tell a trained "
            "spectrum from a random one (on digits, K = 50 and 100 accept random init). "
            f"Use top_k >= {min_powerful_k(self.ks_level)}."
        )


def min_powerful_k(ks_level: float) -> int:
    """Smallest ``K`` whose critical value ``c(ks_level)/sqrt(K)`` is below :data:`RANDOM_INIT_KS_DISTANCE`."""
    k = 3
    while ks_critical_value(k, ks_level) >= RANDOM_INIT_KS_DISTANCE:
        k += 1
    return k
