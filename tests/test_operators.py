import copy

import pytest
import torch
from torch import nn

from lightning_hessian.errors import ProbeProductError
from lightning_hessian.operators import HessianOperator, batch_size, cast_batch
from tests.cases import CASES, dense_hessian, make_case, mse_loss


@pytest.mark.parametrize("name", CASES)
def test_matvec_matches_dense_float64_hessian(name):
    model, loss_fn, batches = make_case(name)
    reference = dense_hessian(model, loss_fn, batches)
    operator = HessianOperator(model, loss_fn, batches)
    assert operator.num_params == reference.shape[0]
    assert operator.num_samples == sum(b[0].shape[0] for b in batches)
    dense = operator.dense()
    assert operator.num_products == operator.num_params
    scale = reference.abs().max()
    assert (dense - reference).abs().max() <= 1e-12 * scale
    assert (dense - dense.T).abs().max() <= 1e-12 * scale


def test_sample_weighting_differs_from_batch_mean():
    """Batches of unequal size are weighted by their sample count, not averaged per batch."""
    model, loss_fn, batches = make_case("tanh_mse")
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    one_batch = HessianOperator(model, loss_fn, [(x, y)]).dense()
    split = HessianOperator(model, loss_fn, batches).dense()
    torch.testing.assert_close(split, one_batch, rtol=1e-12, atol=1e-14)


def test_float32_model_with_float64_products():
    model64, loss_fn, batches64 = make_case("tanh_mse")
    reference = dense_hessian(model64, loss_fn, batches64)
    model32 = model64.float()
    batches32 = [(x.float(), y.float()) for x, y in batches64]
    operator = HessianOperator(model32, loss_fn, batches32, dtype=torch.float64)
    # the float32 weights differ from the float64 ones by rounding only
    assert (operator.dense() - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert next(model32.parameters()).dtype == torch.float32
    op32 = HessianOperator(model32, loss_fn, batches32)
    assert op32.dtype == torch.float32
    v = torch.randn(op32.num_params)
    assert op32.matvec(v).dtype == torch.float32


def test_gradient_and_loss_match_autograd():
    model, loss_fn, batches = make_case("relu_ce")
    operator = HessianOperator(model, loss_fn, batches)
    total = sum(b[0].shape[0] for b in batches)
    model.eval()
    loss = sum(b[0].shape[0] * loss_fn(model, b) for b in batches) / total
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.train()
    assert operator.loss() == pytest.approx(loss.item(), rel=1e-13)
    torch.testing.assert_close(operator.gradient(), torch.cat([g.reshape(-1) for g in grads]), rtol=1e-12, atol=1e-14)


def test_model_state_untouched():
    model, loss_fn, batches = make_case("bn_tanh_ce")
    model.train()
    model[3].eval()  # a submodule with its own flag must keep it
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    operator = HessianOperator(model, loss_fn, batches)
    operator.matvec(torch.ones(operator.num_params, dtype=torch.float64))
    operator.gradient()
    operator.loss()
    assert model.training and model[1].training and not model[3].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_frozen_parameters_are_excluded_and_subset_selectable():
    model, loss_fn, batches = make_case("tanh_mse")
    full = dense_hessian(model, loss_fn, batches)
    model[0].weight.requires_grad_(False)
    operator = HessianOperator(model, loss_fn, batches)
    skip = model[0].weight.numel()
    torch.testing.assert_close(operator.dense(), full[skip:, skip:], rtol=1e-12, atol=1e-14)
    only_last = HessianOperator(model, loss_fn, batches, params=[model[2].weight])
    n_last = model[2].weight.numel()
    start = skip + model[0].bias.numel()
    torch.testing.assert_close(only_last.dense(), full[start : start + n_last, start : start + n_last])
    assert only_last.param_names == ["2.weight"]


def test_inference_mode_and_no_grad_contexts_are_overridden():
    model, loss_fn, batches = make_case("tanh_mse")
    operator = HessianOperator(model, loss_fn, batches)
    v = torch.randn(operator.num_params, dtype=torch.float64)
    expected = operator.matvec(v)
    with torch.inference_mode():
        torch.testing.assert_close(operator.matvec(v), expected)
    with torch.no_grad():
        torch.testing.assert_close(operator.matvec(v), expected)


def test_unused_parameters_give_zero_rows():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 1)
            self.unused = nn.Linear(3, 1)

        def forward(self, x):
            return self.used(x)

    model = WithUnused().double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
    dense = HessianOperator(model, mse_loss, [(x, y)]).dense()
    assert dense[4:].abs().max() == 0 and dense[:4, :4].abs().max() > 0


