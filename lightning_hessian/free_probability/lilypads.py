r"""Certified Newton "lilypads" solver for :math:`M(z)` (Chhaibi, Daouda, Kahn 2022, Algorithm 2), vectorised.

Given :math:`M^{\langle -1 \rangle}(m) = P(m)/m` (:class:`~lightning_hessian.free_probability.transforms.MInverse`)
and a target :math:`z` in the upper half-plane, :math:`M(z)` is the root of

.. math:: f_z(m) = P(m) - z\,m

on the branch :math:`M(z) \sim m_1/z`. Every Newton start is *certified* by the Newton-Kantorovich theorem:
with :math:`\eta = |f_z(m_0)/f_z'(m_0)|`, :math:`\beta = 1/|f_z'(m_0)|` and
:math:`K \ge \sup_{|w - m_0| \le 2\eta} |f_z''(w)|`,

.. math:: h = \beta K \eta < \tfrac12

guarantees quadratic convergence of Newton's method from :math:`m_0` to the unique root in the ball
:math:`|m - m_0| \le \tfrac{1 - \sqrt{1 - 2h}}{h}\eta \le 2\eta` (the "lilypad"). The bound :math:`K` comes from the
majorant of the factored polynomial, :math:`|P''(w)| \le |C| \prod_j b_j^{k_j}\,[(\sum_j k_j/b_j)^2 -
\sum_j k_j/b_j^2]` with :math:`b_j = |m_0 - \rho_j| + 2\eta` (a rigorous bound on the whole ball around :math:`m_0`,
slightly stricter than the paper's bound on the ball around the first Newton iterate).

Algorithm (per target, all targets advanced in lock-step as numpy arrays):

1. *First basin*: start from :math:`m_0 = 0` at :math:`z = \operatorname{Re} z^* + i\,\operatorname{Im} z^*`;
   double the imaginary part until the Kantorovich test passes (:math:`M(z) \approx m_1/z` is tiny for large
   :math:`|z|`), then run Newton.
2. *Homotopy*: move along the straight segment to :math:`z^*`; a step :math:`z \to z + dz` is taken only when the test
   passes at :math:`(z + dz, M(z))`, else :math:`dz` is halved; after an accepted step the next trial is twice as long.
3. *Grid continuation* (``continuation=True``): a sorted grid is solved coarse-to-fine; each new point starts from the
   certified solution of its neighbour (the segment between them stays in the upper half-plane, where :math:`M` is
   analytic). The default runs all paths independently in lock-step, which is faster in numpy; ``start=`` continues
   from caller-supplied certified proxies (used by the quantile search).

A target that cannot be certified within the step budget is reported (``certified = False``, ``m = nan``), never
filled. Targets with :math:`\operatorname{Im} z \le 0` are refused with a ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lightning_hessian.free_probability.transforms import MInverse

__all__ = ["LilypadResult", "kantorovich", "solve"]


@dataclass
class LilypadResult:
    """Output of :func:`solve`.

    Attributes:
        z: the targets (complex, input order).
        m: :math:`M(z)`; ``nan`` where not certified.
        certified: ``True`` where the whole path was certified and Newton converged.
        num_steps: accepted homotopy steps per target (first basin included).
        num_tests: Kantorovich tests per target.
        max_kantorovich: largest :math:`h` over the accepted steps of each target (always ``< 0.5``).
        record: when requested, ``(z, m_start, h)`` arrays of every accepted step (for audits).
    """

    z: np.ndarray
    m: np.ndarray
    certified: np.ndarray
    num_steps: np.ndarray
    num_tests: np.ndarray
    max_kantorovich: np.ndarray
    record: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(default=None, repr=False)


def _f_fp(poly: MInverse, z: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    r""":math:`f_z(m)`, :math:`f_z'(m)` and the differences :math:`m - \rho_j` (one array per distinct root)."""
    p = np.full(m.shape, poly.constant, dtype=complex)
    s1 = np.zeros(m.shape, dtype=complex)
    diffs = []
    for r, k in zip(poly.roots, poly.int_multiplicities):
        a = m - r
        diffs.append(a)
        p = p * (a if k == 1 else a**k)
        s1 = s1 + k / a
    return p - z * m, p * s1 - z, diffs


def kantorovich(poly: MInverse, z: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r"""Kantorovich quantity :math:`h = \beta K \eta` and the Newton step at :math:`(z, m_0)` (vectorised).

    Returns:
        ``(h, step)`` with ``step = -f/f'``; the start is certified iff ``h < 0.5``.
    """
    z = np.asarray(z, dtype=complex)
    m = np.asarray(m, dtype=complex)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _kantorovich(poly, z, m)


def _kantorovich(poly: MInverse, z: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f, fp, diffs = _f_fp(poly, z, m)
    step = -f / fp
    eta = np.abs(step)
    radius = 2.0 * eta
    s1 = np.zeros(m.shape)
    s2 = np.zeros(m.shape)
    log_prod = np.full(m.shape, np.log(poly.constant))
    for a, k in zip(diffs, poly.multiplicities):
        b = np.abs(a) + radius
        inv = 1.0 / b
        s1 += k * inv
        s2 += k * inv * inv
        log_prod += k * np.log(b)
    h = eta * np.exp(log_prod - np.log(np.abs(fp))) * np.maximum(s1 * s1 - s2, 0.0)
    h = np.where(np.isfinite(h), h, np.where(eta == 0, 0.0, np.inf))
    return h, step


def _newton(poly: MInverse, z: np.ndarray, m: np.ndarray, tol: float, max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Newton iterations until ``|step| <= tol * |m|`` (or stagnation at rounding level); returns ``(m, converged)``."""
    m = m.copy()
    conv = np.zeros(m.shape, dtype=bool)
    idx = np.arange(m.size)
    prev = np.full(m.size, np.inf)
    for _ in range(max_iter):
        f, fp, _ = _f_fp(poly, z[idx], m[idx])
        step = -f / fp
        size = np.abs(step)
        scale = np.abs(m[idx]) + 1e-300
        m[idx] = m[idx] + step
        done = (size <= tol * scale) | ((size >= 0.5 * prev[idx]) & (size <= 1e-9 * scale))
        prev[idx] = size
        conv[idx[done]] = True
        idx = idx[~done]
        if idx.size == 0:
            break
    return m, conv


