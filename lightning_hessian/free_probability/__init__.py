"""Free-probability prediction of the input-output Jacobian spectrum (Chhaibi, Daouda, Kahn, NeurIPS 2022).

Public API: :class:`JacobianLaw` (the predicted law of :math:`J^T J`), :func:`jacobian_eigenvalues` and
:func:`law_distance` (the measured spectrum beside it), :func:`jacobian_report` (everything a callback logs), and the
building blocks in :mod:`.transforms`, :mod:`.activations` and :mod:`.lilypads`. Pure numpy/scipy/torch, no Lightning.
"""

from lightning_hessian.free_probability.activations import ACTIVATIONS
from lightning_hessian.free_probability.law import JacobianLaw, SpectrumGrid, UncertifiedPointWarning
from lightning_hessian.free_probability.lilypads import LilypadResult, kantorovich, solve
from lightning_hessian.free_probability.measured import (
    DEFAULT_QUANTILES,
    JacobianReport,
    MeasuredSpectrum,
    jacobian_eigenvalues,
    jacobian_report,
    law_distance,
)
from lightning_hessian.free_probability.modules import UnsupportedArchitectureError

__all__ = [
    # prediction
    "ACTIVATIONS",
    "JacobianLaw",
    "SpectrumGrid",
    # measurement and the one-call report
    "DEFAULT_QUANTILES",
    "JacobianReport",
    "MeasuredSpectrum",
    "jacobian_eigenvalues",
    "jacobian_report",
    "law_distance",
    # solver
    "LilypadResult",
    "kantorovich",
    "solve",
    # errors and warnings
    "UncertifiedPointWarning",
    "UnsupportedArchitectureError",
]
