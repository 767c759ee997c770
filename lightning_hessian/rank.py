r"""Hessian rank of neural networks: closed forms for deep linear networks and measured numerical ranks.

Singh, Bachmann, Hofmann, *Analytic Insights into Structure and Rank of Neural Network Hessian Maps*, NeurIPS 2021
(arXiv:2106.16225). The loss Hessian splits into an outer-product (Gauss-Newton) part and a functional part,

.. math::

    H_L = \nabla^2_\theta L = H_o + H_f, \qquad
    H_o = \frac{1}{N}\sum_i J_i^\top \big[\nabla^2_F \ell_i\big] J_i, \qquad
    H_f = \frac{1}{N}\sum_i \sum_c \frac{\partial \ell_i}{\partial F_c} \nabla^2_\theta F_c(x_i),

with :math:`J_i = \partial F(x_i) / \partial \theta`. For a bias-free deep linear network
:math:`F(x) = W_L \cdots W_1 x` with widths :math:`[d, m_1, \dots, m_{L-1}, K]`, data rank :math:`r` (rank of the
uncentred input matrix) and

.. math::

    q = \min(r, m_1, \dots, m_{L-1}, K), \qquad s = \min(r, K), \qquad M = \sum_{l=1}^{L-1} m_l,

the ranks at generic parameters are

.. math::

    \operatorname{rank} H_o = q (r + K - q), \qquad
    \operatorname{rank} H_f = 2 q M + 2 q s - L q^2, \qquad
    \operatorname{rank} H_L = 2 q M + q (r + K) - L q^2,

and for the softmax cross-entropy loss :math:`K` is replaced by :math:`K - 1` (shift invariance of the softmax).
For :math:`L = 1` the network is linear in its parameters, so :math:`H_f = 0` and :math:`H_L = H_o`.

For any small model, :func:`numerical_hessian_rank` measures the three ranks on a dense float64 Hessian. For large
models, :func:`near_zero_fraction` estimates the fraction of the spectrum near zero from stochastic Lanczos quadrature.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_map

from .lanczos import MatVec, SpectralQuadrature, stochastic_lanczos_quadrature
from .operators import LossFn, LossModule, batch_size, cast_batch, evaluation_mode

__all__ = [
    "DEFAULT_MAX_PARAMS",
    "HessianRank",
    "NearZeroEstimate",
    "dense_hessian_parts",
    "linear_hessian_rank",
    "matrix_rank_tolerance",
    "near_zero_fraction",
    "near_zero_from_quadrature",
    "numerical_hessian_rank",
]

#: Largest parameter count :func:`numerical_hessian_rank` accepts by default (a dense float64 P x P Hessian).
DEFAULT_MAX_PARAMS = 4096

_LOSSES = ("mse", "cross_entropy")


@dataclass(frozen=True)
class HessianRank:
    r"""Ranks of the loss Hessian and of its two Gauss-Newton parts.

    Attributes:
        loss: Rank of the loss Hessian :math:`H_L` (``None`` where no closed form is known: linear networks with
            biases and three or more weight matrices, see :func:`linear_hessian_rank`).
        outer: Rank of the outer-product (Gauss-Newton) part :math:`H_o`.
        functional: Rank of the functional part :math:`H_f = H_L - H_o` (``None`` as for ``loss``).
        num_params: Number of parameters :math:`P` (the Hessians are :math:`P \times P`).
        tolerance: Absolute eigenvalue threshold used for measured ranks (eigenvalues with modulus above it count);
            ``None`` for closed forms.
    """

    loss: int | None
    outer: int
    functional: int | None
    num_params: int
    tolerance: float | None = None

    @property
    def rank_deficiency(self) -> int | None:
        r"""Number of zero eigenvalues of :math:`H_L`, :math:`P - \operatorname{rank} H_L` (``None`` if unknown)."""
        return None if self.loss is None else self.num_params - self.loss

    @property
    def rank_fraction(self) -> float | None:
        r"""Fraction of non-zero eigenvalues of :math:`H_L`, :math:`\operatorname{rank} H_L / P` (or ``None``)."""
        if self.loss is None:
            return None
        return self.loss / self.num_params if self.num_params else 0.0


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def linear_hessian_rank(
    widths: Sequence[int],
    data_rank: int,
    *,
    loss: str = "mse",
    bias: bool = False,
    augmented_rank: int | None = None,
) -> HessianRank:
    r"""Closed-form ranks of :math:`H_L`, :math:`H_o`, :math:`H_f` for a deep linear network.

    **Bias-free** (``bias=False``): Singh, Bachmann, Hofmann (NeurIPS 2021), Theorems 4-6. With
    :math:`q = \min(r, m_1, \dots, m_{L-1}, K)`, :math:`s = \min(r, K)`, :math:`M = \sum_{l=1}^{L-1} m_l` and
    :math:`L` weight matrices:

    .. math::

        \operatorname{rank} H_o = q (r + K - q), \quad
        \operatorname{rank} H_f = 2 q M + 2 q s - L q^2, \quad
        \operatorname{rank} H_L = 2 q M + q (r + K) - L q^2,

    i.e. :math:`\operatorname{rank} H_L = \sum_{l=1}^{L} q (m'_{l-1} + m_l - q)` with :math:`m'_0 = r`: the
    dimension of a network whose weight matrices are all restricted to rank :math:`q`. These are the ranks at
    generic parameters and generic targets (exact upper bounds everywhere). For cross-entropy :math:`K` becomes
    :math:`K - 1`; for a single weight matrix (:math:`L = 1`) the functional part vanishes identically.

    **With a bias in every layer** (``bias=True``), with :math:`\tilde r = \operatorname{rank}[X; 1^\top]`
    (``augmented_rank``: :math:`r + 1` when the all-ones vector is not in the row space of :math:`X`, generic for
    :math:`n > d`; :math:`r` when it is, generic for :math:`n \le d`). The network computes
    :math:`x \mapsto A x + c` with :math:`\operatorname{rank} A \le q`, and :math:`H_o` has the rank of the tangent
    space of that set on the data:

    .. math::

        \operatorname{rank} H_o = q (r + K - q) + \begin{cases} K & \tilde r = r + 1 \\
        K - q & \tilde r = r,\ q < r \\ 0 & \tilde r = r = q. \end{cases}

    For :math:`L = 2` the hidden bias is a column of :math:`[W_1, b_1]` acting on :math:`[x; 1]` and the output
    bias enters linearly, so with :math:`\tilde q = \min(\tilde r, m_1, K)`, :math:`\tilde s = \min(\tilde r, K)`:

    .. math::

        \operatorname{rank} H_f = 2 \tilde q m_1 + 2 \tilde q \tilde s - 2 \tilde q^2, \qquad
        \operatorname{rank} H_L = \operatorname{rank} H_o + 2 \tilde q m_1 - \tilde q^2 + \tilde q

    (the bias-free :math:`H_f` of the augmented input; :math:`H_L` found by measurement). These, and :math:`H_f = 0`,
    :math:`H_L = H_o` for :math:`L = 1`, matched :func:`numerical_hessian_rank` (float64, random Gaussian data,
    weights, biases and targets) on all of 350 random shapes (:math:`L \le 4`, :math:`d \le 8`, widths
    :math:`\le 7`, :math:`K \le 6`, :math:`n \le 14`, both :math:`n \le d` and :math:`n > d`) and on
    Singh et al.'s example with biases. For :math:`L \ge 3` no closed form for :math:`H_f` and :math:`H_L` held
    on those measurements: ``functional`` and ``loss`` are ``None`` (measure them with
    :func:`numerical_hessian_rank`; e.g. ``[25, 5, 10, 10]``, :math:`n = 50`: 190 and 280). For cross-entropy
    :math:`K` becomes :math:`K - 1` here too (matched on 80 random shapes with :math:`L \le 2`).

    Args:
        widths: ``[d, m_1, ..., m_{L-1}, K]``: input dimension, hidden widths, output dimension (at least two).
        data_rank: Rank :math:`r` of the uncentred input matrix :math:`X \in \mathbb{R}^{d \times n}`
            (``min(d, n)`` for generic data), ``0 <= data_rank <= d``.
        loss: ``"mse"`` or ``"cross_entropy"`` (softmax cross-entropy, which needs ``K >= 2``).
        bias: Whether every Linear layer has a bias.
        augmented_rank: With ``bias``: :math:`\operatorname{rank}[X; 1^\top]`, ``data_rank`` or ``data_rank + 1``;
            ``None`` means ``data_rank + 1`` (generic data with more samples than input dimensions). Ignored without
            ``bias``.

    Returns:
        The :class:`HessianRank` with ``tolerance=None`` (``loss`` and ``functional`` ``None`` where unknown).

    Raises:
        ValueError: For fewer than two widths, non-positive widths, ``data_rank`` outside ``[0, d]``, an unknown
            ``loss``, a non-boolean ``bias``, or an ``augmented_rank`` other than ``data_rank`` or ``data_rank + 1``.

    Example::

        >>> linear_hessian_rank([25, 5, 10, 10], data_rank=25)
        HessianRank(loss=250, outer=150, functional=175, num_params=275, tolerance=None)
        >>> linear_hessian_rank([25, 10, 10], data_rank=20, bias=True, augmented_rank=20)  # n = 20 <= d
        HessianRank(loss=310, outer=200, functional=200, num_params=370, tolerance=None)
    """
    if loss not in _LOSSES:
        raise ValueError(f"loss must be one of {_LOSSES}, got {loss!r}")
    if not isinstance(bias, bool):
        raise ValueError(f"bias must be True or False, got {bias!r}")
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or len(widths) < 2:
        raise ValueError(
            f"widths must be a sequence [d, m_1, ..., K] of at least two positive integers, got {widths!r}"
        )
    widths = [_check_int(f"widths[{i}]", w, 1) for i, w in enumerate(widths)]
    r = _check_int("data_rank", data_rank, 0)
    if r > widths[0]:
        raise ValueError(f"data_rank must be <= the input dimension d={widths[0]}, got {data_rank!r}")
    num_params = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    if bias:
        num_params += sum(widths[1:])
        ra = r + 1 if augmented_rank is None else _check_int("augmented_rank", augmented_rank, 0)
        if ra not in (r, r + 1):
            raise ValueError(
                f"augmented_rank must be data_rank ({r}) or data_rank + 1 ({r + 1}), the rank of [X; 1^T], "
                f"got {augmented_rank!r}"
            )
    k = widths[-1]
    if loss == "cross_entropy":
        if k < 2:
            raise ValueError(f"loss='cross_entropy' needs at least 2 outputs, got widths[-1]={k}")
        k -= 1
    hidden = widths[1:-1]
    depth = len(widths) - 1
    q = min([r, k, *hidden])
    s = min(r, k)
    m = sum(hidden)
    outer = q * (r + k - q)
    if bias:
        outer += k if ra == r + 1 else (k - q if q < r else 0)
        if depth == 1:
            return HessianRank(loss=outer, outer=outer, functional=0, num_params=num_params)
        if depth == 2:
            qa, sa = min(ra, m, k), min(ra, k)
            functional = 2 * qa * m + 2 * qa * sa - 2 * qa * qa
            full = outer + 2 * qa * m - qa * qa + qa
            return HessianRank(loss=min(full, num_params), outer=outer, functional=functional, num_params=num_params)
        return HessianRank(loss=None, outer=outer, functional=None, num_params=num_params)
    if depth == 1:
        functional = 0
        full = outer
    else:
        functional = 2 * q * m + 2 * q * s - depth * q * q
        full = 2 * q * m + q * (r + k) - depth * q * q
    return HessianRank(loss=min(full, num_params), outer=outer, functional=functional, num_params=num_params)


def matrix_rank_tolerance(scale: float, n: int, *, rtol: float | None = None) -> float:
    r"""Absolute eigenvalue threshold used for numerical ranks.

    .. math::

        \tau = \begin{cases} \sigma \, P \, \varepsilon_{64} & \text{rtol = None (NumPy's ``matrix_rank`` default)} \\
        \text{rtol} \cdot \sigma & \text{otherwise} \end{cases}

    with :math:`\sigma` the spectral norm (largest eigenvalue modulus) and :math:`P` the matrix size.

    Args:
        scale: The spectral norm :math:`\sigma`.
        n: The matrix size :math:`P`.
        rtol: Relative tolerance, or ``None`` for :math:`P\varepsilon`.

    Returns:
        The threshold :math:`\tau`; eigenvalues with :math:`|\lambda| > \tau` count towards the rank.
    """
    if rtol is None:
        return float(scale) * n * torch.finfo(torch.float64).eps
    return float(rtol) * float(scale)


# --------------------------------------------------------------------------------------------------------------------
# Dense float64 Hessians of an opaque loss_fn(model, batch)


class _Linearised(nn.Module):
    r"""The model linearised at :math:`\theta_0`: :math:`x \mapsto f(\theta_0, x) + J(\theta_0, x)\,\delta`.

    The offset :math:`\delta` is set before each call; ``torch.func.jvp`` evaluates the first-order Taylor expansion.
    """

    def __init__(self, model: nn.Module, theta0: dict[str, Tensor], constants: dict[str, Tensor]) -> None:
        super().__init__()
        self.__dict__["_inner"] = model  # not registered: this wrapper owns no parameters
        self._theta0 = theta0
        self._constants = constants
        self.delta: dict[str, Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def call(params: dict[str, Tensor]) -> Any:
            return functional_call(self._inner, {**self._constants, **params}, args, kwargs)

        names = list(self._theta0)
        out, tangent = jvp(
            lambda *ts: call(dict(zip(names, ts))),
            tuple(self._theta0[n] for n in names),
            tuple(self.delta[n] for n in names),
        )
        return tree_map(lambda a, b: a + b if isinstance(a, Tensor) and a.is_floating_point() else a, out, tangent)


def _dense_hessian(fn: Callable[[Tensor], Tensor], point: Tensor, chunk_size: int) -> Tensor:
    """Dense Hessian of a scalar function of a flat vector.

    Reverse-over-reverse (one gradient graph, then vectorised pull-backs of the unit vectors in chunks); if the loss
    cannot be vectorised (data-dependent control flow, ``.item()``, an operator without a batching rule, ...) or a
    double-backward formula is missing, forward-over-reverse products one column at a time.
    """
    n = point.numel()
    eye = torch.eye(n, dtype=point.dtype, device=point.device)
    try:
        _, pull = vjp(grad(fn), point)
        columns = [vmap(pull)(eye[i : i + chunk_size])[0] for i in range(0, n, chunk_size)]
    except RuntimeError:
        columns = [jvp(grad(fn), (point,), (eye[i],))[1].unsqueeze(0) for i in range(n)]
    hessian = torch.cat(columns, dim=0)
    return 0.5 * (hessian + hessian.T)


def _count_rank(eigenvalues: Tensor, tolerance: float) -> int:
    return int((eigenvalues.abs() > tolerance).sum().item())


def dense_hessian_parts(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    max_params: int = DEFAULT_MAX_PARAMS,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor]:
    r"""Dense float64 loss Hessian :math:`H_L` and its outer-product (Gauss-Newton) part :math:`H_o`.

    The loss is the per-sample mean :math:`L(\theta) = \sum_b n_b \ell_b(\theta) / \sum_b n_b`, with
    :math:`\ell_b` = ``loss_fn(model, batch)`` (the mean loss of batch :math:`b`) and :math:`n_b` its sample count
    (the length of its first tensor), over the parameters that require grad, flattened in ``named_parameters()``
    order. The model runs in eval mode on float64 copies of its parameters, buffers and floating-point inputs
    (substituted with ``torch.func.functional_call``); the model itself, its ``.grad`` and its buffers are untouched.

    * :math:`H_L = \nabla^2_\theta L(\theta_0)`.
    * :math:`H_o` is the Hessian of ``loss_fn`` evaluated on the model *linearised* at :math:`\theta_0`,
      :math:`f_{\mathrm{lin}}(\theta) = f(\theta_0) + J (\theta - \theta_0)` (via ``torch.func.jvp``): the second
      derivative of a loss of an affine map is exactly
      :math:`\frac{1}{N}\sum_i J_i^\top [\nabla^2_F \ell_i] J_i`, the Gauss-Newton part, without knowing how
      ``loss_fn`` turns outputs into a loss. ``loss_fn`` must obtain the outputs by calling ``model(...)``.

    The functional part is :math:`H_f = H_L - H_o`.

    Args:
        model: Any ``nn.Module`` (biases, non-linearities, buffers allowed).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss of one batch (a scalar).
        batches: The batches (tensors or tuples/lists/dicts of tensors; the first tensor is the sample axis).
        max_params: Refuse models with more parameters than this (a dense :math:`P \times P` float64 Hessian and its
            eigen-decomposition cost :math:`O(P^2)` memory and :math:`O(P^3)` time).
        chunk_size: Number of Hessian columns computed per vectorised batch of products.

    Returns:
        ``(H_L, H_o)``, two symmetric ``(P, P)`` float64 tensors.

    Raises:
        ValueError: If there is no batch, no trainable parameter, more than ``max_params`` parameters, or a loss that
            is not a finite scalar.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch, got an empty sequence")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameter that requires grad")
    num_params = sum(p.numel() for _, p in trainable)
    if num_params > max_params:
        raise ValueError(
            f"a dense Hessian of this model is {num_params} x {num_params}: the model has {num_params} trainable "
            f"parameters, more than max_params={max_params}. Raise max_params if you have the memory, or use "
            "near_zero_fraction (stochastic Lanczos quadrature) for large models."
        )
    dtype = torch.float64
    names = [name for name, _ in trainable]
    shapes = [p.shape for _, p in trainable]
    sizes = [p.numel() for _, p in trainable]
    trainable_names = set(names)
    constants = {
        name: (t.detach().to(dtype) if t.is_floating_point() else t.detach())
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if name not in trainable_names
    }
    theta0 = torch.cat([p.detach().to(dtype).reshape(-1) for _, p in trainable])
    batches = [cast_batch(b, dtype=dtype) for b in batches]
    counts = [batch_size(b) for b in batches]
    total = float(sum(counts))
    if total <= 0:
        raise ValueError("the batches hold no sample")

    def unflatten(flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(names, flat.split(sizes), shapes)}

    def checked(value: Tensor) -> Tensor:
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(value).__name__} {getattr(value, 'shape', '')}"
            )
        return value.reshape(())

    wrapper = LossModule(model, loss_fn)

    def full_loss(flat: Tensor) -> Tensor:
        params = {f"model.{k}": v for k, v in {**constants, **unflatten(flat)}.items()}
        return sum(n * checked(functional_call(wrapper, params, (b,))) for n, b in zip(counts, batches)) / total

    linear = _Linearised(model, unflatten(theta0), constants)
    linear_wrapper = LossModule(linear, loss_fn)

    def linearised_loss(delta: Tensor) -> Tensor:
        linear.delta = unflatten(delta)
        try:
            return sum(n * checked(linear_wrapper(b)) for n, b in zip(counts, batches)) / total
        finally:
            linear.delta = {}

    with evaluation_mode(model), torch.inference_mode(False), torch.enable_grad():
        value = full_loss(theta0)
        if not torch.isfinite(value):
            raise ValueError(f"loss_fn returned a non-finite loss {value.item()!r}: the Hessian would be meaningless")
        h_loss = _dense_hessian(full_loss, theta0, chunk_size)
        h_outer = _dense_hessian(linearised_loss, torch.zeros_like(theta0), chunk_size)
    return h_loss.detach(), h_outer.detach()


def numerical_hessian_rank(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[Any],
    *,
    rtol: float | None = None,
    max_params: int = DEFAULT_MAX_PARAMS,
    chunk_size: int = 256,
) -> HessianRank:
    r"""Measured ranks of :math:`H_L`, :math:`H_o` and :math:`H_f = H_L - H_o` of a small model (dense, float64).

    The Hessians are those of :func:`dense_hessian_parts` (per-sample mean loss over the batches, :math:`H_o` from
    the model linearised at the current parameters). Unlike :func:`linear_hessian_rank` this works for any model:
    biases, non-linearities and any loss (Singh et al. 2021 use the linear formulas as reference curves for
    non-linear networks; they are exact oracles only for linear ones).

    Tolerance: all three ranks count the eigenvalues with :math:`|\lambda| > \tau`, where
    :math:`\tau = \sigma P \varepsilon_{64}` (``rtol=None``, NumPy's ``matrix_rank`` default) or
    :math:`\tau = \text{rtol} \cdot \sigma`, with the common scale :math:`\sigma = \max(\|H_L\|_2, \|H_o\|_2)`:
    :math:`H_f` is obtained as a difference, so its rounding errors are relative to the larger of the two, not to its
    own norm. The threshold is returned in ``HessianRank.tolerance``. On random bias-free linear networks the
    eigenvalues counted as zero stay below :math:`0.1\tau` and the others above :math:`10^7\tau`.

    Args:
        model: Any ``nn.Module`` (biases, non-linearities, buffers allowed).
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss of one batch (a scalar).
        batches: The batches (tensors or tuples/lists/dicts of tensors; the first tensor is the sample axis).
        rtol: Relative tolerance, or ``None`` for the :math:`P\varepsilon` default.
        max_params: Refuse models with more parameters than this (dense :math:`P \times P` Hessians).
        chunk_size: Number of Hessian columns computed per vectorised batch of products.

    Returns:
        The measured :class:`HessianRank`.

    Raises:
        ValueError: If there is no batch, no trainable parameter, more than ``max_params`` parameters, a negative
            ``rtol``, or a loss that is not a finite scalar.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()
        >>> x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
        >>> r = numerical_hessian_rank(net, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), [(x, y)])
        >>> (r.loss, r.outer, r.functional)  # == linear_hessian_rank([4, 3, 2], data_rank=4)
        (16, 8, 12)
    """
    if rtol is not None and not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be None or a finite number >= 0, got {rtol!r}")
    h_loss, h_outer = dense_hessian_parts(model, loss_fn, batches, max_params=max_params, chunk_size=chunk_size)
    num_params = h_loss.shape[0]
    spectra = [torch.linalg.eigvalsh(h) for h in (h_loss, h_outer, h_loss - h_outer)]
    scale = max(float(spectra[0].abs().max()), float(spectra[1].abs().max()))
    tolerance = matrix_rank_tolerance(scale, num_params, rtol=rtol)
    ranks = [_count_rank(e, tolerance) for e in spectra]
    return HessianRank(loss=ranks[0], outer=ranks[1], functional=ranks[2], num_params=num_params, tolerance=tolerance)


# --------------------------------------------------------------------------------------------------------------------
# Large models: near-zero fraction of the spectrum by stochastic Lanczos quadrature


@dataclass(frozen=True)
class NearZeroEstimate:
    r"""Estimated fraction of Hessian eigenvalues with :math:`|\lambda| \le \tau`.

    Attributes:
        fraction: Mean over probes of the Gauss-quadrature mass of :math:`[-\tau, \tau]`.
        stderr: Standard error of that mean over the probes (NaN for one probe). It measures the probe noise only,
            not the quadrature bias (see :func:`near_zero_fraction`).
        threshold: The absolute threshold :math:`\tau` used.
        num_matvecs: Hessian-vector products spent.
        scale: Largest Ritz value modulus :math:`\hat\sigma` (the spectral-norm estimate a relative threshold
            refers to).
    """

    fraction: float
    stderr: float
    threshold: float
    num_matvecs: int
    scale: float = math.nan

    @property
    def rank_fraction(self) -> float:
        """Estimated numerical rank over the dimension, ``1 - fraction``."""
        return 1.0 - self.fraction


def near_zero_fraction(
    operator_or_matvec: Any,
    n: int | None = None,
    *,
    threshold: float = 1e-3,
    relative: bool = True,
    num_probes: int = 8,
    num_steps: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> NearZeroEstimate:
    r"""Fraction of the Hessian spectrum near zero, from the stochastic Lanczos quadrature (SLQ) of the engine.

    With Rademacher probes :math:`v_j` and the Gauss rule :math:`(\theta_{jl}, w_{jl})` of ``num_steps`` Lanczos
    steps from each (Ghorbani, Krishnan, Xiao 2019),

    .. math::

        \widehat{F}_0 = \frac{1}{J} \sum_{j=1}^{J} \sum_{l} w_{jl} \, \mathbf{1}\{|\theta_{jl}| \le \tau\},
        \qquad \tau = \begin{cases} \text{threshold} \cdot \max_{j,l} |\theta_{jl}| & \text{relative} \\
        \text{threshold} & \text{otherwise,} \end{cases}

    estimates :math:`\frac1P \#\{i : |\lambda_i| \le \tau\}`, i.e. the rank deficiency
    :math:`1 - \operatorname{rank}_\tau(H) / P` (Singh et al. 2021 predict it for linear networks, the embedding
    principle explains it for condensed networks). Caveats: the Gauss rule resolves the spectrum only down to its node
    spacing, so eigenvalues closer to zero than the spacing can be counted in or out; the estimate is reliable when
    the spectrum has a gap around :math:`\tau` and ``num_steps`` is large enough for a Ritz value to converge to the
    zero cluster (check that it is stable when ``num_steps`` doubles). ``stderr`` covers the probe noise only.

    Args:
        operator_or_matvec: A :class:`~lightning_hessian.operators.HessianOperator` (anything with ``matvec`` and
            ``num_params``), or a callable ``v -> H v`` (then ``n`` is required).
        n: Dimension; defaults to ``operator.num_params``.
        threshold: :math:`\tau`, relative to the largest Ritz value modulus when ``relative`` (default), else
            absolute; ``>= 0``.
        relative: Whether ``threshold`` is relative.
        num_probes: Number of probes :math:`J \ge 1` (``>= 2`` for a standard error).
        num_steps: Lanczos steps per probe (capped at ``n``), ``>= 1``.
        seed: Seed of the probes.
        dtype: Dtype of the Lanczos basis.
        device: Device of the basis; defaults to the operator's device.

    Returns:
        A :class:`NearZeroEstimate`.

    Raises:
        ValueError: For a callable without ``n``, a non-positive dimension, or a negative / non-finite threshold.
    """
    if hasattr(operator_or_matvec, "matvec"):
        matvec: MatVec = operator_or_matvec.matvec
        if n is None:
            n = int(operator_or_matvec.num_params)
        if device is None:
            device = getattr(operator_or_matvec, "device", None)
    elif callable(operator_or_matvec):
        matvec = operator_or_matvec
        if n is None:
            raise ValueError("n is required when operator_or_matvec is a plain callable v -> H v")
    else:
        raise ValueError(
            "operator_or_matvec must be a HessianOperator (with .matvec and .num_params) or a callable v -> H v, "
            f"got {type(operator_or_matvec).__name__}"
        )
    n = _check_int("n", n, 1)
    _check_threshold(threshold)
    quadrature = stochastic_lanczos_quadrature(
        matvec, n, num_probes=num_probes, num_steps=num_steps, seed=seed, dtype=dtype, device=device
    )
    return near_zero_from_quadrature(quadrature, threshold=threshold, relative=relative)


def _check_threshold(threshold: Any) -> None:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")


def near_zero_from_quadrature(
    quadrature: SpectralQuadrature, *, threshold: float = 1e-3, relative: bool = True
) -> NearZeroEstimate:
    r"""Near-zero fraction read off an existing SLQ quadrature (see :func:`near_zero_fraction` for the estimator).

    Args:
        quadrature: A :class:`~lightning_hessian.lanczos.SpectralQuadrature` of the Hessian.
        threshold: :math:`\tau`, relative to the largest Ritz value modulus when ``relative``, else absolute.
        relative: Whether ``threshold`` is relative.

    Returns:
        A :class:`NearZeroEstimate` (``num_matvecs`` is the quadrature's).

    Raises:
        ValueError: For a negative or non-finite threshold.
    """
    _check_threshold(threshold)
    lowest, highest = quadrature.support()
    scale = max(abs(lowest), abs(highest))
    tau = float(threshold) * scale if relative else float(threshold)
    fraction, stderr = quadrature.fraction_below(tau)
    return NearZeroEstimate(
        fraction=fraction, stderr=stderr, threshold=tau, num_matvecs=quadrature.num_matvecs, scale=scale
    )
