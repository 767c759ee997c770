"""Watch the Hessian spectrum of an MLP on scikit-learn digits become a power law (Xie et al. 2022).

A 64 -> 50 -> 50 -> 10 ReLU MLP (6,310 parameters, the setting of the issue's evidence) trains with SGD while
``HessianSpectrum`` probes the Hessian of the training loss on 1,024 training samples: cheap metrics (sharpness,
gap, trace, top-8 subspace overlap) every epoch with a warm start, the full top-200 power-law test every 10 epochs.
The callback's probe at initialisation (``probe_at_init=True``, the default) runs the same test on the random network
before any optimizer step, Xie et al.'s negative control (it must reject). Two
``EarlyStopping`` monitors use the spectral keys: a stability guard (``lambda_max > 2/lr`` means gradient descent is
beyond the edge of stability) and a power-law plateau (``ks_distance`` not improving for 2 full probes = 20 epochs).

Run (no download: digits ships with scikit-learn):

    python examples/digits_power_law.py [--epochs 30] [--out runs]

then ``tensorboard --logdir runs`` (scalars, HISTOGRAMS, IMAGES rank plot, TEXT summary, CUSTOM SCALARS layout).
"""

from __future__ import annotations

import argparse
import math
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callback import HessianSpectrum


class DigitsMLP(pl.LightningModule):
    """64 -> width (x depth, ReLU) -> 10 classifier on digits."""

    def __init__(self, width: int = 50, lr: float = 0.05, momentum: float = 0.9, depth: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        d_in = 64
        for _ in range(depth):
            layers += [nn.Linear(d_in, width), nn.ReLU()]
            d_in = width
        self.net = nn.Sequential(*layers, nn.Linear(d_in, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hessian_loss(self, batch) -> torch.Tensor:  # the probe loss: plain mean cross-entropy
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch, batch_idx):
        loss = self.hessian_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised digits, split 1,437 / 360 by a seeded permutation: ``(x_train, y_train, x_val, y_val)``."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, val = perm[:1437], perm[1437:]
    return x[train], y[train], x[val], y[val]


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    x_train, y_train, x_val, y_val = digits_tensors(seed)
    return (
        DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(x_val, y_val), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--probe-samples", type=int, default=1024)
    parser.add_argument("--powerlaw-every", type=int, default=10)
    parser.add_argument("--out", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a 6k-parameter MLP is fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pl.seed_everything(args.seed, verbose=False)
    train, val = digits_loaders(seed=args.seed)
    model = DigitsMLP()
    n = sum(p.numel() for p in model.parameters())
    print(f"digits MLP: {n} parameters, {len(train.dataset)} training samples")

    spectrum = HessianSpectrum(
        top_k=args.top_k,
        probe_samples=args.probe_samples,
        powerlaw_every_n_epochs=args.powerlaw_every,
        seed=args.seed,
        # digits epochs take 0.1 s, so probing dominates by design here: run the exact schedule instead of the default
        # overhead guard (max_overhead=0.2 keeps probes near 1/6 of the fit on real data sets)
        max_overhead=None,
    )
    callbacks = [
        spectrum,
        # stability guard: gradient descent diverges along the top eigenvector when lambda_max > 2 / lr
        EarlyStopping(
            monitor="hessian/lambda_max", mode="min", divergence_threshold=2 / model.hparams.lr, patience=10**6
        ),
        # power-law plateau: ks_distance refreshes every `powerlaw_every` epochs, so patience counts 2 full probes
        EarlyStopping(monitor="hessian/ks_distance", mode="min", patience=2 * args.powerlaw_every),
    ]
    logger = TensorBoardLogger(args.out, name="digits_power_law", default_hp_metric=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        devices=1,
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train, val)
    seconds = time.perf_counter() - start

    probes = spectrum.history
    init = next((h for h in probes if h.get("init")), None)
    if init is not None:
        m = init["metrics"]
        verdict = "power law" if m.get("hessian/is_power_law") == 1.0 else "NOT power law"
        print(
            f"\nrandom init (probe at initialisation), top-{args.top_k}: d_ks = {m['hessian/ks_distance']:.4f} vs "
            f"d_c = {m['hessian/ks_critical']:.4f} -> {verdict} ({int(m['hessian/hvps'])} HVPs)"
        )
    probe_seconds = sum(h["metrics"].get("hessian/probe_seconds", 0.0) for h in probes)
    print(
        f"trained {trainer.current_epoch} epochs in {seconds:.1f} s, of which {probe_seconds:.1f} s in "
        f"{len(probes)} probes ({sum(h['full'] for h in probes)} full)"
    )
    last_full = next((h for h in reversed(probes) if h["full"] and not h.get("init")), None)
    print("final metrics:")
    for key, value in sorted(trainer.callback_metrics.items()):
        print(f"  {key:32s} {float(value):.6g}")
    if last_full is not None:
        m = last_full["metrics"]
        verdict = "power law" if m.get("hessian/is_power_law") == 1.0 else "NOT power law"
        print(
            f"trained (epoch {last_full['epoch']}), top-{args.top_k}: d_ks = {m['hessian/ks_distance']:.4f} vs "
            f"d_c = {m['hessian/ks_critical']:.4f} -> {verdict}; s = {m['hessian/powerlaw_s']:.3f}"
        )
    if not math.isfinite(float(trainer.callback_metrics.get("hessian/lambda_max", math.nan))):
        print("the last probe failed (see the warning above)")
    print(f"\nTensorBoard: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
