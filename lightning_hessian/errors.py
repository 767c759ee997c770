"""Exceptions and warnings shared by the analyses of lightning-hessian."""

from __future__ import annotations

__all__ = ["ProbeProductError", "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(ValueError):
    """The module is not an MLP (``nn.Linear`` layers with element-wise activations) that an analysis can model.

    Raised by the embedding-principle and free-probability analyses; the callback catches it, warns once and skips
    that analysis.
    """


class ProbeProductError(RuntimeError):
    """A collective step of :class:`~lightning_hessian.operators.HessianOperator` failed on at least one rank.

    Raised on every rank at once (the failure status travels with the all-reduced buffer), so that no rank is left
    waiting in a collective. The message names the step (sample count, loss, gradient, product number) and how many
    ranks raised or produced non-finite values; where the failure happened on this rank the original exception is
    chained as ``__cause__``, otherwise another rank is the cause.
    """
