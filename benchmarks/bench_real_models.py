"""HVP cost on real-model shapes: each exact strategy and block products as a ratio to one gradient evaluation.

Models (float32, eval mode, seeded random data; nothing is downloaded):

* ``mlp``: digits-sized MLP 64-32-32-10 (tanh), probe set 1024 samples in 2 batches;
* ``resnet``: :class:`~lightning_hessian.demos.ResNetCNN` ``width=64`` (about 1.2 M parameters, BatchNorm with
  non-trivial running statistics), probe set 2 x 32 CIFAR-shaped images;
* ``transformer``: :class:`~lightning_hessian.demos.TransformerLM` (``nn.TransformerEncoderLayer``), 2 layers,
  ``d_model=128``, 2 x 16 sequences of 64 tokens.

For each model, in one process and side by side: seconds of one probe gradient (``op.gradient()``, the unit),
seconds per product of each strategy (``cached``, ``double_backward``, ``forward_over_reverse``), per product inside
a block of 8 (``op.matmat``), the strategy ``cache_graph="auto"`` chooses, and the peak RSS. Each of ``--repeats``
rounds (default 5, after a warm-up) times the gradient and then every product once; a ratio is the median over rounds
of product seconds / that round's gradient seconds (this shared machine drifts by 10% between runs).

Solver rows (:func:`solver_rows`, ``--solver mlp1m``: probe seconds / (HVPs x s/HVP) for top-20 and top-200 per
block size, and the previous single-vector solver) and the fit overhead of the default schedule
(:func:`fit_overhead_rows`: measured step and HVP seconds, extrapolated to 100 epochs of 50,000 samples).

Run: ``python benchmarks/bench_real_models.py [--quick] [--threads N] [--models mlp,resnet,transformer]
[--solver mlp1m]``
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_hessian import HessianSpectrum, demos, lanczos
from lightning_hessian.callback.runner import HVP_GRADIENTS
from lightning_hessian.callback.schedule import plan_init_probe
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
    """Gradient seconds and each strategy's single and block-of-8 product, as ratios measured round by round.

    Every round times the gradient and then each product once (ops under 20 ms repeated to 20 ms), so a ratio
    compares timings taken seconds apart (this shared machine drifts by 10% between runs); the row holds the median
    gradient seconds and, per product, the median over rounds of its ratio to that round's gradient (``*_ratio``)
    and its median seconds (``*_s``).
    """
    model, loss_fn, batches = MODELS[name](quick)
    auto = HessianOperator(model, loss_fn, batches)
    row: dict[str, Any] = {"model": name, "params": auto.num_params, "auto": auto.strategy}
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(auto.num_params, generator=gen)
    block = torch.randn(auto.num_params, BLOCK, generator=gen)
    # the unit: a fresh forward + backward of every probe batch (not the cached operator's stored gradient)
    plain = HessianOperator(model, loss_fn, batches, cache_graph=False)
    ops = {s: HessianOperator(model, loss_fn, batches, strategy=s) for s in STRATEGIES}
    runs: dict[str, Callable[[], Any]] = {"grad": plain.gradient}
    for strategy, op in ops.items():
        runs[f"{strategy}"] = lambda op=op: op.matvec(v)
        runs[f"{strategy}_block"] = lambda op=op: op.matmat(block)
    calls = {}
    for key, fn in runs.items():
        fn()  # warm-up (builds the cached graphs), then calls per round for at least 20 ms (a millisecond op's
        start = time.perf_counter()  # timing is otherwise its caches' state after the previous op)
        fn()
        calls[key] = max(1, round(0.02 / (time.perf_counter() - start)))
    seconds: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(max(1, repeats)):
        for key, fn in runs.items():
            start = time.perf_counter()
            for _call in range(calls[key]):
                fn()
            per = calls[key] * (BLOCK if key.endswith("_block") else 1)
            seconds[key].append((time.perf_counter() - start) / per)
    row["grad_s"] = statistics.median(seconds["grad"])
    for key in runs:
        if key != "grad":
            row[f"{key}_s"] = statistics.median(seconds[key])
            row[f"{key}_ratio"] = statistics.median(s / g for s, g in zip(seconds[key], seconds["grad"]))
    del ops
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
    name: str,
    quick: bool,
    ks: tuple[int, ...] = (20, 200),
    blocks: tuple[int, ...] = (1, 4, 8),
    tol: float = 1e-4,
    single: bool = True,
    num_vectors: int | None = None,
) -> list[dict[str, Any]]:
    """Solver overhead on a real operator: probe seconds / (HVPs x s/HVP) of top-``k`` runs, per block size.

    For each block size ``b`` the unit is the measured seconds per product *of that kind* (``matvec`` for ``b = 1``,
    ``matmat`` of ``b`` columns divided by ``b`` otherwise), timed in the same process just before the run; a ratio
    of 1.0 means the solver costs nothing beyond its products. ``in_run_ratio`` divides instead by the seconds the
    run itself spent inside its products (immune to the machine's drift between the unit and the run). With
    ``single``, the previous single-vector solver (``_single_vector_lanczos``, matvec) runs too, for the HVP counts
    (top-20 only). ``num_vectors`` overrides the basis size of the block runs. Returns one row per (k, solver).
    """
    from lightning_hessian.lanczos import _single_vector_lanczos

    model, loss_fn, batches = MODELS[name](quick)
    op = HessianOperator(model, loss_fn, batches)
    n = op.num_params
    gen = torch.Generator().manual_seed(1)
    probes = {b: torch.randn(n, b, generator=gen) for b in {1, *blocks}}  # drawn outside the timings
    unit = {1: timed(lambda: op.matvec(probes[1][:, 0]), 3)}
    for b in blocks:
        if b > 1:
            unit[b] = timed(lambda b=b: op.matmat(probes[b]), 2) / b
    in_products = [0.0]  # seconds spent inside the products of the current run

    def timed_op(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def call(x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            out = fn(x)
            in_products[0] += time.perf_counter() - start
            return out

        return call

    matvec, matmat = timed_op(op.matvec), timed_op(op.matmat)
    rows = []
    for k in ks:
        runs = [("single", 1)] if k <= 20 and single else []
        runs += [("block", b) for b in blocks]
        for solver, b in runs:
            in_products[0] = 0.0
            start = time.perf_counter()
            if solver == "single":
                result = _single_vector_lanczos(matvec, n, k, tol=tol, dtype=torch.float32, max_matvecs=4000)
            else:
                result = lanczos(
                    matvec, n, k, tol=tol, dtype=torch.float32, max_matvecs=4000,
                    matmat=matmat if b > 1 else None, block_size=b, num_vectors=num_vectors,
                )  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "model": name, "params": n, "k": k, "solver": solver, "block": b, "hvps": result.num_matvecs,
                    "seconds": seconds, "s_per_hvp": unit[b], "ratio": seconds / (result.num_matvecs * unit[b]),
                    "in_run_ratio": seconds / in_products[0], "restarts": result.num_restarts,
                    "converged": result.converged, "rss_mib": peak_rss_mib(),
                }
            )  # fmt: skip
            print_solver_rows(rows[-1:], header=len(rows) == 1)  # one row as soon as it is measured
    return rows


def print_solver_rows(rows: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print(
            "\n| model | params | k | solver | block | HVPs | restarts | seconds | s/HVP (that kind) | ratio | "
            "ratio to in-run products | converged | RSS MiB"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['k']} | {r['solver']} | {r['block']} | {r['hvps']} | "
            f"{r['restarts']} | {r['seconds']:.2f} | {r['s_per_hvp']:.4f} | {r['ratio']:.2f} | "
            f"{r['in_run_ratio']:.2f} | {r['converged']} | {r['rss_mib']:.0f} |"
        )


def simulate_schedule(
    epoch_s: float,
    cheap_s: float,
    full_s: float,
    epochs: int,
    max_overhead: float | None,
    full_every: int = 10,
    init_kind: str | None = "full",
) -> dict[str, float]:
    """Replay the default schedule (:class:`~lightning_hessian.callback.schedule.ProbeSchedule`) on measured costs.

    The probe at initialisation (of kind ``init_kind``, which the callback's guard chooses from its estimates; see
    :func:`fit_overhead_rows`) is the first full probe of the schedule; then one probe per epoch, every
    ``full_every``-th probe full, and the overhead guard skips a probe (never the first epoch probe) while the probes'
    cumulative time exceeds ``max_overhead`` times the training time so far.
    """
    from lightning_hessian.callback.schedule import ProbeSchedule

    schedule = ProbeSchedule(1, full_every, max_overhead)
    schedule.commit_init({"full": full_s, "cheap": cheap_s, None: 0.0}[init_kind])
    counts = {"full": 0, "cheap": 0, None: 0}
    counts[init_kind] += 1
    for _ in range(epochs):
        schedule.train_seconds += epoch_s
        kind = schedule.plan(fitting=True)
        schedule.commit(kind, {"full": full_s, "cheap": cheap_s, None: 0.0}[kind])
        counts[kind] += 1
    train_s = epochs * epoch_s
    return {
        "share": schedule.probe_seconds / (schedule.probe_seconds + train_s),
        "full": counts["full"],
        "cheap": counts["cheap"],
        "skipped": counts[None],
        "init": init_kind,
    }


def fit_overhead_rows(
    width: int = 16,
    probe_samples: int = 512,
    epoch_samples: int = 50_000,
    epochs: tuple[int, ...] = (100, 200),
    batch: int = 32,
    cheap_hvps: int = 60,
    full_hvps: int = 1036,
    repeats: int = 3,
) -> list[dict[str, float]]:
    """Fit overhead of the default schedule on a ResNet-style CNN: MEASURED step and HVP seconds, EXTRAPOLATED fit.

    Measured here (one process, side by side): seconds of one SGD step on ``batch`` CIFAR-shaped images
    (:class:`~lightning_hessian.demos.ResNetCNN`, BatchNorm, train mode) and seconds per HVP on the default probe set
    (``probe_samples`` images, ``cache_graph="auto"``). Extrapolated: fits of ``epochs`` epochs of ``epoch_samples``
    samples replayed through the real schedule (:func:`simulate_schedule`) at ``cheap_hvps`` / ``full_hvps`` HVPs per
    cheap / full probe (the medians of ``bench_callback_overhead.py --epochs 10``, the digits example: cheap probes
    59-86 HVPs, top-8 Lanczos with its check and 24 trace samples; full probes 947-1,217, top-200 with its check,
    256 SLQ products and 24 trace samples), without (``max_overhead=None``) and with the default guard (0.2). Under
    the guard the probe at initialisation is planned as the callback plans it (:meth:`ProbeRunner.init_kind`), from a
    timed gradient of the probe set (a fresh operator: no cached graph) and the estimated fit.
    """  # fmt: skip
    torch.manual_seed(0)
    model = demos.ResNetCNN(width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    (x, y), *_ = demos.image_batches(1, batch, seed=1)

    def step() -> None:
        opt.zero_grad()
        ce_loss(model, (x, y)).backward()
        opt.step()

    model.train()
    step_s = timed(step, repeats)
    probe = demos.image_batches(max(1, probe_samples // batch), batch, seed=2)
    op = HessianOperator(model, ce_loss, probe)
    v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0))
    hvp_s = timed(lambda: op.matvec(v), repeats)
    grad_s = timed(HessianOperator(model, ce_loss, probe, cache_graph=False).gradient, repeats)  # no cached graph
    epoch_s = epoch_samples / batch * step_s
    cheap_s, full_s = cheap_hvps * hvp_s, full_hvps * hvp_s
    # the callback's own estimates for the probe at initialisation (ProbeRunner.init_kind): one timed gradient
    estimate = HessianSpectrum()._runner.estimated_hvps
    est_full, est_cheap = (HVP_GRADIENTS * grad_s * estimate(full, op.num_params) for full in (True, False))
    rows = []
    for n in epochs:
        est_fit = grad_s * batch / probe_samples * (epoch_samples / batch * n)
        for guard in (None, 0.2):
            init = "full" if guard is None else plan_init_probe(est_full, est_cheap, est_fit, guard)
            sim = simulate_schedule(epoch_s, cheap_s, full_s, n, guard, init_kind=init)
            rows.append(
                {
                    "params": op.num_params, "strategy": op.strategy, "step_s": step_s, "hvp_s": hvp_s,
                    "grad_s": grad_s, "epoch_s": epoch_s, "cheap_s": cheap_s, "full_s": full_s, "epochs": n,
                    "guard": guard, **sim,
                }
            )  # fmt: skip
    return rows


_RSS_CHILD = """
import resource, sys, torch
from torch import nn
from lightning_hessian import lanczos
from lightning_hessian.operators import HessianOperator
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3072, 896), nn.Tanh(), nn.Linear(896, 128), nn.Tanh(), nn.Linear(128, 10))
x, y = torch.randn(256, 3072), torch.randint(0, 10, (256,))
loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
op = HessianOperator(model, loss, [(x[:128], y[:128]), (x[128:], y[128:])])
budget = None if sys.argv[1] == "default" else int(float(sys.argv[1]))
r = lanczos(op.matvec, op.num_params, 200, tol=1e-4, dtype=torch.float32, max_matvecs=int(sys.argv[2]),
            return_eigenvectors=True, max_basis_bytes=budget)
