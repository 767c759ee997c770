import math

import numpy as np
import pytest
import torch
from scipy import integrate, special

from lightning_hessian.free_probability import JacobianLaw
from lightning_hessian.free_probability.activations import (
    SMOOTH_ACTIVATIONS,
    activation_second_moment,
    derivative_square_law,
    derivative_square_moments,
    mean_field_variances,
)

PHI = {
    "tanh": np.tanh,
    "erf": special.erf,
    "gelu": lambda h: h * special.ndtr(h),
    "silu": lambda h: h * special.expit(h),
    "hard_tanh": lambda h: np.clip(h, -1, 1),
}


def gauss_expectation(fn, q):
    # integrate against N(0, q) with adaptive quadrature, splitting at the hard-tanh kinks
    def integrand(z):
        return fn(np.sqrt(q) * z) * np.exp(-0.5 * z * z) / np.sqrt(2 * np.pi)

    c = 1 / np.sqrt(q)
    pts = [-np.inf, -c, c, np.inf]
    return sum(integrate.quad(integrand, a, b, epsabs=1e-13, epsrel=1e-12)[0] for a, b in zip(pts[:-1], pts[1:]))


@pytest.mark.parametrize("name", ["tanh", "erf", "gelu", "silu", "hard_tanh"])
@pytest.mark.parametrize("q", [0.3, 1.7, 6.0])
def test_second_moment_of_activation(name, q):
    ref = gauss_expectation(lambda h: PHI[name](h) ** 2, q)
    assert activation_second_moment(name, q) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("name", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("q", [0.5, 2.5])
def test_derivative_square_moments_against_autograd_and_quadrature(name, q):
    def dphi2(h):
        t = torch.tensor(h, dtype=torch.float64, requires_grad=True)
        fn = {
            "tanh": torch.tanh,
            "erf": torch.erf,
            "gelu": torch.nn.functional.gelu,
            "silu": torch.nn.functional.silu,
        }[name]
        (g,) = torch.autograd.grad(fn(t).sum(), t)
        return g.detach().numpy() ** 2

    mu = derivative_square_moments(name, q, 3)
    for k in range(1, 4):
        ref = gauss_expectation(lambda h, k=k: dphi2(np.atleast_1d(h))[0] ** k if np.ndim(h) == 0 else dphi2(h) ** k, q)
        assert mu[k - 1] == pytest.approx(ref, rel=1e-8)


def test_exact_laws_for_relu_and_hard_tanh():
    assert derivative_square_moments("relu", 3.0, 3) == pytest.approx([0.5] * 3)
    p = math.erf(1 / math.sqrt(2 * 0.8))
    assert derivative_square_moments("hard_tanh", 0.8, 3) == pytest.approx([p] * 3)
    np.testing.assert_allclose(derivative_square_law("hard_tanh", 0.8).moments(4), [p] * 4, rtol=1e-12)
    np.testing.assert_allclose(derivative_square_law("relu", 0.8).moments(3), [0.5] * 3, rtol=1e-12)


def test_mean_field_recursion():
    q = mean_field_variances(np.array([2.0, 2.0, 2.0]), ("relu", "relu", "relu"), np.zeros(3), 1.5)
    np.testing.assert_allclose(q, [3.0, 3.0, 3.0])
    q = mean_field_variances(np.array([1.5, 0.8]), ("tanh", "tanh"), np.array([0.1, 0.2]), 2.0)
    assert q[0] == pytest.approx(3.1)
    assert q[1] == pytest.approx(0.8 * gauss_expectation(lambda h: np.tanh(h) ** 2, 3.1) + 0.2, rel=1e-9)


def test_mean_field_matches_a_wide_random_net():
    rng = np.random.default_rng(0)
    n, sig2, sb2 = 3000, [1.7, 1.3, 2.2], 0.05
    x = rng.standard_normal(n)
    x *= np.sqrt(n) / np.linalg.norm(x)
    qs = []
    for s in sig2:
        h = rng.standard_normal((n, n)) @ x * np.sqrt(s / n) + rng.standard_normal(n) * np.sqrt(sb2)
        qs.append(np.mean(h**2))
        x = np.tanh(h)
    pred = mean_field_variances(np.array(sig2), ("tanh",) * 3, np.full(3, sb2), 1.0)
    np.testing.assert_allclose(qs, pred, rtol=0.05)


@pytest.mark.parametrize("name", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("q", [0.2, 1.0, 4.0])
def test_smooth_approximation_matches_two_moments_without_atom(name, q):
    mu = derivative_square_moments(name, q, 2)
    law = derivative_square_law(name, q)
    np.testing.assert_allclose(law.moments(2), mu, rtol=1e-10)
    # free Poisson powers with rate >= 1: no atom at zero (the true law of phi'^2 has none)
    assert all(r <= -1.0 + 1e-12 for r in law.roots)
    two = derivative_square_law(name, q, "two_atom")
    np.testing.assert_allclose(two.moments(2), mu, rtol=1e-10)


# Measured accuracy of the rational approximation: relative error of m_3, m_4 of J^T J (square depth-3 nets,
# sigma_w^2 in {1, 2, 4}, free_poisson): tanh 1.3-3.2 % / 3.0-7.4 %, erf 1.6-3.6 % / 3.8-8.5 %,
# gelu 2.0-4.8 % / 4.5-11 %, silu 0.4-4.4 % / 0.8-10 %. m_1 and m_2 are exact.
@pytest.mark.parametrize("name", SMOOTH_ACTIVATIONS)
@pytest.mark.parametrize("sigma2", [1.0, 2.0, 4.0])
def test_documented_accuracy_of_smooth_approximation(name, sigma2):
    law = JacobianLaw([500] * 4, sigma2, name)
    exact, approx = law.moments(4), law.moments(4, exact=False)
    np.testing.assert_allclose(approx[:2], exact[:2], rtol=1e-9)
    rel = np.abs(approx / exact - 1)
    assert rel[2] < 0.05 and rel[3] < 0.12
    assert law.atom_at_zero == 0.0


def test_invalid_names_raise():
    with pytest.raises(ValueError, match="allowed"):
        derivative_square_moments("softplus", 1.0, 2)
    with pytest.raises(ValueError, match="approximation"):
        derivative_square_law("tanh", 1.0, "pade")
    with pytest.raises(ValueError, match="positive"):
        activation_second_moment("tanh", -1.0)
