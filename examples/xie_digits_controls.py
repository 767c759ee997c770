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
from digits_power_law import digits_tensors
from torch import nn
from torch.func import functional_call, hessian

from lightning_hessian import fit_power_law

SETTINGS = {  # name: (hidden layers, width, trained, label-noise fraction)
    "init 2x50": (2, 50, False, 0.0),
    "trained 2x50": (2, 50, True, 0.0),
    "trained 1x50": (1, 50, True, 0.0),
    "trained 2x10": (2, 10, True, 0.0),
}
EXPECTED = {"init 2x50": False, "trained 2x50": True, "trained 1x50": False, "trained 2x10": False}
#: Xie et al. report that 40% / 80% symmetric label noise breaks the power law (d_ks 0.180 / 0.157 on MNIST).
NOISE_SETTINGS = {"trained 2x50, 40% noise": (2, 50, True, 0.4), "trained 2x50, 80% noise": (2, 50, True, 0.8)}
EXPECTED.update(dict.fromkeys(NOISE_SETTINGS, False))


def mlp(depth: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    return nn.Sequential(*layers, nn.Linear(d_in, 10))


def noisy(y: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Symmetric label noise: a ``fraction`` of the labels replaced by uniformly random other classes."""
    gen = torch.Generator().manual_seed(seed + 99)
    flip = torch.rand(len(y), generator=gen) < fraction
    shift = torch.randint(1, 10, (len(y),), generator=gen)
    return torch.where(flip, (y + shift) % 10, y)


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
    parser.add_argument("--label-noise", action="store_true", help="also train on 40%% / 80%% noisy labels")
    parser.add_argument("--figure", default=None, help="rank plot of the spectra of the first seed (matplotlib)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these settings (names as printed)")
    args = parser.parse_args()
    settings = {**SETTINGS, **(NOISE_SETTINGS if args.label_noise else {})}
    if args.only:
        settings = {name: value for name, value in settings.items() if name in args.only}
    spectra: dict[str, torch.Tensor] = {}
    torch.set_num_threads(1)
    ks = [50, 100, 150, 200, 300, 400, 500, 700, 1000]
    fractions = [0.01, 0.02, 0.03, 0.05, 0.08, 0.1]
    agree_fixed = {k: 0 for k in ks}
    agree_frac = {f: 0 for f in fractions}
    for seed in args.seeds:
        x, y = digits_tensors(seed)[:2]
        probe_x = x[: args.probe_samples]
        print(f"\nseed {seed}")
        header = "".join(f"{'K=' + str(k):>12s}" for k in ks) + "".join(f"{f'{f:.0%}P':>14s}" for f in fractions)
        print(f"{'setting':14s} {'P':>6s} {'acc':>5s}" + header)
        for name, (depth, width, trained, noise) in settings.items():
            torch.manual_seed(seed)
            model = mlp(depth, width)
            start = time.perf_counter()
            labels = noisy(y, noise, seed) if noise else y
            acc = train(model, x, labels, args.epochs, seed, args.recipe) if trained else float("nan")
            eig = spectrum(model, probe_x, labels[: args.probe_samples])
            if seed == args.seeds[0]:
                spectra[name] = eig
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
    total = len(settings) * len(args.seeds)
    print(f"\nverdicts matching Xie et al. (of {total}; * marks a match, cells are d_ks/d_c):")
    print("  fixed K:    " + ", ".join(f"K={k}: {v}" for k, v in agree_fixed.items()))
    print("  K = f * P:  " + ", ".join(f"{f:.0%}: {v}" for f, v in agree_frac.items()))
    if args.figure:
        rank_figure(spectra, args.figure, k=700)


def rank_figure(spectra: dict[str, torch.Tensor], path: str, k: int) -> None:
    """Log-log rank plot of the top-``k`` eigenvalues of each setting (first seed), normalised by lambda_1."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, eig in spectra.items():
        top = eig[:k][eig[:k] > 0]
        fit = fit_power_law(top, alpha=0.05)
        verdict = "PL" if fit.is_power_law else "not PL"
        style = "--" if name.startswith("init") else "-"
        ranks = torch.arange(1, top.numel() + 1)
        label = f"{name}: d_ks {fit.ks_distance:.3f} vs d_c {fit.ks_critical:.3f} ({verdict})"
        ax.loglog(ranks, top / top[0], style, label=label)
    ax.set_xlabel("rank k")
    ax.set_ylabel("λ_k / λ_1")
    ax.set_title(f"digits: top-{k} Hessian eigenvalues (dense float64)")
    ax.legend(fontsize=7)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
