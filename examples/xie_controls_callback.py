"""Xie et al.'s four digits-scale controls, through HessianSpectrum's own probes (default arguments).

Four Lightning fits on scikit-learn digits (the digits example's recipe: SGD lr 0.05, momentum 0.9, batch 64, 30
epochs), each with ``HessianSpectrum(probe_samples=1024, max_overhead=None)`` and otherwise default arguments
(``top_k=200``, the probe at initialisation, a full probe every 10 probes; the exact schedule because digits epochs
take 0.1 s, so the default overhead guard would skip the later full probes). Printed per network: the verdict of the
probe at initialisation and of the last full probe, with d_ks and d_c. Xie et al. (2022) report: random init not a
power law; trained 2-hidden-layer FCN of width 50 a power law; trained 1-hidden-layer FCN not; trained 2-hidden-layer
width 10 not.

Run from the repository root: ``python examples/xie_controls_callback.py [--epochs 30] [--top-k 200]``.
"""

from __future__ import annotations

import argparse
import warnings

import lightning.pytorch as pl
import torch
from digits_power_law import DigitsMLP, digits_loaders

from lightning_hessian.callback import HessianSpectrum

NETS = {"2x50": (2, 50), "1x50": (1, 50), "2x10": (2, 10)}
XIE = {"init 2x50": False, "trained 2x50": True, "trained 1x50": False, "trained 2x10": False}


def verdict(metrics: dict) -> tuple[bool, str]:
    accepted = metrics["hessian/is_power_law"] == 1.0
    return accepted, f"d_ks {metrics['hessian/ks_distance']:.4f} vs d_c {metrics['hessian/ks_critical']:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|log_every_n_steps|top_k=).*")
    rows = []
    for name, (depth, width) in NETS.items():
        pl.seed_everything(args.seed, verbose=False)
        train, val = digits_loaders(seed=args.seed)
        model = DigitsMLP(width=width, depth=depth)
        spectrum = HessianSpectrum(top_k=args.top_k, probe_samples=1024, seed=args.seed, max_overhead=None)
        trainer = pl.Trainer(
            max_epochs=args.epochs,
            callbacks=[spectrum],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            devices=1,
        )
        trainer.fit(model, train, val)
        params = sum(p.numel() for p in model.parameters())
        init = next(h for h in spectrum.history if h.get("init"))
        last = next(h for h in reversed(spectrum.history) if h["full"] and not h.get("init"))
        if name == "2x50":
            rows.append(("init 2x50", params, 0, *verdict(init["metrics"])))
        rows.append((f"trained {name}", params, last["epoch"], *verdict(last["metrics"])))
    print(f"\n| network | P | epoch | verdict (top-{args.top_k}) | Xie et al. | reproduces |")
    print("|---|---|---|---|---|---|")
    for name, params, epoch, accepted, detail in rows:
        mine = "power law" if accepted else "not"
        paper = "power law" if XIE[name] else "not"
        same = "yes" if accepted == XIE[name] else "no"
        print(f"| {name} | {params} | {epoch} | {mine} ({detail}) | {paper} | {same} |")


if __name__ == "__main__":
    main()
