"""Faults on one DDP rank only (2 CPU processes, gloo, ``ddp_fork``): a raise inside the k-th HVP, a NaN product, a
raise in an analysis between products and a ``max_seconds`` overrun each give a warning and NaN on *both* ranks (or
``ProbeFailure`` on both with ``strict=True``); training continues, nothing hangs. One fit covers all four faults."""

from __future__ import annotations

import math
import os
import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callback import AnalysisResult, HessianSpectrum, ProbeFailure
from tests.cases import ddp_fork_marks

pytestmark = ddp_fork_marks(240, probe_failures=True)

#: Grad-mode loss calls per probe on this process (module state is restored after every probe, a global is not).
CALLS = {"epoch": -1, "count": 0}
BUDGET = 4.0  # max_seconds: far above a healthy probe of this tiny net (~0.1-0.5 s), below the injected sleep


class Faulty(pl.LightningModule):
    """Rank 1 misbehaves inside the probe, one fault per epoch (the init probe, at step 0, is healthy)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def hessian_loss(self, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if not torch.is_grad_enabled() or self.global_rank != 1 or not self.trainer.current_epoch < 4:
            return loss
        epoch = self.trainer.current_epoch if self.trainer.global_step > 0 else -1  # -1: the probe at init
        if CALLS["epoch"] != epoch:
            CALLS.update(epoch=epoch, count=0)
        CALLS["count"] += 1
        if epoch == 0 and CALLS["count"] == 5:  # inside the 5th HVP (cache_graph=False: one call per HVP)
            raise RuntimeError("HVP broken on rank 1")
        if epoch == 1 and CALLS["count"] >= 3:
            return loss * math.nan  # a non-finite product on rank 1 only
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class BetweenProducts:
    """An extra analysis of two products; between them rank 1 raises at epoch 2 and overruns max_seconds at epoch 3."""

    name = "between products"
    full_only = False
    rank_local = False

    def keys(self, prefix, pl_module):
        return [f"{prefix}/between"]

    def __call__(self, ctx):
        first = ctx.matvec(torch.ones(ctx.operator.num_params, dtype=ctx.dtype))
        if ctx.trainer.global_rank == 1 and ctx.trainer.global_step > 0:
            if ctx.trainer.current_epoch == 2:
                raise ValueError("analysis broken on rank 1")
            if ctx.trainer.current_epoch == 3:
                # rank 0 is already waiting in the next product's status all-reduce; rank 1's clock runs out
                time.sleep(BUDGET + 0.5)
        second = ctx.matvec(first)
        return AnalysisResult({f"{ctx.prefix}/between": float(second.norm())})


class Record(Callback):
    """Each rank writes its HessianSpectrum history and warnings to ``out_dir``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def _spectrum(self, trainer):
        return next(c for c in trainer.callbacks if isinstance(c, HessianSpectrum))

    def setup(self, trainer, pl_module, stage):
        import warnings

        self._catcher = warnings.catch_warnings(record=True)
        self._warnings = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_train_end(self, trainer, pl_module):
        self._catcher.__exit__(None, None, None)
        history = self._spectrum(trainer).history
        messages = [str(w.message) for w in self._warnings]
        torch.save({"history": history, "status": "finished", "warnings": messages}, self._path(trainer))

    def _path(self, trainer):
        return os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt")


def _fit(tmp_path, max_epochs: int, **kwargs) -> None:
    g = torch.Generator().manual_seed(11)
    data = TensorDataset(torch.randn(31, 5, generator=g), torch.randint(0, 3, (31,), generator=g))
    cb = HessianSpectrum(
        top_k=6,
        probe_samples=64,
        dtype="float64",
        tol=1e-8,
        num_tracked=3,
        density=False,
        trace=False,
        jacobian=False,
        embedding=False,
        cache_graph=False,
        max_seconds=BUDGET,
        max_overhead=None,  # a probe every epoch (the faults are placed per epoch)
        **kwargs,
    )
    cb.analyses.append(BetweenProducts())
    if kwargs.get("strict"):
        fail = cb._runner._fail

        def recording_fail(*args, **kw):
            # each rank records the ProbeFailure it raises; the barrier lets both write before the launcher reacts
            try:
                fail(*args, **kw)
            except ProbeFailure as exc:
                rank = torch.distributed.get_rank()
                torch.save({"exception": f"ProbeFailure: {exc}"}, os.path.join(tmp_path, f"rank{rank}.pt"))
                torch.distributed.barrier()
                raise

        cb._runner._fail = recording_fail
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        max_epochs=max_epochs,
        callbacks=[cb, Record(str(tmp_path))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Faulty(), DataLoader(data, batch_size=4))


def test_faults_on_one_rank_give_nan_on_both_and_training_continues(tmp_path):
    torch.manual_seed(0)
    _fit(tmp_path, max_epochs=5)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["status"] for r in ranks] == ["finished", "finished"]  # training went on, on both ranks
    for r in ranks:
        expected = [(0, True), *((e, False) for e in range(5))]
        assert [(h["epoch"], h.get("init", False)) for h in r["history"]] == expected
    lam = [[h["metrics"]["hessian/lambda_max"] for h in r["history"]] for r in ranks]
    between = [[h["metrics"]["hessian/between"] for h in r["history"]] for r in ranks]
    # init: healthy; epoch 0: raise in the 5th HVP (top eigenpairs fail, the later analysis is healthy); 1: NaN
    # products throughout; 2: raise in the analysis; 3: overrun in the analysis; 4: healthy
    for values in lam:
        assert [math.isnan(v) for v in values] == [False, True, True, False, False, False]
    for values in between:
        assert [math.isnan(v) for v in values] == [False, False, True, True, True, False]
    warnings = ranks[0]["warnings"]  # rank 0's warnings name rank 1's reasons
    assert any("rank 1: RuntimeError: HVP broken on rank 1" in w for w in warnings)
    assert any("rank 1: FloatingPointError: non-finite" in w for w in warnings)
    assert any("rank 1: ValueError: analysis broken on rank 1" in w for w in warnings)
    assert any("rank 1: the time budget max_seconds" in w and "rank 0:" not in w for w in warnings)
    assert list(map(repr, lam[0])) == list(map(repr, lam[1]))  # the ranks agree bit for bit (NaN included)
    assert list(map(repr, between[0])) == list(map(repr, between[1]))
    hvps = [[h["metrics"]["hessian/hvps"] for h in r["history"]] for r in ranks]
    assert hvps[0] == hvps[1]  # lock-step: the same number of products on both ranks, failures included


def test_strict_fault_on_one_rank_raises_on_both(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(Exception):  # noqa: B017 - the launcher re-raises the ranks' ProbeFailure as its own error
        _fit(tmp_path, max_epochs=1, strict=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["exception"].startswith(ProbeFailure.__name__), r
        assert "HVP broken on rank 1" in r["exception"]  # the failing rank's reason reaches every rank
