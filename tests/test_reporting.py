"""reporting: metric names, SLQ raw histogram, layout, duck-typed writer discovery, rank plot."""

from __future__ import annotations

import math
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
        "ks_ratio",
        "trace_stderr",
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


def _charts(layout):
    return {title: spec for category in layout.values() for title, spec in category.items()}


def test_custom_scalar_layout_names_exact_keys():
    layout = rp.custom_scalar_layout("hessian", extra_keys=["hessian/net.0/lambda_max"])
    charts = _charts(layout)
    assert charts["sharpness λ_max"] == ["Margin", ["hessian/lambda_max"] * 3]
    assert charts["hessian/net.0/lambda_max"] == ["Margin", ["hessian/net.0/lambda_max"] * 3]
    full_charts = _charts(rp.custom_scalar_layout("hessian", jacobian_prefix="jacobian", embedding_prefix="embedding"))
    assert full_charts["FPT median, band q10-q90 (non-zero part)"] == [
        "Margin",
        ["jacobian/fpt_q50", "jacobian/fpt_q10", "jacobian/fpt_q90"],
    ]
    (widths,) = full_charts["effective width per layer"][1]  # without the logged keys: one regex chart
    assert re.match(widths, "embedding/effective_width/net.0") and not re.match(widths, "hessian/lambda_max")
    assert not re.match(widths, "embedding/effective_widthX/net.0")


def test_custom_scalar_layout_one_quantity_per_chart_and_margins():
    layout = rp.custom_scalar_layout("hessian", jacobian_prefix="jacobian", embedding_prefix="embedding")
    charts = _charts(layout)
    for title, (kind, tags) in charts.items():
        # TensorBoard colours a chart's lines by run, not by tag: two tags in one chart cannot be told apart;
        # margin charts are drawn unsmoothed
        assert (kind, len(tags)) in {("Multiline", 1), ("Margin", 3)}, title
        assert kind == "Margin" or title == "effective width per layer", title
    assert charts["HVPs per probe"] == ["Margin", ["hessian/hvps"] * 3]
    assert charts["seconds per probe"] == ["Margin", ["hessian/probe_seconds"] * 3]
    assert charts["density exponent β̂ ± stderr"] == [
        "Margin",
        ["hessian/powerlaw_beta", "hessian/powerlaw_beta/lower", "hessian/powerlaw_beta/upper"],
    ]
    assert charts["trace tr(H) ± stderr (Hutchinson)"][1] == list(rp.margin_tags("hessian/trace"))
    assert charts["KS ratio d_ks / d_c (below 1: power law)"] == ["Margin", ["hessian/ks_ratio"] * 3]
    every_metric = {tags[0] for kind, tags in charts.values() if kind == "Margin"}
    assert {rp.metric_key("hessian", m) for m in rp.METRICS} - every_metric == {
        "hessian/powerlaw_beta_stderr",  # drawn as the band of powerlaw_beta
        "hessian/trace_stderr",  # drawn as the band of trace
    }


def test_custom_scalar_layout_keeps_only_logged_keys():
    keys = [
        "h/lambda_max",
        "h/hvps",
        "emb/effective_width/net.0",
        "emb/effective_width/net.2",
        "emb/merge_output_error",
    ]
    layout = rp.custom_scalar_layout("h", embedding_prefix="emb", keys=keys)
    charts = _charts(layout)
    assert set(charts) == {
        "sharpness λ_max",
        "HVPs per probe",
        "effective width net.0",
        "effective width net.2",
        "merge output error",
    }
    assert "Power law (h, full probes)" not in layout  # an empty category is dropped
    assert charts["effective width net.2"] == ["Margin", ["emb/effective_width/net.2"] * 3]


