from math import comb

import numpy as np
import pytest

from lightning_hessian.free_probability.transforms import (
    MInverse,
    bernoulli_law,
    free_poisson_law,
    moments_to_s_series,
    point_mass_law,
    s_bernoulli,
    s_free_poisson,
    s_series_to_moments,
    s_zero_padding,
    series_inverse,
    series_mul,
    series_reverse,
)


def fuss_catalan(L, n):
    return np.array([comb((L + 1) * k, k) / (L * k + 1) for k in range(1, n + 1)])


def narayana_moments(rate, jump, n):
    # free Poisson: m_k = jump^k sum_j N(k, j) rate^j, N(k, j) = C(k, j) C(k, j-1) / k
    return np.array(
        [jump**k * sum(comb(k, j) * comb(k, j - 1) / k * rate**j for j in range(1, k + 1)) for k in range(1, n + 1)]
    )


@pytest.mark.parametrize("L", [1, 2, 3, 5])
def test_product_of_ginibre_s_series_gives_fuss_catalan(L):
    n = 7
    s = np.zeros(n)
    s[0] = 1.0
    for _ in range(L):
        s = series_mul(s, series_inverse(np.array([1.0, 1.0]), n - 1), n - 1)
    np.testing.assert_allclose(s_series_to_moments(s, n), fuss_catalan(L, n), rtol=1e-12)


def test_series_reverse_inverts_composition():
    a = np.array([0.0, 2.0, -0.5, 0.3, 0.1, -0.2])
    g = series_reverse(a, 5)
    # f(g(m)) == m up to order 5
    comp = np.zeros(6)
    power = np.zeros(6)
    power[0] = 1.0
    for j in range(1, 6):
        power = series_mul(power, g, 5)
        comp += a[j] * power
    np.testing.assert_allclose(comp, [0, 1, 0, 0, 0, 0], atol=1e-13)


def test_moments_s_series_roundtrip_for_arbitrary_law():
    rng = np.random.default_rng(0)
    atoms, probs = rng.uniform(0.1, 2.0, 5), rng.dirichlet(np.ones(5))
    mom = np.array([np.sum(probs * atoms**k) for k in range(1, 9)])
    s = moments_to_s_series(mom, 7)
    np.testing.assert_allclose(s_series_to_moments(s, 8), mom, rtol=1e-10)
    assert s[0] == pytest.approx(1 / mom[0])
    # S(m) = 1/m_1 [1 - m (m_2 - m_1^2)/m_1^2 + O(m^2)]
    assert s[1] == pytest.approx(-(mom[1] - mom[0] ** 2) / mom[0] ** 3)


@pytest.mark.parametrize(("rate", "jump"), [(1.0, 1.0), (0.4, 2.0), (3.0, 0.5)])
def test_free_poisson_law_moments_are_narayana(rate, jump):
    law = free_poisson_law(rate, jump)
    np.testing.assert_allclose(law.moments(6), narayana_moments(rate, jump, 6), rtol=1e-12)
    u = np.array([0.1 + 0.2j, -0.3j])
    np.testing.assert_allclose(law.s_transform(u), s_free_poisson(u, rate, jump), rtol=1e-14)


def test_bernoulli_and_point_mass_laws():
    law = bernoulli_law(0.3, 2.0)
    np.testing.assert_allclose(law.moments(5), [0.3 * 2.0**k for k in range(1, 6)], rtol=1e-12)
    u = np.array([0.5, 0.1 + 1j])
    np.testing.assert_allclose(law.s_transform(u), s_bernoulli(u, 0.3, 2.0), rtol=1e-14)
    np.testing.assert_allclose(point_mass_law(1.7).moments(4), 1.7 ** np.arange(1, 5), rtol=1e-12)


@pytest.mark.parametrize("c", [0.25, 0.6, 1.0])
def test_zero_padding_lemma(c):
    # padded law c*mu + (1-c)*delta_0 has moments c*m_k; compare S computed from those moments with the lemma
    base = free_poisson_law(1.5, 0.7)
    padded_moments = c * base.moments(9)
    s_series = moments_to_s_series(padded_moments, 8)
    s_lemma = s_zero_padding(base.s_transform, c)
    for m in [0.01, -0.02, 0.015j]:
        direct = np.polyval(s_series[::-1], m)
        assert abs(s_lemma(np.array(m)) - direct) < 1e-9 * abs(direct)


def test_m_inverse_readouts_marchenko_pastur_and_relu():
    mp = MInverse(1.0, [-1.0, -1.0])
    assert mp.support() == pytest.approx((0.0, 4.0))
    assert mp.atom_at_zero == 0.0
    np.testing.assert_allclose(mp.moments(5), [1, 2, 5, 14, 42], rtol=1e-12)
    # ReLU, square, sigma^2 = 2, L = 3: (1 + m)(1 + 2m)^3 / m
    relu = MInverse(8.0, [-1.0, -0.5, -0.5, -0.5])
    np.testing.assert_allclose(relu.moments(4), [1, 7, 67, 741], rtol=1e-12)
    assert relu.atom_at_zero == 0.5
    assert relu.singularity_order == 3


def test_m_inverse_rectangular_gap_edges():
    # W: N1 x N0 with N1 = 3 N0, entries var 1/N0: W^T W ~ MP with edges 3 (1 -+ sqrt(1/3))^2
    ratio = 1 / 3  # N0 / N1
    poly = MInverse(3.0 * ratio, [-1.0, -1.0 / ratio])
    a, b = poly.support()
    assert a == pytest.approx(3 * (1 - np.sqrt(ratio)) ** 2, rel=1e-10)
    assert b == pytest.approx(3 * (1 + np.sqrt(ratio)) ** 2, rel=1e-10)
    assert poly.atom_at_zero == 0.0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        bernoulli_law(0.0)
    with pytest.raises(ValueError, match="rate"):
        free_poisson_law(-1.0)
    with pytest.raises(ValueError, match="negative"):
        MInverse(1.0, [-1.0, 0.5])
    with pytest.raises(ValueError, match="positive mean"):
        moments_to_s_series(np.array([0.0, 1.0]), 1)
