"""Condensation at small initialisation: orientation clusters of width-100 one-hidden-layer nets over training.

The condensation literature (Luo et al. 2021, phase diagram of two-layer ReLU nets; Zhou et al. 2022, condensation at
initial training; Zhang et al. 2021, embedding principle) reports that nets trained from a small initialisation align
their neurons' input vectors [w_k, b_k] onto a few orientations, while nets at the default scale stay spread out. This
script trains both regimes (tanh and ReLU, width 100, 2-D inputs, 40 samples, full-batch Adam) and prints the number of
orientation clusters (``orientation_condensation``) over training for several cosine tolerances, next to the
exact-merge width (``condensation``), which stays at the full width. It is the evidence behind the default tolerance
``DEFAULT_ORIENTATION_TOL = 1e-3``.

Run from the repository root (about 10 s on one thread)::

    PYTHONPATH=$PWD python examples/condensation_small_init.py [--plot condensation.png] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from lightning_hessian.embedding import DEFAULT_ORIENTATION_TOL, condensation, orientation_condensation

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
SCALES = {"small (0.01x)": 0.01, "default": 1.0}
TOLERANCES = (1e-4, 1e-3, 1e-2, 3e-2)
CHECKPOINTS = (0, 50, 100, 200, 400, 700, 1000)


def regression_task(seed: int, n: int = 40, d: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points uniform in ``[-1, 1]^2``, target ``sin(2 x_1) cos(x_2)`` (float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=generator, dtype=torch.float64) * 2 - 1
    return x, torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:2])


def make_net(activation: type[nn.Module], scale: float, seed: int, width: int = 100, d: int = 2) -> nn.Sequential:
    """PyTorch's default initialisation of every parameter, multiplied by ``scale``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, width), activation(), nn.Linear(width, 1)).double()
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(scale)
    return net


def train(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    checkpoints: tuple[int, ...] = CHECKPOINTS,
    lr: float = 3e-3,
    tolerances: tuple[float, ...] = TOLERANCES,
) -> dict[int, dict[str, float]]:
    """Full-batch Adam on the MSE; at each checkpoint the loss, the merge width and the orientation widths."""
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    history: dict[int, dict[str, float]] = {}
    for step in range(max(checkpoints) + 1):
        if step in checkpoints:
            with torch.no_grad():
                row = {"loss": float(((net(x) - y) ** 2).mean()), "merge": condensation(net)[0].effective_width}
            for tol in tolerances:
                row[f"{tol:g}"] = orientation_condensation(net, tol=tol)[0].effective_width
            history[step] = row
        loss = ((net(x) - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--plot", default=None, help="save a figure of effective width over training here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for act_name, activation in ACTIVATIONS.items():
        for scale_name, scale in SCALES.items():
            for seed in args.seeds:
                x, y = regression_task(seed)
                results[act_name, scale_name, seed] = train(make_net(activation, scale, seed), x, y)

    steps = " ".join(f"{s:>5d}" for s in CHECKPOINTS)
    print(f"orientation clusters of 100 neurons (1 - |cos| <= tol for tanh, 1 - cos <= tol for ReLU); steps {steps}")
    for (act_name, scale_name, seed), history in results.items():
        print(f"\n{act_name:4s} {scale_name:13s} seed {seed}")
        print(f"  {'loss':>10s} " + " ".join(f"{history[s]['loss']:5.0e}" for s in CHECKPOINTS))
        print(f"  {'merge 1e-3':>10s} " + " ".join(f"{history[s]['merge']:5d}" for s in CHECKPOINTS))
        for tol in TOLERANCES:
            mark = "*" if tol == DEFAULT_ORIENTATION_TOL else " "
            print(f"  {f'tol {tol:g}':>9s}{mark} " + " ".join(f"{history[s][f'{tol:g}']:5d}" for s in CHECKPOINTS))

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(ACTIVATIONS), figsize=(10, 4), sharey=True)
        key = f"{DEFAULT_ORIENTATION_TOL:g}"
        for ax, act_name in zip(axes, ACTIVATIONS):
            for (name, scale_name, seed), history in results.items():
                if name != act_name:
                    continue
                style = "-" if scale_name == "default" else "--"
                ax.plot(CHECKPOINTS, [history[s][key] for s in CHECKPOINTS], style, marker="o",
                        label=f"{scale_name}, seed {seed}")  # fmt: skip
            ax.set_title(f"{act_name}, width 100, tol {key}")
            ax.set_xlabel("Adam step")
            ax.legend(fontsize=8)
        axes[0].set_ylabel("orientation clusters (effective width)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nsaved {args.plot}")


if __name__ == "__main__":
    main()
