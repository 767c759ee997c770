r"""Deflated and Hutch++ trace estimators (Meyer, Musco, Musco & Woodruff, SOSA 2021).

For an orthonormal ``V`` (``n x k``) and :math:`P = I - V V^\top`,

.. math::

    \operatorname{tr}(A) = \operatorname{tr}(V^\top A V) + \operatorname{tr}(P A P),

the first term exact from the ``k`` products :math:`AV`, the second estimated by Hutchinson with Rademacher probes
projected by :math:`P`: :math:`\widehat{t} = \frac1S \sum_s (P z_s)^\top A (P z_s)`, unbiased, with variance
:math:`\frac2S(\|PAP\|_F^2 - \sum_i (PAP)_{ii}^2)`: deflating the top eigenvectors removes most of the Frobenius mass
of a Hessian with a power-law top. Without ``V``, Hutch++ builds it as the range of :math:`A S` for a random ``S``.
No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_hessian.block_lanczos import random_block
from lightning_hessian.lanczos import TraceEstimate

__all__ = ["deflated_trace", "hutch_plus_plus"]


def _apply(matvec: Callable[[Tensor], Tensor] | None, matmat, x: Tensor) -> Tensor:
    if matmat is not None:
        return matmat(x.contiguous()).reshape(x.shape)
    return torch.stack([matvec(x[:, i].contiguous()).reshape(-1) for i in range(x.shape[1])], dim=1)


def deflated_trace(
    matvec: Callable[[Tensor], Tensor] | None,
    n: int,
    deflation: Tensor,
    *,
    num_samples: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Callable[[Tensor], Tensor] | None = None,
    ritz_values: Tensor | None = None,
) -> TraceEstimate:
    r"""Trace as :math:`\operatorname{tr}(V^\top A V)` (exact) plus Hutchinson on :math:`(I-VV^\top)A(I-VV^\top)`.

    With ``ritz_values`` the columns of ``V`` must be Ritz vectors of one Rayleigh-Ritz projection (for instance the
    eigenvectors :func:`~lightning_hessian.lanczos.lanczos` returns): then :math:`V^\top A V = \operatorname{diag}
    (\theta)` because the Lanczos residuals are orthogonal to the Krylov space, and the exact part costs no product
    (``num_samples`` products in all instead of ``k + num_samples``).

    Args:
        matvec: ``v -> A v`` (or ``None`` with ``matmat``).
        n: Dimension.
        deflation: ``(n, k)`` basis ``V`` (e.g. Ritz vectors; re-orthonormalised here by QR).
        num_samples: Hutchinson probes of the deflated part, ``>= 1``.
        seed: Seed of the probes.
        dtype: Dtype of the computation.
        device: Device of the probes.
        matmat: Optional block product ``X -> A X``.
        ritz_values: ``(k,)`` Ritz values of the columns of ``deflation`` (see above); ``None`` spends ``k`` products.

    Returns:
        A :class:`~lightning_hessian.lanczos.TraceEstimate`; ``stderr`` is the one of the stochastic part and
        ``num_samples`` counts all products (``k + num_samples``, or ``num_samples`` with ``ritz_values``).

    Raises:
        ValueError: For ``num_samples < 1`` or a ``deflation`` of the wrong shape.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if deflation.dim() != 2 or deflation.shape[0] != n:
        raise ValueError(f"deflation must have shape (n, k) with n = {n}, got {tuple(deflation.shape)}")
    if ritz_values is not None:
        if ritz_values.numel() != deflation.shape[1]:
            raise ValueError(
                f"need one Ritz value per deflation column, got {ritz_values.numel()} for {deflation.shape[1]}"
            )
        v = deflation.to(device=device, dtype=dtype)
        exact, spent = float(ritz_values.to(torch.float64).sum()), 0
    else:
        v, _ = torch.linalg.qr(deflation.to(device=device, dtype=dtype))
        exact, spent = float(torch.einsum("ij,ij->", v, _apply(matvec, matmat, v).to(dtype))), v.shape[1]
    z = random_block(n, num_samples, seed, dtype, device, kind="rademacher")
    z = z - v @ (v.T @ z)
    samples = torch.einsum("ij,ij->j", z, _apply(matvec, matmat, z).to(dtype)).to(torch.float64).cpu()
    stderr = float(samples.std(unbiased=True) / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(value=exact + float(samples.mean()), stderr=stderr, num_samples=spent + num_samples)


def hutch_plus_plus(
    matvec: Callable[[Tensor], Tensor] | None,
    n: int,
    *,
    num_samples: int = 24,
    sketch: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    matmat: Callable[[Tensor], Tensor] | None = None,
) -> TraceEstimate:
    """Hutch++: deflate the range of ``A S`` (``S`` a random ``(n, sketch)`` sign block), then :func:`deflated_trace`.

    Spends ``num_samples`` products in all; ``sketch`` defaults to ``num_samples // 3``.
    """
    sketch = num_samples // 3 if sketch is None else sketch
    if not 1 <= sketch or num_samples - 2 * sketch < 1:
        raise ValueError(f"need 1 <= sketch and num_samples - 2 * sketch >= 1, got {sketch} and {num_samples}")
    s = random_block(n, sketch, seed + 1_000_003, dtype, device, kind="rademacher")
    basis = _apply(matvec, matmat, s).to(dtype)
    est = deflated_trace(
        matvec, n, basis, num_samples=num_samples - 2 * sketch, seed=seed, dtype=dtype, device=device, matmat=matmat
    )
    return TraceEstimate(value=est.value, stderr=est.stderr, num_samples=est.num_samples + sketch)
