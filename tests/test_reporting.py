"""reporting: metric names, SLQ raw histogram, layout, duck-typed writer discovery, rank plot."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_hessian import reporting as rp
from lightning_hessian.lanczos import stochastic_lanczos_quadrature


def test_metric_names_cover_the_issue_contract():
    contract = {
        "lambda_max",
        "spectral_gap",
        "spectral_gap_ratio",
        "powerlaw_beta",
        "powerlaw_s",
        "powerlaw_beta_stderr",
        "ks_distance",
        "ks_critical",
        "is_power_law",
        "trace",
        "hvps",
        "probe_seconds",
        "subspace_overlap",
        "near_zero_fraction",
    }
    assert set(rp.METRICS) == contract
    table = rp.metrics_table("curv")
    assert all(f"`curv/{name}`" in table for name in contract)
    assert rp.metric_key("hessian", "net.0/lambda_max") == "hessian/net.0/lambda_max"


def test_slq_raw_histogram_counts_and_moments():
    torch.manual_seed(0)
    n = 40
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    eig = torch.linspace(-1.0, 5.0, n, dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    slq = stochastic_lanczos_quadrature(lambda v: a @ v, n, num_probes=3, num_steps=12, seed=1)
    item = rp.slq_raw_histogram("h/density", slq.nodes, slq.weights, n, num_bins=16)
    assert item is not None and len(item.bucket_limits) == len(item.bucket_counts) == 16
    assert sum(item.bucket_counts) == pytest.approx(n, rel=1e-12)
    assert item.num == pytest.approx(n, rel=1e-12)
    assert item.sum == pytest.approx(n * slq.moment(1), rel=1e-9)  # n * tr(A)/n estimate
    assert item.sum_squares == pytest.approx(n * slq.moment(2), rel=1e-9)
    assert item.bucket_limits[-1] == pytest.approx(item.max) and item.min <= float(slq.nodes.min())
    bad = rp.slq_raw_histogram("h/density", torch.full((1, 3), float("nan")), torch.ones(1, 3) / 3, n)
    assert bad is None


def test_custom_scalar_layout_regexes_match_only_their_keys():
    layout = rp.custom_scalar_layout("hessian", extra_keys=["hessian/net.0/lambda_max"])
    charts = {title: spec for category in layout.values() for title, spec in category.items()}
    (pattern,) = charts["sharpness λ_max"][1]
    assert re.search(pattern, "hessian/lambda_max") and not re.search(pattern, "hessian/net.0/lambda_max")
    (layer_pattern,) = charts["hessian/net.0/lambda_max"][1]
    full = rp.custom_scalar_layout("hessian", jacobian_prefix="jacobian", embedding_prefix="embedding")
    full_charts = {title: spec for category in full.values() for title, spec in category.items()}
    (deciles,) = full_charts["FPT deciles (non-zero part)"][1]
    assert re.match(deciles, "jacobian/fpt_q10") and not re.match(deciles, "jacobian/fpt_qx")
    (widths,) = full_charts["effective width per layer"][1]
    assert re.match(widths, "embedding/effective_width/net.0") and not re.match(widths, "hessian/lambda_max")
    assert re.search(layer_pattern, "hessian/net.0/lambda_max") and not re.search(
        layer_pattern, "hessian/net10/lambda_max"
    )


class _Writer:
    def __init__(self):
        self.calls = []

    def add_histogram(self, tag, values, global_step=None):
        self.calls.append(("hist", tag, global_step, values.numel()))

    def add_histogram_raw(self, tag, **kwargs):
        self.calls.append(("raw", tag, kwargs["global_step"]))

    def add_custom_scalars(self, layout):
        self.calls.append(("layout",))

    def add_text(self, tag, text, global_step=None):
        self.calls.append(("text", tag, global_step))

    def add_figure(self, tag, figure, global_step=None, close=True):
        self.calls.append(("figure", tag, global_step, type(figure).__name__))


class _Logger:
    def __init__(self, experiment):
        self.experiment = experiment


class _Trainer:
    def __init__(self, zero, loggers):
        self.is_global_zero = zero
        self.loggers = loggers


def test_writer_found_by_duck_typing_on_rank_zero_only():
    writer = _Writer()
    assert rp.find_tensorboard_writer(_Trainer(True, [_Logger(object()), _Logger(writer)])) is writer
    assert rp.find_tensorboard_writer(_Trainer(False, [_Logger(writer)])) is None
    assert rp.find_tensorboard_writer(_Trainer(True, [])) is None


def test_write_items_and_rank_plot():
    pytest.importorskip("matplotlib")
    writer = _Writer()
    eig = 1.0 / torch.arange(1, 51, dtype=torch.float64)
    items = [
        rp.Histogram("h/eigenvalues", torch.tensor([1.0, float("nan"), 2.0])),
        rp.Text("h/summary", "ok"),
        rp.FigureItem(
            "h/rank_plot", lambda: rp.rank_plot(eig, s=1.0, cutoff_rank=50, ks_distance=0.01, ks_critical=0.19)
        ),
    ]
    tags = rp.write_items(writer, items, step=7)
    assert tags == ["h/eigenvalues", "h/summary", "h/rank_plot"]
    assert writer.calls[0] == ("hist", "h/eigenvalues", 7, 2)  # NaN dropped
    assert writer.calls[2] == ("figure", "h/rank_plot", 7, "Figure")
    figure = items[2].make()
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2  # data and fitted line
    fitted = lines[1].get_ydata()
    assert fitted[0] == pytest.approx(1.0) and fitted[-1] == pytest.approx(1.0 / 50)  # λ_K (k/K)^-s with s = 1
    assert "power law" in figure.axes[0].get_title()
