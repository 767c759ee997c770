"""One model under DDP (2 CPU processes, gloo, ``ddp_fork``): with BatchNorm the ranks' running statistics differ
after the last step; the probe uses rank 0's buffers on every rank, equals the single-process probe of the union at
rank 0's state, and leaves each rank's own buffers exactly as they were."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator
from lightning_hessian.callback import HessianSpectrum
from tests.cases import ddp_fork_marks

pytestmark = ddp_fork_marks(180)


class BNNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model.net(x), y)


class Snapshot(Callback):
    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag

    def on_train_epoch_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        spectrum = next(c for c in trainer.callbacks if isinstance(c, HessianSpectrum))
        path = os.path.join(self.out_dir, f"{self.tag}{trainer.global_rank}.pt")
        torch.save({"state": state, "history": spectrum.history}, path)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))


def test_batchnorm_ddp_probe_uses_rank_zero_buffers_and_restores_them(tmp_path):
    torch.manual_seed(0)
    cb = HessianSpectrum(
        top_k=4, probe_samples=64, dtype="float64", tol=1e-10, num_tracked=2, density=False, trace=False,
        jacobian=False, embedding=False, probe_at_init=False,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        callbacks=[Snapshot(str(tmp_path), "before"), cb, Snapshot(str(tmp_path), "after")],
    )  # fmt: skip
    trainer.fit(BNNet().double(), DataLoader(_data(), batch_size=4, shuffle=True))
    before = [torch.load(tmp_path / f"before{r}.pt") for r in range(2)]
    after = [torch.load(tmp_path / f"after{r}.pt") for r in range(2)]
    key = "net.1.running_mean"
    assert not torch.equal(before[0]["state"][key], before[1]["state"][key])  # the ranks' statistics differ
    for b, a in zip(before, after):
        for name, value in b["state"].items():
            assert torch.equal(value, a["state"][name]), name  # each rank's own buffers, bit for bit
    # the single-process probe of the union (the whole data set) at rank 0's state
    model = BNNet().double()
    model.load_state_dict(before[0]["state"])
    x, y = _data().tensors
    dense = HessianOperator(model, _loss, [(x, y)], dtype=torch.float64).dense()
    expected = float(torch.linalg.eigvalsh(dense)[-1])
    for a in after:
        got = a["history"][-1]["metrics"]["hessian/lambda_max"]
        assert got == pytest.approx(expected, rel=1e-6)
