r"""Embedding principle: neuron-splitting critical embeddings, neuron condensation and effective width of MLPs.

Zhang, Zhang, Luo, Xu, *Embedding Principle of Loss Landscape of Deep Neural Networks*, NeurIPS 2021
(arXiv:2105.14573), and Zhang, Li, Zhang, Luo, Xu, *Embedding Principle: a hierarchical structure of loss landscape
of deep neural networks*, JML 2022 (arXiv:2111.15527).

For an MLP :math:`f^{[l]} = \sigma(W^{[l]} f^{[l-1]} + b^{[l]})`, the one-step embedding :math:`T^\alpha_{l,s}`
duplicates neuron :math:`s` of hidden layer :math:`l`. With :math:`V = [I; e_s^\top]` and
:math:`U_\alpha = [I - (1-\alpha) e_s e_s^\top,\ (1-\alpha) e_s]`,

.. math::

    W'^{[l]} = V W^{[l]}, \quad b'^{[l]} = V b^{[l]}, \quad W'^{[l+1]} = W^{[l+1]} U_\alpha, \qquad U_\alpha V = I,

so the output is preserved for every input, and the gradient of the wide network is a fixed linear image of the
narrow one: critical points map to critical points (for any data and loss). The direction
:math:`t = (+a_s, -a_s)` on the two output columns (:math:`a_s = W^{[l+1]}_{:,s}`) is a Hessian null vector at an
embedded critical point, and the inertia (numbers of negative, zero, positive eigenvalues) never decreases.

Conversely, a trained wide network whose neurons *condense* (identical incoming weights, or identical directions for
positively homogeneous activations such as ReLU) computes the same function as a narrower network, its
*effective width*; each merged neuron accounts for at least one extra zero Hessian eigenvalue at an embedded critical
point, :math:`\sum_l (m_l - m^{\mathrm{eff}}_l)` in all.

Supported architectures (:func:`mlp_structure`): ``nn.Linear`` layers separated by element-wise activations, in an
``nn.Sequential`` (nested ones are flattened), possibly held by a module's ``net`` or ``model`` attribute (a
LightningModule, say). Anything else raises :class:`UnsupportedArchitectureError`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_hessian.errors import UnsupportedArchitectureError

from .operators import evaluation_mode

__all__ = [
    "DEFAULT_ORIENTATION_TOL",
    "DEFAULT_OUTPUT_TOL",
    "CondensationReport",
    "LayerCondensation",
    "LayerOrientation",
    "MLPStructure",
    "UnsupportedArchitectureError",
    "capture_inputs",
    "condensation",
    "condensation_report",
    "merge_condensed",
    "mlp_structure",
    "orientation_condensation",
    "predicted_extra_zero_eigenvalues",
    "split_neuron",
]

#: Default relative tolerance of :func:`condensation` (see there for its meaning).
DEFAULT_TOL = 1e-3
#: Default cosine tolerance of :func:`orientation_condensation`: neurons are aligned when ``1 - |cos| <= 1e-3``
#: (an angle of at most 2.56 degrees). Chosen from ``examples/condensation_small_init.py``.
DEFAULT_ORIENTATION_TOL = 1e-3
#: Default relative importance below which :func:`orientation_condensation` ignores a neuron.
DEFAULT_OUTPUT_TOL = 1e-2

# Element-wise activations that are positively homogeneous of degree one: sigma(c z) = c sigma(z) for c > 0.
# Dropout is the identity in eval mode (and a per-neuron random mask in training, where no split is exact).
_HOMOGENEOUS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout)
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    *_HOMOGENEOUS,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,  # includes ReLU6
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.AlphaDropout,
)
# Allowed after the last Linear only (they act on the output, which embeddings preserve exactly).
_OUTPUT_ONLY: tuple[type[nn.Module], ...] = (nn.Softmax, nn.LogSoftmax)
# Odd activations, sigma(-z) = -sigma(z): w and -w give the same orientation (the neuron's sign goes to its output).
_ODD: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
)
# Odd up to a constant, sigma(-z) = c - sigma(z) (the constant goes to the next layer's bias); allowed last in a chain.
_ODD_UP_TO_CONSTANT: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
_CONTAINER_ATTRIBUTES = ("net", "model")


@dataclass(frozen=True)
class MLPStructure:
    r"""The MLP found in a module, in forward order.

    Attributes:
        container: The ``nn.Sequential`` (or single ``nn.Linear``) that runs the MLP.
        prefix: Name of ``container`` in the analysed module (``""`` for the module itself).
        names: ``named_modules()`` names (in the analysed module) of the ``nn.Linear`` layers.
        linears: The ``nn.Linear`` layers.
        activations: For each hidden layer ``l`` (the outputs of ``linears[l]``, ``l < len(linears) - 1``), the
            element-wise modules between ``linears[l]`` and ``linears[l + 1]``.
        homogeneous: For each hidden layer, whether that chain is positively homogeneous
            (:math:`\sigma(cz) = c\sigma(z)` for :math:`c > 0`: ReLU, LeakyReLU, identity, dropout).
    """

    container: nn.Module
    prefix: str
    names: list[str]
    linears: list[nn.Linear]
    activations: list[tuple[nn.Module, ...]]
    homogeneous: list[bool]

    @property
    def widths(self) -> list[int]:
        """``[d, m_1, ..., m_{L-1}, K]``: input dimension, hidden widths, output dimension."""
        return [self.linears[0].in_features, *(lin.out_features for lin in self.linears)]

    @property
    def num_hidden(self) -> int:
        """Number of hidden layers, ``len(linears) - 1``."""
        return len(self.linears) - 1

    @property
    def odd(self) -> list[bool]:
        r"""For each hidden layer, whether its activation chain is odd.

        Odd: :math:`\sigma(-z) = -\sigma(z)` (tanh, softsign, identity, shrink functions, a symmetric hardtanh);
        the last module may be odd up to a constant, :math:`\sigma(-z) = c - \sigma(z)` (sigmoid, hardsigmoid).
        ReLU, ReLU6, LeakyReLU, GELU, SiLU, ... are not.
        """
        return [_is_odd_chain(chain) for chain in self.activations]


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Leaf modules of nested ``nn.Sequential`` containers, in forward order, with their full names."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, nn.Sequential):
            out.extend(_leaves(child, full))
        else:
            out.append((full, child))
    return out


def _find_container(model: nn.Module, prefix: str = "") -> tuple[nn.Module, str]:
    if isinstance(model, (nn.Sequential, nn.Linear)):
        return model, prefix
    for attribute in _CONTAINER_ATTRIBUTES:
        child = getattr(model, attribute, None)
        if isinstance(child, nn.Module) and child is not model:
            inner, inner_prefix = _find_container(child, f"{prefix}.{attribute}" if prefix else attribute)
            outside = {id(p) for p in model.parameters()} - {id(p) for p in child.parameters()}
            if outside:
                raise UnsupportedArchitectureError(
                    f"{type(model).__name__} holds parameters outside its '{attribute}' attribute: only a module whose "
                    "parameters all live in one MLP can be analysed"
                )
            return inner, inner_prefix
    raise UnsupportedArchitectureError(
        f"cannot find an MLP in {type(model).__name__}: pass an nn.Sequential of nn.Linear layers and element-wise "
        f"activations, or a module holding one in a {' or '.join(repr(a) for a in _CONTAINER_ATTRIBUTES)} attribute"
    )


def _is_elementwise(module: nn.Module) -> bool:
    if isinstance(module, nn.PReLU):
        return module.num_parameters == 1
    return isinstance(module, _ELEMENTWISE)


def _is_odd(module: nn.Module) -> bool:
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh with min_val=0
        return module.min_val == -module.max_val
    return isinstance(module, _ODD)


def _is_odd_chain(chain: Sequence[nn.Module]) -> bool:
    if not chain:
        return True  # consecutive Linear layers: identity
    *head, last = chain
    return all(_is_odd(m) for m in head) and (_is_odd(last) or isinstance(last, _ODD_UP_TO_CONSTANT))


def _is_homogeneous(module: nn.Module) -> bool:
    return isinstance(module, (*_HOMOGENEOUS, nn.PReLU))


def mlp_structure(model: nn.Module) -> MLPStructure:
    """Find the MLP (``nn.Linear`` layers and element-wise activations, in forward order) of a module.

    Accepted: an ``nn.Sequential`` (nested ``nn.Sequential`` are flattened), a single ``nn.Linear``, or a module
    (e.g. a LightningModule) whose parameters all live in its ``net`` or ``model`` attribute, which is itself
    accepted. Inside the chain: ``nn.Flatten`` before the first Linear, element-wise activations (ReLU, LeakyReLU,
    PReLU with one parameter, Tanh, Sigmoid, GELU, SiLU, ELU, Softplus, Hardtanh, ..., Identity, Dropout) anywhere, and
    Softmax/LogSoftmax after the last Linear.

    Args:
        model: The module to analyse.

    Returns:
        The :class:`MLPStructure`.

    Raises:
        UnsupportedArchitectureError: (a ``ValueError``) for anything else: no container found, parameters outside
            it, a layer that is neither Linear nor element-wise (convolutions, normalisation, multi-parameter PReLU,
            ...), no Linear at all, or consecutive Linear layers with mismatched sizes.
    """
    container, prefix = _find_container(model)
    leaves = [(prefix, container)] if isinstance(container, nn.Linear) else _leaves(container, prefix)
    names: list[str] = []
    linears: list[nn.Linear] = []
    chains: list[list[nn.Module]] = []
    trailing: list[nn.Module] = []
    for name, module in leaves:
        if isinstance(module, nn.Linear):
            if linears and trailing and any(isinstance(m, _OUTPUT_ONLY) for m in trailing):
                raise UnsupportedArchitectureError(f"{type(trailing[-1]).__name__} before '{name}': allowed at the end")
            if linears:
                chains.append(trailing)
                if linears[-1].out_features != module.in_features:
                    raise UnsupportedArchitectureError(
                        f"'{names[-1]}' has {linears[-1].out_features} outputs but the next Linear '{name}' expects "
                        f"{module.in_features} inputs: not a plain MLP"
                    )
            names.append(name)
            linears.append(module)
            trailing = []
        elif not linears and isinstance(module, nn.Flatten) or _is_elementwise(module):
            trailing.append(module)
        elif linears and isinstance(module, _OUTPUT_ONLY):
            trailing.append(module)
        else:
            raise UnsupportedArchitectureError(
                f"layer '{name}' ({type(module).__name__}) is neither nn.Linear nor an element-wise activation: "
                "only MLPs can be analysed"
            )
    if not linears:
        raise UnsupportedArchitectureError(f"no nn.Linear layer found in {type(model).__name__}")
    activations = [tuple(chain) for chain in chains]
    homogeneous = [all(_is_homogeneous(m) for m in chain) for chain in activations]
    return MLPStructure(
        container=container,
        prefix=prefix,
        names=names,
        linears=linears,
        activations=activations,
        homogeneous=homogeneous,
    )


# ---------------------------------------------------------------------------------------------------------------------
# one-step embedding


def _new_linear(template: nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=template.weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.weight.requires_grad_(template.weight.requires_grad)
        if bias is not None and template.bias is not None:
            layer.bias.copy_(bias)
            layer.bias.requires_grad_(template.bias.requires_grad)
    return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if name == "":
        return module
    model.set_submodule(name, module)
    return model


def split_neuron(model: nn.Module, layer: int, neuron: int, alpha: float | Tensor) -> nn.Module:
    r"""One-step critical embedding :math:`T^\alpha_{l,s}`: a copy of ``model`` whose hidden layer gains one neuron.

    Neuron :math:`s` (``neuron``) of hidden layer :math:`l` (``layer``: the outputs of the :math:`l`-th
    ``nn.Linear``, 0-based) is duplicated: its incoming weights and bias are appended as a new last neuron, and in the
    next Linear the column :math:`a_s` becomes :math:`\alpha a_s` and the new last column :math:`(1 - \alpha) a_s`:

    .. math::

        W'^{[l]} = \begin{bmatrix} W^{[l]} \\ W^{[l]}_{s,:} \end{bmatrix}, \quad
        b'^{[l]} = \begin{bmatrix} b^{[l]} \\ b^{[l]}_s \end{bmatrix}, \quad
        W'^{[l+1]} = \begin{bmatrix} W^{[l+1]}_{:, \neq s},\ \alpha a_s,\ (1 - \alpha) a_s \end{bmatrix}
        \text{ (column } s \text{ in place)}.

    The output is identical for every input and every :math:`\alpha`; a critical point of any loss maps to a critical
    point (Zhang et al. 2021). A *vector* ``alpha`` (one factor per output unit of the next layer) still preserves
    the output but in general breaks criticality: it is provided for negative tests.

    Args:
        model: An MLP accepted by :func:`mlp_structure`; it is deep-copied and left untouched.
        layer: 0-based hidden layer index, ``0 <= layer < number of Linear layers - 1``.
        neuron: 0-based neuron index in that layer, ``0 <= neuron < width``.
        alpha: Splitting ratio: a finite number, or a 1-D tensor with one entry per output of the next Linear.

    Returns:
        The wide model (same class, same dtype/device; the two modified Linear layers are new modules, with the
        ``requires_grad`` flags of the old ones).

    Raises:
        UnsupportedArchitectureError: If ``model`` is not a supported MLP.
        ValueError: For ``layer`` / ``neuron`` out of range, or a non-finite or wrongly shaped ``alpha``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
        >>> wide = split_neuron(net, layer=0, neuron=1, alpha=0.3)
        >>> wide[0].out_features, wide[2].in_features
        (4, 4)
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> bool((wide(x) - net(x)).abs().max() < 1e-12)
        True
    """
    structure = mlp_structure(model)
    if structure.num_hidden == 0:
        raise ValueError("the model has a single Linear layer: there is no hidden layer to split")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < structure.num_hidden:
        raise ValueError(f"layer must be an integer in [0, {structure.num_hidden - 1}] (hidden layers), got {layer!r}")
    width = structure.linears[layer].out_features
    if isinstance(neuron, bool) or not isinstance(neuron, int) or not 0 <= neuron < width:
        raise ValueError(
            f"neuron must be an integer in [0, {width - 1}] (width of hidden layer {layer}), got {neuron!r}"
        )
    nxt = structure.linears[layer + 1]
    if isinstance(alpha, Tensor):
        if alpha.dim() > 1 or (alpha.dim() == 1 and alpha.numel() != nxt.out_features):
            raise ValueError(
                f"alpha must be a number or a 1-D tensor of {nxt.out_features} entries (outputs of the next layer), "
                f"got a tensor of shape {tuple(alpha.shape)}"
            )
        if not bool(torch.isfinite(alpha).all()):
            raise ValueError(f"alpha must be finite, got {alpha}")
        factor = alpha.detach().to(dtype=nxt.weight.dtype, device=nxt.weight.device)
        factor = factor.reshape(-1, 1) if factor.dim() == 1 else factor
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number or a 1-D tensor, got {alpha!r}")
        factor = torch.tensor(float(alpha), dtype=nxt.weight.dtype, device=nxt.weight.device)

    wide = copy.deepcopy(model)
    target = mlp_structure(wide)
    lin, nxt = target.linears[layer], target.linears[layer + 1]
    with torch.no_grad():
        w_in = torch.cat([lin.weight, lin.weight[neuron : neuron + 1]], dim=0)
        b_in = None if lin.bias is None else torch.cat([lin.bias, lin.bias[neuron : neuron + 1]])
        column = nxt.weight[:, neuron : neuron + 1]
        w_out = torch.cat([nxt.weight, (1 - factor) * column], dim=1)
        w_out[:, neuron : neuron + 1] = factor * column
    wide = _replace(wide, target.names[layer], _new_linear(lin, w_in, b_in))
    wide = _replace(wide, target.names[layer + 1], _new_linear(nxt, w_out, None if nxt.bias is None else nxt.bias))
    return wide


# ---------------------------------------------------------------------------------------------------------------------
# condensation


@dataclass(frozen=True)
class LayerCondensation:
    r"""Condensed neurons of one hidden layer.

    Attributes:
        layer: 0-based hidden layer index (as in :func:`split_neuron`).
        width: Number of neurons :math:`m_l`.
        effective_width: Number of clusters :math:`m^{\mathrm{eff}}_l`.
        clusters: Neuron indices of each cluster, each sorted, clusters ordered by their first (leader) index.
        name: ``named_modules()`` name of the Linear whose outputs form the layer.
        by_direction: Whether neurons were grouped by direction (positively homogeneous activations) rather than by
            distance.
    """

    layer: int
    width: int
    effective_width: int
    clusters: list[list[int]]
    name: str = ""
    by_direction: bool = False


def _incoming(linear: nn.Linear) -> Tensor:
    r"""Rows :math:`\tilde u_k = [W_{k,:}, b_k]` (float64)."""
    weight = linear.weight.detach().to(torch.float64)
    if linear.bias is None:
        return weight
    return torch.cat([weight, linear.bias.detach().to(torch.float64).reshape(-1, 1)], dim=1)


def _pairs_within(points: Tensor, radius: float, block: int = 1024) -> Tensor:
    """Boolean ``(m, m)`` matrix of the pairs ``j < k`` with ``||points[j] - points[k]|| <= radius``.

    Candidates come from Gram-matrix distances (fast, but inexact for nearly equal points); every candidate within a
    safety margin of the radius is then re-checked with an exact difference, so exact copies have distance 0.
    """
    m, dim = points.shape
    squares = (points * points).sum(dim=1)
    margin = 64 * (dim + 1) * torch.finfo(points.dtype).eps * float(squares.max())
    within = torch.zeros(m, m, dtype=torch.bool)
    for start in range(0, m, block):
        rows = slice(start, min(start + block, m))
        approx = squares[rows, None] + squares[None, :] - 2 * points[rows] @ points.T
        candidates = (approx <= radius * radius + margin).cpu()
        candidates &= torch.arange(m)[None, :] > torch.arange(start, rows.stop)[:, None]  # j < k, as (row j, col k)
        first, second = candidates.nonzero(as_tuple=True)
        first = first + start
        for chunk in range(0, first.numel(), 4096):
            j, k = first[chunk : chunk + 4096], second[chunk : chunk + 4096]
            exact = torch.linalg.vector_norm(points[j] - points[k], dim=1).cpu() <= radius
            within[j[exact], k[exact]] = True
    return within


def _leader_clusters(points: Tensor, radius: float, active: Tensor) -> list[list[int]]:
    """Greedy leader clustering: in index order, each point joins the first leader within ``radius``, else leads."""
    within = _pairs_within(points, radius).numpy()
    active_flags = active.cpu().numpy()
    is_leader = np.zeros(points.shape[0], dtype=bool)
    clusters: dict[int, list[int]] = {}
    for k in range(points.shape[0]):
        if not active_flags[k]:
            continue
        leaders = np.flatnonzero(within[:k, k] & is_leader[:k])
        if leaders.size:
            clusters[int(leaders[0])].append(k)
        else:
            is_leader[k] = True
            clusters[k] = [k]
    out = list(clusters.values())
    inactive = np.flatnonzero(~active_flags).tolist()
    if inactive:
        out.append(inactive)
    return sorted(out, key=lambda members: members[0])


def _layer_clusters(rows: Tensor, by_direction: bool, tol: float) -> list[list[int]]:
    norms = torch.linalg.vector_norm(rows, dim=1)
    largest = float(norms.max()) if rows.numel() else 0.0
    if largest == 0.0:
        return [list(range(rows.shape[0]))]
    if by_direction:
        active = norms > tol * largest
        directions = rows / torch.where(active, norms, torch.ones_like(norms)).unsqueeze(1)
        return _leader_clusters(directions, tol, active)
    return _leader_clusters(rows / largest, tol, torch.ones_like(norms, dtype=torch.bool))


def condensation(model: nn.Module, *, tol: float = DEFAULT_TOL) -> list[LayerCondensation]:
    r"""Clusters of condensed neurons and effective width of every hidden layer.

    For hidden layer :math:`l` with incoming vectors :math:`\tilde u_k = [W^{[l]}_{k,:}, b^{[l]}_k]`:

    * smooth / general activations (tanh, GELU, ...): neurons compute the same function only if
      :math:`\tilde u_j = \tilde u_k`; the distance is :math:`\|\tilde u_j - \tilde u_k\| / \max_i \|\tilde u_i\|`;
    * positively homogeneous activations (ReLU, LeakyReLU, identity: :math:`\sigma(cz) = c\sigma(z)`, :math:`c>0`):
      neurons with the same direction are proportional; the distance is
      :math:`\|\hat u_j - \hat u_k\| = \sqrt{2(1 - \cos\angle(\tilde u_j, \tilde u_k))}` with
      :math:`\hat u = \tilde u / \|\tilde u\|`. Anti-parallel neurons are *not* merged. Neurons with
      :math:`\|\tilde u_k\| \le \text{tol} \cdot \max_i \|\tilde u_i\|` (dead: their output is
      :math:`\approx \sigma(0) = 0`) form one cluster of their own.

    Clustering is greedy against cluster leaders: neurons are visited in index order and each joins the first
    cluster whose leader (its lowest index) is within ``tol``, else starts a new cluster. This is deterministic, gives
    a partition (an equivalence relation, hence transitive), and bounds every cluster's diameter by ``2 tol``. Exact
    copies (as made by :func:`split_neuron`) have distance 0 and are always grouped.

    Args:
        model: An MLP accepted by :func:`mlp_structure`.
        tol: Relative distance threshold, ``>= 0`` (see above). Default ``1e-3``.

    Returns:
        One :class:`LayerCondensation` per hidden layer, in order (empty for a single Linear layer).

    Raises:
        UnsupportedArchitectureError: If ``model`` is not a supported MLP.
        ValueError: For a negative or non-finite ``tol``.
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    structure = mlp_structure(model)
    out = []
    for layer in range(structure.num_hidden):
        linear = structure.linears[layer]
        by_direction = structure.homogeneous[layer]
        clusters = _layer_clusters(_incoming(linear), by_direction, float(tol))
        out.append(
            LayerCondensation(
                layer=layer,
                width=linear.out_features,
                effective_width=len(clusters),
                clusters=clusters,
                name=structure.names[layer],
                by_direction=by_direction,
            )
        )
    return out


