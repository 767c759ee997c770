"""The default probe loss of :class:`~lightning_hessian.callback.HessianSpectrum`: the module's own training loss."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_hessian.callback.analyses import ProbeFailure

__all__ = ["default_loss"]


def default_loss(pl_module: pl.LightningModule, batch: Any) -> Tensor:
    """Default ``loss_fn``: ``pl_module.hessian_loss(batch)`` if defined, else the loss of ``training_step``.

    ``training_step(batch, 0)`` is called with ``pl_module.log``/``log_dict`` silenced (the probe never pollutes the
    module's logged metrics); its return value must be the batch-mean loss as a Tensor or a dict with key ``"loss"``.
    It runs in eval mode (dropout off, BatchNorm on running statistics) inside a functional call whose parameters are
    the probe's copies. Side effects are undone: every probe snapshots the module's state (attributes of every
    submodule, torchmetrics ``Metric`` states, buffers) and restores it afterwards
    (:class:`~lightning_hessian.callback.state.ModuleSnapshot`), warning once when a call changed a tensor in place
    that could not be restored. Define ``hessian_loss(self, batch) -> Tensor`` (or pass ``loss_fn``) when
    ``training_step`` adds regularisers that are not part of the training loss you want probed, uses manual
    optimisation, or returns ``None``.

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