class _Recorder:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.z: list[np.ndarray] = []
        self.m: list[np.ndarray] = []
        self.h: list[np.ndarray] = []

    def add(self, z: np.ndarray, m: np.ndarray, h: np.ndarray) -> None:
        if self.enabled:
            self.z.append(np.array(z, dtype=complex))
            self.m.append(np.array(m, dtype=complex))
            self.h.append(np.array(h, dtype=float))

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        if not self.enabled:
            return None
        if not self.z:
            return np.zeros(0, complex), np.zeros(0, complex), np.zeros(0)
        return np.concatenate(self.z), np.concatenate(self.m), np.concatenate(self.h)


@dataclass
class _State:
    m: np.ndarray
    ok: np.ndarray
    steps: np.ndarray
    tests: np.ndarray
    hmax: np.ndarray


def _first_basin(poly: MInverse, z_target: np.ndarray, st: _State, idx: np.ndarray, rec: _Recorder, max_tests: int):
    """Double the imaginary part from ``z_target`` until K(z, 0) passes; returns the certified start points."""
    z = z_target[idx].copy()
    z0 = np.empty_like(z)
    alive = np.ones(idx.size, dtype=bool)
    todo = np.arange(idx.size)
    for _ in range(max_tests):
        h, _ = _kantorovich(poly, z[todo], np.zeros(todo.size, dtype=complex))
        st.tests[idx[todo]] += 1
        ok = h < 0.5
        done = todo[ok]
        z0[done] = z[done]
        rec.add(z[done], np.zeros(done.size, complex), h[ok])
        st.hmax[idx[done]] = np.maximum(st.hmax[idx[done]], h[ok])
        todo = todo[~ok]
        if todo.size == 0:
            break
        z[todo] = z[todo].real + 2j * z[todo].imag
        too_far = ~np.isfinite(z[todo].imag) | (z[todo].imag > 1e300)
        alive[todo[too_far]] = False
        todo = todo[~too_far]
    alive[todo] = False
    good = np.nonzero(alive)[0]
    m0, conv = _newton(poly, z0[good], np.zeros(good.size, dtype=complex), 1e-14, 100)
    alive[good[~conv]] = False
    st.steps[idx[good]] += 1
    m_start = np.full(idx.size, np.nan + 0j)
    m_start[good] = m0
    return z0, m_start, alive


