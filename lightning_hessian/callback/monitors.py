"""Checks that an ``EarlyStopping`` on a ``HessianSpectrum`` key will find the key when it looks for it."""

from __future__ import annotations

from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["check_monitors", "monitored_keys"]


def monitored_keys(trainer: pl.Trainer) -> set[str]:
    """Keys that the trainer's ``EarlyStopping`` and ``ModelCheckpoint`` callbacks and LR schedulers monitor."""
    keys = {
        str(callback.monitor)
        for callback in trainer.callbacks
        if isinstance(callback, (EarlyStopping, ModelCheckpoint)) and callback.monitor is not None
    }
    for config in getattr(trainer, "lr_scheduler_configs", None) or []:
        if getattr(config, "monitor", None):
            keys.add(str(config.monitor))
    return keys


def check_monitors(trainer: pl.Trainer, prefix: str, when: str, every_n_epochs: int, known: Iterable[str]) -> None:
    """Warn when an ``EarlyStopping`` monitoring one of our keys would check before it exists (or never gets it).

    Args:
        trainer: the Trainer (its callbacks are inspected).
        prefix: the callback's metric prefix; monitors outside it are ignored.
        when: the callback's probing hook (``"train_epoch_end"`` or ``"validation_epoch_end"``).
        every_n_epochs: the callback's probe interval.
        known: every key the callback's configuration can log.
    """
    known = set(known)
    for callback in trainer.callbacks:
        if not isinstance(callback, EarlyStopping) or not str(callback.monitor).startswith(prefix + "/"):
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
        if when == "train_epoch_end" and not at_train_end:
            rank_zero_warn(
                f"EarlyStopping(monitor={monitor!r}) checks at on_validation_end, which runs before "
                "HessianSpectrum probes at on_train_epoch_end: its first check finds no value (an error with "
                "strict=True) and later checks see the previous epoch's value. Use "
                "HessianSpectrum(when='validation_epoch_end') or EarlyStopping(check_on_train_epoch_end=True)."
            )
        if when == "validation_epoch_end" and at_train_end and trainer.check_val_every_n_epoch != 1:
            rank_zero_warn(
                f"EarlyStopping(monitor={monitor!r}) checks at every train-epoch end, but HessianSpectrum probes "
                f"at validation, which runs every {trainer.check_val_every_n_epoch} epochs: the first checks "
                "find no value. Use when='train_epoch_end'."
            )
        if every_n_epochs > 1:
            rank_zero_info(
                f"HessianSpectrum probes every {every_n_epochs} epochs: EarlyStopping(monitor={monitor!r}) "
                "sees the last probe's value in between and spends patience on it; count patience in epochs."
            )
