r"""Analyses run on one probe of :class:`~lightning_hessian.callback.HessianSpectrum`.

Each analysis receives a :class:`ProbeContext` (the probe set, the all-reduced Hessian operator, a budgeted
``matvec``, the top eigenpairs) and returns an :class:`AnalysisResult`: scalars keyed by their logged names and
TensorBoard items. The callback runs them, turns a failure into a warning plus NaN (decided jointly by all ranks) and
logs the results. The mathematics lives in the solver modules; this module only wires them to a probe:

* :class:`PowerLawAnalysis`: top-K power-law test (Xie et al. 2022), rank plot, text summary;
* :class:`TraceAnalysis`: Hutchinson trace;
* :class:`DensityAnalysis`: SLQ density (Ghorbani et al. 2019) as a raw histogram and the near-zero fraction of the
  spectrum (Singh et al. 2021);
* :class:`PerLayerAnalysis`: ``lambda_max`` and the power-law exponent of each parameter block;
* :class:`JacobianAnalysis`: free-probability law of ``JᵀJ`` vs the measured spectrum (Chhaibi et al. 2022);
* :class:`CondensationAnalysis`: effective widths and merge error (embedding principle, Zhang et al. 2021).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_hessian.callback import reporting as rp
from lightning_hessian.distributed import agree
from lightning_hessian.embedding import (
    DEFAULT_ORIENTATION_TOL,
    MLPStructure,
    capture_inputs,
    condensation_report,
    mlp_structure,
)
from lightning_hessian.errors import UnsupportedArchitectureError
from lightning_hessian.free_probability import DEFAULT_QUANTILES, jacobian_report
from lightning_hessian.lanczos import EigenResult, hutchinson_trace, lanczos, stochastic_lanczos_quadrature
from lightning_hessian.operators import (
    HessianOperator,
    evaluation_mode,
    probe_forward_context,
    uncompiled,
    world_info,
)
from lightning_hessian.powerlaw import fit_power_law
from lightning_hessian.rank import near_zero_from_quadrature
from lightning_hessian.trace import deflated_trace

__all__ = [
    "Analysis",
    "AnalysisResult",
    "CondensationAnalysis",
    "DensityAnalysis",
    "JacobianAnalysis",
    "PerLayerAnalysis",
    "PowerLawAnalysis",
    "ProbeBudget",
    "ProbeContext",
    "ProbeFailure",
    "TraceAnalysis",
    "any_rank",
    "container_input",
    "trainable_blocks",
    "world_size",
]


class ProbeFailure(RuntimeError):
    """A probe could not produce trustworthy numbers (raised to the user only with ``strict=True``)."""


@dataclass
class AnalysisResult:
    """What one analysis of a probe produces.

    Attributes:
        scalars: full logged key -> value (keys built with :func:`lightning_hessian.callback.reporting.metric_key`).
        items: TensorBoard items written on rank 0.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    items: list[rp.TensorBoardItem] = field(default_factory=list)