def _homotopy(
    poly: MInverse,
    z_target: np.ndarray,
    z_start: np.ndarray,
    m_start: np.ndarray,
    st: _State,
    idx: np.ndarray,
    rec: _Recorder,
    max_tests: int,
) -> np.ndarray:
    """Certified path from ``(z_start, m_start)`` to ``z_target[idx]``; returns a success mask over ``idx``."""
    zt = z_target[idx]
    z = z_start.copy()
    m = m_start.copy()
    dz = zt - z
    success = dz == 0
    failed = ~np.isfinite(m)
    used = np.zeros(idx.size, dtype=int)
    active = np.nonzero(~success & ~failed)[0]
    while active.size:
        zc = z[active] + dz[active]
        h, step = _kantorovich(poly, zc, m[active])
        used[active] += 1
        ok = h < 0.5
        acc, rej = active[ok], active[~ok]
        if acc.size:
            rec.add(zc[ok], m[acc], h[ok])
            st.hmax[idx[acc]] = np.maximum(st.hmax[idx[acc]], h[ok])
            remaining_before = zt[acc] - z[acc]
            final = dz[acc] == remaining_before
            z[acc] = np.where(final, zt[acc], zc[ok])
            m_new, conv = _newton(poly, z[acc], m[acc] + step[ok], 1e-14, 100)
            m[acc] = m_new
            failed[acc[~conv]] = True
            success[acc[final & conv]] = True
            st.steps[idx[acc]] += 1
            cont = acc[~final & conv]
            rem = zt[cont] - z[cont]
            proposal = 2.0 * np.abs(dz[cont])
            absrem = np.abs(rem)
            dz[cont] = np.where(absrem <= proposal, rem, rem / np.where(absrem > 0, absrem, 1.0) * proposal)
        if rej.size:
            dz[rej] = 0.5 * dz[rej]
            tiny = np.abs(dz[rej]) <= 1e-15 * np.maximum(np.abs(z[rej]), 1e-300)
            failed[rej[tiny]] = True
        failed |= used >= max_tests
        active = np.nonzero(~success & ~failed)[0]
    st.tests[idx] += used
    st.m[idx] = np.where(success, m, np.nan)
    return success


