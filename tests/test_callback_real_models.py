"""HessianSpectrum on real architectures (float64, tiny configs): Transformers, SDPA, Lightning's demo Transformer,
a ResNet with BatchNorm and a ``torch.compile`` d submodule.

Each fit runs one epoch; the epoch-0 probe's ``lambda_max`` must equal (rel 1e-6) the functional
:func:`~lightning_hessian.hessian_eigenvalues` on the same probe batches at the final weights (the probe runs after the
last optimizer step), and the BatchNorm running statistics must be the same with and without the callback.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import Transformer as LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import demos, hessian_eigenvalues
from lightning_hessian.callback import HessianSpectrum

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*KS critical value.*"),
    pytest.mark.filterwarnings("ignore:.*of the .* parameters.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*skipping the.*"),
    pytest.mark.filterwarnings("ignore:.*exceeds the .* trainable parameters.*"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]
VOCAB = 7


def _lm_loss(net: nn.Module, batch) -> torch.Tensor:
    return demos.lm_loss(net, batch)


def _lightning_transformer_loss(net: nn.Module, batch) -> torch.Tensor:
    tokens, targets = batch
    return nn.functional.nll_loss(net(tokens, targets), targets.reshape(-1))


def _ce_loss(net: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


class Wrapped(pl.LightningModule):
    """A LightningModule around ``net`` whose training step is ``loss_fn(net, batch)``."""

    def __init__(self, net: nn.Module, loss_fn) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self.net, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _tokens(n: int, length: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, length + 1), generator=g)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def _transformer_lm():
    net = demos.TransformerLM(vocab_size=VOCAB, d_model=4, nhead=2, num_layers=1, max_len=5)
    return net, _lm_loss, _tokens(8, 5, 1)


def _sdpa_lm():
    net = demos.SDPAttentionLM(vocab_size=VOCAB, d_model=4, nhead=2, num_layers=1, max_len=5)
    return net, _lm_loss, _tokens(8, 5, 2)


def _lightning_transformer():
    net = LightningTransformer(vocab_size=VOCAB, ninp=2, nhead=2, nhid=2, nlayers=1, dropout=0.0)
    return net, _lightning_transformer_loss, _tokens(6, 4, 3)


def _resnet():
    net = demos.ResNetCNN(width=2, blocks=(1, 1, 0), num_classes=3)
    g = torch.Generator().manual_seed(4)
    data = TensorDataset(2.0 * torch.randn(8, 3, 6, 6, generator=g) + 0.5, torch.randint(0, 3, (8,), generator=g))
    return net, _ce_loss, data


def _compiled_submodule():
    net, loss_fn, data = _sdpa_lm()
    net.blocks[0] = torch.compile(net.blocks[0], backend="aot_eager")
    return net, loss_fn, data


MODELS = {
    "transformer_lm": _transformer_lm,
    "sdpa_lm": _sdpa_lm,
    "lightning_transformer": _lightning_transformer,
    "resnet_bn": _resnet,
    "compiled_submodule": _compiled_submodule,
}


def _fit(module: pl.LightningModule, data: TensorDataset, callbacks) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    return trainer


@pytest.mark.parametrize("name", list(MODELS))
def test_callback_lambda_max_matches_functional(name):
    torch.manual_seed(0)
    net, loss_fn, data = MODELS[name]()
    module = Wrapped(net, loss_fn).double()
    data = TensorDataset(*(t.double() if t.is_floating_point() else t for t in data.tensors))
    twin = copy.deepcopy(module) if name != "compiled_submodule" else None
    spectrum = HessianSpectrum(
        top_k=3,
        num_tracked=2,
        probe_samples=len(data),
        density=False,
        jacobian=False,
        embedding=False,
        probe_at_init=False,
        powerlaw_every_n_epochs=None,
        trace_samples=4,
        tol=1e-9,
        max_overhead=None,
    )
    _fit(module, data, [spectrum])
    metrics = spectrum.history[-1]["metrics"]
    lam = metrics["hessian/lambda_max"]
    assert math.isfinite(lam) and math.isfinite(metrics["hessian/trace"])
    batches = spectrum._runner.probe_set.batches
    reference = hessian_eigenvalues(
        module, lambda m, b: m.training_step(b, 0), batches, k=2, dtype=torch.float64, tol=1e-10
    )
    assert lam == pytest.approx(float(reference[0]), rel=1e-6)
    if twin is not None:  # the probe changes no buffer: training without the callback gives the same module
        torch.manual_seed(0)
        _fit(twin, data, [])
        for (key, a), (_, b) in zip(module.state_dict().items(), twin.state_dict().items()):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("subspace", [False, True])
def test_checkpoint_holds_one_vector_by_default(subspace):
    torch.manual_seed(0)
    net, loss_fn, data = _resnet()
    module = Wrapped(net, loss_fn)
    spectrum = HessianSpectrum(
        top_k=3, num_tracked=3, probe_samples=8, density=False, jacobian=False, embedding=False, probe_at_init=False,
        powerlaw_every_n_epochs=None, trace_samples=2, tol=1e-3, max_overhead=None, checkpoint_subspace=subspace,
    )  # fmt: skip
    _fit(module, data, [spectrum])
    n = sum(p.numel() for p in module.parameters())
    stored = spectrum.state_dict()["ritz_vectors"]
    assert stored.dtype == torch.float32 and stored.shape == (n, 3 if subspace else 1)
    torch.testing.assert_close(stored[:, 0], spectrum._runner.vectors[:, 0])
    fresh = HessianSpectrum(checkpoint_subspace=subspace)
    fresh.load_state_dict(spectrum.state_dict())
    assert fresh._runner.vectors.shape == stored.shape


def test_block_budget_counts_columns_and_refuses_a_block_past_max_hvps():
    from lightning_hessian.callback.analyses import ProbeBudget, ProbeFailure
    from lightning_hessian.operators import HessianOperator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    op = HessianOperator(model, _ce_loss, [(x, y)])
    seen = []
    budget = ProbeBudget(op.device, 10, None, "t", heartbeat=False, on_hvp=seen.append)
    matmat, matvec = budget.bind_block(op), budget.bind(op)
    block = torch.randn(op.num_params, 4, dtype=torch.float64)
    torch.testing.assert_close(matmat(block), torch.stack([op.matvec(c) for c in block.T], dim=1))
    matvec(block[:, 0])
    assert budget.hvps == 5 and seen == [4, 5]
    matmat(block)
    with pytest.raises(ProbeFailure, match="max_hvps=10"):
        matmat(block)  # 9 + 4 > 10: refused whole
    assert budget.hvps == 9
