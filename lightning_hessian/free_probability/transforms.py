r"""S-transform building blocks and power-series arithmetic (Chhaibi, Daouda, Kahn 2022, §2-3).

For a probability law :math:`\mu` on :math:`[0, \infty)` with moments :math:`m_k` we use

.. math::

    M_\mu(z) = \int \frac{t}{z - t}\, d\mu(t) = \sum_{k \ge 1} m_k z^{-k}, \qquad
    \psi_\mu(w) = M_\mu(1/w), \qquad \chi_\mu = \psi_\mu^{\langle -1 \rangle},

    S_\mu(m) = \frac{1 + m}{m}\, \chi_\mu(m), \qquad
    M_\mu^{\langle -1 \rangle}(m) = \frac{1}{\chi_\mu(m)} = \frac{1 + m}{m\, S_\mu(m)} .

Freeness turns products of random matrices into products of S-transforms, :math:`S_{\mu \boxtimes \nu} = S_\mu S_\nu`.
The laws used by the Jacobian model all have a *rational* S-transform of the form

.. math::

    \frac{1 + u}{S_\nu(u)} = c \prod_i (u - r_i),

which this module represents by :class:`RationalLaw` (``scale`` :math:`c`, ``roots`` :math:`r_i`):

* free Poisson (Marchenko-Pastur) law with rate :math:`r` and jump :math:`\alpha`:
  :math:`S(u) = 1 / (\alpha (u + r))`;
* Bernoulli law :math:`(1 - p)\delta_0 + p\,\delta_a` (ReLU: :math:`p = 1/2`, hard-tanh:
  :math:`p = \operatorname{erf}(1/\sqrt{2q})`, :math:`a = 1`): :math:`S(u) = (1 + u) / (a (p + u))`;
* the point mass :math:`\delta_a` (linear layers): :math:`S(u) = 1/a`.

Zero padding (moving between :math:`AB` and :math:`BA`, which share their non-zero spectrum): if
:math:`\mu_a = c\,\mu_b + (1 - c)\delta_0` then :math:`S_a(m) = \frac{1 + m}{c + m} S_b(m / c)`.

The power-series helpers compute exact moments of free multiplicative convolutions of *arbitrary* laws (given their
moments), which is how :meth:`JacobianLaw.moments` stays exact for smooth activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RationalLaw",
    "bernoulli_law",
    "free_poisson_law",
    "free_poisson_power_law",
    "point_mass_law",
    "s_bernoulli",
    "s_free_poisson",
    "s_zero_padding",
    "series_compose_scale",
    "series_inverse",
    "series_mul",
    "series_reverse",
    "moments_to_s_series",
    "s_series_to_moments",
]


# ----------------------------------------------------------------------------------------------------------------------
# Closed-form S-transforms (functions of a complex argument)
# ----------------------------------------------------------------------------------------------------------------------
def s_free_poisson(m: complex | np.ndarray, rate: float, jump: float = 1.0) -> complex | np.ndarray:
    r"""S-transform of the free Poisson law with ``rate`` :math:`r` and ``jump`` :math:`\alpha`.

    .. math:: S(m) = \frac{1}{\alpha (m + r)}

    Its moments are :math:`m_1 = \alpha r`, :math:`m_2 = \alpha^2 (r + r^2)`; :math:`r = \alpha = 1` is the standard
    Marchenko-Pastur law with density :math:`\sqrt{x(4 - x)} / (2\pi x)` on :math:`[0, 4]`.
    """
    return 1.0 / (jump * (m + rate))


def s_bernoulli(m: complex | np.ndarray, p: float, atom: float = 1.0) -> complex | np.ndarray:
    r"""S-transform of the Bernoulli law :math:`(1 - p)\delta_0 + p\,\delta_a`.

    .. math:: S(m) = \frac{1 + m}{a (p + m)}
    """
    return (1.0 + m) / (atom * (p + m))


def s_zero_padding(s: Callable[[np.ndarray], np.ndarray], c: float) -> Callable[[np.ndarray], np.ndarray]:
    r"""S-transform of :math:`c\,\mu + (1 - c)\delta_0` given the S-transform of :math:`\mu` (zero-padding lemma).

    .. math:: S_{c\mu + (1-c)\delta_0}(m) = \frac{1 + m}{c + m}\, S_\mu(m / c)

    Used to move between the :math:`N_{\ell-1} \times N_{\ell-1}` and :math:`N_\ell \times N_\ell` products of a
    rectangular layer (:math:`c = N_{\ell-1}/N_\ell` when :math:`N_{\ell-1} \le N_\ell`).
    """
    if not 0.0 < c:
        raise ValueError(f"zero-padding ratio c must be positive, got {c!r}")

    def padded(m: np.ndarray) -> np.ndarray:
        return (1.0 + m) / (c + m) * s(m / c)

    return padded


# ----------------------------------------------------------------------------------------------------------------------
# Rational laws
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RationalLaw:
    r"""A law whose S-transform is rational: :math:`(1 + u) / S(u) = c \prod_i (u - r_i)`.

    Attributes:
        scale: the constant :math:`c > 0`.
        roots: the real roots :math:`r_i \le 0` (one entry per linear factor, repeated with multiplicity).
        name: a label for messages.
    """

    scale: float
    roots: tuple[float, ...]
    name: str = "law"

    def s_transform(self, u: complex | np.ndarray) -> complex | np.ndarray:
        r"""Evaluate :math:`S(u) = (1 + u) / (c \prod_i (u - r_i))`."""
        u = np.asarray(u, dtype=complex)
        den = self.scale * np.ones_like(u)
        for r in self.roots:
            den = den * (u - r)
        return (1.0 + u) / den

    def s_series(self, order: int) -> np.ndarray:
        """Taylor coefficients of :math:`S(u)` at 0 up to ``u**order``."""
        out = _pad(np.array([1.0, 1.0]), order)  # 1 + u
        for r in self.roots:
            # 1 / (u - r) = -1/r * sum_k (u/r)^k
            geom = -(1.0 / r) * (1.0 / r) ** np.arange(order + 1)
            out = series_mul(out, geom, order)
        return out / self.scale

    def moments(self, n: int) -> np.ndarray:
        r"""Moments :math:`m_1, \dots, m_n` of the law."""
        return s_series_to_moments(self.s_series(n - 1), n)


def point_mass_law(a: float = 1.0) -> RationalLaw:
    r"""The point mass :math:`\delta_a` (:math:`S = 1/a`, i.e. :math:`(1+u)/S = a (u + 1)`)."""
    if not a > 0:
        raise ValueError(f"point mass location must be positive, got {a!r}")
    return RationalLaw(scale=float(a), roots=(-1.0,), name=f"delta_{a:g}")


def bernoulli_law(p: float, atom: float = 1.0) -> RationalLaw:
    r"""The Bernoulli law :math:`(1 - p)\delta_0 + p\,\delta_a` (:math:`(1+u)/S = a (u + p)`), :math:`0 < p \le 1`."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"Bernoulli probability p must lie in (0, 1], got {p!r}")
    if not atom > 0:
        raise ValueError(f"Bernoulli atom must be positive, got {atom!r}")
    return RationalLaw(scale=float(atom), roots=(-float(p),), name=f"bernoulli(p={p:.4g}, a={atom:.4g})")


