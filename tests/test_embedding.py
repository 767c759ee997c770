"""Embedding principle (Zhang et al. 2021): exact critical embeddings, Hessian degeneracy, condensation, merging."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

from lightning_hessian.embedding import (
    DEFAULT_ORIENTATION_TOL,
    CondensationReport,
    LayerCondensation,
    LayerOrientation,
    UnsupportedArchitectureError,
    condensation,
    condensation_report,
    merge_condensed,
    mlp_structure,
    orientation_condensation,
    predicted_extra_zero_eigenvalues,
    split_neuron,
)

DT = torch.float64


def mlp(widths, act=nn.Tanh, bias=True, seed=0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def names_shapes(model):
    return [(n, p.shape) for n, p in model.named_parameters()]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def as_dict(model, theta):
    out, i = {}, 0
    for name, shape in names_shapes(model):
        size = math.prod(shape)
        out[name] = theta[i : i + size].view(shape)
        i += size
    return out


def risk(model, x, y):
    """R(theta) = 1/(2n) sum_i ||f(x_i) - y_i||^2 as a function of the flat parameter vector."""

    def fn(theta):
        out = functional_call(model, as_dict(model, theta), (x,))
        return 0.5 * ((out - y) ** 2).sum(dim=1).mean()

    return fn


def critical_targets(model, x, seed=0):
    """Targets that make the current parameters an exact critical point with non-zero loss (notes, section 2.6)."""
    theta = flat(model)

    def outputs(t):
        return functional_call(model, as_dict(model, t), (x,)).reshape(-1)

    jac = jacrev(outputs)(theta)  # (n K, P), needs n K > P
    assert jac.shape[0] > jac.shape[1]
    u, _, _ = torch.linalg.svd(jac)
    null = u[:, jac.shape[1] :]  # orthogonal to the range of J: J^T r = 0
    g = torch.Generator().manual_seed(seed)
    residual = null @ torch.randn(null.shape[1], generator=g, dtype=DT)
    return (outputs(theta) - residual).detach().view(x.shape[0], -1)


@pytest.fixture(scope="module")
def critical_setup():
    """A [3, 4, 3, 2] tanh net with biases (P = 39) at an exact critical point of the MSE on 30 samples."""
    model = mlp([3, 4, 3, 2], seed=1)
    x = torch.randn(30, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    y = critical_targets(model, x)
    return model, x, y


def inertia(h, tol):
    e = torch.linalg.eigvalsh(h)
    return int((e < -tol).sum()), int((e.abs() <= tol).sum()), int((e > tol).sum())


# ------------------------------------------------------------------------------------------------------- split_neuron


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("alpha", [0.3, 0.0, 1.0, -0.5, 2.0])
def test_split_preserves_outputs_for_every_layer(act, bias, alpha):
    model = mlp([4, 5, 3, 2], act=act, bias=bias, seed=3)
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for layer, width, fan_in, fan_out in [(0, 5, 4, 3), (1, 3, 5, 2)]:
        for neuron in range(width):
            wide = split_neuron(model, layer, neuron, alpha)
            assert (wide(x) - model(x)).abs().max() <= 1e-12
            added = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in model.parameters())
            assert added == fan_in + int(bias) + fan_out  # P' - P = m_{l-1} + 1 + m_{l+1}
            assert wide[2 * layer].out_features == width + 1 and wide[2 * layer + 2].in_features == width + 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input model untouched


def test_split_weights_follow_the_embedding_formula():
    model = mlp([2, 3, 2], seed=5)
    wide = split_neuron(model, 0, 1, 0.25)
    w1, b1, w2 = model[0].weight, model[0].bias, model[2].weight
    assert torch.equal(wide[0].weight, torch.cat([w1, w1[1:2]]))
    assert torch.equal(wide[0].bias, torch.cat([b1, b1[1:2]]))
    expected = torch.cat([w2, 0.75 * w2[:, 1:2]], dim=1)
    expected[:, 1] = 0.25 * w2[:, 1]
    assert torch.equal(wide[2].weight, expected)
    assert torch.equal(wide[2].bias, model[2].bias)
    assert wide[0].weight.dtype == DT and all(p.requires_grad for p in wide.parameters())


def test_split_gradient_stays_zero_at_an_exact_critical_point(critical_setup):
    model, x, y = critical_setup
    assert grad(risk(model, x, y))(flat(model)).abs().max() <= 1e-14
    assert risk(model, x, y)(flat(model)) > 1e-2  # a genuine critical point with non-zero loss
    for layer, neuron in [(0, 0), (0, 3), (1, 2)]:
        for alpha in (0.3, 1.0, -0.7):
            wide = split_neuron(model, layer, neuron, alpha)
            g = grad(risk(wide, x, y))(flat(wide))
            assert g.abs().max() <= 1e-13
            assert risk(wide, x, y)(flat(wide)) == pytest.approx(risk(model, x, y)(flat(model)).item(), abs=1e-14)


def test_vector_alpha_preserves_outputs_but_breaks_criticality(critical_setup):
    model, x, y = critical_setup
    alpha = torch.tensor([0.2, 0.9, -0.4], dtype=DT)  # one factor per output of the next layer (3 units)
    wide = split_neuron(model, 0, 1, alpha)
    assert (wide(x) - model(x)).abs().max() <= 1e-12
    g_vector = grad(risk(wide, x, y))(flat(wide))
    scalar = split_neuron(model, 0, 1, 0.2)
    g_scalar = grad(risk(scalar, x, y))(flat(scalar))
    assert g_scalar.abs().max() <= 1e-13
    assert g_vector.norm() > 1e-6  # flat but non-critical direction (notes 2.3.3)
    # a constant vector is the scalar split
    same = split_neuron(model, 0, 1, torch.full((3,), 0.2, dtype=DT))
    assert torch.allclose(flat(same), flat(scalar), rtol=0, atol=0)


def _null_direction(wide, layer, neuron, column):
    """t = (+a_s on column s, -a_s on the new column) of the next Linear, zero elsewhere, as a flat vector."""
    parts = []
    target = f"{2 * layer + 2}.weight"
    for name, p in wide.named_parameters():
        t = torch.zeros_like(p)
        if name == target:
            t[:, neuron] = column
            t[:, -1] = -column
        parts.append(t.reshape(-1))
    return torch.cat(parts)


def test_split_direction_is_a_hessian_null_vector_and_inertia_never_decreases(critical_setup):
    model, x, y = critical_setup
    h_narrow = hessian(risk(model, x, y))(flat(model))
    scale = h_narrow.abs().max().item()
    tol = 1e-9 * scale
    narrow_inertia = inertia(h_narrow, tol)
    assert sum(narrow_inertia) == 39
    for layer, neuron, alpha in [(0, 2, 0.3), (1, 0, 0.6), (1, 1, 1.0), (0, 0, -0.5)]:
        wide = split_neuron(model, layer, neuron, alpha)
        h = hessian(risk(wide, x, y))(flat(wide))
        column = model[2 * layer + 2].weight[:, neuron].detach()
        t = _null_direction(wide, layer, neuron, column)
        assert (h @ t).abs().max() <= 1e-12 * t.norm()
        wide_inertia = inertia(h, tol)
        assert sum(wide_inertia) == h.shape[0]
        assert all(w >= n for w, n in zip(wide_inertia, narrow_inertia)), (narrow_inertia, wide_inertia)
        assert wide_inertia[1] >= narrow_inertia[1] + 1


def test_split_rejects_bad_arguments():
    model = mlp([3, 4, 2])
    with pytest.raises(ValueError, match=r"layer must be an integer in \[0, 0\]"):
        split_neuron(model, 1, 0, 0.5)
    with pytest.raises(ValueError, match=r"neuron must be an integer in \[0, 3\]"):
        split_neuron(model, 0, 4, 0.5)
    with pytest.raises(ValueError, match="alpha must be finite"):
        split_neuron(model, 0, 0, torch.tensor([0.5, math.nan], dtype=DT))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        split_neuron(model, 0, 0, math.inf)
    with pytest.raises(ValueError, match="2 entries"):
        split_neuron(model, 0, 0, torch.ones(3, dtype=DT))
    with pytest.raises(ValueError, match="single Linear"):
        split_neuron(nn.Linear(3, 2), 0, 0, 0.5)


# ---------------------------------------------------------------------------------------------------- architectures


class Wrapped(nn.Module):
    """LightningModule-like: the MLP lives in ``net``; forward preprocesses its input."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.loss = nn.MSELoss()  # parameter-free extras are fine

    def forward(self, x):
        return self.net(2.0 * x)


