"""Core engine benchmark: Lanczos / SLQ / Hutchinson vs the dense float64 Hessian, and vs SciPy's ARPACK (eigsh).

Model: 64 -> 50 -> 50 -> 10 ReLU MLP on synthetic data of the scikit-learn digits shape (no download),
6,310 parameters (small enough for a dense Hessian), probe set 512 samples in 4 batches, float64.
Prints, side by side in one run: HVPs spent, seconds, max relative error of the top-k vs ``eigvalsh``;
seconds per HVP vs seconds per gradient evaluation of the probe set.

Run: python benchmarks/bench_core.py
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse.linalg as sla
import torch
from torch import nn
from torch.func import functional_call

from lightning_hessian import HessianOperator, hutchinson_trace, lanczos, stochastic_lanczos_quadrature


def dense_hessian(model, loss_fn, batches):
    """Dense float64 Hessian of the sample-weighted probe loss by ``torch.func.hessian`` (forward-over-reverse)."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    total = sum(b[0].shape[0] for b in batches)

    def loss_of(flat):
        params = {k: c.view(s) for k, c, s in zip(names, flat.split(sizes), shapes)}
        return (
            sum(b[0].shape[0] * loss_fn(lambda inp: functional_call(model, params, (inp,)), b) for b in batches) / total
        )

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.func.hessian(loss_of)(flat)


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x = torch.randn(512, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (512,))
    model = nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(200):  # a little training so the spectrum has structure
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def loss_fn(m, b):
        return nn.functional.cross_entropy(m(b[0]), b[1])

    batches = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 512, 128)]
    plain = HessianOperator(model, loss_fn, batches)
    op = HessianOperator(model, loss_fn, batches, cache_graph=True)  # what the callback uses
    n = op.num_params

    def seconds(fn, repeat: int = 20) -> float:
        fn()  # warm-up (and, for the cached operator, building the graphs)
        t = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - t) / repeat

    v = torch.randn(n, dtype=torch.float64)
    grad_s = seconds(plain.gradient)
    hvp_s = seconds(lambda: plain.matvec(v))
    cached_s = seconds(lambda: op.matvec(v))
    print(
        f"model: {n} parameters, probe 512 samples; gradient {grad_s * 1e3:.1f} ms; HVP {hvp_s * 1e3:.1f} ms "
        f"({hvp_s / grad_s:.2f} gradients); cached-graph HVP {cached_s * 1e3:.1f} ms "
        f"({cached_s / grad_s:.2f} gradients)"
    )

    t = time.perf_counter()
    dense = dense_hessian(model, loss_fn, batches)
    exact = torch.linalg.eigvalsh(dense).flip(0)
    print(f"dense reference: torch.func.hessian + eigvalsh in {time.perf_counter() - t:.1f} s")

    print(f"{'k':>5} {'solver':>10} {'HVPs':>6} {'seconds':>8} {'max rel err':>12}")
    for k in (20, 100, 200):
        op.num_products = 0
        t = time.perf_counter()
        res = lanczos(op.matvec, n, k)
        ours = (
            time.perf_counter() - t,
            op.num_products,
            float(((res.eigenvalues - exact[:k]).abs() / exact[:k].abs()).max()),
        )
        op.num_products = 0
        t = time.perf_counter()
        lin = sla.LinearOperator(
            (n, n), matvec=lambda v: op.matvec(torch.from_numpy(np.asarray(v).ravel())).numpy(), dtype=np.float64
        )
        v0 = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
        vals = np.sort(sla.eigsh(lin, k=k, which="LA", tol=1e-6, v0=v0, return_eigenvectors=False))[::-1].copy()
        arpack = (
            time.perf_counter() - t,
            op.num_products,
            float((np.abs(vals - exact[:k].numpy()) / np.abs(exact[:k].numpy())).max()),
        )
        print(f"{k:>5} {'lanczos':>10} {ours[1]:>6} {ours[0]:>8.2f} {ours[2]:>12.2e}")
        print(
            f"{k:>5} {'arpack':>10} {arpack[1]:>6} {arpack[0]:>8.2f} {arpack[2]:>12.2e}   "
            f"HVP ratio ours/arpack = {ours[1] / arpack[1]:.2f}"
        )

    op.num_products = 0
    t = time.perf_counter()
    quad = stochastic_lanczos_quadrature(op.matvec, n, num_probes=4, num_steps=64)
    slq_s = time.perf_counter() - t
    errs = [abs(quad.moment(p) - float((exact**p).mean())) / float((exact**p).mean()) for p in (1, 2)]
    print(
        f"SLQ 4x64: {op.num_products} HVPs, {slq_s:.2f} s, rel. error of tr(H)/n {errs[0]:.2e}, tr(H^2)/n {errs[1]:.2e}"
    )
    op.num_products = 0
    t = time.perf_counter()
    est = hutchinson_trace(op.matvec, n, num_samples=64)
    tr = float(exact.sum())
    print(
        f"Hutchinson 64: {op.num_products} HVPs, {time.perf_counter() - t:.2f} s, trace {est.value:.4f} +- "
        f"{est.stderr:.4f} vs exact {tr:.4f} ({abs(est.value - tr) / est.stderr:.2f} stderr)"
    )


if __name__ == "__main__":
    main()
