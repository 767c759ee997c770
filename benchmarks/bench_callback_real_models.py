"""The default ``HessianSpectrum()`` on short fits of real-model shapes: fit seconds with and without it.

Models (float32, CPU, seeded random data; nothing is downloaded), trained with SGD, batch 32:

* ``resnet``: :class:`~lightning_hessian.demos.ResNetCNN` ``width=16`` (BatchNorm), 2,048 CIFAR-shaped images;
* ``transformer``: ``lightning.pytorch.demos.Transformer`` (``nn.Transformer``, 2 + 2 layers, ``ninp=64``) on 1,024
  random sequences of 32 tokens (vocabulary 256).

For each, side by side in one process: the fit without the callback, then with the default ``HessianSpectrum()``
(``probe_samples=512``, ``max_overhead=0.2``): fit seconds and their ratio, what the probe at initialisation ran
(the guard plans it from one timed gradient of the probe set, :meth:`ProbeRunner.init_kind`), each probe's kind,
HVPs and seconds, and the checkpoint size with and without the callback.

Run: ``python benchmarks/bench_callback_real_models.py [--epochs 3] [--models resnet,transformer] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import Transformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import HessianSpectrum, demos


class ResNetModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = demos.ResNetCNN(width=16)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class TransformerModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Transformer(vocab_size=256, ninp=64, nhead=2, nhid=128, nlayers=2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.nll_loss(self.net(x, y), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(name: str) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    if name == "resnet":
        return TensorDataset(torch.randn(2048, 3, 32, 32, generator=gen), torch.randint(0, 10, (2048,), generator=gen))
    tokens = torch.randint(0, 256, (1024, 33), generator=gen)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def fit(name: str, epochs: int, with_callback: bool) -> tuple[float, HessianSpectrum | None, int, int]:
    """Fit seconds, the callback, the size of the last checkpoint in bytes, and the model's parameter count."""
    pl.seed_everything(0, verbose=False)
    model = ResNetModule() if name == "resnet" else TransformerModule()
    spectrum = HessianSpectrum() if with_callback else None
    root = tempfile.mkdtemp()
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[spectrum] if spectrum else [],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data(name), batch_size=32, shuffle=True))
    seconds = time.perf_counter() - start
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files if f.endswith(".ckpt")]
    return seconds, spectrum, max(sizes, default=0), sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--models", default="resnet,transformer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*(LeafSpec|log_every_n_steps|does not have many workers).*")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.epochs} epochs, default HessianSpectrum()\n")
    print("| model | params | fit s without | fit s with | ratio | probe at init | probes (kind HVPs s) | ckpt MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        plain_s, _, plain_ckpt, _ = fit(name, args.epochs, False)
        with_s, spectrum, ckpt, params = fit(name, args.epochs, True)
        assert spectrum is not None
        runner = spectrum._runner
        init = [h for h in spectrum.history if h.get("init")]
        init_kind = ("full" if init[0]["full"] else "cheap") if init else "skipped"
        probes = ", ".join(
            f"{'full' if h['full'] else 'cheap'}{'@init' if h.get('init') else ''} "
            f"{h['metrics'].get('hessian/hvps', float('nan')):.0f} {h['metrics'].get('hessian/probe_seconds', 0):.0f}"
            for h in spectrum.history
        )
        print(
            f"| {name} | {params:,} | {plain_s:.1f} | {with_s:.1f} | {with_s / plain_s:.1f} | {init_kind} | {probes} | "
            f"{plain_ckpt / 1e6:.2f} -> {ckpt / 1e6:.2f} |"
        )
        if runner.init_note:
            print(f"\n  {runner.init_note}\n")


if __name__ == "__main__":
    main()
