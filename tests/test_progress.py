"""Console: the probe in the progress bar (TQDM, Rich), opt-in per-probe lines, the matplotlib warning."""

from __future__ import annotations

import io
import logging
import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrum
from lightning_hessian.callback import progress as progress_module
from lightning_hessian.callback import runner as runner_module
from tests.test_callback import QUIET as CALLBACK_QUIET
from tests.test_callback import Net, make_data

# the probes under test run inside training epochs, where the progress bar lives (the init probe runs before it)
QUIET = {**CALLBACK_QUIET, "probe_at_init": False}


def _fit(tmp_path, callbacks, *, max_epochs=1, logger=False, progress=False):
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=logger,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
    )
    trainer.fit(Net(), DataLoader(make_data(n=24), batch_size=8))
    return trainer


@pytest.fixture
def every_refresh(monkeypatch):
    """Refresh the progress line on every HVP and record what it showed."""
    shown: list[tuple[str, int]] = []
    original_init, original_show = progress_module.ProbeProgress.__init__, progress_module.ProbeProgress._show

    def init(self, trainer, description, *, interval=0.5):
        original_init(self, trainer, description, interval=0.0)

    def show(self, hvps):
        shown.append((self.kind, hvps))
        original_show(self, hvps)

    monkeypatch.setattr(progress_module.ProbeProgress, "__init__", init)
    monkeypatch.setattr(progress_module.ProbeProgress, "_show", show)
    return shown


def test_tqdm_bar_shows_the_probe_hvps(tmp_path, capsys, every_refresh):
    cb = HessianSpectrum(top_k=5, probe_samples=24, **QUIET)
    _fit(tmp_path, [cb, TQDMProgressBar()], max_epochs=2, progress=True)
    out = capsys.readouterr().out
    assert "hessian full probe" in out and "hessian cheap probe" in out and " HVPs" in out
    hvps = [h["metrics"]["hessian/hvps"] for h in cb.history]
    assert [kind for kind, _ in every_refresh] == ["tqdm"] * len(every_refresh)
    assert max(n for _, n in every_refresh) == max(hvps)  # counted up to the probe's HVPs
    assert f"{int(hvps[0])} HVPs" in out


def test_rich_bar_shows_the_probe_hvps(tmp_path, every_refresh):
    pytest.importorskip("rich")
    file = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": file, "force_terminal": True, "width": 160})
    cb = HessianSpectrum(top_k=5, probe_samples=24, **QUIET)
    _fit(tmp_path, [cb, bar], progress=True)
    assert every_refresh and {kind for kind, _ in every_refresh} == {"rich"}
    assert max(n for _, n in every_refresh) == cb.history[0]["metrics"]["hessian/hvps"]
    assert "hessian full probe" in file.getvalue()
    assert len(bar.progress.tasks) == 1  # the probe's task is removed again, the training bar stays


def test_progress_is_throttled_and_silent_without_a_bar():
    class _Bar:
        def __init__(self):
            self.refreshes = 0
            self.n = 0

        def refresh(self):
            self.refreshes += 1

    line = progress_module.ProbeProgress(object(), "x", interval=3600.0)
    assert line.kind is None  # no progress_bar_callback: nothing shown, nothing fails
    line.update(5)
    line.close(5)
    line.kind, line._bar = "tqdm", _Bar()
    for hvps in range(1, 1001):
        line.update(hvps)
    assert line._bar.refreshes == 1 and line.shown == 1  # at most one refresh per interval, never per HVP


def _probe_lines(caplog):
    return [r.getMessage() for r in caplog.records if "HessianSpectrum[hessian]" in r.getMessage()]


def test_per_probe_lines_are_opt_in_and_slow_probes_get_one(tmp_path, caplog, monkeypatch):
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, [HessianSpectrum(top_k=5, probe_samples=24, **QUIET)], max_epochs=2)
    assert _probe_lines(caplog) == []  # fast probes, not verbose: silent
    caplog.clear()
    monkeypatch.setattr(runner_module, "SLOW_PROBE_SECONDS", 0.0)  # every probe counts as slow
    with caplog.at_level(logging.INFO):
        _fit(tmp_path, [HessianSpectrum(top_k=5, probe_samples=24, **QUIET)], max_epochs=2)
    lines = _probe_lines(caplog)
    assert len(lines) == 2 and all("HVPs in" in m and "verbose=True" in m for m in lines)  # one line per slow probe
    assert "full probe done" in lines[0] and "cheap probe done" in lines[1]


def test_one_warning_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    cb = HessianSpectrum(top_k=5, probe_samples=24, **QUIET)
    with pytest.warns(UserWarning) as record:
        _fit(tmp_path, [cb], max_epochs=2, logger=logger)
    missing = [w for w in record if "matplotlib is not installed" in str(w.message)]
    assert len(missing) == 1 and 'pip install "lightning-hessian[plots]"' in str(missing[0].message)
    assert len(cb.history) == 2  # the fit and the probes go on, only the figures are skipped


def test_no_matplotlib_warning_when_it_is_installed_or_no_figures_are_due(tmp_path, recwarn):
    pytest.importorskip("matplotlib")
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    _fit(tmp_path, [HessianSpectrum(top_k=5, probe_samples=24, **QUIET)], logger=logger)
    assert not [w for w in recwarn if "matplotlib" in str(w.message)]
