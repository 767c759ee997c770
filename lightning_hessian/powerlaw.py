r"""Power-law fit of the top Hessian eigenvalues (Xie, Tang, Cai, Sun & Li 2022, arXiv:2201.13011).

The top-:math:`K` positive eigenvalues :math:`\lambda_1 \ge \dots \ge \lambda_K` are tested against a continuous
power-law density :math:`p(\lambda) \propto \lambda^{-\beta}` above the cutoff :math:`\lambda_K`:

* maximum likelihood (Clauset, Shalizi & Newman 2009):
  :math:`\hat\beta = 1 + K \big/ \sum_{i=1}^K \ln(\lambda_i/\lambda_K)`, standard error :math:`(\hat\beta-1)/\sqrt K`;
* rank-order exponent :math:`\hat s = 1/(\hat\beta - 1)` (:math:`\lambda_k \approx \lambda_1 k^{-s}`);
* Kolmogorov-Smirnov distance :math:`d_{ks} = \sup_\lambda |F^*(\lambda) - \hat F(\lambda)|` with
  :math:`F^*(\lambda) = 1 - (\lambda/\lambda_K)^{-(\hat\beta-1)}`, against the critical value
  :math:`d_c = c(\alpha)/\sqrt K` (Massey 1951); "power law" iff :math:`d_{ks} < d_c`;
* the naive OLS slope of :math:`\log\lambda_k` on :math:`\log k`, the eigengaps' exponent, and the spectral gap.

Pure numpy; no Lightning, no torch needed (tensors are accepted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["KS_CRITICAL_CONSTANTS", "PowerLawFit", "eigengaps", "fit_power_law", "ks_critical_value", "spectral_gap"]

#: Massey (1951) constants :math:`c(\alpha)` of the one-sample KS test, as used by Xie et al. (2022).
KS_CRITICAL_CONSTANTS: dict[float, float] = {0.2: 1.07, 0.15: 1.14, 0.1: 1.22, 0.05: 1.36, 0.01: 1.63}


@dataclass(frozen=True)
class PowerLawFit:
    r"""Result of :func:`fit_power_law`.

    Attributes:
        beta: MLE density exponent :math:`\hat\beta`.
        beta_stderr: :math:`(\hat\beta - 1)/\sqrt K`.
        s: Rank-order exponent :math:`1/(\hat\beta - 1)`.
        ks_distance: KS distance :math:`d_{ks}` between the fitted and the empirical CDF.
        ks_critical: Critical value :math:`c(\alpha)/\sqrt K`.
        slope_ols: Minus the OLS slope of :math:`\log\lambda_k` on :math:`\log k` (positive, comparable to ``s``).
        k: Number of eigenvalues used.
        is_power_law: ``ks_distance < ks_critical``.
        alpha: Significance level of the KS test.
        spectral_gap: :math:`\lambda_1 - \lambda_2`.
        spectral_gap_ratio: :math:`\lambda_1/\lambda_2`.
        eigengap_slope_ols: Minus the OLS slope of :math:`\log\delta_k` on :math:`\log k` for the positive eigengaps
            :math:`\delta_k = \lambda_k - \lambda_{k+1}` (about :math:`s + 1` for a power law; NaN with < 3 gaps).
    """

    beta: float
    beta_stderr: float
    s: float
    ks_distance: float
    ks_critical: float
    slope_ols: float
    k: int
    is_power_law: bool
    alpha: float = 0.05
    spectral_gap: float = math.nan
    spectral_gap_ratio: float = math.nan
    eigengap_slope_ols: float = math.nan


def ks_critical_value(k: int, alpha: float = 0.05) -> float:
    r"""Critical KS distance :math:`c(\alpha)/\sqrt k` (Massey 1951).

    Args:
        k: Sample size, ``>= 1``.
        alpha: Significance level, one of ``0.2, 0.15, 0.1, 0.05, 0.01``.

    Returns:
        The critical value.

    Raises:
        ValueError: For an unsupported ``alpha`` or ``k < 1``.
    """
    constant = _ks_constant(alpha)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return constant / math.sqrt(k)


def _ks_constant(alpha: float) -> float:
    for level, constant in KS_CRITICAL_CONSTANTS.items():
        if math.isclose(float(alpha), level):
            return constant
    raise ValueError(f"alpha must be one of {sorted(KS_CRITICAL_CONSTANTS)}, got {alpha!r}")


def _as_array(values: Any, name: str) -> np.ndarray:
    """1-D float64 copy of a tensor / array / sequence; rejects other shapes and non-finite input."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    array = np.array(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of eigenvalues, got an array of shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf): {array[~np.isfinite(array)][:5]}")
    return array


