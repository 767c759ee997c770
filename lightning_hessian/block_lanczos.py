r"""Block thick-restart Lanczos: extreme eigenpairs whose cost is the products, in a bounded basis.

The basis :math:`V = [v_1, \dots, v_m]` is orthonormal to working precision. A step multiplies a whole block
:math:`X` of ``b`` basis vectors (one ``matmat`` or ``b`` matvecs) and orthogonalises :math:`W = AX` with matrix-matrix
products only (BLAS-3):

1. a *local* classical Gram-Schmidt pass against the blocks :math:`AX` couples with in exact arithmetic (the previous
   and current block; after a restart, every kept vector: the arrow of the thick restart),
2. a *global* pass against the whole basis (this is the re-orthogonalisation of CGS2: it removes the rounding-level
   components that ruin plain Lanczos), repeated once more only when it removed more than :math:`1 - 1/\sqrt2` of
   the norm (Kahan-Parlett "twice is enough"),
3. Householder QR :math:`W = Q R` followed by an SVD :math:`R = U \Sigma Y^\top` of the small factor, which reveals the
   rank: directions with :math:`\sigma_i \le \epsilon_{\rm brk} \|A\|` are replaced by fresh seeded random directions
   (an invariant subspace was found: breakdown), and the new block is :math:`Q U` with coupling :math:`\Sigma Y^\top`.

The projected matrix :math:`T = V^\top A V` is assembled from the Gram-Schmidt coefficients; the residual of the Ritz
pair :math:`(\theta_i, V s_i)` is :math:`\|B s_i\|` with :math:`B` the coupling of the pending (not yet multiplied)
rows to the multiplied ones. A pair is converged when :math:`\|B s_i\| \le \mathrm{tol} \max_j |\theta_j|`.

When the basis is full, the ``k`` wanted Ritz vectors and half of the others are kept (Wu & Simon 2000, here in block
form, i.e. block Krylov-Schur, Zhou & Saad 2008): the rotation :math:`V \leftarrow V S` is done in place, in column
chunks of the ``(m, n)`` row-major basis, so no second basis-sized temporary exists. A wanted pair whose residual has
reached ``1e-3 tol`` is *locked* at a restart (Stewart 2001): its coupling to the rest is dropped (a perturbation of
that size), so later restarts rotate only the unlocked rows. The rotation is :math:`O(m^2 n)` flops per restart; on a
1M-parameter top-200 run it was 42% of the time without locking. When cheaper, a restart instead *reflects* the basis:
Householder reflectors map the first axes onto the pairs to lock and the last axes onto the ``d`` discarded Ritz
vectors, so the new basis is :math:`V Q` with :math:`Q = I + (\text{rank } r)`, ``r`` = locked + discarded, applied in
place as a rank-``r`` update (:math:`4 m r n` flops instead of :math:`2 m h n` for ``h`` kept rows). The kept rows then
span the kept Ritz vectors without being them (their block of ``T`` is dense), and a restart costs about the same per
product whatever the free room, so a basis close to ``k`` costs products, not restart seconds. The basis is sized from
``max_basis_bytes`` (default: 25% of the available device memory, capped at 32 GiB): when the default size does not
fit, a smaller basis is used (more restarts); when not even ``k`` vectors plus two blocks fit,
:class:`~lightning_hessian.memory.BasisMemoryError` is raised before anything is allocated.

A block of size ``b`` sees up to ``b`` vectors of each eigenspace, and after convergence a short run from a fresh
random block orthogonal to the ``k`` Ritz vectors checks that no larger eigenvalue was missed (multiplicities beyond
``b``); if one shows up, the iteration continues.

No Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_hessian.memory import BasisMemoryError, default_basis_budget

MatVec = Callable[[Tensor], Tensor]
MatMat = Callable[[Tensor], Tensor]

__all__ = ["EigenResult", "MatMat", "MatVec", "block_lanczos", "random_block"]

_SQRT_HALF = 0.7071067811865476
# column chunk of the in-place restart rotation: cache-sized on a CPU (2 MiB: a 249 x 213 rotation of 1e6 columns ran
# at 100 GFLOP/s against 66 with 64 MiB chunks, the reflected update at 83 against 43), larger on accelerators
_CHUNK_BYTES = {"cpu": 2 * 2**20}
_DEVICE_CHUNK_BYTES = 64 * 2**20
_REFLECT_GAIN = 1.15  # a reflected restart runs at 80-95% of the rotation's flop rate (cache-sized chunks, CPU)
_CHECK_EVERY_BLOCK = 64  # bases up to this size are checked for convergence after every block
_REFLECTED = True  # restarts update the basis by reflections when that is cheaper than rotating it
_LOCK = 1e-3  # a pair is locked once its residual is this share of the tolerance (keeps residuals faithful)


@dataclass
class EigenResult:
    r"""Extreme eigenpairs found by :func:`~lightning_hessian.lanczos.lanczos`.

    Attributes:
        eigenvalues: ``(k,)`` float64 eigenvalues, descending for ``which="largest"``, ascending for ``"smallest"``.
        eigenvectors: ``(n, k)`` orthonormal Ritz vectors (in the solver dtype) or ``None``.
        residual_norms: ``(k,)`` float64 Ritz residual norms :math:`\|A x_i - \theta_i x_i\|`.
        num_matvecs: Products spent (columns of blocks count one each).
        converged: Whether every residual met the tolerance (or the Krylov space exhausted the whole space).
        num_restarts: Thick restarts performed.
        block_size: Block size used.
        basis_bytes: Bytes of the Krylov basis that was allocated.
        num_locked: Most Ritz pairs locked at once (converged to ``1e-3 tol``, then neither rotated nor coupled).
        basis_values: With ``return_basis``: ``(p,)`` float64 Ritz values of the whole final Rayleigh-Ritz
            projection :math:`T = V_p^\top A V_p` over the ``p`` multiplied basis vectors (descending for
            ``"largest"``), else ``None``.
        basis_vectors: With ``return_basis``: the ``(n, p)`` orthonormal Ritz vectors :math:`V_p S` of those values,
            so that :math:`(V_p S)^\top A (V_p S) = \operatorname{diag}(\theta)` up to rounding: a deflation basis
            whose exact trace costs no product (:func:`~lightning_hessian.trace.deflated_trace`), else ``None``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residual_norms: Tensor
    num_matvecs: int
    converged: bool
    num_restarts: int = 0
    block_size: int = 1
    basis_bytes: int = 0
    num_locked: int = 0
    basis_values: Tensor | None = None
    basis_vectors: Tensor | None = None


