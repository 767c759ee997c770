r"""Matrix-free spectral solvers for a symmetric operator given by its matrix-vector product.

* :func:`lanczos`: extreme eigenpairs by thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation,
  stopping on the Ritz residual norms :math:`\|A x_i - \theta_i x_i\| = |\beta_m s_{m,i}|`.
* :func:`stochastic_lanczos_quadrature`: spectral density by stochastic Lanczos quadrature
  (Golub & Meurant 2010; Ghorbani, Krishnan & Xiao, ICML 2019; Papyan 2020).
* :func:`hutchinson_trace`: trace by Hutchinson's estimator with Rademacher probes (Hutchinson 1989).

All random vectors come from a ``torch.Generator`` seeded by the caller and drawn on the CPU, so that every DDP rank
(and every device) builds the same vectors without communication. No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_hessian.block_lanczos import EigenResult, MatMat, block_lanczos, random_block
from lightning_hessian.memory import BasisMemoryError

MatVec = Callable[[Tensor], Tensor]

__all__ = [
    "BasisMemoryError",
    "EigenResult",
    "MatMat",
    "MatVec",
    "SpectralQuadrature",
    "TraceEstimate",
    "hutchinson_trace",
    "lanczos",
    "stochastic_lanczos_quadrature",
]


def _random_vector(n: int, seed: int, dtype: torch.dtype, device: torch.device | str | None, kind: str) -> Tensor:
    """Seeded random vector drawn on the CPU (identical on every rank and device): one column of ``random_block``."""
    return random_block(n, 1, seed, dtype, device, kind)[:, 0]


def _orthogonalise(w: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """Classical Gram-Schmidt of ``w`` against the rows of ``basis``, repeated once when cancellation was severe.

    The second pass runs only when the first removed more than ``1 - 1/sqrt(2)`` of the norm (the Kahan-Parlett
    "twice is enough" criterion), which keeps the basis orthonormal to working precision at about half the cost.
    """
    if basis.shape[0] == 0:
        return w, w.new_zeros(0)
    before = torch.linalg.vector_norm(w)
    coeffs = basis @ w
    w = w - basis.T @ coeffs
    if torch.linalg.vector_norm(w) < 0.7071067811865476 * before:
        again = basis @ w
        w = w - basis.T @ again
        coeffs = coeffs + again
    return w, coeffs


class _Krylov:
    """Orthonormal Krylov basis ``V`` (rows) with the projected matrix ``T = V A Vᵀ``, extendable and restartable."""

    def __init__(
        self, matvec: MatVec, n: int, size: int, dtype: torch.dtype, device, seed: int, refill: bool = True
    ) -> None:
        self.matvec, self.n, self.size, self.seed, self.refill = matvec, n, size, seed, refill
        self.basis = torch.zeros(size + 1, n, dtype=dtype, device=device)
        self.projected = torch.zeros(size + 1, size + 1, dtype=torch.float64)
        self.filled = 0  # rows of the basis whose product has been applied
        self.num_matvecs = 0
        self.exhausted = False  # the basis spans an invariant subspace and no new direction exists

    def start(self, vector: Tensor) -> None:
        norm = torch.linalg.vector_norm(vector)
        if not torch.isfinite(norm) or norm == 0:
            raise ValueError("the start vector must be finite and non-zero")
        self.basis[0] = vector / norm
        self.filled = 0

    def extend(self, budget: int) -> None:
        """Apply the operator to basis rows ``filled..size-1`` (at most ``budget`` products)."""
        i = self.filled
        while i < self.size and budget > 0 and not self.exhausted:
            w = self.matvec(self.basis[i]).to(self.basis.dtype).reshape(-1)
            if not torch.isfinite(w).all():
                raise FloatingPointError("the operator returned a non-finite product")
            self.num_matvecs += 1
            budget -= 1
            w, coeffs = _orthogonalise(w, self.basis[: i + 1])
            column = coeffs.to(torch.float64).cpu()
            self.projected[: i + 1, i] = column
            self.projected[i, : i + 1] = column
            beta = float(torch.linalg.vector_norm(w))
            scale = float(column.abs().max()) if column.numel() else 0.0
            if beta <= 1e-10 * max(scale, 1e-300) or beta == 0.0:
                beta = 0.0
                w = self._fresh_direction(i + 1)
            else:
                w = w / beta
            self.projected[i + 1, i] = self.projected[i, i + 1] = beta
            if w is not None:
                self.basis[i + 1] = w
            i += 1
        self.filled = i

    def _fresh_direction(self, rows: int) -> Tensor | None:
        """A new unit vector orthogonal to the first ``rows`` basis vectors after a breakdown (invariant subspace)."""
        if rows >= self.n or not self.refill:
            self.exhausted = True
            return None
        for _attempt in range(3):
            self.seed += 7919
            w = _random_vector(self.n, self.seed, self.basis.dtype, self.basis.device, "gaussian")
            w, _ = _orthogonalise(w, self.basis[:rows])
            norm = torch.linalg.vector_norm(w)
            if norm > 1e-8 * math.sqrt(self.n):
                return w / norm
        self.exhausted = True
        return None

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (descending), coefficient vectors and residual norms of the filled basis."""
        m = self.filled
        theta, coeffs = torch.linalg.eigh(self.projected[:m, :m])
        theta, coeffs = theta.flip(0), coeffs.flip(1)
        beta = 0.0 if self.exhausted else float(self.projected[m, m - 1])
        residuals = (beta * coeffs[m - 1, :]).abs()
        return theta, coeffs, residuals

    def restart(self, theta: Tensor, coeffs: Tensor, keep: int) -> None:
        """Thick restart: keep ``keep`` Ritz vectors plus the residual direction (Wu & Simon 2000)."""
        m = self.filled
        beta = float(self.projected[m, m - 1])
        kept = coeffs[:, :keep].to(device=self.basis.device, dtype=self.basis.dtype)
        residual = self.basis[m].clone()
        self.basis[:keep] = kept.T @ self.basis[:m]
        self.basis[keep] = residual
        self.basis[keep + 1 :] = 0
        self.projected.zero_()
        self.projected[:keep, :keep] = torch.diag(theta[:keep])
        arrow = beta * coeffs[m - 1, :keep]
        self.projected[keep, :keep] = arrow
        self.projected[:keep, keep] = arrow
        self.filled = keep