class ProbeBudget:
    """HVP counter and budget of one probe.

    Enforces ``max_hvps``/``max_seconds`` identically on all ranks and, with ``heartbeat``, prints a progress line
    every 10 s of a long probe (never per HVP). The HVP budget is the same on every rank (products run in lock-step).
    The time budget is
    decided through the products' own status flag (:mod:`lightning_hessian.distributed`): a rank whose clock ran out
    raises locally instead of computing the product, which takes it to its stage's agreement point; that
    ``agree(True)`` pairs with the other ranks' status all-reduce of the same product, so every rank fails the stage
    together without a separate all-reduce per product.
    """

    def __init__(
        self,
        device: torch.device,
        max_hvps: int | None,
        max_seconds: float | None,
        label: str,
        *,
        heartbeat: bool = True,
        on_hvp: Callable[[int], None] | None = None,
    ) -> None:
        self.device = device
        self.max_hvps = max_hvps
        self.max_seconds = max_seconds
        self.label = label
        self.start = time.perf_counter()
        self.hvps = 0
        #: ``on_hvp(hvps)`` after every product (e.g. the progress bar; it throttles itself).
        self.on_hvp = on_hvp
        self._next_report = self.start + 10.0 if heartbeat else math.inf

    def remaining(self) -> int | None:
        """HVPs left (``None``: unlimited)."""
        return None if self.max_hvps is None else max(self.max_hvps - self.hvps, 1)

    def elapsed(self) -> float:
        """Seconds since the probe started."""
        return time.perf_counter() - self.start

    def _charge(self, count: int) -> None:
        """Check the budget before ``count`` products (raises :class:`ProbeFailure` when it is spent)."""
        if self.max_hvps is not None and self.hvps + count > self.max_hvps:
            raise ProbeFailure(
                f"the HVP budget max_hvps={self.max_hvps} is spent ({self.hvps} used, {count} more needed)"
            )
        if self.max_seconds is not None and self.elapsed() > self.max_seconds:
            raise ProbeFailure(f"the time budget max_seconds={self.max_seconds} is spent after {self.hvps} HVPs")

    def _charged(self, count: int) -> None:
        """Count ``count`` products that ran; progress callback and heartbeat."""
        self.hvps += count
        if self.on_hvp is not None:
            self.on_hvp(self.hvps)
        now = time.perf_counter()
        if now >= self._next_report:
            self._next_report = now + 10.0
            rank_zero_info(f"{self.label}: {self.hvps} HVPs, {now - self.start:.1f} s")

    def bind(self, operator: HessianOperator) -> Callable[[Tensor], Tensor]:
        """``v -> operator @ v`` charged to this budget."""

        def matvec(vector: Tensor) -> Tensor:
            self._charge(1)
            out = operator.matvec(vector)
            self._charged(1)
            return out

        return matvec

    def bind_block(self, operator: HessianOperator) -> Callable[[Tensor], Tensor]:
        """``V -> operator.matmat(V)`` for ``V`` of shape ``(n, b)``, charged as ``b`` products.

        Same semantics as :meth:`bind`: the whole block is refused when it would exceed ``max_hvps`` (so the solver
        sees the budget as spent before the block, never a partial block) or the clock ran out; the block's single
        product goes through the operator's status all-reduce like a matvec, which keeps the failure protocol.
        """

        def matmat(block: Tensor) -> Tensor:
            count = 1 if block.dim() == 1 else int(block.shape[1])
            self._charge(count)
            out = operator.matmat(block)
            self._charged(count)
            return out

        return matmat


@dataclass
class ProbeContext:
    """Everything an analysis may use; built once per probe, identical in shape on every rank.

    Attributes:
        trainer: the Trainer.
        pl_module: the unwrapped LightningModule.
        operator: Hessian of the probe loss over all parameters that require grad (all-reduced under DDP).
        matvec: ``v -> H v`` of ``operator`` charged to the probe's budget (use it, or ``budget.bind(op)`` for another
            operator, so products are counted and ``max_hvps``/``max_seconds`` hold).
        budget: the probe's HVP/time budget.
        batches: this rank's device-ready probe batches.
        loss_fn: ``loss_fn(model, batch) -> batch-mean loss``.
        dtype: dtype of the products.
        prefix: metric prefix (``"hessian"`` by default).
        seed: the callback's seed (use it for every random vector: identical on all ranks).
        full: whether this is a full probe (power-law test, density).
        top: the top eigenpairs of this probe (``None`` if the spectrum analysis failed), descending.
        loss: the global probe loss.
        cache_graph: the callback's ``cache_graph`` (for operators an analysis builds, e.g. per-layer blocks).
        batch_size_fn: the callback's ``batch_size_fn`` (``None``: the first tensor's length).
        matmat: ``V -> H V`` block product of ``operator`` charged to the budget (``b`` products per call).
    """

    trainer: Any
    pl_module: Any
    operator: HessianOperator
    matvec: Callable[[Tensor], Tensor]
    budget: ProbeBudget
    batches: list[Any]
    loss_fn: Callable[[Any, Any], Tensor]
    dtype: torch.dtype
    prefix: str
    seed: int
    full: bool
    top: EigenResult | None = None
    loss: float = math.nan
    cache_graph: bool | Literal["auto"] = "auto"
    batch_size_fn: Callable[[Any], int] | None = None
    matmat: Callable[[Tensor], Tensor] | None = None

    def key(self, name: str) -> str:
        """Logged key ``f"{prefix}/{name}"``."""
        return rp.metric_key(self.prefix, name)


