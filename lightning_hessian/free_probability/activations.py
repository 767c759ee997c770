r"""Activations: laws of :math:`\phi'(h)^2`, the mean-field variance recursion and rational approximations.

For a layer :math:`x_\ell = \phi_\ell(h_\ell)`, :math:`h_\ell = W_\ell x_{\ell-1} + b_\ell` with fan-in variances
:math:`\operatorname{Var}(W_\ell) = \tilde\sigma_\ell^2 / N_{\ell-1}` and
:math:`\operatorname{Var}(b_\ell) = \sigma_{b,\ell}^2`, the pre-activations are (in the large-width limit)
centred Gaussians with variance :math:`q_\ell` given by the mean-field recursion
(Poole et al. 2016; Pennington et al. 2017)

.. math::

    q_1 = \tilde\sigma_1^2\, v_0 + \sigma_{b,1}^2, \qquad
    q_{\ell+1} = \tilde\sigma_{\ell+1}^2\, \mathbb{E}\big[\phi_\ell(\sqrt{q_\ell} Z)^2\big] + \sigma_{b,\ell+1}^2,

with :math:`v_0` the mean square of the input entries. The diagonal of :math:`D_\ell^2` then follows the law
:math:`\nu_\ell` of :math:`\phi_\ell'(\sqrt{q_\ell} Z)^2`, whose moments are :math:`\mu_k = \mathbb{E}[\phi'^{2k}]`.

* ``linear``: :math:`\nu = \delta_1`; ``relu``: :math:`\nu = \tfrac12\delta_0 + \tfrac12\delta_1`;
  ``hard_tanh``: :math:`\nu = (1 - p)\delta_0 + p\,\delta_1` with :math:`p = \operatorname{erf}(1/\sqrt{2q})`.
  These are exact and have rational S-transforms.
* Smooth activations (``tanh``, ``erf``, ``gelu``, ``silu``): :math:`\nu` is continuous and its S-transform is not
  rational. A finite atomic law keeps S rational only when its atoms are :math:`\{0, a\}` (a law with two non-zero atoms
  already has an algebraic, non-rational S), so we approximate :math:`\nu` by a rational law matching its first two
  moments :math:`\mu_1, \mu_2` exactly (hence the mean and variance of the Jacobian spectrum are exact, see
  Pennington et al. 2018, :math:`\sigma^2_{JJ^T} = L(\mu_2/\mu_1^2 - 1 - s_1)`):

  - ``"free_poisson"`` (default): the free multiplicative power :math:`\pi_{r,\alpha}^{\boxtimes k}` of a free
    Poisson law, :math:`k = \lceil v \rceil` with :math:`v = \mu_2/\mu_1^2 - 1` (relative variance),
    :math:`r = k / v \ge 1`, :math:`(\alpha r)^k = \mu_1`: a continuous law without atom, like the true
    :math:`\nu`, so the predicted atom at zero keeps the rank bound :math:`1 - \min(1, \min_\ell N_\ell/N_0)`;
  - ``"two_atom"``: the finite atomic law :math:`(1 - p)\delta_0 + p\,\delta_a`, :math:`a = \mu_2/\mu_1`,
    :math:`p = \mu_1^2/\mu_2`; it adds an atom at zero that the true law does not have.

  The accuracy of both (moments :math:`m_3, m_4` of :math:`J^T J` against the exact series, densities against
  Monte Carlo) is measured in ``tests/test_free_probability_activations.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy import special

from lightning_hessian.free_probability.transforms import (
    RationalLaw,
    bernoulli_law,
    free_poisson_power_law,
    point_mass_law,
)

__all__ = [
    "ACTIVATIONS",
    "SMOOTH_ACTIVATIONS",
    "SmoothApproximation",
    "activation_second_moment",
    "derivative_square_moments",
    "derivative_square_law",
    "mean_field_variances",
]

#: Names accepted for activations.
ACTIVATIONS: tuple[str, ...] = ("linear", "relu", "hard_tanh", "tanh", "erf", "gelu", "silu")
#: Activations whose law of :math:`\phi'(h)^2` is approximated by a rational law.
SMOOTH_ACTIVATIONS: tuple[str, ...] = ("tanh", "erf", "gelu", "silu")
SmoothApproximation = Literal["free_poisson", "two_atom"]

_MAX_POWER = 16
# Trapezoidal rule against the standard normal density on [-13, 13]: spectrally accurate for integrands analytic in a
# strip (the smooth activations' poles sit at distance ~ 1/sqrt(q) from the real axis), unlike Gauss-Hermite, whose
# error for tanh grows quickly with q. Truncation error exp(-13^2/2) ~ 1e-37.
_NODES = np.linspace(-13.0, 13.0, 8001)
_WEIGHTS = np.exp(-0.5 * _NODES**2) / math.sqrt(2.0 * math.pi) * (_NODES[1] - _NODES[0])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return special.expit(x)


_PHI: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "erf": special.erf,
    "gelu": lambda h: h * special.ndtr(h),
    "silu": lambda h: h * _sigmoid(h),
}
_DPHI: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": lambda h: 1.0 - np.tanh(h) ** 2,
    "erf": lambda h: 2.0 / math.sqrt(math.pi) * np.exp(-(h**2)),
    "gelu": lambda h: special.ndtr(h) + h * np.exp(-0.5 * h**2) / math.sqrt(2.0 * math.pi),
    "silu": lambda h: _sigmoid(h) * (1.0 + h * (1.0 - _sigmoid(h))),
}


def _check_name(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
    return name


def _check_q(q: float) -> float:
    if not (np.isfinite(q) and q > 0):
        raise ValueError(f"pre-activation variance q must be positive and finite, got {q!r}")
    return float(q)


def activation_second_moment(name: str, q: float) -> float:
    r""":math:`\mathbb{E}[\phi(\sqrt{q} Z)^2]` for :math:`Z \sim N(0, 1)` (closed form where available).

    Hard-tanh: :math:`q(\operatorname{erf}(s) - \tfrac{2s}{\sqrt\pi} e^{-s^2}) + 1 - \operatorname{erf}(s)`,
    :math:`s = 1/\sqrt{2q}`. Smooth activations: trapezoidal quadrature (8001 nodes).
    """
    _check_name(name)
    q = _check_q(q)
    if name == "linear":
        return q
    if name == "relu":
        return 0.5 * q
    if name == "hard_tanh":
        s = 1.0 / math.sqrt(2.0 * q)
        return q * (math.erf(s) - 2.0 * s / math.sqrt(math.pi) * math.exp(-s * s)) + 1.0 - math.erf(s)
    return float(np.sum(_WEIGHTS * _PHI[name](math.sqrt(q) * _NODES) ** 2))


def derivative_square_moments(name: str, q: float, n: int) -> np.ndarray:
    r"""Moments :math:`\mu_k = \mathbb{E}[\phi'(\sqrt q Z)^{2k}]`, :math:`k = 1..n`, of the law :math:`\nu` of D².

    Exact for ``linear`` (1), ``relu`` (1/2) and ``hard_tanh`` (:math:`\operatorname{erf}(1/\sqrt{2q})`);
    trapezoidal quadrature (8001 nodes on :math:`[-13, 13]`; relative error below 1e-9 against adaptive quadrature
    for :math:`q \le 6`, tested) otherwise.
    """
    _check_name(name)
    q = _check_q(q)
    k = np.arange(1, n + 1)
    if name == "linear":
        return np.ones(n)
    if name == "relu":
        return np.full(n, 0.5)
    if name == "hard_tanh":
        return np.full(n, math.erf(1.0 / math.sqrt(2.0 * q)))
    d2 = _DPHI[name](math.sqrt(q) * _NODES) ** 2
    return np.array([np.sum(_WEIGHTS * d2**kk) for kk in k])


def derivative_square_law(name: str, q: float, approximation: SmoothApproximation = "free_poisson") -> RationalLaw:
    r"""Rational law used for :math:`\nu = \operatorname{law}(\phi'(\sqrt q Z)^2)` in the S-transform product.

    Exact for ``linear``, ``relu`` and ``hard_tanh``; for smooth activations the moment-matched approximation
    described in the module docstring (``approximation`` = ``"free_poisson"`` or ``"two_atom"``).

    Raises:
        ValueError: unknown activation or approximation, or a law with zero mean (e.g. hard-tanh with huge ``q``).
    """
    _check_name(name)
    if name == "linear":
        return point_mass_law(1.0)
    if name == "relu":
        return bernoulli_law(0.5)
    q = _check_q(q)
    if name == "hard_tanh":
        p = math.erf(1.0 / math.sqrt(2.0 * q))
        if not p > 0:
            raise ValueError(f"hard_tanh with q = {q!r} saturates: P(|h| < 1) underflows to 0")
        return bernoulli_law(p)
    if approximation not in ("free_poisson", "two_atom"):
        raise ValueError(f"unknown smooth approximation {approximation!r}; allowed: 'free_poisson', 'two_atom'")
    mu1, mu2 = derivative_square_moments(name, q, 2)
    if not mu1 > 0:
        raise ValueError(f"{name} with q = {q!r}: E[phi'(h)^2] underflows to 0")
    var = max(mu2 - mu1 * mu1, 0.0)
    if var <= 1e-12 * mu1 * mu1:
        return point_mass_law(mu1)
    if approximation == "two_atom":
        return bernoulli_law(min(mu1 * mu1 / mu2, 1.0), mu2 / mu1)
    rel_var = var / (mu1 * mu1)
    power = int(min(max(1, math.ceil(rel_var - 1e-12)), _MAX_POWER))
    rate = power / rel_var
    return free_poisson_power_law(rate=rate, jump=mu1 ** (1.0 / power) / rate, power=power)


def mean_field_variances(
    weight_variances: np.ndarray,
    activations: tuple[str, ...],
    bias_variances: np.ndarray,
    input_variance: float,
) -> np.ndarray:
    r"""Pre-activation variances :math:`q_1, \dots, q_L` from the mean-field recursion (module docstring).

    Args:
        weight_variances: :math:`\tilde\sigma_\ell^2` (fan-in convention), one per layer.
        activations: one activation name per layer.
        bias_variances: :math:`\sigma_{b,\ell}^2`, one per layer.
        input_variance: mean square :math:`v_0` of the input entries.
    """
    q = np.empty(len(activations))
    prev = float(input_variance)
    for ell, name in enumerate(activations):
        q[ell] = weight_variances[ell] * prev + bias_variances[ell]
        prev = activation_second_moment(name, q[ell]) if q[ell] > 0 else 0.0
    return q