def predicted_extra_zero_eigenvalues(layers: Sequence[LayerCondensation]) -> int:
    r"""Extra zero Hessian eigenvalues predicted by the embedding principle, :math:`\sum_l (m_l - m^{\mathrm{eff}}_l)`.

    At a critical point embedded from the merged narrow network, every merged neuron adds (at least) one Hessian null
    direction along the critical line of its split (Zhang et al. 2021); the count is a lower bound for the wide
    network's zero eigenvalues beyond those of the narrow one.
    """
    return sum(entry.width - entry.effective_width for entry in layers)


def _merged_linears(structure: MLPStructure, layers: Sequence[LayerCondensation]) -> list[nn.Linear]:
    """The Linear layers of the narrow network obtained by merging every cluster into one neuron."""
    if len(layers) != structure.num_hidden:
        raise ValueError(f"expected one LayerCondensation per hidden layer ({structure.num_hidden}), got {len(layers)}")
    weights = [lin.weight.detach().to(torch.float64) for lin in structure.linears]
    biases = [None if lin.bias is None else lin.bias.detach().to(torch.float64) for lin in structure.linears]
    for entry in layers:
        l = entry.layer  # noqa: E741
        members = sorted(k for cluster in entry.clusters for k in cluster)
        if members != list(range(weights[l].shape[0])):
            raise ValueError(f"the clusters of layer {l} are not a partition of its {weights[l].shape[0]} neurons")
        rows = weights[l] if biases[l] is None else torch.cat([weights[l], biases[l].unsqueeze(1)], dim=1)
        norms = torch.linalg.vector_norm(rows, dim=1)
        new_rows, new_columns = [], []
        for cluster in entry.clusters:
            index = torch.tensor(cluster, device=rows.device)
            columns = weights[l + 1][:, index]
            if entry.by_direction and float(norms[index].mean()) > 0:
                # sigma(u_k . x) = |u_k| sigma(u_hat . x): one neuron of direction mean(u_hat), norm mean(|u_k|)
                scale = norms[index]
                live = scale > 0
                direction = (rows[index][live] / scale[live].unsqueeze(1)).mean(dim=0)
                direction = direction / torch.linalg.vector_norm(direction).clamp_min(torch.finfo(torch.float64).tiny)
                radius = scale.mean()
                new_rows.append(radius * direction)
                new_columns.append((columns * (scale / radius)).sum(dim=1))
            else:
                new_rows.append(rows[index].mean(dim=0))
                new_columns.append(columns.sum(dim=1))
        merged = torch.stack(new_rows)
        if biases[l] is None:
            weights[l] = merged
        else:
            weights[l], biases[l] = merged[:, :-1], merged[:, -1]
        weights[l + 1] = torch.stack(new_columns, dim=1)
    return [
        _new_linear(lin, w.to(lin.weight.dtype), None if b is None else b.to(lin.weight.dtype))
        for lin, w, b in zip(structure.linears, weights, biases)
    ]


