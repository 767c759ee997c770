"""Which top-K reproduces Xie et al.'s digits-scale power-law controls? Dense float64 spectra, every K at once.

Xie et al. (2022, Table 1-3) report, on MNIST-scale data with K = 1000 eigenvalues:

* random init, 2-hidden-layer FCN: not a power law;
* trained 2-hidden-layer FCN of width 50 (and 70, 100): a power law;
* trained 1-hidden-layer FCN: not a power law;
* trained 2-hidden-layer FCN of width 10 (and 20, 30): not a power law.

This script trains those four networks on scikit-learn digits (their recipe scaled down: SGD, momentum 0.9, weight
decay 5e-4, lr 0.1 divided by 10 at 40% and 80% of the epochs, batch 128), computes the exact Hessian of the training
loss on the probe samples (``torch.func.hessian``, float64, ``eigvalsh``) and runs the KS power-law test of
:func:`lightning_hessian.fit_power_law` for a grid of K, so that a default K (fixed, or a fraction of the parameter
count) can be chosen from evidence. Prints one table per seed and a summary of the rules that reproduce all four
verdicts.

Run: ``python examples/xie_digits_controls.py [--seeds 0 1 2] [--epochs 50]`` (a few minutes on one thread).
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, hessian

from lightning_hessian import fit_power_law

SETTINGS = {
    "init 2x50": (2, 50, False),
    "trained 2x50": (2, 50, True),
    "trained 1x50": (1, 50, True),
    "trained 2x10": (2, 10, True),
}
EXPECTED = {"init 2x50": False, "trained 2x50": True, "trained 1x50": False, "trained 2x10": False}


def mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    return nn.Sequential(*layers, nn.Linear(d_in, 10))


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:1437]
    return x[perm], y[perm]


RECIPES = {
    # Xie et al.'s recipe scaled down: SGD, momentum, weight decay, lr / 10 at 40% and 80% of the epochs, batch 128
    "xie": {"lr": 0.1, "weight_decay": 5e-4, "batch": 128, "decay": True},
    # the digits example's recipe: constant lr 0.05, no weight decay, batch 64
    "example": {"lr": 0.05, "weight_decay": 0.0, "batch": 64, "decay": False},
}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, recipe: str = "xie") -> float:
    r = RECIPES[recipe]
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=0.9, weight_decay=r["weight_decay"])
    milestones = [int(0.4 * epochs), int(0.8 * epochs)] if r["decay"] else []
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(r["batch"]):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def spectrum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sizes = [s.numel() for s in shapes]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x.double(),)), y)

    return torch.linalg.eigvalsh(hessian(loss)(flat)).flip(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--probe-samples", type=int, default=1024)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="xie")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ks = [50, 100, 150, 200, 300, 400, 500, 700, 1000]
    fractions = [0.01, 0.02, 0.03, 0.05, 0.08, 0.1]
    agree_fixed = {k: 0 for k in ks}
    agree_frac = {f: 0 for f in fractions}
    for seed in args.seeds:
        x, y = digits(seed)
        probe_x, probe_y = x[: args.probe_samples], y[: args.probe_samples]
        print(f"\nseed {seed}")
        header = "".join(f"{'K=' + str(k):>12s}" for k in ks) + "".join(f"{f'{f:.0%}P':>14s}" for f in fractions)
        print(f"{'setting':14s} {'P':>6s} {'acc':>5s}" + header)
        for name, (depth, width, trained) in SETTINGS.items():
            torch.manual_seed(seed)
            model = mlp(depth, width)
            start = time.perf_counter()
            acc = train(model, x, y, args.epochs, seed, args.recipe) if trained else float("nan")
            eig = spectrum(model, probe_x, probe_y)
            p = eig.numel()
            cells = []
            for k in ks:
                fit = fit_power_law(eig[:k], alpha=0.05) if k < p else None
                ok = fit is not None and fit.is_power_law == EXPECTED[name]
                agree_fixed[k] += int(ok)
                cells.append(f"{fit.ks_distance:.3f}/{fit.ks_critical:.3f}{'*' if ok else ' '}" if fit else "-")
            for f in fractions:
                k = max(3, round(f * p))
                fit = fit_power_law(eig[:k], alpha=0.05)
                ok = fit.is_power_law == EXPECTED[name]
                agree_frac[f] += int(ok)
                cells.append(f"{k:4d}:{fit.ks_distance:.3f}{'*' if ok else ' '}")
            line = " " + "".join(f"{c:>12s}" for c in cells[: len(ks)]) + "".join(f"{c:>14s}" for c in cells[len(ks) :])
            print(f"{name:14s} {p:6d} {acc:5.3f}" + line + f"   ({time.perf_counter() - start:.0f} s)")
    total = 4 * len(args.seeds)
    print(f"\nverdicts matching Xie et al. (of {total}; * marks a match, cells are d_ks/d_c):")
    print("  fixed K:    " + ", ".join(f"K={k}: {v}" for k, v in agree_fixed.items()))
    print("  K = f * P:  " + ", ".join(f"{f:.0%}: {v}" for f, v in agree_frac.items()))


if __name__ == "__main__":
    main()