def test_mlp_structure_nested_and_wrapped():
    inner = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Dropout(0.1))
    net = nn.Sequential(nn.Flatten(), inner, nn.Sequential(nn.Linear(5, 4), nn.Tanh()), nn.Linear(4, 2), nn.Softmax(-1))
    s = mlp_structure(Wrapped(net))
    assert s.names == ["net.1.0", "net.2.0", "net.3"]
    assert s.widths == [3, 5, 4, 2]
    assert s.homogeneous == [True, False]
    assert s.prefix == "net" and s.container is net
    assert [type(m) for m in s.activations[0]] == [nn.ReLU, nn.Dropout]


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (nn.Conv1d(2, 3, 1), "cannot find an MLP"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)), "BatchNorm1d"),
        (nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)), "PReLU"),
        (nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), "expects 5 inputs"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(-1), nn.Linear(4, 2)), "Softmax"),
        (nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.Linear(4, 2)), "Flatten"),
        (nn.Sequential(nn.ReLU()), "no nn.Linear"),
    ],
)
def test_unsupported_architectures(model, match):
    with pytest.raises(UnsupportedArchitectureError, match=match):
        mlp_structure(model)
    assert issubclass(UnsupportedArchitectureError, ValueError)


def test_unsupported_custom_forward_and_extra_parameters():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(UnsupportedArchitectureError, match="cannot find an MLP in Custom"):
        condensation(Custom())
    extra = Wrapped(mlp([3, 4, 2]))
    extra.head = nn.Linear(2, 2)
    with pytest.raises(UnsupportedArchitectureError, match="outside its 'net'"):
        condensation_report(extra)


