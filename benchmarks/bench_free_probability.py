"""Jacobian free-probability density: our certified lilypads vs FreeNN's official lilypads (pure Python and Cython).

Setting (FreeNN's own benchmark, on square layers so that the exact density is known): depth L = 20, square linear
layers, sigma^2 = 1, 1000 grid points on [-1, 6], y = 1e-4. The law of J^T J is then Fuss-Catalan with parameter
s = L + 1, whose density has the closed parametrisation (phi in (0, pi/s))

    x(phi) = sin(s phi)^s / (sin(phi) sin((s-1) phi)^(s-1)),   rho = sin(s phi) sin(phi) / (pi x sin((s-1) phi)).

Errors:
* "solver error": |rho_y computed - rho_y exact| at the same z = x + iy, the exact M(z) being the root polished to 40
  digits with mpmath from our certified value (the lilypad certifies that this is the only root nearby);
* "vs exact density": our y -> 0 read-out on the adaptive grid against the closed form, over the whole support,
  including the region x < 0.02 that FreeNN skips.

FreeNN is imported from $FREENN_PATH (default /tmp/freenn): a checkout of github.com/redachhaibi/FreeNN, with
``freenn/core/adaptative_cython*.so`` built (``python -m cython -3 freenn/core/adaptative_cython.pyx`` then gcc) for
the Cython column. Without it only our column is printed.

Run: ``python benchmarks/bench_free_probability.py``
"""

from __future__ import annotations

import os
import sys
import time
import types

import mpmath
import numpy as np
from scipy.optimize import brentq

from lightning_hessian.free_probability import JacobianLaw

DEPTH, POINTS, Y = 20, 1000, 1e-4
REPEAT = 5


def fuss_catalan_density(x: np.ndarray, depth: int) -> np.ndarray:
    s = depth + 1

    def log_x(phi: float) -> float:
        return s * np.log(np.sin(s * phi)) - np.log(np.sin(phi)) - (s - 1) * np.log(np.sin((s - 1) * phi))

    out = np.empty(x.size)
    for i, xv in enumerate(x):
        phi = brentq(lambda p, xv=xv: log_x(p) - np.log(xv), 1e-300, np.pi / s * (1 - 1e-15), xtol=1e-300, rtol=1e-15)
        out[i] = np.sin(s * phi) * np.sin(phi) / (np.pi * xv * np.sin((s - 1) * phi))
    return out


def polished_density(x: np.ndarray, y: float, m: np.ndarray, depth: int) -> np.ndarray:
    mpmath.mp.dps = 40
    out = np.empty(x.size)
    for i in range(x.size):
        z = mpmath.mpc(x[i], y)
        w = mpmath.mpc(m[i].real, m[i].imag)
        for _ in range(60):
            f = (1 + w) ** (depth + 1) - z * w
            fp = (depth + 1) * (1 + w) ** depth - z
            step = f / fp
            w -= step
            if abs(step) < mpmath.mpf(10) ** -35:
                break
        out[i] = float(-mpmath.im((w + 1) / z) / mpmath.pi)
    return out


def best_time(fn, repeat: int = REPEAT) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def load_freenn():
    path = os.environ.get("FREENN_PATH", "/tmp/freenn")
    if not os.path.isdir(os.path.join(path, "freenn")):
        return None, None
    sys.path.insert(0, path)
    if "click" not in sys.modules:  # FreeNN's experiment scripts import click only for their CLI
        stub = types.ModuleType("click")
        stub.command = lambda *a, **k: lambda f: f
        stub.option = lambda *a, **k: lambda f: f
        sys.modules["click"] = stub
    if "cython" not in sys.modules:  # the Cython driver imports the pure-Python shim `cython` without using it
        sys.modules["cython"] = types.ModuleType("cython")
    import experiments.newton_lilypads as pure

    try:
        import experiments.newton_lilypads_cython as cython_version
    except ImportError:
        cython_version = None
    return pure, cython_version


