"""Singh, Bachmann & Hofmann (2021): closed-form Hessian ranks vs dense float64 measurements.

For random networks on generic Gaussian data (MSE), the script prints the predicted ranks of H_L, H_o and
H_f = H_L - H_o (:func:`lightning_hessian.linear_hessian_rank`) next to the measured ones
(:func:`lightning_hessian.numerical_hessian_rank`, dense float64, NumPy's default tolerance), for bias-free linear
networks (where the formulas are theorems), linear networks with biases (``bias=True`` where the library has a
closed form) and small ReLU / tanh networks (where the paper uses the linear formulas as estimates).

Run: ``python examples/rank_formula_vs_measured.py`` (about a minute on one thread).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lightning_hessian import linear_hessian_rank, numerical_hessian_rank

CASES = [([25, 5, 10, 10], 50), ([8, 6, 4], 20), ([4, 3, 2], 10), ([12, 20, 20, 3], 8), ([10, 16, 16, 16, 4], 40)]


def net(widths: list[int], activation: str, bias: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2 and activation != "linear":
            layers.append({"relu": nn.ReLU, "tanh": nn.Tanh}[activation]())
    return nn.Sequential(*layers).double()


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * (model(x) - y).pow(2).sum(dim=1).mean()


def measured_ranks(measured) -> tuple[int, int, int]:
    return measured.loss, measured.outer, measured.functional


def main() -> None:
    torch.set_num_threads(1)
    has_bias = "bias" in inspect.signature(linear_hessian_rank).parameters
    print(f"{'widths':>20s} {'n':>3s} {'act':>6s} {'bias':>5s} {'P':>5s}  predicted (H_L, H_o, H_f)  measured   exact?")
    for widths, n in CASES:
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
        y = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64)
        for activation, bias in (("linear", False), ("linear", True), ("relu", False), ("tanh", False)):
            model = net(widths, activation, bias, seed=0)
            measured = numerical_hessian_rank(model, mse, [(x, y)])
            if bias and not has_bias:
                predicted = None
            else:
                rank = int(torch.linalg.matrix_rank(x))
                augmented = int(torch.linalg.matrix_rank(torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)))
                kwargs = {"bias": True, "augmented_rank": augmented} if bias else {}
                predicted = linear_hessian_rank(widths, rank, **kwargs)
            pred = (
                "-"
                if predicted is None
                else f"({predicted.loss}, {predicted.outer}, {predicted.functional})".replace("None", "?")
            )
            meas = f"({measured.loss}, {measured.outer}, {measured.functional})"
            if predicted is None:
                exact = "-"
            else:
                pairs = zip((predicted.loss, predicted.outer, predicted.functional), measured_ranks(measured))
                exact = str(all(p == m for p, m in pairs if p is not None))
            print(
                f"{widths!s:>20s} {n:3d} {activation:>6s} {bias!s:>5s} {measured.num_params:5d}  {pred:>25s}  "
                f"{meas:>17s}  {exact}"
            )


if __name__ == "__main__":
    main()
