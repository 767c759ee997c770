"""Checks at ``setup`` that turn late, obscure failures into one clear error."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from lightning_hessian.callback.config import HessianConfigError

__all__ = ["check_picklable"]


def _spawns(trainer: Any) -> bool:
    """Whether the trainer's strategy starts its processes with ``spawn`` (the callback is pickled to them)."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return getattr(launcher, "_start_method", None) == "spawn" or getattr(trainer.strategy, "_start_method", None) == (
        "spawn"
    )


def check_picklable(trainer: Any, functions: Mapping[str, Any], spawn: bool | None = None) -> None:
    """Raise a clear error when a user function cannot be pickled under a spawn strategy (``ddp_spawn``).

    Args:
        trainer: the Trainer (its strategy decides whether the callback is pickled).
        functions: argument name -> function (``None`` entries are skipped).
        spawn: override the detection (tests).

    Raises:
        HessianConfigError: naming the argument and asking for a module-level function.
    """
    if not (_spawns(trainer) if spawn is None else spawn):
        return
    for name, fn in functions.items():
        if fn is None:
            continue
        try:
            pickle.dumps(fn)
        except Exception as exc:  # noqa: BLE001 - PicklingError, AttributeError, TypeError
            raise HessianConfigError(
                f"{name}={fn!r} cannot be pickled ({type(exc).__name__}: {exc}), but the spawn strategy pickles the "
                f"callback into every process. Pass a function defined at module level (not a lambda, a closure or "
                "a local function), or use strategy='ddp'."
            ) from exc
