r"""HessianSpectrum: a Lightning callback that probes the Hessian spectrum at epoch boundaries.

One *probe* evaluates the Hessian :math:`H = \nabla^2 L(\theta)` of the probe loss
:math:`L = \frac1N\sum_j \ell(\theta; x_j)` over a fixed, seeded probe set
(:mod:`lightning_hessian.callback.probe`) with Hessian-vector products
(:class:`~lightning_hessian.operators.HessianOperator`), and logs scalars through ``pl_module.log`` (so
``EarlyStopping``/``ModelCheckpoint`` see them in the same epoch) plus TensorBoard extras on rank 0
(:mod:`lightning_hessian.callback.reporting`). The callback is glue: the math lives in the solver modules.

Schedule. With ``probe_at_init`` (default) a *full* probe runs at fit start, before any optimizer step (the
overhead guard makes it cheap, or skips it, when its estimated cost exceeds the fit's budget). A *cheap*
probe (warm-started Lanczos for the top ``num_tracked`` eigenpairs: ``lambda_max``, the spectral gap, the subspace
overlap, and the Ritz-deflated trace) runs on every ``every_n_epochs``-th call of the hook; every
``powerlaw_every_n_epochs // every_n_epochs``-th probe, counting the probe at init as the first (else the first epoch
probe), is a *full* probe that also computes the top ``top_k`` eigenvalues for the power-law test of Xie et al.
(2022) and, if ``density``, the SLQ density (Ghorbani et al. 2019). Cost (measured): one HVP costs 1.15 gradient
evaluations of the probe set on the digits MLP, 1.99 on a ResNet-style CNN and 1.81 on a small Transformer; a cheap
probe takes 57-63 HVPs with the defaults (its top-8 solve also deflates the trace), a full probe 930-1,210 on digits
(top-200 plus 256 for the density).

What a key holds (EarlyStopping reads ``trainer.callback_metrics``, which keeps a key's last logged value):

* probe that succeeded: the fresh value;
* epoch without a probe, or a cheap probe for the full-probe keys (``powerlaw_*``, ``ks_*``, ``is_power_law``):
  nothing is logged, so monitors see the value of the last probe that computed the key (stale; with
  ``every_n_epochs = n`` an ``EarlyStopping`` checking every epoch spends ``n - 1`` units of patience per probe
  without a change: set ``patience`` in epochs, ``>= n`` times the number of probes you want to wait);
* failed probe (non-finite loss or product, solver not converged within ``max_hvps``/``max_seconds``, unusable
  spectrum): a warning and NaN for the failed analysis' keys (``hvps`` and ``probe_seconds`` stay real), so the
  dashboard shows the gap; ``EarlyStopping(check_finite=True)`` (its default) then stops training. Pass
  ``nan_on_failure=False`` to log nothing instead (monitors keep the last good value), or ``strict=True`` to raise.

Every key the configuration computes is in ``callback_metrics`` from the first epoch probe on (it always runs; after a
probe at init that probe's full-probe values stand in until the next full probe), so an ``EarlyStopping(strict=True)``
finds its key at its first check when both run at the same hook.

Overhead guard (``max_overhead``, default 0.2): scheduled probes after the first epoch probe are skipped (keys stay
stale, as on epochs without a probe) while the probes' cumulative time exceeds ``max_overhead`` times the training
time, so the overhead stays near ``max_overhead / (1 + max_overhead)`` of the fit on any data set size;
``max_overhead=None`` probes exactly on schedule (cost-blind).

Further analyses (typed on/off switches, each computed when the architecture is supported and skipped with one
warning otherwise): ``jacobian`` (free-probability law of the input-output JᵀJ vs its measured spectrum, Chhaibi et
al. 2022; keys ``jacobian/...``), ``embedding`` (neuron condensation and effective widths, Zhang et al. 2021; keys
``embedding/...``) and ``near_zero`` (SLQ near-zero fraction of the Hessian spectrum, Singh et al. 2021; key
``hessian/near_zero_fraction``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_hessian.callback.analyses import Analysis
from lightning_hessian.callback.config import HessianConfigError, ProbeConfig
from lightning_hessian.callback.monitors import check_monitors, monitored_keys
from lightning_hessian.callback.probe import isolated_rng
from lightning_hessian.callback.publish import fill_monitors, publish, write_dashboard_layout
from lightning_hessian.callback.runner import ProbeRunner
from lightning_hessian.callback.schedule import ProbeSchedule
from lightning_hessian.callback.setup_checks import check_picklable
from lightning_hessian.distributed import agree

__all__ = ["HessianSpectrum"]

_CONFIG_FIELDS = frozenset(f.name for f in fields(ProbeConfig))


class HessianSpectrum(Callback):
    r"""Watch the Hessian spectrum of the training loss at epoch boundaries and log it for monitors and TensorBoard.

    Logs (keys with ``prefix="hessian"``) ``hessian/lambda_max``, ``hessian/spectral_gap``,
    ``hessian/spectral_gap_ratio``, ``hessian/trace``, ``hessian/subspace_overlap``, ``hessian/hvps``,
    ``hessian/probe_seconds`` on every probe and ``hessian/powerlaw_beta``, ``hessian/powerlaw_s``,
    ``hessian/powerlaw_beta_stderr``, ``hessian/ks_distance``, ``hessian/ks_critical``, ``hessian/is_power_law`` on full
    probes (see :data:`lightning_hessian.callback.reporting.METRICS`). The power-law test fits
    :math:`\hat\beta = 1 + K / \sum_{i\le K}\ln(\lambda_i/\lambda_K)` to the top ``K = top_k`` eigenvalues and accepts
    when :math:`d_{ks} < c(\alpha)/\sqrt K` (Xie et al. 2022). The subspace overlap of consecutive probes is
    :math:`\|V_{\text{prev}}^\top V_{\text{cur}}\|_F^2 / k` over the top ``k = num_tracked`` Ritz vectors (1: the same
    subspace; Xie et al.'s Davis-Kahan argument makes the top of a power-law spectrum stable), and each probe's Lanczos
    starts from the sum of the previous probe's tracked Ritz vectors (warm start).

    Choosing ``top_k``: on scikit-learn digits (2-layer ReLU FCN, 6,310 parameters) the KS test separates a trained net
    (d_ks 0.028-0.049) from random init (d_ks 0.103 at K = 200) only for K >= 200; at K = 50/100 random init passes
    too (d_c = 1.36/sqrt(K) = 0.19/0.14 exceeds its d_ks) and at K = 1000 (16% of the parameters) the trained net fails,
    because the bulk is not a power law. Take the smallest K with d_c(K) < 0.1 (K >= 185 at ks_level 0.05, hence the
    default 200) and at most about 10% of the parameters; the callback warns outside that range and clamps K to the
    parameter count.

    Args:
        top_k: eigenvalues ``K`` for the power-law test (full probes).
        every_n_epochs: probe on every n-th call of the ``when`` hook, starting with the first (epochs 0, n, 2n, ...).
        probe_samples: global number of probe samples of the training data, split evenly across ranks (each rank draws
            its share from its own strided shard); ``>= len(dataset)`` probes the whole data set.
        seed: seed of the probe-sample choice and of every random vector (the global RNGs are never touched).
        dtype: ``"float32"`` or ``"float64"`` products; ``None`` uses the model's dtype (float32 for half precision).
        when: ``"train_epoch_end"`` (default: visible to a default ``EarlyStopping`` in the same epoch) or
            ``"validation_epoch_end"`` (skips the sanity check; also works under ``trainer.validate()``).
        density: on full probes, write the SLQ spectral density as a TensorBoard raw histogram.
        trace: log Hutchinson's estimate of ``tr(H)`` on every probe.
        ks_level: significance level of the KS test, one of 0.2, 0.15, 0.1, 0.05, 0.01.
        prefix: replaces ``hessian`` in every key; distinct prefixes let two instances coexist.
        max_hvps: budget of HVPs per probe (``None``: the solvers' own limits); an exhausted budget fails the probe.
        max_seconds: wall-clock budget per probe (decided jointly by all ranks); an exhausted budget fails the probe.
        strict: raise :class:`ProbeFailure` instead of warning and logging NaN when a probe fails.
        loss_fn: ``loss_fn(pl_module, batch) -> batch-mean loss``; ``None`` uses :func:`default_loss`
            (``pl_module.hessian_loss(batch)`` if defined, else ``training_step`` with logging silenced).
        powerlaw_every_n_epochs: run the full probe (power-law test, density) every this many epochs, a multiple of
            ``every_n_epochs``; ``None`` never runs it.
        num_tracked: eigenpairs of the cheap probe (``lambda_max``, gap, overlap, warm start); ``>= 2``.
        tol: relative Lanczos residual tolerance.
        trace_samples: Rademacher probes of Hutchinson's trace estimator.
        density_probes: SLQ probe vectors.
        density_steps: Lanczos steps per SLQ probe vector.
        probe_batch_size: samples per probe batch (memory only; ``None``: the training batch size).
        per_layer: also log ``<prefix>/<module name>/lambda_max`` per module that owns parameters and, on full probes,
            ``<prefix>/<module name>/powerlaw_beta`` of that parameter block's Hessian.
        nan_on_failure: on a failed probe log NaN (default) or nothing (monitors keep the last good value).
        tensorboard: write the TensorBoard extras when a TensorBoard logger is attached.
        max_overhead: overhead guard. After the first epoch probe (which always runs), a scheduled probe is skipped
            while the probes' cumulative wall time exceeds ``max_overhead`` times the training time (everything
            between the hooks), so probing costs at most about ``max_overhead / (1 + max_overhead)`` of the fit (20%
            at 0.25) whatever the data set size; a full probe that falls due waits for the budget. The decision is
            taken by the slowest rank. Default 0.2: probes stay near 1/6 of the fit on any data size (plus the fixed
            cost of the first epoch probe). The probe at initialisation, before any training time exists, is
            planned from estimates instead (one timed gradient of the probe set: a step costs its share of it, an
            HVP 2 gradients, a probe its expected HVPs): it runs in full if that fits ``max_overhead`` x the fit's
            estimated training time or a minute, else cheap, else not at all (one warning with the figures), unless
            an ``EarlyStopping``, a ``ModelCheckpoint`` or an LR scheduler monitors a full-probe key. ``None``
            probes exactly on schedule (cost-blind, reproducible epochs).
        jacobian: on full probes, log the free-probability prediction of the input-output Jacobian law (Chhaibi,
            Daouda & Kahn 2022) of the module's MLP with its actual weights: ``jacobian/fpt_q10`` ...
            ``jacobian/fpt_q90`` (quantiles of the law's non-zero part), ``jacobian/atom_at_zero``,
            ``jacobian/mean``, and ``jacobian/law_distance`` (Kolmogorov distance to the measured spectrum of JᵀJ at
            the probe inputs); TensorBoard: predicted density and an overlay figure. Skipped with one warning when the
            module holds no supported MLP (``nn.Linear`` + element-wise activations).
        embedding: on every probe, log the neuron condensation of the MLP (embedding principle, Zhang et al. 2021):
            ``embedding/effective_width/<layer name>`` per hidden Linear and ``embedding/merge_output_error``.
            Skipped with one warning for unsupported architectures.
        near_zero: on full probes, log ``hessian/near_zero_fraction``, the SLQ estimate of the fraction of Hessian
            eigenvalues with ``|λ| <= near_zero_threshold * max|λ|`` (rank deficiency, Singh et al. 2021).
        near_zero_threshold: relative threshold of ``near_zero``, in (0, 1).
        condensation_tol: clustering tolerance of ``embedding`` (see :func:`lightning_hessian.embedding.condensation`),
            in (0, 1).
        cache_graph: ``"auto"`` (default) keeps the probe batches' gradient graphs during a probe (each HVP one
            backward pass, about 1.4-1.9 gradient evaluations instead of 2.5-2.8) when their measured size fits in
            half the free memory, else rebuilds them per product; ``True`` / ``False`` force either.
        verbose: an INFO line when each probe starts and ends, and every 10 s of a long probe; ``False`` (default)
            reports only probes slower than 5 s, in one line. Either way the progress bar (TQDM or Rich) shows a
            running probe's HVP count on a second line.
        probe_at_init: run a full probe at fit start (``on_train_start``), before any optimizer step, logged at step
            0: the random-init control of Xie et al. (2022) and the network the free-probability law describes. It
            is the schedule's first full probe (the epoch-0 probe is then cheap), its time counts for the overhead
            guard, which may shrink it (see ``max_overhead``), and it is not repeated when a fit resumes from a
            checkpoint.
        batch_size_fn: ``batch -> int``, the number of samples in a probe batch (weights of the per-sample mean);
            ``None`` takes the length of the first tensor found in the batch.
        max_basis_bytes: memory budget of the Lanczos basis (``None``: the solver's default, 25% of the free memory,
            at most 32 GiB); a smaller basis restarts more often. The full probe keeps its top-K Ritz vectors for
            the next full probe's warm start only when they fit in this budget too.
        block_size: vectors per block product of the solver; ``None``: 1 on CPU, on accelerators chosen at the
            first probe from one timed single and one timed block product (``ProbeRunner.choose_block_size``).
        cheap_tol: residual tolerance of the cheap probe's top-``num_tracked`` solve (``None``: ``tol``).
        checkpoint_subspace: store the whole tracked subspace (``num_tracked`` float32 vectors) in checkpoints; by
            default only the top Ritz vector is stored (a checkpoint grows by one vector of P floats), so the first
            probe after a resume warm-starts from it and its ``subspace_overlap`` is the top-1 overlap.

    Raises:
        HessianConfigError: (a ``MisconfigurationException`` and ``ValueError``) for an invalid argument, naming the
            value and what is allowed.

    Example::

        >>> from lightning.pytorch.callbacks import EarlyStopping
        >>> callbacks = [HessianSpectrum(top_k=200, probe_samples=512),
        ...              EarlyStopping(monitor="hessian/ks_distance", mode="min", patience=20)]
    """

    def __init__(
        self,
        top_k: int = 200,
        every_n_epochs: int = 1,
        probe_samples: int = 512,
        seed: int = 0,
        dtype: Literal["float32", "float64"] | None = None,
        when: Literal["train_epoch_end", "validation_epoch_end"] = "train_epoch_end",
        density: bool = True,
        trace: bool = True,
        ks_level: float = 0.05,
        prefix: str = "hessian",
        max_hvps: int | None = None,
        max_seconds: float | None = None,
        strict: bool = False,
        loss_fn: Callable[[pl.LightningModule, Any], Tensor] | None = None,
        powerlaw_every_n_epochs: int | None = 10,
        num_tracked: int = 8,
        tol: float = 1e-6,
        trace_samples: int = 24,
        density_probes: int = 4,
        density_steps: int = 64,
        probe_batch_size: int | None = None,
        per_layer: bool = False,
        nan_on_failure: bool = True,
        tensorboard: bool = True,
        max_overhead: float | None = 0.2,
        jacobian: bool = True,
        embedding: bool = True,
        near_zero: bool = True,
        near_zero_threshold: float = 1e-3,
        condensation_tol: float = 1e-3,
        cache_graph: bool | Literal["auto"] = "auto",
        verbose: bool = False,
        probe_at_init: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
        max_basis_bytes: int | None = None,
        block_size: int | None = None,
        cheap_tol: float | None = None,
        checkpoint_subspace: bool = False,
    ) -> None:
        args = {name: value for name, value in locals().items() if name in _CONFIG_FIELDS}
        #: The validated arguments (also readable as attributes of the callback, e.g. ``callback.top_k``).
        self.config = ProbeConfig(**args)
        warning = self.config.low_power_warning()
        if warning is not None:
            rank_zero_warn(warning)
        self._runner = ProbeRunner(self.config)
        self._schedule = ProbeSchedule(self.config.every_n_epochs, self.config.full_every, self.config.max_overhead)
        #: Extra analyses run on every probe after the built-in ones (see :class:`Analysis`).
        self.analyses: list[Analysis] = self._runner.analyses
        #: One entry per probe: ``{"epoch", "full", "metrics"}``.
        self.history: list[dict[str, Any]] = []
        self._layout_written = False
        self._warned_overhead = False
        self._disabled = False
        self._pending: dict[str, Any] | None = None
        self._resume_pending: dict[str, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        # the arguments live in ``self.config``; guard against lookups before it exists (unpickling)
        if name in _CONFIG_FIELDS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, probe_samples=self.probe_samples, seed=self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        # "pending": a checkpoint taken during a probe (OnExceptionCheckpoint): the resumed fit runs it first
        state = {"history": [dict(h) for h in self.history], **self._schedule.state_dict()}
        return {**state, **self._runner.state_dict(), "pending": self._pending}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._schedule.load_state_dict(state_dict)
        self._runner.load_state_dict(state_dict)
        self._resume_pending = state_dict.get("pending")

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.loss_fn is None and not callable(getattr(pl_module, "hessian_loss", None)):
            if not getattr(pl_module, "automatic_optimization", True):
                raise HessianConfigError(
                    "HessianSpectrum's default loss calls training_step, which steps the optimizers under manual "
                    "optimization; define `hessian_loss(self, batch)` on the module or pass `loss_fn=`."
                )
        self._runner.probe_set = None
        self._layout_written = False
        self._disabled = not any(p.requires_grad for p in pl_module.parameters())
        if self._disabled:
            rank_zero_warn(
                f"HessianSpectrum[{self.prefix}]: the model has no parameters that require grad; there is no Hessian "
                "to probe, so this callback does nothing."
            )
        check_picklable(trainer, {"loss_fn": self.loss_fn, "batch_size_fn": self.batch_size_fn})

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation_epoch_end" and (
            not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0
        ):
            rank_zero_warn(
                "HessianSpectrum(when='validation_epoch_end') never probes during fit: there is no validation loop "
                "(no validation_step or limit_val_batches=0). Use when='train_epoch_end'."
            )
        check_monitors(trainer, self.prefix, self.when, self.every_n_epochs, self.logged_keys(pl_module))
        if self.tensorboard and not self._layout_written:
            self._layout_written = write_dashboard_layout(trainer, self, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._runner.train_loader = trainer.train_dataloader
        if self.probe_at_init and not self._schedule.init_done and not self._disabled:
            self._probe_at_init(trainer, pl_module)
        pending, self._resume_pending = self._resume_pending, None
        if pending is not None and not self._disabled:
            # the checkpoint was taken during this probe: Lightning resumes after its hook, so run it now (same
            # weights as then) to keep the schedule and the history of an uninterrupted run
            self._run_probe(trainer, pl_module, pending["kind"], pending["epoch"])
        self._schedule.training_started()

    def _probe_at_init(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run a full probe before any optimizer step and write it to the loggers at step 0.

        Under the overhead guard the probe may run cheap or be skipped when its estimated cost exceeds
        ``max_overhead`` times the fit's estimated training time (and a minute), unless a monitor (``EarlyStopping``,
        ``ModelCheckpoint``, an LR scheduler) watches a full-probe key, which must exist from the first epoch on.
        Either way it counts as the schedule's first full probe, so the epoch-0 probe stays cheap.

        Not through ``pl_module.log``: a value logged in ``on_train_start`` reaches the loggers only at the end of
        epoch 0, where the epoch-0 probe's value of the same key replaces it.
        """
        start = time.perf_counter()
        guard = self.max_overhead
        if guard is not None and monitored_keys(trainer) & self._runner.full_only_keys(pl_module):
            guard = None
        with isolated_rng(pl_module.device), torch.inference_mode(False), torch.enable_grad():
            scalars, items = self._runner.run(trainer, pl_module, True, init_guard=guard)
        kind = self._runner.last_kind
        if kind is not None:
            publish(trainer, pl_module, scalars, items, step=0, tensorboard=self.tensorboard)
            self.history.append({"epoch": 0, "full": kind == "full", "init": True, "metrics": dict(scalars)})
        self._schedule.commit_init(time.perf_counter() - start)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "train_epoch_end":
            self._on_hook(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation_epoch_end" and not trainer.sanity_checking:
            self._on_hook(trainer, pl_module)

    # ------------------------------------------------------------------ probe
    def _on_hook(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._disabled:
            return
        self._schedule.hook_started()
        try:
            self._maybe_probe(trainer, pl_module)
        finally:
            self._schedule.hook_ended()

    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        schedule = self._schedule
        kind = schedule.plan(fitting, agree=lambda flag: agree(flag, pl_module.device))
        if kind is None:
            if schedule.calls % self.every_n_epochs == 0 and not self._warned_overhead:
                rank_zero_info(
                    f"HessianSpectrum[{self.prefix}]: skipping probes to keep probe time <= max_overhead="
                    f"{self.max_overhead} x training time ({schedule.probe_seconds:.1f} s of probes vs "
                    f"{schedule.train_seconds:.1f} s of training); keys keep their last value. Set "
                    "max_overhead=None to probe on schedule."
                )
                self._warned_overhead = True
            schedule.commit(None)
            return
        self._run_probe(trainer, pl_module, kind, trainer.current_epoch)

    def _run_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: Any, epoch: int) -> None:
        schedule = self._schedule
        self._pending = {"epoch": epoch, "kind": kind}
        start = time.perf_counter()
        with isolated_rng(pl_module.device), torch.inference_mode(False), torch.enable_grad():
            scalars, items = self._runner.run(trainer, pl_module, kind == "full")
        # a resumed pending probe goes straight to the loggers at its epoch's step
        step = None if epoch == trainer.current_epoch else max(int(trainer.global_step) - 1, 0)
        publish(trainer, pl_module, scalars, items, step=step, tensorboard=self.tensorboard, when=self.when)
        if step is None:
            fill_monitors(trainer, pl_module, {k: v for k, v in self._init_full_keys(kind).items() if k not in scalars})
        self.history.append({"epoch": epoch, "full": kind == "full", "metrics": dict(scalars)})
        schedule.commit(kind, time.perf_counter() - start)
        self._pending = None

    def _init_full_keys(self, kind: Any) -> dict[str, float]:
        """On the first epoch probe after the probe at init, if cheap: the init probe's full-probe-only values.

        The probe at initialisation is the first full probe of the schedule, but it reaches only the loggers; putting
        its power-law (and other full-probe) values into ``trainer.callback_metrics`` (not the loggers, which have them
        at step 0) makes every key available from the first epoch on, as the last full probe's values, so an
        ``EarlyStopping`` on them finds its key at its first check.
        """
        if kind != "cheap" or [h.get("init", False) for h in self.history] != [True]:
            return {}
        return dict(self.history[0]["metrics"])

    def logged_keys(self, pl_module: Any = None) -> list[str]:
        """Every scalar key this configuration can log (for monitors and dashboards)."""
        return self._runner.logged_keys(pl_module)