def lanczos(
    matvec: MatVec | None,
    n: int,
    k: int,
    *,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    num_vectors: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    start: Tensor | None = None,
    return_eigenvectors: bool = False,
    matmat: MatMat | None = None,
    block_size: int | None = None,
    max_basis_bytes: int | None = None,
    return_basis: bool = False,
    check_missed: bool = True,
) -> EigenResult:
    r"""Extreme eigenpairs of a symmetric operator by block thick-restart Lanczos (BLAS-3, bounded memory).

    Delegates to :func:`~lightning_hessian.block_lanczos.block_lanczos`: blocks of ``block_size`` vectors are
    multiplied at once (``matmat`` when given, else ``matvec`` columnwise) and orthogonalised with matrix-matrix
    products (local + global block classical Gram-Schmidt, a second global pass only on severe cancellation,
    Householder QR with an SVD of the small factor for rank deficiency and breakdown; a single vector is normalised
    by its float64-accumulated norm). A Ritz pair is converged when

    .. math::

        \|A x_i - \theta_i x_i\| = \|B s_i\| \le \mathrm{tol} \cdot \max_j |\theta_j|,

    with :math:`B` the coupling of the next block to the basis. Thick restarts (block Krylov-Schur; Wu & Simon 2000,
    Zhou & Saad 2008) rotate the basis in place; wanted pairs converged to ``1e-3 tol`` are locked there (their
    residual-sized coupling dropped, Stewart 2001), so later restarts rotate only the other rows. After convergence, a
    short run from a fresh random block orthogonal to the ``k`` Ritz vectors checks for missed copies of repeated
    eigenvalues (e.g. the I ⊗ A structure of multi-output regression) and resumes the iteration if it finds one.

    Memory: the basis holds ``rows = min(n, num_vectors + b)`` vectors of ``n`` entries, chosen to fit
    ``max_basis_bytes`` together with four work blocks (default: 25% of the available memory of ``device``, capped
    at 32 GiB). With ``return_eigenvectors`` the ``k`` returned vectors are the first rows of the basis (no copy).

    Args:
        matvec: ``v -> A v`` for a symmetric ``A`` of size ``n`` (may be ``None`` when ``matmat`` is given).
        n: Dimension of the operator.
        k: Number of eigenpairs wanted, ``1 <= k <= n``.
        which: ``"largest"`` (algebraic, returned descending) or ``"smallest"`` (returned ascending).
        tol: Relative residual tolerance, ``> 0``.
        max_matvecs: Budget of products (a block of ``b`` counts ``b``); default ``max(20 * num_vectors, 200)``.
        num_vectors: Krylov basis size before a restart; default ``k + max(20, 4 b, k // 8)``, reduced to fit the
            budget.
        seed: Seed of the start block (and of fresh directions after a breakdown).
        dtype: Dtype of the basis (``torch.float32`` or ``torch.float64``).
        device: Device of the basis (the operator's device).
        start: Optional ``(n,)`` start vector or ``(n, s)`` start block, e.g. a previous run's Ritz vectors (a warm
            start from the whole tracked subspace); padded with random columns to the block size.
        return_eigenvectors: Also return the ``(n, k)`` Ritz vectors.
        matmat: Optional block product ``X -> A X`` for ``X`` of shape ``(n, b)``.
        block_size: Block size ``b``; default ``min(k, 4)`` with ``matmat`` (else 1: a block of columnwise matvecs
            costs more products for the same accuracy), raised to the columns of ``start``.
        max_basis_bytes: Memory budget of the basis in bytes (see above).
        return_basis: Also return every Ritz pair of the final Rayleigh-Ritz projection
            (``EigenResult.basis_values`` / ``basis_vectors``, e.g. for a deflated trace at no product).
        check_missed: Run the missed-eigenvalue check after convergence (see above); ``False`` saves its products.

    Returns:
        An :class:`EigenResult`; ``converged`` is ``False`` when the budget ran out first (the values are then the
        best Ritz approximations, with their residual norms).

    Raises:
        ValueError: For ``k`` outside ``[1, n]``, an unknown ``which``, a non-positive ``tol``, budget or block size.
        BasisMemoryError: When not even ``k`` vectors and two blocks fit in ``max_basis_bytes``.
    """
    return block_lanczos(
        matvec,
        n,
        k,
        matmat=matmat,
        block_size=block_size,
        which=which,
        tol=tol,
        max_matvecs=max_matvecs,
        num_vectors=num_vectors,
        seed=seed,
        dtype=dtype,
        device=device,
        start=start,
        return_eigenvectors=return_eigenvectors,
        max_basis_bytes=max_basis_bytes,
        return_basis=return_basis,
        check_missed=check_missed,
    )


