"""Hessian rank: closed forms (Singh et al. 2021) against the paper's oracles and dense float64 measurements."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from lightning_hessian.operators import HessianOperator
from lightning_hessian.rank import (
    HessianRank,
    NearZeroEstimate,
    dense_hessian_parts,
    linear_hessian_rank,
    matrix_rank_tolerance,
    near_zero_fraction,
    numerical_hessian_rank,
)

DT = torch.float64


def linear_net(widths: list[int], *, bias: bool = False, act: type[nn.Module] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if act is not None and i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def mse(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=1).mean()


def xent(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def make_data(widths, n, loss, seed=1, batch=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=DT)
    if loss == "mse":
        y = torch.randn(n, widths[-1], generator=g, dtype=DT)
    else:
        y = torch.randint(0, widths[-1], (n,), generator=g)
    batch = batch or n
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def triple(r: HessianRank) -> tuple[int, int, int]:
    return (r.loss, r.outer, r.functional)


# ------------------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(
    ("widths", "r", "loss", "expected"),
    [
        ([25, 5, 10, 10], 25, "mse", (250, 150, 175)),  # official notebook example, p = 275
        ([25, 5, 10, 10], 25, "cross_entropy", (245, 145, 165)),
        ([8, 6, 4], 8, "mse", (64, 32, 48)),
        ([4, 3, 2], 4, "mse", (16, 8, 12)),
    ],
)
def test_closed_form_oracles(widths, r, loss, expected):
    result = linear_hessian_rank(widths, r, loss=loss)
    assert triple(result) == expected
    assert result.num_params == sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    assert result.tolerance is None
    assert result.rank_deficiency == result.num_params - expected[0]


def test_closed_form_notebook_num_params_and_fraction():
    result = linear_hessian_rank([25, 5, 10, 10], 25)
    assert result.num_params == 275
    assert result.rank_fraction == pytest.approx(250 / 275)


@pytest.mark.parametrize("widths", [[7, 3, 9, 4], [5, 8, 8, 8, 2], [12, 2, 6], [3, 10, 10, 10]])
@pytest.mark.parametrize("r", [1, 2, 3])
def test_closed_form_structure(widths, r):
    # rank H_L = sum_l q (m'_{l-1} + m_l - q) with m'_0 = r, and H_L = H_o + H_f - q (2s - q) (overlap of the ranges)
    result = linear_hessian_rank(widths, r)
    k = widths[-1]
    q = min([r, k, *widths[1:-1]])
    s = min(r, k)
    dims = [r, *widths[1:]]
    assert result.loss == sum(q * (a + b - q) for a, b in zip(dims[:-1], dims[1:]))
    assert result.loss == result.outer + result.functional - q * (2 * s - q)
    assert 0 <= result.functional <= result.loss <= result.num_params


def test_closed_form_single_layer_has_no_functional_part():
    assert triple(linear_hessian_rank([6, 3], 6)) == (18, 18, 0)
    assert triple(linear_hessian_rank([6, 3], 2)) == (6, 6, 0)
    assert triple(linear_hessian_rank([6, 3], 6, loss="cross_entropy")) == (12, 12, 0)


def test_closed_form_zero_data_rank():
    assert triple(linear_hessian_rank([5, 4, 3], 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"widths": [5], "data_rank": 1}, "widths"),
        ({"widths": "abc", "data_rank": 1}, "widths"),
        ({"widths": [5, 0, 3], "data_rank": 1}, r"widths\[1\]"),
        ({"widths": [5, 2.5, 3], "data_rank": 1}, r"widths\[1\]"),
        ({"widths": [5, 3], "data_rank": 6}, "data_rank"),
        ({"widths": [5, 3], "data_rank": -1}, "data_rank"),
        ({"widths": [5, 3], "data_rank": 2, "loss": "hinge"}, "hinge"),
        ({"widths": [5, 1], "data_rank": 2, "loss": "cross_entropy"}, "2 outputs"),
    ],
)
def test_closed_form_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_hessian_rank(**kwargs)


# ------------------------------------------------------------------------------------------- measured vs closed forms


@pytest.mark.parametrize(
    ("widths", "n", "loss", "batch"),
    [
        ([25, 5, 10, 10], 50, "mse", 10),  # the notebook example, accumulated over mini-batches
        ([25, 5, 10, 10], 50, "cross_entropy", 20),  # unequal last batch (10)
        ([8, 6, 4], 20, "mse", None),
        ([10, 6, 5, 4], 7, "mse", None),  # n < d: r = n
        ([12, 4, 7, 3], 5, "cross_entropy", 2),  # n < d, cross-entropy, batches of 2, 2, 1
        ([3, 9, 1, 7, 4], 6, "mse", None),  # bottleneck of width 1
        ([6, 9, 5, 6], 30, "cross_entropy", None),  # n > d
        ([6, 3], 10, "mse", None),  # single layer: H_f = 0
    ],
)
def test_numerical_rank_equals_closed_form_on_linear_nets(widths, n, loss, batch):
    model = linear_net(widths, seed=n)
    batches = make_data(widths, n, loss, seed=n + 1, batch=batch)
    measured = numerical_hessian_rank(model, mse if loss == "mse" else xent, batches)
    predicted = linear_hessian_rank(widths, min(n, widths[0]), loss=loss)
    assert triple(measured) == triple(predicted)
    assert measured.num_params == predicted.num_params
    assert measured.tolerance is not None and measured.tolerance > 0


def test_numerical_rank_data_rank_deficient_inputs():
    # inputs spanning a 3-dimensional subspace of R^8: r = 3, not min(d, n)
    widths, n = [8, 6, 5, 4], 30
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, generator=g, dtype=DT) @ torch.randn(3, 8, generator=g, dtype=DT)
    y = torch.randn(n, 4, generator=g, dtype=DT)
    measured = numerical_hessian_rank(linear_net(widths, seed=4), mse, [(x, y)])
    assert triple(measured) == triple(linear_hessian_rank(widths, 3))


def test_numerical_rank_with_biases_matches_measured_oracle():
    # the research notes' measured oracle for nets with biases (no closed form for H_f / H_L): [25, 5, 10, 10], n = 50
    widths = [25, 5, 10, 10]
    batches = make_data(widths, 50, "mse", seed=7, batch=25)
    measured = numerical_hessian_rank(linear_net(widths, bias=True, seed=8), mse, batches)
    assert triple(measured) == (280, 160, 190)
    assert measured.num_params == 300
    q, r, k = 5, 25, 10
    assert measured.outer == q * (r + k - q) + k  # bias formula of H_o for generic n > d
    predicted = linear_hessian_rank(widths, 25, bias=True)
    assert triple(predicted) == (None, 160, None) and predicted.num_params == 300
    assert predicted.rank_deficiency is None and predicted.rank_fraction is None


def _ones_in_row_space(x):
    ones = torch.ones(1, x.shape[0], dtype=DT)
    r = int(torch.linalg.matrix_rank(x.T))
    ra = int(torch.linalg.matrix_rank(torch.cat([x.T, ones])))
    return r, ra


@pytest.mark.parametrize(
    ("widths", "n", "loss"),
    [
        ([6, 3], 10, "mse"),  # L = 1: H_f = 0, H_L = H_o
        ([6, 3], 4, "mse"),  # L = 1, n <= d
        ([5, 4, 3], 12, "mse"),  # n > d
        ([5, 4, 3], 3, "mse"),  # n <= d, q = r = K
        ([7, 2, 5], 4, "mse"),  # n <= d, bottleneck q < r
        ([7, 6, 5], 3, "mse"),  # n <= d, q = r < K
        ([2, 6, 4], 9, "mse"),  # q = d + 1 = r + 1 (the bias lifts the input rank)
        ([4, 1, 6], 11, "mse"),  # width-1 bottleneck
        ([25, 10, 10], 50, "mse"),
        ([5, 4, 4], 12, "cross_entropy"),  # K -> K - 1
        ([6, 3, 5], 4, "cross_entropy"),
    ],
)
def test_bias_closed_forms_match_measured_ranks(widths, n, loss):
    model = linear_net(widths, bias=True, seed=n)
    with torch.no_grad():
        for layer in model:
            layer.bias.normal_()  # generic biases
    batches = make_data(widths, n, loss, seed=n + 2)
    r, ra = _ones_in_row_space(batches[0][0])
    assert (r, ra) == (min(n, widths[0]), min(n, widths[0] + 1))
    measured = numerical_hessian_rank(model, mse if loss == "mse" else xent, batches)
    predicted = linear_hessian_rank(widths, r, loss=loss, bias=True, augmented_rank=ra)
    assert triple(measured) == triple(predicted)
    assert measured.num_params == predicted.num_params == sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    if n > widths[0]:
        assert predicted == linear_hessian_rank(widths, r, loss=loss, bias=True)  # the generic default


@pytest.mark.parametrize(("widths", "n"), [([5, 3, 4, 2], 12), ([6, 2, 3, 4], 4), ([3, 4, 2, 3, 2], 9)])
def test_bias_outer_part_of_deeper_nets(widths, n):
    model = linear_net(widths, bias=True, seed=n)
    batches = make_data(widths, n, "mse", seed=n + 3)
    r, ra = _ones_in_row_space(batches[0][0])
    measured = numerical_hessian_rank(model, mse, batches)
    predicted = linear_hessian_rank(widths, r, bias=True, augmented_rank=ra)
    assert predicted.outer == measured.outer
    assert predicted.loss is None and predicted.functional is None
    # the bias-free closed forms do not describe these nets (the measured ranks are larger)
    bias_free = linear_hessian_rank(widths, r)
    assert measured.loss > bias_free.loss and measured.outer > bias_free.outer


def test_bias_closed_form_formulas_by_hand():
    # n > d: H_o = q (r + K - q) + K; L = 2: H_f, H_L from the augmented input (r + 1)
    assert triple(linear_hessian_rank([25, 10, 10], 25, bias=True)) == (370, 260, 200)
    # n <= d with q < r: + K - q; with q = r: + 0
    assert linear_hessian_rank([7, 2, 5], 4, bias=True, augmented_rank=4).outer == 2 * (4 + 5 - 2) + 5 - 2
    assert linear_hessian_rank([7, 6, 5], 3, bias=True, augmented_rank=3).outer == 3 * 5
    assert linear_hessian_rank([6, 3], 6, bias=True) == HessianRank(loss=21, outer=21, functional=0, num_params=21)
    assert linear_hessian_rank([6, 3], 6, bias=False).num_params == 18  # bias=False unchanged


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"augmented_rank": 7}, r"augmented_rank must be data_rank \(5\) or data_rank \+ 1 \(6\).*got 7"),
        ({"augmented_rank": 4}, "augmented_rank"),
        ({"augmented_rank": -1}, "augmented_rank"),
        ({"bias": 1}, "bias must be True or False"),
    ],
)
def test_bias_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        linear_hessian_rank([5, 3, 2], 5, **{"bias": True, **kwargs})


def test_rtol_semantics():
    widths = [8, 6, 4]
    model, batches = linear_net(widths, seed=2), make_data(widths, 20, "mse", seed=3)
    default = numerical_hessian_rank(model, mse, batches)
    h_loss, h_outer = dense_hessian_parts(model, mse, batches)
    scale = max(torch.linalg.eigvalsh(h_loss).abs().max().item(), torch.linalg.eigvalsh(h_outer).abs().max().item())
    assert default.tolerance == pytest.approx(scale * 72 * torch.finfo(DT).eps, rel=1e-12)
    assert matrix_rank_tolerance(2.0, 10) == pytest.approx(20 * torch.finfo(DT).eps)
    assert matrix_rank_tolerance(2.0, 10, rtol=1e-3) == pytest.approx(2e-3)
    loose = numerical_hessian_rank(model, mse, batches, rtol=0.5)
    assert loose.tolerance == pytest.approx(0.5 * scale, rel=1e-12)
    expected = int((torch.linalg.eigvalsh(h_loss).abs() > 0.5 * scale).sum())
    assert loose.loss == expected < default.loss
    # a tiny relative tolerance above the rounding level gives the same ranks as the default
    assert triple(numerical_hessian_rank(model, mse, batches, rtol=1e-9)) == triple(default)


# ------------------------------------------------------------------------------------------- dense Hessian parts


def _tanh_net_with_bias():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def test_dense_parts_match_functorch_references():
    model = _tanh_net_with_bias()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(9, 3, generator=g, dtype=DT)
    y = torch.randint(0, 3, (9,), generator=g)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal batches: weights 4/9 and 5/9
    h_loss, h_outer = dense_hessian_parts(model, xent, batches)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat):
        params = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return functional_call(model, params, (x,))

    def full(flat):
        return F.cross_entropy(outputs(flat), y)  # mean over all 9 samples

    assert torch.allclose(h_loss, hessian(full)(theta), rtol=0, atol=1e-13)
    jac = jacrev(outputs)(theta)  # (n, K, P)
    probs = torch.softmax(outputs(theta), dim=1)
    hess_out = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # softmax cross-entropy Hessian
    ggn = torch.einsum("nkp,nkl,nlq->pq", jac, hess_out, jac) / 9
    assert torch.allclose(h_outer, ggn, rtol=0, atol=1e-13)
    assert torch.allclose(h_loss, h_loss.T) and torch.allclose(h_outer, h_outer.T)
    # H_f = H_L - H_o is the residual-weighted output curvature: non-zero for a non-linear net
    assert (h_loss - h_outer).abs().max() > 1e-3


def test_dense_parts_leave_the_model_untouched_and_accept_float32():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    model[0].bias.requires_grad_(False)  # frozen parameters are constants, not variables: P = 12 + 8 + 10
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    h_loss, h_outer = dense_hessian_parts(model, mse, [(x, y)])
    assert h_loss.dtype == DT and h_loss.shape == (30, 30) and h_outer.shape == (30, 30)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats untouched
    assert all(p.grad is None for p in model.parameters())
    # eval-mode float64 reference
    ref = HessianOperator(model, mse, [(x, y)], dtype=DT).dense()
    assert torch.allclose(h_loss, ref, rtol=0, atol=1e-12)


def test_dense_parts_fall_back_when_loss_fn_cannot_be_vectorised():
    widths = [4, 3, 2]
    model, batches = linear_net(widths, seed=9), make_data(widths, 10, "mse", seed=10)

    def fussy(model, batch):  # .item() in the loss: vmap cannot batch it
        out = model(batch[0])
        scale = 1.0 if out.abs().max().item() >= 0 else 2.0
        return scale * mse(model, batch)

    ref_loss, ref_outer = dense_hessian_parts(model, mse, batches)
    h_loss, h_outer = dense_hessian_parts(model, fussy, batches)
    assert torch.allclose(h_loss, ref_loss, rtol=0, atol=1e-14)
    assert torch.allclose(h_outer, ref_outer, rtol=0, atol=1e-14)
    assert triple(numerical_hessian_rank(model, fussy, batches)) == (16, 8, 12)


def test_refuses_large_models_and_bad_input():
    model = linear_net([30, 30, 30])
    batches = make_data([30, 30, 30], 4, "mse")
    with pytest.raises(ValueError, match=r"1800 trainable parameters, more than max_params=1000"):
        numerical_hessian_rank(model, mse, batches, max_params=1000)
    with pytest.raises(ValueError, match="empty"):
        numerical_hessian_rank(model, mse, [])
    with pytest.raises(ValueError, match="rtol"):
        numerical_hessian_rank(model, mse, batches, rtol=-1.0)
    with pytest.raises(ValueError, match="scalar"):
        numerical_hessian_rank(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ValueError, match="non-finite"):
        numerical_hessian_rank(model, lambda m, b: mse(m, b) * math.inf, batches)
    frozen = linear_net([3, 2])
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        numerical_hessian_rank(frozen, mse, make_data([3, 2], 4, "mse"))


# ------------------------------------------------------------------------------------------- near-zero fraction (SLQ)


def test_near_zero_fraction_of_a_linear_net_matches_the_rank_deficiency():
    widths, n = [10, 40, 40, 3], 100
    model = linear_net(widths, seed=11)
    op = HessianOperator(model, mse, make_data(widths, n, "mse", seed=12), dtype=DT)
    est = near_zero_fraction(op, num_probes=8, num_steps=64, seed=0)
    predicted = linear_hessian_rank(widths, 10)
    true_fraction = predicted.rank_deficiency / predicted.num_params  # 0.768
    assert isinstance(est, NearZeroEstimate)
    assert est.num_matvecs == 8 * 64
    assert est.threshold == pytest.approx(1e-3 * est.scale)
    assert est.stderr > 0
    assert abs(est.fraction - true_fraction) <= 4 * est.stderr + 0.01
    assert est.rank_fraction == pytest.approx(1 - est.fraction)


def test_near_zero_fraction_of_an_explicit_spectrum():
    g = torch.Generator().manual_seed(0)
    n, zeros = 400, 120
    eigs = torch.cat([torch.zeros(zeros, dtype=DT), 1 + torch.rand(n - zeros, generator=g, dtype=DT)])
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    mat = (q * eigs) @ q.T
    est = near_zero_fraction(lambda v: mat @ v, n, threshold=0.1, relative=False, num_probes=16, num_steps=40)
    assert est.threshold == 0.1
    assert abs(est.fraction - zeros / n) <= 4 * est.stderr
    assert est.scale == pytest.approx(eigs.max().item(), rel=1e-4)  # largest Ritz value
    # a threshold above the whole spectrum takes all the mass
    assert near_zero_fraction(
        lambda v: mat @ v, n, threshold=1.0, num_probes=2, num_steps=10
    ).fraction == pytest.approx(1)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((lambda v: v,), {}, "n is required"),
        ((lambda v: v, 0), {}, "n must be"),
        ((lambda v: v, 5), {"threshold": -1.0}, "threshold"),
        ((lambda v: v, 5), {"threshold": math.nan}, "threshold"),
        (("not an operator", 5), {}, "operator_or_matvec"),
    ],
)
def test_near_zero_fraction_rejects_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        near_zero_fraction(*args, **kwargs)
