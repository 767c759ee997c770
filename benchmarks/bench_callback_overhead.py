"""HessianSpectrum overhead on the digits example: is a probe just its HVPs, and what does it cost per epoch?

Setting: the example's 64 -> 50 -> 50 -> 10 ReLU MLP (6,310 parameters) on scikit-learn digits (1,437 training
samples, batch 64, SGD), probe set of 1,024 samples, float32; default schedule (cheap probe every epoch: top-8
Lanczos with warm start + 24-sample Hutchinson trace; full probe every 5 epochs: top-200 + SLQ density).

The schedule runs exactly (the default ``max_overhead=None``) to measure each probe; a last fit uses the guard
``max_overhead=0.25``.
Prints, side by side:
* seconds per HVP measured on the bare ``HessianOperator`` (same probe set; cached graphs as in the callback, and
  plain), and per gradient of the probe set;
* per probe kind: HVPs, probe seconds, and the **wrapper ratio** probe_seconds / (HVPs x seconds per HVP)
  (target <= 1.2: the callback adds almost nothing around the HVPs; the rest is Lanczos orthogonalisation,
  the power-law fit and the TensorBoard items);
* probe seconds / epoch seconds (epoch measured without the callback), and whole-fit time with / without.

Run: python benchmarks/bench_callback_overhead.py [--epochs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianOperator
from lightning_hessian.callback import HessianSpectrum
from lightning_hessian.probe import ProbeSet


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10))

    def hessian_loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.hessian_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # start of epoch to end of its last batch: no probe inside
        self.seconds.append(self._last - self._start)


def digits() -> TensorDataset:
    try:
        from sklearn.datasets import load_digits

        data = load_digits()
        x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    except ImportError:  # same shape, synthetic
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(1797, 64, generator=g), torch.randint(0, 10, (1797,), generator=g)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:1437]
    return TensorDataset(x[perm], y[perm])


def fit(
    epochs: int, with_callback: bool, logdir: str, max_overhead: float | None = None
) -> tuple[float, list[float], HessianSpectrum | None]:
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    spectrum = None
    if with_callback:
        spectrum = HessianSpectrum(probe_samples=1024, powerlaw_every_n_epochs=5, max_overhead=max_overhead)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[timer] + ([spectrum] if spectrum else []),
        logger=TensorBoardLogger(logdir, name="bench", default_hp_metric=False),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = MLP()
    start = time.perf_counter()
    trainer.fit(model, DataLoader(digits(), batch_size=64, shuffle=True))
    return time.perf_counter() - start, timer.seconds, spectrum


def hvp_seconds(repeats: int = 20) -> tuple[float, float, float]:
    """Median seconds of a cached-graph HVP (what the callback uses), a plain HVP and a probe-set gradient."""
    torch.manual_seed(0)
    model = MLP()
    probe = ProbeSet.from_dataloader(DataLoader(digits(), batch_size=64), 1024, seed=0)
    plain = HessianOperator(model, lambda m, b: m.hessian_loss(b), probe.batches, cache_graph=False)
    cached = HessianOperator(model, lambda m, b: m.hessian_loss(b), probe.batches, cache_graph=True)
    v = torch.randn(plain.num_params)
    cached.matvec(v)  # builds the graphs

    def median(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return median(lambda: cached.matvec(v)), median(lambda: plain.matvec(v)), median(plain.gradient)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    hvp_s, plain_s, grad_s = hvp_seconds()
    with tempfile.TemporaryDirectory() as logdir:
        base_fit, base_epochs, _ = fit(args.epochs, False, logdir)
        probed_fit, _, spectrum = fit(args.epochs, True, logdir)
        guarded_fit, _, guarded = fit(args.epochs, True, logdir, max_overhead=0.25)
    epoch_s = statistics.median(base_epochs)
    print(
        f"threads={args.threads}; cached-graph HVP {hvp_s * 1e3:.2f} ms ({hvp_s / grad_s:.2f} gradients), plain HVP "
        f"{plain_s * 1e3:.2f} ms ({plain_s / grad_s:.2f} gradients), probe-set gradient {grad_s * 1e3:.2f} ms; "
        f"training epoch (no callback) {epoch_s:.3f} s"
    )
    print(
        f"{'probe':>6} {'epoch':>5} {'HVPs':>6} {'seconds':>8} {'HVPs x s/HVP':>12} {'wrapper ratio':>13} "
        f"{'probe/epoch':>11}"
    )
    by_kind: dict[bool, list[float]] = {True: [], False: []}
    for h in spectrum.history:
        m = h["metrics"]
        hvps, seconds = m["hessian/hvps"], m["hessian/probe_seconds"]
        ratio = seconds / (hvps * hvp_s)
        by_kind[h["full"]].append(ratio)
        kind = "full" if h["full"] else "cheap"
        print(
            f"{kind:>6} {h['epoch']:>5} {hvps:>6.0f} {seconds:>8.3f} {hvps * hvp_s:>12.3f} {ratio:>13.2f} "
            f"{seconds / epoch_s:>11.1f}"
        )
    for full, ratios in by_kind.items():
        if ratios:
            print(f"median wrapper ratio ({'full' if full else 'cheap'} probes): {statistics.median(ratios):.2f}")
    print(
        f"fit {args.epochs} epochs: {base_fit:.1f} s without, {probed_fit:.1f} s with HessianSpectrum on schedule "
        f"(x{probed_fit / base_fit:.1f}), {guarded_fit:.1f} s with the guard max_overhead=0.25 "
        f"(x{guarded_fit / base_fit:.1f}; {len(guarded.history)} probes ran)"
    )


if __name__ == "__main__":
    main()
