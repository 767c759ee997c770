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
    "MARGINS",
    "MATPLOTLIB_MISSING",
    "RawHistogram",
    "Scalar",
    "Text",
    "TensorBoardItem",
    "custom_scalar_layout",
    "density_raw_histogram",
    "find_tensorboard_writer",
    "fitted_rank_law",
    "jacobian_overlay",
    "log_scalars",
    "margin_items",
    "margin_tags",
    "matplotlib_available",
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
KS_RATIO = "ks_ratio"
TRACE_STDERR = "trace_stderr"
#: Histogram tags (suffixes): the full probe's top-K eigenvalues and the tracked top ``num_tracked`` of every probe.
EIGENVALUES_TOP_K = "eigenvalues/top_k"
EIGENVALUES_TRACKED = "eigenvalues/tracked"
#: TensorBoard-only band tags of a margin chart: ``f"{key}/lower"`` and ``f"{key}/upper"`` (value ± its stderr).
MARGINS: dict[str, str] = {}  # filled below: value name -> stderr name

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
        MetricInfo(KS_RATIO, "d_ks / d_c: below 1 the power law is accepted", "lower", "full"),
        MetricInfo(IS_POWER_LAW, "1.0 if d_ks < d_c (power law not rejected), else 0.0", "higher", "full"),
        MetricInfo(TRACE, "Hutchinson estimate of tr(H)", "lower", "probe"),
        MetricInfo(TRACE_STDERR, "standard error of the Hutchinson estimate (sample std / √samples)", "-", "probe"),
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
MARGINS.update({POWERLAW_BETA: POWERLAW_BETA_STDERR, TRACE: TRACE_STDERR})


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


@dataclass
class Scalar:
    """A TensorBoard-only scalar (``SummaryWriter.add_scalar``), e.g. the band of a margin chart."""

    tag: str
    value: float


TensorBoardItem = Histogram | RawHistogram | FigureItem | Text | Scalar


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
        elif isinstance(item, Scalar):
            writer.add_scalar(item.tag, item.value, global_step=step)
        else:
            raise TypeError(f"Unknown TensorBoard item {item!r}.")
        written.append(item.tag)
    return written


def margin_tags(key: str) -> tuple[str, str, str]:
    """``(value, lower, upper)`` tags of the margin chart of a logged ``key`` (bands are TensorBoard-only tags)."""
    return key, f"{key}/lower", f"{key}/upper"


def margin_items(prefix: str, scalars: Mapping[str, float]) -> list[Scalar]:
    r"""TensorBoard band scalars :math:`v \pm \mathrm{se}` for every :data:`MARGINS` pair present in ``scalars``.

    Written to TensorBoard only (not through ``pl_module.log``), so monitors and other loggers see no extra keys; a
    non-finite value or stderr writes no band.
    """
    items: list[Scalar] = []
    for name, stderr_name in MARGINS.items():
        value = scalars.get(metric_key(prefix, name))
        stderr = scalars.get(metric_key(prefix, stderr_name))
        if value is None or stderr is None or not (math.isfinite(value) and math.isfinite(stderr)):
            continue
        _, lower, upper = margin_tags(metric_key(prefix, name))
        items += [Scalar(lower, value - stderr), Scalar(upper, value + stderr)]
    return items