try:  # VmHWM: this process's own peak (ru_maxrss keeps the parent's at fork across exec on Linux)
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(op.num_params, r.basis_bytes, peak)
"""


def peak_rss_top200(budgets: tuple[str, ...] = ("default", "2.6e9"), products: int = 300) -> list[tuple[str, ...]]:
    """Peak RSS (``VmHWM`` of a fresh subprocess) of a top-200 solve on a ~2.9M-parameter MLP.

    The run is truncated after ``products`` HVPs (several restarts): the basis is allocated (and zero-filled) at the
    start, and glibc's heap keeps some freed product temporaries, which adds about 0.1 GiB over the first products
    (the complete run of 2,035 products peaked 0.01 GiB above 300). Returns
    ``(budget, params, basis bytes, peak RSS bytes)`` per ``max_basis_bytes``.
    """
    import subprocess
    import sys

    out = []
    for budget in budgets:
        res = subprocess.run(
            [sys.executable, "-c", _RSS_CHILD, budget, str(products)], capture_output=True, text=True, check=True
        )
        out.append((budget, *res.stdout.split()))
    return out


def print_fit_overhead(rows: list[dict[str, float]], width: int = 16) -> None:
    r = rows[0]
    print(
        f"\nfit overhead, ResNetCNN(width={width}) {r['params']:,} params, HVP strategy {r['strategy']}: MEASURED step "
        f"{r['step_s']:.4f} s (32 images), HVP {r['hvp_s']:.3f} s (512 probe images) = {r['hvp_s'] / r['step_s']:.0f} "
        f"steps, probe-set gradient {r['grad_s']:.3f} s (the callback's estimate for the probe at init); "
        f"EXTRAPOLATED (50,000 samples per epoch): epoch {r['epoch_s']:.0f} s, "
        f"cheap probe {r['cheap_s']:.0f} s, full probe {r['full_s']:.0f} s"
    )
    print("\n| epochs | max_overhead | probe at init | probe share of the fit | full probes | cheap probes | skipped |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['epochs']} | {r['guard']} | {r['init']} | {r['share']:.1%} | {r['full']} | {r['cheap']} | "
            f"{r['skipped']} |"
        )


def library_rows(names: tuple[str, ...] = ("mlp", "mlp1m"), k: int = 20, tol: float = 1e-4) -> list[dict[str, Any]]:
    """Top-``k`` side by side with PyHessian's ``eigenvalues`` and curvlinops + SciPy ``eigsh``, where installed.

    Same model, loss and probe batches for all three (PyHessian sees them as one batch, the same mean loss); float32;
    products counted by wrapping each library's HVP. The error is the largest error of the top-``k`` values (sorted
    descending) relative to the largest, against the dense float64 Hessian for the small MLP and against our own
    float64 solve at ``tol=1e-8`` for the 1M-parameter one. PyHessian runs power iteration with deflation (its
    ``tol=1e-3`` on consecutive Rayleigh quotients, ``maxIter=100`` per eigenvalue); ``eigsh`` gets ``tol``.
    """
    rows = []
    for name in names:
        rows += _library_rows_of(name, k, tol)
        print_library_rows(rows[-3:], header=len(rows) <= 3)
    return rows


def _library_rows_of(name: str, k: int, tol: float) -> list[dict[str, Any]]:
    import numpy as np

    model, loss_fn, batches = MODELS[name](False)
    op = HessianOperator(model, loss_fn, batches)
    n = op.num_params
    if n <= 5000:
        dense_op = HessianOperator(copy.deepcopy(model).double(), loss_fn, [(x.double(), y) for x, y in batches])
        reference, against = torch.linalg.eigvalsh(dense_op.dense()).flip(0)[:k], "dense float64"
    else:
        reference = lanczos(op.matvec, n, k, tol=1e-8, dtype=torch.float64, max_matvecs=6000).eigenvalues
        against = "ours at tol 1e-8 (float64 basis)"

    def row(library: str, hvps: int, seconds: float, values: Any) -> dict[str, Any]:
        got = torch.sort(torch.as_tensor(np.asarray(values, dtype=np.float64)), descending=True).values[:k]
        error = float(((got - reference) / reference.abs().max()).abs().max())
        return {"library": library, "model": name, "params": n, "hvps": hvps, "seconds": seconds, "error": error,
                "against": against}  # fmt: skip

    start = time.perf_counter()
    ours = lanczos(op.matvec, n, k, tol=tol, dtype=torch.float32)
    rows = [row("lightning-hessian", ours.num_matvecs, time.perf_counter() - start, ours.eigenvalues)]
    counted = [0]

    def counting(fn: Callable) -> Callable:
        def call(*args: Any) -> Any:
            counted[0] += 1
            return fn(*args)

        return call

    try:
        import pyhessian  # noqa: F401  (the package rebinds the name pyhessian.hessian to its class)
    except ImportError:
        pass
    else:
        module = sys.modules["pyhessian.hessian"]
        product = module.hessian_vector_product
        module.hessian_vector_product = counting(product)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        torch.manual_seed(0)
        start = time.perf_counter()
        values, _ = module.hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues(top_n=k)
        rows.append(row("PyHessian 0.1 `eigenvalues`", counted[0], time.perf_counter() - start, values))
        module.hessian_vector_product = product
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError:
        pass
    else:
        counted[0] = 0
        start = time.perf_counter()
        params = [p for p in model.parameters() if p.requires_grad]
        scipy_op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches).to_scipy()
        wrapped = LinearOperator(scipy_op.shape, matvec=counting(scipy_op.matvec), dtype=np.float32)
        v0 = np.ones(n, dtype=np.float32)
        values = eigsh(wrapped, k=k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        rows.append(row("curvlinops 3 + SciPy `eigsh`", counted[0], time.perf_counter() - start, values))
    return rows


def print_library_rows(rows: list[dict[str, Any]], header: bool = True) -> None:
    if header:
        print("\n| library | model | params | HVPs | seconds | s/HVP | max rel. error of the top-k | against |")
        print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['library']} | {r['model']} | {r['params']:,} | {r['hvps']} | {r['seconds']:.2f} | "
            f"{r['seconds'] / max(1, r['hvps']):.4f} | {r['error']:.1e} | {r['against']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the product timings")
    parser.add_argument("--models", default="mlp,resnet,transformer")
    parser.add_argument("--solver", default="", help="models for the solver rows, e.g. mlp1m,resnet (slow)")
    parser.add_argument("--blocks", default="1,4,8", help="block sizes of the solver rows")
    parser.add_argument("--ks", default="20,200", help="k of the solver rows")
    parser.add_argument(
        "--num-vectors", type=int, default=None, help="basis size of the solver rows (default: the solver's)"
    )
    parser.add_argument("--no-single", action="store_true", help="skip the previous single-vector solver's row")
    parser.add_argument("--skip-products", action="store_true", help="only the solver rows")
    parser.add_argument("--libraries", action="store_true", help="only the PyHessian / curvlinops comparison")
    args = parser.parse_args()
    ks = tuple(int(k) for k in args.ks.split(","))
    blocks = tuple(int(b) for b in args.blocks.split(","))
    torch.set_num_threads(args.threads)
    if args.libraries:
        library_rows()
        return
    if args.skip_products:
        for name in filter(None, args.solver.split(",")):
            solver_rows(name, args.quick, ks=ks, blocks=blocks, single=not args.no_single, num_vectors=args.num_vectors)
        return
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
        cells += [f"{r[f'{s}_s']:.4f} ({r[f'{s}_ratio']:.2f})" for s in STRATEGIES]
        cells += [f"{r[f'{s}_block_s']:.4f} ({r[f'{s}_block_ratio']:.2f})" for s in STRATEGIES]
        cells += [r["auto"], f"{r['rss_mib']:.0f}"]
        print("| " + " | ".join(cells) + " |")
    for name in filter(None, args.solver.split(",")):
        solver_rows(name, args.quick, ks=ks, blocks=blocks, single=not args.no_single, num_vectors=args.num_vectors)
    print_fit_overhead(fit_overhead_rows(width=8 if args.quick else 16), 8 if args.quick else 16)
    if not args.quick:
        print("\n| top-200, max_basis_bytes | params | basis bytes | peak RSS (truncated run) |\n|---|---|---|---|")
        for budget, params, basis, rss in peak_rss_top200():
            print(f"| {budget} | {int(params):,} | {int(basis) / 2**30:.2f} GiB | {int(rss) / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
