"""HVP cost on real-model shapes: each exact strategy and block products as a ratio to one gradient evaluation.

Models (float32, eval mode, seeded random data; nothing is downloaded):

* ``mlp``: digits-sized MLP 64-32-32-10 (tanh), probe set 1024 samples in 2 batches;
* ``resnet``: :class:`~lightning_hessian.demos.ResNetCNN` ``width=64`` (about 1.2 M parameters, BatchNorm with
  non-trivial running statistics), probe set 2 x 32 CIFAR-shaped images;
* ``transformer``: :class:`~lightning_hessian.demos.TransformerLM` (``nn.TransformerEncoderLayer``), 2 layers,
  ``d_model=128``, 2 x 16 sequences of 64 tokens.

For each model, in one process and side by side: seconds of one probe gradient (``op.gradient()``, the unit),
seconds per product of each strategy (``cached``, ``double_backward``, ``forward_over_reverse``), per product inside
a block of 8 (``op.matmat``), the strategy ``cache_graph="auto"`` chooses, and the peak RSS. Timings are the median
of a few repeats after a warm-up; on a shared machine they are noisy, the ratios (taken in the same run) less so.

Solver rows (probe seconds / (HVPs x s/HVP) for top-20 and top-200) and fit-overhead rows are left to
:func:`solver_rows` and :func:`fit_overhead_rows`.

Run: ``python benchmarks/bench_real_models.py [--quick] [--threads N] [--models mlp,resnet,transformer]``
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_hessian import demos, lanczos
from lightning_hessian.operators import STRATEGIES, HessianOperator

BLOCK = 8


def ce_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_mlp(quick: bool) -> tuple[nn.Module, Callable, list]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1024, 64, generator=gen), torch.randint(0, 10, (1024,), generator=gen)
    return model, ce_loss, [(x[:512], y[:512]), (x[512:], y[512:])]


def make_resnet(quick: bool) -> tuple[nn.Module, Callable, list]:
    torch.manual_seed(0)
    model = demos.ResNetCNN(width=16 if quick else 64)
    batches = demos.image_batches(2, 8 if quick else 32, seed=0)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for x, _ in batches:
            model(x)
    return model.eval(), ce_loss, batches


def make_transformer(quick: bool) -> tuple[nn.Module, Callable, list]:
    torch.manual_seed(0)
    d = 32 if quick else 128
    model = demos.TransformerLM(vocab_size=256, d_model=d, nhead=4, num_layers=2, max_len=64)
    return model, demos.lm_loss, demos.token_batches(2, 4 if quick else 16, length=64, vocab_size=256, seed=0)


MODELS = {"mlp": make_mlp, "resnet": make_resnet, "transformer": make_transformer}


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, quick: bool, repeats: int) -> dict[str, Any]:
    model, loss_fn, batches = MODELS[name](quick)
    auto = HessianOperator(model, loss_fn, batches)
    row: dict[str, Any] = {"model": name, "params": auto.num_params, "auto": auto.strategy}
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(auto.num_params, generator=gen)
    block = torch.randn(auto.num_params, BLOCK, generator=gen)
    # the unit: a fresh forward + backward of every probe batch (not the cached operator's stored gradient)
    row["grad_s"] = timed(HessianOperator(model, loss_fn, batches, cache_graph=False).gradient, repeats)
    for strategy in STRATEGIES:
        op = HessianOperator(model, loss_fn, batches, strategy=strategy)
        row[f"{strategy}_s"] = timed(lambda op=op: op.matvec(v), repeats)
        row[f"{strategy}_block_s"] = timed(lambda op=op: op.matmat(block), max(1, repeats // 2)) / BLOCK
        del op
    row["rss_mib"] = peak_rss_mib()
    return row


def make_mlp1m(quick: bool) -> tuple[nn.Module, Callable, list]:
    """A ~1.07e6-parameter MLP 784-1024-256-10 (tanh), 2 x 256 random samples (the issue's 1e6-parameter MLP)."""
    torch.manual_seed(0)
    width = 128 if quick else 1024
    model = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, 256), nn.Tanh(), nn.Linear(256, 10))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(512, 784, generator=gen), torch.randint(0, 10, (512,), generator=gen)
    return model, ce_loss, [(x[:256], y[:256]), (x[256:], y[256:])]