def custom_scalar_layout(
    prefix: str,
    extra_keys: Sequence[str] = (),
    *,
    jacobian_prefix: str | None = None,
    embedding_prefix: str | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalar layout (``SummaryWriter.add_custom_scalars``) of the metrics under ``prefix``.

    Built to read with TensorBoard's defaults (smoothing 0.6, "ignore outliers in chart scaling" on, checked in
    headless Chromium with ``tools/dashboard_screenshots.py``): TensorBoard colours a chart's lines by run, not by
    tag, so every chart holds one quantity (HVPs and seconds apart, ``d_ks`` and ``d_c`` apart, the verdict on one
    scale as ``ks_ratio = d_ks / d_c``, accepted below 1). Every chart is a ``Margin`` chart, which TensorBoard draws
    without smoothing: a quantity with an uncertainty has the band value ± stderr (tags from :func:`margin_tags`:
    ``powerlaw_beta`` ± ``powerlaw_beta_stderr``, ``trace`` ± ``trace_stderr``; the Jacobian median has its 10-90 %
    deciles), any other the degenerate band ``[key, key, key]`` (whose triplicated values also keep the extremes of a
    series of up to 13 points inside the 5-95 % quantiles that "ignore outliers" scales to).

    ``Margin`` charts name exact tags (the one ``Multiline`` fallback, all effective widths when ``keys`` is ``None``,
    is an anchored regular expression). ``extra_keys`` (e.g. per-layer keys) get one chart each in their own category;
    ``jacobian_prefix`` /
    ``embedding_prefix`` add the Jacobian-law and condensation categories. ``keys`` (every key the configuration logs,
    e.g. ``HessianSpectrum.logged_keys(pl_module)``) drops the charts of keys that are never logged and gives each
    effective width its own chart; ``None`` keeps every chart.
    """
    logged = None if keys is None else set(keys)

    def wanted(key: str) -> bool:
        return logged is None or key in logged

    def line(key: str) -> list[Any]:
        # a Margin chart whose band is the value itself: TensorBoard draws margin charts unsmoothed, and the
        # triplicated values keep a short series' extremes inside "ignore outliers" scaling (5-95 % quantiles)
        return ["Margin", [key, key, key]]

    def margin(key: str, lower: str | None = None, upper: str | None = None) -> list[Any]:
        value, low, high = margin_tags(key)
        return ["Margin", [value, lower or low, upper or high]]

    def category(charts: dict[str, tuple[str, list[Any]]]) -> dict[str, list[Any]]:
        return {title: spec for title, (key, spec) in charts.items() if wanted(key)}

    k = lambda name: metric_key(prefix, name)  # noqa: E731
    layout: dict[str, dict[str, list[Any]]] = {
        f"Hessian spectrum ({prefix})": category(
            {
                "sharpness λ_max": (k(LAMBDA_MAX), line(k(LAMBDA_MAX))),
                "trace tr(H) ± stderr (Hutchinson)": (k(TRACE), margin(k(TRACE))),
                "spectral gap λ₁ − λ₂": (k(SPECTRAL_GAP), line(k(SPECTRAL_GAP))),
                "gap ratio λ₁ / λ₂": (k(SPECTRAL_GAP_RATIO), line(k(SPECTRAL_GAP_RATIO))),
                "top-k subspace overlap (1 = same eigenspace)": (k(SUBSPACE_OVERLAP), line(k(SUBSPACE_OVERLAP))),
                "near-zero fraction (rank deficiency)": (k(NEAR_ZERO_FRACTION), line(k(NEAR_ZERO_FRACTION))),
            }
        ),
        f"Power law ({prefix}, full probes)": category(
            {
                "KS ratio d_ks / d_c (below 1: power law)": (k(KS_RATIO), line(k(KS_RATIO))),
                "power law accepted (1 = yes)": (k(IS_POWER_LAW), line(k(IS_POWER_LAW))),
                "density exponent β̂ ± stderr": (k(POWERLAW_BETA), margin(k(POWERLAW_BETA))),
                "rank exponent ŝ (λ_k ∝ k^−ŝ)": (k(POWERLAW_S), line(k(POWERLAW_S))),
                "KS distance d_ks": (k(KS_DISTANCE), line(k(KS_DISTANCE))),
                "KS critical value d_c": (k(KS_CRITICAL), line(k(KS_CRITICAL))),
            }
        ),
        f"Probe cost ({prefix})": category(
            {
                "HVPs per probe": (k(HVPS), line(k(HVPS))),
                "seconds per probe": (k(PROBE_SECONDS), line(k(PROBE_SECONDS))),
            }
        ),
    }
    if extra_keys:
        layout[f"Hessian per layer ({prefix})"] = {key: line(key) for key in extra_keys}
    if jacobian_prefix is not None:
        j = lambda name: metric_key(jacobian_prefix, name)  # noqa: E731
        layout[f"Jacobian law ({jacobian_prefix})"] = category(
            {
                "FPT median, band q10-q90 (non-zero part)": (
                    j("fpt_q50"),
                    margin(j("fpt_q50"), j("fpt_q10"), j("fpt_q90")),
                ),
                "atom at zero": (j("atom_at_zero"), line(j("atom_at_zero"))),
                "mean eigenvalue m₁": (j("mean"), line(j("mean"))),
                "KS distance measured vs predicted": (j("law_distance"), line(j("law_distance"))),
            }
        )
    if embedding_prefix is not None:
        e = lambda name: metric_key(embedding_prefix, name)  # noqa: E731
        widths = sorted(key for key in logged or () if key.startswith(e("effective_width/")))
        charts: dict[str, tuple[str, list[Any]]] = {
            f"effective width {key[len(e('effective_width/')) :]}": (key, line(key)) for key in widths
        }
        if logged is None:
            charts["effective width per layer"] = (
                e("effective_width"),
                ["Multiline", [f"^{re.escape(e('effective_width/'))}.+$"]],
            )
        charts["merge output error"] = (e("merge_output_error"), line(e("merge_output_error")))
        layout[f"Neuron condensation ({embedding_prefix})"] = category(charts)
    return {title: charts for title, charts in layout.items() if charts}


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


def fitted_rank_law(eigenvalues: Tensor, s: float) -> Tensor:
    r"""The rank law :math:`\hat\lambda_k = C k^{-\hat s}` through the geometric centre of the tested eigenvalues.

    The MLE fixes the slope :math:`\hat s = 1/(\hat\beta - 1)` (Xie et al. 2022); the level is the least-squares one
    in log-log coordinates, :math:`\log C = \frac1K\sum_{k\le K} (\log\lambda_k + \hat s\log k)`, so the line
    passes through :math:`(\bar{\log k}, \bar{\log\lambda})` of the data instead of starting above
    :math:`\lambda_1`.

    Args:
        eigenvalues: the ``K`` tested eigenvalues, descending and positive.
        s: the rank exponent.

    Returns:
        :math:`\hat\lambda_k` for :math:`k = 1..K` (float64).
    """
    eig = eigenvalues.detach().to("cpu", torch.float64)
    log_k = torch.log(torch.arange(1, eig.numel() + 1, dtype=torch.float64))
    log_c = (torch.log(eig) + s * log_k).mean()
    return torch.exp(log_c - s * log_k)


def rank_plot(
    eigenvalues: Tensor,
    *,
    s: float,
    cutoff_rank: int,
    ks_distance: float,
    ks_critical: float,
    title: str = "",
    beta: float | None = None,
    reference: Tensor | None = None,
    reference_label: str = "at initialisation",
) -> Any:
    r"""Rank plot :math:`\log\lambda_k` vs :math:`\log k` of the tested eigenvalues, the fitted law and the verdict.

    Draws the ``cutoff_rank = K`` tested eigenvalues (the top ``K`` positive ones), the fitted rank law
    :math:`\lambda_k \propto k^{-\hat s}` over the tested range :math:`1 \le k \le K` only, anchored at the data's
    geometric centre (:func:`fitted_rank_law`), and the KS verdict with :math:`d_{ks}` and :math:`d_c` in the title
    (Xie et al. 2022: power law when :math:`d_{ks} < d_c`). ``reference`` (e.g. the spectrum at initialisation) is
    drawn faintly behind. Built with :class:`matplotlib.figure.Figure` (no pyplot, no global backend change).

    Raises:
        ImportError: when matplotlib is not installed (callers skip the figure).
    """
    from matplotlib.figure import Figure  # optional dependency

    eig = eigenvalues.detach().to("cpu", torch.float64)
    eig = eig[eig > 0]
    k = min(int(cutoff_rank), eig.numel()) if cutoff_rank >= 1 else eig.numel()
    tested = eig[:k]
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    figure = Figure(figsize=(5.6, 4.2), dpi=100)
    axes = figure.add_subplot(1, 1, 1)
    if reference is not None:
        ref = reference.detach().to("cpu", torch.float64)
        ref = ref[ref > 0][: max(k, 1)]
        if ref.numel():
            ref_ranks = torch.arange(1, ref.numel() + 1, dtype=torch.float64)
            axes.loglog(
                ref_ranks.numpy(), ref.numpy(), ".", color="0.6", alpha=0.35, markersize=3, label=reference_label
            )
    axes.loglog(ranks.numpy(), tested.numpy(), ".", color="C0", markersize=3.5, label=f"λ_k, tested top K = {k}")
    if k >= 2 and math.isfinite(s):
        exponent = f"ŝ = {s:.3f}" + (f", β̂ = {beta:.3f}" if beta is not None and math.isfinite(beta) else "")
        axes.loglog(
            ranks.numpy(),
            fitted_rank_law(tested, s).numpy(),
            "-",
            color="C3",
            linewidth=1.5,
            label=f"MLE fit: {exponent}",
        )
    accepted = ks_distance < ks_critical
    verdict = "power law" if accepted else "not a power law"
    relation = "<" if accepted else "≥"
    axes.set_title(
        f"{title}{verdict} (KS test, top {k})\nd_ks = {ks_distance:.4f} {relation} d_c = {ks_critical:.4f}",
        fontsize=12,
    )
    axes.set_xlabel("rank k", fontsize=11)
    axes.set_ylabel("eigenvalue λ_k", fontsize=11)
    axes.tick_params(labelsize=10)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=10, loc="lower left")
    figure.tight_layout()
    return figure


def matplotlib_available() -> bool:
    """Whether matplotlib imports (the ``plots`` extra); figures are skipped without it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


#: The warning given once at fit start when TensorBoard figures are due and matplotlib is missing.
MATPLOTLIB_MISSING = (
    "HessianSpectrum: matplotlib is not installed, so the TensorBoard figures (rank plot, Jacobian-law overlay) are "
    'not written; scalars and histograms are. Install the plots extra: pip install "lightning-hessian[plots]".'
)


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
    axes.set_title(f"{title}\nJᵀJ law, KS distance {report.law_distance:.3f}", fontsize=8)
    axes.set_xlabel("eigenvalue of JᵀJ")
    axes.set_ylabel("mass per bin")
    axes.legend(fontsize=7)
    figure.tight_layout()
    return figure
