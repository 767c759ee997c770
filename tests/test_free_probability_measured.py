import numpy as np
import pytest
import torch
from torch import nn

from lightning_hessian.free_probability import JacobianLaw, UnsupportedArchitectureError
from lightning_hessian.free_probability.measured import (
    MeasuredSpectrum,
    jacobian_eigenvalues,
    jacobian_report,
    law_distance,
)


def dense_reference(net, x):
    net64 = net.double()
    out = []
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v: net64(v.unsqueeze(0)).squeeze(0), x[i].double(), vectorize=True
        )
        jac = jac.reshape(-1, x[i].numel())
        out.append(torch.linalg.eigvalsh(jac.T @ jac).numpy())
    return np.sort(np.concatenate(out))


@pytest.mark.parametrize(("n_in", "n_out"), [(20, 7), (6, 15)])  # jacrev and jacfwd paths
def test_exact_eigenvalues_match_dense_reference(n_in, n_out):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(n_in, 11), nn.Tanh(), nn.Linear(11, n_out))
    x = torch.randn(3, n_in)
    ms = jacobian_eigenvalues(net, x, method="exact")
    assert ms.exact and ms.values.size == 3 * n_in and ms.input_dim == n_in
    np.testing.assert_allclose(ms.values, dense_reference(net, x), atol=1e-12, rtol=1e-10)
    assert net[0].weight.dtype == torch.float64  # dense_reference converted it; jacobian_eigenvalues works on a copy


def test_exact_eigenvalues_leave_module_untouched_and_flatten_inputs():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3))
    net.train()
    x = torch.randn(4, 3, 2, 2)
    ms = jacobian_eigenvalues(net, x)
    assert net.training and net[1].weight.dtype == torch.float32
    net.eval()
    ref = dense_reference(nn.Sequential(*[m for m in net if not isinstance(m, nn.Dropout)]), x.reshape(4, 12))
    np.testing.assert_allclose(ms.values, ref, atol=1e-10)
    _, _, atom = ms.nonzero()
    assert atom >= 1 - 3 / 12 - 1e-12


def test_slq_path_matches_exact_moments():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 30))
    x = torch.randn(2, 40)
    exact = jacobian_eigenvalues(net, x, method="exact")
    slq = jacobian_eigenvalues(net, x, method="slq", num_probes=16, num_steps=40)
    assert not slq.exact
    assert slq.weights.sum() == pytest.approx(1.0)
    # Gauss quadrature with 40 steps on a 40-dim operator is exact for the spectrum; the probes' weights average it
    assert slq.mean == pytest.approx(exact.mean, rel=0.1)
    assert slq.values.max() == pytest.approx(exact.values.max(), rel=1e-6)


def test_law_distance_small_for_matching_samples_and_large_for_wrong_law():
    law = JacobianLaw([200, 200, 200], 2.0, "relu")
    n = 2000
    levels = (np.arange(n) + 0.5) / n
    values = np.concatenate([np.zeros(n), np.sort(law.quantiles(levels))])  # the atom (1/2) plus the non-zero part
    ms = MeasuredSpectrum(values, np.full(values.size, 1 / values.size), 200, 1, True)
    assert ms.nonzero()[2] == pytest.approx(0.5)
    assert law_distance(ms, law) <= 0.5 / n + 1e-6
    assert law_distance(ms, law, metric="w1") < 5e-3 * law.mean
    wrong = JacobianLaw([200, 200, 200], 3.0, "relu")
    assert law_distance(ms, wrong) > 0.1
    assert law_distance(ms, wrong, metric="w1") > 0.1 * law.mean
    with pytest.raises(ValueError, match="metric"):
        law_distance(ms, law, metric="tv")


def test_jacobian_report_on_a_classifier():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(64, 50), nn.ReLU(), nn.Linear(50, 50), nn.ReLU(), nn.Linear(50, 10))
    x = torch.randn(32, 64)
    rep = jacobian_report(net, x, max_inputs=32)
    assert rep.atom_at_zero == pytest.approx(1 - 10 / 64)
    assert rep.measured_atom_at_zero == pytest.approx(1 - 10 / 64)
    assert rep.quantiles.shape == (9,) and np.all(np.diff(rep.quantiles) > 0)
    assert rep.mean == pytest.approx(rep.law.mean)
    assert 0 <= rep.law_distance < 0.2
    assert rep.grid.shape == rep.density.shape and np.all(rep.density >= 0)
    # measured mean within Monte-Carlo noise of the prediction (small widths: 15 %)
    assert rep.measured_mean == pytest.approx(rep.mean, rel=0.15)
    np.testing.assert_allclose(rep.measured_quantiles[4], rep.quantiles[4], rtol=0.3)
    with pytest.raises(UnsupportedArchitectureError):
        jacobian_report(nn.Sequential(nn.Conv1d(1, 2, 3)), torch.randn(2, 1, 8))
