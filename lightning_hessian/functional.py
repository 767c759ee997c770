"""Stable one-call functions on a plain ``nn.Module`` (no Trainer needed).

They build a :class:`~lightning_hessian.operators.HessianOperator` on the given batches and run a solver of
:mod:`lightning_hessian.lanczos` on it. Under an initialised ``torch.distributed`` process group every rank passes its
own batches and receives the same result (the Hessian of the union of all ranks' samples).
"""

from __future__ import annotations

import operator as _operator
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_hessian.lanczos import EigenResult, lanczos
from lightning_hessian.operators import HessianOperator, LossFn

__all__ = ["ConvergenceWarning", "hessian_eigenvalues"]


class ConvergenceWarning(RuntimeWarning):
    """An iterative solver stopped on its budget before meeting its tolerance."""


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    k: int = 20,
    *,
    dtype: torch.dtype | None = None,
    tol: float = 1e-6,
    max_hvps: int | None = None,
    which: str = "largest",
    seed: int = 0,
    cache_graph: bool | Literal["auto"] = "auto",
    return_result: bool = False,
) -> Tensor | EigenResult:
    r"""The ``k`` largest (algebraic) eigenvalues of the probe-loss Hessian, in descending order.

    The probe loss is :math:`L = \sum_b n_b \ell_b / \sum_b n_b` over ``batches`` (``loss_fn(model, batch)`` returns
    the mean loss :math:`\ell_b` of a batch, :math:`n_b` is its sample count), see
    :class:`~lightning_hessian.operators.HessianOperator`. Eigenvalues come from thick-restart Lanczos with full
    reorthogonalisation (:func:`~lightning_hessian.lanczos.lanczos`).

    Args:
        model: The network (left unchanged: mode, buffers and ``.grad`` are restored/untouched).
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: This rank's probe batches, on the model's device.
        k: Number of eigenvalues; clamped (with a warning) to the number of trainable parameters.
        dtype: ``torch.float32`` or ``torch.float64``; None uses the parameters' dtype.
        tol: Relative Ritz residual tolerance of the solver.
        max_hvps: Budget of Hessian-vector products, at least ``min(k, num_params)``; None uses the solver's
            default.
        which: ``"largest"`` (descending) or ``"smallest"`` (the bottom-k, ascending).
        seed: Seed of the Lanczos start vector (identical on every rank).
        cache_graph: ``"auto"`` (cache all batches' gradient graphs between products when their measured size fits
            in memory), ``True`` or ``False``; see :class:`~lightning_hessian.operators.HessianOperator`.
        return_result: Return the solver's :class:`~lightning_hessian.lanczos.EigenResult` (eigenvalues, residual
            norms, products spent, convergence flag) instead of the eigenvalues alone.

    ``k``, ``max_hvps`` and ``seed`` accept any integer type (Python or NumPy integers, integral floats).

    Returns:
        A tensor of exactly ``min(k, num_params)`` eigenvalues in the products' ``dtype``, on the model's device;
        with ``return_result=True`` the :class:`~lightning_hessian.lanczos.EigenResult` of the solver.

    Raises:
        ValueError: For ``k < 1``, ``max_hvps < min(k, num_params)``, a non-integer ``seed`` or invalid operator
            arguments.
        ProbeProductError: If a product failed (on any rank under ``torch.distributed``).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1, bias=False).double()
        >>> x = torch.eye(3, dtype=torch.float64)
        >>> loss = lambda m, b: 0.5 * m(b).pow(2).sum(dim=1).mean()
        >>> hessian_eigenvalues(model, loss, [x], k=2)  # H = xᵀx / 3
        tensor([0.3333, 0.3333], dtype=torch.float64)
    """
    k = _integer("k", k, minimum=1, allowed="a positive integer")
    seed = _integer("seed", seed, minimum=None, allowed="an integer")
    if max_hvps is not None:
        max_hvps = _integer("max_hvps", max_hvps, minimum=1, allowed="a positive integer or None")
    operator = HessianOperator(model, loss_fn, batches, dtype=dtype, cache_graph=cache_graph)
    if k > operator.num_params:
        warnings.warn(
            f"k = {k} exceeds the number of trainable parameters ({operator.num_params}); "
            f"computing all {operator.num_params} eigenvalues instead",
            UserWarning,
            stacklevel=2,
        )
        k = operator.num_params
    if max_hvps is not None and max_hvps < k:
        raise ValueError(
            f"max_hvps = {max_hvps} is smaller than the {k} eigenvalues wanted: a Krylov space of m products holds "
            f"at most m Ritz values; pass max_hvps >= {k} (or None)"
        )
    result = lanczos(
        operator.matvec,
        operator.num_params,
        int(k),
        which=which,
        tol=tol,
        max_matvecs=max_hvps,
        seed=seed,
        dtype=operator.dtype,
        device=operator.device,
    )
    if not result.converged:
        warnings.warn(
            f"Lanczos stopped after {result.num_matvecs} Hessian-vector products before reaching tol={tol} "
            f"(largest relative residual {float(result.residual_norms.max()):.2e}); raise max_hvps",
            ConvergenceWarning,
            stacklevel=2,
        )
    if result.eigenvalues.numel() != k:
        raise RuntimeError(f"the solver returned {result.eigenvalues.numel()} eigenvalues instead of {k}")
    if return_result:
        return result
    return result.eigenvalues.to(device=operator.device, dtype=operator.dtype)


def _integer(name: str, value: Any, *, minimum: int | None, allowed: str) -> int:
    """``value`` as a Python int (ints, NumPy integers, integral floats), else a ValueError naming ``name``."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    try:
        number = _operator.index(value)
    except TypeError:
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be {allowed}, got {value!r}") from None
        if number != value:
            raise ValueError(f"{name} must be {allowed}, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(number)
