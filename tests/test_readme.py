"""The README runs: every ```python block is executed, and every recipe does what its first comment says.

Harness (the only things a block does not bring itself):

* every block runs as written, with ``exec`` in a fresh namespace, in a temporary working directory (one CPU thread);
* a block whose code ends with a ``# <repr>`` comment line after an expression (the rank block) must print that repr;
* a *recipe* block defines ``callbacks``; the harness then (1) fits a tiny classifier (``tests.test_callback.Net``, 4
  inputs, 24 samples) for 2 epochs with exactly those callbacks, and (2) replays a scripted sequence of the monitored
  key through the recipe's own stopping rule: each ``HessianSpectrum`` in ``callbacks`` is replaced by a stub that
  logs scripted values on the scripted epochs only (stale in between, as the real callback), and the epoch where
  training stops is checked against the recipe's comment. The scenario is chosen by the comment's title (the words
  before the first ``:``), so a new recipe without a scenario fails here.
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_hessian import HessianSpectrum
from tests.test_callback import Net, make_data

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced python block of the README."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            blocks.append((start, "\n".join(lines[start : number - 1])))
            start = None
    return blocks


BLOCKS = python_blocks()


def title(code: str) -> str:
    first = code.lstrip().splitlines()[0]
    return first.lstrip("# ").split(":")[0].strip() if first.startswith("#") else ""


def run_block(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    return namespace


def test_the_readme_has_the_blocks_this_harness_knows():
    assert len(BLOCKS) >= 8
    recipes = [title(code) for _, code in BLOCKS if re.search(r"^callbacks = ", code, re.M)]
    assert recipes == list(SCENARIOS)


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_block_runs(line, code, tmp_path, monkeypatch, recwarn):
    namespace = run_block(code, tmp_path, monkeypatch)
    tail = code.rstrip().splitlines()
    if tail[-1].startswith("# ") and not tail[-2].startswith("#"):  # `expression` then `# expected repr`
        expected = tail[-1][2:]
        assert repr(eval(tail[-2], namespace)) == expected  # noqa: S307
    if "callbacks" in namespace:
        trainer = fit(namespace["callbacks"], max_epochs=2)
        probes = [cb for cb in trainer.callbacks if isinstance(cb, HessianSpectrum)]
        assert probes and all(len(cb.history) >= 1 for cb in probes)
        assert math.isfinite(float(trainer.callback_metrics["hessian/lambda_max"]))


def test_the_recipes_combine_in_one_trainer(tmp_path, monkeypatch):
    callbacks: list = []
    for _, code in BLOCKS:
        namespace = run_block(code, tmp_path, monkeypatch)
        for cb in namespace.get("callbacks", []):
            if not isinstance(cb, HessianSpectrum) or not any(isinstance(c, HessianSpectrum) for c in callbacks):
                callbacks.append(cb)
    assert len([cb for cb in callbacks if isinstance(cb, pl.callbacks.EarlyStopping)]) == 4  # distinct monitors
    assert len({(cb.monitor, cb.mode) for cb in callbacks if isinstance(cb, pl.callbacks.EarlyStopping)}) == 3
    # the guard appears twice (stability guard and failed-probe recipe): keep one of them
    seen, unique = set(), []
    for cb in callbacks:
        key = (cb.monitor, cb.mode) if isinstance(cb, pl.callbacks.EarlyStopping) else id(cb)
        if key not in seen:
            seen.add(key)
            unique.append(cb)
    trainer = fit(unique, max_epochs=2)
    assert trainer.current_epoch == 2  # nothing stopped a healthy 2-epoch run


# ------------------------------------------------------------------------------------------------ harness
def fit(callbacks, max_epochs: int) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(Net(), DataLoader(make_data(n=24), batch_size=8))
    return trainer


class Scripted(pl.Callback):
    """Logs ``values[epoch]`` under ``key`` at train-epoch end on the scripted epochs only (stale in between)."""

    def __init__(self, key: str, values: dict[int, float]) -> None:
        self.key, self.values = key, values

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch in self.values:
            pl_module.log(self.key, torch.tensor(self.values[trainer.current_epoch], dtype=torch.float64))


def stop_epoch(code: str, key: str, values: dict[int, float], max_epochs: int, tmp_path, monkeypatch) -> int | None:
    """The epoch at which the recipe's stopping rule stops a run whose ``key`` follows ``values`` (None: never)."""
    namespace = run_block(code, tmp_path, monkeypatch)
    callbacks = [Scripted(key, values) if isinstance(cb, HessianSpectrum) else cb for cb in namespace["callbacks"]]
    trainer = fit(callbacks, max_epochs)
    return trainer.current_epoch - 1 if trainer.current_epoch < max_epochs else None


def every_epoch(*values: float) -> dict[int, float]:
    return dict(enumerate(values))


def stability_guard(code, tmp_path, monkeypatch):
    lr = run_block(code, tmp_path, monkeypatch)["lr"]
    rising = every_epoch(*(0.2 * k / lr for k in range(1, 9)))  # sharpening, but below 2 / lr
    assert stop_epoch(code, "hessian/lambda_max", rising, 8, tmp_path, monkeypatch) is None
    beyond = every_epoch(0.5 / lr, 1.0 / lr, 2.2 / lr, 1.0 / lr, 1.0 / lr)
    assert stop_epoch(code, "hessian/lambda_max", beyond, 5, tmp_path, monkeypatch) == 2  # "as soon as"


