import math

import numpy as np
import pytest
import torch
from scipy import special
from torch import nn

from lightning_hessian.free_probability import JacobianLaw, UncertifiedPointWarning, UnsupportedArchitectureError

PHI = {
    "linear": (lambda h: h, np.ones_like),
    "relu": (lambda h: np.maximum(h, 0), lambda h: (h > 0).astype(float)),
    "hard_tanh": (lambda h: np.clip(h, -1, 1), lambda h: (np.abs(h) < 1).astype(float)),
    "tanh": (np.tanh, lambda h: 1 - np.tanh(h) ** 2),
    "erf": (special.erf, lambda h: 2 / np.sqrt(np.pi) * np.exp(-(h**2))),
}


def monte_carlo_eigenvalues(widths, sig2, acts, draws, seed, bias_var=0.0):
    """Non-zero eigenvalues of J^T J for real random nets (forward pass at a random input), pooled over draws."""
    rng = np.random.default_rng(seed)
    eigs = []
    for _ in range(draws):
        x = rng.standard_normal(widths[0])
        x *= np.sqrt(widths[0]) / np.linalg.norm(x)  # input mean square exactly 1 (the law is conditional on it)
        jac = None
        for ell in range(len(widths) - 1):
            w = rng.standard_normal((widths[ell + 1], widths[ell])) * np.sqrt(sig2[ell] / widths[ell])
            h = w @ x + rng.standard_normal(widths[ell + 1]) * np.sqrt(bias_var)
            phi, dphi = PHI[acts[ell]]
            jac = w if jac is None else w @ jac
            jac = dphi(h)[:, None] * jac
            x = phi(h)
        gram = jac @ jac.T if jac.shape[0] <= jac.shape[1] else jac.T @ jac
        eigs.append(np.linalg.eigvalsh(gram))
    return np.concatenate(eigs)


def assert_rel(pred, mc, rtols):
    for k, (p, m, r) in enumerate(zip(pred, mc, rtols), start=1):
        assert abs(p - m) <= r * abs(m), f"m_{k}: predicted {p:.6g}, Monte Carlo {m:.6g} (rtol {r})"


def mc_moments(eigs, n0, draws, k):
    return np.array([np.sum(eigs**j) / (n0 * draws) for j in range(1, k + 1)])


def test_relu_square_critical_moments_and_atom():
    law = JacobianLaw([500] * 4, 2.0, "relu")
    np.testing.assert_allclose(law.moments(4), [1, 7, 67, 741], rtol=1e-12)
    np.testing.assert_allclose(law.moments(4, exact=False), [1, 7, 67, 741], rtol=1e-12)
    assert law.atom_at_zero == 0.5
    law2 = JacobianLaw([500] * 3, 2.0, "relu")
    np.testing.assert_allclose(law2.density([0.5, 1.0, 2.0, 4.0]), [0.160, 0.0965, 0.055, 0.0285], atol=6e-4)


@pytest.mark.parametrize("L", [1, 3, 6])
def test_square_linear_is_fuss_catalan(L):
    law = JacobianLaw([300] * (L + 1), 1.0, "linear")
    k = np.arange(1, 6)
    np.testing.assert_allclose(law.moments(5), [math.comb((L + 1) * j, j) / (L * j + 1) for j in k], rtol=1e-12)
    assert law.support == pytest.approx((0.0, (L + 1) ** (L + 1) / L**L), rel=1e-10)


def test_marchenko_pastur_density_cdf_and_quantiles():
    law = JacobianLaw([200, 200], 1.0, "linear")
    x = np.array([0.5, 1.0, 2.0, 3.0, 3.9])
    np.testing.assert_allclose(law.density(x), np.sqrt(x * (4 - x)) / (2 * np.pi * x), atol=5e-5)
    # closed-form CDF at 2: 1/2 + 1/pi
    assert law.cdf(2.0) == pytest.approx(0.5 + 1 / np.pi, abs=1e-8)
    q = law.quantiles([0.1, 0.5, 0.9])
    np.testing.assert_allclose(law.cdf(q), [0.1, 0.5, 0.9], atol=1e-9)


