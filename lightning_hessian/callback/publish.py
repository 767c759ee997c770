"""Where a probe's results go: ``pl_module.log`` or the loggers directly, ``callback_metrics``, TensorBoard extras.

Small functions the callback calls after each probe, so that :class:`~lightning_hessian.callback.HessianSpectrum`
stays glue. Metric names and the TensorBoard item classes live in :mod:`~lightning_hessian.callback.reporting`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_hessian.callback import reporting as rp
from lightning_hessian.callback.analyses import PerLayerAnalysis, world_size

__all__ = ["fill_monitors", "publish", "tensorboard_step", "write_dashboard_layout"]


def tensorboard_step(trainer: Any, when: str) -> int:
    """The step at which Lightning writes this hook's epoch-level scalars (so histograms line up with them)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    if stepped is None:
        return int(trainer.global_step)
    return max(int(stepped) - 1, 0) if when == "train_epoch_end" else int(stepped)


def publish(
    trainer: Any,
    pl_module: Any,
    scalars: Mapping[str, float],
    items: Sequence[rp.TensorBoardItem],
    *,
    step: int | None,
    tensorboard: bool,
    when: str = "train_epoch_end",
) -> None:
    """Log a probe's scalars and write its TensorBoard items.

    Args:
        trainer: the Trainer.
        pl_module: the LightningModule.
        scalars: key -> value.
        items: TensorBoard items (histograms, figures, text), written on global rank 0.
        step: ``None`` logs through ``pl_module.log`` (the hook's epoch-level step; monitors see the values in the same
            epoch); an int writes straight to the loggers at that step (the probe at initialisation, at step 0, and a
            probe resumed from a checkpoint: hooks where ``pl_module.log`` would land at the wrong step).
        tensorboard: write the TensorBoard extras when a TensorBoard logger is attached.
        when: the probing hook (``"train_epoch_end"`` or ``"validation_epoch_end"``), for the step of the extras.
    """
    if step is None:
        rp.log_scalars(pl_module, scalars, sync_dist=world_size() > 1)
    elif trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(dict(scalars), step=step)
    if tensorboard:
        writer = rp.find_tensorboard_writer(trainer)
        if writer is not None:
            rp.write_items(writer, items, step if step is not None else tensorboard_step(trainer, when))


def fill_monitors(trainer: Any, pl_module: Any, values: Mapping[str, float]) -> None:
    """Put ``values`` into ``trainer.callback_metrics`` only (monitors read them; loggers already have them)."""
    trainer.callback_metrics.update(
        {key: torch.tensor(float(v), dtype=torch.float64, device=pl_module.device) for key, v in values.items()}
    )


def write_dashboard_layout(trainer: Any, callback: Any, pl_module: Any) -> bool:
    """Write the custom-scalar layout once per writer and warn when figures cannot be drawn; ``True`` if written."""
    writer = rp.find_tensorboard_writer(trainer)
    if writer is None:
        return False
    runner = callback._runner
    extra = PerLayerAnalysis(callback.top_k, callback.ks_level, callback.tol).keys(callback.prefix, pl_module)
    layout = rp.custom_scalar_layout(
        callback.prefix,
        extra if callback.per_layer else [],
        jacobian_prefix=runner.jacobian.prefix if runner.jacobian is not None else None,
        embedding_prefix=runner.condensation.prefix if runner.condensation is not None else None,
        keys=callback.logged_keys(pl_module),
    )
    writer.add_custom_scalars(layout)
    if (callback.powerlaw_every_n_epochs is not None or callback.jacobian) and not rp.matplotlib_available():
        rank_zero_warn(rp.MATPLOTLIB_MISSING)
    return True