def main() -> None:
    law = JacobianLaw([1000] * (DEPTH + 1), 1.0, "linear")
    grid = np.linspace(-1.0, 6.0, POINTS)
    edge = (DEPTH + 1) ** (DEPTH + 1) / DEPTH**DEPTH
    print(f"setting: depth {DEPTH}, square linear, sigma^2 = 1, {POINTS} points on [-1, 6], y = {Y:g}")
    print(f"exact law: Fuss-Catalan, support [0, {edge:.4f}], mass below 0.02 = {law.cdf(0.02):.4f}")

    t_ours, res = best_time(lambda: law.solve(grid + 1j * Y))
    t_cont, _ = best_time(lambda: law.solve(grid + 1j * Y, continuation=True))
    ours = -(((res.m + 1.0 - law.atom_at_zero) / res.z).imag) / np.pi
    ref = polished_density(grid, Y, res.m, DEPTH)
    err_ours = np.max(np.abs(ours - ref))
    print("\n== density at x + iy on FreeNN's grid ==")
    print(f"{'method':34s} {'seconds':>9s} {'speed-up':>9s} {'points':>7s} {'max |err| (same y)':>19s}")
    rows = [("ours, certified (default)", t_ours, int(res.certified.sum()), err_ours)]
    rows.append(("ours, certified, grid continuation", t_cont, int(res.certified.sum()), err_ours))

    pure, cython_version = load_freenn()
    for name, mod in (("FreeNN lilypads, pure Python", pure), ("FreeNN lilypads, Cython", cython_version)):
        if mod is None:
            print(f"({name}: not available)")
            continue

        def run(mod=mod):
            return mod.run_as_module(
                [1.0] * DEPTH,
                [1.0] * DEPTH,
                imaginary_parts=[Y],
                interval=(-1.0, 6.0),
                N=POINTS,
                ignoreNonLinearity=True,
            )

        t, out = best_time(run, repeat=3)
        dens = np.asarray(out["density"])
        # FreeNN sweeps i < searchsorted(-0.02) and i > searchsorted(0.02); the points between keep their initial value
        idx = np.arange(POINTS)
        computed = (idx < np.searchsorted(grid, -0.02)) | (idx > np.searchsorted(grid, 0.02))
        err = np.max(np.abs(dens[computed] - ref[computed]))
        rows.append((name, t, int(computed.sum()), err))
    base = rows[0][1]
    for name, t, n, err in rows:
        print(f"{name:34s} {t:9.4f} {t / base:8.1f}x {n:7d} {err:19.2e}")
    print("(speed-up column: time of the row / time of our default; > 1 means we are faster)")

    print("\n== ours, y -> 0 read-out on the adaptive grid vs the exact Fuss-Catalan density ==")
    t_spec, spec = best_time(lambda: law.spectrum(1000))
    inner = spec.x < edge * (1 - 1e-9)  # the right edge itself has density 0
    exact = fuss_catalan_density(spec.x[inner], DEPTH)
    rel = np.abs(spec.density[inner] - exact) / exact
    print(f"{len(spec.x)} points from x = {spec.x[0]:.3g} to {spec.x[-1]:.4f} in {t_spec:.4f} s")
    print(
        f"max relative error {rel.max():.2e} (median {np.median(rel):.1e}); points below x = 0.02: "
        f"{int(np.sum(spec.x < 0.02))}, certified: {int(np.sum(np.isfinite(spec.density)))}/{spec.x.size}"
    )
    t_q, q = best_time(lambda: law.quantiles(np.linspace(0.1, 0.9, 9)))
    print(f"deciles of the non-zero part ({t_q:.3f} s): " + ", ".join(f"{v:.3g}" for v in q))
    try:
        law.density(np.array([1.0]), y=0.0)
    except ValueError as err:
        print(f"y = 0 -> ValueError: {err}")


if __name__ == "__main__":
    main()
