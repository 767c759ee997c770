"""HessianSpectrum end to end on tiny models: exact float64 references, RNG isolation, EarlyStopping semantics,
TensorBoard event files, state across resume, LightningCLI."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian import fit_power_law, hutchinson_trace, spectral_gap
from lightning_hessian.callback import HessianConfigError, HessianSpectrum, ProbeFailure
from lightning_hessian.trace import deflated_trace

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*KS critical value.*"),
    pytest.mark.filterwarnings("ignore:.*of the .* parameters.*"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*"),
    pytest.mark.filterwarnings("ignore:.*exceeds the .* trainable parameters.*"),
]


class Net(pl.LightningModule):
    """Small classifier whose training_step logs (the default loss must silence it)."""

    def __init__(self, d_in: int = 4, width: int = 6, classes: int = 3, dropout: float = 0.0, lr: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Dropout(dropout), nn.Linear(width, classes))
        self.lr = lr
        self.logged_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(n: int = 48, d_in: int = 4, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g))


def trainer(tmp_path=None, callbacks=(), max_epochs: int = 1, logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        **kwargs,
    )


def dense_hessian(model: Net, data: TensorDataset) -> torch.Tensor:
    """Exact float64 Hessian of the mean cross-entropy over the whole data set."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    x, y = data.tensors[0].double(), data.tensors[1]
    model64 = Net().double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        chunks = flat.split([s.numel() for s in shapes])
        p = {k: c.view(s) for k, c, s in zip(names, chunks, shapes)}
        out = torch.func.functional_call(model64, p, (x,))
        return nn.functional.cross_entropy(out, y)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    return torch.func.hessian(loss)(flat)


QUIET = dict(density=False, trace=False, max_overhead=None)  # exact schedule: reproducible probe epochs


# ----------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(top_k=2), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(every_n_epochs=0), "every_n_epochs"),
        (dict(probe_samples=0), "probe_samples"),
        (dict(dtype="float16"), "'float16'"),
        (dict(when="on_epoch"), "'on_epoch'"),
        (dict(ks_level=0.03), "0.03"),
        (dict(prefix=""), "prefix"),
        (dict(prefix="hessian/"), "prefix"),
        (dict(max_hvps=0), "max_hvps"),
        (dict(max_seconds=-1.0), "max_seconds"),
        (dict(loss_fn="mse"), "loss_fn"),
        (dict(every_n_epochs=2, powerlaw_every_n_epochs=3), "multiple"),
        (dict(num_tracked=1), "num_tracked"),
        (dict(tol=0.0), "tol"),
        (dict(density="yes"), "density"),
        (dict(probe_batch_size=0), "probe_batch_size"),
        (dict(max_overhead=0.0), "max_overhead"),
    ],
)
def test_invalid_arguments_name_the_value(kwargs, fragment):
    with pytest.raises(HessianConfigError, match=fragment) as info:
        HessianSpectrum(**kwargs)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MisconfigurationException)


