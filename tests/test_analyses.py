"""The callback's extra analyses: Jacobian free-probability law, neuron condensation, near-zero fraction."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import DEFAULT_SIZE_GUIDANCE, EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator, condensation_report, split_neuron
from lightning_hessian.callback import HessianSpectrum
from lightning_hessian.free_probability import DEFAULT_QUANTILES, jacobian_report
from lightning_hessian.rank import near_zero_fraction

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*KS critical value.*"),
    pytest.mark.filterwarnings("ignore:.*of the .* parameters.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*exceeds the .* trainable parameters.*"),
]


class MLP(pl.LightningModule):
    def __init__(self, net: nn.Module | None = None, lr: float = 0.0) -> None:
        super().__init__()
        self.net = net if net is not None else nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ConvNet(MLP):
    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Unflatten(1, (1, 8)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(12, 3)))


def _data(n: int = 40, d: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(5)
    return TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g))


def _fit(model, callback, tmp_path=None, epochs: int = 1) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path, name="run", version=0, default_hp_metric=False) if tmp_path else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(_data(), batch_size=10))
    return trainer


def _callback(**kwargs) -> HessianSpectrum:
    defaults = dict(top_k=10, probe_samples=40, num_tracked=3, trace_samples=2, dtype="float64", tol=1e-8)
    return HessianSpectrum(**{**defaults, **kwargs})


def test_jacobian_condensation_and_near_zero_keys_match_direct_computation(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    callback = _callback(density_probes=3, density_steps=20)
    trainer = _fit(model, callback, tmp_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    first = callback._runner.probe_set.batches[0][0]

    report = jacobian_report(model.net, first)
    for q, value in zip(DEFAULT_QUANTILES, report.quantiles):
        assert metrics[f"jacobian/fpt_q{round(100 * q)}"] == pytest.approx(float(value), rel=1e-12)
    assert metrics["jacobian/atom_at_zero"] == pytest.approx(report.atom_at_zero, rel=1e-12)
    assert metrics["jacobian/atom_at_zero"] >= 1 - 3 / 8  # rank bound: 1 - min_l N_l / N_0
    assert metrics["jacobian/mean"] == pytest.approx(report.mean, rel=1e-12)
    assert metrics["jacobian/law_distance"] == pytest.approx(report.law_distance, rel=1e-12)

    condensed = condensation_report(model, first)
    assert metrics["embedding/effective_width/net.0"] == condensed.effective_widths["net.0"] == 12
    assert metrics["embedding/merge_output_error"] == pytest.approx(condensed.merge_output_error, abs=1e-12)

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    operator = HessianOperator(model, loss_fn, callback._runner.probe_set.batches, dtype=torch.float64)
    estimate = near_zero_fraction(operator, num_probes=3, num_steps=20, seed=callback.seed + 104729)
    assert metrics["hessian/near_zero_fraction"] == pytest.approx(estimate.fraction, abs=1e-9)
    assert 0.0 <= metrics["hessian/near_zero_fraction"] <= 1.0

    events = EventAccumulator(
        str(tmp_path / "run" / "version_0"), size_guidance=dict(DEFAULT_SIZE_GUIDANCE, images=0, histograms=0)
    )
    events.Reload()
    assert "jacobian/predicted_density" in events.Tags()["histograms"]
    assert "jacobian/law_overlay" in events.Tags()["images"]
    histogram = events.Histograms("jacobian/predicted_density")[-1].histogram_value
    assert histogram.num == pytest.approx(1 - report.atom_at_zero, abs=0.05)  # continuous mass of the law
    assert "jacobian/fpt_q50" in events.Tags()["scalars"]


def test_planted_condensation_is_reported():
    """A 3-neuron layer split twice: effective width 3 of 5 neurons, merged net reproduces the outputs."""
    torch.manual_seed(1)
    narrow = nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    wide = split_neuron(split_neuron(narrow, 0, 1, 0.3), 0, 2, -0.5)
    model = MLP(wide.float())
    trainer = _fit(model, _callback(jacobian=False, near_zero=False, density=False))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["embedding/effective_width/net.0"] == 3.0
    assert metrics["embedding/merge_output_error"] < 1e-5


def test_unsupported_architecture_is_skipped_with_one_warning_and_training_goes_on():
    torch.manual_seed(2)
    with pytest.warns(UserWarning) as record:
        trainer = _fit(ConvNet(), _callback(), epochs=2)
    skipped = [str(w.message) for w in record if "skipping the" in str(w.message)]
    assert len([m for m in skipped if "Jacobian" in m]) == 1
    assert len([m for m in skipped if "condensation" in m]) == 1
    assert trainer.state.status == "finished"
    keys = set(trainer.callback_metrics)
    assert not any(k.startswith(("jacobian/", "embedding/")) for k in keys)
    assert math.isfinite(float(trainer.callback_metrics["hessian/lambda_max"]))


def test_sibling_prefixes_follow_the_callback_prefix():
    torch.manual_seed(3)
    trainer = _fit(MLP(), _callback(prefix="val_hessian", near_zero=False, density=False))
    keys = set(trainer.callback_metrics)
    assert "val_jacobian/fpt_q10" in keys and "val_embedding/effective_width/net.0" in keys
    assert "val_hessian/lambda_max" in keys and not any(k.startswith("jacobian/") for k in keys)


def test_switches_turn_the_analyses_off():
    torch.manual_seed(4)
    trainer = _fit(MLP(), _callback(jacobian=False, embedding=False, near_zero=False))
    keys = set(trainer.callback_metrics)
    assert not any(k.startswith(("jacobian/", "embedding/")) for k in keys)
    assert "hessian/near_zero_fraction" not in keys


def test_law_overlay_title_says_where_the_prediction_applies(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from lightning_hessian.callback import reporting

    titles: list[str] = []
    original = reporting.jacobian_overlay

    def recording(report, *, title=""):
        titles.append(title)
        return original(report, title=title)

    monkeypatch.setattr(reporting, "jacobian_overlay", recording)
    callback = HessianSpectrum(top_k=5, probe_samples=40, powerlaw_every_n_epochs=1, embedding=False)
    _fit(MLP(lr=0.1), callback, tmp_path)
    # the probe at initialisation (step 0) and the epoch-0 full probe after training steps
    assert len(titles) == 2
    assert "at initialisation" in titles[0] and "the law applies" in titles[0]
    assert "trained weights" in titles[1] and "departure" in titles[1]
