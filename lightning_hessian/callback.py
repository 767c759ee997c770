r"""HessianSpectrum: a Lightning callback that probes the Hessian spectrum at epoch boundaries.

One *probe* evaluates the Hessian :math:`H = \nabla^2 L(\theta)` of the probe loss
:math:`L = \frac1N\sum_j \ell(\theta; x_j)` over a fixed, seeded probe set (:mod:`lightning_hessian.probe`) with
Hessian-vector products (:class:`~lightning_hessian.operators.HessianOperator`), and logs scalars through
``pl_module.log`` (so ``EarlyStopping``/``ModelCheckpoint`` see them in the same epoch) plus TensorBoard extras on
rank 0 (:mod:`lightning_hessian.reporting`). The callback is glue: the math lives in the solver modules.

Schedule. A *cheap* probe (warm-started Lanczos for the top ``num_tracked`` eigenpairs: ``lambda_max``, the spectral
gap, the subspace overlap, and Hutchinson's trace) runs on every ``every_n_epochs``-th call of the hook; every
``powerlaw_every_n_epochs // every_n_epochs``-th probe, starting with the first, is a *full* probe that also computes
the top ``top_k`` eigenvalues for the power-law test of Xie et al. (2022) and, if ``density``, the SLQ density
(Ghorbani et al. 2019). Cost: one HVP costs 1.3-2.5 gradient evaluations of the probe set (2.4 measured on the
digits MLP); a cheap probe takes about ``num_tracked + 20 + trace_samples`` HVPs (45-52 with the defaults), a full probe
about ``4-6 top_k`` more for the Lanczos top-K (900-1250 at K = 200 on digits) plus ``density_probes * density_steps``
(256) for the density.

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

Every key the configuration computes is logged by the first probe, which runs on the first call of the hook, so an
``EarlyStopping(strict=True)`` finds its key at its first check when both run at the same hook.

Overhead guard (``max_overhead``, off by default so that probes run exactly on schedule): when set, scheduled probes
beyond the first are skipped (keys stay stale, as on epochs without a probe) while the probes' cumulative time exceeds
``max_overhead`` times the training time, so the overhead stays near ``max_overhead / (1 + max_overhead)`` of the fit
on any data set size (recommended for long runs on large data sets, e.g. 0.25).

Further analyses (typed on/off switches, each computed when the architecture is supported and skipped with one
warning otherwise): ``jacobian`` (free-probability law of the input-output JᵀJ vs its measured spectrum, Chhaibi et
al. 2022; keys ``jacobian/...``), ``embedding`` (neuron condensation and effective widths, Zhang et al. 2021; keys
``embedding/...``) and ``near_zero`` (SLQ near-zero fraction of the Hessian spectrum, Singh et al. 2021; key
``hessian/near_zero_fraction``).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_hessian import reporting as rp
from lightning_hessian.analyses import (
    Analysis,
    AnalysisResult,
    CondensationAnalysis,
    DensityAnalysis,
    JacobianAnalysis,
    PerLayerAnalysis,
    PowerLawAnalysis,
    ProbeBudget,
    ProbeContext,
    ProbeFailure,
    TraceAnalysis,
    any_rank,
    world_size,
)
from lightning_hessian.lanczos import EigenResult, lanczos
from lightning_hessian.operators import HessianOperator, batch_size, evaluation_mode
from lightning_hessian.powerlaw import KS_CRITICAL_CONSTANTS, ks_critical_value, spectral_gap
from lightning_hessian.probe import ProbeSet, isolated_rng

__all__ = [
    "Analysis",
    "AnalysisResult",
    "HessianConfigError",
    "HessianSpectrum",
    "ProbeContext",
    "ProbeFailure",
    "default_loss",
]


#: Smallest KS distance of a random-init network seen in the evidence (digits FCN, K = 200: 0.103; Xie et al.'s
#: random-init LeNets at K = 1000: 0.066-0.097). The test has power only if d_c(K) = c(alpha)/sqrt(K) is below it.
RANDOM_INIT_KS_DISTANCE = 0.10
#: Above this fraction of all parameters the top-K leaves the power-law top of the spectrum (digits: K = 16% failed).
MAX_TOP_K_FRACTION = 0.10


class HessianConfigError(MisconfigurationException, ValueError):
    """Invalid ``HessianSpectrum`` configuration (a ``MisconfigurationException`` and a ``ValueError``)."""


def default_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """Default ``loss_fn``: ``pl_module.hessian_loss(batch)`` if defined, else the loss of ``training_step``.

    ``training_step(batch, 0)`` is called with ``pl_module.log``/``log_dict`` silenced (the probe never pollutes the
    module's logged metrics); its return value must be the batch-mean loss as a Tensor or a dict with key ``"loss"``.
    It runs in eval mode (dropout off, BatchNorm on running statistics) inside a functional call whose parameters are
    the probe's copies. Define ``hessian_loss(self, batch) -> Tensor`` (or pass ``loss_fn``) when ``training_step``
    adds regularisers, updates torchmetrics or other state, uses manual optimisation, or returns ``None``.

    Raises:
        ProbeFailure: if ``training_step`` returns no loss.
    """
    hook = getattr(pl_module, "hessian_loss", None)
    if callable(hook):
        return hook(batch)
    with _silenced_logging(pl_module):
        if _accepts_batch_idx(pl_module.training_step):
            out = pl_module.training_step(batch, 0)
        else:
            out = pl_module.training_step(batch)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise ProbeFailure(
            f"training_step returned {type(out).__name__}, not a loss Tensor or a dict with 'loss'; define "
            "`hessian_loss(self, batch)` on the module or pass `loss_fn=` to HessianSpectrum."
        )
    return out


def _accepts_batch_idx(step: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


@contextlib.contextmanager
def _silenced_logging(pl_module: Any) -> Iterator[None]:
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    pl_module.log = lambda *args, **kwargs: None
    pl_module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                setattr(pl_module, name, saved[name])
            else:
                delattr(pl_module, name)


class HessianSpectrum(Callback):
    r"""Watch the Hessian spectrum of the training loss at epoch boundaries and log it for monitors and TensorBoard.

    Logs (keys with ``prefix="hessian"``) ``hessian/lambda_max``, ``hessian/spectral_gap``,
    ``hessian/spectral_gap_ratio``, ``hessian/trace``, ``hessian/subspace_overlap``, ``hessian/hvps``,
    ``hessian/probe_seconds`` on every probe and ``hessian/powerlaw_beta``, ``hessian/powerlaw_s``,
    ``hessian/powerlaw_beta_stderr``, ``hessian/ks_distance``, ``hessian/ks_critical``, ``hessian/is_power_law`` on full
    probes (see :data:`lightning_hessian.reporting.METRICS`). The power-law test fits
    :math:`\hat\beta = 1 + K / \sum_{i\le K}\ln(\lambda_i/\lambda_K)` to the top ``K = top_k`` eigenvalues and accepts
    when :math:`d_{ks} < c(\alpha)/\sqrt K` (Xie et al. 2022). The subspace overlap of consecutive probes is
    :math:`\|V_{\text{prev}}^\top V_{\text{cur}}\|_F^2 / k` over the top ``k = num_tracked`` Ritz vectors (1: the same
    subspace; Xie et al.'s Davis-Kahan argument makes the top of a power-law spectrum stable), and each probe's Lanczos
    starts from the sum of the previous probe's Ritz vectors (warm start).

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
        max_overhead: overhead guard. After the first probe (which always runs), a scheduled probe is skipped while the
            probes' cumulative wall time exceeds ``max_overhead`` times the training time (everything between the
            hooks), so probing costs at most about ``max_overhead / (1 + max_overhead)`` of the fit (20% at 0.25)
            whatever the data set size; a full probe that falls due waits for the budget. The decision is taken by
            the slowest rank. ``None`` (default) probes exactly on schedule (reproducible epochs).
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
        cache_graph: keep the probe batches' gradient graphs during a probe, so each HVP is one backward pass (about
            1.4-1.9 gradient evaluations instead of 2.5-2.8) at the memory cost of all probe batches' graphs at once;
            set False for large models.

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
        trace_samples: int = 16,
        density_probes: int = 4,
        density_steps: int = 64,
        probe_batch_size: int | None = None,
        per_layer: bool = False,
        nan_on_failure: bool = True,
        tensorboard: bool = True,
        max_overhead: float | None = None,
        jacobian: bool = True,
        embedding: bool = True,
        near_zero: bool = True,
        near_zero_threshold: float = 1e-3,
        condensation_tol: float = 1e-3,
        cache_graph: bool = True,
    ) -> None:
        _check_int("top_k", top_k, 3)
        _check_int("every_n_epochs", every_n_epochs, 1)
        _check_int("probe_samples", probe_samples, 1)
        _check_int("seed", seed, None)
        if dtype not in (None, "float32", "float64"):
            raise HessianConfigError(f"dtype must be 'float32', 'float64' or None, got {dtype!r}.")
        if when not in ("train_epoch_end", "validation_epoch_end"):
            raise HessianConfigError(f"when must be 'train_epoch_end' or 'validation_epoch_end', got {when!r}.")
        for name, value in (
            ("density", density),
            ("trace", trace),
            ("strict", strict),
            ("per_layer", per_layer),
            ("nan_on_failure", nan_on_failure),
            ("tensorboard", tensorboard),
            ("jacobian", jacobian),
            ("embedding", embedding),
            ("near_zero", near_zero),
            ("cache_graph", cache_graph),
        ):
            if not isinstance(value, bool):
                raise HessianConfigError(f"{name} must be True or False, got {value!r}.")
        if isinstance(ks_level, bool) or not any(math.isclose(float(ks_level), a) for a in KS_CRITICAL_CONSTANTS):
            raise HessianConfigError(f"ks_level must be one of {sorted(KS_CRITICAL_CONSTANTS)}, got {ks_level!r}.")
        if not isinstance(prefix, str) or not prefix.strip("/") or prefix != prefix.strip("/ "):
            raise HessianConfigError(f"prefix must be a non-empty string without leading/trailing '/', got {prefix!r}.")
        if max_hvps is not None:
            _check_int("max_hvps", max_hvps, 1, "or None")
        if max_seconds is not None:
            _check_number("max_seconds", max_seconds, "a positive number or None")
        if loss_fn is not None and not callable(loss_fn):
            raise HessianConfigError(f"loss_fn must be callable(pl_module, batch) -> Tensor or None, got {loss_fn!r}.")
        if powerlaw_every_n_epochs is not None:
            _check_int("powerlaw_every_n_epochs", powerlaw_every_n_epochs, 1, "or None")
            if powerlaw_every_n_epochs % every_n_epochs:
                raise HessianConfigError(
                    f"powerlaw_every_n_epochs={powerlaw_every_n_epochs} must be a multiple of "
                    f"every_n_epochs={every_n_epochs} (or None)."
                )
        _check_int("num_tracked", num_tracked, 2)
        _check_number("tol", tol, "a number in (0, 1)", upper=1.0)
        _check_int("trace_samples", trace_samples, 1)
        _check_int("density_probes", density_probes, 1)
        _check_int("density_steps", density_steps, 2)
        if probe_batch_size is not None:
            _check_int("probe_batch_size", probe_batch_size, 1, "or None")
        if max_overhead is not None:
            _check_number("max_overhead", max_overhead, "a positive number or None")
        _check_number("near_zero_threshold", near_zero_threshold, "a number in (0, 1)", upper=1.0)
        _check_number("condensation_tol", condensation_tol, "a number in (0, 1)", upper=1.0)

        self.top_k = top_k
        self.every_n_epochs = every_n_epochs
        self.probe_samples = probe_samples
        self.seed = seed
        self.dtype = dtype
        self.when = when
        self.density = density
        self.trace = trace
        self.ks_level = float(ks_level)
        self.prefix = prefix
        self.max_hvps = max_hvps
        self.max_seconds = None if max_seconds is None else float(max_seconds)
        self.strict = strict
        self.loss_fn = loss_fn
        self.powerlaw_every_n_epochs = powerlaw_every_n_epochs
        self.num_tracked = num_tracked
        self.tol = float(tol)
        self.trace_samples = trace_samples
        self.density_probes = density_probes
        self.density_steps = density_steps
        self.probe_batch_size = probe_batch_size
        self.per_layer = per_layer
        self.nan_on_failure = nan_on_failure
        self.tensorboard = tensorboard
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self.jacobian = jacobian
        self.embedding = embedding
        self.near_zero = near_zero
        self.near_zero_threshold = float(near_zero_threshold)
        self.condensation_tol = float(condensation_tol)
        self.cache_graph = cache_graph
        # stateful analyses (they warn once for an unsupported architecture), built once
        self._jacobian = JacobianAnalysis(_sibling_prefix(prefix, "jacobian")) if jacobian else None
        self._condensation = (
            CondensationAnalysis(_sibling_prefix(prefix, "embedding"), condensation_tol) if embedding else None
        )

        critical = ks_critical_value(top_k, self.ks_level)
        if powerlaw_every_n_epochs is not None and critical >= RANDOM_INIT_KS_DISTANCE:
            rank_zero_warn(
                f"HessianSpectrum(top_k={top_k}): the KS critical value d_c = {critical:.3f}"
                f" is above the d_ks ~ {RANDOM_INIT_KS_DISTANCE} of a random-init network, so the power-law test "
                "cannot tell a trained spectrum from a random one (on digits, K = 50 and 100 accept random init). "
                f"Use top_k >= {_min_powerful_k(self.ks_level)}."
            )

        #: Extra analyses run on every probe after the built-in ones (see :class:`Analysis`).
        self.analyses: list[Analysis] = []
        self.history: list[dict[str, Any]] = []
        self._calls = 0
        self._probe_seconds = 0.0
        self._train_seconds = 0.0
        self._last_hook_end: float | None = None
        self._warned_overhead = False
        self._num_probes = 0
        self._vectors: Tensor | None = None
        self._probe: ProbeSet | None = None
        self._layout_written = False
        self._warned_clamp = False

    # ------------------------------------------------------------------ state
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, probe_samples=self.probe_samples, seed=self.seed)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(h) for h in self.history],
            "calls": self._calls,
            "num_probes": self._num_probes,
            "probe_seconds": self._probe_seconds,
            "train_seconds": self._train_seconds,
            "ritz_vectors": None if self._vectors is None else self._vectors.detach().to("cpu", torch.float32).clone(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._calls = int(state_dict.get("calls", 0))
        self._num_probes = int(state_dict.get("num_probes", 0))
        self._probe_seconds = float(state_dict.get("probe_seconds", 0.0))
        self._train_seconds = float(state_dict.get("train_seconds", 0.0))
        vectors = state_dict.get("ritz_vectors")
        self._vectors = None if vectors is None else vectors.clone()

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.loss_fn is None and not callable(getattr(pl_module, "hessian_loss", None)):
            if not getattr(pl_module, "automatic_optimization", True):
                raise HessianConfigError(
                    "HessianSpectrum's default loss calls training_step, which steps the optimizers under manual "
                    "optimization; define `hessian_loss(self, batch)` on the module or pass `loss_fn=`."
                )
        self._probe = None
        self._layout_written = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation_epoch_end" and (
            not is_overridden("validation_step", pl_module) or trainer.limit_val_batches == 0
        ):
            rank_zero_warn(
                "HessianSpectrum(when='validation_epoch_end') never probes during fit: there is no validation loop "
                "(no validation_step or limit_val_batches=0). Use when='train_epoch_end'."
            )
        self._check_monitors(trainer)
        if self.tensorboard and not self._layout_written:
            writer = rp.find_tensorboard_writer(trainer)
            if writer is not None:
                extra = self._per_layer_keys(pl_module) if self.per_layer else []
                layout = rp.custom_scalar_layout(
                    self.prefix,
                    extra,
                    jacobian_prefix=self._jacobian.prefix if self._jacobian is not None else None,
                    embedding_prefix=self._condensation.prefix if self._condensation is not None else None,
                )
                writer.add_custom_scalars(layout)
                self._layout_written = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_hook_end = time.perf_counter()

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
        now = time.perf_counter()
        if self._last_hook_end is not None:
            self._train_seconds += now - self._last_hook_end  # training time since the last hook, probes excluded
        try:
            self._maybe_probe(trainer, pl_module)
        finally:
            self._last_hook_end = time.perf_counter()

    def _maybe_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        call = self._calls
        self._calls += 1
        if call % self.every_n_epochs:
            return
        fitting = getattr(getattr(trainer, "state", None), "fn", None) == "fit"
        if self.max_overhead is not None and self._num_probes > 0 and fitting:
            over = self._probe_seconds > self.max_overhead * self._train_seconds
            if any_rank(over, pl_module.device):  # the slowest rank decides, so all ranks take the same path
                if not self._warned_overhead:
                    rank_zero_info(
                        f"HessianSpectrum[{self.prefix}]: skipping probes to keep probe time <= max_overhead="
                        f"{self.max_overhead} x training time ({self._probe_seconds:.1f} s of probes vs "
                        f"{self._train_seconds:.1f} s of training); keys keep their last value. Set "
                        "max_overhead=None to probe on schedule."
                    )
                    self._warned_overhead = True
                return
        full_every = None
        if self.powerlaw_every_n_epochs is not None:
            full_every = self.powerlaw_every_n_epochs // self.every_n_epochs
        full = full_every is not None and (self._num_probes % full_every == 0 or not fitting)
        self._num_probes += 1
        start = time.perf_counter()
        with isolated_rng(pl_module.device), torch.inference_mode(False), torch.enable_grad():
            scalars, items = self._run_probe(trainer, pl_module, full)
        self._probe_seconds += time.perf_counter() - start
        sync = world_size() > 1
        rp.log_scalars(pl_module, scalars, sync_dist=sync)
        self.history.append({"epoch": trainer.current_epoch, "full": full, "metrics": dict(scalars)})
        if self.tensorboard:
            writer = rp.find_tensorboard_writer(trainer)
            if writer is not None:
                rp.write_items(writer, items, self._tensorboard_step(trainer))

    def _run_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool
    ) -> tuple[dict[str, float], list[rp.TensorBoardItem]]:
        label = f"HessianSpectrum[{self.prefix}] epoch {trainer.current_epoch}"
        start = time.perf_counter()
        rank_zero_info(f"{label}: {'full' if full else 'cheap'} probe started")
        scalars: dict[str, float] = {}
        items: list[rp.TensorBoardItem] = []
        analyses = self._analyses(full)
        core_keys = [self._key(n) for n in (rp.LAMBDA_MAX, rp.SPECTRAL_GAP, rp.SPECTRAL_GAP_RATIO, rp.SUBSPACE_OVERLAP)]

        ctx, error = self._prepare(trainer, pl_module, full, label)
        if ctx is None:
            groups = [core_keys, *(a.keys(self.prefix, pl_module) for a in analyses)]
            self._fail(f"the probe could not start: {error}", groups, scalars)
            scalars[self._key(rp.HVPS)] = 0.0
            scalars[self._key(rp.PROBE_SECONDS)] = time.perf_counter() - start
            return scalars, items

        # core: top eigenpairs with warm start
        try:
            ctx.top = self._top_eigenpairs(ctx, full)
            eig = ctx.top.eigenvalues.detach().to("cpu", torch.float64)
            gap, ratio = spectral_gap(eig) if eig.numel() >= 2 else (math.nan, math.nan)
            scalars[self._key(rp.LAMBDA_MAX)] = float(eig[0])
            scalars[self._key(rp.SPECTRAL_GAP)] = gap
            scalars[self._key(rp.SPECTRAL_GAP_RATIO)] = ratio
            scalars[self._key(rp.SUBSPACE_OVERLAP)] = self._update_vectors(ctx.top.eigenvectors)
            items.append(rp.Histogram(self._key("eigenvalues"), eig))
            failed = False
        except Exception as exc:  # noqa: BLE001 - any failure becomes a warning + NaN (or strict error)
            failed, error = True, exc
        if any_rank(failed, ctx.operator.device):
            ctx.top = None
            self._fail(f"top eigenpairs: {error}", [core_keys], scalars)

        for analysis in analyses:
            try:
                result = analysis(ctx)
                failed = False
            except Exception as exc:  # noqa: BLE001
                failed, error, result = True, exc, None
            if any_rank(failed, ctx.operator.device):
                self._fail(f"{analysis.name}: {error}", [analysis.keys(self.prefix, pl_module)], scalars)
            elif result is not None:
                if getattr(analysis, "rank_local", False) and world_size() > 1:
                    # values that depend on this rank's probe inputs: every rank logs rank 0's
                    shared = [result.scalars]
                    dist.broadcast_object_list(shared, src=0)
                    result.scalars = shared[0]
                scalars.update(result.scalars)
                items.extend(result.items)
        seconds = time.perf_counter() - start
        scalars[self._key(rp.HVPS)] = float(ctx.budget.hvps)
        scalars[self._key(rp.PROBE_SECONDS)] = seconds
        rank_zero_info(f"{label}: done, {ctx.budget.hvps} HVPs in {seconds:.2f} s")
        return scalars, items

    def _prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, full: bool, label: str
    ) -> tuple[ProbeContext | None, Any]:
        """Probe set, operator and a finite-loss check; the go/no-go decision is taken jointly by all ranks."""
        error: Any = None
        loss_fn = self.loss_fn if self.loss_fn is not None else default_loss
        local = torch.zeros(3, dtype=torch.float64, device=pl_module.device)  # [sum n_b l_b, sum n_b, failed]
        try:
            if self._probe is None:
                self._probe = ProbeSet.from_trainer(
                    trainer, pl_module, self.probe_samples, seed=self.seed, batch_size=self.probe_batch_size
                )
            batches = self._probe.batches
            with torch.no_grad(), evaluation_mode(pl_module):
                for batch in batches:
                    count = batch_size(batch)
                    value = loss_fn(pl_module, batch)
                    local[0] += count * float(value.detach().reshape(()))
                    local[1] += count
        except Exception as exc:  # noqa: BLE001
            local[2] = 1.0
            error = exc
        if world_size() > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        if local[2] > 0:
            return None, error if error is not None else "it failed on another rank"
        loss = float(local[0] / local[1]) if local[1] > 0 else math.nan
        if not math.isfinite(loss):
            return None, f"the probe loss is not finite ({loss})"
        dtype = self._torch_dtype(pl_module)
        operator = HessianOperator(pl_module, loss_fn, batches, dtype=dtype, cache_graph=self.cache_graph)
        budget = ProbeBudget(operator.device, self.max_hvps, self.max_seconds, label)
        ctx = ProbeContext(
            trainer=trainer,
            pl_module=pl_module,
            operator=operator,
            matvec=budget.bind(operator),
            budget=budget,
            batches=batches,
            loss_fn=loss_fn,
            dtype=dtype,
            prefix=self.prefix,
            seed=self.seed,
            full=full,
            loss=loss,
        )
        return ctx, None

    def _top_eigenpairs(self, ctx: ProbeContext, full: bool) -> EigenResult:
        n = ctx.operator.num_params
        k = self.top_k if full else self.num_tracked
        if k > n:
            if full and not self._warned_clamp:
                rank_zero_warn(f"HessianSpectrum: top_k={self.top_k} exceeds the {n} trainable parameters; using {n}.")
                self._warned_clamp = True
            k = n
        elif full and not self._warned_clamp and k > MAX_TOP_K_FRACTION * n:
            rank_zero_warn(
                f"HessianSpectrum: top_k={k} is {100 * k / n:.0f}% of the {n} parameters; the power law describes the "
                "top of the spectrum (on digits K = 16% of the parameters rejected a trained net). Prefer <= 10%."
            )
            self._warned_clamp = True
        start = None
        if self._vectors is not None and self._vectors.shape[0] == n:
            start = self._vectors.to(device=ctx.operator.device, dtype=ctx.dtype).sum(dim=1)
        result = lanczos(
            ctx.matvec,
            n,
            k,
            tol=self.tol,
            max_matvecs=ctx.budget.remaining(),
            seed=self.seed,
            dtype=ctx.dtype,
            device=ctx.operator.device,
            start=start,
            return_eigenvectors=True,
        )
        if not result.converged:
            raise ProbeFailure(
                f"Lanczos did not converge to tol={self.tol} within {result.num_matvecs} HVPs "
                f"(largest relative residual {float(result.residual_norms.max()):.2e}); raise max_hvps or tol"
            )
        if not bool(torch.isfinite(result.eigenvalues).all()):
            raise ProbeFailure("non-finite eigenvalues")
        return result

    def _update_vectors(self, vectors: Tensor | None) -> float:
        """Overlap with the previous probe's top-k Ritz vectors (0.0 on the first probe); keeps the current ones."""
        if vectors is None:
            return math.nan
        current = vectors[:, : self.num_tracked].detach().to("cpu", torch.float64)
        overlap = 0.0  # no previous subspace: 0 (finite, so a monitor with check_finite=True is not stopped)
        if self._vectors is not None and self._vectors.shape[0] == current.shape[0]:
            previous = self._vectors.to(torch.float64)
            k = min(previous.shape[1], current.shape[1])
            overlap = float((previous[:, :k].T @ current[:, :k]).pow(2).sum() / k)
        self._vectors = current.to(torch.float32)
        return overlap

    def _analyses(self, full: bool) -> list[Analysis]:
        built: list[Analysis] = []
        if self.powerlaw_every_n_epochs is not None:
            built.append(PowerLawAnalysis(self.ks_level, self.top_k))
        if self.trace:
            built.append(TraceAnalysis(self.trace_samples))
        if self.density or self.near_zero:
            built.append(
                DensityAnalysis(
                    self.density_probes,
                    self.density_steps,
                    histogram=self.density,
                    near_zero=self.near_zero,
                    near_zero_threshold=self.near_zero_threshold,
                )
            )
        if self.per_layer:
            built.append(PerLayerAnalysis(self.top_k, self.ks_level, self.tol))
        built += [a for a in (self._jacobian, self._condensation) if a is not None]
        return [a for a in (*built, *self.analyses) if full or not a.full_only]

    def _fail(self, reason: str, key_groups: list[list[str]], scalars: dict[str, float]) -> None:
        message = f"HessianSpectrum[{self.prefix}]: probe failed ({reason})."
        if self.strict:
            raise ProbeFailure(message)
        rank_zero_warn(message + (" Logging NaN." if self.nan_on_failure else " Logging nothing."))
        if self.nan_on_failure:
            for keys in key_groups:
                scalars.update(dict.fromkeys(keys, math.nan))

    # ------------------------------------------------------------------ helpers
    def _key(self, name: str) -> str:
        return rp.metric_key(self.prefix, name)

    def _per_layer_keys(self, pl_module: Any) -> list[str]:
        return PerLayerAnalysis(self.top_k, self.ks_level, self.tol).keys(self.prefix, pl_module)

    def _torch_dtype(self, pl_module: Any) -> torch.dtype:
        if self.dtype is not None:
            return getattr(torch, self.dtype)
        model_dtype = next((p.dtype for p in pl_module.parameters() if p.requires_grad), torch.float32)
        return model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32

    def _tensorboard_step(self, trainer: pl.Trainer) -> int:
        """The step at which Lightning writes this hook's epoch-level scalars (so histograms line up with them)."""
        loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
        stepped = getattr(loop, "_batches_that_stepped", None)
        if stepped is None:
            return int(trainer.global_step)
        return max(int(stepped) - 1, 0) if self.when == "train_epoch_end" else int(stepped)

    def logged_keys(self, pl_module: Any = None) -> list[str]:
        """Every scalar key this configuration can log (for monitors and dashboards)."""
        keys = [self._key(n) for n in (rp.LAMBDA_MAX, rp.SPECTRAL_GAP, rp.SPECTRAL_GAP_RATIO, rp.SUBSPACE_OVERLAP)]
        keys += [self._key(rp.HVPS), self._key(rp.PROBE_SECONDS)]
        for analysis in self._analyses(full=True):
            keys += analysis.keys(self.prefix, pl_module)
        return keys

    def _check_monitors(self, trainer: pl.Trainer) -> None:
        """Warn when an EarlyStopping monitor of ours would check before the metric exists (or never gets it)."""
        known = set(self.logged_keys(trainer.lightning_module))
        for callback in trainer.callbacks:
            if not isinstance(callback, EarlyStopping) or not str(callback.monitor).startswith(self.prefix + "/"):
                continue
            monitor = callback.monitor
            if monitor not in known:
                rank_zero_warn(
                    f"EarlyStopping monitors {monitor!r}, which this HessianSpectrum never logs with the current "
                    f"arguments (logged keys: {sorted(known)})."
                )
            at_train_end = getattr(callback, "_check_on_train_epoch_end", None)
            if at_train_end is None:
                at_train_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1
            if self.when == "train_epoch_end" and not at_train_end:
                rank_zero_warn(
                    f"EarlyStopping(monitor={monitor!r}) checks at on_validation_end, which runs before "
                    "HessianSpectrum probes at on_train_epoch_end: its first check finds no value (an error with "
                    "strict=True) and later checks see the previous epoch's value. Use "
                    "HessianSpectrum(when='validation_epoch_end') or EarlyStopping(check_on_train_epoch_end=True)."
                )
            if self.when == "validation_epoch_end" and at_train_end and trainer.check_val_every_n_epoch != 1:
                rank_zero_warn(
                    f"EarlyStopping(monitor={monitor!r}) checks at every train-epoch end, but HessianSpectrum probes "
                    f"at validation, which runs every {trainer.check_val_every_n_epoch} epochs: the first checks "
                    "find no value. Use when='train_epoch_end'."
                )
            if self.every_n_epochs > 1:
                rank_zero_info(
                    f"HessianSpectrum probes every {self.every_n_epochs} epochs: EarlyStopping(monitor={monitor!r}) "
                    "sees the last probe's value in between and spends patience on it; count patience in epochs."
                )


def _sibling_prefix(prefix: str, family: str) -> str:
    """Prefix of a sibling metric family (``jacobian``, ``embedding``) of the callback's ``prefix``.

    ``hessian`` -> ``jacobian``, ``val_hessian`` -> ``val_jacobian``, else ``f"{prefix}_{family}"``, so two callback
    instances with distinct prefixes never collide.
    """
    return prefix.replace("hessian", family) if "hessian" in prefix else f"{prefix}_{family}"


def _check_int(name: str, value: Any, minimum: int | None, extra: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else f"an integer >= {minimum}"
        raise HessianConfigError(f"{name} must be {allowed}{' ' + extra if extra else ''}, got {value!r}.")


def _check_number(name: str, value: Any, allowed: str, upper: float = math.inf) -> None:
    """``value`` must be a real number in the open interval ``(0, upper)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < upper:
        raise HessianConfigError(f"{name} must be {allowed}, got {value!r}.")


def _min_powerful_k(ks_level: float) -> int:
    k = 3
    while ks_critical_value(k, ks_level) >= RANDOM_INIT_KS_DISTANCE:
        k += 1
    return k
