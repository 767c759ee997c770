r"""Matrix-free Hessian of a probe loss, with one all-reduce per product under ``torch.distributed``.

The probe loss is the per-sample mean over all probe samples of all ranks,

.. math::

    L(\theta) = \frac{1}{N} \sum_{r} \sum_{b \in B_r} n_b \, \ell_b(\theta), \qquad N = \sum_r \sum_{b \in B_r} n_b,

where :math:`\ell_b` is the mean loss of batch :math:`b` (what ``loss_fn(model, batch)`` returns), :math:`n_b` its
sample count and :math:`B_r` the batches held by rank :math:`r`. A Hessian-vector product is

.. math::

    H v = \frac{1}{N} \sum_r \sum_{b \in B_r} n_b \, \nabla_\theta \big( \nabla_\theta \ell_b(\theta)^\top v \big),

computed per batch by double back-propagation (Pearlmutter 1994) or forward-over-reverse differentiation, summed
locally and all-reduced once, so that every rank holds the Hessian of the union of all ranks' samples. Every
collective is preceded by a status all-reduce (:mod:`lightning_hessian.distributed`), so that a failure on one rank
raises :class:`ProbeProductError` on all ranks instead of leaving the others waiting in a mismatched all-reduce.

Every forward pass runs inside :func:`probe_forward_context` (double-backward capable kernels) and :func:`uncompiled`
(``torch.compile`` d submodules replaced by their original modules: compiled graphs support no double backward).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from lightning_hessian.distributed import failed_ranks
from lightning_hessian.errors import ProbeProductError
from lightning_hessian.memory import available_memory
from lightning_hessian.probe_kernels import probe_layers

LossFn = Callable[[nn.Module, Any], Tensor]
Strategy = Literal["cached", "double_backward", "forward_over_reverse"]

#: The exact HVP strategies of :class:`HessianOperator`.
STRATEGIES: tuple[str, ...] = ("cached", "double_backward", "forward_over_reverse")
#: Strategy used when the cached graph is not wanted (``cache_graph=False``) or does not fit (``"auto"``).
UNCACHED_STRATEGY = "double_backward"
#: Default share of the free memory the cached gradient graphs may take under ``cache_graph="auto"``.
DEFAULT_MEMORY_FRACTION = 0.5

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "STRATEGIES",
    "HessianOperator",
    "LossFn",
    "LossModule",
    "ProbeProductError",
    "available_memory",
    "batch_size",
    "cast_batch",
    "distributed_sum",
    "probe_forward_context",
    "saved_tensor_bytes",
    "uncompiled",
    "world_info",
]


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the length of its first tensor.

    Tensors are searched depth-first: mappings in value order, dataclass instances in field order, named tuples,
    tuples, lists and other sequences in item order (strings and bytes are not searched).

    Args:
        batch: A tensor, or a (nested) container whose first tensor holds one row per sample.

    Returns:
        The length of the first tensor found.

    Raises:
        ValueError: If the batch holds no tensor with at least one dimension.
    """
    first = _first_tensor(batch)
    if first is None or first.dim() == 0:
        raise ValueError(
            f"cannot infer the sample count of a batch of type {type(batch).__name__}: it needs a tensor "
            "with a leading batch dimension (a tensor, or a tuple/list/dict/dataclass of tensors); "
            "or pass batch_size_fn"
        )
    return int(first.shape[0])


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        items: Iterable[Any] = batch.values()
    elif _is_dataclass_instance(batch):
        items = (getattr(batch, field.name) for field in dataclasses.fields(batch))
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, bytearray)):
        items = batch
    else:
        return None
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def cast_batch(batch: Any, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Any:
    """Move a (nested) batch to ``device`` and cast its floating-point tensors to ``dtype``.

    Integer tensors (class labels, indices) keep their dtype. Containers keep their type: named tuples are rebuilt
    field by field and dataclass instances with :func:`dataclasses.replace` (fields with ``init=False`` are left as
    they are).

    Args:
        batch: A tensor or nested tuple/list/dict/dataclass of tensors and other objects.
        dtype: Floating-point dtype for the floating tensors; ``None`` keeps them.
        device: Target device; ``None`` keeps the tensors where they are.

    Returns:
        The converted batch.
    """
    if isinstance(batch, Tensor):
        if batch.is_floating_point() and dtype is not None:
            return batch.to(device=device, dtype=dtype)
        return batch.to(device=device) if device is not None else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: cast_batch(value, dtype, device) for key, value in batch.items()})
    if _is_dataclass_instance(batch):
        changes = {
            field.name: cast_batch(getattr(batch, field.name), dtype, device)
            for field in dataclasses.fields(batch)
            if field.init
        }
        return dataclasses.replace(batch, **changes)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(cast_batch(value, dtype, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(cast_batch(value, dtype, device) for value in batch)
    return batch


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_sum(tensor: Tensor) -> Tensor:
    """All-reduce (sum) ``tensor`` in place over the default process group; identity without one.

    Gloo has no float64 support problems, but NCCL cannot reduce CPU tensors: the tensor must live on the backend's
    device, which is where the model lives in practice.

    Args:
        tensor: The local contribution.

    Returns:
        The same tensor, now holding the sum over ranks.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _agreed_sum(
    local: Callable[[], Tensor], numel: int, what: str, *, like: Tensor, check_finite: bool = True
) -> Tensor:
    """All-reduce ``local()`` behind a status all-reduce, so that a failure on any rank raises on every rank.

    The two-phase protocol of :mod:`lightning_hessian.distributed`: a 1-element status all-reduce
    (:func:`~lightning_hessian.distributed.failed_ranks`) first, the payload only when no rank failed. A rank whose
    ``local()`` raises or (with ``check_finite``) is not finite sends the status 1 and no payload; so does a rank that
    failed *outside* any product and reached its stage's agreement point, so collectives never mismatch in size.

    Args:
        local: This rank's contribution (any shape with ``numel`` elements).
        numel: Its number of elements (known without calling ``local``).
        what: Name of the step, for the error message.
        like: Tensor giving the dtype and device of the buffer.
        check_finite: Treat non-finite local values as a failure.

    Returns:
        The summed values, flat.

    Raises:
        ProbeProductError: On every rank (already agreed: an :class:`~lightning_hessian.distributed.AgreedFailure`),
            if any rank raised or (with ``check_finite``) produced non-finite values.
    """
    error: BaseException | None = None
    non_finite = False
    try:
        values = local().reshape(-1).to(dtype=like.dtype, device=like.device)
        if values.numel() != numel:
            raise ValueError(f"{what}: expected {numel} values, got {values.numel()}")
        # a sum with an inf or a NaN in it is not finite: one fast reduction instead of isfinite (2 ms of a 40 ms
        # product of 1.07M parameters); only a finite overflow of the sum needs the exact test
        non_finite = check_finite and not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all())
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        error = exc
        values = torch.zeros(numel, dtype=like.dtype, device=like.device)
    if non_finite:
        error = FloatingPointError(f"non-finite values in {what}")
    failed_here = error is not None
    failures = failed_ranks(failed_here, like.device)
    if failures:
        rank, world = world_info()
        if non_finite:
            mine = "it produced non-finite values"
        elif error is not None:
            mine = f"it raised {type(error).__name__}: {error}"
        else:
            mine = "it succeeded, so another rank is the cause"
        raise ProbeProductError(
            f"{what} failed on {failures} of {world} rank(s); on this rank ({rank}) {mine}", error
        ) from error
    return distributed_sum(values)


# --------------------------------------------------------------------------------------------------------------------
# forward passes that support double backward
# --------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def probe_forward_context(model: nn.Module | None = None) -> Iterator[None]:
    r"""Make every forward pass inside the block twice differentiable.

    Fused kernels have no double backward, so Hessian-vector products through them fail (for example "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"). Inside this context:

    * ``F.scaled_dot_product_attention`` runs its composite MATH kernel
      (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``) instead of flash / memory-efficient / cuDNN attention;
    * the ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` inference fast path
      (``torch._transformer_encoder_layer_fwd``, ``torch._native_multi_head_attention``) is disabled
      (``torch.backends.mha.set_fastpath_enabled(False)``), so that the loss, the gradient and the products use the
      same kernels;
    * when ``model`` holds a recurrent layer (``nn.RNNBase``) on CUDA, cuDNN is disabled (``torch.backends.cudnn.
      enabled = False``): cuDNN RNNs have no double backward (and no backward in eval mode). Convolutions keep cuDNN
      otherwise, their backward is twice differentiable;
    * ``model``'s convolutions, eval-mode BatchNorm, GELU and SiLU layers run the same functions with a cheaper
      double backward (:func:`~lightning_hessian.probe_kernels.probe_layers`: on a ResNet-style CNN, one Hessian-vector
      product went from 2.4 to 2.0 gradients on CPU, on a Transformer LM from 2.05 to 1.8).

    The previous settings are restored on exit. The math kernels give the same values up to rounding.

    Args:
        model: Optional module whose layers to inspect (recurrent layers) and rewrite (convolutions, BatchNorm).

    Example::

        >>> import torch
        >>> q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
        >>> with probe_forward_context():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        ...     (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        ...     (hv,) = torch.autograd.grad(g, q, torch.ones_like(g))
        >>> hv.shape
        torch.Size([1, 2, 4, 8])
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
        if model is not None and torch.backends.cudnn.enabled and _has_cuda_rnn(model):
            torch.backends.cudnn.enabled = False
            stack.callback(setattr, torch.backends.cudnn, "enabled", True)
        if model is not None:
            stack.enter_context(probe_layers(model))
        yield


def _has_cuda_rnn(model: nn.Module) -> bool:
    return any(
        isinstance(m, nn.RNNBase) and any(p.is_cuda for p in m.parameters(recurse=False)) for m in model.modules()
    )


def _optimized_module_type() -> type | None:
    """``torch._dynamo.eval_frame.OptimizedModule`` if dynamo was imported (otherwise no module can be compiled)."""
    module = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(module, "OptimizedModule", None) if module is not None else None


def _original(module: nn.Module, optimized: type | None) -> nn.Module:
    while optimized is not None and isinstance(module, optimized):
        module = module._orig_mod
    return module


@contextlib.contextmanager
def uncompiled(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block with every ``torch.compile`` d submodule of ``model`` replaced by its original module.

    Compiled graphs (``OptimizedModule``, ``aot_autograd``) do not support double backward ("torch.compile with
    aot_autograd does not currently support double backward"), so Hessian-vector products must differentiate the
    eager module, which holds the same parameters and buffers. The context manager yields the module to call: the
    original of ``model`` if ``model`` itself is compiled, else ``model``. Inside, each compiled child is swapped
    in its parent's ``_modules`` for its ``_orig_mod`` (recursively, nested compilations included); every swap is
    undone on exit, also after an exception. Parameter names inside therefore lack the ``_orig_mod.`` infix.

    Args:
        model: A module, possibly compiled, possibly with compiled submodules.

    Yields:
        The eager module to use inside the block.

    Example::

        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> with uncompiled(net) as eager:
        ...     eager is net
        True
    """
    optimized = _optimized_module_type()
    root = _original(model, optimized)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    if optimized is not None:
        pending = [root]
        while pending:
            parent = pending.pop()
            for name, child in list(parent._modules.items()):
                if child is None:
                    continue
                if isinstance(child, optimized):
                    swaps.append((parent, name, child))
                    child = _original(child, optimized)
                    parent._modules[name] = child
                pending.append(child)
    try:
        yield root
    finally:
        for parent, name, child in reversed(swaps):
            parent._modules[name] = child


# --------------------------------------------------------------------------------------------------------------------
# memory estimate for cache_graph="auto"
# --------------------------------------------------------------------------------------------------------------------


class _SavedBytes:
    """Counts the distinct storages autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``)."""

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {_storage_key(t) for t in exclude}
        self._seen: dict[int, int] = {}

    def pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in self._exclude:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self._seen.values())

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, _identity)


def _identity(tensor: Tensor) -> Tensor:
    return tensor


def _storage_key(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. tensors without storage (functorch wrappers, sparse)
        return None


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor] = ()) -> tuple[Any, int]:
    """Run ``fn()`` and measure the bytes autograd saves for backward while it runs.

    Every tensor autograd saves passes through a pack hook (``torch.autograd.graph.saved_tensors_hooks``); the
    distinct storages are summed, except those of ``exclude`` (parameters, buffers, inputs: memory held anyway).
    When ``fn`` builds a gradient with ``create_graph=True`` this includes the tensors saved by the backward graph.

    Args:
        fn: The computation (a forward pass and, optionally, a ``create_graph`` gradient).
        exclude: Tensors whose storages are not counted.

    Returns:
        ``(fn(), bytes)``.

    Example::

        >>> import torch
        >>> x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
        >>> _, nbytes = saved_tensor_bytes(lambda: x.exp().sum(), exclude=[x])
        >>> nbytes  # exp saves its float64 result
        8000
    """
    counter = _SavedBytes(exclude)
    with counter.hooks():
        out = fn()
    return out, counter.total


class LossModule(nn.Module):
    """``loss_fn(model, batch)`` as a module, so that ``functional_call`` can substitute the model's tensors.

    Its state-dict keys are the model's with the prefix ``model.``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        """The mean loss of ``batch``."""
        return self.loss_fn(self.model, batch)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and restore every submodule's own ``training`` flag afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


Graph = tuple[float, tuple[Tensor | None, ...], list[Tensor]]


class HessianOperator:
    r"""Hessian of the probe loss w.r.t. the parameters that require grad, as a linear operator on a flat vector.

    The probe loss weights each batch by its sample count (see the module docstring). Under an initialised
    ``torch.distributed`` process group each rank passes its own batches; the sample counts are all-reduced once at
    construction and every :meth:`matvec` / :meth:`matmat` is all-reduced once, so every rank obtains the Hessian of
    the union of all ranks' samples. Without a process group there is no collective. Each collective carries a
    status: if the local work raises or (for products and the gradient) gives non-finite values on any rank, every
    rank raises :class:`~lightning_hessian.errors.ProbeProductError` (the local exception chained as its cause).

    Products run with the model in eval mode (restored afterwards), inside :func:`probe_forward_context` and
    :func:`uncompiled`, and never touch ``.grad`` (``torch.autograd.grad`` returns the products instead of
    accumulating) nor BatchNorm running statistics (eval mode). When ``dtype`` differs from the model's, the
    parameters and buffers are substituted functionally (``torch.func.functional_call``) by detached copies cast to
    ``dtype``; the model itself is never cast.

    Strategies (all exact; :attr:`strategy` tells which one runs):

    * ``"cached"``: the first product builds :math:`G = \sum_b n_b \nabla_\theta \ell_b` with ``create_graph=True``
      and keeps that graph; every product is then one backward pass through it, :math:`Hv = \nabla_\theta (G^\top
      v)`. Cheapest per product, memory of all probe batches' forward and backward graphs at once.
    * ``"double_backward"``: the same per batch, rebuilt for every product (one batch's graph alive at a time).
    * ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad`` of the functional loss (dual numbers
      through the forward and backward passes), no graph kept.

    ``cache_graph="auto"`` (default) measures, on the first product, the bytes autograd saves for one batch's forward
    and ``create_graph`` gradient (:func:`saved_tensor_bytes`), scales them by the local sample count, and caches iff
    that estimate is at most ``memory_fraction`` of :func:`available_memory`; otherwise it uses
    :data:`UNCACHED_STRATEGY`. ``True`` / ``False`` force caching / no caching, ``strategy=`` forces one strategy.
    The cache assumes the parameters do not change during the operator's life (true within one probe).

    Args:
        model: The network (compiled or with compiled submodules allowed); ``loss_fn`` receives its eager version.
        loss_fn: ``loss_fn(model, batch) -> Tensor``, the mean loss of one batch (a scalar).
        batches: This rank's probe batches (already on the model's device).
        dtype: Floating-point dtype of the products (``torch.float32`` or ``torch.float64``); ``None`` takes the
            parameters' dtype. Floating tensors of the batches are cast to it.
        params: Subset of the model's parameters to differentiate; default all that require grad.
        cache_graph: ``"auto"``, ``True`` or ``False`` (see above).
        strategy: One of :data:`STRATEGIES` to force it; ``None`` derives it from ``cache_graph``.
        batch_size_fn: ``batch -> int`` sample count of a batch; default :func:`batch_size`.
        memory_fraction: Share of the free memory the cache may use under ``cache_graph="auto"``, in ``(0, 1]``.

    Raises:
        ValueError: If there are no batches, no trainable parameters, or an invalid ``dtype``, ``cache_graph``,
            ``strategy`` or ``memory_fraction``.
        ProbeProductError: If counting the samples fails on any rank.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(3, 1).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        >>> op = HessianOperator(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), [(x, y)])
        >>> op.num_params
        4
        >>> op.matmat(torch.eye(4, dtype=torch.float64)).shape
        torch.Size([4, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        *,
        dtype: torch.dtype | None = None,
        params: Sequence[nn.Parameter] | None = None,
        cache_graph: bool | Literal["auto"] = "auto",
        strategy: Strategy | None = None,
        batch_size_fn: Callable[[Any], int] | None = None,
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    ) -> None:
        if cache_graph not in (True, False, "auto"):
            raise ValueError(f"cache_graph must be True, False or 'auto', got {cache_graph!r}")
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
        if isinstance(memory_fraction, bool) or not 0 < float(memory_fraction) <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        batches = list(batches)
        with uncompiled(model) as root:
            named = [(name, p) for name, p in root.named_parameters() if p.requires_grad]
            floating = [t for t in (*root.parameters(), *root.buffers()) if t.is_floating_point()]
        if params is not None:
            wanted = {id(p) for p in params}
            named = [(name, p) for name, p in named if id(p) in wanted]
        if not named:
            raise ValueError("the model has no parameters that require grad: nothing to differentiate")
        if dtype is None:
            dtype = named[0][1].dtype
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (or None), got {dtype}")
        self.model = model
        self.loss_fn = loss_fn
        self.dtype = dtype
        self.device = named[0][1].device
        self.param_names = [name for name, _ in named]
        self.param_shapes = [p.shape for _, p in named]
        self.num_params = sum(p.numel() for _, p in named)
        self.num_products = 0
        self.cache_graph = cache_graph
        self.memory_fraction = float(memory_fraction)
        #: Bytes the cached graphs were estimated to take (``cache_graph="auto"``, after the decision), else None.
        self.memory_estimate: int | None = None
        #: Bytes :func:`available_memory` reported when deciding, else None.
        self.memory_available: int | None = None
        if strategy is None and cache_graph != "auto":
            strategy = "cached" if cache_graph else UNCACHED_STRATEGY
        self._strategy: str | None = strategy
        self._wrapper = LossModule(model, loss_fn)
        self._params = named
        self._graphs: list[Graph] | None = None
        self._batched_grads = True  # is_grads_batched / vmap work on this model (else a loop over columns)
        self._direct = all(t.dtype == dtype for t in floating)  # no cast needed: differentiate the model itself
        count = batch_size if batch_size_fn is None else batch_size_fn
        cast: list[Any] = []
        counts: list[float] = []

        def local_count() -> Tensor:
            cast.extend(cast_batch(b, dtype=dtype) for b in batches)
            for b in cast:
                n = count(b)
                if isinstance(n, bool) or int(n) != n or n < 0:
                    raise ValueError(f"batch_size_fn must return a non-negative integer, got {n!r}")
                counts.append(float(n))
            return torch.tensor([sum(counts)], dtype=torch.float64)

        like = torch.zeros((), dtype=torch.float64, device=self.device)
        total = float(_agreed_sum(local_count, 1, "counting the probe samples", like=like)[0])
        if total <= 0:
            raise ValueError("the probe set is empty on every rank: pass at least one batch with one sample")
        self.num_samples = int(round(total))
        self._batches = cast
        self._local_counts = torch.tensor(counts or [0.0], dtype=torch.float64)

    @property
    def local_samples(self) -> int:
        """Samples of this rank's probe batches (``num_samples`` is the sum over ranks)."""
        return int(round(float(self._local_counts.sum())))

    # ---------------------------------------------------------------------------------------------------- strategy

    @property
    def strategy(self) -> str:
        """The HVP strategy in use (one of :data:`STRATEGIES`); under ``"auto"`` this runs the memory decision."""
        if self._strategy is None:
            with self._context():
                self._decide()
        assert self._strategy is not None
        return self._strategy

    def _decide(self) -> None:
        """``cache_graph="auto"``: build the cache if its measured size fits, else pick :data:`UNCACHED_STRATEGY`."""
        live = list(self._live_batches())
        if not live:
            self._strategy = "cached"  # nothing to hold
            self._graphs = []
            return
        batch, count = live[0]
        held = [p for _, p in self._params] + list(self.model.parameters()) + list(self.model.buffers())
        held += [t for t in _tensors_in(batch)]
        state = None if self._direct else self._tensors()

        def first_graph() -> Graph:
            return next(self._per_batch_graphs(live[:1], state))

        first, nbytes = saved_tensor_bytes(first_graph, exclude=held)
        local_samples = float(self.local_samples)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.memory_estimate = int(nbytes * local_samples / count + 2 * self.num_params * itemsize)
        self.memory_available = available_memory(self.device)
        if self.memory_estimate <= self.memory_fraction * self.memory_available:
            self._strategy = "cached"
            self._build_cache(first, state)
        else:
            self._strategy = UNCACHED_STRATEGY

    def _build_cache(
        self, first: Graph | None = None, state: tuple[dict[str, Tensor], list[Tensor]] | None = None
    ) -> list[Graph]:
        r"""One combined graph :math:`\sum_b n_b g_b`: every later product is a single backward call."""
        combined: list[Tensor | None] | None = None
        leaves: list[Tensor] = []
        live = list(self._live_batches())
        pending: Iterable[Graph] = self._per_batch_graphs(live[1:] if first is not None else live, state)
        if first is not None:
            pending = [first, *pending]
        for count, grads, batch_leaves in pending:
            leaves = batch_leaves  # the same leaves for every batch
            weighted = [None if g is None else count * g for g in grads]
            if combined is None:
                combined = weighted
            else:
                combined = [a if b is None else b if a is None else a + b for a, b in zip(combined, weighted)]
        self._graphs = [] if combined is None else [(1.0, tuple(combined), leaves)]
        return self._graphs

    # ------------------------------------------------------------------------------------------------- internals

    def _tensors(self) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Detached copies of the parameters (requiring grad) and buffers in ``self.dtype``, keyed for the wrapper."""
        params = {name: p.detach().to(self.dtype).requires_grad_(True) for name, p in self._params}
        tensors: dict[str, Tensor] = {f"model.{name}": t for name, t in params.items()}
        with uncompiled(self.model) as root:
            frozen = [(name, t) for name, t in root.named_parameters() if name not in params]
            buffers = list(root.named_buffers())
        for name, t in (*frozen, *buffers):
            tensors[f"model.{name}"] = t.detach().to(self.dtype).clone() if t.is_floating_point() else t.clone()
        return tensors, list(params.values())

    @staticmethod
    def _checked(loss: Any) -> Tensor:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}"
            )
        return loss.reshape(())

    def _batch_losses(
        self,
        live: Iterable[tuple[Any, float]] | None = None,
        state: tuple[dict[str, Tensor], list[Tensor]] | None = None,
    ) -> Iterator[tuple[float, Tensor, list[Tensor]]]:
        """``(sample count, mean loss, differentiation leaves)`` per local batch, evaluated lazily.

        ``state`` is a :meth:`_tensors` result to reuse (the same leaves across calls) in the cast path.
        """
        live = self._live_batches() if live is None else live
        if self._direct:
            leaves = [p for _, p in self._params]
            root = _original(self.model, _optimized_module_type())
            for batch, count in live:
                yield count, self._checked(self.loss_fn(root, batch)), leaves
            return
        tensors, leaves = self._tensors() if state is None else state
        for batch, count in live:
            yield count, self._checked(functional_call(self._wrapper, tensors, (batch,), strict=False)), leaves

    def _per_batch_graphs(
        self,
        live: Iterable[tuple[Any, float]] | None = None,
        state: tuple[dict[str, Tensor], list[Tensor]] | None = None,
    ) -> Iterator[Graph]:
        for count, loss, leaves in self._batch_losses(live, state):
            yield count, torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True), leaves

    def _live_batches(self) -> Iterator[tuple[Any, float]]:
        return ((b, c) for b, c in zip(self._batches, self._local_counts.tolist()) if c > 0)

    @staticmethod
    def _dense(grads: Sequence[Tensor | None], leaves: Sequence[Tensor], batch: int | None = None) -> list[Tensor]:
        """Replace the ``None`` gradients of unused parameters by zeros (with a leading ``batch`` dimension)."""
        if batch is None:
            return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]
        return [p.new_zeros((batch, *p.shape)) if g is None else g for g, p in zip(grads, leaves)]

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with (
            evaluation_mode(self.model),
            uncompiled(self.model),
            probe_forward_context(self.model),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            yield

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate per-parameter tensors into one flat vector (the operator's coordinate order)."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Split a flat vector into per-parameter tensors shaped like the parameters."""
        sizes = [int(torch.Size(s).numel()) for s in self.param_shapes]
        return [chunk.view(shape) for chunk, shape in zip(vector.split(sizes), self.param_shapes)]

    def _unflatten_rows(self, rows: Tensor) -> list[Tensor]:
        """Split ``(b, n)`` rows into per-parameter ``(b, *shape)`` tensors."""
        sizes = [int(torch.Size(s).numel()) for s in self.param_shapes]
        b = rows.shape[0]
        return [chunk.reshape(b, *shape) for chunk, shape in zip(rows.split(sizes, dim=1), self.param_shapes)]

    def _flatten_rows(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)

    # -------------------------------------------------------------------------------------------------- products

    def _backward_products(self, graphs: Iterable[Graph], rows: Tensor, batched: bool, retain: bool) -> Tensor:
        """``sum_b n_b d(g_b . v)/dtheta`` for each row ``v`` of ``rows``, through gradient graphs."""
        b = rows.shape[0]
        pieces = self._unflatten_rows(rows) if batched else self.unflatten(rows[0])
        out = torch.zeros_like(rows)
        for count, grads, leaves in graphs:
            live = [(g, v) for g, v in zip(grads, pieces) if g is not None and g.requires_grad]
            if not live:
                continue
            products = torch.autograd.grad(
                [g for g, _ in live],
                leaves,
                grad_outputs=[v for _, v in live],
                retain_graph=retain,
                allow_unused=True,
                is_grads_batched=batched,
            )
            if batched:
                out += count * self._flatten_rows(self._dense(products, leaves, b))
            else:
                out[0] += count * self.flatten(self._dense(products, leaves))
        return out

    def _forward_over_reverse(self, rows: Tensor, batched: bool) -> Tensor:
        """``sum_b n_b`` (jvp of grad of ``l_b``) along each row, with ``torch.func``."""
        tensors, leaves = self._tensors()
        keys = [f"model.{name}" for name in self.param_names]
        primals = tuple(t.detach() for t in leaves)
        tangents = tuple(self._unflatten_rows(rows)) if batched else tuple(self.unflatten(rows[0]))
        out = torch.zeros_like(rows)
        for batch, count in self._live_batches():

            def loss_of(*params: Tensor, batch: Any = batch) -> Tensor:
                return self._checked(
                    functional_call(self._wrapper, {**tensors, **dict(zip(keys, params))}, (batch,), strict=False)
                )

            grad = torch.func.grad(loss_of, argnums=tuple(range(len(keys))))

            def hvp(*vs: Tensor, grad: Callable = grad) -> tuple[Tensor, ...]:
                return torch.func.jvp(grad, primals, vs)[1]

            if batched:
                out += count * self._flatten_rows(torch.func.vmap(hvp)(*tangents))
            else:
                out[0] += count * self.flatten(hvp(*tangents))
        return out

    def _local_products(self, rows: Tensor, batched: bool) -> Tensor:
        """Un-normalised local products ``sum_b n_b H_b v`` for each row ``v``."""
        strategy = self.strategy
        if strategy == "forward_over_reverse":
            return self._forward_over_reverse(rows, batched)
        if strategy == "cached":
            graphs = self._graphs if self._graphs is not None else self._build_cache()
            return self._backward_products(graphs, rows, batched, retain=True)
        return self._backward_products(self._per_batch_graphs(), rows, batched, retain=False)

    def _products(self, rows: Tensor) -> Tensor:
        """Local products of ``(b, n)`` rows: batched when ``b > 1`` (loop over rows if batching is unsupported)."""
        if rows.shape[0] == 1:
            return self._local_products(rows, batched=False)
        if self._batched_grads:
            try:
                return self._local_products(rows, batched=True)
            except RuntimeError:
                # an op without a batching rule; retry row by row (which re-raises a genuine error)
                self._batched_grads = False
        return torch.cat([self._local_products(row[None], batched=False) for row in rows])

    def _prepare(self, block: Tensor) -> Tensor:
        # clone: the caller may hold an inference-mode tensor, which autograd cannot save
        return block.to(device=self.device, dtype=self.dtype).clone()

    def matvec(self, vector: Tensor) -> Tensor:
        """Hessian-vector product :math:`Hv` of the global probe loss (one all-reduce under DDP).

        Args:
            vector: Flat vector of length :attr:`num_params`.

        Returns:
            :math:`Hv`, flat, in :attr:`dtype` on the model's device.

        Raises:
            ValueError: If ``vector`` has the wrong length.
            ProbeProductError: On every rank, if the product raised or was not finite on any rank.
        """
        if vector.numel() != self.num_params:
            raise ValueError(f"vector has {vector.numel()} entries, the operator acts on {self.num_params}")
        self.num_products += 1
        what = f"Hessian-vector product #{self.num_products} ({self._strategy or 'auto'})"
        with self._context():
            rows = self._prepare(vector.reshape(1, -1))
            out = _agreed_sum(lambda: self._products(rows), self.num_params, what, like=rows)
            return out.div_(self.num_samples)

    __matmul__ = matvec

    def matmat(self, block: Tensor) -> Tensor:
        """Block product :math:`HV` for ``V`` of shape ``(num_params, b)``, with one all-reduce for the whole block.

        The ``b`` products share one backward call (``torch.autograd.grad(..., is_grads_batched=True)`` through the
        gradient graphs, or ``torch.func.vmap`` over forward-over-reverse products), which is cheaper per product
        than ``b`` calls of :meth:`matvec` when kernel launches and Python overhead matter. :attr:`num_products`
        grows by ``b``.

        Args:
            block: ``(num_params, b)`` tensor (a 1-D vector is treated as ``b = 1``).

        Returns:
            ``(num_params, b)`` tensor :math:`HV` in :attr:`dtype` on the model's device.

        Raises:
            ValueError: If ``block`` does not have ``num_params`` rows or has no column.
            ProbeProductError: On every rank, if a product raised or was not finite on any rank.
        """
        if block.dim() == 1:
            block = block[:, None]
        if block.dim() != 2 or block.shape[0] != self.num_params or block.shape[1] < 1:
            raise ValueError(f"block must have shape (num_params={self.num_params}, b >= 1), got {tuple(block.shape)}")
        b = block.shape[1]
        first = self.num_products + 1
        self.num_products += b
        what = f"Hessian-vector products #{first}-{first + b - 1} (block of {b}, {self._strategy or 'auto'})"
        with self._context():
            rows = self._prepare(block.T)
            out = _agreed_sum(lambda: self._products(rows), b * self.num_params, what, like=rows)
            return out.view(b, self.num_params).T.div(self.num_samples)

    def gradient(self) -> Tensor:
        """Gradient of the global probe loss (flat, all-reduced); does not count as a product.

        Raises:
            ProbeProductError: On every rank, if it raised or was not finite on any rank.
        """

        def local() -> Tensor:
            out = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
            if self._graphs is not None:
                for count, grads, leaves in self._graphs:
                    out += count * self.flatten(self._dense([None if g is None else g.detach() for g in grads], leaves))
            else:
                for count, loss, leaves in self._batch_losses():
                    out += count * self.flatten(
                        self._dense(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)
                    )
            return out

        with self._context():
            like = torch.zeros((), dtype=self.dtype, device=self.device)
            return _agreed_sum(local, self.num_params, "the probe gradient", like=like).div_(self.num_samples)

    def loss(self) -> float:
        r"""Global probe loss :math:`L(\theta)` (all-reduced; non-finite values are returned as they are).

        Raises:
            ProbeProductError: On every rank, if ``loss_fn`` raised on any rank.
        """

        def local() -> Tensor:
            total = torch.zeros(1, dtype=self.dtype, device=self.device)
            for count, loss, _ in self._batch_losses():
                total += count * loss.detach()
            return total

        with self._context(), torch.no_grad():
            like = torch.zeros((), dtype=self.dtype, device=self.device)
            total = _agreed_sum(local, 1, "the probe loss", like=like, check_finite=False)
            return float(total.item() / self.num_samples)

    def dense(self) -> Tensor:
        """Dense Hessian built column by column from :math:`n` products (for tests and tiny models only)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(e) for e in eye], dim=1)


def _tensors_in(batch: Any) -> Iterator[Tensor]:
    """Every tensor of a (nested) batch."""
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors_in(value)
    elif _is_dataclass_instance(batch):
        for field in dataclasses.fields(batch):
            yield from _tensors_in(getattr(batch, field.name))
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes, bytearray)):
        for item in batch:
            yield from _tensors_in(item)