class Analysis(Protocol):
    """An optional analysis plugged into a probe (e.g. Jacobian laws, Hessian rank).

    Attributes:
        name: short name used in warnings.
        full_only: run on full probes only.
        rank_local: its scalars depend on this rank's probe inputs (not only on all-reduced products); the callback
            then logs rank 0's values on every rank, so all ranks agree.
    """

    name: str
    full_only: bool
    rank_local: bool

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Every scalar key it logs (NaN-filled when it fails)."""
        ...

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on a probe; raise to report failure (the callback turns it into a warning + NaN)."""
        ...


@dataclass
class PowerLawAnalysis:
    """Power-law test of the top-K eigenvalues (Xie et al. 2022): scalars, rank-plot figure and text summary."""

    ks_level: float
    top_k: int
    name: str = "power-law test"
    full_only: bool = True
    rank_local: bool = False
    #: Spectrum drawn faintly behind the rank plot (e.g. the probe at initialisation), or ``None``.
    reference: Tensor | None = None

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Scalar keys this analysis logs (NaN-filled when it fails)."""
        names = (rp.POWERLAW_BETA, rp.POWERLAW_S, rp.POWERLAW_BETA_STDERR, rp.KS_DISTANCE, rp.KS_CRITICAL, rp.KS_RATIO)
        return [rp.metric_key(prefix, n) for n in (*names, rp.IS_POWER_LAW)]

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on one probe."""
        if ctx.top is None:
            raise ProbeFailure("no eigenvalues (the spectrum analysis failed)")
        eig = ctx.top.eigenvalues.detach().to("cpu", torch.float64)
        fit = fit_power_law(eig, alpha=self.ks_level)
        scalars = {
            ctx.key(rp.POWERLAW_BETA): fit.beta,
            ctx.key(rp.POWERLAW_S): fit.s,
            ctx.key(rp.POWERLAW_BETA_STDERR): fit.beta_stderr,
            ctx.key(rp.KS_DISTANCE): fit.ks_distance,
            ctx.key(rp.KS_CRITICAL): fit.ks_critical,
            ctx.key(rp.KS_RATIO): fit.ks_distance / fit.ks_critical,
            ctx.key(rp.IS_POWER_LAW): float(fit.is_power_law),
        }
        epoch = getattr(ctx.trainer, "current_epoch", 0)
        when = "at initialisation" if int(getattr(ctx.trainer, "global_step", 0)) == 0 else f"epoch {epoch}"

        def figure() -> Any:
            return rp.rank_plot(
                eig,
                s=fit.s,
                cutoff_rank=fit.k,
                ks_distance=fit.ks_distance,
                ks_critical=fit.ks_critical,
                title=f"{when}: ",
                beta=fit.beta,
                reference=self.reference,
            )

        verdict = "**power law**" if fit.is_power_law else "**not** a power law"
        text = (
            f"{when}: top-{fit.k} spectrum is {verdict} (d_ks = {fit.ks_distance:.4f} vs d_c = "
            f"{fit.ks_critical:.4f} at level {fit.alpha}); β̂ = {fit.beta:.3f} ± {fit.beta_stderr:.3f}, "
            f"ŝ = {fit.s:.3f} (OLS slope {fit.slope_ols:.3f}); λ_max = {float(eig[0]):.5g}"
        )
        items: list[rp.TensorBoardItem] = [
            rp.FigureItem(ctx.key("rank_plot"), figure),
            rp.Text(ctx.key("summary"), text),
        ]
        return AnalysisResult(scalars, items)


