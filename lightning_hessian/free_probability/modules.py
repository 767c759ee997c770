r"""Reading a real ``nn.Module`` as a chain of ``Linear`` layers and elementwise activations.

For :meth:`JacobianLaw.from_module <lightning_hessian.free_probability.law.JacobianLaw.from_module>`: widths
:math:`N_\ell`, fan-in weight variances :math:`\tilde\sigma_\ell^2 = N_{\ell-1}\,\overline{W_\ell^2}` (mean square of
the entries, the variance of a centred initialisation), bias variances :math:`\overline{b_\ell^2}`, the input mean
square and the pre-activation variances :math:`q_\ell = \overline{h_\ell^2}` measured by a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from lightning_hessian.errors import UnsupportedArchitectureError

__all__ = ["MLPSpec", "UnsupportedArchitectureError", "read_mlp", "module_layers"]


_MODULE_ACTIVATIONS: dict[type, str] = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.Identity: "linear",
}
_FUNCTION_ACTIVATIONS = {
    torch.relu: "relu",
    F.relu: "relu",
    torch.tanh: "tanh",
    F.silu: "silu",
    F.gelu: "gelu",
    torch.erf: "erf",
    torch.special.erf: "erf",
    "relu": "relu",  # tensor methods x.relu(), x.tanh()
    "tanh": "tanh",
}
_SKIPPED = (nn.Dropout, nn.Identity)


def _activation_name(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.Hardtanh) and not isinstance(mod, nn.ReLU6):
        if mod.min_val == -1.0 and mod.max_val == 1.0:
            return "hard_tanh"
        return None
    if isinstance(mod, nn.GELU):
        return "gelu" if mod.approximate == "none" else None
    for cls, name in _MODULE_ACTIVATIONS.items():
        if type(mod) is cls:
            return name
    return None


@dataclass
class MLPSpec:
    """What :func:`read_mlp` found: one entry per Linear layer."""

    widths: list[int]
    weight_variances: list[float]
    bias_variances: list[float]
    activations: list[str]
    input_variance: float
    preactivation_variances: list[float]
    linears: list[nn.Linear]


def _flatten_sequential(module: nn.Module) -> list[nn.Module] | None:
    if not isinstance(module, nn.Sequential):
        return None
    out: list[nn.Module] = []
    for child in module:
        inner = _flatten_sequential(child)
        out.extend(inner if inner is not None else [child])
    return out


def _ops_from_fx(module: nn.Module) -> list[object]:
    """Chain of leaf modules / functions of ``module`` via ``torch.fx`` (raises when it is not a simple chain)."""
    try:
        from torch import fx

        graph = fx.symbolic_trace(module).graph
    except Exception as err:  # noqa: BLE001 - any tracing failure means we cannot read the architecture
        raise UnsupportedArchitectureError(
            f"cannot read {type(module).__name__}: not an nn.Sequential and torch.fx could not trace it ({err})"
        ) from err
    ops: list[object] = []
    prev = None
    for node in graph.nodes:
        if node.op == "placeholder":
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise UnsupportedArchitectureError(f"{type(module).__name__} does not return its last layer's output")
            break
        if len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not prev or len(node.users) != 1:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__} is not a simple chain of layers (node {node.name!r}: {node.op} {node.target})"
            )
        if node.op == "call_module":
            ops.append(module.get_submodule(str(node.target)))
        elif node.op in ("call_function", "call_method"):
            if node.target in _FUNCTION_ACTIVATIONS and node.kwargs.get("approximate", "none") == "none":
                ops.append(_FUNCTION_ACTIVATIONS[node.target])
            elif node.target in (torch.flatten, "flatten", "view", "reshape") and not ops:
                ops.append(nn.Flatten())
            else:
                target = getattr(node.target, "__name__", node.target)
                raise UnsupportedArchitectureError(
                    f"{type(module).__name__} uses {target!r}, which the Jacobian law cannot model"
                    " (supported: Linear layers with relu, tanh, hard_tanh, erf, gelu, silu)"
                )
        else:
            raise UnsupportedArchitectureError(f"{type(module).__name__}: unsupported graph node {node.op!r}")
        prev = node
    return ops


def module_layers(module: nn.Module) -> tuple[list[nn.Linear], list[str], bool]:
    """Linear layers, one activation name per layer, and whether the input is flattened first.

    Raises:
        UnsupportedArchitectureError: anything but Linear layers with supported elementwise activations.
    """
    ops = _flatten_sequential(module)
    if ops is None:
        ops = [module] if isinstance(module, nn.Linear) else _ops_from_fx(module)
    linears: list[nn.Linear] = []
    acts: list[str | None] = []
    flatten = False
    for op in ops:
        if isinstance(op, str):
            name: str | None = op
        elif isinstance(op, nn.Linear):
            linears.append(op)
            acts.append(None)
            continue
        elif isinstance(op, nn.Flatten):
            if linears:
                raise UnsupportedArchitectureError("Flatten is only supported before the first Linear layer")
            flatten = True
            continue
        elif isinstance(op, _SKIPPED) and not isinstance(op, nn.Identity):
            continue
        else:
            name = _activation_name(op)
            if name is None:
                raise UnsupportedArchitectureError(
                    f"unsupported layer {op!r}; the Jacobian law models Linear layers with elementwise ReLU, Tanh, "
                    "Hardtanh(-1, 1), GELU (exact), SiLU or Identity activations"
                )
            if name == "linear":
                continue
        if not linears:
            raise UnsupportedArchitectureError(f"activation {name!r} before the first Linear layer is not supported")
        if acts[-1] is not None:
            raise UnsupportedArchitectureError(f"two activations in a row ({acts[-1]!r}, {name!r}) are not supported")
        acts[-1] = name
    if not linears:
        raise UnsupportedArchitectureError(f"{type(module).__name__} has no Linear layer")
    return linears, [a if a is not None else "linear" for a in acts], flatten


@torch.no_grad()
def read_mlp(module: nn.Module, example_input: Tensor) -> MLPSpec:
    """Widths, variances and measured pre-activation variances of an MLP (see the module docstring).

    Raises:
        UnsupportedArchitectureError: see :func:`module_layers`.
        ValueError: an input whose feature size does not match the first layer.
    """
    linears, acts, flatten = module_layers(module)
    x = example_input.detach()
    x = x.reshape(x.shape[0], -1) if flatten or x.dim() > 2 else x
    if x.dim() == 1:
        x = x.unsqueeze(0)
    n0 = linears[0].in_features
    if x.shape[-1] != n0:
        raise ValueError(f"example_input has {x.shape[-1]} features, the first Linear layer expects {n0}")
    widths = [n0] + [lin.out_features for lin in linears]
    for ell, lin in enumerate(linears[1:], start=1):
        if lin.in_features != widths[ell]:
            raise UnsupportedArchitectureError(f"layer {ell} expects {lin.in_features} inputs, got {widths[ell]}")
    x = x.to(dtype=torch.float64)
    input_variance = float(x.pow(2).mean())
    weight_var, bias_var, q = [], [], []
    h = x
    funcs = {
        "linear": lambda t: t,
        "relu": torch.relu,
        "hard_tanh": lambda t: t.clamp(-1.0, 1.0),
        "tanh": torch.tanh,
        "erf": torch.erf,
        "gelu": F.gelu,
        "silu": F.silu,
    }
    for lin, act in zip(linears, acts):
        w = lin.weight.detach().to(dtype=torch.float64, device=h.device)
        weight_var.append(float(w.pow(2).mean()) * lin.in_features)
        b = None if lin.bias is None else lin.bias.detach().to(dtype=torch.float64, device=h.device)
        bias_var.append(0.0 if b is None else float(b.pow(2).mean()))
        pre = h @ w.T + (0.0 if b is None else b)
        q.append(float(pre.pow(2).mean()))
        h = funcs[act](pre)
    return MLPSpec(
        widths=widths,
        weight_variances=weight_var,
        bias_variances=bias_var,
        activations=acts,
        input_variance=input_variance,
        preactivation_variances=q,
        linears=linears,
    )