MODELS["mlp1m"] = make_mlp1m


def solver_rows(
    name: str, quick: bool, ks: tuple[int, ...] = (20, 200), blocks: tuple[int, ...] = (1, 4, 8), tol: float = 1e-4
) -> list[dict[str, Any]]:
    """Solver overhead on a real operator: probe seconds / (HVPs x s/HVP) of top-``k`` runs, per block size.

    For each block size ``b`` the unit is the measured seconds per product *of that kind* (``matvec`` for ``b = 1``,
    ``matmat`` of ``b`` columns divided by ``b`` otherwise), timed in the same process just before the run; a ratio
    of 1.0 means the solver costs nothing beyond its products. ``single`` is the previous single-vector solver
    (``_single_vector_lanczos``, matvec), for the HVP counts. Returns one row per (k, solver).
    """
    from lightning_hessian.lanczos import _single_vector_lanczos

    model, loss_fn, batches = MODELS[name](quick)
    op = HessianOperator(model, loss_fn, batches)
    n = op.num_params
    gen = torch.Generator().manual_seed(1)
    unit = {1: timed(lambda: op.matvec(torch.randn(n, generator=gen)), 3)}
    for b in blocks:
        if b > 1:
            unit[b] = timed(lambda b=b: op.matmat(torch.randn(n, b, generator=gen)), 2) / b
    rows = []
    for k in ks:
        runs = [("single", 1)] if k <= 20 else []
        runs += [("block", b) for b in blocks]
        for solver, b in runs:
            start = time.perf_counter()
            if solver == "single":
                result = _single_vector_lanczos(op.matvec, n, k, tol=tol, dtype=torch.float32, max_matvecs=4000)
            else:
                result = lanczos(
                    op.matvec, n, k, tol=tol, dtype=torch.float32, max_matvecs=4000,
                    matmat=op.matmat if b > 1 else None, block_size=b,
                )  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "model": name, "params": n, "k": k, "solver": solver, "block": b, "hvps": result.num_matvecs,
                    "seconds": seconds, "s_per_hvp": unit[b], "ratio": seconds / (result.num_matvecs * unit[b]),
                    "converged": result.converged, "rss_mib": peak_rss_mib(),
                }
            )  # fmt: skip
    return rows


def print_solver_rows(rows: list[dict[str, Any]]) -> None:
    print("\n| model | params | k | solver | block | HVPs | seconds | s/HVP (that kind) | ratio | converged | RSS MiB")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['k']} | {r['solver']} | {r['block']} | {r['hvps']} | "
            f"{r['seconds']:.2f} | {r['s_per_hvp']:.4f} | {r['ratio']:.2f} | {r['converged']} | {r['rss_mib']:.0f} |"
        )


def fit_overhead_rows() -> dict[str, float] | None:
    """PLACEHOLDER for the lead: power-law / analysis fit overhead per probe. Returns None until filled in."""
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, args.quick, args.repeats) for name in args.models.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, device cpu, block of {BLOCK}")
    print()
    head = "| model | params | gradient s | " + " | ".join(f"{s} (x grad)" for s in STRATEGIES)
    head += " | " + " | ".join(f"{s} per product in block (x grad)" for s in STRATEGIES) + " | auto | peak RSS MiB |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        g = r["grad_s"]
        cells = [r["model"], f"{r['params']:,}", f"{g:.4f}"]
        cells += [f"{r[f'{s}_s']:.4f} ({r[f'{s}_s'] / g:.2f})" for s in STRATEGIES]
        cells += [f"{r[f'{s}_block_s']:.4f} ({r[f'{s}_block_s'] / g:.2f})" for s in STRATEGIES]
        cells += [r["auto"], f"{r['rss_mib']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    for name in ("solver (top-20, top-200)", "fit overhead"):
        print(f"\n{name}: not measured yet (see solver_rows / fit_overhead_rows)")


if __name__ == "__main__":
    main()