@dataclass
class TraceAnalysis:
    r"""Trace of the Hessian: deflated Hutchinson with the Ritz pairs the probe already has (Hutch++-style).

    .. math::

        \operatorname{tr} H = \sum_i \theta_i + \operatorname{tr}(P H P), \qquad P = I - X X^\top,

    with :math:`(\theta_i, x_i)` Ritz pairs of one Rayleigh-Ritz projection (so :math:`X^\top H X =
    \operatorname{diag}(\theta)` costs no product): on a cheap probe every Ritz pair of the solver's final Krylov
    basis (``EigenResult.basis_vectors``, about 3-5 ``num_tracked`` vectors), on a full probe the top-K; the rest
    by Hutchinson with ``num_samples`` projected Rademacher probes (Meyer et al. 2021;
    :func:`~lightning_hessian.trace.deflated_trace`). ``<prefix>/trace_stderr`` is the standard error of that
    stochastic part. Without Ritz pairs (the spectrum stage failed) plain Hutchinson is used. ``num_samples``
    products either way.
    """

    num_samples: int
    name: str = "trace"
    full_only: bool = False
    rank_local: bool = False

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Scalar keys this analysis logs (NaN-filled when it fails)."""
        return [rp.metric_key(prefix, rp.TRACE), rp.metric_key(prefix, rp.TRACE_STDERR)]

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on one probe."""
        n, top = ctx.operator.num_params, ctx.top
        vectors = values = None
        if top is not None:
            vectors, values = top.basis_vectors, top.basis_values
            if vectors is None:
                vectors, values = top.eigenvectors, top.eigenvalues
        if vectors is None or values is None:
            estimate = hutchinson_trace(
                ctx.matvec, n, num_samples=self.num_samples, seed=ctx.seed + 7919, dtype=ctx.dtype,
                device=ctx.operator.device,
            )  # fmt: skip
        else:
            estimate = deflated_trace(
                ctx.matvec, n, vectors.to(ctx.dtype), num_samples=self.num_samples, seed=ctx.seed + 7919,
                dtype=ctx.dtype, device=ctx.operator.device, matmat=_chunked(ctx.matmat, ctx.top.block_size),
                ritz_values=values,
            )  # fmt: skip
        if not math.isfinite(estimate.value):
            raise ProbeFailure("non-finite trace estimate")
        return AnalysisResult({ctx.key(rp.TRACE): estimate.value, ctx.key(rp.TRACE_STDERR): estimate.stderr})


def _chunked(matmat: Callable[[Tensor], Tensor] | None, cols: int) -> Callable[[Tensor], Tensor] | None:
    """``matmat`` applied ``cols`` columns at a time (the solver's block size: its memory is known to fit)."""
    if matmat is None or cols <= 1:
        return None
    return lambda x: torch.cat([matmat(x[:, j : j + cols]) for j in range(0, x.shape[1], cols)], dim=1)


@dataclass
class DensityAnalysis:
    r"""SLQ spectral density (TensorBoard raw histogram) and the near-zero fraction of the spectrum, from one SLQ run.

    ``<prefix>/near_zero_fraction`` is the quadrature mass of :math:`|\lambda| \le \tau` with
    :math:`\tau = \text{threshold} \cdot \max|\theta|` (:func:`~lightning_hessian.rank.near_zero_from_quadrature`):
    an estimate of the rank deficiency :math:`1 - \operatorname{rank}_\tau(H)/P` (Singh et al. 2021).
    """

    num_probes: int
    num_steps: int
    histogram: bool = True
    near_zero: bool = True
    near_zero_threshold: float = 1e-3
    name: str = "SLQ density"
    full_only: bool = True
    rank_local: bool = False

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Scalar keys this analysis logs (NaN-filled when it fails)."""
        return [rp.metric_key(prefix, rp.NEAR_ZERO_FRACTION)] if self.near_zero else []

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on one probe."""
        n = ctx.operator.num_params
        slq = stochastic_lanczos_quadrature(
            ctx.matvec,
            n,
            num_probes=self.num_probes,
            num_steps=min(self.num_steps, n),
            seed=ctx.seed + 104729,
            dtype=ctx.dtype,
            device=ctx.operator.device,
        )
        result = AnalysisResult()
        if self.histogram:
            item = rp.slq_raw_histogram(ctx.key("density"), slq.nodes, slq.weights, n)
            if item is None:
                raise ProbeFailure("non-finite SLQ nodes")
            result.items.append(item)
        if self.near_zero:
            estimate = near_zero_from_quadrature(slq, threshold=self.near_zero_threshold)
            result.scalars[ctx.key(rp.NEAR_ZERO_FRACTION)] = estimate.fraction
        return result


def trainable_blocks(pl_module: Any) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """``(module name, its own trainable parameters)`` for every named module that owns some."""
    blocks = []
    for name, module in pl_module.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if params and name:
            blocks.append((name, params))
    return blocks