def power_law_plateau(code, tmp_path, monkeypatch):
    every = run_block(code, tmp_path, monkeypatch)["powerlaw_every_n_epochs"]
    values = {0: 0.2, every: 0.1, 2 * every: 0.15, 3 * every: 0.12, 4 * every: 0.05}
    # best at the 2nd full probe; the 3rd and 4th do not improve: stop at the 4th, never before
    assert stop_epoch(code, "hessian/ks_distance", values, 5 * every, tmp_path, monkeypatch) == 3 * every
    improving = {0: 0.2, every: 0.1, 2 * every: 0.09}
    assert stop_epoch(code, "hessian/ks_distance", improving, 2 * every + 1, tmp_path, monkeypatch) is None


def power_law_reached(code, tmp_path, monkeypatch):
    values = {0: 0.0, 10: 0.0, 20: 1.0, 30: 1.0}
    assert stop_epoch(code, "hessian/is_power_law", values, 40, tmp_path, monkeypatch) == 20
    never = {0: 0.0, 10: 0.0}
    assert stop_epoch(code, "hessian/is_power_law", never, 15, tmp_path, monkeypatch) is None


def sharpness_plateau(code, tmp_path, monkeypatch):
    rising = every_epoch(*(1.3**k for k in range(10)))  # progressive sharpening (EarlyStopping(mode="min") stops at 5)
    assert stop_epoch(code, "hessian/lambda_max", rising, 10, tmp_path, monkeypatch) is None
    falling = every_epoch(16.0, 8.0, 4.0, 2.0, 1.0)
    assert stop_epoch(code, "hessian/lambda_max", falling, 5, tmp_path, monkeypatch) is None
    plateau = every_epoch(1.0, 2.0, 4.0, 8.0, 8.1, 8.2, 8.1, 8.0, 8.1, 8.2, 8.1)
    assert stop_epoch(code, "hessian/lambda_max", plateau, 11, tmp_path, monkeypatch) == 8  # 5 flat probes: 4..8
    noisy = every_epoch(8.0, 8.1, 8.2, 9.5, 9.6, 9.5, 9.4, 9.5, 9.6)  # a jump resets the count
    assert stop_epoch(code, "hessian/lambda_max", noisy, 9, tmp_path, monkeypatch) is None


def robust_to_failed_probes(code, tmp_path, monkeypatch):
    def failing_at_epoch_1(pl_module, batch):
        loss = torch.nn.functional.cross_entropy(pl_module(batch[0]), batch[1])
        return loss * math.nan if pl_module.current_epoch == 1 else loss

    def run(nan_on_failure: bool):
        callbacks = run_block(code, tmp_path, monkeypatch)["callbacks"]
        probe = next(cb for cb in callbacks if isinstance(cb, HessianSpectrum))
        probe.config.nan_on_failure = nan_on_failure
        probe.config.loss_fn = failing_at_epoch_1
        probe._schedule.max_overhead = None  # tiny model: the default overhead guard would skip the epoch-1 probe
        with pytest.warns(UserWarning, match="probe failed"):
            return fit(callbacks, max_epochs=3), probe

    trainer, probe = run(nan_on_failure=probe_default(code, tmp_path, monkeypatch))
    assert trainer.current_epoch == 3  # the failed probe of epoch 1 did not stop training
    assert math.isfinite(float(trainer.callback_metrics["hessian/lambda_max"]))
    trainer, _ = run(nan_on_failure=True)  # the default: NaN, which EarlyStopping(check_finite=True) stops on
    assert trainer.current_epoch == 2


def probe_default(code, tmp_path, monkeypatch) -> bool:
    callbacks = run_block(code, tmp_path, monkeypatch)["callbacks"]
    value = next(cb for cb in callbacks if isinstance(cb, HessianSpectrum)).nan_on_failure
    assert value is False  # what the recipe sets
    return value


SCENARIOS = {
    "stability guard": stability_guard,
    "power-law plateau": power_law_plateau,
    "power law reached": power_law_reached,
    "sharpness plateau": sharpness_plateau,
    "robust to failed probes": robust_to_failed_probes,
}
RECIPES = [(n, code) for n, code in BLOCKS if title(code) in SCENARIOS]


@pytest.mark.parametrize(("line", "code"), RECIPES, ids=[title(code) for _, code in RECIPES])
def test_recipe_does_what_its_comment_says(line, code, tmp_path, monkeypatch):
    SCENARIOS[title(code)](code, tmp_path, monkeypatch)


def test_the_readme_names_the_tags_that_are_written():
    text = README.read_text(encoding="utf-8")
    assert "`hessian/summary/text_summary`" in text and "`hessian/summary` text" not in text
    assert "`hessian/eigenvalues/top_k`" in text and "`hessian/eigenvalues/tracked`" in text
    assert 'pip install "lightning-hessian[cli]"' in text or "lightning-hessian[cli]" in text
    tree = ast.parse(Path(__file__).read_text())  # this file documents its harness
    assert ast.get_docstring(tree)
