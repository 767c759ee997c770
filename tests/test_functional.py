import pytest
import torch
from torch import nn

from lightning_hessian import ConvergenceWarning, hessian_eigenvalues
from tests.cases import CASES, dense_hessian, make_case, mse_loss


@pytest.mark.parametrize("name", CASES)
def test_top_k_matches_dense_reference(name):
    model, loss_fn, batches = make_case(name, seed=1)
    reference = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches)).flip(0)
    k = 12
    eigenvalues = hessian_eigenvalues(model, loss_fn, batches, k=k)
    assert eigenvalues.dtype == torch.float64 and eigenvalues.shape == (k,)
    rel = (eigenvalues - reference[:k]).abs() / reference[:k].abs()
    assert rel.max() <= 1e-8


def test_bottom_k_and_float32_model():
    model, loss_fn, batches = make_case("tanh_mse", seed=2)
    reference = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches))
    bottom = hessian_eigenvalues(model, loss_fn, batches, k=3, which="smallest", tol=1e-10)
    torch.testing.assert_close(bottom, reference[:3], atol=1e-9 * float(reference.abs().max()), rtol=0)
    model32 = model.float()
    batches32 = [(x.float(), y.float()) for x, y in batches]
    top = hessian_eigenvalues(model32, loss_fn, batches32, k=3, dtype=torch.float64)
    assert hessian_eigenvalues(model32, loss_fn, batches32, k=3).dtype == torch.float32
    torch.testing.assert_close(top, reference.flip(0)[:3], rtol=1e-5, atol=0)


def test_k_larger_than_parameter_count_is_clamped():
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    with pytest.warns(UserWarning, match="exceeds the number of trainable parameters"):
        eigenvalues = hessian_eigenvalues(model, mse_loss, [(x, y)], k=10)
    reference = torch.linalg.eigvalsh(dense_hessian(model, mse_loss, [(x, y)])).flip(0)
    torch.testing.assert_close(eigenvalues, reference, atol=1e-12, rtol=0)


def test_budget_warning_and_bad_k():
    model, loss_fn, batches = make_case("relu_ce")
    with pytest.warns(ConvergenceWarning, match="max_hvps"):
        hessian_eigenvalues(model, loss_fn, batches, k=10, max_hvps=12)
    with pytest.raises(ValueError, match="positive integer"):
        hessian_eigenvalues(model, loss_fn, batches, k=0)


def test_slq_and_hutchinson_on_a_real_hessian():
    """SLQ with the canonical basis as probes is exact: moments equal tr(H^j)/P; Hutchinson within 3 stderr."""
    from lightning_hessian import HessianOperator, hutchinson_trace, stochastic_lanczos_quadrature

    model, loss_fn, batches = make_case("bn_tanh_ce", seed=4)
    dense = dense_hessian(model, loss_fn, batches)
    n = dense.shape[0]
    operator = HessianOperator(model, loss_fn, batches, cache_graph=True)
    quad = stochastic_lanczos_quadrature(operator.matvec, n, num_steps=6, probes=torch.eye(n, dtype=torch.float64))
    for j in range(1, 6):
        exact = float(torch.trace(torch.linalg.matrix_power(dense, j))) / n
        assert quad.moment(j) == pytest.approx(exact, rel=1e-9, abs=1e-14)
    grid = torch.linspace(float(quad.nodes.min()) - 1, float(quad.nodes.max()) + 1, 4001, dtype=torch.float64)
    assert torch.trapezoid(quad.density(grid, sigma=0.05), grid).item() == pytest.approx(1.0, abs=1e-6)
    estimate = hutchinson_trace(operator.matvec, n, num_samples=48, seed=3)
    assert abs(estimate.value - float(torch.trace(dense))) <= 3 * estimate.stderr


def test_return_result_budget_and_integer_types():
    import numpy as np

    from lightning_hessian import EigenResult

    model, loss_fn, batches = make_case("relu_ce", seed=1)
    reference = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches)).flip(0)
    result = hessian_eigenvalues(model, loss_fn, batches, k=np.int64(3), seed=np.int32(2), return_result=True)
    assert isinstance(result, EigenResult) and result.converged and result.eigenvalues.shape == (3,)
    assert result.num_matvecs > 0 and result.residual_norms.shape == (3,)
    assert ((result.eigenvalues - reference[:3]).abs() / reference[:3].abs()).max() <= 1e-8
    values = hessian_eigenvalues(model, loss_fn, batches, k=3, max_hvps=np.int64(200), cache_graph=False)
    torch.testing.assert_close(values, result.eigenvalues, rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="max_hvps"):
        hessian_eigenvalues(model, loss_fn, batches, k=3, max_hvps=2)
    for bad in ({"k": 2.5}, {"k": True}, {"seed": "a"}, {"max_hvps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            hessian_eigenvalues(model, loss_fn, batches, **{"k": 3, **bad})
