import numpy as np
import pytest
from scipy.optimize import brentq

from lightning_hessian.free_probability.lilypads import kantorovich, solve
from lightning_hessian.free_probability.transforms import MInverse


def fuss_catalan_density(x, L):
    """Exact density of the Fuss-Catalan law (product of L square Ginibre matrices), s = L + 1.

    x(phi) = sin(s phi)^s / (sin(phi) sin((s-1) phi)^(s-1)), rho = sin(s phi) sin(phi) / (pi x sin((s-1) phi)),
    phi in (0, pi/s).
    """
    s = L + 1

    def x_of(phi):
        return np.sin(s * phi) ** s / (np.sin(phi) * np.sin((s - 1) * phi) ** (s - 1))

    out = []
    for xv in np.atleast_1d(x):
        phi = brentq(lambda p, xv=xv: np.log(x_of(p)) - np.log(xv), 1e-12, np.pi / s - 1e-12, xtol=1e-15)
        out.append(np.sin(s * phi) * np.sin(phi) / (np.pi * xv * np.sin((s - 1) * phi)))
    return np.array(out)


def density(poly, res):
    return -(((res.m + 1.0 - poly.atom_at_zero) / res.z).imag) / np.pi


def test_marchenko_pastur_oracle_values():
    poly = MInverse(1.0, [-1.0, -1.0])
    x = np.array([0.5, 1.0, 2.0, 3.0, 3.9])
    res = solve(poly, x + 1e-4j)
    assert res.certified.all()
    np.testing.assert_allclose(density(poly, res), [0.42108, 0.27566, 0.15915, 0.09189, 0.02549], atol=6e-6)
    exact = np.sqrt(x * (4 - x)) / (2 * np.pi * x)
    np.testing.assert_allclose(density(poly, res), exact, atol=5e-5)


@pytest.mark.parametrize("L", [2, 5])
def test_fuss_catalan_density_matches_closed_parametrisation(L):
    poly = MInverse(1.0, [-1.0] * (L + 1))
    edge = (L + 1) ** (L + 1) / L**L
    x = np.linspace(0.05, 0.95, 23) * edge
    res = solve(poly, x * (1 + 1e-11j))
    assert res.certified.all()
    np.testing.assert_allclose(density(poly, res), fuss_catalan_density(x, L), rtol=1e-6)


def test_every_accepted_step_satisfies_kantorovich_independently():
    poly = MInverse(8.0, [-1.0, -0.5, -0.5, -0.5])  # ReLU, L = 3
    x = np.linspace(-0.5, 17.0, 60)
    res = solve(poly, x + 1e-3j, record=True)
    assert res.certified.all()
    z, m0, h = res.record
    assert z.size >= x.size and np.all(h < 0.5)
    assert np.all(res.max_kantorovich < 0.5)
    # independent re-check with expanded polynomial coefficients: sup |f''| sampled on the circle |w - m0| = 2 eta is a
    # lower bound of the sup over the ball, so it must not exceed the bound used by the solver.
    coeffs = 8.0 * np.poly([-1.0, -0.5, -0.5, -0.5])
    d1, d2 = np.polyder(coeffs), np.polyder(coeffs, 2)
    rng = np.random.default_rng(0)
    for i in rng.choice(z.size, size=min(200, z.size), replace=False):
        f = np.polyval(coeffs, m0[i]) - z[i] * m0[i]
        fp = np.polyval(d1, m0[i]) - z[i]
        eta = abs(f / fp)
        circle = m0[i] + 2 * eta * np.exp(2j * np.pi * np.arange(256) / 256)
        h_low = eta * np.abs(np.polyval(d2, circle)).max() / abs(fp)
        assert h_low <= h[i] * (1 + 1e-8) + 1e-300
        # the lilypad is real: Newton from m0 converges to a root within 2 eta
        m = m0[i]
        for _ in range(60):
            m = m - (np.polyval(coeffs, m) - z[i] * m) / (np.polyval(d1, m) - z[i])
        assert abs(np.polyval(coeffs, m) - z[i] * m) < 1e-10
        assert abs(m - m0[i]) <= 2 * eta * (1 + 1e-9) + 1e-14


def test_kantorovich_function_rejects_far_start_and_accepts_root():
    poly = MInverse(1.0, [-1.0, -1.0])
    z = np.array([2.0 + 1e-3j])
    h_far, _ = kantorovich(poly, z, np.array([5.0 + 0j]))
    res = solve(poly, z)
    h_root, step = kantorovich(poly, z, res.m)
    assert h_far[0] > 0.5
    assert h_root[0] < 1e-10 and abs(step[0]) < 1e-12


def test_continuation_and_independent_paths_agree():
    poly = MInverse(2.0, [-1.0, -0.5, -0.25])
    x = np.linspace(-1.0, 8.0, 301)
    a = solve(poly, x + 1e-4j, continuation=True)
    b = solve(poly, x + 1e-4j, continuation=False)
    assert a.certified.all() and b.certified.all()
    np.testing.assert_allclose(a.m, b.m, rtol=1e-10, atol=1e-12)
    # m solves P(m) = z m
    np.testing.assert_allclose(poly.p(a.m), a.z * a.m, rtol=1e-9, atol=1e-12)
    # branch: Im M(z) < 0 in the upper half-plane, and the density is non-negative
    assert np.all(a.m.imag < 0)


def test_uncertified_points_are_reported_not_filled():
    poly = MInverse(1.0, [-1.0] * 11)
    res = solve(poly, np.array([1e-6 + 1e-9j, 3.0 + 1e-4j]), continuation=False, max_tests=3)
    assert not res.certified[0]
    assert np.isnan(res.m[0])


@pytest.mark.parametrize("bad", [0.0, -1e-4])
def test_non_positive_imaginary_part_raises(bad):
    poly = MInverse(1.0, [-1.0, -1.0])
    with pytest.raises(ValueError, match="Im z > 0"):
        solve(poly, np.array([1.0 + bad * 1j]))
    with pytest.raises(ValueError, match="finite"):
        solve(poly, np.array([np.nan + 1j]))


def test_proxy_start_matches_scratch():
    poly = MInverse(1.0, [-1.0] * 4)
    x = np.array([0.3, 1.0, 2.0])
    base = solve(poly, x * (1 + 1e-10j))
    new = solve(poly, 1.1 * x * (1 + 1e-10j), start=(x * (1 + 1e-10j), base.m))
    ref = solve(poly, 1.1 * x * (1 + 1e-10j), continuation=False)
    np.testing.assert_allclose(new.m, ref.m, rtol=1e-10)