@pytest.mark.parametrize(
    ("widths", "sig2", "acts"),
    [
        ([64, 50, 50, 10], [2.0, 2.0, 1.0], ["relu", "relu", "linear"]),
        ([100] * 4, [1.0] * 3, ["linear"] * 3),
        ([300, 600, 200], [1.3, 0.7], ["hard_tanh", "relu"]),
        ([200, 400, 300], [1.5, 1.0], ["tanh", "linear"]),
    ],
)
def test_integrals_of_the_density(widths, sig2, acts):
    law = JacobianLaw(widths, sig2, acts, input_variance=2.0)
    grid = law.spectrum(2048)
    x, rho = grid.x, grid.density
    # mass of the continuous part, first moment (the atom at zero adds nothing to the mean)
    mass = np.trapezoid(rho, x) + rho[0] * (x[0] - law.support[0])
    first = np.trapezoid(x * rho, x)
    assert mass == pytest.approx(1 - law.atom_at_zero, rel=2e-3)
    assert first == pytest.approx(law.moments(1, exact=False)[0], rel=1e-3)
    assert grid.cdf[-1] == 1.0
    # the closed-form CDF is the integral of the density (away from a singular edge at zero)
    i, j = len(x) // 4, 3 * len(x) // 4
    assert grid.cdf[j] - grid.cdf[i] == pytest.approx(np.trapezoid(rho[i : j + 1], x[i : j + 1]), rel=1e-4)
    # quantiles of the non-zero part
    q = law.quantiles([0.1, 0.5, 0.9])
    f = (law.cdf(q) - law.atom_at_zero) / (1 - law.atom_at_zero)
    np.testing.assert_allclose(f, [0.1, 0.5, 0.9], atol=1e-8)


def test_atom_at_zero_rank_bounds():
    law = JacobianLaw([64, 50, 50, 10], 2.0, ["relu", "relu", "linear"])
    assert law.atom_at_zero == pytest.approx(1 - 10 / 64)
    law = JacobianLaw([100, 120, 80], 2.0, ["relu", "relu"])
    assert law.atom_at_zero == pytest.approx(1 - min(1, 120 / 200, 80 / 200))
    law = JacobianLaw([100, 300, 200], 1.0, "linear")
    assert law.atom_at_zero == 0.0 and law.support[0] > 0  # full rank: a gap next to zero
    law = JacobianLaw([100, 300, 200], 1.0, "tanh")
    assert law.atom_at_zero >= 0.0 and law.atom_at_zero <= 1 - min(1, 200 / 100)


def test_output_space_consistency_of_rectangular_convention():
    # J J^T of a linear net is J'^T J' of the reversed net with W_l^T (fan-in N_l): N_0 m_k(J^T J) = N_L m_k(J J^T)
    widths, sig2 = [600, 1200, 900, 300], [1.0, 2.0, 0.5]
    law = JacobianLaw(widths, sig2, "linear")
    rev_w = widths[::-1]
    rev_s = [sig2[ell] * widths[ell + 1] / widths[ell] for ell in range(3)][::-1]
    rev = JacobianLaw(rev_w, rev_s, "linear")
    np.testing.assert_allclose(widths[0] * law.moments(5), widths[-1] * rev.moments(5), rtol=1e-11)
    np.testing.assert_allclose(law.quantiles([0.2, 0.5, 0.8]), rev.quantiles([0.2, 0.5, 0.8]), rtol=1e-7)


@pytest.mark.parametrize(
    ("widths", "sig2", "acts", "draws"),
    [
        ([600, 1200, 900, 300], [1.0, 2.0, 0.5], ["linear"] * 3, 3),
        ([500, 800, 400, 700], [2.0, 1.5, 2.5], ["relu", "relu", "relu"], 12),
        ([400, 1000, 600], [2.0, 1.0], ["relu", "linear"], 8),
    ],
)
def test_monte_carlo_rectangular_nets(widths, sig2, acts, draws):
    law = JacobianLaw(widths, sig2, acts)
    eigs = monte_carlo_eigenvalues(widths, sig2, acts, draws, seed=1)
    mc = mc_moments(eigs, widths[0], draws, 3)
    # finite-width fluctuations of m_1 are ~ sqrt(sum_l 1/N_l) per draw for ReLU (active-unit counts)
    # (max relative errors over seeds 0-5 with these draws: linear 0.4/0.5/1.3 %, ReLU 3.1/4.5/5.0 %)
    assert_rel(law.moments(3), mc, [0.04, 0.06, 0.08])
    # atom at zero and Kolmogorov distance of the non-zero part
    nonzero = eigs[eigs > 1e-9 * eigs.max()]
    atom_mc = 1 - nonzero.size / (widths[0] * draws)
    assert atom_mc == pytest.approx(law.atom_at_zero, abs=0.01)
    nonzero = np.sort(nonzero)
    f = (law.cdf(nonzero) - law.atom_at_zero) / (1 - law.atom_at_zero)
    emp = np.arange(1, nonzero.size + 1) / nonzero.size
    assert np.max(np.abs(f - emp)) < 0.03


def test_monte_carlo_density_histogram_relu():
    widths, sig2, acts = [800, 800, 800], [2.0, 2.0], ["relu", "relu"]
    law = JacobianLaw(widths, sig2, acts)
    eigs = monte_carlo_eigenvalues(widths, sig2, acts, 3, seed=5)
    edges = np.array([0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0])
    counts, _ = np.histogram(eigs, bins=edges)
    mc_density = counts / (eigs.size * np.diff(edges))
    pred = np.diff(law.cdf(edges)) / np.diff(edges)
    np.testing.assert_allclose(mc_density, pred, rtol=0.06)


