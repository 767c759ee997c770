"""Solver benchmark: block thick-restart Lanczos vs the previous single-vector solver at P ~ 1e6.

Operator: matrix-free ``A = U diag(lam) Uᵀ + D`` in float32 with ``U`` of shape ``(P, r)`` (random, scaled to be near
orthonormal), a power-law ``lam_i = 10 i^-1.2`` and a small diagonal ``D`` (a Hessian-like top plus a bulk). The rank
``r`` sets the product cost (2 GEMMs of ``P x r``), so one can emulate the seconds per HVP of a real model. Reports,
side by side in one run: products, seconds, seconds per product of the product alone (measured per column in the same
block shape the solver uses), the ratio probe_seconds / (products x s/product) and peak RSS growth of the process.

Run: python benchmarks/bench_solver.py [--n 1000000] [--rank 256] [--k 20 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from lightning_hessian.lanczos import _single_vector_lanczos, lanczos


def make_operator(n: int, rank: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, rank, generator=gen) / n**0.5
    lam = 10.0 * torch.arange(1, rank + 1, dtype=torch.float32) ** -1.2
    diag = 1e-3 * torch.rand(n, generator=gen)

    def matmat(x: torch.Tensor) -> torch.Tensor:
        return u @ (lam[:, None] * (u.T @ x)) + diag[:, None] * x

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return matmat(v[:, None])[:, 0]

    return matvec, matmat


def per_product(fn, n: int, cols: int, repeat: int = 5) -> float:
    x = torch.randn(n, cols) if cols > 1 else torch.randn(n)
    fn(x)
    t = time.perf_counter()
    for _ in range(repeat):
        fn(x)
    return (time.perf_counter() - t) / repeat / cols


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--skip-old-above", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matvec, matmat = make_operator(args.n, args.rank)
    print(f"P = {args.n}, rank {args.rank}, float32, {args.threads} thread(s), tol {args.tol}\n")
    print("| k | solver | block | products | restarts | seconds | s/product | ratio | converged |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k in args.k:
        runs = [("old single-vector", 1)] if k <= args.skip_old_above else []
        runs += [("block", b) for b in args.blocks]
        for name, b in runs:
            if name.startswith("old"):
                s_prod = per_product(matvec, args.n, 1)
                t = time.perf_counter()
                res = _single_vector_lanczos(matvec, args.n, k, tol=args.tol, dtype=torch.float32)
                restarts = "-"
            else:
                s_prod = per_product(matmat, args.n, b) if b > 1 else per_product(matvec, args.n, 1)
                t = time.perf_counter()
                res = lanczos(
                    matvec, args.n, k, matmat=matmat if b > 1 else None, block_size=b, tol=args.tol, dtype=torch.float32
                )
                restarts = res.num_restarts
            sec = time.perf_counter() - t
            ratio = sec / (res.num_matvecs * s_prod)
            print(
                f"| {k} | {name} | {b} | {res.num_matvecs} | {restarts} | {sec:.2f} | {s_prod * 1e3:.2f} ms | "
                f"{ratio:.2f} | {res.converged} |",
                flush=True,
            )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS of the whole run: {rss:.2f} GiB")


if __name__ == "__main__":
    main()