# ------------------------------------------------------------------------------------------------------ condensation


def _planted(act=nn.Tanh, seed=6):
    """[3, 4, 3, 2] narrow net split four times; returns (narrow, wide, planted clusters per layer)."""
    narrow = mlp([3, 4, 3, 2], act=act, seed=seed)
    wide = split_neuron(narrow, 0, 1, 0.3)  # layer 0: neuron 4 copies 1
    wide = split_neuron(wide, 0, 4, -0.8)  # layer 0: neuron 5 copies 4 (= 1)
    wide = split_neuron(wide, 1, 2, 1.7)  # layer 1: neuron 3 copies 2
    wide = split_neuron(wide, 0, 0, 0.5)  # layer 0: neuron 6 copies 0
    planted = [[[0, 6], [1, 4, 5], [2], [3]], [[0], [1], [2, 3]]]
    return narrow, wide, planted


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_condensation_recovers_planted_clusters_and_merging_inverts_the_splits(act):
    narrow, wide, planted = _planted(act)
    layers = condensation(wide, tol=1e-8)
    assert [entry.clusters for entry in layers] == planted
    assert [(e.layer, e.width, e.effective_width) for e in layers] == [(0, 7, 4), (1, 4, 3)]
    assert [e.name for e in layers] == ["0", "2"]
    assert [e.by_direction for e in layers] == [act is nn.ReLU] * 2
    assert predicted_extra_zero_eigenvalues(layers) == 4
    merged = merge_condensed(wide, layers)
    assert names_shapes(merged) == names_shapes(narrow)
    assert torch.allclose(flat(merged), flat(narrow), rtol=0, atol=1e-14)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(7), dtype=DT)
    assert (merged(x) - wide(x)).abs().max() <= 1e-12
    # a generic network does not condense
    assert [e.effective_width for e in condensation(narrow)] == [4, 3]