def random_block(
    n: int, cols: int, seed: int, dtype: torch.dtype, device: torch.device | str | None, kind: str = "gaussian"
) -> Tensor:
    """Seeded ``(n, cols)`` random block drawn on the CPU (identical on every rank and device)."""
    gen = torch.Generator().manual_seed(int(seed))
    if kind == "rademacher":
        block = torch.randint(0, 2, (cols, n), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
    else:
        block = torch.randn(cols, n, generator=gen, dtype=torch.float64)
    return block.T.to(device=device, dtype=dtype)


def _columns(block: Tensor) -> Tensor:
    """``block`` (``(n, b)``) stored column by column (each column contiguous), copied only when it is not."""
    return block if block.shape[1] == 1 or block.stride(0) == 1 else block.T.contiguous().T


def _norm64(vector: Tensor) -> Tensor:
    """``‖vector‖₂`` accumulated in float64, chunk by chunk: no float64 copy of the vector (23 MB at 2.9M entries)."""
    step = 1 << 18
    total = torch.zeros((), dtype=torch.float64, device=vector.device)
    for c0 in range(0, vector.numel(), step):
        part = vector[c0 : c0 + step].to(torch.float64)
        total += torch.dot(part, part)
    return total.sqrt()


def _chunk_bytes(device: torch.device) -> int:
    return _CHUNK_BYTES.get(device.type, _DEVICE_CHUNK_BYTES)


class _Rows:
    """An ``(M, n)`` row-major matrix stored as one or two segments.

    The first ``head`` rows can then be kept (and returned) while the rest is freed.
    """

    def __init__(self, rows: int, n: int, head: int, dtype: torch.dtype, device) -> None:
        cuts = [0, head, rows] if 0 < head < rows else [0, rows]
        self.segments = [(a, torch.zeros(b - a, n, dtype=dtype, device=device)) for a, b in zip(cuts[:-1], cuts[1:])]
        self.n, self.rows = n, rows

    def parts(self, j0: int, j1: int):
        """``(offset into [j0, j1), rows view)`` for each segment overlapping rows ``j0..j1-1``."""
        for start, seg in self.segments:
            a, b = max(j0, start), min(j1, start + seg.shape[0])
            if a < b:
                yield a - j0, seg[a - start : b - start]

    def gram(self, j0: int, j1: int, w: Tensor) -> Tensor:
        """``V[j0:j1] @ w`` for ``w`` of shape ``(n, b)``.

        Computed as ``(wᵀ V[j0:j1]ᵀ)ᵀ``: with ``w`` column-major (see :func:`_columns`) the product's small dimension
        comes first, which this CPU's BLAS runs 2.4x faster at b = 4 (73 ms against 176 ms for 230 rows of 1e6).
        """
        out = w.new_empty(w.shape[1], j1 - j0)
        for off, view in self.parts(j0, j1):
            torch.matmul(w.T, view.T, out=out[:, off : off + view.shape[0]])
        return out.T

    def subtract(self, j0: int, j1: int, coeffs: Tensor, w: Tensor) -> None:
        """``w -= V[j0:j1].T @ coeffs`` in place (as ``wᵀ -= coeffsᵀ V[j0:j1]``: 84 ms against 190 at b = 4)."""
        for off, view in self.parts(j0, j1):
            w.T.addmm_(coeffs[off : off + view.shape[0]].T, view, alpha=-1)

    def get(self, j0: int, j1: int) -> Tensor:
        """Rows ``j0..j1-1`` as a ``(j1-j0, n)`` tensor (a view when they lie in one segment)."""
        pieces = [view for _, view in self.parts(j0, j1)]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def put(self, j0: int, rows: Tensor) -> None:
        """Write ``rows`` (``(r, n)``) at rows ``j0..j0+r-1``, row by row.

        A ``(1, n)`` transpose of an ``(n, 1)`` column (strides ``(1, 1)``) takes ``copy_``'s slow path: 3.4 ms
        against 0.08 ms for a row of 1.07M floats, 6% of a top-20 solve's time. Row by row, each copy is 1-D.
        """
        for off, view in self.parts(j0, j0 + rows.shape[0]):
            for i in range(view.shape[0]):
                view[i].copy_(rows[off + i])

    def rotate(self, j1: int, coeffs: Tensor, j0: int = 0) -> None:
        """Rows ``j0..j0+r-1`` become ``coeffs.T @ V[j0:j1]`` (``coeffs`` is ``(j1-j0, r)``, ``r <= j1-j0``), in place.

        Chunked over the columns, so that the only temporary is ``(r, chunk)``; each segment's rows enter the product
        as a strided view (no copy).
        """
        r = coeffs.shape[1]
        for c0, c1, new in self._chunk_products(j0, j1, coeffs.T.contiguous()):
            for off, view in self.parts(j0, j0 + r):
                view[:, c0:c1] = new[off : off + view.shape[0]]

    def add_low_rank(self, j0: int, j1: int, left: Tensor, right: Tensor) -> None:
        """Rows j0..j0+h-1 += ``left @ (right.T @ V[j0:j1])``, in place (``left``: ``(h, r)``, ``right``: ``(p, r)``).

        Chunked over the columns like :meth:`rotate`: the temporary is ``(r, chunk)``, and ``4 (j1 - j0) r n`` flops
        replace the ``2 (j1 - j0) h n`` of a rotation.
        """
        h = left.shape[0]
        for c0, c1, low in self._chunk_products(j0, j1, right.T.contiguous()):
            for off, view in self.parts(j0, j0 + h):
                view[:, c0:c1].addmm_(left[off : off + view.shape[0]], low)

    def _chunk_products(self, j0: int, j1: int, coeffs_t: Tensor) -> Iterator[tuple[int, int, Tensor]]:
        """``(c0, c1, coeffs_t @ V[j0:j1, c0:c1])`` for each cache-sized chunk of columns, in order.

        Each chunk's product is complete before it is yielded, so the caller may overwrite those columns of the rows.
        """
        itemsize = self.segments[0][1].element_size()
        chunk = max(1, _chunk_bytes(self.segments[0][1].device) // max(1, (j1 - j0) * itemsize))
        for c0 in range(0, self.n, chunk):
            c1 = min(self.n, c0 + chunk)
            out = None
            for off, view in self.parts(j0, j1):
                part = coeffs_t[:, off : off + view.shape[0]]
                out = part @ view[:, c0:c1] if out is None else out.addmm_(part, view[:, c0:c1])
            assert out is not None
            yield c0, c1, out


def _reflected_restart(ritz: Tensor, locking: int, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    r"""An orthogonal ``Q`` for a thick restart that is the identity plus a rank ``locking + discarded`` term.

    ``ritz`` is the ``(p, p)`` orthogonal matrix of Ritz coefficient vectors, its first ``locking`` columns the pairs
    to lock, the next ``keep - locking`` the other kept ones, the rest the discarded ones. Householder reflectors map
    the first ``locking`` axes onto the pairs to lock (QR of those columns) and then, in reversed coordinate order,
    the last ``p - keep`` axes onto the discarded columns, so that ``Q[:, :locking]`` are the locked Ritz vectors (up
    to sign), ``Q[:, locking:keep]`` an orthonormal basis of the other kept ones and ``Q`` minus the identity has the
    rank ``r`` of the reflectors. Then :math:`Q^\top = I + U (U^\top (Q^\top - I))` with ``U`` an orthonormal basis
    of the reflector vectors.

    Returns:
        ``Q`` ``(p, p)``, ``U`` ``(p, r)`` and ``W = (Q - I) U`` ``(p, r)``, all float64, so that the new rows are
        ``V + U[:keep] (Wᵀ V)`` (rows ``0..keep-1`` of :math:`Q^\top V`).
    """
    p = ritz.shape[0]
    eye = torch.eye(p, dtype=torch.float64)
    q = eye.clone()
    vectors = []
    if locking:
        a1, tau1 = torch.geqrf(ritz[:, :locking])
        q = torch.linalg.householder_product(torch.cat([a1, a1.new_zeros(p, p - locking)], dim=1), tau1)
        vectors.append(torch.tril(a1, -1) + eye[:, :locking])
    dropped = p - keep
    if dropped:
        rest = (q.T @ ritz[:, keep:])[locking:].flip(0)  # zero in the first `locking` rows: orthogonal to the locked
        a2, tau2 = torch.geqrf(rest)
        m = p - locking
        q2 = torch.linalg.householder_product(torch.cat([a2, a2.new_zeros(m, m - dropped)], dim=1), tau2)
        q[:, locking:] = q[:, locking:] @ q2.flip(0, 1)
        y2 = eye.new_zeros(p, dropped)
        y2[locking:] = (torch.tril(a2, -1) + eye[:m, :dropped]).flip(0)
        vectors.append(y2)
    u = torch.linalg.qr(torch.cat(vectors, dim=1))[0] if vectors else eye[:, :0]
    return q, u, (q - eye) @ u


class _BlockKrylov:
    """State of one block thick-restart Lanczos run on ``op`` (which computes ``A X`` for a block ``X``)."""

    def __init__(self, op, n: int, rows: int, block: int, head: int, dtype, device, seed: int) -> None:
        self.op, self.n, self.M, self.b, self.seed = op, n, rows, block, seed
        self.dtype, self.device = dtype, device
        self.V = _Rows(rows, n, head, dtype, device)
        self.T = torch.zeros(rows, rows, dtype=torch.float64)
        self.p = 0  # multiplied rows (the Krylov-Schur part)
        self.q = 0  # pending rows (orthonormal, not yet multiplied)
        self.local = 0  # first row the next product couples with in exact arithmetic
        self.products = 0
        self.restarts = 0
        self.norm = 0.0  # running estimate of |A| (largest column norm of a product)
        self.locked = 0  # rows 0..locked-1: converged Ritz vectors, decoupled from the rest (T is diagonal there)
        self.locked_theta = torch.zeros(0, dtype=torch.float64)
        self.max_locked = 0
        self.locked_res = torch.zeros(0, dtype=torch.float64)
        self.breakdown = {torch.float64: 1e-11, torch.float32: 1e-5}.get(dtype, 1e-5)

    @property
    def used(self) -> int:
        return self.p + self.q

    def start(self, block: Tensor) -> None:
        q, _ = self._orthonormal(block.to(device=self.device, dtype=self.dtype), block.shape[1], scale=None)
        self.V.put(0, q.T)
        self.p, self.q, self.local = 0, q.shape[1], 0
        self.T.zero_()

    def _orthogonalise(self, w: Tensor, lo: int) -> Tensor:
        """Block CGS against the used rows (local pass from ``lo``, then global passes); returns the coefficients."""
        used = self.used
        coeffs = w.new_zeros(used, w.shape[1])
        if used == 0:
            return coeffs
        if lo > 0:
            local = self.V.gram(lo, used, w)
            self.V.subtract(lo, used, local, w)
            coeffs[lo:] += local
        for _pass in range(3):
            before = torch.linalg.vector_norm(w, dim=0)
            more = self.V.gram(0, used, w)
            self.V.subtract(0, used, more, w)
            coeffs += more
            after = torch.linalg.vector_norm(w, dim=0)
            if bool((after >= _SQRT_HALF * before).all()):
                break
        return coeffs

    def _orthonormal(self, w: Tensor, cols: int, scale: float | None) -> tuple[Tensor, Tensor]:
        """Orthonormal ``Q`` (``(n, cols)``, orthogonal to the used rows) and coupling ``B`` with ``w ≈ Q B``.

        ``w`` must already be orthogonal to the used rows; a single column is normalised in place (``w`` is always
        the solver's own tensor). Rank-deficient directions (singular values of ``w`` at most ``breakdown * scale``)
        are replaced by seeded random directions with zero coupling.
        """
        if scale is None:  # a start block: its own norm is the scale
            scale = float(torch.linalg.vector_norm(w, dim=0).max())
        if not math.isfinite(scale) or scale == 0.0:
            raise ValueError("the start block must be finite and non-zero")
        if w.shape[1] == 1:  # one vector: its norm, accumulated in float64 (no QR)
            sig = _norm64(w[:, 0]).reshape(1).cpu()
            good = int(float(sig[0]) > self.breakdown * scale) if cols else 0
            q = w.div_(sig.to(device=w.device, dtype=w.dtype)) if good else w[:, :0]  # w is this solver's own
            coupling = torch.zeros(cols, 1, dtype=torch.float64)
            coupling[:good] = sig[:good, None]
        else:
            qh, r = torch.linalg.qr(w)
            u, sig, yt = torch.linalg.svd(r.to(torch.float64))
            good = int((sig > self.breakdown * scale).sum().clamp(max=cols))
            q = qh @ u[:, :good].to(qh.dtype)
            coupling = torch.zeros(cols, w.shape[1], dtype=torch.float64)
            coupling[:good] = sig[:good, None] * yt[:good]
        fragile = good < cols or (good > 0 and float(sig[good - 1]) < 1e-3 * float(sig[0]))
        if good < cols:
            self.seed += 7919
            fresh = random_block(self.n, cols - good, self.seed, self.dtype, self.device)
            q = torch.cat([q, fresh], dim=1)
        if fragile:  # amplified rounding along the basis (or raw random columns): one more pass and a QR
            q = _columns(q)
            for _pass in range(2):
                if self.used:
                    self.V.subtract(0, self.used, self.V.gram(0, self.used, q), q)
                if good:
                    q[:, good:] -= q[:, :good] @ (q[:, :good].T @ q[:, good:])
            q2, r2 = torch.linalg.qr(q)
            coupling = r2.to(torch.float64).cpu() @ coupling
            q = q2
        if q.dtype != torch.float64 and (w.shape[1] > 1 or fragile):
            # LAPACK's low-precision QR normalises to about sqrt(n) eps (1e-5 at n = 3e5 in float32), and restarts
            # spread that into the off-diagonal of V^T V: renormalise with norms accumulated in float64
            norms = torch.linalg.vector_norm(q, dim=0, dtype=torch.float64)
            q = q / norms.to(q.dtype)
            coupling = norms.cpu()[:, None] * coupling
        return q, coupling

    def extend(self, budget: int) -> None:
        """Multiply (up to ``budget`` of) the pending rows and append the next block."""
        p, q = self.p, self.q
        r = min(q, budget, self.b)
        x = self.V.get(p, p + r).T
        w = self.op(x).to(self.dtype)
        if w.shape != x.shape:
            w = w.reshape(x.shape)
        norm = float(torch.linalg.vector_norm(w, dim=0).max())  # finite iff every entry is (one pass, not two)
        if not math.isfinite(norm):
            if not bool(torch.isfinite(w).all()):
                raise FloatingPointError("the operator returned a non-finite product")
            raise FloatingPointError(f"the norm of a product overflows {self.dtype}")
        self.products += r
        w = w.clone() if w.data_ptr() == x.data_ptr() else w
        w = _columns(w)
        self.norm = max(self.norm, norm)
        coeffs = self._orthogonalise(w, self.local).to(torch.float64).cpu()
        coeffs[: self.locked] = 0.0  # locked pairs are deflated: their (residual-sized) coupling is dropped
        used = self.used
        self.T[:used, p : p + r] = coeffs
        self.T[p : p + r, :used] = coeffs.T
        diag = self.T[p : p + r, p : p + r]
        self.T[p : p + r, p : p + r] = (diag + diag.T) / 2
        cols = min(r, self.n - used, self.M - used)
        if cols > 0:
            new, coupling = self._orthonormal(w, cols, scale=max(self.norm, torch.finfo(torch.float64).tiny))
            self.V.put(used, new.T)
            self.T[used : used + cols, p : p + r] = coupling
            self.T[p : p + r, used : used + cols] = coupling.T
        self.local = p
        self.p = p + r
        self.q = q - r + cols

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (descending), ``(p, p)`` coefficient vectors and residual norms of the multiplied rows.

        Locked rows are their own Ritz vectors (unit coefficient columns) with the residual they had when locked.
        """
        p, lk = self.p, self.locked
        theta, coeffs = torch.linalg.eigh(self.T[lk:p, lk:p])
        theta, coeffs = theta.flip(0), coeffs.flip(1)
        residuals = torch.linalg.vector_norm(self.T[p : self.used, lk:p] @ coeffs, dim=0)
        if lk == 0:
            return theta, coeffs, residuals
        full = torch.zeros(p, p, dtype=torch.float64)
        full[:lk, :lk] = torch.eye(lk, dtype=torch.float64)
        full[lk:, lk:] = coeffs
        theta = torch.cat([self.locked_theta, theta])
        order = torch.argsort(theta, descending=True, stable=True)
        return theta[order], full[:, order], torch.cat([self.locked_res, residuals])[order]

    def restart(
        self,
        theta: Tensor,
        coeffs: Tensor,
        keep: int,
        fresh: bool = False,
        residuals: Tensor | None = None,
        lock_below: float = -1.0,
        wanted: int = 0,
    ) -> None:
        """Keep the locked rows, the leading ``keep`` Ritz vectors (rotated in place) and the pending rows.

        Ritz pairs among the leading ``wanted`` whose residual is at most ``lock_below`` are locked: their coupling to
        the pending rows is dropped (a perturbation of the size of their residual: deflation, as in Krylov-Schur with
        locking, Stewart 2001), so that later restarts neither rotate them again nor couple with them.

        With ``fresh``, also append a seeded random block orthogonal to all of them (zero coupling, so the Krylov
        relation stays exact): the deflation check for eigenvalues the block could not see. Its rows ``0..keep-1``
        are then the leading Ritz vectors in descending order, none locked.
        """
        lk = self.locked
        is_locked = coeffs[:lk].abs().sum(dim=0) > 0 if lk else torch.zeros(self.p, dtype=torch.bool)
        # rows 0..keep-1 become the leading Ritz vectors in order for the deflation check (the caller reads them so),
        # and a locked pair pushed out of the wanted ones (larger values found later) must not clog the basis: in
        # both cases unlock all (one full rotation)
        stale = wanted > 0 and bool(is_locked[wanted:].any())
        if fresh or stale:
            self.locked = 0
            self.locked_theta, self.locked_res = self.locked_theta[:0], self.locked_res[:0]
            is_locked = torch.zeros(self.p, dtype=torch.bool)
        p, q, lk = self.p, self.q, self.locked
        active = [j for j in range(p) if not is_locked[j]][: max(0, keep - lk)]
        newly = [j for j in active if j < wanted and residuals is not None and float(residuals[j]) <= lock_below]
        locking = set(newly)
        cols = newly + [j for j in active if j not in locking]  # the newly locked ones first
        kept = lk + len(cols)
        pending = self.V.get(p, p + q).clone()
        unlocked, n_keep = p - lk, kept - lk
        rank = len(newly) + unlocked - n_keep  # of the reflected restart's update
        # a rotation costs 2 p' h n flops for the h kept of p' unlocked rows, the reflected update 2 r (p' + h) n
        if _REFLECTED and not fresh and _REFLECT_GAIN * rank * (unlocked + n_keep) < unlocked * n_keep:
            chosen = set(cols)
            order = cols + [j for j in range(p) if not is_locked[j] and j not in chosen]  # newly locked, kept, dropped
            ritz = coeffs[lk:p, order]
            reflect, basis, update = _reflected_restart(ritz, len(newly), n_keep)
            self.V.add_low_rank(
                lk, p, basis[:n_keep].to(device=self.device, dtype=self.dtype),
                update.to(device=self.device, dtype=self.dtype),
            )  # fmt: skip
            projected = reflect[:, :n_keep].T @ ritz  # (h, p'): Ritz coefficients of the new rows
            kept_t = (projected * theta[order]) @ projected.T
            kept_t = (kept_t + kept_t.T) / 2
            m = len(newly)
            kept_t[:m, :] = 0.0  # the locked rows are Ritz vectors (up to sign): decoupled, T diagonal there
            kept_t[:, :m] = 0.0
            kept_t[:m, :m] = torch.diag(theta[newly])
            coupling = self.T[p : p + q, lk:p] @ reflect[:, :n_keep]
            self.T.zero_()
            self.T[:lk, :lk] = torch.diag(self.locked_theta)
            self.T[lk:kept, lk:kept] = kept_t
        else:
            rotation = coeffs[lk:p, cols]
            coupling = self.T[p : p + q, lk:p] @ rotation
            self.V.rotate(p, rotation.to(device=self.device, dtype=self.dtype), j0=lk)
            self.T.zero_()
            self.T[:kept, :kept] = torch.diag(torch.cat([self.locked_theta, theta[cols]]))
        self.V.put(kept, pending)
        if newly:
            assert residuals is not None
            self.locked_theta = torch.cat([self.locked_theta, theta[newly]])
            self.locked_res = torch.cat([self.locked_res, residuals[newly]])
            coupling[:, : len(newly)] = 0.0
        self.T[kept : kept + q, lk:kept] = coupling
        self.T[lk:kept, kept : kept + q] = coupling.T
        self.locked = lk + len(newly)
        self.max_locked = max(self.max_locked, self.locked)
        self.p, self.q, self.local = kept, q, self.locked
        if fresh:
            self.seed += 104729
            cols_fresh = min(self.b, self.n - self.used, self.M - self.used)
            block = random_block(self.n, cols_fresh, self.seed, self.dtype, self.device)
            self.V.subtract(0, self.used, self.V.gram(0, self.used, block), block)
            new, _ = self._orthonormal(block, cols_fresh, scale=None)
            self.V.put(self.used, new.T)
            self.q += cols_fresh
        self.restarts += 1


def _combine(rows: _Rows, p: int, coeffs: Tensor) -> Tensor:
    """``V[:p].T @ coeffs`` as a new ``(n, c)`` tensor, accumulated segment by segment (no basis-sized temporary)."""
    out = None
    for off, view in rows.parts(0, p):
        part = view.T @ coeffs[off : off + view.shape[0]]
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


def _keep(k: int, p: int, q: int, rows: int, block: int) -> int:
    """Ritz vectors kept at a restart: ``k`` plus part of the free room, leaving whole blocks to grow.

    With single vectors three quarters of the free room go to new vectors, not half: on a 1.07M-parameter MLP top-20
    took 392 products and 24 restarts instead of 408 and 37 (11% fewer seconds); top-200 on a synthetic operator with
    that spectrum took 1,271 products instead of 1,256 (6.5% fewer solver seconds); on the digits MLP, 72 / 356 / 614
    products at k = 20 / 100 / 200 instead of 68 / 356 / 620. Blocks keep half (a block of 8 on a clustered spectrum
    did not converge with three quarters).
    """
    share = (3, 4) if block == 1 else (1, 2)
    room = max(block, (rows - q - k) * share[0] // share[1] // block * block)
    return max(min(k, p), min(p - 1, rows - q - room))


def _choose_rows(n: int, k: int, block: int, num_vectors: int | None, itemsize: int, budget: int) -> tuple[int, int]:
    """Rows of the basis and block size that fit ``budget`` bytes (work blocks included)."""
    # k + an eighth: with reflected restarts a tighter basis costs products, not restart seconds. Top-200 of the
    # 1.07M-parameter random-init MLP (the flattest spectrum here): 1,909 products with k + k/4 rows, 1,999 (+4.7%,
    # +2.9% seconds) with k + k/8; the digits MLP 930 / 969 at initialisation, 577 / 573 trained; at 2.9M parameters
    # the basis is then 2.4 GiB instead of 2.7 GiB
    wanted = num_vectors if num_vectors is not None else k + max(20, 4 * block, k // 8)
    wanted = max(wanted, k + block)
    per_row = n * itemsize
    while True:
        work = 4 * block * per_row  # product, its orthogonalisation and the QR of one block
        rows = min(n, wanted + block)
        minimum = min(n, k + 2 * block)
        fit = (budget - work) // per_row
        if fit >= minimum:
            return int(min(rows, fit)), block
        if block == 1:
            need = minimum * per_row + work
            raise BasisMemoryError(
                f"the Krylov basis for k = {k} eigenvectors of size n = {n} needs at least {need} bytes "
                f"({minimum} vectors of {per_row} bytes plus {work} bytes of work blocks) but max_basis_bytes = "
                f"{budget}; lower k, use dtype=torch.float32, or raise max_basis_bytes"
            )
        block = max(1, block // 2)


def _basis_pairs(krylov: _BlockKrylov, sign: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Every Ritz pair ``(theta, V_p S)`` of the current projection ``T[:p, :p]`` (values with the caller's sign)."""
    all_theta, all_coeffs = krylov.ritz()[:2]
    return sign * all_theta, _combine(krylov.V, krylov.p, all_coeffs.to(device=krylov.device, dtype=dtype))


def block_lanczos(
    matvec: MatVec | None,
    n: int,
    k: int,
    *,
    matmat: MatMat | None = None,
    block_size: int | None = None,
    which: Literal["largest", "smallest"] = "largest",
    tol: float = 1e-6,
    max_matvecs: int | None = None,
    num_vectors: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    start: Tensor | None = None,
    return_eigenvectors: bool = False,
    max_basis_bytes: int | None = None,
    return_basis: bool = False,
    check_missed: bool = True,
) -> EigenResult:
    r"""Extreme eigenpairs by block thick-restart Lanczos (see the module docstring for the method).

    Args:
        matvec: ``v -> A v`` (used columnwise when ``matmat`` is ``None``).
        n: Dimension of the operator.
        k: Number of eigenpairs wanted, ``1 <= k <= n``.
        matmat: ``X -> A X`` for a block ``X`` of shape ``(n, b)``; preferred when given.
        block_size: Block size ``b``; default ``min(k, 4)`` with ``matmat``, else 1; at least the columns of a
            block ``start``.
        which: ``"largest"`` (returned descending) or ``"smallest"`` (returned ascending).
        tol: Relative residual tolerance, ``> 0``.
        max_matvecs: Budget of products (columns); default ``max(20 * num_vectors, 200)``.
        num_vectors: Basis size before a restart; default ``k + max(20, 4 b, k // 8)`` (bounded by
            ``max_basis_bytes``).
        seed: Seed of the random start block and of fresh directions.
        dtype: Dtype of the basis.
        device: Device of the basis.
        start: ``(n,)`` start vector or ``(n, s)`` start block (e.g. the previous top subspace: a warm start);
            padded with seeded random columns to the block size.
        return_eigenvectors: Also return the ``(n, k)`` Ritz vectors.
        max_basis_bytes: Memory budget of the basis and work blocks; default 25% of the available memory of
            ``device`` (capped at 32 GiB).
        return_basis: Also return the Ritz pairs of the whole final projection (``basis_values``,
            ``basis_vectors``: ``p`` vectors of ``n`` entries, a new tensor; rows of the basis beyond them are freed).
        check_missed: Run the missed-eigenvalue check after convergence (``False`` saves its ``max(8, m / 8)`` or
            more products, for monitoring solves that accept a cluster beyond the block being found late).

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: For bad arguments.
        BasisMemoryError: When ``k`` vectors plus two blocks do not fit in ``max_basis_bytes``.
    """
    if n < 1 or not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= n = {n}, got k = {k}")
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if matvec is None and matmat is None:
        raise ValueError("one of matvec or matmat must be given, got neither")
    if block_size is not None and not 1 <= block_size:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    if start is not None and (start.dim() not in (1, 2) or start.shape[0] != n):
        raise ValueError(f"start must have shape (n,) or (n, s) with n = {n}, got {tuple(start.shape)}")
    start_cols = 0 if start is None else (1 if start.dim() == 1 else start.shape[1])
    default = min(k, 4) if matmat is not None else 1  # columnwise matvec: blocks cost products
    block = max(block_size if block_size is not None else default, start_cols)
    block = min(block, n)
    budget_bytes = max_basis_bytes if max_basis_bytes is not None else default_basis_budget(device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    rows, block = _choose_rows(n, k, block, num_vectors, itemsize, int(budget_bytes))
    size = rows - block
    budget = max_matvecs if max_matvecs is not None else max(20 * max(size, k + 1), 200)
    if budget < 1:
        raise ValueError(f"max_matvecs must be a positive integer, got {max_matvecs}")
    sign = 1.0 if which == "largest" else -1.0

    def op(x: Tensor) -> Tensor:
        if matmat is not None:
            out = matmat(x.contiguous())
        else:
            columns = [matvec(x[:, i]).reshape(-1, 1) for i in range(x.shape[1])]
            out = columns[0] if len(columns) == 1 else torch.cat(columns, dim=1)
        return out if sign > 0 else -out

    krylov = _BlockKrylov(op, n, rows, block, k, dtype, device, seed)  # same layout either way: same bits
    first = random_block(n, block, seed, dtype, device)
    if start is not None:
        given = start.reshape(n, -1).to(device=device, dtype=dtype)
        first = torch.cat([given, first[:, : block - given.shape[1]]], dim=1)
    krylov.start(first)
    # a small projection costs microseconds to solve: check it after every block (a top-8 solve stops at the product
    # it converges at); a large one every max(8, m / 8) products
    check_every = 1 if size <= _CHECK_EVERY_BLOCK else max(1, max(8, size // 8) // block)
    span = max(8, size // 8)  # products of one missed-eigenvalue check
    blocks, rounds, saved, check_start, kept_all = 0, 0, None, 0, False
    check_restarted = checked = False
    basis: tuple[Tensor, Tensor] | None = None
    theta = coeffs = residuals = None
    converged = complete = False
    while True:
        if krylov.used + min(block, n - krylov.used) > rows:
            theta, coeffs, residuals = krylov.ritz()
            lock_below = _LOCK * tol * max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
            keep = max(_keep(k, krylov.p, krylov.q, rows, block), krylov.locked)
            krylov.restart(theta, coeffs, keep, residuals=residuals, lock_below=lock_below, wanted=k)
        krylov.extend(budget - krylov.products)
        blocks += 1
        complete = krylov.q == 0 and krylov.p >= n  # the whole space is spanned
        out_of_budget = krylov.products >= budget
        no_room = krylov.used + min(block, n - krylov.used) > rows
        if not (complete or out_of_budget or no_room or saved is not None or blocks % check_every == 0):
            continue
        theta, coeffs, residuals = krylov.ritz()
        wanted = min(k, theta.numel())
        scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
        if saved is not None:  # a deflation check is running
            if theta.numel() >= k and float(theta[k - 1]) > float(saved[0][k - 1]) + tol * scale:
                saved = None  # a missed eigenvalue (a multiplicity beyond the block): keep iterating
            elif complete or out_of_budget or krylov.products - check_start >= span:
                if not check_restarted:
                    theta, residuals = saved
                    wanted, converged, coeffs = k, True, None  # rows 0..k-1 hold the saved Ritz vectors
                    break
                saved, checked = None, True  # restarted within the check: the current pairs are the answer
            elif no_room:
                # a basis too small for the whole check: the restart at the top of the loop keeps the leading Ritz
                # vectors (the saved ones and the check's best directions) and the check goes on to its span
                check_restarted = True
                continue
            else:
                continue
        converged = wanted == k and (complete or bool((residuals[:k] <= tol * scale).all()))
        if complete or (out_of_budget and not converged):
            break
        if converged:
            no_check = not check_missed or rounds >= 8 or out_of_budget or checked
            if no_check or k + krylov.q + block > n or k + krylov.q + 2 * block > rows:
                break
            rounds += 1
            saved = (theta[:k].clone(), residuals[:k].clone())
            # with room, the check keeps every Ritz vector (the basis only grows: its products extend the Krylov
            # space that return_basis hands out), else the k wanted ones
            kept_all = krylov.p + krylov.q + span + block <= min(rows, n)
            if return_basis and rounds == 1 and not kept_all:  # the run's own Krylov space, before the check drops it
                basis = _basis_pairs(krylov, sign, dtype)
            keep = krylov.p if kept_all else max(k, krylov.locked)
            krylov.restart(theta, coeffs, keep=keep, fresh=True)
            check_start, check_restarted, coeffs = krylov.products, False, None
    basis_values = basis_vectors = None
    if return_basis:
        # every Ritz pair of one Rayleigh-Ritz projection: the final one (the run's Krylov space, and the check's when
        # it kept the whole basis), else the run's own Krylov space saved before a check that kept only the k wanted
        # vectors
        use_run = basis is not None and rounds <= 1
        basis_values, basis_vectors = basis if use_run else _basis_pairs(krylov, sign, dtype)
    if coeffs is not None:  # rotate the wanted Ritz vectors into rows 0..wanted-1
        krylov.V.rotate(krylov.p, coeffs[:, :wanted].to(device=krylov.device, dtype=dtype))
    vectors = None
    if return_eigenvectors:
        vectors = krylov.V.segments[0][1][:wanted].T
    basis_bytes = rows * n * itemsize
    return EigenResult(
        eigenvalues=sign * theta[:wanted],
        eigenvectors=vectors,
        residual_norms=residuals[:wanted],
        num_matvecs=krylov.products,
        converged=converged,
        num_restarts=krylov.restarts,
        block_size=block,
        basis_bytes=basis_bytes,
        num_locked=krylov.max_locked,
        basis_values=basis_values,
        basis_vectors=basis_vectors,
    )