def _single_vector_lanczos(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    num_vectors: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    start: Tensor | None = None,
    return_eigenvectors: bool = False,
) -> EigenResult:
    r"""The previous single-vector solver: thick-restart Lanczos with full reorthogonalisation (kept for comparison).

    The Krylov basis :math:`V_m` is kept orthonormal to working precision (two Gram-Schmidt passes per step), so the
    projected matrix :math:`T_m = V_m^\top A V_m` and the residual estimate

    .. math::

        \|A V_m s_i - \theta_i V_m s_i\| = |\beta_m\, e_m^\top s_i|

    are reliable. When the basis is full, the ``k`` wanted Ritz vectors and half of the rest are kept and the
    iteration continues from the residual direction (thick restart, Wu & Simon 2000). A Ritz pair is converged when
    :math:`|\beta_m e_m^\top s_i| \le \mathrm{tol} \cdot \max_j |\theta_j|`; the eigenvalue error is then at most
    the residual, and about residual² / gap. An exact invariant subspace (breakdown) is left through a fresh seeded
    direction. A single Krylov space sees one vector per eigenspace, so copies of a repeated eigenvalue would be
    missed; after convergence a few steps of Lanczos on the deflated operator :math:`PAP`,
    :math:`P = I - X X^\top` (:math:`X` the Ritz vectors), check for an eigenvalue above :math:`\theta_k` and, if
    one exists, a run on :math:`PAP` recovers the missed copies (locking, up to 8 rounds).

    Args:
        matvec: ``v -> A v`` for a symmetric ``A`` of size ``n``.
        n: Dimension of the operator.
        k: Number of eigenpairs wanted, ``1 <= k <= n``.
        which: ``"largest"`` (algebraic, returned descending) or ``"smallest"`` (returned ascending).
        tol: Relative residual tolerance, ``> 0``.
        max_matvecs: Budget of products; default ``max(20 * num_vectors, 200)``.
        num_vectors: Krylov basis size before a restart; default ``min(n, max(2k + 1, k + 20))``.
        seed: Seed of the start vector (and of fresh directions after a breakdown).
        dtype: Dtype of the basis (``torch.float32`` or ``torch.float64``).
        device: Device of the basis (the operator's device).
        start: Optional start vector (e.g. a combination of a previous run's Ritz vectors: a warm start).
        return_eigenvectors: Also return the ``(n, k)`` Ritz vectors.

    Returns:
        An :class:`EigenResult`; ``converged`` is ``False`` when the budget ran out first (the values are then the
        best Ritz approximations, with their residual norms).

    Raises:
        ValueError: For ``k`` outside ``[1, n]``, an unknown ``which``, a non-positive ``tol`` or budget.
    """
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got k = {k}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    size = min(n, num_vectors if num_vectors is not None else max(2 * k + 1, k + 20))
    size = max(size, min(n, k + 1))
    budget = max_matvecs if max_matvecs is not None else max(20 * size, 200)
    if budget < 1:
        raise ValueError(f"max_matvecs must be a positive integer, got {max_matvecs}")
    sign = 1.0 if which == "largest" else -1.0

    def signed(v: Tensor) -> Tensor:
        return matvec(v) if sign > 0 else -matvec(v)

    if start is None:
        start = _random_vector(n, seed, dtype, device, "gaussian")
    run = _restarted_run(signed, n, k, size, budget, tol, start.to(device=device, dtype=dtype).reshape(-1), seed)
    values, vectors, residuals, spent, converged, complete = run
    # A single Krylov space holds one vector per eigenspace: copies of a repeated eigenvalue (e.g. the I ⊗ A
    # structure of multi-output regression) stay invisible. Verify by deflation and recover missed ones.
    for round_ in range(1, 9):
        if complete or not converged or spent >= budget:
            break
        scale = max(float(values.abs().max()), torch.finfo(torch.float64).tiny)

        def deflated(v: Tensor, basis: Tensor = vectors) -> Tensor:
            v = v - basis @ (basis.T @ v)
            w = signed(v)
            return w - basis @ (basis.T @ w)

        probe = _random_vector(n, seed + 15485863 * round_, dtype, device, "gaussian")
        check = _Krylov(deflated, n, min(n - k, max(8, size // 8)), dtype, device, seed, refill=False)
        if check.size < 1:
            break
        check.start(probe - vectors @ (vectors.T @ probe))
        check.extend(min(check.size, budget - spent))
        spent += check.num_matvecs
        largest = float(check.ritz()[0][0]) if check.filled else -math.inf
        if largest <= float(values[-1]) + tol * scale:
            break
        extra = _restarted_run(deflated, n, k, size, budget - spent, tol, check.basis[0], seed + round_)
        spent += extra[3]
        order = torch.cat([values, extra[0]]).argsort(descending=True)[:k]
        values = torch.cat([values, extra[0]])[order]
        vectors = torch.cat([vectors, extra[1]], dim=1)[:, order.to(vectors.device)]
        residuals = torch.cat([residuals, extra[2]])[order]
        converged = extra[4]
    return EigenResult(
        eigenvalues=sign * values,
        eigenvectors=vectors if return_eigenvectors else None,
        residual_norms=residuals,
        num_matvecs=spent,
        converged=converged,
    )


def _restarted_run(
    matvec: MatVec, n: int, k: int, size: int, budget: int, tol: float, start: Tensor, seed: int
) -> tuple[Tensor, Tensor, Tensor, int, bool, bool]:
    """One thick-restart Lanczos run for the ``k`` largest eigenpairs of ``matvec``.

    Returns:
        Ritz values (descending, float64), Ritz vectors ``(n, k)``, residual norms, products spent, whether the
        tolerance was met, and whether the Krylov space exhausted the whole (reachable) space.
    """
    krylov = _Krylov(matvec, n, size, start.dtype, start.device, seed)
    krylov.start(start)
    check_every = max(4, size // 8)  # Ritz checks in between restarts let warm starts stop early
    while True:
        target = min(size, max(krylov.filled + check_every, k + 1))
        krylov.extend(min(target - krylov.filled, budget - krylov.num_matvecs))
        theta, coeffs, residuals = krylov.ritz()
        wanted = min(k, theta.numel())
        scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        complete = krylov.exhausted or krylov.filled >= n
        converged = wanted == k and (complete or bool((residuals[:k] <= tol * scale).all()))
        if converged or krylov.num_matvecs >= budget or complete:
            break
        if krylov.filled >= size:
            krylov.restart(theta, coeffs, keep=min(krylov.filled - 1, k + (size - k) // 2))
    basis_coeffs = coeffs[:, :wanted].to(device=krylov.basis.device, dtype=krylov.basis.dtype)
    vectors = krylov.basis[: krylov.filled].T @ basis_coeffs
    return theta[:wanted], vectors, residuals[:wanted], krylov.num_matvecs, converged, complete


@dataclass
class SpectralQuadrature:
    r"""Stochastic Lanczos quadrature of the spectral measure :math:`\mu = \frac1n \sum_i \delta_{\lambda_i}`.

    For each probe :math:`v_j` (unit norm, Rademacher direction), ``num_steps`` Lanczos steps give the Gauss
    quadrature :math:`v_j^\top f(A) v_j \approx \sum_l w_{jl} f(\theta_{jl})`, exact for polynomials of degree
    :math:`< 2\,\text{steps}`. Averaging over probes estimates :math:`\frac1n \operatorname{tr} f(A)` without bias
    (Ghorbani, Krishnan & Xiao 2019).

    Attributes:
        nodes: ``(num_probes, steps)`` float64 Ritz values per probe (padded with zeros of zero weight).
        weights: ``(num_probes, steps)`` float64 Gauss weights per probe (each row sums to 1).
        num_matvecs: Products spent.
    """

    nodes: Tensor
    weights: Tensor
    num_matvecs: int

    def moment(self, p: int) -> float:
        r"""Estimate of :math:`\frac1n\operatorname{tr}(A^p)` (exact per probe for :math:`p < 2\,\text{steps}`)."""
        return float((self.weights * self.nodes.pow(p)).sum(dim=1).mean())

    def density(self, grid: Tensor, sigma: float) -> Tensor:
        r"""Gaussian-smoothed density :math:`\frac1J\sum_{j,l} w_{jl}\mathcal N(x;\theta_{jl},\sigma^2)` on a grid."""
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = grid.to(torch.float64).reshape(-1, 1, 1)
        kernel = torch.exp(-0.5 * ((grid - self.nodes) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * self.weights).sum(dim=2).mean(dim=1)

    def fraction_below(self, threshold: float) -> tuple[float, float]:
        r"""Quadrature mass of :math:`\{|\lambda| \le \text{threshold}\}`: mean and standard error over probes."""
        per_probe = (self.weights * (self.nodes.abs() <= threshold)).sum(dim=1)
        count = per_probe.numel()
        stderr = float(per_probe.std(unbiased=True) / math.sqrt(count)) if count > 1 else float("nan")
        return float(per_probe.mean()), stderr

    def support(self) -> tuple[float, float]:
        """Smallest and largest node with positive weight."""
        live = self.nodes[self.weights > 0]
        return float(live.min()), float(live.max())


def stochastic_lanczos_quadrature(
    matvec: MatVec,
    n: int,
    *,
    num_probes: int = 4,
    num_steps: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    probes: Tensor | None = None,
) -> SpectralQuadrature:
    r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        matvec: ``v -> A v``.
        n: Dimension.
        num_probes: Number of Rademacher probes (ignored when ``probes`` is given), ``>= 1``.
        num_steps: Lanczos steps per probe (capped at ``n``), ``>= 1``.
        seed: Seed of the probes; probe ``j`` uses ``seed + j``.
        dtype: Dtype of the Lanczos basis.
        device: Device of the basis.
        probes: Optional ``(J, n)`` explicit probe vectors (normalised internally).

    Returns:
        A :class:`SpectralQuadrature`.

    Raises:
        ValueError: For non-positive ``num_probes`` / ``num_steps``.
    """
    if num_probes < 1 or num_steps < 1:
        raise ValueError(f"num_probes and num_steps must be >= 1, got {num_probes} and {num_steps}")
    steps = min(num_steps, n)
    vectors = (
        [p.reshape(-1) for p in probes]
        if probes is not None
        else [_random_vector(n, seed + j, dtype, device, "rademacher") for j in range(num_probes)]
    )
    nodes = torch.zeros(len(vectors), steps, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    spent = 0
    for j, vector in enumerate(vectors):
        # Plain Lanczos from the probe itself: after a breakdown the Gauss rule is already exact, so stop there.
        krylov = _Krylov(matvec, n, steps, dtype, device, seed, refill=False)
        krylov.start(vector.to(device=device, dtype=dtype))
        krylov.extend(steps)
        spent += krylov.num_matvecs
        theta, coeffs = torch.linalg.eigh(krylov.projected[: krylov.filled, : krylov.filled])
        nodes[j, : theta.numel()] = theta
        weights[j, : theta.numel()] = coeffs[0, :] ** 2
    return SpectralQuadrature(nodes=nodes, weights=weights, num_matvecs=spent)


@dataclass
class TraceEstimate:
    r"""Hutchinson trace estimate.

    Attributes:
        value: Mean of :math:`z^\top A z` over the probes.
        stderr: Standard error of the mean (sample standard deviation / sqrt(num_samples); NaN for one sample).
        num_samples: Number of probes (= products spent).
    """

    value: float
    stderr: float
    num_samples: int


def hutchinson_trace(
    matvec: MatVec,
    n: int,
    *,
    num_samples: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    deflation: Tensor | None = None,
) -> TraceEstimate:
    r"""Trace of a symmetric operator by Hutchinson's estimator with Rademacher probes.

    With ``deflation`` (an ``(n, k)`` basis, e.g. the top Ritz vectors) the deflated estimator of
    :func:`lightning_hessian.trace.deflated_trace` is used instead (``k + num_samples`` products).

    .. math::

        \operatorname{tr}(A) = \mathbb E_z[z^\top A z], \quad z_i \in \{\pm 1\}\ \text{i.i.d.}, \qquad
        \widehat{\operatorname{tr}} = \frac1S \sum_{s=1}^S z_s^\top A z_s,

    with variance :math:`\frac2S(\|A\|_F^2 - \sum_i A_{ii}^2)` (Hutchinson 1989). The reported standard error is the
    empirical one.

    Args:
        matvec: ``v -> A v``.
        n: Dimension.
        num_samples: Number of probes, ``>= 1``; probe ``s`` uses seed ``seed + s``.
        seed: Base seed.
        dtype: Dtype of the probes.
        device: Device of the probes.
        deflation: Optional ``(n, k)`` basis to deflate (exact ``tr(VᵀAV)`` plus Hutchinson on the rest).

    Returns:
        A :class:`TraceEstimate`.

    Raises:
        ValueError: For ``num_samples < 1``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if deflation is not None:
        from lightning_hessian.trace import deflated_trace

        return deflated_trace(matvec, n, deflation, num_samples=num_samples, seed=seed, dtype=dtype, device=device)
    values = torch.empty(num_samples, dtype=torch.float64)
    for s in range(num_samples):
        z = _random_vector(n, seed + s, dtype, device, "rademacher")
        values[s] = float(torch.dot(z, matvec(z).to(dtype).reshape(-1)))
    stderr = float(values.std(unbiased=True) / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(value=float(values.mean()), stderr=stderr, num_samples=num_samples)