def merge_condensed(
    model: nn.Module, layers: Sequence[LayerCondensation] | None = None, *, tol: float = DEFAULT_TOL
) -> nn.Module:
    r"""The narrow network obtained by merging each cluster of condensed neurons into one neuron.

    Distance-grouped clusters (smooth activations) become one neuron with the mean incoming vector and the sum of the
    outgoing columns, :math:`a = \sum_{k \in C} a_k`; direction-grouped ones (positively homogeneous activations)
    become one neuron of direction :math:`\overline{\hat u}` and norm :math:`\bar r = \operatorname{mean}\|\tilde u_k\|`
    with column :math:`\sum_{k \in C} (\|\tilde u_k\| / \bar r)\, a_k`. For exact copies (and exactly proportional
    neurons) the function is unchanged, and merging a network made by :func:`split_neuron` gives back the narrow
    network.

    Args:
        model: An MLP accepted by :func:`mlp_structure`; it is deep-copied and left untouched.
        layers: The clusters, as returned by :func:`condensation`; computed with ``tol`` when ``None``.
        tol: Tolerance of :func:`condensation` when ``layers`` is ``None``.

    Returns:
        The narrow model (same class, with smaller Linear layers).

    Raises:
        UnsupportedArchitectureError: If ``model`` is not a supported MLP.
        ValueError: If ``layers`` does not match the model.
    """
    if layers is None:
        layers = condensation(model, tol=tol)
    narrow = copy.deepcopy(model)
    target = mlp_structure(narrow)
    for name, linear in zip(target.names, _merged_linears(mlp_structure(model), layers)):
        narrow = _replace(narrow, name, linear)
    return narrow