def _ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def spectral_gap(eigenvalues: Any) -> tuple[float, float]:
    r"""Spectral gap :math:`(\lambda_1 - \lambda_2,\ \lambda_1/\lambda_2)` of the two largest eigenvalues.

    Args:
        eigenvalues: At least two eigenvalues, any order.

    Returns:
        The difference and the ratio (``inf``/NaN ratio when :math:`\lambda_2 = 0`).

    Raises:
        ValueError: For fewer than two or non-finite values.
    """
    array = _as_array(eigenvalues, "eigenvalues")
    if array.size < 2:
        raise ValueError(f"the spectral gap needs at least two eigenvalues, got {array.size}")
    top = np.sort(array)[::-1][:2]
    ratio = top[0] / top[1] if top[1] != 0 else math.copysign(math.inf, top[0]) if top[0] != 0 else math.nan
    return float(top[0] - top[1]), float(ratio)


def eigengaps(eigenvalues: Any) -> np.ndarray:
    r"""Eigengaps :math:`\delta_k = \lambda_k - \lambda_{k+1}` of the eigenvalues sorted in descending order."""
    array = np.sort(_as_array(eigenvalues, "eigenvalues"))[::-1]
    return array[:-1] - array[1:]


def fit_power_law(eigenvalues: Any, k: int | None = None, alpha: float = 0.05) -> PowerLawFit:
    r"""Fit a power law to the top eigenvalues exactly as Xie et al. (2022).

    Keeps the positive values, sorts them in descending order and uses the ``k`` largest (all if ``k`` is None)
    with the cutoff :math:`\lambda_{\text{cut}} = \lambda_K`:

    .. math::

        \hat\beta = 1 + \frac{K}{\sum_{i=1}^K \ln(\lambda_i/\lambda_K)}, \quad \hat s = \frac{1}{\hat\beta - 1}, \quad
        \sigma_{\hat\beta} = \frac{\hat\beta - 1}{\sqrt K}, \quad
        d_{ks} = \max_i \max\Big(F^*(x_{(i)}) - \tfrac{i-1}{K},\ \tfrac iK - F^*(x_{(i)})\Big),

    :math:`x_{(i)}` the values in ascending order. Oracle: :math:`\lambda_k = 1/k`, :math:`K = 1000` gives
    :math:`\hat\beta = 2.0044`, :math:`\hat s = 0.9956`, :math:`d_{ks} = 0.0016` (:math:`d_c = 0.0430`).

    Args:
        eigenvalues: Tensor, array or sequence of eigenvalues (any order, any strides).
        k: Number of top positive eigenvalues to use (``>= 3``); None uses all positive values. If fewer positive
            values exist, all of them are used.
        alpha: KS significance level, one of ``0.2, 0.15, 0.1, 0.05, 0.01``.

    Returns:
        A :class:`PowerLawFit`.

    Raises:
        ValueError: If the input is not 1-D or not finite, ``k < 3``, ``alpha`` is unsupported, fewer than 3
            positive values remain, or the top values are all equal (no exponent can be fitted).
    """
    _ks_constant(alpha)
    if k is not None and (isinstance(k, bool) or int(k) != k or k < 3):
        raise ValueError(f"k must be an integer >= 3 or None, got {k!r}")
    array = _as_array(eigenvalues, "eigenvalues")
    positive = np.sort(array[array > 0])[::-1]
    top = positive if k is None else positive[: int(k)]
    count = top.size
    if count < 3:
        raise ValueError(f"a power-law fit needs at least 3 positive eigenvalues, got {count} (of {array.size} values)")
    cutoff = top[-1]
    log_ratio_sum = float(np.log(top / cutoff).sum())
    if not log_ratio_sum > 0:
        raise ValueError(f"the top {count} positive eigenvalues are all equal ({cutoff}): no power law can be fitted")
    beta = 1.0 + count / log_ratio_sum
    ascending = top[::-1]
    fitted_cdf = 1.0 - (ascending / cutoff) ** (-(beta - 1.0))
    ranks = np.arange(1, count + 1)
    ks_distance = float(max((fitted_cdf - (ranks - 1) / count).max(), (ranks / count - fitted_cdf).max()))
    ks_crit = ks_critical_value(count, alpha)
    log_k = np.log(ranks.astype(np.float64))
    gap, ratio = spectral_gap(top)
    gaps = top[:-1] - top[1:]
    keep = gaps > 0
    gap_slope = -_ols_slope(log_k[:-1][keep], np.log(gaps[keep])) if keep.sum() >= 3 else math.nan
    return PowerLawFit(
        beta=float(beta),
        beta_stderr=float((beta - 1.0) / math.sqrt(count)),
        s=float(1.0 / (beta - 1.0)),
        ks_distance=ks_distance,
        ks_critical=ks_crit,
        slope_ols=-_ols_slope(log_k, np.log(top)),
        k=int(count),
        is_power_law=bool(ks_distance < ks_crit),
        alpha=float(alpha),
        spectral_gap=gap,
        spectral_gap_ratio=ratio,
        eigengap_slope_ols=float(gap_slope),
    )
