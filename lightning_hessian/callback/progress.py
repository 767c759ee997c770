"""A running probe in Lightning's progress bar: a second line ``hessian full probe: 123 HVPs [00:04, 28 HVPs/s]``.

A probe runs inside an epoch-end hook, where the training bar stands still; :class:`ProbeProgress` adds a transient
line below it for the duration of the probe with the Hessian-vector products done so far, refreshed at most every
``interval`` seconds (0.5 s by default, never per HVP), and removes it when the probe ends. It supports Lightning's
:class:`~lightning.pytorch.callbacks.TQDMProgressBar` (a second ``tqdm`` bar at the next free position) and
:class:`~lightning.pytorch.callbacks.RichProgressBar` (a second task of its live display; ``rich`` stays optional), and
does nothing for a disabled bar, a custom bar, on ranks other than 0 or without a bar.
"""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["ProbeProgress"]


class ProbeProgress:
    """Shows one probe's HVP count in the trainer's progress bar.

    Args:
        trainer: the Trainer (its ``progress_bar_callback`` is used).
        description: the line's label, e.g. ``"hessian full probe"``.
        interval: minimal seconds between two refreshes.

    Attributes:
        kind: ``"tqdm"``, ``"rich"`` or ``None`` (nothing shown).
        shown: the last HVP count displayed.
    """

    def __init__(self, trainer: Any, description: str, *, interval: float = 0.5) -> None:
        self.interval = interval
        self.kind: str | None = None
        self.shown = 0
        self._bar: Any = None
        self._task: Any = None
        self._last = -float("inf")
        if not getattr(trainer, "is_global_zero", True):
            return
        callback = getattr(trainer, "progress_bar_callback", None)
        if callback is None or not getattr(callback, "is_enabled", False):
            return
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        try:
            if isinstance(callback, TQDMProgressBar):
                self._open_tqdm(callback, description)
            elif isinstance(callback, RichProgressBar) and getattr(callback, "progress", None) is not None:
                self._task = callback._add_task(float("inf"), description)
                self._bar = callback
                self.kind = "rich"
        except Exception:  # noqa: BLE001 - a display problem must never fail a probe
            self.kind = None

    def _open_tqdm(self, callback: Any, description: str) -> None:
        from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

        validation = getattr(callback, "_val_progress_bar", None)
        validating = validation is not None and not validation.disable  # tqdm sets disable when it closes
        self._bar = Tqdm(
            desc=description,
            total=None,
            unit=" HVPs",
            position=2 * callback.process_position + 1 + int(validating),
            leave=False,
            dynamic_ncols=True,
            file=sys.stdout,
            disable=callback.is_disabled,
        )
        self.kind = "tqdm"

    def update(self, hvps: int) -> None:
        """Display ``hvps`` if ``interval`` seconds passed since the last refresh."""
        if self.kind is None:
            return
        now = time.perf_counter()
        if now - self._last < self.interval:
            return
        self._last = now
        self._show(hvps)

    def _show(self, hvps: int) -> None:
        try:
            if self.kind == "tqdm":
                self._bar.n = hvps
                self._bar.refresh()
            else:
                self._bar.progress.update(self._task, completed=hvps)
                self._bar.refresh()
            self.shown = hvps
        except Exception:  # noqa: BLE001
            self.kind = None

    def close(self, hvps: int | None = None) -> None:
        """Show the final count (if given) and remove the line."""
        if self.kind is None:
            return
        if hvps is not None:
            self._show(hvps)
        try:
            if self.kind == "tqdm":
                self._bar.close()
            else:
                self._bar.progress.remove_task(self._task)
                self._bar.refresh()
        except Exception:  # noqa: BLE001
            pass
        self.kind = None