def test_tanh_with_bias_monte_carlo_moments():
    widths, sig2, acts = [500, 700, 600], [1.8, 1.2], ["tanh", "tanh"]
    law = JacobianLaw(widths, sig2, acts, bias_variances=0.1)
    # the biases and the tanh slopes add finite-width noise (max errors over 6 seeds with 10 draws: 4 / 7 / 10 %)
    eigs = monte_carlo_eigenvalues(widths, sig2, acts, 16, seed=2, bias_var=0.1)
    mc = mc_moments(eigs, widths[0], 16, 3)
    assert_rel(law.moments(3), mc, [0.04, 0.07, 0.10])


def test_from_module_matches_monte_carlo_of_that_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(400, 700), nn.ReLU(), nn.Linear(700, 500), nn.Tanh(), nn.Linear(500, 300))
    x = torch.randn(6, 400, dtype=torch.float64)
    law = JacobianLaw.from_module(net, x)
    assert law.widths == [400, 700, 500, 300]
    assert law.activations == ("relu", "tanh", "linear")
    # PyTorch's default init: kaiming_uniform(a=sqrt(5)) -> Var = 1/(3 fan_in)
    np.testing.assert_allclose(law.weight_variances, 1 / 3, rtol=0.05)
    net64 = net.double()
    eigs = []
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(net64, x[i], vectorize=True)
        eigs.append(torch.linalg.eigvalsh(jac.T @ jac).numpy())
    eigs = np.concatenate(eigs)
    mc = mc_moments(eigs, 400, x.shape[0], 2)
    assert_rel(law.moments(2), mc, [0.02, 0.05])


def test_from_module_rejects_unsupported_architectures():
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(UnsupportedArchitectureError, match="Conv2d"):
        JacobianLaw.from_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10)), x)
    with pytest.raises(UnsupportedArchitectureError, match="BatchNorm"):
        JacobianLaw.from_module(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)), torch.randn(4, 8))

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.relu(self.a(x))

    with pytest.raises(UnsupportedArchitectureError):
        JacobianLaw.from_module(Residual(), torch.randn(4, 8))
    assert issubclass(UnsupportedArchitectureError, ValueError)


def test_from_module_reads_custom_chain_module_and_flatten():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(64, 32), nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))

    law = JacobianLaw.from_module(MLP(), torch.randn(5, 1, 8, 8))
    assert law.widths == [64, 32, 10] and law.activations == ("tanh", "linear")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(widths=[10], weight_variances=1.0, activations="relu"), "widths"),
        (dict(widths=[10, 5], weight_variances=1.0, activations="softplus"), "allowed"),
        (dict(widths=[10, 5, 4], weight_variances=[1.0], activations="relu"), "one value per layer"),
        (dict(widths=[10, 5], weight_variances=-1.0, activations="relu"), "weight_variances"),
        (dict(widths=[10, 5], weight_variances=1.0, activations=["relu", "relu"]), "one activation per layer"),
        (dict(widths=[10, 5], weight_variances=1.0, activations="tanh", input_variance=0.0), "input_variance"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JacobianLaw(**kwargs)


def test_density_errors_and_uncertified_warning():
    law = JacobianLaw([50, 50], 1.0, "linear")
    with pytest.raises(ValueError, match="y must be > 0"):
        law.density([1.0], y=0.0)
    with pytest.raises(ValueError, match="quantile levels"):
        law.quantiles([1.5])
    deep = JacobianLaw([50] * 12, 1.0, "linear")
    from lightning_hessian.free_probability import lilypads

    res = lilypads.solve(deep.m_inverse, np.array([1e-8 + 1e-12j]), max_tests=2)
    assert not res.certified[0]
    with pytest.warns(UncertifiedPointWarning):
        deep._warn(res)


@pytest.mark.parametrize(("acts", "atom"), [("linear", 0.0), ("relu", 0.5)])
def test_deep_singular_laws_are_resolved_near_zero(acts, atom):
    # depth 30: the density behaves like x^(-L/(L+1)) near 0, the low deciles are astronomically small
    law = JacobianLaw([100] * 31, 2.0 if acts == "relu" else 1.0, acts)
    assert law.atom_at_zero == pytest.approx(atom)
    levels = np.array([0.1, 0.5, 0.9])
    q = law.quantiles(levels)
    assert np.all(np.isfinite(q)) and q[0] < 1e-20
    np.testing.assert_allclose((law.cdf(q) - atom) / (1 - atom), levels, atol=1e-8)
    grid = law.spectrum(256)
    assert np.all(np.isfinite(grid.density)) and grid.x[0] < 1e-25
