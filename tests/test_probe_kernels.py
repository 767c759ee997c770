import pytest
import torch
from torch import nn

from lightning_hessian.probe_kernels import _Conv, affine_batch_norm, probe_layers

CONVS = [
    nn.Conv1d(2, 4, 3, padding=1),
    nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 4, 3, dilation=2, groups=2, padding=2, padding_mode="circular"),
    nn.Conv2d(2, 3, (3, 1), padding=(1, 0), padding_mode="reflect"),
    nn.Conv3d(2, 2, 2, stride=(1, 2, 1)),
]


def _second_order(layer: nn.Module, x: torch.Tensor, batched: bool) -> list[torch.Tensor]:
    """d/d(x, W, b) of <g, grad_{x,W,b} <r, layer(x)>>: every term a double backward produces."""
    x = x.clone().requires_grad_(True)
    leaves = [x, *layer.parameters()]
    out = layer(x)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * r * out).sum(), leaves, create_graph=True)
    gen = torch.Generator().manual_seed(2)
    if batched:
        vs = [torch.randn((3, *g.shape), generator=gen, dtype=g.dtype) for g in grads]
        return list(torch.autograd.grad(grads, leaves, vs, is_grads_batched=True))
    vs = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in grads]
    return list(torch.autograd.grad(grads, leaves, vs))


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("layer", CONVS, ids=repr)
def test_convolution_double_backward_matches_pytorch(layer, batched, monkeypatch):
    layer = layer.double()
    dims = layer.weight.dim() - 2
    x = torch.randn(2, layer.in_channels, *([6] * dims), generator=torch.Generator().manual_seed(0)).double()
    reference = _second_order(layer, x, batched)
    calls = []
    apply = _Conv.apply
    monkeypatch.setattr(_Conv, "apply", lambda *a: calls.append(1) or apply(*a))
    with probe_layers(layer):
        original = type(layer)._conv_forward(layer, x, layer.weight, layer.bias)
        torch.testing.assert_close(layer(x), original, rtol=1e-14, atol=1e-14)
        ours = _second_order(layer, x, batched)
    assert calls, "the rewritten convolution did not run"
    assert "_conv_forward" not in vars(layer)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_convolution_unbatched_input_and_string_padding_fall_back():
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    same = nn.Conv2d(2, 3, 3, padding="same").double()
    with probe_layers(conv), probe_layers(same):
        original = type(conv)._conv_forward(conv, x, conv.weight, conv.bias)
        torch.testing.assert_close(conv(x), original, rtol=1e-14, atol=1e-14)
        original = type(same)._conv_forward(same, x[None], same.weight, same.bias)
        torch.testing.assert_close(same(x[None]), original, rtol=0, atol=0)
        # inside torch.func the layer's own code runs (no custom autograd.Function under transforms)
        jac = torch.func.jacrev(lambda t: conv(t).sum())(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # and under autocast (its casts are the layer's graph)
            low = conv.float()(x.float().requires_grad_(True))
            (grad,) = torch.autograd.grad(low.float().sum(), conv.weight, create_graph=True)
    assert jac.shape == x.shape and low.dtype == torch.bfloat16 and grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.BatchNorm1d(3), (5, 3)),
        (nn.BatchNorm1d(3, affine=False), (5, 3, 4)),
        (nn.BatchNorm2d(3), (4, 3, 2, 2)),
        (nn.BatchNorm3d(3), (2, 3, 2, 2, 2)),
    ],
)
def test_affine_batch_norm_is_eval_batch_norm_with_the_same_derivatives(layer, shape):
    layer = layer.double()
    gen = torch.Generator().manual_seed(0)
    layer(torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 1)  # running statistics away from 0 / 1
    layer.eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(affine_batch_norm(layer, x), layer(x), rtol=1e-14, atol=1e-14)
    reference = _second_order(layer, x, batched=False)
    with probe_layers(layer):
        assert "forward" in vars(layer)
        ours = _second_order(layer, x, batched=False)
    assert "forward" not in vars(layer)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_batch_norm_in_training_mode_keeps_its_own_forward_and_statistics():
    layer = nn.BatchNorm1d(3).double().train()
    x = torch.randn(8, 3, dtype=torch.float64)
    with probe_layers(layer):
        out = layer(x)
    torch.testing.assert_close(out.mean(0), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)  # batch stats
    assert int(layer.num_batches_tracked) == 1