def test_relu_condensation_groups_positive_multiples_only():
    narrow = mlp([3, 4, 2], act=nn.ReLU, seed=8)
    wide = split_neuron(narrow, 0, 2, 0.4)
    with torch.no_grad():  # neuron 4 := 3 x neuron 2 with its outgoing column / 3: same function (ReLU homogeneity)
        wide[0].weight[4] *= 3.0
        wide[0].bias[4] *= 3.0
        wide[2].weight[:, 4] /= 3.0
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(9), dtype=DT)
    assert (wide(x) - narrow(x)).abs().max() <= 1e-12
    layers = condensation(wide, tol=1e-8)
    assert layers[0].clusters == [[0], [1], [2, 4], [3]]
    assert (merge_condensed(wide, layers)(x) - wide(x)).abs().max() <= 1e-12
    # the same weights under tanh are not copies: grouped by distance, nothing merges
    as_tanh = nn.Sequential(wide[0], nn.Tanh(), wide[2])
    assert condensation(as_tanh, tol=1e-8)[0].effective_width == 5
    # anti-parallel ReLU units compute different functions
    with torch.no_grad():
        wide[0].weight[4] *= -1.0
        wide[0].bias[4] *= -1.0
    assert condensation(wide, tol=1e-8)[0].effective_width == 5


def test_relu_dead_neurons_form_their_own_cluster():
    model = mlp([3, 5, 2], act=nn.ReLU, seed=10)
    with torch.no_grad():
        model[0].weight[[1, 3]] = 0.0
        model[0].bias[[1, 3]] = 0.0
    layers = condensation(model, tol=1e-6)
    assert layers[0].clusters == [[0], [1, 3], [2], [4]]
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(11), dtype=DT)
    assert (merge_condensed(model, layers)(x) - model(x)).abs().max() <= 1e-14


def test_tolerance_semantics_and_leader_clustering():
    model = mlp([2, 4, 1], seed=12)
    with torch.no_grad():
        w = model[0].weight
        b = model[0].bias
        rows = torch.cat([w, b[:, None]], dim=1)
        scale = rows.norm(dim=1).max()
        direction = torch.tensor([1.0, 0.0, 0.0], dtype=DT)
        rows[1] = rows[0] + 0.6e-3 * scale * direction  # 0.6 tol from neuron 0
        rows[2] = rows[0] + 1.2e-3 * scale * direction  # 1.2 tol from neuron 0, 0.6 tol from neuron 1
        scale = rows.norm(dim=1).max()  # the relative scale may have moved: recompute the distances
        w.copy_(rows[:, :2])
        b.copy_(rows[:, 2])
    d01 = ((rows[1] - rows[0]).norm() / scale).item()
    d02 = ((rows[2] - rows[0]).norm() / scale).item()
    tol = (d01 + d02) / 2  # d01 <= tol < d02: 2 joins 1 by single linkage, but not leader 0
    layers = condensation(model, tol=tol)
    clusters = layers[0].clusters
    assert clusters[0] == [0, 1] and [2] in clusters
    assert sorted(k for c in clusters for k in c) == [0, 1, 2, 3]  # a partition
    assert condensation(model, tol=tol) == layers  # deterministic
    assert condensation(model, tol=0.5 * d01)[0].effective_width == 4
    assert condensation(model, tol=1.01 * d02)[0].clusters[0] == [0, 1, 2]


