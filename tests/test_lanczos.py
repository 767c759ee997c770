import math

import pytest
import torch

from lightning_hessian.lanczos import hutchinson_trace, lanczos, stochastic_lanczos_quadrature
from tests.cases import symmetric_with_spectrum


def power_law_spectrum(n: int, seed: int = 0) -> torch.Tensor:
    """A Hessian-like spectrum: a power-law top, a bulk at zero and a few small negative values."""
    gen = torch.Generator().manual_seed(seed)
    top = 10.0 / torch.arange(1, n // 3 + 1, dtype=torch.float64) ** 1.2
    zeros = torch.zeros(n - n // 3 - 5, dtype=torch.float64)
    negative = -0.05 * torch.rand(5, generator=gen, dtype=torch.float64)
    return torch.cat([top, zeros, negative])


@pytest.mark.parametrize(("n", "k"), [(60, 10), (300, 20), (400, 60), (25, 25)])
def test_top_k_matches_eigvalsh(n, k):
    matrix = symmetric_with_spectrum(power_law_spectrum(n), seed=n)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    result = lanczos(lambda v: matrix @ v, n, k, return_eigenvectors=True)
    assert result.converged
    assert result.eigenvalues.shape == (k,)
    assert torch.all(result.eigenvalues[:-1] >= result.eigenvalues[1:])
    rel = (result.eigenvalues - reference).abs() / reference.abs().max()
    assert rel.max() <= 1e-10
    vectors = result.eigenvectors
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    residual = torch.linalg.vector_norm(matrix @ vectors - vectors * result.eigenvalues, dim=0)
    assert residual.max() <= 1e-6 * reference.abs().max() * 1.01
    torch.testing.assert_close(residual, result.residual_norms, atol=1e-8, rtol=0)


def test_bottom_k_returns_ascending_smallest():
    n, k = 120, 5
    spectrum = torch.linspace(-3, 4, n, dtype=torch.float64) ** 3
    matrix = symmetric_with_spectrum(spectrum, seed=1)
    result = lanczos(lambda v: matrix @ v, n, k, which="smallest", tol=1e-10)
    torch.testing.assert_close(result.eigenvalues, torch.linalg.eigvalsh(matrix)[:k], atol=1e-10, rtol=0)


def test_repeated_eigenvalues_are_all_found():
    n = 150
    spectrum = torch.cat([torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0]), 1.0 / torch.arange(2, n - 3)]).double()
    matrix = symmetric_with_spectrum(spectrum, seed=3)
    result = lanczos(lambda v: matrix @ v, n, 6)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([5.0, 5, 5, 2, 2, 0.5]).double(), atol=1e-10, rtol=0)


def test_low_rank_operator_breakdown():
    """A rank-3 operator: the Krylov space becomes invariant after 3 steps; fresh directions give the zeros."""
    n = 40
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(n, 3, generator=gen, dtype=torch.float64))[0]
    matrix = basis @ torch.diag(torch.tensor([3.0, 2.0, 1.0]).double()) @ basis.T
    result = lanczos(lambda v: matrix @ v, n, 5)
    torch.testing.assert_close(result.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0]).double(), atol=1e-12, rtol=0)


def test_budget_exhaustion_is_reported():
    n = 500
    matrix = symmetric_with_spectrum(torch.linspace(0, 1, n, dtype=torch.float64), seed=2)
    result = lanczos(lambda v: matrix @ v, n, 20, max_matvecs=30)
    assert not result.converged
    assert result.num_matvecs == 30
    assert result.residual_norms.max() > 1e-6


def test_warm_start_saves_products_and_seed_is_deterministic():
    n, k = 400, 10
    matrix = symmetric_with_spectrum(power_law_spectrum(n), seed=4)
    cold = lanczos(lambda v: matrix @ v, n, k, return_eigenvectors=True, seed=7)
    again = lanczos(lambda v: matrix @ v, n, k, seed=7)
    assert torch.equal(cold.eigenvalues, again.eigenvalues)
    perturbed = matrix + 1e-4 * symmetric_with_spectrum(torch.randn(n, dtype=torch.float64), seed=5)
    warm = lanczos(lambda v: perturbed @ v, n, k, start=cold.eigenvectors.sum(dim=1))
    fresh = lanczos(lambda v: perturbed @ v, n, k, seed=8)
    assert warm.converged and fresh.converged
    assert warm.num_matvecs < fresh.num_matvecs
    torch.testing.assert_close(warm.eigenvalues, fresh.eigenvalues, atol=1e-9, rtol=0)


