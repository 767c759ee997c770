"""Trace estimators on a real Hessian: plain Hutchinson vs Ritz-deflated Hutchinson vs Hutch++ (float64 exact ref).

The digits example's MLP (64-50-50-10 ReLU, 6,310 parameters) is trained for a few epochs; the exact trace of the
probe-loss Hessian (1,024 samples) comes from the dense Hessian (``torch.func.hessian``). Each estimator runs with 5
seeds; the table shows the median and worst relative error and the products spent. The deflated estimator uses the
top-8 Ritz pairs of a top-8 solve (16 samples); the Krylov-deflated one, like the callback's cheap probe, every Ritz
pair of a top-8 run whose basis holds it and its missed-eigenvalue check (24 samples, the default).

The *callback path* rows run the digits example itself (``examples/digits_power_law.py``'s DigitsMLP, SGD lr 0.05
momentum 0.9, 1,024 probe samples) through :class:`~lightning_hessian.callback.HessianSpectrum` for 10 epochs with
5 seeds and compare the last cheap probe's ``hessian/trace`` with the exact trace of that probe set at the final
weights (only cheap probes: ``powerlaw_every_n_epochs=None, probe_at_init=False``, each warm-started from the
previous one), and report the HVPs of the settled cheap probes (epochs 5-9) and the top-8 eigenvalue error against a
tight (tol 1e-10) float64 solve, for each ``cheap_tol``.

Run: ``python benchmarks/bench_trace.py [--callback-only]`` (a few minutes on one thread).
"""

from __future__ import annotations

import statistics

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, hessian

from lightning_hessian import HessianOperator, hutchinson_trace, lanczos
from lightning_hessian.callback.runner import cheap_basis_rows
from lightning_hessian.trace import deflated_trace, hutch_plus_plus


def main() -> None:
    torch.set_num_threads(1)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(10):
        for idx in torch.randperm(1437).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 1024, 256)]

    def loss_fn(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def probe_loss(theta: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x[:1024],)), y[:1024])

    exact = float(torch.diagonal(hessian(probe_loss)(flat)).sum())
    op = HessianOperator(model, loss_fn, batches, dtype=torch.float64)
    n = op.num_params
    top = lanczos(op.matvec, n, 8, tol=1e-6, return_eigenvectors=True)
    # the callback's cheap probe: a basis that holds the whole run and its missed-eigenvalue check (no restart)
    cheap = lanczos(op.matvec, n, 8, tol=1e-6, num_vectors=cheap_basis_rows(8), return_basis=True)
    krylov = cheap.basis_values.numel()
    top_share = float(top.eigenvalues.sum()) / exact
    print(f"digits MLP, {n} parameters, exact tr(H) = {exact:.6g}; top-8 eigenvalues hold {top_share:.1%} of it")
    print(f"(top-8 Lanczos: {top.num_matvecs} products, spent by the cheap probe anyway)\n")
    estimators = {
        "Hutchinson, 16 samples": lambda s: hutchinson_trace(op.matvec, n, num_samples=16, seed=s),
        "Hutchinson, 24 samples": lambda s: hutchinson_trace(op.matvec, n, num_samples=24, seed=s),
        "Hutch++, 24 products": lambda s: hutch_plus_plus(op.matvec, n, num_samples=24, seed=s),
        "Ritz-deflated (top-8) + 16 samples": lambda s: deflated_trace(
            op.matvec, n, top.eigenvectors, num_samples=16, seed=s, ritz_values=top.eigenvalues
        ),
        f"Krylov-deflated (the cheap probe's {krylov} vectors) + 24 samples": lambda s: deflated_trace(
            op.matvec, n, cheap.basis_vectors, num_samples=24, seed=s, ritz_values=cheap.basis_values
        ),
    }
    print("| estimator | products | median rel. error | worst rel. error | median stderr / tr |")
    print("|---|---|---|---|---|")
    for name, run in estimators.items():
        results = [run(seed) for seed in range(5)]
        errors = [abs(r.value - exact) / abs(exact) for r in results]
        stderr = statistics.median(r.stderr / abs(exact) for r in results)
        print(
            f"| {name} | {results[0].num_samples} | {statistics.median(errors):.2%} | {max(errors):.2%} | "
            f"{stderr:.2%} |"
        )


def exact_trace_and_top(module: nn.Module, batches: list, k: int = 8) -> tuple[float, torch.Tensor]:
    """Exact float64 trace (dense ``torch.func.hessian``) and top-``k`` eigenvalues of the probe loss of ``module``."""
    import copy

    model = copy.deepcopy(module.net).double()
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def probe_loss(theta: torch.Tensor) -> torch.Tensor:
        params = {n: c.view(s) for n, c, s in zip(names, theta.split([s.numel() for s in shapes]), shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    dense = hessian(probe_loss)(flat)
    return float(torch.diagonal(dense).sum()), torch.linalg.eigvalsh(dense).flip(0)[:k]


def callback_rows(cheap_tols: tuple[float | None, ...] = (None, 1e-3), seeds: int = 5, epochs: int = 10) -> None:
    """The callback path on the digits example (see the module docstring)."""
    import sys
    import warnings
    from pathlib import Path

    import lightning.pytorch as pl

    from lightning_hessian.callback import HessianSpectrum

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from digits_power_law import DigitsMLP, digits_loaders

    warnings.filterwarnings("ignore")
    print("\ncallback path (digits example, last cheap probe of 10 epochs, 5 seeds; HVPs of cheap probes 5-9)\n")
    print("| cheap_tol | cheap-probe HVPs (median, max) | trace: median rel. error | worst | lambda_max rel. error |")
    print("|---|---|---|---|---|")
    for cheap_tol in cheap_tols:
        errors, hvps, eig_errors = [], [], []
        for seed in range(seeds):
            pl.seed_everything(seed, verbose=False)
            module = DigitsMLP()
            train, _ = digits_loaders(seed=seed)
            spectrum = HessianSpectrum(
                top_k=200, probe_samples=1024, seed=seed, density=False, jacobian=False, embedding=False,
                max_overhead=None, cheap_tol=cheap_tol, near_zero=False, powerlaw_every_n_epochs=None,
                probe_at_init=False,
            )  # fmt: skip
            trainer = pl.Trainer(
                max_epochs=epochs, callbacks=[spectrum], logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1,
            )  # fmt: skip
            trainer.fit(module, train)
            exact, top = exact_trace_and_top(module, spectrum._runner.probe_set.batches)
            last = spectrum.history[-1]["metrics"]
            errors.append(abs(last["hessian/trace"] - exact) / abs(exact))
            hvps += [h["metrics"]["hessian/hvps"] for h in spectrum.history if not h["full"] and h["epoch"] >= 5]
            eig_errors.append(abs(last["hessian/lambda_max"] - float(top[0])) / float(top[0]))
        label = "None (= tol 1e-6)" if cheap_tol is None else f"{cheap_tol:g}"
        print(
            f"| {label} | {statistics.median(hvps):.0f}, {max(hvps):.0f} | {statistics.median(errors):.2%} | "
            f"{max(errors):.2%} | {max(eig_errors):.1e} |"
        )


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    if "--callback-only" not in sys.argv:
        main()
    callback_rows()