def test_a_users_own_instance_patch_is_left_alone():
    conv = nn.Conv1d(1, 1, 1)
    own = conv._conv_forward = lambda x, w, b: x * 0  # noqa: E731
    with probe_layers(conv):
        assert conv._conv_forward is own
    assert conv._conv_forward is own


def test_subclasses_with_their_own_code_are_left_alone():
    class ScaledConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, 2 * weight, bias)

    class ShiftedNorm(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) + 1

    class StandardisedConv(nn.Conv1d):  # overrides forward only: still rewritten, with the weight it passes
        def forward(self, x):
            return self._conv_forward(x, self.weight / self.weight.norm(), self.bias)

    conv, norm, std = ScaledConv(1, 1, 1).double(), ShiftedNorm(2).double().eval(), StandardisedConv(1, 2, 3).double()
    x, y, z = (torch.randn(s, dtype=torch.float64) for s in [(1, 1, 2, 2), (3, 2), (2, 1, 5)])
    before = conv(x), norm(y), std(z)
    with probe_layers(conv), probe_layers(norm), probe_layers(std):
        assert "_conv_forward" not in vars(conv) and "forward" not in vars(norm) and "_conv_forward" in vars(std)
        after = conv(x), norm(y), std(z)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def _activation_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    function, module = {"gelu": (nn.functional.gelu, nn.GELU()), "silu": (nn.functional.silu, nn.SiLU())}[name]
    encoder = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation=function, batch_first=True)
    return nn.Sequential(nn.Linear(8, 8), module, encoder).double().eval()


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_activation_second_derivatives_match_pytorch_and_reuse_across_products(name, monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lightning_hessian import probe_kernels

    net = _activation_net(name)
    function = net[2].activation
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3)).double()
    params = list(net.parameters())
    gen = torch.Generator().manual_seed(4)
    vs = [[torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params] for _ in range(3)]

    def hvps() -> list[list[torch.Tensor]]:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            out = net(x)
        grads = torch.autograd.grad((out**2).sum() + out.sum(), params, create_graph=True)
        singles = [list(torch.autograd.grad(grads, params, v, retain_graph=True)) for v in vs]  # one cached graph
        stacked = [torch.stack(column) for column in zip(*vs)]  # the same three products as one batched call
        return [*singles, list(torch.autograd.grad(grads, params, stacked, is_grads_batched=True))]

    reference = hvps()
    calls = []
    apply = probe_kernels._Pointwise.apply
    monkeypatch.setattr(probe_kernels._Pointwise, "apply", lambda *a: calls.append(1) or apply(*a))
    with probe_layers(net):
        assert net[2].activation is getattr(probe_kernels, f"fast_{name}")
        ours = hvps()
    assert len(calls) == 2, "both activations (module and encoder activation) must run rewritten"
    assert net[2].activation is function and "forward" not in vars(net[1])
    for mine, ref in zip(ours, reference):  # the second and third products reuse the first one's gelu''
        for a, b in zip(mine, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gelu_tanh_form_inplace_silu_and_third_order_are_not_rewritten_silently():
    from lightning_hessian.probe_kernels import fast_gelu, fast_silu

    x = torch.randn(7, generator=torch.Generator().manual_seed(5)).double().requires_grad_(True)
    tanh = nn.GELU(approximate="tanh").double()
    inplace = nn.SiLU(inplace=True)
    with probe_layers(nn.Sequential(tanh, inplace)):
        torch.testing.assert_close(tanh(x), nn.functional.gelu(x, approximate="tanh"), rtol=0, atol=0)
        y = x.detach().clone()
        assert inplace(y) is y  # the in-place SiLU keeps its own code (and its write)
    (g,) = torch.autograd.grad(fast_gelu(x).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x, create_graph=True)
    pdf = torch.exp(-0.5 * x * x) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(h, pdf * (2 - x * x), rtol=1e-12, atol=1e-12)  # gelu''(x), closed form
    (gs,) = torch.autograd.grad(fast_silu(x).sum(), x, create_graph=True)
    (hs,) = torch.autograd.grad(gs.sum(), x, create_graph=True)
    (hs_ref,) = torch.autograd.grad(torch.autograd.grad(nn.functional.silu(x).sum(), x, create_graph=True)[0].sum(), x)
    torch.testing.assert_close(hs, hs_ref, rtol=1e-12, atol=1e-12)  # silu''(x)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(h.sum(), x)  # a third derivative would miss terms: it raises instead