def test_condensation_rejects_bad_tolerance():
    for tol in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tol must be"):
            condensation(mlp([2, 3, 1]), tol=tol)
    assert condensation(nn.Linear(3, 2)) == []


# -------------------------------------------------------------------------------------------- report and degeneracy


def test_condensation_report_on_a_wrapped_model():
    narrow, wide, _ = _planted(nn.Tanh)
    model = Wrapped(wide)
    x = torch.randn(25, 3, generator=torch.Generator().manual_seed(13), dtype=DT)
    report = condensation_report(model, x, tol=1e-8)
    assert isinstance(report, CondensationReport)
    assert report.effective_widths == {"net.0": 4, "net.2": 3}
    assert report.widths == {"net.0": 7, "net.2": 4}
    assert report.predicted_zero_eigenvalues == 4
    assert report.merge_output_error is not None and report.merge_output_error <= 1e-12
    assert all(isinstance(e, LayerCondensation) for e in report.layers)
    assert condensation_report(model).merge_output_error is None
    # a wrong merge is detected: force neurons 0 and 1 of layer 0 together
    bad = [
        LayerCondensation(layer=0, width=7, effective_width=6, clusters=[[0, 1], [2], [3], [4], [5], [6]]),
        LayerCondensation(layer=1, width=4, effective_width=4, clusters=[[0], [1], [2], [3]]),
    ]
    x2 = 2.0 * x
    assert (merge_condensed(wide, bad)(x2) - wide(x2)).abs().max() > 1e-3


def test_report_on_a_float32_model_in_training_mode():
    model = Wrapped(nn.Sequential(nn.Linear(3, 6), nn.GELU(), nn.Dropout(0.5), nn.Linear(6, 2)))
    model = Wrapped(split_neuron(model.net, 0, 3, 0.5))
    model.train()
    x = torch.randn(16, 3)
    report = condensation_report(model, x, tol=1e-6)
    assert report.effective_widths == {"net.0": 6}
    assert report.merge_output_error <= 1e-6  # float32 weights, float64 comparison, dropout off (eval mode)
    assert model.training and model.net[2].training  # modes restored


def test_embedded_critical_point_has_the_predicted_extra_zero_eigenvalues(critical_setup):
    model, x, y = critical_setup
    wide = split_neuron(split_neuron(split_neuron(model, 0, 1, 0.3), 1, 0, 0.6), 0, 4, 0.5)
    layers = condensation(wide, tol=1e-10)
    extra = predicted_extra_zero_eigenvalues(layers)
    assert extra == 3
    h_narrow = hessian(risk(model, x, y))(flat(model))
    h_wide = hessian(risk(wide, x, y))(flat(wide))
    tol = 1e-9 * h_narrow.abs().max().item()
    assert inertia(h_wide, tol)[1] >= inertia(h_narrow, tol)[1] + extra


def test_split_and_merge_a_wrapped_model():
    model = Wrapped(mlp([3, 4, 2], act=nn.ReLU, seed=14))
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(15), dtype=DT)
    wide = split_neuron(model, 0, 2, 0.4)
    assert isinstance(wide, Wrapped) and wide is not model and wide.net[0].out_features == 5
    assert model.net[0].out_features == 4  # untouched
    assert (wide(x) - model(x)).abs().max() <= 1e-12
    narrow = merge_condensed(wide, tol=1e-10)
    assert narrow.net[0].out_features == 4 and (narrow(x) - model(x)).abs().max() <= 1e-12


def test_report_needs_a_forward_that_runs_the_mlp():
    class Bypass(Wrapped):
        def forward(self, x):
            return x

    with pytest.raises(UnsupportedArchitectureError, match="never calls"):
        condensation_report(Bypass(mlp([3, 4, 2])), torch.randn(2, 3, dtype=DT))


