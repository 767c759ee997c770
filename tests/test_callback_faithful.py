"""Faithful probes in single-process setups (issue 10): samplers, side effects, the probe at initialisation,
trainer.validate(), batch types, degenerate models, argument checks and checkpoints taken during a probe."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

from lightning_hessian.callback import HessianConfigError, HessianSpectrum
from tests.test_callback import QUIET, Net, dense_hessian, make_data, trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*KS critical value.*"),
    pytest.mark.filterwarnings("ignore:.*of the .* parameters.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*exceeds the .* trainable parameters.*"),
    pytest.mark.filterwarnings("ignore:.*probe failed.*"),
]


# ----------------------------------------------------------------------------------------------- item 3: samplers
@pytest.mark.parametrize("kind", ["subset", "weighted"])
def test_probe_set_holds_only_samples_the_sampler_yields(tmp_path, kind):
    data = make_data(n=48)
    if kind == "subset":
        sampler = SubsetRandomSampler(range(10))
    else:
        sampler = WeightedRandomSampler([1.0] * 10 + [0.0] * 38, num_samples=48, replacement=True)
    cb = HessianSpectrum(top_k=5, probe_samples=64, probe_at_init=False, **QUIET)
    trainer(tmp_path, [cb]).fit(Net(), DataLoader(data, batch_size=8, sampler=sampler))
    assert cb._runner.probe_set.indices == list(range(10))  # all of them, and nothing the loader never yields


def test_sequential_drop_last_tail_is_not_probed(tmp_path):
    cb = HessianSpectrum(top_k=5, probe_samples=64, probe_at_init=False, **QUIET)
    trainer(tmp_path, [cb]).fit(Net(), DataLoader(make_data(n=30), batch_size=8, drop_last=True))
    assert cb._runner.probe_set.indices == list(range(24))


# ------------------------------------------------------------------------------------------- item 4: side effects
class WithAccuracy(Net):
    def __init__(self) -> None:
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy

        self.acc = MulticlassAccuracy(num_classes=3, average="micro")
        self.seen: list[int] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.acc(logits, y)
        self.seen.append(len(y))
        self.log("train_acc", self.acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)


def _train_acc(tmp_path, callbacks) -> tuple[list[float], list[int]]:
    torch.manual_seed(3)
    model = WithAccuracy()
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, callbacks, max_epochs=3, logger=logger).fit(model, DataLoader(make_data(n=40), batch_size=8))
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train_acc")]
    return [float(r["train_acc"]) for r in rows], model.seen


def test_default_loss_leaves_torchmetrics_and_module_state_unchanged(tmp_path):
    plain, seen_plain = _train_acc(tmp_path / "a", [])
    probed, seen_probed = _train_acc(tmp_path / "b", [HessianSpectrum(top_k=5, probe_samples=16, **QUIET)])
    assert len(plain) == 3 and probed == plain  # identical logged training metric, every epoch
    assert seen_probed == seen_plain  # a list the training_step appends to is restored too


# ----------------------------------------------------------------------------------------------- item 5: init probe
def test_probe_at_init_is_a_full_probe_of_the_untrained_network(tmp_path):
    torch.manual_seed(4)
    data = make_data(n=24)
    model = Net()
    init_eig = torch.linalg.eigvalsh(dense_hessian(model, data)).flip(0)
    cb = HessianSpectrum(top_k=5, probe_samples=24, dtype="float64", tol=1e-10, **QUIET)
    logger = CSVLogger(tmp_path, name="csv")
    trainer(tmp_path, [cb], max_epochs=2, logger=logger).fit(model, DataLoader(data, batch_size=8))
    first = cb.history[0]
    assert first["init"] and first["full"] and "hessian/ks_distance" in first["metrics"]
    assert first["metrics"]["hessian/lambda_max"] == pytest.approx(float(init_eig[0]), rel=1e-9)
    torch.testing.assert_close(cb._runner.init_eigenvalues, init_eig[:5], rtol=1e-8, atol=1e-12)
    assert [h["full"] for h in cb.history] == [True, False, False]  # the init probe is the schedule's first full one
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("hessian/lambda_max")]
    assert steps == [0, 2, 5]  # logged at step 0, then at the epoch ends
    off = HessianSpectrum(top_k=5, probe_samples=24, probe_at_init=False, **QUIET)
    trainer(tmp_path, [off]).fit(Net(), DataLoader(data, batch_size=8))
    assert [h.get("init", False) for h in off.history] == [False] and off._runner.init_eigenvalues is not None


# ----------------------------------------------------------------------------------------------- item 6: validate()
def test_validate_after_fit_reuses_the_fit_loader_and_warns_clearly_without_data(tmp_path):
    class WithVal(Net):
        def validation_step(self, batch, batch_idx):
            return None

    data = make_data(n=24)
    model = WithVal()
    cb = HessianSpectrum(top_k=5, probe_samples=24, dtype="float64", tol=1e-10, when="validation_epoch_end", **QUIET)
    t = trainer(tmp_path, [cb], max_epochs=1)
    t.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    out = t.validate(model, dataloaders=DataLoader(data, batch_size=8))
    eig = torch.linalg.eigvalsh(dense_hessian(model, data))
    assert out[0]["hessian/lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-8)
    alone = HessianSpectrum(top_k=5, probe_samples=24, when="validation_epoch_end", **QUIET)
    with pytest.warns(UserWarning, match="run trainer.fit first .* or define train_dataloader"):
        out = trainer(tmp_path, [alone]).validate(WithVal(), dataloaders=DataLoader(data, batch_size=8))
    assert math.isnan(out[0]["hessian/lambda_max"])


# ----------------------------------------------------------------------------------------------- item 7: loaders
class DictBatches(Net):
    def training_step(self, batch, batch_idx):
        losses = [nn.functional.cross_entropy(self(x), y) for x, y in batch.values()]
        return sum(losses) / len(losses)


def test_mapping_of_train_loaders_is_probed_in_the_training_batch_structure(tmp_path):
    torch.manual_seed(5)
    data = make_data(n=16)
    loaders = {"a": DataLoader(data, batch_size=16), "b": DataLoader(data, batch_size=16)}
    model = DictBatches()
    cb = HessianSpectrum(top_k=5, probe_samples=16, dtype="float64", tol=1e-10, probe_at_init=False, **QUIET)
    trainer(tmp_path, [cb]).fit(model, loaders)
    eig = torch.linalg.eigvalsh(dense_hessian(model, data))  # both loaders hold the same data: the same Hessian
    assert cb.history[-1]["metrics"]["hessian/lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-8)


# ----------------------------------------------------------------------------------------------- item 8: degenerate
class Frozen(Net):
    """A fully frozen network (e.g. a feature extractor being evaluated); training_step skips the optimizer."""

    def training_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return None


def test_zero_trainable_parameters_warn_once_and_do_not_probe(tmp_path):
    model = Frozen()
    model.requires_grad_(False)
    cb = HessianSpectrum(top_k=5, probe_samples=8, **QUIET)
    with pytest.warns(UserWarning, match="no parameters that require grad") as record:
        trainer(tmp_path, [cb], max_epochs=2).fit(model, DataLoader(make_data(n=16), batch_size=8))
    assert cb.history == []
    assert sum("no parameters that require grad" in str(w.message) for w in record) == 1


class OneParameter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.w * x).pow(4).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_a_single_parameter_works(tmp_path):
    x = torch.linspace(-1, 1, 8, dtype=torch.float64)
    cb = HessianSpectrum(top_k=3, probe_samples=8, dtype="float64", num_tracked=2, **QUIET)
    trainer(tmp_path, [cb]).fit(OneParameter(), DataLoader(TensorDataset(x), batch_size=4))
    exact = float((12 * 0.7**2 * x**4).mean())  # d^2/dw^2 mean (w x)^4
    assert cb.history[-1]["metrics"]["hessian/lambda_max"] == pytest.approx(exact, rel=1e-9)


# ----------------------------------------------------------------------------------------------- item 9: arguments
@pytest.mark.parametrize("value", ["abc", None])
def test_ks_level_errors_name_the_argument(value):
    with pytest.raises(HessianConfigError, match=f"ks_level must be one of .*got {value!r}"):
        HessianSpectrum(ks_level=value)


def test_unpicklable_loss_fn_under_spawn_is_a_clear_setup_error():
    t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False)
    cb = HessianSpectrum(loss_fn=lambda module, batch: module.training_step(batch, 0))
    with pytest.raises(HessianConfigError, match="loss_fn=.*cannot be pickled.*module level"):
        cb.setup(t, Net(), "fit")
    HessianSpectrum(loss_fn=_module_level_loss).setup(t, Net(), "fit")  # a module-level function is fine


def _module_level_loss(module, batch):
    return module.training_step(batch, 0)


# ----------------------------------------------------------------------------------------------- item 10: checkpoints
class Interrupted(Net):
    interrupt_epoch: int | None = None

    def hessian_loss(self, batch):
        if self.trainer.current_epoch == self.interrupt_epoch and self.trainer.global_step > 0:
            raise KeyboardInterrupt  # not an Exception: it escapes the probe like a real interrupt
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_checkpoint_taken_during_a_probe_resumes_with_the_uninterrupted_schedule(tmp_path):
    data = make_data(n=24)

    def callback():
        return HessianSpectrum(top_k=5, probe_samples=24, num_tracked=2, powerlaw_every_n_epochs=2, **QUIET)

    torch.manual_seed(8)
    reference = callback()
    trainer(tmp_path, [reference], max_epochs=4).fit(Interrupted(), DataLoader(data, batch_size=8))

    torch.manual_seed(8)
    first = callback()
    model = Interrupted()
    model.interrupt_epoch = 1
    t = trainer(
        tmp_path,
        [first, OnExceptionCheckpoint(tmp_path, filename="interrupted")],
        max_epochs=4,
        enable_checkpointing=True,
    )
    with pytest.raises(SystemExit):  # Lightning 2.6 exits after handling a KeyboardInterrupt
        t.fit(model, DataLoader(data, batch_size=8))
    assert t.interrupted
    state = torch.load(tmp_path / "interrupted.ckpt", weights_only=False)["callbacks"][first.state_key]
    assert state["num_probes"] == len(state["history"]) == 2  # consistent: the init probe and epoch 0's

    resumed = callback()
    model.interrupt_epoch = None
    trainer(tmp_path, [resumed], max_epochs=4).fit(
        model, DataLoader(data, batch_size=8), ckpt_path=str(tmp_path / "interrupted.ckpt")
    )
    expected = [(h["epoch"], h["full"], h.get("init", False)) for h in reference.history]
    assert [(h["epoch"], h["full"], h.get("init", False)) for h in resumed.history] == expected
