"""Exceptions and warnings shared by the analyses of lightning-hessian."""

from __future__ import annotations

from lightning_hessian.distributed import AgreedFailure

__all__ = ["ProbeProductError", "UnsupportedArchitectureError"]


class UnsupportedArchitectureError(ValueError):
    """The module is not an MLP (``nn.Linear`` layers with element-wise activations) that an analysis can model.

    Raised by the embedding-principle and free-probability analyses; the callback catches it, warns once and skips
    that analysis.
    """


class ProbeProductError(AgreedFailure):
    """A collective step of :class:`~lightning_hessian.operators.HessianOperator` failed on at least one rank.

    Raised on every rank at once (a status all-reduce precedes each payload, see :mod:`lightning_hessian.distributed`),
    so that no rank is left waiting in a collective; it is an :class:`~lightning_hessian.distributed.AgreedFailure`,
    so a probe stage treats it as already agreed. The message names the step (sample count, loss, gradient, product
    number); where the failure happened on this rank the original exception is chained as ``__cause__`` (and kept as
    ``local``), otherwise another rank is the cause.
    """