def test_condensation_of_a_wide_layer_separates_near_copies():
    # more neurons than one block of the pairwise search (1024); Gram distances are re-checked exactly
    torch.manual_seed(16)
    layer = nn.Linear(20, 1100).to(DT)
    with torch.no_grad():
        layer.weight[1050] = layer.weight[3]
        layer.bias[1050] = layer.bias[3]
        layer.weight[1099] = layer.weight[1030]
        layer.bias[1099] = layer.bias[1030]
        layer.weight[1060] = layer.weight[7] + 1e-9  # close, but not a copy
        layer.bias[1060] = layer.bias[7]
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(1100, 2).to(DT))
    result = condensation(model, tol=1e-12)[0]
    assert result.effective_width == 1098
    merged = [c for c in result.clusters if len(c) > 1]
    assert merged == [[3, 1050], [1030, 1099]]
    assert condensation(model, tol=1e-6)[0].effective_width == 1097  # now 7 and 1060 merge too


# ------------------------------------------------------------------------------------- condensation by orientation


def _oriented(directions, scales, act=nn.Tanh, columns=None, seed=0):
    """One-hidden-layer net whose neuron k has input vector [w_k, b_k] = scales[k] * directions[k] (float64)."""
    if isinstance(directions, (list, tuple)):
        directions = torch.stack([torch.as_tensor(d, dtype=DT) for d in directions])
    rows = torch.as_tensor(scales, dtype=DT).unsqueeze(1) * directions.to(DT)
    m, dim = rows.shape
    net = nn.Sequential(nn.Linear(dim - 1, m), act(), nn.Linear(m, 2)).to(DT)
    with torch.no_grad():
        net[0].weight.copy_(rows[:, :-1])
        net[0].bias.copy_(rows[:, -1])
        g = torch.Generator().manual_seed(seed)
        net[2].weight.copy_(torch.randn(2, m, generator=g, dtype=DT) if columns is None else columns)
    return net


def _unit(v):
    v = torch.as_tensor(v, dtype=DT)
    return v / torch.linalg.vector_norm(v)


def test_planted_orientations_are_counted_and_odd_activations_fold_the_sign():
    g = torch.Generator().manual_seed(20)
    base = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=DT))[0].T  # 3 orthonormal directions in R^6
    assignment = [0, 1, 2, 0, 1, 2, 0, 0, 1, 2]
    scales = [0.5, 1.0, 2.0, -1.5, 3.0, -0.7, 0.9, 4.0, -2.5, 1.2]  # norms differ, some signs flipped
    directions = base[assignment]
    tanh = _oriented(directions, scales, nn.Tanh)
    [entry] = orientation_condensation(tanh)
    assert isinstance(entry, LayerOrientation) and entry.symmetric and entry.width == 10
    assert entry.effective_width == 3 and entry.negligible == []
    assert entry.clusters == [[0, 3, 6, 7], [1, 4, 8], [2, 5, 9]]
    # ReLU: anti-parallel neurons compute different functions, so the sign splits orientations 0, 1, 2 in two
    relu = _oriented(directions, scales, nn.ReLU)
    [entry] = orientation_condensation(relu)
    assert not entry.symmetric and entry.effective_width == 6
    assert entry.clusters == [[0, 6, 7], [1, 4], [2, 9], [3], [5], [8]]
    assert orientation_condensation(relu, symmetric=True)[0].effective_width == 3
    assert orientation_condensation(tanh, symmetric=False)[0].effective_width == 6
    # the exact-merge width sees none of this (different norms are different tanh neurons)
    assert condensation(tanh)[0].effective_width == 10


