"""Module state around a probe: rank 0's buffers for the probe under DDP, and no side effects afterwards.

* :func:`rank_zero_buffers`: under DDP each rank's BatchNorm running statistics (and any other buffer) drift apart
  after the last optimizer step (each rank updates them with its own batch). A probe must evaluate *one* model, so
  every rank copies rank 0's buffers into the module for the probe (one broadcast per buffer dtype, following the
  status protocol of :mod:`lightning_hessian.distributed`) and gets its own buffers back, bit for bit, afterwards.
* :class:`ModuleSnapshot`: the default loss runs the module's ``training_step``, which may update torchmetrics
  ``Metric`` states, append to lists, or rebind attributes. The snapshot records every submodule's attributes
  (shallow), the contents of list/dict/set attributes, the tensor states of torchmetrics metrics and every buffer,
  and :meth:`ModuleSnapshot.restore` puts them back. What it cannot restore (an in-place change of a plain tensor
  attribute or a parameter, detected through the tensor's version counter) is reported so the callback can warn.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_hessian.distributed import checked_broadcast, is_distributed

__all__ = ["ModuleSnapshot", "rank_zero_buffers"]

_CONTAINERS = (list, dict, set)


def _is_metric(module: nn.Module) -> bool:
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics ships with Lightning
        return False
    return isinstance(module, Metric)


class ModuleSnapshot:
    """Everything a probe's calls of ``training_step`` could change on ``module``, restorable.

    Args:
        module: the LightningModule (all its submodules are covered).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._attributes: list[tuple[nn.Module, dict[str, Any], dict[str, Any]]] = []
        self._metric_states: list[tuple[nn.Module, dict[str, Any]]] = []
        self._versions: list[tuple[str, Tensor, int]] = []
        for name, sub in module.named_modules():
            attributes = dict(sub.__dict__)
            contents = {k: copy.copy(v) for k, v in attributes.items() if isinstance(v, _CONTAINERS)}
            self._attributes.append((sub, attributes, contents))
            if _is_metric(sub):
                states = {k: copy.deepcopy(getattr(sub, k)) for k in getattr(sub, "_defaults", {})}
                self._metric_states.append((sub, states))
            else:
                for key, value in attributes.items():
                    if isinstance(value, Tensor):
                        self._versions.append((f"{name}.{key}" if name else key, value, value._version))
        self._params = [(n, p, p._version) for n, p in module.named_parameters()]
        self._buffers = [(b, b.detach().clone()) for _, b in module.named_buffers()]

    def restore(self) -> list[str]:
        """Put the recorded state back.

        Returns:
            Names of attributes changed in place that could not be restored (empty when everything was restored).
        """
        for sub, attributes, contents in self._attributes:
            current = sub.__dict__
            for key in [k for k in current if k not in attributes]:
                del current[key]
            for key, value in attributes.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
                if key in contents and _differs(value, contents[key]):
                    _refill(value, contents[key])
        for sub, states in self._metric_states:
            for key, value in states.items():
                setattr(sub, key, value)
        with torch.no_grad():
            for buffer, saved in self._buffers:
                if not _same(buffer, saved):
                    buffer.copy_(saved)
        lost = [name for name, tensor, version in self._versions if tensor._version != version]
        lost += [name for name, p, version in self._params if p._version != version]
        return lost


_MISSING = object()


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.detach(), b))


def _differs(value: Any, saved: Any) -> bool:
    if len(value) != len(saved):
        return True
    if isinstance(value, dict):
        return value.keys() != saved.keys() or any(value[k] is not saved[k] for k in value)
    if isinstance(value, set):
        return value != saved
    return any(a is not b for a, b in zip(value, saved))


def _refill(value: Any, saved: Any) -> None:
    value.clear()
    if isinstance(value, dict):
        value.update(saved)
    elif isinstance(value, set):
        value.update(saved)
    else:
        value.extend(saved)


@contextlib.contextmanager
def rank_zero_buffers(module: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Inside the block every rank holds rank 0's buffers; afterwards each rank's own buffers, bit for bit.

    One broadcast per buffer dtype (flattened), each preceded by the status all-reduce of
    :func:`~lightning_hessian.distributed.checked_broadcast`; without DDP nothing happens. Every rank must enter
    the block at the same point of the probe.

    Raises:
        AgreedFailure: on every rank when the broadcast failed on one of them.
    """
    buffers = [b for _, b in module.named_buffers()]
    if not is_distributed() or not buffers:
        yield
        return
    saved = [b.detach().clone() for b in buffers]
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for b in buffers:
        groups.setdefault((b.dtype, b.device), []).append(b)
    try:
        with torch.no_grad():
            for (_, dev), members in groups.items():  # insertion order: the same on every rank
                flat = torch.cat([b.detach().reshape(-1) for b in members]).to(device or dev)
                checked_broadcast(flat, src=0)
                offset = 0
                for b in members:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