def test_margin_items_are_value_plus_minus_stderr():
    scalars = {"h/powerlaw_beta": 1.7, "h/powerlaw_beta_stderr": 0.05, "h/trace": 20.0, "h/trace_stderr": math.nan}
    items = rp.margin_items("h", scalars)
    assert [(i.tag, i.value) for i in items] == [
        ("h/powerlaw_beta/lower", pytest.approx(1.65, abs=1e-15)),
        ("h/powerlaw_beta/upper", pytest.approx(1.75, abs=1e-15)),
    ]  # a NaN stderr writes no band
    assert rp.margin_items("h", {"h/trace": 1.0}) == []


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

    def add_scalar(self, tag, value, global_step=None):
        self.calls.append(("scalar", tag, global_step, value))


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
        rp.Scalar("h/trace/lower", 3.5),
    ]
    tags = rp.write_items(writer, items, step=7)
    assert tags == ["h/eigenvalues", "h/summary", "h/rank_plot", "h/trace/lower"]
    assert writer.calls[0] == ("hist", "h/eigenvalues", 7, 2)  # NaN dropped
    assert writer.calls[2] == ("figure", "h/rank_plot", 7, "Figure")
    assert writer.calls[3] == ("scalar", "h/trace/lower", 7, 3.5)
    figure = items[2].make()
    lines = figure.axes[0].get_lines()
    assert len(lines) == 2  # data and fitted line
    fitted = lines[1].get_ydata()
    assert fitted[0] == pytest.approx(1.0, rel=1e-12) and fitted[-1] == pytest.approx(1.0 / 50, rel=1e-12)  # exact law
    title = figure.axes[0].get_title()
    assert "power law" in title and "d_ks = 0.0100 < d_c = 0.1900" in title


def test_fitted_rank_law_passes_through_the_geometric_centre():
    torch.manual_seed(0)
    k = torch.arange(1, 201, dtype=torch.float64)
    eig = 3.0 * k**-0.8 * torch.exp(0.1 * torch.randn(200, dtype=torch.float64))
    eig = eig.sort(descending=True).values
    s = 1.3  # an MLE slope steeper than the data's: anchored at λ_K the line would start far above λ_1
    line = rp.fitted_rank_law(eig, s)
    assert torch.log(line).mean() == pytest.approx(float(torch.log(eig).mean()), rel=1e-12)
    slopes = torch.diff(torch.log(line)) / torch.diff(torch.log(k))
    assert torch.allclose(slopes, torch.full_like(slopes, -s), rtol=1e-10)

    def rss(curve):
        return float((torch.log(curve) - torch.log(eig)).pow(2).sum())

    anchored_at_k = eig[-1] * (k / 200) ** (-s)  # the old line λ_K (k/K)^-ŝ
    assert anchored_at_k[0] / eig[0] > 15 and line[0] / eig[0] < 0.75 * anchored_at_k[0] / eig[0]
    assert rss(line) < min(rss(anchored_at_k), rss(line * 1.01), rss(line / 1.01))  # least squares at fixed slope


def test_rank_plot_draws_the_tested_range_the_reference_and_the_verdict():
    pytest.importorskip("matplotlib")
    eig = 2.0 * torch.arange(1, 301, dtype=torch.float64) ** -1.0
    init = 0.5 * torch.ones(300, dtype=torch.float64)
    figure = rp.rank_plot(
        eig, s=1.2, cutoff_rank=200, ks_distance=0.12, ks_critical=0.096, title="epoch 0: ", beta=1.83, reference=init
    )
    axes = figure.axes[0]
    reference, tested, fitted = axes.get_lines()
    assert len(tested.get_xdata()) == 200 and tested.get_ydata()[-1] == pytest.approx(float(eig[199]))
    assert list(fitted.get_xdata()) == list(range(1, 201))  # the law over the tested range only
    assert len(reference.get_xdata()) == 200 and reference.get_alpha() < 0.5  # faint, behind the data
    title = axes.get_title()
    assert title.startswith("epoch 0: not a power law") and "d_ks = 0.1200 ≥ d_c = 0.0960" in title
    labels = [t.get_text() for t in axes.get_legend().get_texts()]
    assert labels == ["at initialisation", "λ_k, tested top K = 200", "MLE fit: ŝ = 1.200, β̂ = 1.830"]