def test_cosine_tolerance_is_one_minus_cos_and_single_linkage_chains():
    angle = 0.05  # 1 - cos(0.05) = 1.2499e-3, 1 - cos(0.1) = 4.996e-3
    directions = [_unit([math.cos(k * angle), math.sin(k * angle), 0.0]) for k in range(3)]
    net = _oriented(directions, [1.0, 2.0, 0.5], nn.ReLU)
    gap, double = 1 - math.cos(angle), 1 - math.cos(2 * angle)
    assert orientation_condensation(net, tol=0.999 * gap)[0].effective_width == 3
    assert orientation_condensation(net, tol=1.001 * gap)[0].effective_width == 1  # 0-1 and 1-2 link: one chain
    # without the middle neuron, the end points need the larger tolerance
    ends = _oriented([directions[0], directions[2]], [1.0, 0.5], nn.ReLU)
    assert orientation_condensation(ends, tol=1.001 * gap)[0].effective_width == 2
    assert orientation_condensation(ends, tol=1.001 * double)[0].effective_width == 1
    # exact copies group at tol = 0, any other pair does not
    copies = _oriented([directions[0], directions[0], directions[1]], [1.0, 3.0, 1.0], nn.ReLU)
    assert orientation_condensation(copies, tol=0.0)[0].clusters == [[0, 1], [2]]


def test_clusters_do_not_depend_on_the_neuron_order():
    g = torch.Generator().manual_seed(21)
    base = torch.randn(4, 5, generator=g, dtype=DT)
    assignment = torch.randint(0, 4, (30,), generator=g)
    noise = 1e-3 * torch.randn(30, 5, generator=g, dtype=DT)
    directions = base[assignment] / torch.linalg.vector_norm(base[assignment], dim=1, keepdim=True) + noise
    scales = torch.rand(30, generator=g, dtype=DT) + 0.5
    net = _oriented(directions, scales, nn.ReLU, seed=22)
    perm = torch.randperm(30, generator=g)
    permuted = _oriented(directions[perm], scales[perm], nn.ReLU, columns=net[2].weight.detach()[:, perm])
    clusters = orientation_condensation(net, tol=1e-3)[0].clusters
    mapped = sorted(sorted(int(perm[k]) for k in c) for c in orientation_condensation(permuted, tol=1e-3)[0].clusters)
    assert mapped == sorted(clusters) and len(clusters) == 4


def test_importance_rule_leaves_out_neurons_with_negligible_output_or_input():
    directions = [_unit([1.0, 0.0, 0.0]), _unit([0.0, 1.0, 0.0]), _unit([0.0, 0.0, 1.0]), _unit([1.0, 1.0, 0.0])]
    columns = torch.tensor([[1.0, 0.0, 2.0, 1.0], [1.0, 0.0, 0.0, 1.0]], dtype=DT)  # neuron 1: zero output column
    net = _oriented(directions, [1.0, 5.0, 1.0, 1e-3], nn.Tanh, columns=columns)
    # importances ||a_k|| ||u_k||: sqrt(2), 0, 2, sqrt(2) * 1e-3 -> neuron 3 is below 1e-2 * 2
    [entry] = orientation_condensation(net)
    assert entry.negligible == [1, 3] and entry.num_significant == 2 and entry.effective_width == 2
    assert orientation_condensation(net, output_tol=1e-4)[0].negligible == [1]
    assert orientation_condensation(net, output_tol=0.0)[0].effective_width == 3  # neuron 1 still has c = 0
    # a threshold just above / below neuron 0's relative importance sqrt(2) / 2
    assert 0 in orientation_condensation(net, output_tol=0.7072)[0].negligible
    assert 0 not in orientation_condensation(net, output_tol=0.7070)[0].negligible
    zero = _oriented(directions, [0.0] * 4, nn.Tanh)
    assert orientation_condensation(zero)[0].effective_width == 0


def test_orientation_of_a_wide_layer_crosses_blocks():
    g = torch.Generator().manual_seed(23)
    base = torch.randn(5, 8, generator=g, dtype=DT)
    assignment = torch.arange(1100) % 5
    scales = torch.rand(1100, generator=g, dtype=DT) + 0.1
    directions = base[assignment] / torch.linalg.vector_norm(base[assignment], dim=1, keepdim=True)
    net = _oriented(directions, scales, columns=torch.ones(2, 1100, dtype=DT))
    [entry] = orientation_condensation(net)
    assert entry.effective_width == 5 and [c[:2] for c in entry.clusters] == [[k, k + 5] for k in range(5)]
    assert all(len(c) == 220 for c in entry.clusters)


