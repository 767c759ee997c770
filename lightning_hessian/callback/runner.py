"""One probe of :class:`~lightning_hessian.callback.HessianSpectrum`: prepare, top eigenpairs, analyses, failures.

:class:`ProbeRunner` holds what lives from one probe to the next (the probe set, the tracked Ritz vectors for the warm
start and the subspace overlap, the stateful analyses) and runs one probe into ``(scalars, TensorBoard items)``.
Every go/no-go decision is taken jointly by all ranks, so a failure on one rank gives NaN (or ``ProbeFailure`` with
``strict=True``) on every rank and never a hang.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_hessian.callback import reporting as rp
from lightning_hessian.callback.analyses import (
    Analysis,
    CondensationAnalysis,
    DensityAnalysis,
    JacobianAnalysis,
    PerLayerAnalysis,
    PowerLawAnalysis,
    ProbeBudget,
    ProbeContext,
    ProbeFailure,
    TraceAnalysis,
    world_size,
)
from lightning_hessian.callback.config import MAX_TOP_K_FRACTION, ProbeConfig
from lightning_hessian.callback.loss import default_loss
from lightning_hessian.callback.probe import ProbeSet
from lightning_hessian.callback.progress import ProbeProgress
from lightning_hessian.callback.schedule import INIT_FREE_SECONDS, ProbeKind, plan_init_probe
from lightning_hessian.callback.state import ModuleSnapshot, rank_zero_buffers
from lightning_hessian.distributed import AgreedFailure, broadcast_object, gather_objects, run_stage
from lightning_hessian.lanczos import EigenResult, lanczos
from lightning_hessian.operators import HessianOperator
from lightning_hessian.powerlaw import spectral_gap

__all__ = ["ProbeRunner", "fit_batches", "sibling_prefix"]

_CORE = (rp.LAMBDA_MAX, rp.SPECTRAL_GAP, rp.SPECTRAL_GAP_RATIO, rp.SUBSPACE_OVERLAP)
#: Probes slower than this many seconds get one INFO line even with ``verbose=False``.
SLOW_PROBE_SECONDS = 5.0
#: Block size tried by the automatic choice of :meth:`ProbeRunner.choose_block_size`.
AUTO_BLOCK = 4
#: The block is used when its seconds per product are at most this fraction of a single product's.
AUTO_BLOCK_GAIN = 0.7
#: Cost estimate of the probe at initialisation: seconds of one HVP in gradients of the probe set (the top of the
#: measured 1.15-1.96 for a cached HVP, ``benchmarks/bench_real_models.py``).
HVP_GRADIENTS = 2.0
#: Cost estimate: products of a top-``k`` solve per wanted pair (top-200: 937-1,063 on digits and a ResNet CNN).
SOLVE_HVPS_PER_K = 5


def cheap_basis_rows(k: int) -> int:
    """Basis rows of a cheap probe's top-``k`` solve: ``max(4 k, k + 40)`` (the memory budget may lower them).

    48 rows for ``num_tracked=8`` hold the whole run (about 28 products to converge, 8 for the missed-eigenvalue
    check) without a restart, so every product's direction deflates the trace. Measured on the digits example (5
    seeds, last cheap probe): median trace error 0.19% with that 36-vector Krylov space and 24 samples, against 1.59%
    with the 14-28 vectors a restarted basis kept and 16 samples.
    """
    return max(4 * k, k + 40)


def fit_batches(trainer: Any) -> float:
    """Training batches of the whole fit on this rank (``inf`` when unbounded or unknown, e.g. ``max_epochs=-1``)."""
    try:
        steps = float(trainer.estimated_stepping_batches)
    except Exception:  # a loader without length, or a trainer without a fit loop
        return math.inf
    return steps * max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))


def _loader_batch_size(loader: Any) -> int | None:
    """The ``batch_size`` of a plain ``DataLoader`` (``None`` for batch samplers, collections of loaders, ...)."""
    size = getattr(loader, "batch_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def sibling_prefix(prefix: str, family: str) -> str:
    """Prefix of a sibling metric family (``jacobian``, ``embedding``) of the callback's ``prefix``.

    ``hessian`` -> ``jacobian``, ``val_hessian`` -> ``val_jacobian``, else ``f"{prefix}_{family}"``, so two callback
    instances with distinct prefixes never collide.
    """
    return prefix.replace("hessian", family) if "hessian" in prefix else f"{prefix}_{family}"


class ProbeRunner:
    """Runs probes for one callback configuration.

    Args:
        config: the validated callback configuration.

    Attributes:
        analyses: extra analyses run after the built-in ones (see :class:`~lightning_hessian.callback.Analysis`).
        vectors: the last probe's top ``num_tracked`` Ritz vectors (float32, CPU), or ``None``.
        probe_set: the cached probe set (``None`` until the first probe, reset at ``setup``).
        init_eigenvalues: the top eigenvalues of the first full probe (CPU float64; ``None`` before it), e.g. for
            drawing the initialisation spectrum behind later rank plots.
    """

    def __init__(self, config: ProbeConfig) -> None:
        self.config = config
        prefix = config.prefix
        self.jacobian = JacobianAnalysis(sibling_prefix(prefix, "jacobian")) if config.jacobian else None
        self.condensation = (
            CondensationAnalysis(sibling_prefix(prefix, "embedding"), config.condensation_tol)
            if config.embedding
            else None
        )
        self.analyses: list[Analysis] = []
        self.vectors: Tensor | None = None
        self.probe_set: ProbeSet | None = None
        self._warned_clamp = False
        self._warned_state = False
        #: The solver's block size chosen at the first probe (``None`` before it; see :meth:`choose_block_size`).
        self.block: int | None = None
        #: ``(s per single product, s per product in a block)`` measured for that choice, or ``None``.
        self.block_timing: tuple[float, float] | None = None
        #: The train loader(s) of the last fit (probe data for a later ``trainer.validate()``).
        self.train_loader: Any = None
        #: The top eigenvalues of the first full probe (the probe at initialisation by default), CPU float64.
        self.init_eigenvalues: Tensor | None = None
        #: What the last :meth:`run` ran: ``"full"``, ``"cheap"`` or ``None`` (the probe at initialisation skipped).
        self.last_kind: ProbeKind | None = None
        #: Why the last probe at initialisation did not run in full (``None`` if it did).
        self.init_note: str | None = None

    # ------------------------------------------------------------------ keys
    def key(self, name: str) -> str:
        """Logged key of a core metric name."""
        return rp.metric_key(self.config.prefix, name)

    def core_keys(self) -> list[str]:
        """Keys of the top-eigenpair part (NaN-filled together when it fails)."""
        return [self.key(n) for n in _CORE]

    def built_analyses(self, full: bool) -> list[Analysis]:
        """The analyses a full (or cheap) probe runs, in order."""
        c = self.config
        built: list[Analysis] = []
        if c.powerlaw_every_n_epochs is not None:
            built.append(PowerLawAnalysis(c.ks_level, c.top_k, reference=self.init_eigenvalues))
        if c.trace:
            built.append(TraceAnalysis(c.trace_samples))
        if c.density or c.near_zero:
            built.append(
                DensityAnalysis(
                    c.density_probes,
                    c.density_steps,
                    histogram=c.density,
                    near_zero=c.near_zero,
                    near_zero_threshold=c.near_zero_threshold,
                )
            )
        if c.per_layer:
            built.append(PerLayerAnalysis(c.top_k, c.ks_level, c.tol))
        built += [a for a in (self.jacobian, self.condensation) if a is not None]
        return [a for a in (*built, *self.analyses) if full or not a.full_only]

    def logged_keys(self, pl_module: Any = None, full: bool = True) -> list[str]:
        """Every scalar key this configuration can log (on a full probe; ``full=False``: on a cheap probe)."""
        keys = [*self.core_keys(), self.key(rp.HVPS), self.key(rp.PROBE_SECONDS)]
        for analysis in self.built_analyses(full=full):
            keys += analysis.keys(self.config.prefix, pl_module)
        return keys

    def full_only_keys(self, pl_module: Any = None) -> set[str]:
        """Keys only a full probe logs (power law, density, Jacobian law, ...)."""
        return set(self.logged_keys(pl_module)) - set(self.logged_keys(pl_module, full=False))

    def estimated_hvps(self, full: bool, num_params: int) -> int:
        """Products a probe is expected to spend (a cost estimate, not a budget).

        Full: :data:`SOLVE_HVPS_PER_K` per top-``k`` pair, plus the SLQ density and the trace samples (digits
        top-200: 947-1,217 measured against 1,280 estimated). Cheap: ``4 num_tracked + 8`` for the solve and its check
        plus the trace samples (measured 59-63, estimated 64).
        """
        c = self.config
        trace = c.trace_samples if c.trace else 0
        if not full:
            return 4 * min(c.num_tracked, num_params) + 8 + trace
        density = c.density_probes * c.density_steps if c.density or c.near_zero else 0
        return SOLVE_HVPS_PER_K * min(c.top_k, num_params) + density + trace

    # ------------------------------------------------------------------ probe
    def run(
        self, trainer: Any, pl_module: Any, full: bool, init_guard: float | None = None
    ) -> tuple[dict[str, float], list[rp.TensorBoardItem]]:
        """One probe: ``(scalars to log, TensorBoard items)``; failures become warnings and NaN (or raise).

        With ``init_guard`` (the overhead guard's ``max_overhead``, for the probe at initialisation) the kind of the
        probe is chosen from cost estimates first (:meth:`init_kind`): it may run cheap, or not at all (empty
        scalars). :attr:`last_kind` tells what ran.

        While it runs, the trainer's progress bar shows its HVP count (:class:`ProbeProgress`); an INFO line reports
        each probe with ``verbose=True``, else only probes slower than :data:`SLOW_PROBE_SECONDS`.

        The probe is a sequence of stages (prepare, top eigenpairs, each analysis), each ending at an agreement point
        of :func:`~lightning_hessian.distributed.run_stage`, and every collective inside a stage is preceded by a
        status all-reduce, so a failure on any rank at any point is seen by every rank at the same stage. Under DDP
        the probe evaluates rank 0's buffers (:func:`~lightning_hessian.callback.state.rank_zero_buffers`); afterwards
        the module's state is as before the probe (:class:`~lightning_hessian.callback.state.ModuleSnapshot`).
        """
        snapshot = ModuleSnapshot(pl_module)
        try:
            with rank_zero_buffers(pl_module, pl_module.device):
                return self._reported(trainer, pl_module, full, init_guard)
        finally:
            lost = snapshot.restore()
            if lost and not self._warned_state:
                rank_zero_warn(
                    f"HessianSpectrum[{self.config.prefix}]: the probe's calls of the loss changed module state in "
                    f"place that could not be restored ({', '.join(lost[:5])}); define `hessian_loss(self, batch)` "
                    "without side effects or pass `loss_fn=`."
                )
                self._warned_state = True

    def _reported(
        self, trainer: Any, pl_module: Any, full: bool, init_guard: float | None = None
    ) -> tuple[dict[str, float], list[rp.TensorBoardItem]]:
        """:meth:`_run` with the progress bar and the console lines."""
        kind = "full" if full else "cheap"
        label = f"HessianSpectrum[{self.config.prefix}] epoch {trainer.current_epoch}"
        if self.config.verbose:
            rank_zero_info(f"{label}: {kind} probe started")
        progress = ProbeProgress(trainer, f"{self.config.prefix} {kind} probe")
        start = time.perf_counter()
        try:
            scalars, items = self._run(trainer, pl_module, full, label, progress, init_guard)
        finally:
            progress.close()
        if self.last_kind is None:
            return scalars, items
        kind = self.last_kind
        seconds = scalars.get(self.key(rp.PROBE_SECONDS), time.perf_counter() - start)
        hvps = int(scalars.get(self.key(rp.HVPS), 0))
        if self.config.verbose or seconds > SLOW_PROBE_SECONDS:
            hint = "" if self.config.verbose else " (verbose=True reports every probe)"
            rank_zero_info(f"{label}: {kind} probe done, {hvps} HVPs in {seconds:.2f} s{hint}")
        return scalars, items

    def _run(
        self,
        trainer: Any,
        pl_module: Any,
        full: bool,
        label: str,
        progress: ProbeProgress,
        init_guard: float | None = None,
    ) -> tuple[dict[str, float], list[rp.TensorBoardItem]]:
        start = time.perf_counter()
        scalars: dict[str, float] = {}
        items: list[rp.TensorBoardItem] = []
        device = pl_module.device
        self.last_kind = "full" if full else "cheap"

        ctx, error = run_stage(lambda: self._prepare(trainer, pl_module, full, label, on_hvp=progress.update), device)
        if ctx is not None and init_guard is not None and full:
            kind, failed = run_stage(lambda: self.init_kind(trainer, ctx, init_guard, label), device)
            if failed is None and self.init_note:
                rank_zero_warn(self.init_note)
            if kind is None and failed is None:  # not even a cheap probe fits the guard
                self.last_kind = None
                return scalars, items
            full = ctx.full = kind != "cheap"  # a failed estimate leaves the probe as configured (it fails there)
            self.last_kind = "full" if full else "cheap"
        analyses = self.built_analyses(full)
        if ctx is None:
            groups = [self.core_keys(), *(a.keys(self.config.prefix, pl_module) for a in analyses)]
            self._fail("the probe could not start", error, groups, scalars)
            scalars[self.key(rp.HVPS)] = 0.0
            scalars[self.key(rp.PROBE_SECONDS)] = time.perf_counter() - start
            return scalars, items

        def top() -> tuple[EigenResult, dict[str, float]]:
            result = self._top_eigenpairs(ctx, full)
            eig = result.eigenvalues.detach().to("cpu", torch.float64)
            gap, ratio = spectral_gap(eig) if eig.numel() >= 2 else (math.nan, math.nan)
            values = {
                self.key(rp.LAMBDA_MAX): float(eig[0]),
                self.key(rp.SPECTRAL_GAP): gap,
                self.key(rp.SPECTRAL_GAP_RATIO): ratio,
            }
            return result, values

        outcome, error = run_stage(top, device)
        if outcome is None:
            self._fail("top eigenpairs", error, [self.core_keys()], scalars)
        else:
            ctx.top, values = outcome
            scalars.update(values)
            scalars[self.key(rp.SUBSPACE_OVERLAP)] = self._update_vectors(ctx.top.eigenvectors)
            eig = ctx.top.eigenvalues.detach().to("cpu", torch.float64)
            if full:
                items.append(rp.Histogram(self.key(rp.EIGENVALUES_TOP_K), eig))
            items.append(rp.Histogram(self.key(rp.EIGENVALUES_TRACKED), eig[: self.config.num_tracked]))
            if full and self.init_eigenvalues is None:
                self.init_eigenvalues = eig.clone()

        for analysis in analyses:
            result, error = run_stage(lambda analysis=analysis: analysis(ctx), device)
            if result is not None and getattr(analysis, "rank_local", False) and world_size() > 1:
                # values that depend on this rank's probe inputs: every rank logs rank 0's
                result.scalars = broadcast_object(result.scalars, device=device)
            if error is not None:
                self._fail(analysis.name, error, [analysis.keys(self.config.prefix, pl_module)], scalars)
            elif result is not None:
                scalars.update(result.scalars)
                items.extend(result.items)
        seconds = time.perf_counter() - start
        scalars[self.key(rp.HVPS)] = float(ctx.budget.hvps)
        scalars[self.key(rp.PROBE_SECONDS)] = seconds
        items.extend(rp.margin_items(self.config.prefix, scalars))
        return scalars, items

    def _prepare(self, trainer: Any, pl_module: Any, full: bool, label: str, on_hvp: Any = None) -> ProbeContext:
        """Probe set, operator and a finite-loss check (one stage: every rank raises or none does)."""
        c = self.config
        loss_fn = c.loss_fn if c.loss_fn is not None else default_loss
        if self.probe_set is None:
            self.probe_set = ProbeSet.from_trainer(
                trainer,
                pl_module,
                c.probe_samples,
                seed=c.seed,
                batch_size=c.probe_batch_size,
                fallback=self.train_loader,
            )
        batches = self.probe_set.batches
        dtype = self.torch_dtype(pl_module)
        operator = HessianOperator(
            pl_module, loss_fn, batches, dtype=dtype, cache_graph=c.cache_graph, batch_size_fn=c.batch_size_fn
        )
        loss = operator.loss()  # the global probe loss, agreed by all ranks (no_grad, eval mode, forward contexts)
        if not math.isfinite(loss):
            raise ProbeFailure(f"the probe loss is not finite ({loss})")
        budget = ProbeBudget(operator.device, c.max_hvps, c.max_seconds, label, heartbeat=c.verbose, on_hvp=on_hvp)
        return ProbeContext(
            trainer=trainer,
            pl_module=pl_module,
            operator=operator,
            matvec=budget.bind(operator),
            budget=budget,
            batches=batches,
            loss_fn=loss_fn,
            dtype=dtype,
            cache_graph=c.cache_graph,
            batch_size_fn=c.batch_size_fn,
            prefix=c.prefix,
            seed=c.seed,
            full=full,
            loss=loss,
        )

    def _top_eigenpairs(self, ctx: ProbeContext, full: bool) -> EigenResult:
        c = self.config
        n = ctx.operator.num_params
        k = c.top_k if full else c.num_tracked
        if k > n:
            if full and not self._warned_clamp:
                rank_zero_warn(f"HessianSpectrum: top_k={c.top_k} exceeds the {n} trainable parameters; using {n}.")
                self._warned_clamp = True
            k = n
        elif full and not self._warned_clamp and k > MAX_TOP_K_FRACTION * n:
            rank_zero_warn(
                f"HessianSpectrum: top_k={k} is {100 * k / n:.0f}% of the {n} parameters; the power law describes the "
                "top of the spectrum (on digits K = 16% of the parameters rejected a trained net). Prefer <= 10%."
            )
            self._warned_clamp = True
        block = self.choose_block_size(ctx, k)
        if block > 1:
            ctx.matmat = ctx.budget.bind_block(ctx.operator)
        start = self._warm_start(n, k, full, block, ctx)
        tol = c.tol if full else c.cheap_tolerance
        result = lanczos(
            ctx.matvec,
            n,
            k,
            tol=tol,
            max_matvecs=ctx.budget.remaining(),
            seed=c.seed,
            dtype=ctx.dtype,
            device=ctx.operator.device,
            start=start,
            return_eigenvectors=True,
            matmat=ctx.matmat,
            num_vectors=None if full else cheap_basis_rows(k),
            block_size=block,
            max_basis_bytes=c.max_basis_bytes,
            # the cheap probe's trace deflates every Ritz pair of the final basis (no product; ~3-5 num_tracked)
            return_basis=c.trace and not full,
        )
        if not result.converged:
            raise ProbeFailure(
                f"Lanczos did not converge to tol={tol} within {result.num_matvecs} HVPs "
                f"(largest relative residual {float(result.residual_norms.max()):.2e}); raise max_hvps or tol"
            )
        if not bool(torch.isfinite(result.eigenvalues).all()):
            raise ProbeFailure("non-finite eigenvalues")
        return result

    def init_kind(self, trainer: Any, ctx: ProbeContext, max_overhead: float, label: str) -> ProbeKind | None:
        """Kind of the probe at initialisation under the overhead guard, from one timed gradient of the probe set.

        Estimates (rank 0's, broadcast): a training step costs the gradient's seconds times ``batch / probe samples``
        (the train loader's ``batch_size``, else the probe batches' mean size), the fit
        :func:`fit_batches` such steps, a probe :meth:`estimated_hvps` products of :data:`HVP_GRADIENTS` gradients
        each; then :func:`~lightning_hessian.callback.schedule.plan_init_probe`. A probe that does not run in full
        gets one warning with the figures (:attr:`init_note`, issued by the caller outside the stage).
        """
        op = ctx.operator
        tick = time.perf_counter()
        op.gradient()
        grad_s = time.perf_counter() - tick
        local = max(op.local_samples, 1)
        batch = _loader_batch_size(self.train_loader) or local / max(len(ctx.batches), 1)
        steps = fit_batches(trainer)
        fit_s = grad_s * batch / local * steps if math.isfinite(steps) else math.inf
        full_hvps, cheap_hvps = self.estimated_hvps(True, op.num_params), self.estimated_hvps(False, op.num_params)
        full_s, cheap_s = HVP_GRADIENTS * grad_s * full_hvps, HVP_GRADIENTS * grad_s * cheap_hvps
        kind = plan_init_probe(full_s, cheap_s, fit_s, max_overhead, free_seconds=INIT_FREE_SECONDS)
        kind, full_s, cheap_s, fit_s = broadcast_object((kind, full_s, cheap_s, fit_s), device=op.device)
        self.init_note = None
        if kind != "full":
            what = "runs as a cheap probe" if kind == "cheap" else "is skipped"
            self.init_note = (
                f"{label}: the probe at initialisation {what}: a full probe (about {full_hvps:,} HVPs) is estimated at "
                f"{full_s:,.0f} s and a cheap one at {cheap_s:,.0f} s, against max_overhead={max_overhead} x the "
                f"fit's estimated {fit_s:,.0f} s of training ({steps:,.0f} steps). The full-probe keys come with the "
                "first full probe the guard allows. Set max_overhead=None for the exact schedule, or monitor a "
                "full-probe key with EarlyStopping to keep the full probe at initialisation."
            )
        return kind

    def choose_block_size(self, ctx: ProbeContext, k: int) -> int:
        """Block size of the solver: ``block_size`` if configured, else chosen once from timed products (cached).

        On CPU the default is 1 (measured, one thread: a block of 4 costs 1.3-2.9x a single product per product on
        an MLP and a Transformer LM, 0.68x on a ResNet CNN; a deterministic choice also keeps runs reproducible).
        On accelerators, at the first probe, one single product and one block of :data:`AUTO_BLOCK` products are
        timed (after one untimed product, which builds a cached graph); the block is used when its seconds per
        product are at most :data:`AUTO_BLOCK_GAIN` times the single product's, since a block Krylov space needs
        somewhat more products for the same accuracy. Rank 0's decision is broadcast, so every rank runs the same
        solver.
        """
        if self.config.block_size is not None:
            return min(self.config.block_size, k)
        if self.block is None and ctx.operator.device.type == "cpu":
            self.block = 1
        if self.block is None:
            op = ctx.operator
            gen = torch.Generator().manual_seed(self.config.seed + 31)
            x = torch.randn(op.num_params, AUTO_BLOCK, generator=gen).to(op.device, ctx.dtype)
            op.matvec(x[:, 0])
            tick = time.perf_counter()
            op.matvec(x[:, 1])
            single = time.perf_counter() - tick
            tick = time.perf_counter()
            op.matmat(x)
            per_product = (time.perf_counter() - tick) / AUTO_BLOCK
            choice = AUTO_BLOCK if per_product <= AUTO_BLOCK_GAIN * single else 1
            self.block = int(broadcast_object(choice, device=op.device))
            self.block_timing = (single, per_product)
        return min(self.block, k)

    def _warm_start(self, n: int, k: int, full: bool, block: int, ctx: ProbeContext) -> Tensor | None:
        """Warm start from the previous probe's tracked subspace (its first ``block`` vectors; summed when ``block=1``).

        Measured on the digits example (float32, top-8, one epoch between probes): the sum start takes 32-36 products
        at tol 1e-6 to 1e-3, the same as a cold start; a start block of all 8 tracked vectors takes 56-80, because the
        subspace moves more in an epoch than the block's first products gain. So the block is never wider than the
        solver's own block.
        """
        if self.vectors is None or self.vectors.shape[0] != n:
            return None
        cols = min(self.vectors.shape[1], block, k)
        start = self.vectors[:, :cols].to(device=ctx.operator.device, dtype=ctx.dtype)
        return start.sum(dim=1) if block == 1 else start

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: by default the top Ritz vector only (``checkpoint_subspace``: all tracked)."""
        vectors = self.vectors
        if vectors is not None and not self.config.checkpoint_subspace:
            vectors = vectors[:, :1]
        return {
            "ritz_vectors": None if vectors is None else vectors.detach().to("cpu", torch.float32).clone(),
            "init_eigenvalues": self.init_eigenvalues,
            "block_size": self.block,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (older checkpoints may hold every tracked vector)."""
        vectors = state.get("ritz_vectors")
        self.vectors = None if vectors is None else vectors.clone()
        init = state.get("init_eigenvalues")
        self.init_eigenvalues = None if init is None else init.clone()
        self.block = state.get("block_size", self.block)

    def _update_vectors(self, vectors: Tensor | None) -> float:
        """Overlap with the previous probe's top-k Ritz vectors (0.0 on the first probe); keeps the current ones."""
        if vectors is None:
            return math.nan
        current = vectors[:, : self.config.num_tracked].detach().to("cpu", torch.float64)
        overlap = 0.0  # no previous subspace: 0 (finite, so a monitor with check_finite=True is not stopped)
        if self.vectors is not None and self.vectors.shape[0] == current.shape[0]:
            previous = self.vectors.to(torch.float64)
            k = min(previous.shape[1], current.shape[1])
            overlap = float((previous[:, :k].T @ current[:, :k]).pow(2).sum() / k)
        self.vectors = current.to(torch.float32)
        return overlap

    def _fail(
        self, stage: str, error: BaseException | None, key_groups: list[list[str]], scalars: dict[str, float]
    ) -> None:
        """Warn (or raise) about a failed stage and NaN-fill its keys; every rank calls it at the same stage."""
        reasons = gather_objects(_describe(error), device=None)
        if len(reasons) > 1:
            detail = "; ".join(f"rank {r}: {d}" for r, d in enumerate(reasons) if d) or "unknown"
        else:
            detail = reasons[0] or "unknown"
        message = f"HessianSpectrum[{self.config.prefix}]: probe failed ({stage}: {detail})."
        if self.config.strict:
            raise ProbeFailure(message) from error
        rank_zero_warn(message + (" Logging NaN." if self.config.nan_on_failure else " Logging nothing."))
        if self.config.nan_on_failure:
            for keys in key_groups:
                scalars.update(dict.fromkeys(keys, math.nan))

    def torch_dtype(self, pl_module: Any) -> torch.dtype:
        """The products' dtype: the configured one, else the model's (float32 for half precision)."""
        if self.config.dtype is not None:
            return getattr(torch, self.config.dtype)
        model_dtype = next((p.dtype for p in pl_module.parameters() if p.requires_grad), torch.float32)
        return model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32


def _describe(error: BaseException | None) -> str | None:
    """Describe this rank's part of a failure (``None`` when the failure happened elsewhere)."""
    if isinstance(error, AgreedFailure):
        error = error.local
    if error is None:
        return None
    return str(error) if isinstance(error, ProbeFailure) else f"{type(error).__name__}: {error}"
