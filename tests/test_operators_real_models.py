"""HVPs and top eigenvalues on real architectures in float64, against dense ``torch.func.hessian`` references.

Covered: ``nn.TransformerEncoderLayer`` LM, direct ``F.scaled_dot_product_attention`` LM, Lightning's demo
``Transformer`` (``nn.Transformer`` encoder-decoder), a ResNet-style CNN with BatchNorm (non-trivial running
statistics, eval mode), and ``torch.compile`` d modules (``backend="aot_eager"``, no C++ compiler needed). Every
strategy's ``matvec`` and ``matmat`` must equal the dense ``H @ V``.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from lightning.pytorch.demos import Transformer as LightningTransformer
from torch import nn
from torch.func import functional_call, hessian
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_hessian import demos, hessian_eigenvalues
from lightning_hessian.errors import ProbeProductError
from lightning_hessian.operators import STRATEGIES, HessianOperator, probe_forward_context, uncompiled
from tests.cases import cross_entropy_loss

VOCAB = 7


def lightning_transformer_loss(model: nn.Module, batch) -> torch.Tensor:
    tokens, targets = batch
    return nn.functional.nll_loss(model(tokens, targets), targets.reshape(-1))


def _transformer_lm():
    torch.manual_seed(0)
    model = demos.TransformerLM(vocab_size=VOCAB, d_model=4, nhead=2, num_layers=1, max_len=5).double()
    return model, demos.lm_loss, demos.token_batches(2, 3, length=5, vocab_size=VOCAB, seed=1)


def _sdpa_lm():
    torch.manual_seed(0)
    model = demos.SDPAttentionLM(vocab_size=VOCAB, d_model=4, nhead=2, num_layers=1, max_len=5).double()
    return model, demos.lm_loss, demos.token_batches(2, 3, length=5, vocab_size=VOCAB, seed=2)


def _lightning_transformer():
    torch.manual_seed(0)
    model = LightningTransformer(vocab_size=VOCAB, ninp=2, nhead=2, nhid=2, nlayers=1, dropout=0.0).double()
    return model, lightning_transformer_loss, demos.token_batches(2, 2, length=4, vocab_size=VOCAB, seed=3)


def _resnet():
    torch.manual_seed(0)
    model = demos.ResNetCNN(width=2, blocks=(1, 1, 0), num_classes=3).double()
    batches = demos.image_batches(2, 3, shape=(3, 6, 6), num_classes=3, seed=4, dtype=torch.float64)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for x, _ in batches:
            model(2.0 * x + 0.5)
    return model, cross_entropy_loss, batches


def _compiled_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(10, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (10,), generator=gen)
    return torch.compile(model, backend="aot_eager"), cross_entropy_loss, [(x[:4], y[:4]), (x[4:], y[4:])]


def _compiled_submodule():
    model, loss_fn, batches = _sdpa_lm()
    model.blocks[0] = torch.compile(model.blocks[0], backend="aot_eager")
    return model, loss_fn, batches


MODELS = {
    "transformer_lm": _transformer_lm,
    "sdpa_lm": _sdpa_lm,
    "lightning_transformer": _lightning_transformer,
    "resnet_bn": _resnet,
    "compiled": _compiled_mlp,
    "compiled_submodule": _compiled_submodule,
}


def reference_hessian(model: nn.Module, loss_fn, batches) -> torch.Tensor:
    """Dense float64 Hessian of the sample-weighted probe loss of a ``functional_call`` loss, column by column
    (``torch.autograd.functional.hessian(vectorize=False)``), in eval mode under the MATH attention kernel, of the
    eager module (``_orig_mod`` for compiled ones).

    Not ``torch.func.hessian``: with torch 2.13 its vmapped Jacobians are wrong (asymmetric, off by up to 0.2 in the
    LayerNorm-weight rows) on these Transformers, while forward-over-reverse without vmap, reverse-over-reverse and
    central finite differences of the gradient agree to 1e-10; see ``test_torch_func_hessian_is_not_a_reference``.
    """
    eager = model._orig_mod if hasattr(model, "_orig_mod") else model
    stack = contextlib.ExitStack()
    for name, child in list(eager.named_modules()):
        if hasattr(child, "_orig_mod"):  # compiled child: use its original in place
            parent = eager.get_submodule(name.rsplit(".", 1)[0]) if "." in name else eager
            key = name.rsplit(".", 1)[-1]
            parent._modules[key] = child._orig_mod
            stack.callback(parent._modules.__setitem__, key, child)
    names = [n for n, p in eager.named_parameters() if p.requires_grad]
    params = dict(eager.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    buffers = {n: b.detach() for n, b in eager.named_buffers()}
    total = sum(int(b[0].shape[0]) for b in batches)

    def loss_of(flat):
        pieces = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        model_call = _Functional(eager, {**pieces, **buffers})
        return sum(b[0].shape[0] * loss_fn(model_call, b) for b in batches) / total

    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    was = eager.training
    eager.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with stack, sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.functional.hessian(loss_of, flat, vectorize=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        eager.train(was)


class _Functional(nn.Module):
    """Calls ``module`` with substituted tensors (``functional_call``), as a callable model for ``loss_fn``."""

    def __init__(self, module: nn.Module, tensors: dict) -> None:
        super().__init__()
        self.inner = module
        self.tensors = tensors

    def forward(self, *args):
        return functional_call(self.inner, self.tensors, args)


@functools.cache
def _case(name: str):
    """``(model, loss_fn, batches, dense reference)``, built once (inside a test, so on one thread)."""
    model, loss_fn, batches = MODELS[name]()
    return model, loss_fn, batches, reference_hessian(model, loss_fn, batches)


def test_double_backward_fails_without_the_fixes():
    """The premise: fused SDPA kernels and compiled graphs have no double backward (else these tests prove little)."""
    model, loss_fn, batches = _sdpa_lm()
    model.eval()
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model, batches[0]), params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads])
    compiled, loss_fn, batches = _compiled_mlp()
    params = list(compiled.parameters())
    with pytest.raises(RuntimeError, match="double backward"):
        grads = torch.autograd.grad(loss_fn(compiled, batches[0]), params, create_graph=True)
        torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads])
    with probe_forward_context(), uncompiled(compiled) as eager:  # and both work with the fixes
        grads = torch.autograd.grad(loss_fn(eager, batches[0]), params, create_graph=True)
        torch.autograd.grad(grads, params, [torch.ones_like(g) for g in grads])


@pytest.mark.parametrize("name", list(MODELS))
def test_every_strategy_and_matmat_match_dense(name):
    model, loss_fn, batches, reference = _case(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    n = reference.shape[0]
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    expected = reference @ block
    scale = expected.abs().max()
    assert scale > 0
    for strategy in STRATEGIES:
        op = HessianOperator(model, loss_fn, batches, strategy=strategy)
        assert op.num_params == n and op.strategy == strategy
        single = torch.stack([op.matvec(block[:, j]) for j in range(3)], dim=1)
        assert (single - expected).abs().max() <= 1e-10 * scale, strategy
        assert (op.matmat(block) - expected).abs().max() <= 1e-10 * scale, strategy
        assert op.num_products == 6
    for key, value in model.state_dict().items():  # BatchNorm buffers untouched
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("name", list(MODELS))
def test_top_eigenvalues_match_dense(name):
    model, loss_fn, batches, reference = _case(name)
    expected = torch.linalg.eigvalsh(reference).flip(0)[:3]
    found = hessian_eigenvalues(model, loss_fn, batches, k=3, tol=1e-10)
    rel = (found - expected).abs() / expected.abs()
    assert rel.max() <= 1e-8, (found, expected)


def test_torch_func_hessian_is_not_a_reference():
    """Documents why the reference avoids ``torch.func.hessian``; if this starts failing, torch fixed the bug."""
    model, loss_fn, batches = _sdpa_lm()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def loss_of(flat):
        tensors = {n: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
        return loss_fn(_Functional(model, tensors), batches[0])

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with sdpa_kernel(SDPBackend.MATH):
        vmapped = hessian(loss_of)(flat)
    assert (vmapped - vmapped.T).abs().max() > 1e-3


def test_compiled_swaps_are_restored():
    model, _, _ = _compiled_submodule()
    compiled_child = model.blocks[0]
    with uncompiled(model) as eager:
        assert eager is model and model.blocks[0] is compiled_child._orig_mod
    assert model.blocks[0] is compiled_child
    with pytest.raises(KeyError), uncompiled(model):
        raise KeyError("restored on errors too")
    assert model.blocks[0] is compiled_child
    outer = torch.compile(model, backend="aot_eager")
    with uncompiled(outer) as eager:
        assert eager is model and model.blocks[0] is compiled_child._orig_mod
    assert model.blocks[0] is compiled_child


def test_probe_forward_context_restores_settings():
    fastpath = torch.backends.mha.get_fastpath_enabled()
    with probe_forward_context(nn.LSTM(2, 2)):
        assert not torch.backends.mha.get_fastpath_enabled()
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    with pytest.raises(KeyError), probe_forward_context():
        raise KeyError("restored on errors too")
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_failing_product_raises_probe_product_error():
    model, loss_fn, batches = _sdpa_lm()

    def broken(m, b):
        raise ArithmeticError("boom")

    op = HessianOperator(model, broken, batches)
    with pytest.raises(ProbeProductError, match="product #1.*boom") as info:
        op.matvec(torch.zeros(op.num_params, dtype=torch.float64))
    assert isinstance(info.value.__cause__, ArithmeticError)