# ---------------------------------------------------------------------------------------------------------------------
# condensation by orientation (the phenomenon)


@dataclass(frozen=True)
class LayerOrientation:
    r"""Orientation clusters of one hidden layer (see :func:`orientation_condensation`).

    Attributes:
        layer: 0-based hidden layer index (as in :func:`split_neuron`).
        width: Number of neurons :math:`m_l`.
        effective_width: Number of orientation clusters among the significant neurons (0 if none is significant).
        clusters: Neuron indices of each cluster (significant neurons only), each sorted, ordered by first index.
        negligible: Indices of the neurons left out by the importance rule, sorted.
        name: ``named_modules()`` name of the Linear whose outputs form the layer.
        symmetric: Whether :math:`\tilde u` and :math:`-\tilde u` counted as the same orientation.
        tol: The cosine tolerance used.
        output_tol: The relative importance threshold used.
    """

    layer: int
    width: int
    effective_width: int
    clusters: list[list[int]]
    negligible: list[int]
    name: str = ""
    symmetric: bool = False
    tol: float = DEFAULT_ORIENTATION_TOL
    output_tol: float = DEFAULT_OUTPUT_TOL

    @property
    def num_significant(self) -> int:
        """Number of neurons that passed the importance rule, ``width - len(negligible)``."""
        return self.width - len(self.negligible)


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _aligned_components(directions: Tensor, tol: float, symmetric: bool, block: int = 1024) -> np.ndarray:
    """Connected components (single linkage) of the graph ``1 - cos <= tol`` (``|cos|`` when ``symmetric``).

    Built block by block, so memory stays ``O(block * m)``; rows must be unit vectors (float64).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    m = directions.shape[0]
    labels = np.arange(m)
    threshold = 1.0 - tol - 64 * torch.finfo(torch.float64).eps * (directions.shape[1] + 1)
    for start in range(0, m, block):
        cosines = directions[start : start + block] @ directions.T
        if symmetric:
            cosines = cosines.abs()
        rows, cols = (cosines >= threshold).nonzero(as_tuple=True)
        rows, cols = labels[rows.cpu().numpy() + start], labels[cols.cpu().numpy()]
        pairs = np.unique(rows * m + cols)
        graph = coo_matrix((np.ones(pairs.size, dtype=np.int8), (pairs // m, pairs % m)), shape=(m, m))
        _, components = connected_components(graph, directed=False)
        labels = components[labels]
    return labels


def orientation_condensation(
    model: nn.Module,
    *,
    tol: float = DEFAULT_ORIENTATION_TOL,
    output_tol: float = DEFAULT_OUTPUT_TOL,
    symmetric: bool | None = None,
) -> list[LayerOrientation]:
    r"""Condensation by orientation: number of directions the neurons' input weights align onto, per hidden layer.

    The condensation phenomenon (Luo, Xu, Ma, Zhang, *Phase diagram for two-layer ReLU neural networks at infinite-width
    limit*, JMLR 2021; Zhou, Zhou, Jin, Zhang, Luo, Xu, *Towards understanding the condensation of neural networks at
    initial training*, NeurIPS 2022; Zhang et al., *Embedding Principle of Loss Landscape of Deep Neural Networks*,
    NeurIPS 2021): in the small-initialisation regime, the input vectors :math:`\tilde u_k = [W^{[l]}_{k,:},
    b^{[l]}_k]` of the neurons align onto a few orientations while their norms differ, so the network behaves like a
    narrow one. The exact-merge grouping of :func:`condensation` (equal vectors) never sees this for smooth
    activations; this function measures it.

    1. **Importance rule.** Neuron :math:`k` has importance :math:`c_k = \|a_k\| \, \|\tilde u_k\|`, with
       :math:`a_k = W^{[l+1]}_{:,k}` its output column. For a 1-Lipschitz activation with :math:`\sigma(0) = 0`
       (tanh, ReLU, ...), :math:`\|a_k \sigma(\tilde u_k \cdot \tilde x)\| \le c_k \|\tilde x\|`, so :math:`c_k`
       bounds the neuron's contribution to the next layer. Neurons with :math:`c_k \le \text{output\_tol} \cdot
       \max_j c_j` (negligible output weight or negligible input weight: dead, or not yet grown out of a small
       initialisation) are left out and listed in ``negligible``; their direction is noise.
    2. **Alignment.** Significant neurons :math:`j, k` are aligned when :math:`1 - \cos\angle(\tilde u_j, \tilde u_k)
       \le \text{tol}`; for odd activations (``symmetric``: tanh, ...; :math:`\sigma(-z) = -\sigma(z)`, so
       :math:`(\tilde u, a)` and :math:`(-\tilde u, -a)` are the same neuron) when :math:`1 - |\cos| \le \text{tol}`.
       For ReLU and other non-odd activations anti-parallel neurons compute different functions and stay apart.
    3. **Clusters.** The connected components of the alignment graph (single linkage at the cosine threshold): a
       partition independent of the neuron order. ``effective_width`` is their number.

    The default ``tol = 1e-3`` (2.6 degrees) comes from ``examples/condensation_small_init.py`` (width-100
    one-hidden-layer nets on a 2-D regression task, full-batch Adam): it separates small-initialisation nets (3-9
    orientations early in training, about 20-35 later, for tanh) from default-initialisation ones (about 90 throughout).
    In very low dimension the orientations of random neurons are crowded: with :math:`\tilde u \in \mathbb{R}^2`
    (1-D inputs), 100 random neurons are about 1.8 degrees apart on the half circle and single linkage chains them;
    use a smaller ``tol`` (``1e-4``) there.

    Args:
        model: An MLP accepted by :func:`mlp_structure`.
        tol: Cosine tolerance :math:`1 - \cos`, in ``[0, 1)``. ``0`` groups exactly parallel neurons only.
        output_tol: Relative importance threshold, in ``[0, 1)``. ``0`` keeps every neuron with :math:`c_k > 0`.
        symmetric: Treat :math:`\tilde u` and :math:`-\tilde u` as one orientation; ``None`` (default) decides per
            layer from the activation (:attr:`MLPStructure.odd`).

    Returns:
        One :class:`LayerOrientation` per hidden layer, in order (empty for a single Linear layer).

    Raises:
        UnsupportedArchitectureError: If ``model`` is not a supported MLP.
        ValueError: For ``tol`` or ``output_tol`` outside ``[0, 1)``.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1)).double()
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 6.0], [-0.5, -1.0], [2.0, -1.0]]))
        ...     _ = net[0].bias.copy_(torch.tensor([1.0, 3.0, -0.5, 0.0]))
        ...     _ = net[2].weight.fill_(1.0)
        >>> [entry.effective_width for entry in orientation_condensation(net)]  # rows 0, 1, 2 share one orientation
        [2]
    """
    tol = _check_fraction("tol", tol)
    output_tol = _check_fraction("output_tol", output_tol)
    if symmetric is not None and not isinstance(symmetric, bool):
        raise ValueError(f"symmetric must be None, True or False, got {symmetric!r}")
    structure = mlp_structure(model)
    odd = structure.odd
    out = []
    for layer in range(structure.num_hidden):
        rows = _incoming(structure.linears[layer])
        columns = structure.linears[layer + 1].weight.detach().to(torch.float64)
        norms = torch.linalg.vector_norm(rows, dim=1)
        importance = (norms * torch.linalg.vector_norm(columns, dim=0).to(norms.device)).cpu()
        largest = float(importance.max()) if importance.numel() else 0.0
        keep = importance > output_tol * largest if largest > 0 else torch.zeros_like(importance, dtype=torch.bool)
        index = keep.nonzero().flatten()
        sym = odd[layer] if symmetric is None else symmetric
        clusters: list[list[int]] = []
        if index.numel():
            directions = rows[index.to(rows.device)] / norms[index.to(rows.device)].unsqueeze(1)
            labels = _aligned_components(directions, tol, sym)
            groups: dict[int, list[int]] = {}
            for position, label in zip(index.tolist(), labels.tolist()):
                groups.setdefault(label, []).append(position)
            clusters = sorted(groups.values(), key=lambda members: members[0])
        out.append(
            LayerOrientation(
                layer=layer,
                width=rows.shape[0],
                effective_width=len(clusters),
                clusters=clusters,
                negligible=(~keep).nonzero().flatten().tolist(),
                name=structure.names[layer],
                symmetric=sym,
                tol=tol,
                output_tol=output_tol,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------------------
# summary for monitoring


@dataclass(frozen=True)
class CondensationReport:
    r"""Condensation summary of an MLP, for logging.

    Two widths per hidden layer: the *effective width* counts orientation clusters (:func:`orientation_condensation`,
    the condensation phenomenon of small-initialisation training), the *merge width* counts exact-merge clusters
    (:func:`condensation`: the width of the narrow network that reproduces the function, with error
    ``merge_output_error``, and the embedding-principle count of extra zero eigenvalues).

    Attributes:
        layers: The exact-merge :class:`LayerCondensation` of every hidden layer.
        effective_widths: Number of orientation clusters per hidden layer, keyed by the Linear's ``named_modules()``
            name.
        widths: Width per hidden layer, same keys.
        merge_output_error: :math:`\max |f_{\mathrm{wide}}(x) - f_{\mathrm{narrow}}(x)|` over the batch (float64,
            eval mode, outputs of the MLP container) for the exact-merge narrow network, or ``None`` when no inputs
            were given.
        predicted_zero_eigenvalues: :math:`\sum_l (m_l - m^{\mathrm{merge}}_l)` (exact-merge clusters).
        merge_widths: Number of exact-merge clusters per hidden layer, same keys.
        orientation: The :class:`LayerOrientation` of every hidden layer.
        significant_neurons: Neurons that passed the importance rule of :func:`orientation_condensation`, same keys.
    """

    layers: list[LayerCondensation]
    effective_widths: dict[str, int] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    merge_output_error: float | None = None
    predicted_zero_eigenvalues: int = 0
    merge_widths: dict[str, int] = field(default_factory=dict)
    orientation: list[LayerOrientation] = field(default_factory=list)
    significant_neurons: dict[str, int] = field(default_factory=dict)


def _call(module: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return module(inputs)
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, (list, tuple)):
        return module(*inputs)
    return module(inputs)


def _max_difference(a: Any, b: Any) -> float:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape != b.shape:
            raise ValueError(f"outputs of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared")
        return float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return max((_max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    raise ValueError(f"cannot compare outputs of types {type(a).__name__} and {type(b).__name__}")


def capture_inputs(container: nn.Module, run: Callable[[], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword arguments ``container`` receives (first call) while ``run()`` executes.

    Args:
        container: The submodule to watch (e.g. the MLP inside a LightningModule).
        run: Drives the outer model, e.g. ``lambda: model(x)`` or ``lambda: loss_fn(model, batch)``.

    Returns:
        ``(args, kwargs)`` of the first call.

    Raises:
        UnsupportedArchitectureError: If ``run`` never calls ``container``.
    """
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not captured:
            captured.append((args, kwargs))

    handle = container.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    if not captured:
        raise UnsupportedArchitectureError(f"the model never calls its MLP container {type(container).__name__}")
    return captured[0]


def _to64(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64) if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_to64(v) for v in value)
    if isinstance(value, dict):
        return {k: _to64(v) for k, v in value.items()}
    return value


def condensation_report(
    model: nn.Module,
    inputs: Any = None,
    *,
    tol: float = DEFAULT_TOL,
    orientation_tol: float = DEFAULT_ORIENTATION_TOL,
    output_tol: float = DEFAULT_OUTPUT_TOL,
    symmetric: bool | None = None,
) -> CondensationReport:
    r"""Effective (orientation) and merge widths of every hidden layer and, given inputs, the merged network's error.

    ``effective_widths`` come from :func:`orientation_condensation` (``orientation_tol``, ``output_tol``,
    ``symmetric``), ``merge_widths`` from :func:`condensation` (``tol``).

    The merge error compares, in float64 and eval mode, the MLP container of ``model`` with its merged copy
    (:func:`merge_condensed`) on the input the container receives when ``model`` runs on ``inputs`` (captured with
    a forward pre-hook, so preprocessing in ``model.forward`` is respected). It is ~1e-15 relative for exactly
    condensed networks and grows with the spread of the clusters.

    Args:
        model: An MLP accepted by :func:`mlp_structure` (a LightningModule with a ``net`` attribute, say).
        inputs: What ``model`` is called with (a tensor; a tuple/list is unpacked as positional arguments, a dict as
            keyword arguments), or ``None`` to skip the merge error.
        tol: Tolerance of :func:`condensation` (exact merge).
        orientation_tol: Cosine tolerance of :func:`orientation_condensation`.
        output_tol: Importance threshold of :func:`orientation_condensation`.
        symmetric: ``symmetric`` of :func:`orientation_condensation` (``None``: from the activation).

    Returns:
        A :class:`CondensationReport`.

    Raises:
        UnsupportedArchitectureError: If ``model`` is not a supported MLP.
        ValueError: For a bad ``tol``, ``orientation_tol`` or ``output_tol``.
    """
    structure = mlp_structure(model)
    layers = condensation(model, tol=tol)
    orientation = orientation_condensation(model, tol=orientation_tol, output_tol=output_tol, symmetric=symmetric)
    error = None
    if inputs is not None:
        with torch.no_grad(), evaluation_mode(model):
            args, kwargs = capture_inputs(structure.container, lambda: _call(model, inputs))
            args, kwargs = _to64(args), _to64(kwargs)
            wide = copy.deepcopy(structure.container).to(torch.float64)
            narrow = copy.deepcopy(structure.container)
            local = mlp_structure(narrow)  # names relative to the container copy
            for name, linear in zip(local.names, _merged_linears(structure, layers)):
                narrow = _replace(narrow, name, linear)
            narrow = narrow.to(torch.float64)
            wide.eval()
            narrow.eval()
            error = _max_difference(wide(*args, **kwargs), narrow(*args, **kwargs))
    return CondensationReport(
        layers=layers,
        effective_widths={entry.name: entry.effective_width for entry in orientation},
        widths={entry.name: entry.width for entry in layers},
        merge_output_error=error,
        predicted_zero_eigenvalues=predicted_extra_zero_eigenvalues(layers),
        merge_widths={entry.name: entry.effective_width for entry in layers},
        orientation=orientation,
        significant_neurons={entry.name: entry.num_significant for entry in orientation},
    )
