r"""Metric names and the writing of probe results: ``pl_module.log`` scalars and TensorBoard extras.

Every logged key is built here from a name in :data:`METRICS` (the one place that names metrics): the key is
``f"{prefix}/{name}"`` with ``prefix="hessian"`` by default. Scalars go through ``pl_module.log`` on every rank, so
``EarlyStopping``/``ModelCheckpoint`` see them in the same epoch and every logger receives them. The TensorBoard extras
(histograms, the SLQ density as a raw histogram, a rank-plot figure, a custom-scalar layout and a text summary) are
written on global rank 0 only, through the first logger whose ``experiment`` looks like a ``SummaryWriter``
(duck-typed, so ``lightning.pytorch`` and ``pytorch_lightning`` loggers and tensorboardX writers all work).

Analyses describe their TensorBoard output with the small item classes :class:`Histogram`, :class:`RawHistogram`,
:class:`FigureItem` and :class:`Text`; :func:`write_items` renders them, so analyses never touch a writer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "METRICS",
    "FigureItem",
    "Histogram",
    "MetricInfo",
    "RawHistogram",
    "Text",
    "TensorBoardItem",
    "custom_scalar_layout",
    "density_raw_histogram",
    "find_tensorboard_writer",
    "jacobian_overlay",
    "log_scalars",
    "metric_key",
    "metrics_table",
    "rank_plot",
    "slq_raw_histogram",
    "write_items",
]


@dataclass(frozen=True)
class MetricInfo:
    """Documentation of one logged scalar.

    Attributes:
        name: key suffix (the key is ``f"{prefix}/{name}"``).
        meaning: one-line definition.
        direction: ``"lower"``/``"higher"`` where lower/higher is better in the literature, else ``"-"``.
        schedule: ``"probe"`` (every probe), ``"full"`` (full probes only: power-law test, density).
    """

    name: str
    meaning: str
    direction: Literal["lower", "higher", "-"]
    schedule: Literal["probe", "full"]


LAMBDA_MAX = "lambda_max"
SPECTRAL_GAP = "spectral_gap"
SPECTRAL_GAP_RATIO = "spectral_gap_ratio"
POWERLAW_BETA = "powerlaw_beta"
POWERLAW_S = "powerlaw_s"
POWERLAW_BETA_STDERR = "powerlaw_beta_stderr"
KS_DISTANCE = "ks_distance"
KS_CRITICAL = "ks_critical"
IS_POWER_LAW = "is_power_law"
TRACE = "trace"
SUBSPACE_OVERLAP = "subspace_overlap"
HVPS = "hvps"
PROBE_SECONDS = "probe_seconds"
NEAR_ZERO_FRACTION = "near_zero_fraction"

#: Every scalar the core callback logs, in dashboard order.
METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo(LAMBDA_MAX, "largest Hessian eigenvalue λ₁ of the probe loss (sharpness)", "lower", "probe"),
        MetricInfo(SPECTRAL_GAP, "λ₁ − λ₂", "-", "probe"),
        MetricInfo(SPECTRAL_GAP_RATIO, "λ₁ / λ₂ (ratio of the two largest eigenvalues)", "-", "probe"),
        MetricInfo(POWERLAW_BETA, "MLE power-law density exponent β̂ = 1 + K / Σ ln(λ_i/λ_K) of the top K", "-", "full"),
        MetricInfo(POWERLAW_S, "rank exponent ŝ = 1/(β̂ − 1) of λ_k ∝ k^(−s); smaller: flatter", "lower", "full"),
        MetricInfo(POWERLAW_BETA_STDERR, "standard error (β̂ − 1)/√K of β̂", "-", "full"),
        MetricInfo(KS_DISTANCE, "KS distance d_ks of the top-K eigenvalues to the fitted power law", "lower", "full"),
        MetricInfo(KS_CRITICAL, "critical value d_c = c(ks_level)/√K (1.36/√K at 0.05)", "-", "full"),
        MetricInfo(IS_POWER_LAW, "1.0 if d_ks < d_c (power law not rejected), else 0.0", "higher", "full"),
        MetricInfo(TRACE, "Hutchinson estimate of tr(H)", "lower", "probe"),
        MetricInfo(
            SUBSPACE_OVERLAP,
            "‖V_prevᵀ V_cur‖²_F / k of the top-k eigenspaces of consecutive probes (1 = same; 0 on the first)",
            "-",
            "probe",
        ),
        MetricInfo(
            NEAR_ZERO_FRACTION,
            "SLQ estimate of the fraction of eigenvalues with |λ| ≤ 1e-3·max|λ| (rank deficiency, Singh et al. 2021)",
            "-",
            "full",
        ),
        MetricInfo(HVPS, "Hessian-vector products spent by this probe", "-", "probe"),
        MetricInfo(PROBE_SECONDS, "wall-clock seconds of this probe", "-", "probe"),
    )
}


def metric_key(prefix: str, name: str) -> str:
    """The logged key ``f"{prefix}/{name}"`` of a metric name (``name`` may itself contain ``/``)."""
    return f"{prefix}/{name}"


def metrics_table(prefix: str = "hessian") -> str:
    """Markdown table of :data:`METRICS` (key, meaning, better, when) for the README."""
    rows = ["| key | meaning | better | logged on |", "|---|---|---|---|"]
    when = {"probe": "every probe", "full": "full probes"}
    for m in METRICS.values():
        rows.append(f"| `{metric_key(prefix, m.name)}` | {m.meaning} | {m.direction} | {when[m.schedule]} |")
    return "\n".join(rows)


def log_scalars(pl_module: Any, scalars: Mapping[str, float], *, sync_dist: bool = False) -> None:
    """Log epoch-level scalars through ``pl_module.log`` (visible to callbacks and every logger).

    Args:
        pl_module: the LightningModule (inside a hook where ``log`` is allowed).
        scalars: key -> value; values are logged as float64 tensors on the module's device.
        sync_dist: mean-reduce across ranks (values are already identical there; this only silences Lightning's
            per-key warning under DDP).
    """
    for key, value in scalars.items():
        tensor = torch.tensor(float(value), dtype=torch.float64, device=pl_module.device)
        pl_module.log(key, tensor, on_step=False, on_epoch=True, sync_dist=sync_dist, batch_size=1)


def find_tensorboard_writer(trainer: Any) -> Any | None:
    """The first TensorBoard-like ``SummaryWriter`` of ``trainer.loggers`` on global rank 0, else ``None``.

    Duck-typed: a logger qualifies when its ``experiment`` has ``add_histogram``, ``add_histogram_raw`` and
    ``add_custom_scalars``. The rank test comes first because on other ranks ``experiment`` is a dummy object that
    answers every attribute.
    """
    if not getattr(trainer, "is_global_zero", True):
        return None
    for logger in getattr(trainer, "loggers", []) or []:
        try:
            experiment = logger.experiment
        except Exception:  # a logger that fails to create its experiment must not break the probe
            continue
        if all(hasattr(experiment, a) for a in ("add_histogram", "add_histogram_raw", "add_custom_scalars")):
            return experiment
    return None


@dataclass
class Histogram:
    """Histogram of raw values (``SummaryWriter.add_histogram``)."""

    tag: str
    values: Tensor


@dataclass
class RawHistogram:
    """Precomputed histogram (``SummaryWriter.add_histogram_raw``); ``bucket_limits`` are right edges."""

    tag: str
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float
    bucket_limits: list[float]
    bucket_counts: list[float]


@dataclass
class FigureItem:
    """A matplotlib figure, built lazily on rank 0 only (``make`` returns a ``matplotlib.figure.Figure``)."""

    tag: str
    make: Callable[[], Any]


@dataclass
class Text:
    """Markdown text (``SummaryWriter.add_text``)."""

    tag: str
    text: str


TensorBoardItem = Histogram | RawHistogram | FigureItem | Text


def write_items(writer: Any, items: Iterable[TensorBoardItem], step: int) -> list[str]:
    """Write TensorBoard items at ``step``; returns the tags written. Figures are skipped without matplotlib."""
    written: list[str] = []
    for item in items:
        if isinstance(item, Histogram):
            values = item.values.detach().to("cpu", torch.float64)
            values = values[torch.isfinite(values)]
            if values.numel() == 0:
                continue
            writer.add_histogram(item.tag, values, global_step=step)
        elif isinstance(item, RawHistogram):
            writer.add_histogram_raw(
                item.tag,
                min=item.min,
                max=item.max,
                num=item.num,
                sum=item.sum,
                sum_squares=item.sum_squares,
                bucket_limits=item.bucket_limits,
                bucket_counts=item.bucket_counts,
                global_step=step,
            )
        elif isinstance(item, FigureItem):
            try:
                figure = item.make()
            except ImportError:
                continue
            writer.add_figure(item.tag, figure, global_step=step, close=False)
        elif isinstance(item, Text):
            writer.add_text(item.tag, item.text, global_step=step)
        else:
            raise TypeError(f"Unknown TensorBoard item {item!r}.")
        written.append(item.tag)
    return written


def custom_scalar_layout(
    prefix: str,
    extra_keys: Sequence[str] = (),
    *,
    jacobian_prefix: str | None = None,
    embedding_prefix: str | None = None,
) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalar layout (``SummaryWriter.add_custom_scalars``) of the metrics under ``prefix``.

    Chart entries are anchored regular expressions of the exact keys. ``extra_keys`` (e.g. per-layer keys) get one
    chart each in a second category; ``jacobian_prefix`` / ``embedding_prefix`` add the Jacobian-law and condensation
    charts.
    """

    def tags(*names: str) -> list[Any]:
        return ["Multiline", [f"^{re.escape(metric_key(prefix, n))}$" for n in names]]

    layout: dict[str, dict[str, list[Any]]] = {
        f"Hessian spectrum ({prefix})": {
            "sharpness λ_max": tags(LAMBDA_MAX),
            "trace": tags(TRACE),
            "spectral gap": tags(SPECTRAL_GAP, SPECTRAL_GAP_RATIO),
            "power-law exponents β̂, ŝ": tags(POWERLAW_BETA, POWERLAW_S),
            "KS distance vs critical value": tags(KS_DISTANCE, KS_CRITICAL),
            "power law accepted": tags(IS_POWER_LAW),
            "top-k subspace overlap": tags(SUBSPACE_OVERLAP),
            "near-zero fraction (rank deficiency)": tags(NEAR_ZERO_FRACTION),
            "cost (HVPs, seconds)": tags(HVPS, PROBE_SECONDS),
        }
    }
    if extra_keys:
        layout[f"Hessian per layer ({prefix})"] = {k: ["Multiline", [f"^{re.escape(k)}$"]] for k in extra_keys}
    if jacobian_prefix is not None:
        jac = re.escape(jacobian_prefix)
        layout[f"Jacobian law ({jacobian_prefix})"] = {
            "FPT deciles (non-zero part)": ["Multiline", [rf"^{jac}/fpt_q\d+$"]],
            "atom at zero, mean": ["Multiline", [f"^{jac}/atom_at_zero$", f"^{jac}/mean$"]],
            "distance measured vs predicted": ["Multiline", [f"^{jac}/law_distance$"]],
        }
    if embedding_prefix is not None:
        emb = re.escape(embedding_prefix)
        layout[f"Neuron condensation ({embedding_prefix})"] = {
            "effective width per layer": ["Multiline", [f"^{emb}/effective_width/.+$"]],
            "merge output error": ["Multiline", [f"^{emb}/merge_output_error$"]],
        }
    return layout


