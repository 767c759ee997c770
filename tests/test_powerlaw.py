import math

import numpy as np
import pytest
import torch

from lightning_hessian.powerlaw import eigengaps, fit_power_law, ks_critical_value, spectral_gap


def test_zipf_oracle():
    fit = fit_power_law(1.0 / np.arange(1, 1001))
    assert fit.k == 1000
    assert fit.beta == pytest.approx(2.0044, abs=5e-5)
    assert fit.s == pytest.approx(0.9956, abs=5e-5)
    assert fit.beta_stderr == pytest.approx(0.0318, abs=5e-5)
    assert fit.ks_distance == pytest.approx(0.0016, abs=5e-5)
    assert fit.ks_critical == pytest.approx(0.0430, abs=5e-5)
    assert fit.is_power_law
    assert fit.slope_ols == pytest.approx(1.0, abs=1e-12)  # exact rank law: OLS recovers s = 1 exactly
    assert fit.s * (fit.beta - 1) == pytest.approx(1.0, rel=1e-14)
    assert fit.beta_stderr == pytest.approx((fit.beta - 1) / math.sqrt(1000), rel=1e-14)
    assert fit.spectral_gap == pytest.approx(0.5) and fit.spectral_gap_ratio == pytest.approx(2.0)
    # gaps of 1/k are 1/(k(k+1)) ~ k^-2: exponent s + 1 = 2
    assert fit.eigengap_slope_ols == pytest.approx(2.0, abs=0.03)


def test_marchenko_pastur_negative_control():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((2000, 2000))
    eigenvalues = np.linalg.eigvalsh(g @ g.T / 2000)
    fit = fit_power_law(eigenvalues, k=1000)
    assert fit.k == 1000
    assert fit.ks_distance > 3 * fit.ks_critical
    assert not fit.is_power_law


def test_pareto_sample_recovers_exponent():
    rng = np.random.default_rng(1)
    beta = 2.5
    sample = (1 - rng.random(4000)) ** (-1 / (beta - 1))  # Pareto above 1 with density exponent beta
    fit = fit_power_law(sample)
    assert abs(fit.beta - beta) < 3 * fit.beta_stderr
    assert fit.is_power_law


@pytest.mark.parametrize(("k", "alpha", "expected"), [(1000, 0.05, 0.0430), (50, 0.05, 0.1923), (100, 0.01, 0.163)])
def test_critical_values(k, alpha, expected):
    assert ks_critical_value(k, alpha) == pytest.approx(expected, abs=5e-5)


def test_input_order_strides_types_and_sign_filtering():
    values = 1.0 / np.arange(1, 201)
    reference = fit_power_law(values)
    shuffled = np.random.default_rng(2).permutation(values)
    with_negatives = np.concatenate([shuffled, -np.abs(shuffled[:20]), np.zeros(5)])
    assert fit_power_law(with_negatives) == reference
    strided = torch.from_numpy(np.stack([shuffled, shuffled], axis=1))[:, 0]
    assert not strided.is_contiguous()
    assert fit_power_law(strided) == reference
    assert fit_power_law(list(shuffled)) == reference
    top = fit_power_law(values, k=50)
    assert top.k == 50 and top == fit_power_law(values[:50])
    assert fit_power_law(values, k=10_000).k == 200  # fewer positive values than k: all are used


def test_alpha_changes_only_the_decision():
    values = 1.0 / np.arange(1, 101) ** 1.3
    fits = {a: fit_power_law(values, alpha=a) for a in (0.2, 0.15, 0.1, 0.05, 0.01)}
    assert len({f.beta for f in fits.values()}) == 1
    assert [fits[a].ks_critical * 10 for a in (0.2, 0.15, 0.1, 0.05, 0.01)] == pytest.approx(
        [1.07, 1.14, 1.22, 1.36, 1.63]
    )


def test_invalid_input():
    with pytest.raises(ValueError, match="at least 3 positive"):
        fit_power_law([1.0, 0.5, -1.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        fit_power_law([1.0, float("nan"), 0.5, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        fit_power_law(torch.tensor([1.0, float("inf"), 0.5, 0.2]))
    with pytest.raises(ValueError, match="alpha must be one of"):
        fit_power_law([1.0, 0.5, 0.3], alpha=0.03)
    with pytest.raises(ValueError, match="k must be an integer"):
        fit_power_law([1.0, 0.5, 0.3], k=2)
    with pytest.raises(ValueError, match="all equal"):
        fit_power_law([2.0, 2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        fit_power_law([])
    values = 1.0 / np.arange(1, 201)
    for shaped in (values.reshape(20, 10), torch.from_numpy(values).reshape(2, 100), np.float64(1.0)):
        with pytest.raises(ValueError, match="must be a 1-D sequence"):  # no silent flattening
            fit_power_law(shaped)


def test_spectral_gap_and_eigengaps():
    assert spectral_gap([1.0, 4.0, 3.0]) == (1.0, pytest.approx(4 / 3))
    np.testing.assert_allclose(eigengaps([1.0, 4.0, 3.0]), [1.0, 2.0])
    with pytest.raises(ValueError, match="two eigenvalues"):
        spectral_gap([1.0])
