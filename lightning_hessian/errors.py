"""Exceptions and warnings shared by the analyses of lightning-hessian."""

from __future__ import annotations

__all__ = ["UnsupportedArchitectureError"]


class UnsupportedArchitectureError(ValueError):
    """The module is not an MLP (``nn.Linear`` layers with element-wise activations) that an analysis can model.

    Raised by the embedding-principle and free-probability analyses; the callback catches it, warns once and skips
    that analysis.
    """
