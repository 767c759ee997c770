"""HessianSpectrum under real DDP (2 CPU processes, gloo, ``ddp_fork``): same metrics as one process on the union of
the ranks' probe samples, and no hang when the probe fails on one rank only."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callback import HessianSpectrum
from tests.cases import ddp_fork_marks

pytestmark = ddp_fork_marks(180, probe_failures=True)


class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.2, fail_on_rank: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        self.lr = lr
        self.fail_on_rank = fail_on_rank

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def hessian_loss(self, batch):
        if self.fail_on_rank is not None and self.global_rank == self.fail_on_rank:
            raise RuntimeError(f"probe data broken on rank {self.global_rank}")
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(31, 5, generator=g), torch.randint(0, 3, (31,), generator=g))


def _callback(**kwargs) -> HessianSpectrum:
    # probe_samples >= 31: each rank probes its whole strided shard (16 + 15 samples), the union is the data set
    return HessianSpectrum(
        top_k=8,
        probe_samples=64,
        dtype="float64",
        tol=1e-10,
        num_tracked=3,
        trace_samples=4,
        density=False,
        max_overhead=None,
        **kwargs,
    )


def _trainer(devices: int, callbacks, max_epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )


def test_ddp_metrics_equal_single_process_on_the_union():
    torch.manual_seed(0)
    model = Net()
    # no probe at initialisation: the subspace overlap compares with the previous probe, which must be the same in
    # both runs (the one-process reference starts from the trained weights)
    ddp = _trainer(2, [_callback(probe_at_init=False)])
    ddp.fit(model, DataLoader(_data(), batch_size=4, shuffle=True))
    ddp_metrics = {k: float(v) for k, v in ddp.callback_metrics.items() if k.startswith("hessian/")}
    # input-dependent analyses log rank 0's values on every rank (broadcast): present and finite
    rank_local = [k for k in ddp.callback_metrics if k.startswith(("jacobian/", "embedding/"))]
    assert {"jacobian/fpt_q50", "jacobian/law_distance", "embedding/merge_output_error"} <= set(rank_local)
    assert all(math.isfinite(float(ddp.callback_metrics[k])) for k in rank_local)
    # the trained weights came back to this process: probe them in one process without changing them (lr = 0)
    model.lr = 0.0
    single = _trainer(1, [_callback(probe_at_init=False)])
    single.fit(model, DataLoader(_data(), batch_size=4, shuffle=True))
    single_metrics = {k: float(v) for k, v in single.callback_metrics.items() if k.startswith("hessian/")}
    assert set(ddp_metrics) == set(single_metrics)
    assert {"hessian/lambda_max", "hessian/trace", "hessian/ks_distance", "hessian/powerlaw_beta"} <= set(ddp_metrics)
    for key in sorted(single_metrics):
        if key == "hessian/probe_seconds":
            continue
        a, b = ddp_metrics[key], single_metrics[key]
        if math.isnan(b):
            assert math.isnan(a), key
        else:
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), key


def test_probe_failing_on_one_rank_does_not_hang():
    torch.manual_seed(0)
    es = EarlyStopping(monitor="hessian/lambda_max", mode="min", patience=10, check_finite=False)
    trainer = _trainer(2, [_callback(), es], max_epochs=2)
    trainer.fit(Net(fail_on_rank=1), DataLoader(_data(), batch_size=4))
    assert trainer.state.status == "finished"  # training went on: both ranks took the failure path together
    assert math.isnan(float(trainer.callback_metrics["hessian/lambda_max"]))
    assert float(trainer.callback_metrics["hessian/hvps"]) == 0.0


def test_probe_at_init_plan_is_rank_zeros_on_every_rank(monkeypatch):
    from lightning_hessian.callback import runner

    # rank 0 sees an endless fit (a full probe fits the guard), rank 1 a one-step fit (not even a cheap probe fits):
    # every rank must run rank 0's plan, or rank 0's collectives would wait for a rank that returned (a hang)
    monkeypatch.setattr(runner, "INIT_FREE_SECONDS", 0.0)
    monkeypatch.setattr(runner, "fit_batches", lambda trainer: 1e12 if trainer.global_rank == 0 else 1.0)
    torch.manual_seed(0)
    cb = HessianSpectrum(
        top_k=8, probe_samples=64, dtype="float64", num_tracked=3, trace_samples=4, density=False, max_overhead=0.2
    )
    ddp = _trainer(2, [cb])
    ddp.fit(Net(), DataLoader(_data(), batch_size=4))
    assert ddp.state.status == "finished"
    # the full probe ran at init: its power-law keys stand in at epoch 0 (the epoch-0 probe is cheap)
    assert math.isfinite(float(ddp.callback_metrics["hessian/ks_distance"]))
    assert math.isfinite(float(ddp.callback_metrics["hessian/lambda_max"]))
