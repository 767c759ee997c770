"""Free-probability prediction of the input-output Jacobian spectrum (Chhaibi, Daouda, Kahn, NeurIPS 2022).

Public API: :class:`JacobianLaw` (the predicted law of :math:`J^T J`), :func:`jacobian_eigenvalues` and
:func:`law_distance` (the measured spectrum beside it), :func:`jacobian_report` (everything a callback logs), and the
building blocks in :mod:`.transforms`, :mod:`.activations` and :mod:`.lilypads`.
"""

from lightning_hessian.free_probability.law import JacobianLaw, SpectrumGrid, UncertifiedPointWarning
from lightning_hessian.free_probability.lilypads import LilypadResult, kantorovich, solve
from lightning_hessian.free_probability.modules import UnsupportedArchitectureError

__all__ = [
    "JacobianLaw",
    "LilypadResult",
    "SpectrumGrid",
    "UncertifiedPointWarning",
    "UnsupportedArchitectureError",
    "kantorovich",
    "solve",
]
