"""Shared small models, data and dense float64 references for the core-engine tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian


def mse_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def cross_entropy_loss(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_case(name: str, seed: int = 0, n: int = 48, dtype: torch.dtype = torch.float64):
    """(model, loss_fn, batches) for a named small case; batches have unequal sizes on purpose."""
    gen = torch.Generator().manual_seed(seed)
    d, h, k = 5, 7, 3
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    torch.manual_seed(seed)
    if name == "tanh_mse":
        model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, k))
        y = torch.randn(n, k, generator=gen, dtype=dtype)
        loss_fn: Callable = mse_loss
    elif name == "relu_ce":
        model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, k))
        y = torch.randint(0, k, (n,), generator=gen)
        loss_fn = cross_entropy_loss
    elif name == "bn_tanh_ce":
        model = nn.Sequential(nn.Linear(d, h), nn.BatchNorm1d(h), nn.Tanh(), nn.Linear(h, k))
        y = torch.randint(0, k, (n,), generator=gen)
        loss_fn = cross_entropy_loss
        model.train()
        with torch.no_grad():  # non-trivial running statistics
            model.to(dtype)(x)
    elif name == "relu_mse":
        model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k))
        y = torch.randn(n, k, generator=gen, dtype=dtype)
        loss_fn = mse_loss
    else:
        raise KeyError(name)
    model = model.to(dtype)
    cuts = [0, n // 6, n // 2, n]  # batches of unequal sizes
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return model, loss_fn, batches


CASES = ["tanh_mse", "relu_ce", "bn_tanh_ce", "relu_mse"]


def dense_hessian(model: nn.Module, loss_fn: Callable, batches: list) -> Tensor:
    """Dense float64 Hessian of the sample-weighted probe loss, via ``torch.func.hessian`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach().double() for name, p in model.named_parameters()}
    buffers = {name: b.detach().double() if b.is_floating_point() else b for name, b in model.named_buffers()}
    shapes = [params[name].shape for name in names]
    sizes = [params[name].numel() for name in names]
    total = sum(int(b[0].shape[0]) for b in batches)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, batch):
            return loss_fn(self.model, batch)

    wrapped = Wrapped()

    def loss_of(flat: Tensor) -> Tensor:
        pieces = dict(zip(names, (c.view(s) for c, s in zip(flat.split(sizes), shapes))))
        tensors = {f"model.{k}": v for k, v in {**params, **pieces, **buffers}.items()}
        out = flat.new_zeros(())
        for batch in batches:
            batch64 = tuple(t.double() if t.is_floating_point() else t for t in batch)
            out = out + batch[0].shape[0] * functional_call(wrapped, tensors, (batch64,))
        return out / total

    flat = torch.cat([params[name].reshape(-1) for name in names])
    try:
        return hessian(loss_of)(flat)
    finally:
        model.train(was_training)


def symmetric_with_spectrum(eigenvalues: Tensor, seed: int = 0) -> Tensor:
    """A dense symmetric matrix with the given spectrum and a random orthogonal eigenbasis."""
    n = eigenvalues.numel()
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * eigenvalues.to(torch.float64)) @ q.T


def ddp_fork_marks(timeout: int, probe_failures: bool = False) -> list[Any]:
    """pytest marks of the 2-process ``ddp_fork`` callback tests: Linux only, their expected warnings, a timeout.

    With ``probe_failures``, the warnings of probes that fail on purpose are expected too.
    """
    marks = [
        pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ddp_fork needs fork"),
        pytest.mark.filterwarnings("ignore:.*KS critical value.*"),
        pytest.mark.filterwarnings("ignore:.*of the .* parameters.*"),
        pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
        pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    ]
    if probe_failures:
        marks.append(pytest.mark.filterwarnings("ignore:.*probe failed.*"))
    return [*marks, pytest.mark.timeout(timeout)]
