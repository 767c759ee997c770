r"""Predicted spectral law of the input-output Jacobian :math:`J^T J` (Chhaibi, Daouda, Kahn, NeurIPS 2022).

Network: :math:`x_\ell = \phi_\ell(h_\ell)`, :math:`h_\ell = W_\ell x_{\ell-1} + b_\ell`,
:math:`W_\ell \in \mathbb{R}^{N_\ell \times N_{\ell-1}}` with fan-in variances
:math:`\operatorname{Var}(W_\ell) = \tilde\sigma_\ell^2 / N_{\ell-1}` (PyTorch's convention), and
:math:`J = D_L W_L \cdots D_1 W_1`, :math:`D_\ell = \operatorname{diag}(\phi_\ell'(h_\ell))`. In the large-width limit
the factors are asymptotically free and the law :math:`\mu` of the :math:`N_0 \times N_0` matrix :math:`J^T J` has

.. math::

    S_\mu(m) = \frac{N_0}{N_L} \prod_{\ell=1}^{L}
        \frac{S_{\nu_\ell}(m N_0 / N_\ell)}{\tilde\sigma_\ell^2\,(1 + m N_0 / N_\ell)}, \qquad
    M_\mu^{\langle -1 \rangle}(m) = \frac{1 + m}{m}\,\frac{N_L}{N_0}
        \prod_{\ell=1}^{L} \tilde\sigma_\ell^2\, \frac{1 + u_\ell}{S_{\nu_\ell}(u_\ell)}\Big|_{u_\ell = m N_0 / N_\ell},

where :math:`\nu_\ell` is the law of :math:`\phi_\ell'(h)^2`, :math:`h \sim N(0, q_\ell)` (see
:mod:`~lightning_hessian.free_probability.activations`). This is the paper's Theorem with the width ratios and
variances converted to the fan-in convention (the official code's rectangular convention does not match Monte Carlo;
see ``shared/research/seed_papers.md`` §4.3). With rational :math:`S_{\nu_\ell}` the inverse is :math:`P(m)/m` with
:math:`P` a polynomial with known real roots, solved by the certified lilypads homotopy
(:mod:`~lightning_hessian.free_probability.lilypads`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from lightning_hessian.free_probability.activations import (
    ACTIVATIONS,
    SmoothApproximation,
    derivative_square_law,
    derivative_square_moments,
    mean_field_variances,
)
from lightning_hessian.free_probability.lilypads import LilypadResult, solve
from lightning_hessian.free_probability.modules import UnsupportedArchitectureError, read_mlp
from lightning_hessian.free_probability.transforms import (
    MInverse,
    moments_to_s_series,
    s_series_to_moments,
    series_compose_scale,
    series_inverse,
    series_mul,
)

__all__ = ["JacobianLaw", "SpectrumGrid", "UncertifiedPointWarning", "UnsupportedArchitectureError"]

#: Relative imaginary part used for "y -> 0" read-outs (CDF, quantiles, adaptive density grid).
_Y_REL = 1e-10


class UncertifiedPointWarning(RuntimeWarning):
    """Some points could not be certified by the lilypads solver; their values are ``nan``."""


@dataclass
class SpectrumGrid:
    """Predicted law on a grid adapted to its edges and to the singularity at zero.

    Attributes:
        x: grid points in ``(a, b]`` (the support of the continuous part).
        density: density of the continuous part at ``x`` (``y -> 0`` read-out; ``nan`` where uncertified).
        cdf: distribution function of the full law at ``x`` (the atom at zero included).
        atom_at_zero: mass of the law at zero.
        support: edges ``(a, b)`` of the continuous part.
    """

    x: np.ndarray
    density: np.ndarray
    cdf: np.ndarray
    atom_at_zero: float
    support: tuple[float, float]


def _per_layer(value: float | Sequence[float], num_layers: int, what: str, positive: bool) -> np.ndarray:
    if isinstance(value, (int, float, np.floating, np.integer)):
        arr = np.full(num_layers, float(value))
    else:
        arr = np.asarray(list(value), dtype=float)
        if arr.shape != (num_layers,):
            raise ValueError(f"{what} must be a float or one value per layer ({num_layers}), got {list(value)!r}")
    bad = ~np.isfinite(arr) | ((arr <= 0) if positive else (arr < 0))
    if np.any(bad):
        sign = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be finite and {sign}, got {arr.tolist()!r}")
    return arr


class JacobianLaw:
    r"""Free-probability prediction of the spectrum of :math:`J^T J` (input space, :math:`N_0 \times N_0`).

    Args:
        widths: :math:`[N_0, \dots, N_L]`.
        weight_variances: :math:`\tilde\sigma_\ell^2 = N_{\ell-1}\operatorname{Var}(W_\ell)` (fan-in convention),
            a float or one per layer.
        activations: activation applied after each Linear map (the last layer included), a name for all layers or one
            per layer; names: ``"linear"``, ``"relu"``, ``"hard_tanh"``, ``"tanh"``, ``"erf"``, ``"gelu"``, ``"silu"``.
        bias_variances: :math:`\sigma_{b,\ell}^2` (float or per layer), for the mean-field recursion.
        input_variance: mean square of the input entries, for the mean-field recursion.
        preactivation_variances: override the mean-field :math:`q_\ell` (e.g. measured on a real network).
        smooth_approximation: rational law used for :math:`\phi'(h)^2` of smooth activations, ``"free_poisson"`` or
            ``"two_atom"`` (see :mod:`~lightning_hessian.free_probability.activations`).

    Raises:
        ValueError: bad widths, variances or activation names (the message quotes the value and the allowed ones).

    Example::

        >>> law = JacobianLaw([784, 512, 256, 10], 2.0, ["relu", "relu", "linear"])
        >>> q10, q50, q90 = law.quantiles([0.1, 0.5, 0.9])
    """

    def __init__(
        self,
        widths: Sequence[int],
        weight_variances: float | Sequence[float],
        activations: str | Sequence[str],
        *,
        bias_variances: float | Sequence[float] = 0.0,
        input_variance: float = 1.0,
        preactivation_variances: Sequence[float] | None = None,
        smooth_approximation: SmoothApproximation = "free_poisson",
    ) -> None:
        widths = list(widths)
        if len(widths) < 2 or not all(isinstance(w, (int, np.integer)) and w >= 1 for w in widths):
            raise ValueError(f"widths must be a list [N_0, ..., N_L] of at least two positive ints, got {widths!r}")
        num_layers = len(widths) - 1
        if isinstance(activations, str):
            activations = [activations] * num_layers
        activations = tuple(activations)
        if len(activations) != num_layers:
            raise ValueError(f"need one activation per layer ({num_layers}), got {list(activations)!r}")
        for name in activations:
            if name not in ACTIVATIONS:
                raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}")
        if not (np.isfinite(input_variance) and input_variance > 0):
            raise ValueError(f"input_variance must be positive and finite, got {input_variance!r}")
        self.widths = [int(w) for w in widths]
        self.num_layers = num_layers
        self.activations = activations
        self.weight_variances = _per_layer(weight_variances, num_layers, "weight_variances", positive=True)
        self.bias_variances = _per_layer(bias_variances, num_layers, "bias_variances", positive=False)
        self.input_variance = float(input_variance)
        self.smooth_approximation = smooth_approximation
        if preactivation_variances is None:
            q = mean_field_variances(self.weight_variances, activations, self.bias_variances, self.input_variance)
        else:
            q = _per_layer(list(preactivation_variances), num_layers, "preactivation_variances", positive=True)
        self.preactivation_variances = q
        self.layer_laws = [
            derivative_square_law(name, float(q_l), smooth_approximation) for name, q_l in zip(activations, q)
        ]
        n0, nl = self.widths[0], self.widths[-1]
        constant = nl / n0
        roots = [-1.0]
        for ell, law in enumerate(self.layer_laws):
            ratio = n0 / self.widths[ell + 1]
            constant *= self.weight_variances[ell] * law.scale * ratio ** len(law.roots)
            roots.extend(r / ratio for r in law.roots)
        self.m_inverse = MInverse(constant, roots)
        self._support: tuple[float, float] | None = None

    def __repr__(self) -> str:
        return (
            f"JacobianLaw(widths={self.widths}, weight_variances={self.weight_variances.tolist()}, "
            f"activations={list(self.activations)})"
        )

    # -- closed-form read-outs -----------------------------------------------------------------------------------------
    @property
    def atom_at_zero(self) -> float:
        r"""Mass of the input-space law at zero, :math:`1 + M(0) \ge 1 - \min_\ell N_\ell / N_0`."""
        return self.m_inverse.atom_at_zero

    @property
    def mean(self) -> float:
        r""":math:`m_1 = \frac{N_L}{N_0}\prod_\ell \tilde\sigma_\ell^2 \mu_{1,\ell}` (exact)."""
        return float(self.moments(1)[0])

    @property
    def support(self) -> tuple[float, float]:
        """Edges ``(a, b)`` of the continuous part (``a = 0`` when the density is singular at zero)."""
        if self._support is None:
            self._support = self.m_inverse.support()
        return self._support

    def moments(self, n: int, *, exact: bool = True) -> np.ndarray:
        r"""Moments :math:`m_1, \dots, m_n` of the input-space law of :math:`J^T J`.

        Args:
            n: number of moments.
            exact: use the exact moments of :math:`\nu_\ell` (quadrature) in the S-transform series; ``False`` gives
                the moments of the rational approximation that the density solver uses (identical for linear, ReLU
                and hard-tanh layers).
        """
        if not (isinstance(n, (int, np.integer)) and n >= 1):
            raise ValueError(f"number of moments must be a positive int, got {n!r}")
        if not exact:
            return self.m_inverse.moments(n)
        order = n - 1
        n0, nl = self.widths[0], self.widths[-1]
        s = np.zeros(order + 1)
        s[0] = n0 / nl
        for ell, name in enumerate(self.activations):
            ratio = n0 / self.widths[ell + 1]
            mu = derivative_square_moments(name, float(self.preactivation_variances[ell]), n)
            s_nu = series_compose_scale(moments_to_s_series(mu, order), ratio)
            s = series_mul(s, s_nu, order)
            s = series_mul(s, series_inverse(np.array([1.0, ratio]), order), order) / self.weight_variances[ell]
        return s_series_to_moments(s, n)

    # -- lilypads read-outs --------------------------------------------------------------------------------------------
    def solve(self, z: np.ndarray | complex, **kwargs) -> LilypadResult:
        """Certified :math:`M(z)` at targets in the upper half-plane (see :func:`lilypads.solve`)."""
        return solve(self.m_inverse, z, **kwargs)

    def _warn(self, result: LilypadResult) -> None:
        bad = int(np.sum(~result.certified))
        if bad:
            warnings.warn(
                f"{bad} of {result.certified.size} points could not be certified by the lilypads solver; "
                "they are reported as nan",
                UncertifiedPointWarning,
                stacklevel=3,
            )

    def density(self, x: np.ndarray | Sequence[float] | float, y: float = 1e-4) -> np.ndarray:
        r"""Density of the continuous part at :math:`z = x + iy`.

        .. math:: \rho(x) = -\tfrac1\pi \operatorname{Im}\big((M(z) + 1 - \mu(\{0\}))/z\big)

        The atom at zero is removed, so it does not leak into the density near 0.

        Args:
            x: real points.
            y: imaginary part, ``> 0`` (``1e-4`` as in the paper's benchmark).

        Returns:
            The density at each point; ``nan`` (with an :class:`UncertifiedPointWarning`) where not certified.

        Raises:
            ValueError: ``y <= 0`` or non-finite inputs.
        """
        if not (np.isfinite(y) and y > 0):
            raise ValueError(f"y must be > 0 (the Stieltjes inversion is evaluated above the real axis), got {y!r}")
        x = np.asarray(x, dtype=float)
        res = self.solve(x.ravel() + 1j * y)
        self._warn(res)
        g = (res.m + 1.0 - self.atom_at_zero) / res.z
        return np.maximum(-g.imag / np.pi, 0.0).reshape(x.shape)

    def _solve_real(self, x: np.ndarray) -> LilypadResult:
        """:math:`M(x + i0)` approximated at :math:`x(1 + 10^{-10} i)`, for ``x > 0``."""
        return self.solve(x * (1.0 + 1j * _Y_REL))

    def cdf(self, x: np.ndarray | Sequence[float] | float) -> np.ndarray:
        r"""Distribution function :math:`F(x) = \mu([0, x])` of the full law (atom included).

        Exact closed form :math:`1 - \operatorname{Im}\Phi(M(x + i0))/\pi` (see :class:`~.transforms.MInverse`).
        """
        x = np.asarray(x, dtype=float)
        flat = x.ravel()
        out = np.where(flat < 0, 0.0, 1.0)
        a, b = self.support
        out[(flat >= 0) & (flat <= a)] = self.atom_at_zero
        inside = np.nonzero((flat > a) & (flat < b) & (flat > 0))[0]
        if inside.size:
            res = self._solve_real(flat[inside])
            self._warn(res)
            out[inside] = np.clip(self.m_inverse.cdf_from_m(res.m), 0.0, 1.0)
        return out.reshape(x.shape)

    def _grid(self, num_points: int) -> np.ndarray:
        a, b = self.support
        gamma = float(self.m_inverse.singularity_order) if a == 0.0 else 1.0
        gamma = max(gamma, 1.0)
        # Chebyshev-like clustering at both edges, then x - a ~ t^gamma near the singular edge at zero.
        theta = np.linspace(0.0, np.pi, num_points + 1)[1:]
        t = 0.5 * (1.0 - np.cos(theta))
        # the grid starts at a + 1e-30 (b - a): below, the law has mass ~ (1e-30)^(1/gamma) per unit of t
        tmin = (1e-30) ** (1.0 / gamma)
        t = np.maximum(t, tmin)
        return a + (b - a) * t**gamma

    def spectrum(self, num_points: int = 256) -> SpectrumGrid:
        """Density and distribution function on a grid adapted to the support (``y -> 0`` read-out)."""
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points!r}")
        x = self._grid(num_points)
        res = self._solve_real(x)
        self._warn(res)
        g = (res.m + 1.0 - self.atom_at_zero) / res.z
        density = np.maximum(-g.imag / np.pi, 0.0)
        cdf = np.clip(self.m_inverse.cdf_from_m(res.m), 0.0, 1.0)
        cdf[-1] = 1.0
        return SpectrumGrid(x=x, density=density, cdf=cdf, atom_at_zero=self.atom_at_zero, support=self.support)

    def quantiles(self, q: np.ndarray | Sequence[float] | float, *, tol: float = 1e-10) -> np.ndarray:
        r"""Quantiles of the law restricted to its non-zero part (shared by :math:`J^T J` and :math:`JJ^T`).

        Solves :math:`(F(x) - \mu(\{0\}))/(1 - \mu(\{0\})) = q` with the exact distribution function, by a bracketed
        Illinois iteration on the adaptive grid variable.

        Args:
            q: levels in ``[0, 1]``.
            tol: tolerance on the level.

        Returns:
            The quantiles, same shape as ``q`` (``nan`` where uncertified).
        """
        q = np.asarray(q, dtype=float)
        if np.any(~np.isfinite(q)) or np.any((q < 0) | (q > 1)):
            raise ValueError(f"quantile levels must lie in [0, 1], got {q.tolist()!r}")
        flat = q.ravel()
        atom = self.atom_at_zero
        a, b = self.support
        x_grid = self._grid(64)
        res = self._solve_real(x_grid)
        f_grid = np.clip(self.m_inverse.cdf_from_m(res.m), 0.0, 1.0)
        f_grid[-1] = 1.0
        xs = np.concatenate([[a], x_grid])
        ms = np.concatenate([[np.nan + 0j], res.m])
        fs = np.concatenate([[0.0], (f_grid - atom) / (1.0 - atom)])
        fs = np.fmax.accumulate(np.nan_to_num(fs, nan=-1.0))
        out = np.full(flat.size, np.nan)
        idx = np.clip(np.searchsorted(fs, flat, side="left"), 1, xs.size - 1)
        lo_x, hi_x = xs[idx - 1].copy(), xs[idx].copy()
        lo_m, hi_m = ms[idx - 1].copy(), ms[idx].copy()
        lo_f, hi_f = fs[idx - 1] - flat, fs[idx] - flat
        at_lo = lo_f >= 0
        out[at_lo] = lo_x[at_lo]
        at_hi = ~at_lo & (hi_f <= 0)
        out[at_hi] = hi_x[at_hi]
        todo = np.nonzero(~at_lo & ~at_hi)[0]
        side = np.zeros(flat.size, dtype=int)
        for _ in range(200):
            if todo.size == 0:
                break
            # Illinois (modified regula falsi) step in x, safeguarded by (geometric) bisection.
            xl, xh, fl, fh = lo_x[todo], hi_x[todo], lo_f[todo], hi_f[todo]
            x_new = xh - fh * (xh - xl) / (fh - fl)
            bad = ~np.isfinite(x_new) | (x_new <= xl) | (x_new >= xh)
            x_new[bad] = 0.5 * (xl[bad] + xh[bad])
            wide = (xh > 1e3 * xl) & (xl > 0)
            x_new[wide] = np.sqrt(xl[wide] * xh[wide])
            x_new[xl <= 0] = 1e-3 * xh[xl <= 0]  # below the grid: step down by decades
            # continue from the bracket end closest (in log scale) to the new point
            with np.errstate(divide="ignore"):
                closer = np.log(x_new / np.maximum(xl, 1e-300)) < np.log(xh / x_new)
            use_lo = np.isfinite(lo_m[todo]) & (xl > 0) & closer
            m_proxy = np.where(use_lo, lo_m[todo], hi_m[todo])
            x_proxy = np.where(use_lo, xl, xh)
            res = self.solve(x_new * (1.0 + 1j * _Y_REL), start=(x_proxy * (1.0 + 1j * _Y_REL), m_proxy))
            f_new = np.clip(self.m_inverse.cdf_from_m(res.m), 0.0, 1.0)
            f_new = (f_new - atom) / (1.0 - atom) - flat[todo]
            failed = ~res.certified
            out[todo[failed]] = np.nan
            ok = ~failed
            t_ok, x_ok, f_ok, m_ok = todo[ok], x_new[ok], f_new[ok], res.m[ok]
            up = f_ok < 0
            t_up, t_dn = t_ok[up], t_ok[~up]
            lo_x[t_up], lo_f[t_up], lo_m[t_up] = x_ok[up], f_ok[up], m_ok[up]
            hi_x[t_dn], hi_f[t_dn], hi_m[t_dn] = x_ok[~up], f_ok[~up], m_ok[~up]
            # Illinois: halve the stale end when the same side moves twice
            same_up = t_up[side[t_up] == 1]
            hi_f[same_up] *= 0.5
            same_dn = t_dn[side[t_dn] == -1]
            lo_f[same_dn] *= 0.5
            side[t_up], side[t_dn] = 1, -1
            out[t_ok] = x_ok
            converged = (np.abs(f_ok) <= tol) | ((hi_x[t_ok] - lo_x[t_ok]) <= 1e-13 * hi_x[t_ok])
            todo = t_ok[~converged]
        return out.reshape(q.shape)

    # -- from a real module --------------------------------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        example_input: Tensor,
        *,
        smooth_approximation: SmoothApproximation = "free_poisson",
    ) -> JacobianLaw:
        """Law of a real MLP: its widths, actual weight/bias variances and measured pre-activation variances.

        Reads ``Linear`` layers with elementwise activations (``ReLU``, ``Tanh``, ``Hardtanh(-1, 1)``, ``GELU``,
        ``SiLU``, ``Identity``; ``Flatten`` before the first layer and ``Dropout`` are ignored) from an
        ``nn.Sequential`` (nested ones are flattened) or from any module that ``torch.fx`` traces to such a chain.

        Args:
            module: the network.
            example_input: a batch of inputs; its mean square and the pre-activation variances it produces are used.
            smooth_approximation: see :class:`JacobianLaw`.

        Raises:
            UnsupportedArchitectureError: anything else (convolutions, normalisation, residual connections...).
        """
        spec = read_mlp(module, example_input)
        return cls(
            spec.widths,
            spec.weight_variances,
            spec.activations,
            bias_variances=spec.bias_variances,
            input_variance=spec.input_variance,
            preactivation_variances=spec.preactivation_variances,
            smooth_approximation=smooth_approximation,
        )