def solve(
    poly: MInverse,
    z: np.ndarray | complex,
    *,
    continuation: bool = False,
    stride: int = 16,
    max_tests: int = 4000,
    record: bool = False,
    start: tuple[np.ndarray, np.ndarray] | None = None,
) -> LilypadResult:
    """Certified :math:`M(z)` at every target ``z`` (upper half-plane), vectorised.

    Args:
        poly: the inverse moment function :math:`P(m)/m`.
        z: targets with ``Im z > 0`` (any shape; flattened).
        continuation: solve the targets, sorted by real part, coarse-to-fine (every ``stride``-th from scratch, the
            others from a certified neighbour): about 10x fewer Kantorovich tests, but more lock-step rounds, so it is
            usually slower in numpy than the default, which runs every target from its own first basin.
        stride: coarse spacing of the continuation (a power of two).
        max_tests: Kantorovich tests allowed per target and path.
        record: keep ``(z, m_start, h)`` of every accepted step in ``result.record``.
        start: optional certified proxies ``(z0, m0)``, one per target, with ``m0 = M(z0)`` from an earlier solve
            (``nan`` entries start from scratch): each target is reached by a certified path from its proxy.

    Returns:
        A :class:`LilypadResult` (flattened, in input order).

    Raises:
        ValueError: a target with ``Im z <= 0`` or non-finite, or a bad ``stride``.
    """
    z = np.atleast_1d(np.asarray(z, dtype=complex)).ravel()
    if not np.all(np.isfinite(z)):
        raise ValueError(f"targets must be finite, got {z[~np.isfinite(z)][:5].tolist()!r}")
    if np.any(z.imag <= 0):
        bad = z[z.imag <= 0][:5]
        raise ValueError(
            f"lilypads needs Im z > 0 (M is analytic only off the real axis; y <= 0 would never converge), got {bad!r}"
        )
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"stride must be a power of two >= 1, got {stride!r}")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        return _solve(poly, z, continuation, stride, max_tests, record, start)


def _solve(
    poly: MInverse,
    z: np.ndarray,
    continuation: bool,
    stride: int,
    max_tests: int,
    record: bool,
    start: tuple[np.ndarray, np.ndarray] | None,
) -> LilypadResult:
    n = z.size
    st = _State(
        m=np.full(n, np.nan + 0j),
        ok=np.zeros(n, bool),
        steps=np.zeros(n, int),
        tests=np.zeros(n, int),
        hmax=np.zeros(n),
    )
    rec = _Recorder(record)

    def from_scratch(idx: np.ndarray) -> None:
        if idx.size == 0:
            return
        z0, m0, alive = _first_basin(poly, z, st, idx, rec, max_tests)
        good = np.nonzero(alive)[0]
        st.ok[idx[good]] = _homotopy(poly, z, z0[good], m0[good], st, idx[good], rec, max_tests)

    if start is not None:
        z0 = np.asarray(start[0], dtype=complex).ravel()
        m0 = np.asarray(start[1], dtype=complex).ravel()
        if z0.shape != z.shape or m0.shape != z.shape:
            raise ValueError(f"start must hold one (z0, m0) pair per target ({n}), got {z0.shape} and {m0.shape}")
        have = np.nonzero(np.isfinite(m0) & (z0.imag > 0))[0]
        if have.size:
            st.ok[have] = _homotopy(poly, z, z0[have], m0[have], st, have, rec, max_tests)
        from_scratch(np.nonzero(~st.ok)[0])
    elif not continuation or n <= 2:
        from_scratch(np.arange(n))
    else:
        order = np.argsort(z.real, kind="stable")
        coarse = order[np.r_[np.arange(0, n, stride), n - 1]]
        coarse = np.unique(coarse)
        from_scratch(coarse)
        done = np.zeros(n, bool)
        done[coarse] = True
        s = stride
        while s > 1:
            half = s // 2
            pos = np.arange(half, n, s)
            pos = pos[~done[order[pos]]]
            new, nbr = order[pos], order[pos - half]
            have = st.ok[nbr]
            idx = new[have]
            if idx.size:
                st.ok[idx] = _homotopy(poly, z, z[nbr[have]], st.m[nbr[have]], st, idx, rec, max_tests)
            retry = np.concatenate([new[~have], idx[~st.ok[idx]]])
            from_scratch(retry)
            done[new] = True
            s = half
    m = np.where(st.ok, st.m, np.nan + 1j * np.nan)
    return LilypadResult(
        z=z,
        m=m,
        certified=st.ok.copy(),
        num_steps=st.steps,
        num_tests=st.tests,
        max_kantorovich=st.hmax,
        record=rec.result(),
    )