def free_poisson_law(rate: float, jump: float = 1.0) -> RationalLaw:
    r"""The free Poisson law (:math:`(1+u)/S = \alpha (u + 1)(u + r)`), rate :math:`r > 0`, jump :math:`\alpha > 0`."""
    if not rate > 0:
        raise ValueError(f"free Poisson rate must be positive, got {rate!r}")
    if not jump > 0:
        raise ValueError(f"free Poisson jump must be positive, got {jump!r}")
    return RationalLaw(scale=float(jump), roots=(-1.0, -float(rate)), name=f"free_poisson(r={rate:.4g}, a={jump:.4g})")


def free_poisson_power_law(rate: float, jump: float, power: int) -> RationalLaw:
    r"""Free multiplicative power :math:`\pi_{r,\alpha}^{\boxtimes k}` of a free Poisson law.

    :math:`S(u) = \alpha^{-k} (u + r)^{-k}`, i.e. :math:`(1+u)/S = \alpha^k (1 + u)(u + r)^k`; mean
    :math:`(\alpha r)^k`, relative variance :math:`k/r` (relative variances add under :math:`\boxtimes`), no atom when
    :math:`r \ge 1`.
    """
    if not (isinstance(power, int) and power >= 1):
        raise ValueError(f"power must be a positive int, got {power!r}")
    base = free_poisson_law(rate, jump)
    return RationalLaw(
        scale=float(jump) ** power,
        roots=(-1.0,) + (-float(rate),) * power,
        name=f"free_poisson(r={rate:.4g}, a={jump:.4g})^{power}" if power > 1 else base.name,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Power series (coefficient arrays c[0..order])
# ----------------------------------------------------------------------------------------------------------------------
def series_mul(a: np.ndarray, b: np.ndarray, order: int) -> np.ndarray:
    """Product of two power series truncated at ``order``."""
    return _pad(np.convolve(np.asarray(a, dtype=float)[: order + 1], np.asarray(b, dtype=float)[: order + 1]), order)


def series_inverse(a: np.ndarray, order: int) -> np.ndarray:
    """Multiplicative inverse ``1/a`` of a power series with ``a[0] != 0``."""
    a = np.asarray(a, dtype=float)
    if a[0] == 0:
        raise ValueError("series_inverse needs a non-zero constant term")
    out = np.zeros(order + 1)
    out[0] = 1.0 / a[0]
    for k in range(1, order + 1):
        acc = sum(a[j] * out[k - j] for j in range(1, min(k, len(a) - 1) + 1))
        out[k] = -acc / a[0]
    return out


def series_compose_scale(a: np.ndarray, scale: float) -> np.ndarray:
    """Coefficients of ``u -> a(scale * u)``."""
    a = np.asarray(a, dtype=float)
    return a * scale ** np.arange(len(a))


def series_reverse(a: np.ndarray, order: int) -> np.ndarray:
    r"""Compositional inverse :math:`g` of :math:`f(w) = a_1 w + a_2 w^2 + \dots` (:math:`a_0 = 0 \ne a_1`).

    Solves :math:`f(g(m)) = m` order by order.
    """
    a = _pad(a, order)
    if order < 1 or a[1] == 0 or a[0] != 0:
        raise ValueError("series_reverse needs a[0] == 0 and a[1] != 0")
    g = np.zeros(order + 1)
    g[1] = 1.0 / a[1]
    for k in range(2, order + 1):
        # f(g) up to order k with g[k] unknown: a1*g[k] + (terms from g[1..k-1]) = 0
        comp = np.zeros(order + 1)
        power = np.zeros(order + 1)
        power[0] = 1.0
        for j in range(1, k + 1):
            power = series_mul(power, g, order)
            comp = comp + a[j] * power
        g[k] = -comp[k] / a[1]
    return g


def _pad(a: np.ndarray, order: int) -> np.ndarray:
    out = np.zeros(order + 1)
    a = np.asarray(a, dtype=float)[: order + 1]
    out[: len(a)] = a
    return out


def moments_to_s_series(moments: np.ndarray, order: int) -> np.ndarray:
    r"""Taylor coefficients of :math:`S_\mu(m)` up to ``m**order`` from the moments :math:`m_1, \dots, m_{order+1}`.

    :math:`\psi(w) = \sum_k m_k w^k`, :math:`\chi = \psi^{\langle -1 \rangle}`, :math:`S(m) = (1 + m)\chi(m)/m`.
    """
    moments = np.asarray(moments, dtype=float)
    if len(moments) < order + 1:
        raise ValueError(f"need {order + 1} moments for an S-series of order {order}, got {len(moments)}")
    if not moments[0] > 0:
        raise ValueError(f"the S-transform needs a positive mean, got m_1 = {moments[0]!r}")
    psi = np.concatenate([[0.0], moments[: order + 1]])
    chi = series_reverse(psi, order + 1)
    chi_over_m = chi[1:]  # chi(m)/m, order `order`
    return series_mul(np.array([1.0, 1.0]), chi_over_m, order)


def s_series_to_moments(s: np.ndarray, n: int) -> np.ndarray:
    r"""Moments :math:`m_1, \dots, m_n` from the Taylor coefficients of :math:`S(m)` (at least up to ``m**(n-1)``).

    :math:`\chi(m) = m S(m) / (1 + m)`, :math:`\psi = \chi^{\langle -1 \rangle}`, moments = coefficients of
    :math:`\psi`.
    """
    if n < 1:
        raise ValueError(f"number of moments must be >= 1, got {n!r}")
    s = _pad(s, n - 1)
    geom = (-1.0) ** np.arange(n)  # 1/(1+m)
    chi_over_m = series_mul(s, geom, n - 1)
    chi = np.concatenate([[0.0], chi_over_m])
    psi = series_reverse(chi, n)
    return psi[1:]


# ----------------------------------------------------------------------------------------------------------------------
# Composed inverse moment function M^{-1}(m) = P(m) / m with P in factored form
# ----------------------------------------------------------------------------------------------------------------------
class MInverse:
    r"""Inverse moment function :math:`M^{\langle -1 \rangle}(m) = P(m)/m`, :math:`P(m) = C \prod_j (m - \rho_j)`.

    All laws built from :class:`RationalLaw` factors lead to this form with real roots :math:`\rho_j \le 0`, one of
    them :math:`-1`. :math:`M(z)` is the root of :math:`P(m) - z m = 0` on the branch :math:`M(z) \sim m_1 / z`.

    Facts used by the solver and the read-out (all derived from the factored form):

    * mean :math:`m_1 = P(0)`; atom at zero :math:`\mu(\{0\}) = 1 + \rho_*`, with :math:`\rho_* = \max_j \rho_j`
      the value :math:`M(0)`;
    * right edge of the support :math:`b = \min_{m > 0} P(m)/m`; left edge :math:`a = \max_{\rho' < m < \rho_*} P(m)/m`
      (the gap next to zero) when :math:`\rho_*` is a simple root, else :math:`a = 0` with a density singularity
      :math:`x^{-(k-1)/k}` (:math:`k` the multiplicity of :math:`\rho_*`; :math:`k = L + 1` for square linear nets);
    * the Cauchy integral has the closed form :math:`\int G\,dz = \Phi(M(z))` with
      :math:`\Phi(m) = (d - 1)m + \sum_j (1 + \rho_j)\log(m - \rho_j) - \log m`, so the distribution function is
      :math:`F(x) = 1 - \tfrac{1}{\pi}\operatorname{Im}\Phi(M(x + i0))` (arguments taken in :math:`[-\pi, 0]`).

    Args:
        constant: :math:`C > 0`.
        roots: the roots :math:`\rho_j` with multiplicity (equal roots are grouped).
    """

    def __init__(self, constant: float, roots: np.ndarray | list[float]) -> None:
        roots = np.sort(np.asarray(roots, dtype=float))[::-1]
        if roots.size < 2:
            raise ValueError(f"M^-1 needs a polynomial of degree >= 2, got roots {roots.tolist()!r}")
        if not (np.all(np.isfinite(roots)) and np.all(roots < 0)):
            raise ValueError(f"roots of P must be finite and negative, got {roots.tolist()!r}")
        if not (np.isfinite(constant) and constant > 0):
            raise ValueError(f"constant of P must be positive and finite, got {constant!r}")
        unique: list[float] = []
        mult: list[int] = []
        for r in roots:
            if unique and abs(r - unique[-1]) <= 1e-13 * abs(unique[-1]):
                mult[-1] += 1
            else:
                unique.append(float(r))
                mult.append(1)
        self.constant = float(constant)
        self.roots = np.array(unique)
        self.multiplicities = np.array(mult, dtype=float)
        self.int_multiplicities = tuple(int(k) for k in mult)
        self.degree = int(sum(mult))
        self.all_roots = roots

    def __repr__(self) -> str:
        return f"MInverse(constant={self.constant:.6g}, roots={self.all_roots.tolist()!r})"

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def p(self, m: np.ndarray) -> np.ndarray:
        """Evaluate :math:`P(m)`."""
        m = np.asarray(m, dtype=complex)
        out = np.full(m.shape, self.constant, dtype=complex)
        for r, k in zip(self.roots, self.multiplicities):
            out = out * (m - r) ** int(k)
        return out

    def __call__(self, m: np.ndarray) -> np.ndarray:
        r"""Evaluate :math:`M^{\langle -1 \rangle}(m) = P(m)/m`."""
        m = np.asarray(m, dtype=complex)
        return self.p(m) / m

    def _h(self, m: float) -> float:
        # d/dm log(P(m)/m) = sum_j k_j / (m - rho_j) - 1/m
        return float(np.sum(self.multiplicities / (m - self.roots)) - 1.0 / m)

    # -- read-outs -----------------------------------------------------------------------------------------------------
    @property
    def mean(self) -> float:
        """:math:`m_1 = P(0)`."""
        return float(self.p(np.array(0.0)).real)

    @property
    def atom_at_zero(self) -> float:
        r""":math:`\mu(\{0\}) = 1 + \max_j \rho_j` (clipped to [0, 1])."""
        return float(min(max(1.0 + self.roots[0], 0.0), 1.0))

    @property
    def singularity_order(self) -> int:
        r"""Number :math:`k` of roots clustered at :math:`\rho_*` (within 1e-3 relative).

        The density behaves like :math:`x^{-(k-1)/k}` near 0 when :math:`k \ge 2`.
        """
        top = self.roots[0]
        close = np.abs(self.roots - top) <= 1e-3 * abs(top)
        return int(np.sum(self.multiplicities[close]))

    def support(self) -> tuple[float, float]:
        """Edges :math:`(a, b)` of the continuous part of the law (see the class docstring)."""
        from scipy.optimize import brentq

        hi = 1.0
        while self._h(hi) <= 0:
            hi *= 2.0
        lo = hi
        while self._h(lo) >= 0:
            lo *= 0.5
        m_right = brentq(self._h, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500)
        b = float((self.p(np.array(m_right)) / m_right).real)
        a = 0.0
        if self.multiplicities[0] == 1:
            top, nxt = self.roots[0], self.roots[1]
            width = top - nxt
            lo, hi = nxt + width * 1e-15, top - width * 1e-15
            if self._h(lo) > 0 > self._h(hi):
                m_left = brentq(self._h, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500)
                a = float(max((self.p(np.array(m_left)) / m_left).real, 0.0))
        return a, b

    def moments(self, n: int) -> np.ndarray:
        r"""Moments :math:`m_1..m_n`: :math:`\chi(m) = m / P(m)` reversed into :math:`\psi(w) = \sum_k m_k w^k`."""
        if n < 1:
            raise ValueError(f"number of moments must be >= 1, got {n!r}")
        coeffs = np.array([self.constant])
        for r in self.all_roots:
            coeffs = series_mul(coeffs, np.array([-r, 1.0]), n)
        chi = np.concatenate([[0.0], series_inverse(coeffs, n - 1)])
        return series_reverse(chi, n)[1:]

    def imag_phi(self, m: np.ndarray) -> np.ndarray:
        r""":math:`\operatorname{Im}\Phi(m)` for :math:`\operatorname{Im} m \le 0` (arguments in :math:`[-\pi, 0]`)."""
        m = np.asarray(m, dtype=complex)

        def arg_lower(w: np.ndarray) -> np.ndarray:
            return -np.arctan2(np.maximum(-w.imag, 0.0) + 0.0, w.real)

        out = (self.degree - 1) * m.imag - arg_lower(m)
        for r, k in zip(self.roots, self.multiplicities):
            out = out + k * (1.0 + r) * arg_lower(m - r)
        return out

    def cdf_from_m(self, m: np.ndarray) -> np.ndarray:
        r"""Distribution function :math:`F = 1 - \operatorname{Im}\Phi(m)/\pi` at the points where ``m = M(z)``."""
        return 1.0 - self.imag_phi(m) / np.pi
