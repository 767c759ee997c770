"""Timings of the rank and embedding tools, side by side with simple baselines (CPU, float64).

Run: ``python benchmarks/bench_rank.py``. Prints seconds and ratios; asserts nothing.

1. Dense H_L for numerical_hessian_rank: vectorised reverse-over-reverse (``dense_hessian_parts``, which also builds
   H_o) versus P separate Hessian-vector products (``HessianOperator.dense``), on bias-free linear nets.
2. Near-zero fraction by SLQ (8 probes x 64 steps) versus the dense eigen-decomposition of H_L.
3. Condensation of wide MLP layers: Gram-matrix candidates + exact re-check versus exact ``torch.cdist``.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_hessian.embedding import condensation, condensation_report, split_neuron
from lightning_hessian.operators import HessianOperator
from lightning_hessian.rank import dense_hessian_parts, linear_hessian_rank, near_zero_fraction, numerical_hessian_rank

DT = torch.float64


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def linear_net(widths, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])]).to(DT)


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def bench_dense():
    print("== dense Hessians (numerical_hessian_rank) ==")
    print(f"{'widths':>22} {'P':>6} {'parts (H_L+H_o) s':>18} {'op.dense (H_L) s':>17} {'ratio':>7} {'rank s':>7} ok")
    for widths, n in [([25, 5, 10, 10], 50), ([20, 20, 20, 5], 100), ([30, 30, 30, 10], 200)]:
        model = linear_net(widths)
        x, y = torch.randn(n, widths[0], dtype=DT), torch.randn(n, widths[-1], dtype=DT)
        batches = [(x, y)]
        dense_hessian_parts(model, mse, batches)  # warm-up
        t_parts, _ = timed(lambda: dense_hessian_parts(model, mse, batches))  # noqa: B023
        op = HessianOperator(model, mse, batches, dtype=DT)
        t_op, _ = timed(op.dense)
        t_rank, r = timed(lambda: numerical_hessian_rank(model, mse, batches))  # noqa: B023
        p = linear_hessian_rank(widths, min(n, widths[0]))
        ok = (r.loss, r.outer, r.functional) == (p.loss, p.outer, p.functional)
        times = f"{t_parts:>18.3f} {t_op:>17.3f} {t_op / t_parts:>7.1f} {t_rank:>7.3f}"
        print(f"{widths!s:>22} {p.num_params:>6} {times} {ok}")


def bench_near_zero():
    print("== near-zero fraction: SLQ (8 probes x 64 steps) vs dense eigvalsh ==")
    print(f"{'widths':>22} {'P':>6} {'true':>7} {'SLQ':>16} {'SLQ s':>7} {'dense s':>8} {'ratio':>7}")
    for widths, n in [([10, 40, 40, 3], 100), ([20, 50, 50, 5], 200)]:
        model = linear_net(widths, seed=1)
        x, y = torch.randn(n, widths[0], dtype=DT), torch.randn(n, widths[-1], dtype=DT)
        op = HessianOperator(model, mse, [(x, y)], dtype=DT)
        t_slq, est = timed(lambda: near_zero_fraction(op))  # noqa: B023
        t_dense, _ = timed(lambda: torch.linalg.eigvalsh(dense_hessian_parts(model, mse, [(x, y)])[0]))  # noqa: B023
        p = linear_hessian_rank(widths, min(n, widths[0]))
        true = p.rank_deficiency / p.num_params
        slq = f"{est.fraction:.4f}+-{est.stderr:.4f}"
        times = f"{t_slq:>7.2f} {t_dense:>8.2f} {t_dense / t_slq:>7.1f}"
        print(f"{widths!s:>22} {p.num_params:>6} {true:>7.4f} {slq:>16} {times}")


def bench_condensation():
    print("== condensation of wide layers: Gram + exact re-check vs exact cdist ==")
    print(f"{'widths':>22} {'condensation s':>15} {'exact cdist s':>14} {'ratio':>7} {'report s':>9} eff. widths")
    for widths in ([784, 512, 512, 10], [784, 1024, 1024, 10]):
        torch.manual_seed(0)
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(nn.ReLU())
        net = nn.Sequential(*layers)
        for neuron in range(0, 64, 2):  # plant 32 copies in the first hidden layer
            net = split_neuron(net, 0, neuron, 0.5)
        t_ours, result = timed(lambda: condensation(net, tol=1e-6))  # noqa: B023

        def exact():
            for linear in (net[0], net[2]):  # noqa: B023
                rows = torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach().double()
                rows = rows / rows.norm(dim=1, keepdim=True)
                torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist")

        t_exact, _ = timed(exact)
        x = torch.randn(256, widths[0])
        t_report, _ = timed(lambda: condensation_report(net, x, tol=1e-6))  # noqa: B023
        eff = [e.effective_width for e in result]
        print(f"{widths!s:>22} {t_ours:>15.3f} {t_exact:>14.3f} {t_exact / t_ours:>7.1f} {t_report:>9.3f} {eff}")


if __name__ == "__main__":
    torch.set_num_threads(1)  # one thread: reproducible on a shared machine
    print(f"torch {torch.__version__}, 1 thread")
    bench_dense()
    bench_near_zero()
    bench_condensation()