@dataclass
class PerLayerAnalysis:
    """``lambda_max`` (every probe) and the power-law exponent (full probes) of each module's parameter block."""

    top_k: int
    ks_level: float
    tol: float
    name: str = "per-layer spectrum"
    full_only: bool = False
    rank_local: bool = False

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Scalar keys this analysis logs (NaN-filled when it fails)."""
        keys: list[str] = []
        for name, _ in trainable_blocks(pl_module) if pl_module is not None else ():
            keys += [
                rp.metric_key(prefix, f"{name}/{rp.LAMBDA_MAX}"),
                rp.metric_key(prefix, f"{name}/{rp.POWERLAW_BETA}"),
            ]
        return keys

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on one probe."""
        scalars: dict[str, float] = {}
        for name, params in trainable_blocks(ctx.pl_module):
            op = HessianOperator(
                ctx.pl_module,
                ctx.loss_fn,
                ctx.batches,
                dtype=ctx.dtype,
                params=params,
                cache_graph=ctx.cache_graph,
                batch_size_fn=ctx.batch_size_fn,
            )
            k = min(self.top_k if ctx.full else 1, op.num_params)
            result = lanczos(
                ctx.budget.bind(op),
                op.num_params,
                k,
                tol=self.tol,
                max_matvecs=ctx.budget.remaining(),
                seed=ctx.seed,
                dtype=ctx.dtype,
                device=op.device,
            )
            if not result.converged:
                raise ProbeFailure(f"Lanczos on {name} did not converge in {result.num_matvecs} HVPs")
            scalars[ctx.key(f"{name}/{rp.LAMBDA_MAX}")] = float(result.eigenvalues[0])
            if ctx.full:
                try:
                    beta = fit_power_law(result.eigenvalues.cpu(), alpha=self.ks_level).beta
                except ValueError:
                    beta = math.nan
                scalars[ctx.key(f"{name}/{rp.POWERLAW_BETA}")] = beta
        return AnalysisResult(scalars)


#: Logical OR of a flag over all ranks: the status all-reduce of :mod:`lightning_hessian.distributed` (same name kept).
any_rank = agree


def world_size() -> int:
    """World size of the default process group (1 without one)."""
    return world_info()[1]


def container_input(
    pl_module: Any, container: torch.nn.Module, loss_fn: Callable[[Any, Any], Tensor], batch: Any
) -> Any:
    """The first positional input ``container`` receives when ``loss_fn(pl_module, batch)`` runs (no grad, eval mode).

    Raises:
        UnsupportedArchitectureError: if the loss never calls ``container`` or passes it no positional input.
    """
    with torch.no_grad(), evaluation_mode(pl_module), probe_forward_context(pl_module), uncompiled(pl_module) as root:
        args, _ = capture_inputs(container, lambda: loss_fn(root, batch))
    if not args:
        raise UnsupportedArchitectureError(f"the MLP {type(container).__name__} is called without a positional input")
    return args[0].detach()


class _MLPAnalysis:
    """Shared part of the analyses that need an MLP: find it once, warn once and switch off when unsupported."""

    name = "MLP analysis"
    rank_local = True

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._supported: bool | None = None
        self._warned = False

    def structure(self, pl_module: Any) -> MLPStructure | None:
        """The module's MLP, or ``None`` (with one warning) when its architecture is not supported."""
        try:
            return mlp_structure(pl_module)
        except UnsupportedArchitectureError as err:
            if not self._warned:
                rank_zero_warn(f"HessianSpectrum: skipping the {self.name} ({err}).")
                self._warned = True
            return None


