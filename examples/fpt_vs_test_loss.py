"""Do free-probability metrics at initialisation predict the final test loss? (Chhaibi, Daouda & Kahn 2022)

A grid of MLPs on scikit-learn digits (depth x width x Xavier gain x activation, no bias, as in the paper's MNIST
experiment) is trained with plain SGD from the same seed. For each net, :class:`lightning_hessian.free_probability.
JacobianLaw` predicts the spectral law of the input-output JᵀJ at initialisation from the widths, the actual weight
variances and the activations; its quantiles are the "FPT metrics". The script reports the Spearman rank correlation
of ``|log10 q|`` (distance of a quantile from isometry) with the final test loss, next to simple baselines (the gain,
the depth, ``|log10 mean|`` of the law), and writes a scatter plot.

Run: ``python examples/fpt_vs_test_loss.py [--epochs 30] [--figure docs/figures/fpt_vs_loss.png]`` (a few minutes on
one thread).
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import numpy as np
import torch
from digits_power_law import digits_tensors
from scipy.stats import spearmanr
from torch import nn

from lightning_hessian.free_probability import JacobianLaw


def mlp(depth: int, width: int, gain: float, activation: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, width, bias=False), act()]
        d_in = width
    layers.append(nn.Linear(d_in, 10, bias=False))
    net = nn.Sequential(*layers)
    for module in net:
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight, gain=gain)
    return net


def train(net: nn.Module, x, y, x_test, y_test, epochs: int, lr: float, seed: int) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            if not torch.isfinite(loss):
                return math.inf
            loss.backward()
            opt.step()
    with torch.no_grad():
        test = float(nn.functional.cross_entropy(net(x_test), y_test))
    return test if math.isfinite(test) else math.inf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", default=None, help="write the scatter plot here (needs matplotlib)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, x_test, y_test = digits_tensors(args.seed)
    grid = list(itertools.product([1, 2, 3, 4], [32, 128], [0.25, 0.5, 1.0, 2.0, 4.0], ["relu", "tanh"]))
    rows = []
    print(
        f"{'depth':>5s} {'width':>5s} {'gain':>5s} {'act':>5s} {'q10':>10s} {'q50':>10s} {'q90':>10s} {'test loss':>9s}"
    )
    for depth, width, gain, activation in grid:
        net = mlp(depth, width, gain, activation, args.seed)
        law = JacobianLaw.from_module(net, x)
        q10, q50, q90 = law.quantiles([0.1, 0.5, 0.9])
        mean = law.mean
        loss = train(net, x, y, x_test, y_test, args.epochs, args.lr, args.seed)
        rows.append((depth, width, gain, activation, q10, q50, q90, mean, loss))
        print(f"{depth:5d} {width:5d} {gain:5.2f} {activation:>5s} {q10:10.3g} {q50:10.3g} {q90:10.3g} {loss:9.4f}")
    table = np.array([[r[0], r[1], r[2], r[4], r[5], r[6], r[7], r[8]] for r in rows], dtype=float)
    loss = np.where(np.isfinite(table[:, 7]), table[:, 7], np.nanmax(table[np.isfinite(table[:, 7]), 7]) * 10)
    predictors = {
        "|log10 q90| (FPT)": np.abs(np.log10(table[:, 5] + 1e-12)),
        "|log10 q50| (FPT)": np.abs(np.log10(table[:, 4] + 1e-12)),
        "|log10 q10| (FPT)": np.abs(np.log10(table[:, 3] + 1e-12)),
        "|log10 mean| (law mean)": np.abs(np.log10(table[:, 6])),
        "|log2 gain| (baseline)": np.abs(np.log2(table[:, 2])),
        "depth (baseline)": table[:, 0],
    }
    print(f"\nSpearman rank correlation with the final test loss over {len(rows)} nets:")
    for name, values in predictors.items():
        rho, p = spearmanr(values, loss)
        print(f"  {name:26s} rho = {rho:+.3f} (p = {p:.1e})")
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.5))
        q90 = predictors["|log10 q90| (FPT)"]
        for act, marker in (("relu", "o"), ("tanh", "s")):
            mask = np.array([r[3] == act for r in rows])
            ax.scatter(q90[mask], loss[mask], marker=marker, alpha=0.7, label=act)
        rho, _ = spearmanr(q90, loss)
        ax.set_xlabel("|log10 q90| of the predicted JᵀJ law at initialisation")
        ax.set_ylabel("final test loss")
        ax.set_yscale("log")
        ax.set_title(f"FPT metric vs test loss on digits ({len(rows)} nets), Spearman ρ = {rho:.2f}")
        ax.legend()
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(args.figure, dpi=110)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
