"""Screenshots of the TensorBoard dashboard of a short real fit, taken with headless Chromium.

Trains the digits MLP of ``examples/digits_power_law.py`` for a few epochs with ``HessianSpectrum`` and a
``TensorBoardLogger`` into a temporary directory, serves it with ``tensorboard --logdir ... --host 127.0.0.1 --port N``
and takes one screenshot per tab (Custom Scalars, Scalars, Histograms, Distributions, Images, Text) with
``chromium --headless --screenshot``. Look at the PNGs before changing the layout.

    apt-get install -y chromium   # Debian package; or pass --chromium /path/to/chrome
    PYTHONPATH=$PWD python tools/dashboard_screenshots.py --out /tmp/dashboard [--epochs 9] [--logdir existing_run]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TABS = ("custom_scalars", "scalars", "histograms", "distributions", "images", "text")


def fit(logdir: Path, epochs: int) -> None:
    """A short digits fit: full probe (top-200 power-law test) every 3 epochs, cheap probe every epoch."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits_power_law import DigitsMLP, digits_loaders

    from lightning_hessian import HessianSpectrum

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train, val = digits_loaders()
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(str(logdir), name="digits", default_hp_metric=False),
        # the exact schedule: digits epochs take 0.1 s, the default overhead guard would leave one full probe
        callbacks=[HessianSpectrum(top_k=200, probe_samples=512, powerlaw_every_n_epochs=3, max_overhead=None)],
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(DigitsMLP(), train, val)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(logdir: Path, port: int) -> subprocess.Popen:
    """Start TensorBoard and wait until it answers."""
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    process = subprocess.Popen([*cmd, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/data/logdir", timeout=2).read()
            return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("TensorBoard did not start within 60 s")


def screenshot(chromium: str, url: str, path: Path, size: str, budget_ms: int) -> None:
    """One headless Chromium screenshot of ``url``."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    """Fit (unless ``--logdir`` is given), serve, screenshot every tab into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dashboard_screenshots"))
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--logdir", type=Path, default=None, help="an existing run directory (skips the fit)")
    parser.add_argument(
        "--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    )
    parser.add_argument("--window-size", default="1600,1200")
    parser.add_argument("--tabs", nargs="+", default=list(TABS), choices=TABS)
    parser.add_argument("--virtual-time-budget", type=int, default=15000, help="milliseconds of page time")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logdir = args.logdir
    if logdir is None:
        logdir = Path(tempfile.mkdtemp(prefix="hessian-dashboard-"))
        fit(logdir, args.epochs)
    port = free_port()
    process = serve(logdir, port)
    try:
        for tab in args.tabs:
            path = args.out / f"{tab}.png"
            screenshot(
                args.chromium, f"http://127.0.0.1:{port}/#{tab}", path, args.window_size, args.virtual_time_budget
            )
            print(path)
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"run directory: {logdir}")


if __name__ == "__main__":
    main()
