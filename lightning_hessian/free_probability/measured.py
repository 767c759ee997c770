r"""Measured spectrum of :math:`J^T J` of a real network, its distance to the predicted law, and a one-call report.

The measured law is the empirical spectral distribution of the :math:`N_0 \times N_0` matrix :math:`J(x)^T J(x)`,
:math:`J(x) = \partial f(x) / \partial x`, pooled over the probe inputs :math:`x` (every input weighs the same).

* ``method="exact"``: :math:`J(x)` by ``torch.func`` (``jacrev`` when :math:`N_L \le N_0`, else ``jacfwd``) in float64,
  eigenvalues as squared singular values, padded with the :math:`N_0 - \min(N_0, N_L)` structural zeros.
* ``method="slq"``: matrix-free stochastic Lanczos quadrature (Ghorbani et al. 2019) on
  :math:`v \mapsto J^T (J v)` built from one ``jvp`` and one ``vjp``; the pooled Gauss nodes and weights form a
  weighted discrete law (for input dimensions where the dense Jacobian does not fit).

Distances between the measured law and :class:`~lightning_hessian.free_probability.law.JacobianLaw` compare the
*non-zero parts* (the quantities logged as FPT metrics): Kolmogorov :math:`\sup_x |F_{emp}(x) - F(x)|` or
Wasserstein-1 :math:`\int |F_{emp}(x) - F(x)|\,dx`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from lightning_hessian.free_probability.activations import SmoothApproximation
from lightning_hessian.free_probability.law import JacobianLaw

__all__ = ["JacobianReport", "MeasuredSpectrum", "jacobian_eigenvalues", "jacobian_report", "law_distance"]

DEFAULT_QUANTILES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class MeasuredSpectrum:
    """Pooled spectrum of :math:`J^T J` over probe inputs.

    Attributes:
        values: eigenvalues (or quadrature nodes), ascending.
        weights: probability weights of ``values`` (sum to 1).
        input_dim: :math:`N_0`.
        num_inputs: number of probe inputs pooled.
        exact: ``True`` for dense eigenvalues, ``False`` for stochastic Lanczos quadrature.
    """

    values: np.ndarray
    weights: np.ndarray
    input_dim: int
    num_inputs: int
    exact: bool

    def nonzero(self, zero_tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray, float]:
        """Non-zero part ``(values, normalised weights, mass at zero)``; zero means ``<= zero_tol * max``."""
        top = float(self.values.max()) if self.values.size else 0.0
        keep = self.values > zero_tol * top
        mass = float(self.weights[keep].sum())
        atom = max(0.0, 1.0 - mass)
        if mass <= 0:
            return self.values[:0], self.weights[:0], 1.0
        return self.values[keep], self.weights[keep] / mass, atom

    def quantiles(self, levels: Sequence[float], zero_tol: float = 1e-8) -> np.ndarray:
        """Quantiles of the non-zero part (lower quantile of the weighted empirical law)."""
        values, weights, _ = self.nonzero(zero_tol)
        if values.size == 0:
            return np.full(len(levels), np.nan)
        cdf = np.cumsum(weights)
        idx = np.searchsorted(cdf, np.asarray(levels, dtype=float) - 1e-12, side="left")
        return values[np.clip(idx, 0, values.size - 1)]

    @property
    def mean(self) -> float:
        r"""Mean eigenvalue :math:`\operatorname{tr}(J^T J)/N_0` averaged over inputs."""
        return float(np.sum(self.values * self.weights))


def _sample_function(model: nn.Module, sample_shape: torch.Size):
    def f(x_flat: Tensor) -> Tensor:
        return model(x_flat.reshape(1, *sample_shape)).reshape(-1)

    return f


def jacobian_eigenvalues(
    module: nn.Module,
    inputs: Tensor,
    *,
    method: Literal["auto", "exact", "slq"] = "auto",
    max_dense_entries: int = 2**24,
    num_probes: int = 4,
    num_steps: int = 64,
    seed: int = 0,
) -> MeasuredSpectrum:
    r"""Eigenvalues of :math:`J(x)^T J(x)` at every probe input, pooled (module docstring).

    Args:
        module: the network; evaluated on a float64 copy in eval mode (the module itself is untouched).
        inputs: a batch of probe inputs (first dimension = batch).
        method: ``"exact"``, ``"slq"``, or ``"auto"`` (exact when the batch of Jacobians has at most
            ``max_dense_entries`` entries).
        max_dense_entries: size limit of the dense path for ``"auto"``.
        num_probes: SLQ probe vectors per input.
        num_steps: Lanczos steps per SLQ probe.
        seed: SLQ seed.

    Raises:
        ValueError: an unknown ``method`` or an empty batch.
    """
    if method not in ("auto", "exact", "slq"):
        raise ValueError(f"method must be 'auto', 'exact' or 'slq', got {method!r}")
    if inputs.dim() < 1 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch, got shape {tuple(inputs.shape)}")
    model = copy.deepcopy(module).to(dtype=torch.float64).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = inputs.detach().to(dtype=torch.float64)
    sample_shape = x.shape[1:]
    n0 = int(np.prod(sample_shape)) if len(sample_shape) else 1
    x_flat = x.reshape(x.shape[0], n0)
    f = _sample_function(model, sample_shape)
    with torch.no_grad():
        nl = int(f(x_flat[0]).numel())
    if method == "auto":
        method = "exact" if x.shape[0] * n0 * nl <= max_dense_entries else "slq"
    if method == "exact":
        jac_fn = torch.func.jacrev(f) if nl <= n0 else torch.func.jacfwd(f)
        jac = torch.func.vmap(jac_fn)(x_flat)  # (B, N_L, N_0)
        s = torch.linalg.svdvals(jac)  # (B, min)
        eig = torch.zeros(x.shape[0], n0, dtype=torch.float64, device=s.device)
        eig[:, : s.shape[1]] = s**2
        values = np.sort(eig.cpu().numpy().ravel())
        return MeasuredSpectrum(values, np.full(values.size, 1.0 / values.size), n0, x.shape[0], True)

    from lightning_hessian.lanczos import stochastic_lanczos_quadrature

    nodes, weights = [], []
    for b in range(x.shape[0]):
        point = x_flat[b]

        def matvec(v: Tensor, point: Tensor = point) -> Tensor:
            _, jv = torch.func.jvp(f, (point,), (v.to(point.dtype),))
            _, vjp = torch.func.vjp(f, point)
            return vjp(jv)[0]

        quad = stochastic_lanczos_quadrature(
            matvec, n0, num_probes=num_probes, num_steps=min(num_steps, n0), seed=seed + b, device=point.device
        )
        nodes.append(quad.nodes.reshape(-1).cpu().numpy())
        weights.append(quad.weights.reshape(-1).cpu().numpy() / quad.nodes.shape[0])
    values = np.concatenate(nodes)
    w = np.concatenate(weights) / x.shape[0]
    order = np.argsort(values)
    return MeasuredSpectrum(np.maximum(values[order], 0.0), w[order] / w.sum(), n0, x.shape[0], False)


def _predicted_nonzero_cdf(law: JacobianLaw, x: np.ndarray) -> np.ndarray:
    atom = law.atom_at_zero
    if x.size <= 4096:
        f = law.cdf(x)
    else:
        grid = law.spectrum(2048)
        f = np.interp(x, np.concatenate([[0.0], grid.x]), np.concatenate([[atom], grid.cdf]))
    return np.clip((f - atom) / (1.0 - atom), 0.0, 1.0)


def law_distance(
    measured: MeasuredSpectrum,
    law: JacobianLaw,
    *,
    metric: Literal["ks", "w1"] = "ks",
    zero_tol: float = 1e-8,
) -> float:
    r"""Distance between the non-zero parts of the measured and predicted laws.

    Args:
        measured: from :func:`jacobian_eigenvalues`.
        law: the prediction.
        metric: ``"ks"`` (Kolmogorov, :math:`\sup|F_{emp} - F|`, in [0, 1]) or ``"w1"`` (Wasserstein-1,
            :math:`\int|F_{emp} - F|dx`, in units of eigenvalues).
        zero_tol: measured eigenvalues ``<= zero_tol * max`` count as zero.

    Returns:
        The distance (``nan`` when the measured spectrum has no non-zero eigenvalue or the prediction is uncertified).
    """
    if metric not in ("ks", "w1"):
        raise ValueError(f"metric must be 'ks' or 'w1', got {metric!r}")
    values, weights, _ = measured.nonzero(zero_tol)
    if values.size == 0:
        return float("nan")
    uniq, inverse = np.unique(values, return_inverse=True)
    w = np.bincount(inverse, weights=weights)
    emp_after = np.minimum(np.cumsum(w), 1.0)
    emp_before = emp_after - w
    if metric == "ks":
        pred = _predicted_nonzero_cdf(law, uniq)
        return float(np.max(np.maximum(np.abs(emp_after - pred), np.abs(emp_before - pred))))
    a, b = law.support
    grid = law.spectrum(1024).x
    xs = np.unique(np.concatenate([[0.0], grid, uniq, [max(b, uniq[-1])]]))
    pred = _predicted_nonzero_cdf(law, xs)
    emp = np.concatenate([[0.0], emp_after])[np.searchsorted(uniq, xs, side="right")]
    # emp is right-continuous and piecewise constant; integrate |emp - pred| by the trapezoid rule on the merged grid
    # using the left value of emp on each cell (exact for the step part, second order for the smooth part).
    left = np.abs(emp[:-1] - pred[:-1])
    right = np.abs(emp[:-1] - pred[1:])
    return float(np.sum(0.5 * (left + right) * np.diff(xs)))


@dataclass
class JacobianReport:
    r"""Everything the callback logs about the Jacobian law (see :func:`jacobian_report`).

    Attributes:
        levels: quantile levels.
        quantiles: predicted quantiles of the non-zero part of the law of :math:`J^T J`.
        atom_at_zero: predicted mass at zero of the input-space law.
        mean: predicted mean :math:`m_1 = \operatorname{tr}(J^T J)/N_0`.
        law_distance: Kolmogorov distance between measured and predicted non-zero parts.
        grid: predicted density grid (support of the continuous part, adapted to edges and the singularity at 0).
        density: predicted density on ``grid``.
        measured_eigenvalues: pooled eigenvalues of :math:`J^T J` at the probe inputs (ascending).
        measured_weights: their weights.
        measured_quantiles: quantiles of the measured non-zero part at ``levels``.
        measured_atom_at_zero: measured fraction of zero eigenvalues.
        measured_mean: measured mean eigenvalue.
        law: the :class:`JacobianLaw` used.
    """

    levels: np.ndarray
    quantiles: np.ndarray
    atom_at_zero: float
    mean: float
    law_distance: float
    grid: np.ndarray
    density: np.ndarray
    measured_eigenvalues: np.ndarray
    measured_weights: np.ndarray
    measured_quantiles: np.ndarray
    measured_atom_at_zero: float
    measured_mean: float
    law: JacobianLaw = field(repr=False)


def jacobian_report(
    module: nn.Module,
    inputs: Tensor,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    grid_points: int = 128,
    max_inputs: int = 16,
    method: Literal["auto", "exact", "slq"] = "auto",
    smooth_approximation: SmoothApproximation = "free_poisson",
) -> JacobianReport:
    """Predicted law of :math:`J^T J` for ``module`` and the measured spectrum beside it, in one call.

    Args:
        module: an MLP (see :meth:`JacobianLaw.from_module`).
        inputs: probe inputs; all of them set the variances, the first ``max_inputs`` are measured.
        quantiles: levels of the FPT metrics (quantiles of the non-zero part).
        grid_points: size of the predicted density grid.
        max_inputs: number of inputs whose Jacobian spectrum is measured.
        method: see :func:`jacobian_eigenvalues`.
        smooth_approximation: see :class:`JacobianLaw`.

    Raises:
        UnsupportedArchitectureError: ``module`` is not a supported MLP.
    """
    levels = np.asarray(quantiles, dtype=float)
    law = JacobianLaw.from_module(module, inputs, smooth_approximation=smooth_approximation)
    measured = jacobian_eigenvalues(module, inputs[:max_inputs], method=method)
    spectrum = law.spectrum(grid_points)
    _, _, measured_atom = measured.nonzero()
    return JacobianReport(
        levels=levels,
        quantiles=law.quantiles(levels),
        atom_at_zero=law.atom_at_zero,
        mean=law.mean,
        law_distance=law_distance(measured, law),
        grid=spectrum.x,
        density=spectrum.density,
        measured_eigenvalues=measured.values,
        measured_weights=measured.weights,
        measured_quantiles=measured.quantiles(levels),
        measured_atom_at_zero=measured_atom,
        measured_mean=measured.mean,
        law=law,
    )