def slq_raw_histogram(
    tag: str, nodes: Tensor, weights: Tensor, num_params: int, num_bins: int = 64
) -> RawHistogram | None:
    r"""SLQ spectral density as a raw histogram whose counts estimate numbers of eigenvalues.

    The SLQ estimate of the spectral measure is :math:`\hat\mu = \frac{1}{P}\sum_{p}\sum_j w_{pj}\,\delta_{\theta_{pj}}`
    (Ghorbani et al. 2019); the histogram puts mass :math:`n\,\hat\mu(\text{bin})` in each of ``num_bins`` equal bins
    on ``[min θ, max θ]``, so the counts sum to the parameter count :math:`n`, ``sum`` estimates
    :math:`\operatorname{tr}H` and ``sum_squares`` estimates :math:`\operatorname{tr}H^2`.

    Args:
        tag: TensorBoard tag.
        nodes: ``(P, m)`` Ritz values.
        weights: ``(P, m)`` Gauss weights (rows sum to 1).
        num_params: the dimension ``n``.
        num_bins: number of equal-width buckets.

    Returns:
        The item, or ``None`` when the nodes are not finite.
    """
    theta = nodes.detach().to("cpu", torch.float64).reshape(-1)
    mass = weights.detach().to("cpu", torch.float64).reshape(-1) * (num_params / nodes.shape[0])
    if theta.numel() == 0 or not bool(torch.isfinite(theta).all() and torch.isfinite(mass).all()):
        return None
    lo, hi = float(theta.min()), float(theta.max())
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    edges = torch.linspace(lo, hi, num_bins + 1, dtype=torch.float64)
    index = torch.bucketize(theta, edges[1:-1], right=False)
    counts = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, index, mass)
    return RawHistogram(
        tag=tag,
        min=lo,
        max=hi,
        num=float(mass.sum()),
        sum=float((mass * theta).sum()),
        sum_squares=float((mass * theta * theta).sum()),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
    )