def test_invalid_arguments():
    model, loss_fn, batches = make_case("tanh_mse")
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        HessianOperator(model, loss_fn, batches, dtype=torch.float16)
    with pytest.raises(ValueError, match="empty"):
        HessianOperator(model, loss_fn, [])
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="require grad"):
        HessianOperator(frozen, loss_fn, batches)
    operator = HessianOperator(model, loss_fn, batches)
    with pytest.raises(ValueError, match="entries"):
        operator.matvec(torch.zeros(3))
    bad = HessianOperator(model, lambda m, b: m(b[0]), batches)
    with pytest.raises(ProbeProductError, match="scalar") as info:
        bad.matvec(torch.zeros(bad.num_params, dtype=torch.float64))
    assert isinstance(info.value.__cause__, ValueError)
    for kwargs, word in [({"cache_graph": "yes"}, "cache_graph"), ({"strategy": "magic"}, "strategy")]:
        with pytest.raises(ValueError, match=word):
            HessianOperator(model, loss_fn, batches, **kwargs)
    for fraction in (0, 1.5, True):
        with pytest.raises(ValueError, match="memory_fraction"):
            HessianOperator(model, loss_fn, batches, memory_fraction=fraction)
    with pytest.raises(ValueError, match="shape"):
        operator.matmat(torch.zeros(operator.num_params + 1, 2, dtype=torch.float64))


def test_batch_size_and_cast_batch():
    x, y = torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)
    assert batch_size((x, y)) == 5
    assert batch_size({"input": x, "target": y}) == 5
    assert batch_size([[x], y]) == 5
    with pytest.raises(ValueError, match="sample count"):
        batch_size({"name": "abc"})
    cast = cast_batch({"x": x, "y": y, "meta": "m"}, dtype=torch.float64)
    assert cast["x"].dtype == torch.float64 and cast["y"].dtype == torch.long and cast["meta"] == "m"