def test_float32_solver():
    n, k = 200, 8
    matrix = symmetric_with_spectrum(power_law_spectrum(n), seed=6)
    m32 = matrix.float()
    result = lanczos(lambda v: m32 @ v, n, k, dtype=torch.float32, tol=1e-4)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    assert ((result.eigenvalues - reference).abs() / reference[0]).max() < 1e-5


def test_invalid_arguments():
    with pytest.raises(ValueError, match="k must satisfy"):
        lanczos(lambda v: v, 5, 6)
    with pytest.raises(ValueError, match="which"):
        lanczos(lambda v: v, 5, 2, which="biggest")
    with pytest.raises(ValueError, match="tol"):
        lanczos(lambda v: v, 5, 2, tol=0)
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * float("nan"), 5, 2)


def test_slq_quadrature_is_exact_per_probe():
    """Gauss quadrature from m steps reproduces vᵀA^p v/|v|² exactly for p < 2m; with the canonical basis as probes
    the average is exactly tr(A^p)/n."""
    n = 30
    matrix = symmetric_with_spectrum(power_law_spectrum(n), seed=9)
    quad = stochastic_lanczos_quadrature(lambda v: matrix @ v, n, num_steps=8, probes=torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(quad.weights.sum(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-13, rtol=0)
    for p in range(0, 16):
        exact = torch.trace(torch.linalg.matrix_power(matrix, p)) / n
        assert quad.moment(p) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)


def test_slq_density_integrates_to_one_and_moments_match_within_error():
    n = 400
    spectrum = power_law_spectrum(n)
    matrix = symmetric_with_spectrum(spectrum, seed=10)
    quad = stochastic_lanczos_quadrature(lambda v: matrix @ v, n, num_probes=40, num_steps=40, seed=3)
    assert quad.num_matvecs == 40 * 40
    grid = torch.linspace(-2, 12, 4001, dtype=torch.float64)
    density = quad.density(grid, sigma=0.05)
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-9)
    for p in (1, 2, 3):
        per_probe = (quad.weights * quad.nodes**p).sum(dim=1)
        stderr = float(per_probe.std() / math.sqrt(per_probe.numel()))
        exact = float((spectrum**p).mean())
        assert abs(quad.moment(p) - exact) <= 4 * stderr
    fraction, err = quad.fraction_below(1e-6)
    assert abs(fraction - (n - n // 3 - 5) / n) <= 4 * err + 0.05


def test_hutchinson_exact_on_diagonal_and_within_three_stderr():
    n = 300
    diagonal = torch.diag(torch.linspace(-1, 5, n, dtype=torch.float64))
    est = hutchinson_trace(lambda v: diagonal @ v, n, num_samples=5)
    assert est.value == pytest.approx(float(diagonal.trace()), rel=1e-13) and est.stderr == pytest.approx(0, abs=1e-12)
    matrix = symmetric_with_spectrum(power_law_spectrum(n), seed=11)
    for seed in range(3):
        est = hutchinson_trace(lambda v: matrix @ v, n, num_samples=64, seed=100 * seed)
        assert est.num_samples == 64 and est.stderr > 0
        assert abs(est.value - float(matrix.trace())) <= 3 * est.stderr
    with pytest.raises(ValueError):
        hutchinson_trace(lambda v: v, 3, num_samples=0)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_kronecker_multiplicities_of_multi_output_regression(k):
    """H = I_3 ⊗ A (multi-output least squares): every eigenvalue has multiplicity 3, invisible to one Krylov space."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    matrix = torch.kron(torch.eye(3, dtype=torch.float64), x.T @ x / 30)
    reference = torch.linalg.eigvalsh(matrix).flip(0)[:k]
    result = lanczos(lambda v: matrix @ v, 18, k)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, reference, atol=1e-10 * float(reference[0]), rtol=0)
