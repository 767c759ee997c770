"""lightning-hessian: watch the curvature of a network while it trains.

The math modules (operators, solvers, power law, free probability, rank, embedding) import no Lightning; the
callback is imported lazily so that ``import lightning_hessian`` stays cheap for users of the functional API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# embedding principle (Zhang et al. 2021)
from lightning_hessian.embedding import (
    DEFAULT_ORIENTATION_TOL,
    DEFAULT_OUTPUT_TOL,
    CondensationReport,
    LayerCondensation,
    LayerOrientation,
    UnsupportedArchitectureError,
    condensation,
    condensation_report,
    merge_condensed,
    mlp_structure,
    orientation_condensation,
    predicted_extra_zero_eigenvalues,
    split_neuron,
)

# functional API on a plain nn.Module
from lightning_hessian.functional import ConvergenceWarning, hessian_eigenvalues

# spectral solvers
from lightning_hessian.lanczos import (
    EigenResult,
    SpectralQuadrature,
    TraceEstimate,
    hutchinson_trace,
    lanczos,
    stochastic_lanczos_quadrature,
)

# linear operators
from lightning_hessian.operators import HessianOperator

# power-law statistics (Xie et al. 2022)
from lightning_hessian.powerlaw import PowerLawFit, fit_power_law, ks_critical_value, spectral_gap

# Hessian rank (Singh, Bachmann & Hofmann 2021)
from lightning_hessian.rank import (
    HessianRank,
    NearZeroEstimate,
    dense_hessian_parts,
    linear_hessian_rank,
    near_zero_fraction,
    numerical_hessian_rank,
)

if TYPE_CHECKING:  # pragma: no cover
    from lightning_hessian.callback import HessianSpectrum

__version__ = "0.1.0"

__all__ = [
    # Lightning callback
    "HessianSpectrum",
    # functional API
    "ConvergenceWarning",
    "hessian_eigenvalues",
    # linear operators
    "HessianOperator",
    # spectral solvers
    "EigenResult",
    "SpectralQuadrature",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos",
    "stochastic_lanczos_quadrature",
    # power law
    "PowerLawFit",
    "fit_power_law",
    "ks_critical_value",
    "spectral_gap",
    # Hessian rank
    "HessianRank",
    "NearZeroEstimate",
    "dense_hessian_parts",
    "linear_hessian_rank",
    "near_zero_fraction",
    "numerical_hessian_rank",
    # embedding principle
    "DEFAULT_ORIENTATION_TOL",
    "DEFAULT_OUTPUT_TOL",
    "CondensationReport",
    "LayerCondensation",
    "LayerOrientation",
    "UnsupportedArchitectureError",
    "condensation",
    "condensation_report",
    "merge_condensed",
    "mlp_structure",
    "orientation_condensation",
    "predicted_extra_zero_eigenvalues",
    "split_neuron",
]


def __getattr__(name: str) -> Any:
    if name == "HessianSpectrum":
        from lightning_hessian.callback import HessianSpectrum

        return HessianSpectrum
    raise AttributeError(f"module 'lightning_hessian' has no attribute {name!r}")