class JacobianAnalysis(_MLPAnalysis):
    r"""Free-probability law of the input-output :math:`J^\top J` next to its measured spectrum.

    Keys (``<jacobian prefix>`` is ``jacobian`` for the default callback prefix): ``fpt_q10`` ... ``fpt_q90``
    (quantiles of the non-zero part of the predicted law, Chhaibi, Daouda & Kahn 2022), ``atom_at_zero``, ``mean`` and
    ``law_distance`` (Kolmogorov distance of the measured non-zero part to the predicted one), computed by
    :func:`~lightning_hessian.free_probability.jacobian_report` on the MLP found by
    :func:`~lightning_hessian.embedding.mlp_structure` with its actual weights and the probe inputs it receives.
    TensorBoard: the predicted density as a raw histogram and an overlay figure of prediction and measurement.
    """

    name = "Jacobian free-probability law"
    full_only = True

    def __init__(self, prefix: str, max_inputs: int = 16) -> None:
        super().__init__(prefix)
        self.max_inputs = max_inputs

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Scalar keys this analysis logs (NaN-filled when it fails)."""
        if pl_module is not None and self.structure(pl_module) is None:
            return []
        names = [f"fpt_q{round(100 * q)}" for q in DEFAULT_QUANTILES] + ["atom_at_zero", "mean", "law_distance"]
        return [rp.metric_key(self.prefix, n) for n in names]

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on one probe."""
        structure = self.structure(ctx.pl_module)
        if structure is None:
            return AnalysisResult()
        inputs = container_input(ctx.pl_module, structure.container, ctx.loss_fn, ctx.batches[0])
        try:
            report = jacobian_report(structure.container, inputs, max_inputs=self.max_inputs)
        except UnsupportedArchitectureError as err:  # e.g. an activation the free-probability law cannot model
            if not self._warned:
                rank_zero_warn(f"HessianSpectrum: skipping the {self.name} ({err}).")
                self._warned = True
            return AnalysisResult()
        key = lambda name: rp.metric_key(self.prefix, name)  # noqa: E731
        scalars = {key(f"fpt_q{round(100 * q)}"): float(v) for q, v in zip(report.levels, report.quantiles)}
        scalars[key("atom_at_zero")] = float(report.atom_at_zero)
        scalars[key("mean")] = float(report.mean)
        scalars[key("law_distance")] = float(report.law_distance)
        items: list[rp.TensorBoardItem] = []
        density = rp.density_raw_histogram(key("predicted_density"), report.grid, report.density)
        if density is not None:
            items.append(density)
        if int(getattr(ctx.trainer, "global_step", 0)) == 0:  # no optimizer step yet: the prediction's regime
            title = "at initialisation (i.i.d. weights: the law applies)"
        else:  # trained weights are no longer random matrices: the distance measures how far they moved from one
            title = f"epoch {getattr(ctx.trainer, 'current_epoch', 0)}: trained weights, KS = departure from i.i.d."
        items.append(rp.FigureItem(key("law_overlay"), lambda: rp.jacobian_overlay(report, title=title)))
        return AnalysisResult(scalars, items)


class CondensationAnalysis(_MLPAnalysis):
    """Neuron condensation (embedding principle, Zhang et al. 2021) of the MLP.

    Keys (``<embedding prefix>`` is ``embedding`` for the default callback prefix), per hidden Linear named as in
    ``named_modules()`` (e.g. ``net.0``), from :func:`~lightning_hessian.embedding.condensation_report`:

    * ``effective_width/<layer>``: number of *orientation* clusters of the significant neurons' input weights
      :math:`[w_k, b_k]` (condensation as the papers measure it; cosine tolerance ``orientation_tol``);
    * ``merge_width/<layer>``: the *exact-merge* width, the width of the narrow network that reproduces the function
      (embedding principle; tolerance ``tol``), with ``merge_output_error`` (max output difference of that merged
      network on the probe inputs).
    """

    name = "neuron condensation"
    full_only = False

    def __init__(self, prefix: str, tol: float, orientation_tol: float = DEFAULT_ORIENTATION_TOL) -> None:
        super().__init__(prefix)
        self.tol = tol
        self.orientation_tol = orientation_tol

    def keys(self, prefix: str, pl_module: Any) -> list[str]:
        """Scalar keys this analysis logs (NaN-filled when it fails)."""
        structure = None if pl_module is None else self.structure(pl_module)
        if structure is None:
            return []
        hidden = structure.names[:-1]
        widths = [
            rp.metric_key(self.prefix, f"{kind}/{n}") for kind in ("effective_width", "merge_width") for n in hidden
        ]
        return [*widths, rp.metric_key(self.prefix, "merge_output_error")]

    def __call__(self, ctx: ProbeContext) -> AnalysisResult:
        """Run on one probe."""
        structure = self.structure(ctx.pl_module)
        if structure is None:
            return AnalysisResult()
        inputs = container_input(ctx.pl_module, structure.container, ctx.loss_fn, ctx.batches[0])
        report = condensation_report(structure.container, inputs, tol=self.tol, orientation_tol=self.orientation_tol)
        outer = f"{structure.prefix}." if structure.prefix else ""
        scalars = {
            rp.metric_key(self.prefix, f"{kind}/{outer}{name}"): float(width)
            for kind, widths in (("effective_width", report.effective_widths), ("merge_width", report.merge_widths))
            for name, width in widths.items()
        }
        error = math.nan if report.merge_output_error is None else float(report.merge_output_error)
        scalars[rp.metric_key(self.prefix, "merge_output_error")] = error
        return AnalysisResult(scalars)
