r"""Collectives that never mismatch: a two-phase protocol for failures agreed by all ranks.

Every collective of a probe is preceded by a *status* all-reduce, a 1-element ``SUM`` reduction of the ranks'
failure flags (:func:`failed_ranks`, :func:`agree`). Only when no rank failed does the payload follow
(:func:`checked_all_reduce`, :func:`checked_broadcast`); otherwise every rank raises :class:`AgreedFailure` without the
payload. The rules:

1. A rank that fails *inside* a product (an exception, a non-finite value) still takes part in the product's status
   all-reduce, with ``failed_locally=True``; every rank then raises :class:`AgreedFailure`.
2. A rank that fails locally *outside* a product jumps to the stage's agreement point (:func:`run_stage`), which is
   itself ``agree(True)``: it pairs with the healthy ranks' next status all-reduce (a product's, or their own
   agreement point), so the collectives keep their sizes.
3. A rank that observes a remote failure through :class:`AgreedFailure` treats it as the stage's agreement and skips
   its own :func:`agree` for that stage, so all ranks stay in lock-step.

Without an initialised process group (or with one rank) every function is the identity and ``agree`` returns the
local flag. This module imports no Lightning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "AgreedFailure",
    "agree",
    "broadcast_object",
    "checked_all_reduce",
    "checked_broadcast",
    "failed_ranks",
    "gather_objects",
    "is_distributed",
    "run_stage",
]

T = TypeVar("T")


class AgreedFailure(RuntimeError):
    """A failure that every rank already knows about (the status all-reduce said so): do not agree on it again.

    Attributes:
        local: the exception raised on this rank, or ``None`` when the failure happened on another rank.
    """

    def __init__(self, message: str, local: BaseException | None = None) -> None:
        super().__init__(message)
        self.local = local


def is_distributed() -> bool:
    """Whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def failed_ranks(failed: bool, device: torch.device | str | None = None) -> int:
    """How many ranks failed: a 1-element ``SUM`` all-reduce of the status flag (the local flag without DDP).

    Every status all-reduce of the protocol is this one collective, so a product's status check pairs with another
    rank's stage agreement point.

    Args:
        failed: this rank's status.
        device: where the flag lives (the backend's device: the model's device in practice).

    Returns:
        The number of ranks whose ``failed`` is true.
    """
    if not is_distributed():
        return int(bool(failed))
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return int(round(flag.item()))


def agree(failed: bool, device: torch.device | str | None = None) -> bool:
    """Whether any rank failed (:func:`failed_ranks` ``> 0``).

    Args:
        failed: this rank's status.
        device: where the flag lives (the backend's device: the model's device in practice).

    Returns:
        ``True`` if ``failed`` is true on at least one rank.
    """
    return failed_ranks(failed, device) > 0


def _failure(local: BaseException | None, what: str) -> AgreedFailure:
    if local is not None:
        return AgreedFailure(f"{what} failed on this rank: {type(local).__name__}: {local}", local)
    return AgreedFailure(f"{what} failed on another rank")


def checked_all_reduce(tensor: Tensor, failed_locally: bool, local_error: BaseException | None = None) -> Tensor:
    """Status all-reduce, then (if no rank failed) the payload ``SUM`` all-reduce, in place.

    Args:
        tensor: this rank's contribution (its content is ignored when ``failed_locally``, but it must exist).
        failed_locally: whether this rank's contribution is unusable.
        local_error: the local exception, if any (carried by the raised :class:`AgreedFailure`).

    Returns:
        ``tensor``, now holding the sum over ranks.

    Raises:
        AgreedFailure: on every rank when any rank failed (no payload all-reduce took place).
    """
    if agree(failed_locally, tensor.device):
        raise _failure(local_error if failed_locally else None, "a reduction")
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def checked_broadcast(tensor: Tensor, src: int = 0, failed_locally: bool = False) -> Tensor:
    """Status all-reduce, then (if no rank failed) broadcast ``tensor`` from rank ``src`` in place.

    Raises:
        AgreedFailure: on every rank when any rank failed.
    """
    if agree(failed_locally, tensor.device):
        raise _failure(None, "a broadcast")
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def broadcast_object(obj: T, src: int = 0, failed_locally: bool = False, device: Any = None) -> T:
    """Status all-reduce, then (if no rank failed) rank ``src``'s picklable ``obj`` on every rank.

    Raises:
        AgreedFailure: on every rank when any rank failed.
    """
    if agree(failed_locally, device):
        raise _failure(None, "a broadcast")
    if not is_distributed():
        return obj
    shared = [obj]
    dist.broadcast_object_list(shared, src=src, device=device if _is_cuda(device) else None)
    return shared[0]


def gather_objects(obj: Any, device: Any = None) -> list[Any]:
    """Every rank's picklable ``obj`` (rank order); ``[obj]`` without DDP. Call it only at a point all ranks reach."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def run_stage(fn: Callable[[], T], device: torch.device | str | None = None) -> tuple[T | None, BaseException | None]:
    """Run one stage of a probe and agree on its outcome with every rank.

    A local exception jumps to the agreement point (``agree(True)``); an :class:`AgreedFailure` (a remote or local
    failure already agreed inside a collective) *is* the agreement, so no further ``agree`` is called; a local
    success ends with ``agree(False)``, which tells it whether another rank failed after its last collective.

    Args:
        fn: the stage; every collective inside it must use this module's checked functions.
        device: the status flag's device.

    Returns:
        ``(result, None)`` when every rank succeeded, else ``(None, error)`` on every rank, where ``error`` is the local
        exception or an :class:`AgreedFailure`.
    """
    try:
        result = fn()
    except AgreedFailure as exc:
        return None, exc
    except Exception as exc:  # noqa: BLE001 - every local failure is agreed, never fatal
        agree(True, device)
        return None, exc
    if agree(False, device):
        return None, AgreedFailure("the stage failed on another rank")
    return result, None