@pytest.mark.parametrize("name", ["relu_ce", "bn_tanh_ce"])
def test_cached_graph_gives_the_same_products(name):
    model, loss_fn, batches = make_case(name)
    plain = HessianOperator(model, loss_fn, batches)
    cached = HessianOperator(model, loss_fn, batches, cache_graph=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(plain.num_params, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(cached.matvec(v), plain.matvec(v), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(cached.gradient(), plain.gradient(), rtol=1e-13, atol=1e-15)
    assert cached.loss() == pytest.approx(plain.loss(), rel=1e-14)
    cast = HessianOperator(copy.deepcopy(model).float(), loss_fn, batches, dtype=torch.float64, cache_graph=True)
    torch.testing.assert_close(cast.matvec(v), plain.matvec(v), rtol=1e-5, atol=1e-6)


def test_dataclass_batches_and_batch_size_fn():
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        meta: str
        x: torch.Tensor
        y: torch.Tensor

    x, y = torch.zeros(5, 2), torch.zeros(5, dtype=torch.long)
    batch = Batch("m", x, y)
    assert batch_size(batch) == 5
    cast = cast_batch(batch, dtype=torch.float64)
    assert isinstance(cast, Batch) and cast.x.dtype == torch.float64 and cast.y.dtype == torch.long
    model, loss_fn, batches = make_case("tanh_mse")
    as_dc = [Batch("b", bx, by) for bx, by in batches]
    op = HessianOperator(model, lambda m, b: loss_fn(m, (b.x, b.y)), as_dc)
    assert op.num_samples == sum(b[0].shape[0] for b in batches)
    torch.testing.assert_close(op.dense(), dense_hessian(model, loss_fn, batches), rtol=1e-12, atol=1e-14)
    # batch_size_fn overrides the count: equal weights of 1 per batch give the mean of the batch means
    equal = HessianOperator(model, loss_fn, batches, batch_size_fn=lambda b: 1)
    assert equal.num_samples == len(batches)
    per_batch = [dense_hessian(model, loss_fn, [b]) for b in batches]
    torch.testing.assert_close(equal.dense(), sum(per_batch) / len(batches), rtol=1e-12, atol=1e-14)
    with pytest.raises(ProbeProductError, match="batch_size_fn"):
        HessianOperator(model, loss_fn, batches, batch_size_fn=lambda b: -1)


@pytest.mark.parametrize("strategy", ["cached", "double_backward", "forward_over_reverse"])
@pytest.mark.parametrize("name", ["relu_ce", "bn_tanh_ce"])
def test_every_strategy_matvec_and_matmat_match_dense(name, strategy):
    model, loss_fn, batches = make_case(name)
    reference = dense_hessian(model, loss_fn, batches)
    op = HessianOperator(model, loss_fn, batches, strategy=strategy)
    block = torch.randn(op.num_params, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = reference.abs().max()
    assert (op.matmat(block) - reference @ block).abs().max() <= 1e-12 * scale
    assert (op.matvec(block[:, 0]) - reference @ block[:, 0]).abs().max() <= 1e-12 * scale
    assert op.num_products == 6 and op.strategy == strategy
    cast = HessianOperator(copy.deepcopy(model).float(), loss_fn, batches, dtype=torch.float64, strategy=strategy)
    assert (cast.matmat(block) - reference @ block).abs().max() <= 1e-5 * scale


def test_auto_strategy_follows_the_memory_estimate(monkeypatch):
    import lightning_hessian.operators as operators

    model, loss_fn, batches = make_case("relu_ce")
    roomy = HessianOperator(model, loss_fn, batches)
    assert roomy.cache_graph == "auto" and roomy.strategy == "cached"
    assert 0 < roomy.memory_estimate <= roomy.memory_fraction * roomy.memory_available
    assert HessianOperator(model, loss_fn, batches, cache_graph=True).strategy == "cached"
    assert HessianOperator(model, loss_fn, batches, cache_graph=False).strategy == operators.UNCACHED_STRATEGY
    monkeypatch.setattr(operators, "available_memory", lambda device: roomy.memory_estimate)
    tight = HessianOperator(model, loss_fn, batches, memory_fraction=0.5)
    v = torch.randn(tight.num_params, dtype=torch.float64)
    torch.testing.assert_close(tight.matvec(v), roomy.matvec(v), rtol=1e-13, atol=1e-15)
    assert tight.strategy == operators.UNCACHED_STRATEGY and tight._graphs is None


def test_saved_tensor_bytes_closed_form():
    from lightning_hessian.operators import saved_tensor_bytes

    w = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, 7, dtype=torch.float64)
    # x @ w saves x only (w's gradient needs x; x needs no gradient); tanh saves its (11, 3) output
    _, nbytes = saved_tensor_bytes(lambda: torch.tanh(x @ w).sum(), exclude=[w, x])
    assert nbytes == 11 * 3 * 8
    _, with_inputs = saved_tensor_bytes(lambda: torch.tanh(x @ w).sum())
    assert with_inputs == 11 * 3 * 8 + x.numel() * 8


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan"), None])
def test_agreed_sum_flags_any_non_finite_entry_but_not_a_finite_sum_overflow(bad):
    from lightning_hessian.operators import _agreed_sum

    values = torch.full((1000,), 3e38, dtype=torch.float32)  # finite entries whose float32 sum overflows
    values[1::2] = 1.0
    if bad is not None:
        values[777] = bad
        with pytest.raises(ProbeProductError, match="it produced non-finite values"):
            _agreed_sum(lambda: values, 1000, "product", like=values)
    else:
        torch.testing.assert_close(_agreed_sum(lambda: values, 1000, "product", like=values), values)