def test_small_top_k_warns_about_test_power():
    with pytest.warns(UserWarning, match="KS critical value d_c = 0.136"):
        HessianSpectrum(top_k=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HessianSpectrum(top_k=200)
        HessianSpectrum(top_k=50, powerlaw_every_n_epochs=None)  # no power-law test: nothing to warn about


def test_state_key_distinguishes_instances():
    a, b = HessianSpectrum(probe_samples=64), HessianSpectrum(probe_samples=128)
    assert a.state_key != b.state_key
    assert HessianSpectrum(prefix="x").state_key != HessianSpectrum().state_key


# ----------------------------------------------------------------------------------------------- exactness
def test_metrics_match_dense_float64_reference(tmp_path):
    torch.manual_seed(0)
    data = make_data()
    model = Net()
    cb = HessianSpectrum(
        top_k=12,
        probe_samples=len(data),
        dtype="float64",
        tol=1e-10,
        trace_samples=5,
        num_tracked=4,
        density=True,
        probe_batch_size=20,
        probe_at_init=False,  # the epoch-0 probe is then the first, full probe (the init probe is tested elsewhere)
    )
    trainer(tmp_path, [cb]).fit(model, DataLoader(data, batch_size=16, shuffle=True))
    m = {k: float(v) for k, v in cb.history[-1]["metrics"].items()}
    hess = dense_hessian(model, data)
    eig = torch.linalg.eigvalsh(hess).flip(0)
    assert m["hessian/lambda_max"] == pytest.approx(float(eig[0]), rel=1e-9, abs=1e-12)
    gap, ratio = spectral_gap(eig[:2])
    assert m["hessian/spectral_gap"] == pytest.approx(gap, rel=1e-7, abs=1e-12)
    assert m["hessian/spectral_gap_ratio"] == pytest.approx(ratio, rel=1e-9)
    fit = fit_power_law(eig[:12], alpha=0.05)
    for key, value in [
        ("powerlaw_beta", fit.beta),
        ("powerlaw_s", fit.s),
        ("ks_distance", fit.ks_distance),
        ("ks_critical", fit.ks_critical),
        ("powerlaw_beta_stderr", fit.beta_stderr),
    ]:
        assert m[f"hessian/{key}"] == pytest.approx(value, rel=1e-6), key
    assert m["hessian/is_power_law"] == float(fit.is_power_law)
    # the full probe's trace deflates its top-12 Ritz pairs: the same seeded estimator on the dense matrix with its
    # exact top-12 eigenvectors gives the same value and stochastic-part stderr
    values, vectors = torch.linalg.eigh(hess)
    top = vectors.flip(1)[:, :12]
    ref = deflated_trace(lambda v: hess @ v, hess.shape[0], top, num_samples=5, seed=0 + 7919, ritz_values=eig[:12])
    assert m["hessian/trace"] == pytest.approx(ref.value, rel=1e-7)
    assert m["hessian/trace_stderr"] == pytest.approx(ref.stderr, rel=1e-5)
    assert m["hessian/trace"] != pytest.approx(
        hutchinson_trace(lambda v: hess @ v, hess.shape[0], num_samples=5, seed=0 + 7919).value, rel=1e-3
    )
    # the first probe has no previous subspace (0: finite by design)
    assert len(cb.history) == 1 and cb.history[0]["full"] and m["hessian/subspace_overlap"] == 0.0
    assert m["hessian/hvps"] > 0 and m["hessian/probe_seconds"] > 0
    # logged == history, through pl_module.log (callback_metrics)
    assert float(trainer_metrics := cb.history[-1]["metrics"]["hessian/lambda_max"]) == trainer_metrics


def test_cheap_probe_trace_deflates_every_direction_of_its_solve(tmp_path, monkeypatch):
    # the cheap probe's basis holds its whole run and check (no restart): each eigen product adds one exact
    # deflation direction (V^T H V = diag(theta) against the dense Hessian), the samples are the only extra products
    import lightning_hessian.callback.analyses as analyses

    recorded = []
    real = analyses.deflated_trace

    def spy(matvec, n, deflation, **kwargs):
        recorded.append((deflation.detach().clone(), kwargs["ritz_values"].detach().clone()))
        return real(matvec, n, deflation, **kwargs)

    monkeypatch.setattr(analyses, "deflated_trace", spy)
    torch.manual_seed(3)
    data = make_data(n=40, d_in=6, seed=3)
    model = Net(d_in=6, width=12)
    cb = HessianSpectrum(
        top_k=6, probe_samples=len(data), dtype="float64", tol=1e-10, trace_samples=5, num_tracked=3,
        probe_at_init=False, powerlaw_every_n_epochs=None, **{**QUIET, "trace": True},
    )  # fmt: skip
    trainer(tmp_path, [cb], max_epochs=2).fit(model, DataLoader(data, batch_size=40))
    last = cb.history[-1]
    assert not last["full"] and len(recorded) == 2
    vectors, values = recorded[-1]
    assert vectors.shape[1] == last["metrics"]["hessian/hvps"] - 5
    hess = dense_hessian(model, data)
    scale = float(torch.linalg.eigvalsh(hess).abs().max())
    torch.testing.assert_close(vectors.T @ hess @ vectors, torch.diag(values), atol=1e-9 * scale, rtol=0)
    torch.testing.assert_close(
        vectors.T @ vectors, torch.eye(vectors.shape[1], dtype=torch.float64), atol=1e-10, rtol=0
    )


def test_per_layer_lambda_max_matches_dense_blocks(tmp_path):
    torch.manual_seed(1)
    data = make_data(n=32)
    model = Net()
    cb = HessianSpectrum(
        top_k=5, probe_samples=32, dtype="float64", tol=1e-10, per_layer=True, probe_at_init=False, **QUIET
    )
    t = trainer(tmp_path, [cb])
    t.fit(model, DataLoader(data, batch_size=8))
    hess = dense_hessian(model, data)
    sizes = [p.numel() for p in model.parameters()]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    blocks = {"net.0": (bounds[0], bounds[2]), "net.3": (bounds[2], bounds[4])}
    for name, (lo, hi) in blocks.items():
        eig = torch.linalg.eigvalsh(hess[lo:hi, lo:hi]).flip(0)
        assert float(t.callback_metrics[f"hessian/{name}/lambda_max"]) == pytest.approx(float(eig[0]), rel=1e-8)
        beta = fit_power_law(eig[:5]).beta
        assert float(t.callback_metrics[f"hessian/{name}/powerlaw_beta"]) == pytest.approx(beta, rel=1e-5)


def test_warm_start_and_subspace_overlap_on_fixed_weights(tmp_path):
    torch.manual_seed(2)
    data = make_data()
    model = Net(lr=0.0)  # weights never change: consecutive probes see the same Hessian
    cb = HessianSpectrum(
        top_k=10, probe_samples=48, dtype="float64", tol=1e-8, num_tracked=3, powerlaw_every_n_epochs=None, **QUIET
    )
    trainer(tmp_path, [cb], max_epochs=3).fit(model, DataLoader(data, batch_size=16, shuffle=True))
    overlaps = [h["metrics"]["hessian/subspace_overlap"] for h in cb.history]
    hvps = [h["metrics"]["hessian/hvps"] for h in cb.history]
    assert overlaps[0] == 0.0
    assert overlaps[1] == pytest.approx(1.0, abs=1e-6) and overlaps[2] == pytest.approx(1.0, abs=1e-6)
    assert hvps[1] < hvps[0]  # warm start from the previous Ritz vectors


# ----------------------------------------------------------------------------------------------- no side effects
class Augmented(torch.utils.data.Dataset):
    """Random jitter on every read (draws from the global torch RNG, like a data augmentation)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data[i]
        return x + 0.05 * torch.randn_like(x), y


def _fit_weights(with_callback: bool, tmp_path) -> tuple[dict[str, torch.Tensor], float]:
    pl.seed_everything(123, verbose=False)
    data = Augmented(make_data(n=64))
    model = Net(dropout=0.3)
    spectrum = HessianSpectrum(top_k=8, probe_samples=40, seed=5, per_layer=True, max_overhead=None)
    callbacks = [spectrum] if with_callback else []
    t = trainer(tmp_path, callbacks, max_epochs=3)
    t.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(t.callback_metrics["train_loss"])


def test_probing_changes_nothing_about_training(tmp_path):
    base, base_loss = _fit_weights(False, tmp_path)
    probed, probed_loss = _fit_weights(True, tmp_path)
    for key in base:
        assert torch.equal(base[key], probed[key]), key  # bit for bit: same data order, dropout masks, weights
    assert base_loss == probed_loss  # training_step's self.log was silenced during probes


def test_default_loss_prefers_hessian_loss_and_rejects_manual_optimization(tmp_path):
    class Custom(Net):
        def hessian_loss(self, batch):
            x, y = batch
            return 2.0 * nn.functional.cross_entropy(self(x), y)

    torch.manual_seed(0)
    data = make_data(n=24)
    cb = HessianSpectrum(top_k=5, probe_samples=24, dtype="float64", tol=1e-10, **QUIET)
    model = Custom()
    trainer(tmp_path, [cb]).fit(model, DataLoader(data, batch_size=8))
    eig = torch.linalg.eigvalsh(2.0 * dense_hessian(model, data))
    assert cb.history[-1]["metrics"]["hessian/lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-8)

    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match="manual"):
        trainer(tmp_path, [HessianSpectrum(**QUIET)]).fit(Manual(), DataLoader(data, batch_size=8))


# ----------------------------------------------------------------------------------------------- failures
class FailingAt(Net):
    """hessian_loss is NaN from epoch ``fail_epoch`` on (a non-finite probe loss)."""

    def __init__(self, fail_epoch: int):
        super().__init__()
        self.fail_epoch = fail_epoch

    def hessian_loss(self, batch):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        return loss * math.nan if self.current_epoch >= self.fail_epoch else loss


def test_failed_probe_warns_logs_nan_and_training_continues(tmp_path):
    data = make_data(n=24)
    cb = HessianSpectrum(top_k=5, probe_samples=24, **QUIET)
    t = trainer(tmp_path, [cb], max_epochs=3)
    with pytest.warns(UserWarning, match="probe failed .*not finite"):
        t.fit(FailingAt(1), DataLoader(data, batch_size=8))
    assert t.current_epoch == 3  # training ran to the end
    assert [(h["epoch"], h.get("init", False)) for h in cb.history] == [(0, True), (0, False), (1, False), (2, False)]
    first, second = cb.history[1]["metrics"], cb.history[2]["metrics"]  # history[0]: the probe at initialisation
    assert math.isfinite(first["hessian/lambda_max"]) and math.isfinite(cb.history[0]["metrics"]["hessian/ks_distance"])
    assert "hessian/ks_distance" not in first  # the init probe is the first full probe: the epoch-0 probe is cheap
    assert math.isnan(second["hessian/lambda_max"]) and math.isnan(second["hessian/spectral_gap"])
    assert second["hessian/hvps"] == 0.0 and second["hessian/probe_seconds"] >= 0.0


def test_strict_mode_raises(tmp_path):
    data = make_data(n=24)
    t = trainer(tmp_path, [HessianSpectrum(top_k=5, probe_samples=24, strict=True, **QUIET)], max_epochs=2)
    with pytest.raises(ProbeFailure, match="not finite"):
        t.fit(FailingAt(0), DataLoader(data, batch_size=8))


def test_hvp_budget_exhaustion_fails_only_that_analysis(tmp_path):
    data = make_data(n=24)
    cb = HessianSpectrum(top_k=20, probe_samples=24, max_hvps=25, tol=1e-12, trace=True, density=False)
    with pytest.warns(UserWarning, match="probe failed"):
        trainer(tmp_path, [cb]).fit(Net(), DataLoader(data, batch_size=8))
    m = cb.history[0]["metrics"]
    assert math.isnan(m["hessian/lambda_max"]) and math.isnan(m["hessian/ks_distance"])
    assert m["hessian/hvps"] <= 25


# ----------------------------------------------------------------------------------------------- early stopping
def _simulate_early_stopping(values: list[float], patience: int) -> int:
    """Epoch at which EarlyStopping(mode='min', min_delta=0, check_finite=True) stops for per-epoch values."""
    best, wait = math.inf, 0
    for epoch, value in enumerate(values):
        if not math.isfinite(value):
            return epoch
        if value < best:
            best, wait = value, 0
        else:
            wait += 1
            if wait >= patience:
                return epoch
    return len(values) - 1


@pytest.mark.parametrize("every_n_epochs", [1, 2])
def test_early_stopping_stops_where_the_metric_dictates(tmp_path, every_n_epochs):
    torch.manual_seed(3)
    data = make_data(n=32)
    cb = HessianSpectrum(
        top_k=5, probe_samples=32, every_n_epochs=every_n_epochs, powerlaw_every_n_epochs=None, **QUIET
    )
    es = EarlyStopping(monitor="hessian/lambda_max", mode="min", patience=2, strict=True)
    t = trainer(tmp_path, [es, cb], max_epochs=12)
    t.fit(Net(lr=0.5), DataLoader(data, batch_size=8, shuffle=True))
    # documented semantics: on epochs without a probe the monitor sees the last probe's value
    probed = {h["epoch"]: h["metrics"]["hessian/lambda_max"] for h in cb.history}
    seen, last = [], math.nan
    for epoch in range(t.current_epoch):
        last = probed.get(epoch, last)
        seen.append(last)
    expected = _simulate_early_stopping(seen, patience=2)
    assert es.stopped_epoch == expected or (es.stopped_epoch == 0 and expected == 11)
    assert t.current_epoch == expected + 1
    assert sorted(probed) == list(range(0, expected + 1, every_n_epochs))


def test_early_stopping_stops_on_failed_probe_nan(tmp_path):
    data = make_data(n=24)
    cb = HessianSpectrum(top_k=5, probe_samples=24, **QUIET)
    es = EarlyStopping(monitor="hessian/lambda_max", mode="min", patience=100)
    t = trainer(tmp_path, [es, cb], max_epochs=6)
    with pytest.warns(UserWarning, match="probe failed"):
        t.fit(FailingAt(2), DataLoader(data, batch_size=8))
    assert es.stopped_epoch == 2 and t.current_epoch == 3

    cb = HessianSpectrum(top_k=5, probe_samples=24, nan_on_failure=False, **QUIET)
    es = EarlyStopping(monitor="hessian/lambda_max", mode="min", patience=100)
    t = trainer(tmp_path, [es, cb], max_epochs=4)
    with pytest.warns(UserWarning, match="Logging nothing"):
        t.fit(FailingAt(2), DataLoader(data, batch_size=8))
    assert t.current_epoch == 4 and math.isfinite(float(t.callback_metrics["hessian/lambda_max"]))


def test_warns_when_early_stopping_checks_before_the_probe(tmp_path):
    data = make_data(n=16)
    es = EarlyStopping(monitor="hessian/lambda_max", check_on_train_epoch_end=False, strict=False)
    t = trainer(tmp_path, [HessianSpectrum(top_k=5, probe_samples=16, **QUIET), es], max_epochs=1, limit_val_batches=1)
    with pytest.warns(UserWarning, match="checks at on_validation_end"):
        t.fit(Net(), DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    t = trainer(tmp_path, [HessianSpectrum(top_k=5, when="validation_epoch_end", **QUIET)], max_epochs=1)
    with pytest.warns(UserWarning, match="never probes during fit"):
        t.fit(Net(), DataLoader(data, batch_size=8))
    es = EarlyStopping(monitor="hessian/trace")
    t = trainer(tmp_path, [HessianSpectrum(top_k=5, probe_samples=16, **QUIET), es], max_epochs=1)
    with pytest.warns(UserWarning, match="never logs"), pytest.raises(RuntimeError, match="not available"):
        t.fit(Net(), DataLoader(data, batch_size=8))


# ----------------------------------------------------------------------------------------------- validation hook
def test_validation_epoch_end_and_trainer_validate(tmp_path):
    torch.manual_seed(4)
    data = make_data(n=24)
    model = Net()
    cb = HessianSpectrum(top_k=5, probe_samples=24, dtype="float64", tol=1e-10, when="validation_epoch_end", **QUIET)

    class WithVal(Net):
        def validation_step(self, batch, batch_idx):
            return None

        def train_dataloader(self):
            return DataLoader(data, batch_size=8)

        def val_dataloader(self):
            return DataLoader(data, batch_size=8)

    model = WithVal()
    t = trainer(tmp_path, [cb], max_epochs=1)
    t.fit(model)
    # the sanity check is skipped; the probe at initialisation (on_train_start) comes first
    assert [(h["epoch"], h.get("init", False)) for h in cb.history] == [(0, True), (0, False)]
    eig = torch.linalg.eigvalsh(dense_hessian(model, data))
    cb2 = HessianSpectrum(top_k=5, probe_samples=24, dtype="float64", tol=1e-10, when="validation_epoch_end", **QUIET)
    t2 = trainer(tmp_path, [cb2])
    out = t2.validate(model)  # runs under torch.inference_mode
    assert out[0]["hessian/lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-8)
    assert "hessian/ks_distance" in out[0]  # a one-off validate() probe is a full probe


# ----------------------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_dashboard(tmp_path):
    from tbparse import SummaryReader
    from tensorboard.backend.event_processing.event_accumulator import DEFAULT_SIZE_GUIDANCE, EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    torch.manual_seed(5)
    data = make_data(n=40)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0, default_hp_metric=False)
    cb = HessianSpectrum(
        top_k=10,
        probe_samples=40,
        powerlaw_every_n_epochs=2,
        density=True,
        trace=True,
        density_probes=2,
        density_steps=10,
        trace_samples=4,
        max_overhead=None,
    )
    t = trainer(tmp_path, [cb], max_epochs=3, logger=logger, log_every_n_steps=1)
    model = Net()
    t.fit(model, DataLoader(data, batch_size=10))
    log_dir = logger.log_dir
    scalars = SummaryReader(log_dir).scalars
    steps_per_epoch = 4
    lam = scalars[scalars.tag == "hessian/lambda_max"]
    # step 0: the probe at initialisation, then the epoch-end probes
    assert lam.step.tolist() == [0] + [steps_per_epoch * (e + 1) - 1 for e in range(3)]
    assert lam.value.tolist() == pytest.approx([h["metrics"]["hessian/lambda_max"] for h in cb.history], rel=1e-6)
    ks = scalars[scalars.tag == "hessian/ks_distance"]
    # full probes: the probe at init (the schedule's first full probe), then every 2nd probe: epoch 1
    assert ks.step.tolist() == [0, 7]

    ea = EventAccumulator(
        log_dir, size_guidance=dict(DEFAULT_SIZE_GUIDANCE, scalars=0, histograms=0, images=0, tensors=0)
    )
    ea.Reload()
    tags = ea.Tags()
    top_k_hist = ea.Histograms("hessian/eigenvalues/top_k")  # full probes only (init, epoch 1), K values each
    assert [e.step for e in top_k_hist] == [0, 7] and {e.histogram_value.num for e in top_k_hist} == {10}
    eig_hist = ea.Histograms("hessian/eigenvalues/tracked")  # every probe, num_tracked values each
    assert [e.step for e in eig_hist] == [0, 3, 7, 11]  # aligned with the scalars
    assert {e.histogram_value.num for e in eig_hist} == {cb.num_tracked}
    assert eig_hist[-1].histogram_value.max == pytest.approx(cb.history[-1]["metrics"]["hessian/lambda_max"], rel=1e-5)
    ratio = scalars[scalars.tag == "hessian/ks_ratio"].value.to_numpy()
    assert ratio == pytest.approx(ks.value.to_numpy() / scalars[scalars.tag == "hessian/ks_critical"].value.to_numpy())
    beta, se = (scalars[scalars.tag == f"hessian/powerlaw_beta{x}"].value.to_numpy() for x in ("", "_stderr"))
    assert scalars[scalars.tag == "hessian/powerlaw_beta/upper"].value.to_numpy() == pytest.approx(beta + se, rel=1e-6)
    trace, trace_se = (scalars[scalars.tag == f"hessian/trace{x}"].value.to_numpy() for x in ("", "_stderr"))
    assert scalars[scalars.tag == "hessian/trace/lower"].value.to_numpy() == pytest.approx(
        trace - trace_se, rel=1e-6, abs=1e-6
    )
    density = ea.Histograms("hessian/density")
    n = sum(p.numel() for p in model.parameters())
    assert [e.step for e in density] == [0, 7]
    assert density[-1].histogram_value.num == pytest.approx(n, rel=1e-9)  # counts estimate numbers of eigenvalues
    assert "hessian/rank_plot" in tags["images"]
    image = ea.Images("hessian/rank_plot")[-1]
    assert image.step == 7 and image.encoded_image_string[:4] == b"\x89PNG"
    text = ea.Tensors("hessian/summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "d_ks" in text and "epoch 1" in text
    configs = ea.Tensors("custom_scalars__config__")
    assert len(configs) == 1
    layout = layout_pb2.Layout()
    layout.ParseFromString(configs[0].tensor_proto.string_val[0])
    charts = {chart.title: chart for c in layout.category for chart in c.chart}
    (band,) = charts["density exponent β̂ ± stderr"].margin.series
    assert (band.value, band.lower, band.upper) == tuple(f"hessian/powerlaw_beta{x}" for x in ("", "/lower", "/upper"))
    (ratio_chart,) = charts["KS ratio d_ks / d_c (below 1: power law)"].margin.series
    assert (ratio_chart.value, ratio_chart.lower, ratio_chart.upper) == ("hessian/ks_ratio",) * 3
    assert all(not chart.multiline.tag and len(chart.margin.series) == 1 for chart in charts.values())


# ----------------------------------------------------------------------------------------------- state
def test_history_survives_checkpoint_resume_and_two_instances_coexist(tmp_path):
    torch.manual_seed(6)
    data = make_data(n=24)
    loader = DataLoader(data, batch_size=8)

    def callbacks():
        return [
            HessianSpectrum(top_k=5, probe_samples=24, num_tracked=2, powerlaw_every_n_epochs=2, **QUIET),
            HessianSpectrum(top_k=5, probe_samples=12, prefix="h12", num_tracked=2, **QUIET),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
        ]

    first = callbacks()
    trainer(tmp_path, first, max_epochs=2, enable_checkpointing=True).fit(Net(), loader)
    assert [(h["epoch"], h.get("init", False)) for h in first[0].history] == [(0, True), (0, False), (1, False)]
    resumed = callbacks()
    t = trainer(tmp_path, resumed, max_epochs=4, enable_checkpointing=True)
    t.fit(Net(), loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    a, b = resumed[0], resumed[1]
    assert [h["epoch"] for h in a.history] == [0, 0, 1, 2, 3]  # the probe at initialisation is not repeated
    restored = [h["metrics"]["hessian/lambda_max"] for h in a.history[:3]]
    assert restored == [h["metrics"]["hessian/lambda_max"] for h in first[0].history]  # restored, not recomputed
    # init (the schedule's first full probe, powerlaw_every_n_epochs=2) + the schedule, which continues across resume
    assert [h["full"] for h in a.history] == [True, False, True, False, True]
    assert math.isfinite(a.history[3]["metrics"]["hessian/subspace_overlap"])  # overlap with the restored vectors
    assert [h["epoch"] for h in b.history] == [0, 0, 1, 2, 3] and "h12/lambda_max" in t.callback_metrics
    assert torch.equal(a._runner.init_eigenvalues, first[0]._runner.init_eigenvalues)  # restored from the state


# ----------------------------------------------------------------------------------------------- LightningCLI
def test_lightning_cli_yaml_config(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_hessian.HessianSpectrum\n"
        "      init_args:\n"
        "        top_k: 300\n"
        "        every_n_epochs: 2\n"
        "        powerlaw_every_n_epochs: 4\n"
        "        dtype: float64\n"
        "        when: validation_epoch_end\n"
        "        max_seconds: 2.5\n"
        "        prefix: curv\n"
    )
    cli = LightningCLI(Net, run=False, args=["--config", str(config)], save_config_callback=None)
    cbs = [c for c in cli.trainer.callbacks if isinstance(c, HessianSpectrum)]
    assert len(cbs) == 1
    cb = cbs[0]
    assert (cb.top_k, cb.every_n_epochs, cb.dtype, cb.when, cb.max_seconds, cb.prefix) == (
        300,
        2,
        "float64",
        "validation_epoch_end",
        2.5,
        "curv",
    )
    config.write_text(config.read_text().replace("dtype: float64", "dtype: float16"))
    with pytest.raises(SystemExit):
        LightningCLI(Net, run=False, args=["--config", str(config)], save_config_callback=None)


def test_time_budget_fails_the_probe_and_progress_is_two_lines(tmp_path, caplog):
    import logging

    data = make_data(n=24)
    cb = HessianSpectrum(top_k=5, probe_samples=24, max_seconds=1e-9, **QUIET)
    with pytest.warns(UserWarning, match="max_seconds"):
        trainer(tmp_path, [cb]).fit(Net(), DataLoader(data, batch_size=8))
    assert math.isnan(cb.history[0]["metrics"]["hessian/lambda_max"])  # the probe at initialisation
    assert math.isnan(cb.history[1]["metrics"]["hessian/lambda_max"])

    cb = HessianSpectrum(top_k=5, probe_samples=24, verbose=True, **QUIET)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [cb], max_epochs=2).fit(Net(), DataLoader(data, batch_size=8))
    lines = [r.getMessage() for r in caplog.records if "HessianSpectrum[hessian]" in r.getMessage()]
    # 3 probes (init, epochs 0 and 1), two lines each: no per-HVP noise
    assert len(lines) == 6 and "full probe started" in lines[0] and "HVPs in" in lines[1]


def test_overhead_guard_skips_probes_after_the_first(tmp_path, caplog):
    import logging

    data = make_data(n=24)
    cb = HessianSpectrum(top_k=5, probe_samples=24, density=False, trace=False, max_overhead=1e-6)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [cb], max_epochs=3).fit(Net(), DataLoader(data, batch_size=8))
    # the probe at initialisation and the first epoch probe always run, the rest exceed the budget
    assert [(h["epoch"], h.get("init", False)) for h in cb.history] == [(0, True), (0, False)]
    assert any("skipping probes" in r.getMessage() for r in caplog.records)
    state = cb.state_dict()
    assert state["probe_seconds"] > 0 and state["train_seconds"] > 0
    cb = HessianSpectrum(top_k=5, probe_samples=24, density=False, trace=False, max_overhead=1e6)
    trainer(tmp_path, [cb], max_epochs=3).fit(Net(), DataLoader(data, batch_size=8))
    assert [h["epoch"] for h in cb.history] == [0, 0, 1, 2]


def test_overhead_guard_shrinks_the_probe_at_init_from_estimates(tmp_path, monkeypatch):
    from lightning_hessian.callback import runner

    monkeypatch.setattr(runner, "INIT_FREE_SECONDS", 0.0)  # no free minute: the estimates decide
    data = make_data(n=24)
    quiet = dict(top_k=20, num_tracked=2, probe_samples=24, density=False, near_zero=False, trace=False)

    def fit(max_overhead, callbacks=()):
        cb = HessianSpectrum(max_overhead=max_overhead, **quiet)
        model = Net()
        trainer(tmp_path, [cb, *callbacks], max_epochs=3).fit(model, DataLoader(data, batch_size=8))
        return cb, [(h["epoch"], h["full"], h.get("init", False)) for h in cb.history]

    # estimates in units of one probe-set gradient g: fit 9 steps x 8/24 g = 3 g; full 2 x 5 x 20 = 200 g; cheap
    # 2 x (4 x 2 + 8) = 32 g. Allowed = max_overhead x 3 g.
    with pytest.warns(UserWarning, match=r"initialisation is skipped.*max_overhead=0.001.*\(9 steps\)"):
        cb, kinds = fit(1e-3)
    assert kinds == [(0, False, False)]  # no init probe; the epoch-0 probe is still cheap, the guard skips the rest
    assert cb.state_dict()["init_done"]
    with pytest.warns(UserWarning, match="initialisation runs as a cheap probe"):
        cb, kinds = fit(30.0)  # 90 g: a cheap probe fits, a full one does not
    assert kinds[0] == (0, False, True) and "hessian/ks_distance" not in cb.history[0]["metrics"]
    assert "hessian/lambda_max" in cb.history[0]["metrics"]
    assert kinds[1] == (0, False, False)  # counted as the first full probe: the epoch-0 probe stays cheap
    _, kinds = fit(100.0)  # 300 g: the full probe fits
    assert kinds[0] == (0, True, True)
    # a monitor on a full-probe key needs it from the first epoch on: the full probe at init stays
    stop = EarlyStopping(monitor="hessian/ks_distance", patience=100, check_on_train_epoch_end=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, kinds = fit(1e-3, [stop])
    assert kinds[0] == (0, True, True)
    assert not [w for w in caught if "probe at initialisation" in str(w.message)]


def test_monitored_keys_cover_early_stopping_checkpoints_and_lr_schedulers():
    from types import SimpleNamespace

    from lightning_hessian.callback.monitors import monitored_keys

    fake = SimpleNamespace(
        callbacks=[EarlyStopping(monitor="hessian/ks_distance"), ModelCheckpoint(monitor="val_loss")],
        lr_scheduler_configs=[SimpleNamespace(monitor="hessian/trace"), SimpleNamespace(monitor=None)],
    )
    fake.callbacks.append(ModelCheckpoint())  # no monitor
    assert monitored_keys(fake) == {"hessian/ks_distance", "val_loss", "hessian/trace"}


def test_plan_init_probe_rule():
    from lightning_hessian.callback.schedule import plan_init_probe

    assert plan_init_probe(50.0, 5.0, 1.0, 0.2) == "full"  # under the free minute
    assert plan_init_probe(50.0, 5.0, 1.0, 0.2, free_seconds=10.0) == "cheap"
    assert plan_init_probe(50.0, 20.0, 1.0, 0.2, free_seconds=10.0) is None
    assert plan_init_probe(50.0, 20.0, 250.0, 0.2, free_seconds=10.0) == "full"  # exactly the allowed share
    assert plan_init_probe(1e9, 1e8, math.inf, 0.2) == "full"  # a fit of unknown length


@pytest.mark.parametrize("precision", ["bf16-true", "64-true"])
def test_probe_under_true_precision_plugins(tmp_path, precision):
    torch.manual_seed(7)
    data = make_data(n=24)
    model = Net()
    cb = HessianSpectrum(top_k=5, probe_samples=24, dtype="float64", tol=1e-10, **QUIET)
    trainer(tmp_path, [cb], precision=precision).fit(model, DataLoader(data, batch_size=8))
    # inputs were converted like the training loop does (bf16 inputs: rounding); reference on the same inputs
    x = data.tensors[0].to(next(model.parameters()).dtype)
    ref_data = TensorDataset(x.double(), data.tensors[1])
    eig = torch.linalg.eigvalsh(dense_hessian(model, ref_data))
    assert cb.history[-1]["metrics"]["hessian/lambda_max"] == pytest.approx(float(eig[-1]), rel=1e-8)


def test_subspace_overlap_formula():
    cb = HessianSpectrum(num_tracked=2, **QUIET)
    eye = torch.eye(5, dtype=torch.float64)
    assert cb._runner._update_vectors(eye[:, :2]) == 0.0
    theta = 0.3
    rotated = torch.stack([eye[:, 0], math.cos(theta) * eye[:, 1] + math.sin(theta) * eye[:, 2]], dim=1)
    # ||V_prev^T V_cur||_F^2 / k = (1 + cos^2 theta) / 2, invariant to signs and to rotations inside the span
    assert cb._runner._update_vectors(-rotated) == pytest.approx((1 + math.cos(theta) ** 2) / 2, rel=1e-6)
    assert cb._runner._update_vectors(
        rotated @ torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    ) == pytest.approx(1.0, rel=1e-6)