def test_odd_activation_chains():
    def odd(*acts):
        return mlp_structure(nn.Sequential(nn.Linear(2, 3), *acts, nn.Linear(3, 1))).odd

    assert odd(nn.Tanh()) == [True] and odd(nn.Hardtanh()) == [True] and odd() == [True]
    assert odd(nn.Sigmoid()) == [True] and odd(nn.Tanh(), nn.Sigmoid()) == [True]
    assert odd(nn.Sigmoid(), nn.Tanh()) == [False]  # tanh(c - z) is not odd up to a constant
    assert odd(nn.ReLU()) == [False] and odd(nn.ReLU6()) == [False] and odd(nn.GELU()) == [False]
    assert odd(nn.Hardtanh(-1.0, 2.0)) == [False] and odd(nn.LeakyReLU()) == [False]


def test_orientation_arguments_are_checked():
    net = mlp([2, 3, 1])
    for bad in (-0.1, 1.0, math.nan, True, "1e-3"):
        with pytest.raises(ValueError, match="tol must be a number in \\[0, 1\\)"):
            orientation_condensation(net, tol=bad)
        with pytest.raises(ValueError, match="output_tol must be"):
            orientation_condensation(net, output_tol=bad)
    with pytest.raises(ValueError, match="symmetric must be"):
        orientation_condensation(net, symmetric="yes")
    assert orientation_condensation(nn.Linear(3, 2)) == []


def test_report_gives_orientation_and_merge_widths():
    g = torch.Generator().manual_seed(24)
    base = torch.linalg.qr(torch.randn(4, 2, generator=g, dtype=DT))[0].T
    net = Wrapped(_oriented(base[[0, 1, 0, 1, 0]], [1.0, 2.0, -0.5, 1.5, 3.0], nn.Tanh))
    x = torch.randn(7, 3, generator=g, dtype=DT)
    report = condensation_report(net, x)
    assert report.effective_widths == {"net.0": 2} and report.merge_widths == {"net.0": 5}
    assert report.significant_neurons == {"net.0": 5} and report.widths == {"net.0": 5}
    assert report.predicted_zero_eigenvalues == 0 and report.merge_output_error <= 1e-12
    assert [e.effective_width for e in report.orientation] == [2]
    assert condensation_report(net, orientation_tol=0.0, symmetric=False).effective_widths == {"net.0": 3}
    with pytest.raises(ValueError, match="orientation_tol|tol must"):
        condensation_report(net, orientation_tol=2.0)


def _train_small_vs_default(activation, scale, seed, steps=(0, 100, 250)):
    """Width-100 one-hidden-layer net, 2-D regression, full-batch Adam (as examples/condensation_small_init.py)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(40, 2, generator=g, dtype=DT) * 2 - 1
    y = torch.sin(2 * x[:, :1]) * torch.cos(x[:, 1:2])
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 100), activation(), nn.Linear(100, 1)).to(DT)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    widths = {}
    for step in range(max(steps) + 1):
        if step in steps:
            widths[step] = orientation_condensation(net)[0].effective_width
        loss = ((net(x) - y) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return widths


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_small_initialisation_condenses_and_default_initialisation_does_not(activation):
    """At the default tolerance, small-init nets have few orientations, default-init ones about 90 (of 100)."""
    assert DEFAULT_ORIENTATION_TOL == 1e-3
    torch.set_num_threads(1)
    small = _train_small_vs_default(activation, 0.01, seed=0)
    default = _train_small_vs_default(activation, 1.0, seed=0)
    assert small[0] >= 85 and default[0] >= 85  # random orientations at initialisation
    for step in (100, 250):
        assert small[step] <= 30, (step, small)
        assert default[step] >= 80, (step, default)