def rank_plot(
    eigenvalues: Tensor,
    *,
    s: float,
    cutoff_rank: int,
    ks_distance: float,
    ks_critical: float,
    title: str = "",
) -> Any:
    r"""Rank plot :math:`\log\lambda_k` vs :math:`\log k` with the fitted line and the KS verdict.

    The fitted line is the MLE law anchored at the cutoff, :math:`\lambda_k = \lambda_K (k/K)^{-\hat s}`.
    Built with :class:`matplotlib.figure.Figure` (no pyplot, no global backend change).

    Raises:
        ImportError: when matplotlib is not installed (callers skip the figure).
    """
    from matplotlib.figure import Figure  # optional dependency

    eig = eigenvalues.detach().to("cpu", torch.float64)
    eig = eig[eig > 0]
    ranks = torch.arange(1, eig.numel() + 1, dtype=torch.float64)
    figure = Figure(figsize=(4.5, 3.4), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    axes.loglog(ranks.numpy(), eig.numpy(), ".", markersize=3, label="λ_k")
    if eig.numel() >= 2 and math.isfinite(s) and 1 <= cutoff_rank <= eig.numel():
        anchor = float(eig[cutoff_rank - 1])
        line = anchor * (ranks / cutoff_rank) ** (-s)
        axes.loglog(ranks.numpy(), line.numpy(), "-", linewidth=1, label=f"fit ŝ = {s:.3f}")
    verdict = "power law" if ks_distance < ks_critical else "not power law"
    axes.set_title(f"{title}{verdict}: d_ks={ks_distance:.4f}, d_c={ks_critical:.4f}", fontsize=8)
    axes.set_xlabel("rank k")
    axes.set_ylabel("eigenvalue λ_k")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def density_raw_histogram(tag: str, grid: Any, density: Any) -> RawHistogram | None:
    r"""A density sampled on a (non-uniform) grid as a raw histogram.

    Bucket :math:`[x_i, x_{i+1}]` holds the trapezoid mass :math:`\tfrac12(\rho_i + \rho_{i+1})(x_{i+1} - x_i)`.

    Returns:
        The item, or ``None`` when fewer than two finite grid points remain.
    """
    x = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    rho = torch.as_tensor(density, dtype=torch.float64).reshape(-1)
    keep = torch.isfinite(x) & torch.isfinite(rho)
    x, rho = x[keep], rho[keep].clamp_min(0)
    if x.numel() < 2:
        return None
    order = torch.argsort(x)
    x, rho = x[order], rho[order]
    mass = 0.5 * (rho[1:] + rho[:-1]) * (x[1:] - x[:-1])
    mid = 0.5 * (x[1:] + x[:-1])
    return RawHistogram(
        tag=tag,
        min=float(x[0]),
        max=float(x[-1]),
        num=float(mass.sum()),
        sum=float((mass * mid).sum()),
        sum_squares=float((mass * mid * mid).sum()),
        bucket_limits=x[1:].tolist(),
        bucket_counts=mass.tolist(),
    )


def jacobian_overlay(report: Any, *, title: str = "") -> Any:
    r"""Predicted density of :math:`J^\top J` (continuous part) over a histogram of the measured eigenvalues.

    ``report`` is a :class:`~lightning_hessian.free_probability.JacobianReport`; the measured non-zero eigenvalues are
    weighted so that both curves carry the continuous mass :math:`1 - \text{atom}`; log-spaced bins.

    Raises:
        ImportError: when matplotlib is not installed (callers skip the figure).
    """
    import numpy as np
    from matplotlib.figure import Figure  # optional dependency

    figure = Figure(figsize=(4.5, 3.4), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    values = np.asarray(report.measured_eigenvalues, dtype=float)
    weights = np.asarray(report.measured_weights, dtype=float)
    positive = values > max(1e-12, 1e-10 * float(values.max(initial=0.0)))
    grid = np.asarray(report.grid, dtype=float)
    density = np.asarray(report.density, dtype=float)
    live = grid > 0
    if positive.any():
        low, high = values[positive].min(), values[positive].max()
        bins = np.geomspace(low, high * (1 + 1e-9), 30)
        axes.hist(
            values[positive],
            bins=bins,
            weights=weights[positive],
            density=False,
            alpha=0.4,
            label=f"measured (atom {report.measured_atom_at_zero:.3f})",
        )
        # histogram counts are masses; convert the density to masses of the same bins for a like-for-like overlay
        centres = np.sqrt(bins[1:] * bins[:-1])
        predicted = np.interp(centres, grid[live], density[live]) * np.diff(bins)
        axes.plot(centres, predicted, "-", label=f"predicted (atom {report.atom_at_zero:.3f})")
        axes.set_xscale("log")
    axes.set_title(f"{title} JᵀJ law: KS distance {report.law_distance:.3f}", fontsize=8)
    axes.set_xlabel("eigenvalue of JᵀJ")
    axes.set_ylabel("mass per bin")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure
