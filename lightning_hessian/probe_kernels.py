r"""Layers rewritten for probes: the same functions, with a double backward that costs what it must.

A Hessian-vector product by double backward differentiates the backward pass once more. For two common layers
PyTorch's generic double backward does more work than the mathematics needs:

* **Convolution** (``nn.Conv1d/2d/3d``). The backward is :math:`g_x = B_x(g_y, W)` (a transposed convolution) and
  :math:`g_W = B_W(x, g_y)` (the weight gradient), both bilinear. Their vector-Jacobian products, given the incoming
  :math:`\dot g_x, \dot g_W`, are

  .. math::
      \bar g_y = \mathrm{conv}(\dot g_x, W) + \mathrm{conv}(x, \dot g_W), \quad
      \bar W = B_W(\dot g_x, g_y), \quad \bar x = B_x(g_y, \dot g_W),

  two forward convolutions, one weight-gradient and one input-gradient kernel (:func:`_ConvBackward.backward`).
  PyTorch's ``_convolution_double_backward`` computes :math:`\bar W` and :math:`\bar x` as convolutions with batch
  and channel axes swapped, which on CPU (oneDNN) took 1.3-1.6x as long (64-256 channels, 8-32 pixels square).
* **BatchNorm in eval mode** normalises with its running statistics, so it is the per-channel affine map
  :math:`y = x s + t`, :math:`s = \gamma / \sqrt{\hat\sigma^2 + \epsilon}`, :math:`t = \beta - \hat\mu s`
  (:func:`affine_batch_norm`); its double backward is two products instead of the generic ``batch_norm`` one.
* **GELU and SiLU** (``nn.GELU``, ``nn.SiLU`` and the ``F.gelu``/``F.silu`` activation of
  ``nn.TransformerEncoderLayer/DecoderLayer``; GELU in its exact erf form, SiLU out of place). The backward of a
  pointwise :math:`f` is :math:`g_x = g f'(x)`; its vector-Jacobian product is
  :math:`(\dot g f'(x),\ \dot g\, g f''(x))`, with :math:`\mathrm{gelu}' = \Phi + x\varphi`,
  :math:`\mathrm{gelu}'' = \varphi (2 - x^2)`, :math:`\mathrm{silu}' = \sigma(1 + x(1 - \sigma))`,
  :math:`\mathrm{silu}'' = \sigma(1 - \sigma)(2 + x(1 - 2\sigma))`. Both factors are fixed during a probe, so each
  product after the first costs two multiplications (:class:`_PointwiseBackward`), and its pass back through the
  forward graph one (the cached :math:`f'(x)`); PyTorch's ``gelu_backward``/``silu_backward`` derivatives recompute
  :math:`\varphi, \Phi` or :math:`\sigma` each time (1.8-2.0 ms against 0.7 ms for tanh on a 1024 x 512 block).

:func:`probe_layers` installs them on a model's layers for the duration of a block (instance attributes, removed on
exit). Results equal the layers' own up to rounding. Inside ``torch.func`` transforms (the forward-over-reverse
strategy, Jacobians), under autocast and for string paddings (``"same"``) the layers' own code runs.

No Lightning import.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["affine_batch_norm", "fast_conv_forward", "fast_gelu", "fast_silu", "probe_layers"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FORWARDS = {cls._conv_forward for cls in _CONVS}
_BATCH_NORM_FORWARDS = {nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward}
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _transformed() -> bool:
    """Whether a ``torch.func`` transform (grad, jvp, vmap, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (its casts belong to the layer's own autograd graph)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class _ConvBackward(torch.autograd.Function):
    """``(g_x, g_W) = convolution_backward(g_y, x, W)``, with the cheap vector-Jacobian product (module docstring)."""

    @staticmethod
    def forward(ctx, grad_out: Tensor, x: Tensor, weight: Tensor, conf: tuple, mask: tuple[bool, bool]):
        ctx.conf, ctx.mask = conf, mask
        ctx.save_for_backward(grad_out, x, weight)
        gx, gw, _ = torch.ops.aten.convolution_backward(grad_out, x, weight, None, *conf, [mask[0], mask[1], False])
        return gx, gw

    @staticmethod
    def backward(ctx, ggx: Tensor | None, ggw: Tensor | None):
        grad_out, x, weight = ctx.saved_tensors
        conf = ctx.conf
        stride, padding, dilation, _, _, groups = conf
        need_gy, need_x, need_w = ctx.needs_input_grad[:3]
        ggx = ggx if ctx.mask[0] else None
        ggw = ggw if ctx.mask[1] else None
        d_gy = d_x = d_w = None
        if need_gy:
            if ggx is not None:
                d_gy = torch.ops.aten.convolution(ggx, weight, None, stride, padding, dilation, False, conf[4], groups)
            if ggw is not None:
                term = torch.ops.aten.convolution(x, ggw, None, stride, padding, dilation, False, conf[4], groups)
                d_gy = term if d_gy is None else d_gy + term
        if need_x and ggw is not None:
            d_x = torch.ops.aten.convolution_backward(grad_out, x, ggw, None, *conf, [True, False, False])[0]
        if need_w and ggx is not None:
            d_w = torch.ops.aten.convolution_backward(grad_out, ggx, weight, None, *conf, [False, True, False])[1]
        return d_gy, d_x, d_w, None, None


class _Conv(torch.autograd.Function):
    """``y = conv(x, W) + b`` whose backward is :class:`_ConvBackward` (so the double backward is the cheap one)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, conf: tuple):
        ctx.conf = conf
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        stride, padding, dilation, transposed, output_padding, groups = conf
        return torch.ops.aten.convolution(
            x, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        )

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        if need_x or need_w:
            gx, gw = _ConvBackward.apply(grad_out, x, weight, ctx.conf, (need_x, need_w))
        if need_b and ctx.has_bias:
            gb = grad_out.sum(dim=[0, *range(2, grad_out.dim())])
        return (gx if need_x else None), (gw if need_w else None), gb, None


def fast_conv_forward(module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``module._conv_forward(x, weight, bias)`` of an ``nn.Conv1d/2d/3d`` through :class:`_Conv`.

    Args:
        module: The convolution layer (its stride, padding, padding mode, dilation and groups are used).
        x: The ``(N, C, ...)`` or unbatched ``(C, ...)`` input.
        weight: The weight (the module's or a functional substitute).
        bias: The bias or ``None``.

    Returns:
        The layer's output, equal to ``type(module)._conv_forward(module, x, weight, bias)`` up to rounding.
    """
    if _transformed() or isinstance(module.padding, str) or _autocast(x.device.type):
        return type(module)._conv_forward(module, x, weight, bias)
    dims = weight.dim() - 2
    padding: Sequence[int] = module.padding
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = (0,) * dims
    unbatched = x.dim() == dims + 1
    if unbatched:
        x = x.unsqueeze(0)
    conf = (list(module.stride), list(padding), list(module.dilation), False, [0] * dims, module.groups)
    out = _Conv.apply(x, weight, bias, conf)
    return out.squeeze(0) if unbatched else out


@dataclass(frozen=True)
class _Activation:
    """A pointwise activation ``f`` with its first and second derivatives (for :class:`_Pointwise`)."""

    function: Callable[[Tensor], Tensor]
    slope: Callable[[Tensor], Tensor]
    curvature: Callable[[Tensor], Tensor]


def _normal_pdf(x: Tensor) -> Tensor:
    return torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _gelu_slope(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(x * _SQRT_HALF)) + x * _normal_pdf(x)


def _gelu_curvature(x: Tensor) -> Tensor:
    return _normal_pdf(x) * (2.0 - x * x)


def _silu_slope(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _silu_curvature(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s) * (2.0 + x * (1.0 - 2.0 * s))


#: gelu (erf form): gelu' = Phi + x phi, gelu'' = phi (2 - x^2)
_GELU = _Activation(F.gelu, _gelu_slope, _gelu_curvature)
#: silu = x sigma: silu' = sigma (1 + x (1 - sigma)), silu'' = sigma (1 - sigma) (2 + x (1 - 2 sigma))
_SILU = _Activation(F.silu, _silu_slope, _silu_curvature)


class _PointwiseBackward(torch.autograd.Function):
    """``g_x = g f'(x)`` whose vector-Jacobian product reuses ``f'(x)`` and ``g f''(x)`` (module docstring)."""

    @staticmethod
    def forward(ctx, grad: Tensor, x: Tensor, slope: Tensor, activation: _Activation) -> Tensor:
        ctx.save_for_backward(grad, x, slope)
        ctx.activation = activation
        ctx.curvature = None  # g f''(x), built by the first product and reused by the next ones
        return grad * slope

    @staticmethod
    @torch.autograd.function.once_differentiable  # slope and curvature carry no graph: third order would be wrong
    def backward(ctx, dot: Tensor):
        grad, x, slope = ctx.saved_tensors
        need_grad, need_x = ctx.needs_input_grad[:2]
        d_grad = dot * slope if need_grad else None
        d_x = None
        if need_x:
            if ctx.curvature is None:
                ctx.curvature = grad * ctx.activation.curvature(x)
            d_x = dot * ctx.curvature
        return d_grad, d_x, None, None


class _Pointwise(torch.autograd.Function):
    """``y = f(x)`` for an :class:`_Activation` ``f``, whose backward is :class:`_PointwiseBackward`."""

    @staticmethod
    def forward(ctx, x: Tensor, activation: _Activation) -> Tensor:
        ctx.save_for_backward(x)
        ctx.activation = activation
        ctx.slope = None  # f'(x), built by the first backward through this node and reused by the next ones
        return activation.function(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        if ctx.slope is None:
            with torch.no_grad():
                ctx.slope = ctx.activation.slope(x)
        if torch.is_grad_enabled():  # a create_graph backward: the node whose vector-Jacobian product is cheap
            return _PointwiseBackward.apply(grad, x, ctx.slope, ctx.activation), None
        return grad * ctx.slope, None  # a plain backward, e.g. an HVP's pass back through the forward graph


def _rewritable(x: Tensor) -> bool:
    return not (_transformed() or _autocast(x.device.type) or not x.is_floating_point())


def fast_gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """``F.gelu(x, approximate)`` with the cheap double backward of :class:`_PointwiseBackward` (exact form only).

    Args:
        x: Input.
        approximate: ``"none"`` (rewritten) or ``"tanh"`` (``F.gelu`` itself).

    Returns:
        ``F.gelu(x, approximate=approximate)``, equal up to rounding.
    """
    if approximate != "none" or not _rewritable(x):
        return F.gelu(x, approximate=approximate)
    return _Pointwise.apply(x, _GELU)


def fast_silu(x: Tensor, inplace: bool = False) -> Tensor:
    """``F.silu(x, inplace)`` with the cheap double backward of :class:`_PointwiseBackward` (out of place only).

    Args:
        x: Input.
        inplace: ``True`` runs ``F.silu`` itself (its in-place write is part of the caller's contract).

    Returns:
        ``F.silu(x, inplace=inplace)``, equal up to rounding.
    """
    if inplace or not _rewritable(x):
        return F.silu(x, inplace=inplace)
    return _Pointwise.apply(x, _SILU)


def _gelu_module_forward(module: nn.GELU, x: Tensor) -> Tensor:
    return fast_gelu(x, module.approximate)


def _silu_module_forward(module: nn.SiLU, x: Tensor) -> Tensor:
    return fast_silu(x, module.inplace)


def affine_batch_norm(module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    r"""``module(x)`` for a BatchNorm layer, written as an affine map when it normalises with running statistics.

    In eval mode (``track_running_stats``), ``BatchNorm`` computes :math:`y = (x - \hat\mu) / \sqrt{\hat\sigma^2 +
    \epsilon}\, \gamma + \beta` per channel, i.e. :math:`y = x s + t` with :math:`s = \gamma / \sqrt{\hat\sigma^2 +
    \epsilon}` and :math:`t = \beta - \hat\mu s`; this returns that (differentiable in :math:`\gamma, \beta` and
    :math:`x`, equal to the module's output up to rounding). Otherwise (training mode, or no running statistics) it
    calls the layer's own forward.

    Args:
        module: A ``torch.nn`` BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``).
        x: Its ``(N, C, ...)`` input.

    Returns:
        The layer's output.
    """
    mean, var = module.running_mean, module.running_var
    if module.training or mean is None or var is None:
        return type(module).forward(module, x)
    module._check_input_dim(x)
    scale = torch.rsqrt(var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight
    shift = -mean * scale
    if module.bias is not None:
        shift = shift + module.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)  # the channel dimension is 1
    # a product and a sum, not addcmul: addcmul's backward multiplies the activation by its scalar ``value`` first,
    # and the HVP differentiates that product again (7% of a ResNetCNN(64) cached HVP, measured)
    return x * scale.view(shape) + shift.view(shape)


@contextlib.contextmanager
def probe_layers(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s convolutions, BatchNorm, GELU and SiLU layers by the rewritten functions of this module.

    Convolutions use :func:`fast_conv_forward`, BatchNorm layers :func:`affine_batch_norm`, ``nn.GELU``/``nn.SiLU``
    and the ``F.gelu``/``F.silu`` activation of ``nn.TransformerEncoderLayer/DecoderLayer`` :func:`fast_gelu` /
    :func:`fast_silu`. Only layers that run PyTorch's own code are rewritten: a subclass that overrides ``forward``
    (BatchNorm, GELU, SiLU) or ``_conv_forward`` (convolutions), or a layer that already carries an instance
    attribute of that name (a user's own patch), is left alone. Everything is restored on exit, also on an
    exception.

    Args:
        model: The module whose layers to rewrite.
    """
    with contextlib.ExitStack() as stack:
        for module in model.modules():
            activation = vars(module).get("activation") if isinstance(module, _TRANSFORMER_LAYERS) else None
            if activation is F.gelu or activation is F.silu:
                # a plain attribute of these layers: swapped and put back
                module.activation = fast_gelu if activation is F.gelu else fast_silu
                stack.callback(setattr, module, "activation", activation)
                continue
            if type(module).forward in _BATCH_NORM_FORWARDS:
                name, impl = "forward", affine_batch_norm
            elif isinstance(module, _CONVS) and type(module)._conv_forward in _CONV_FORWARDS:
                name, impl = "_conv_forward", fast_conv_forward
            elif type(module).forward is nn.GELU.forward:
                name, impl = "forward", _gelu_module_forward
            elif type(module).forward is nn.SiLU.forward:
                name, impl = "forward", _silu_module_forward
            else:
                continue
            if name not in vars(module):
                setattr(module, name, functools.partial(impl, module))
                stack.callback(vars(module).pop, name, None)
        yield
