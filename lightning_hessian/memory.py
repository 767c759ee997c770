"""Memory budgets for Krylov bases: how many bytes a solver may hold, and the error when even the minimum won't fit.

No Lightning import.
"""

from __future__ import annotations

import torch

__all__ = ["BasisMemoryError", "available_memory", "default_basis_budget"]

#: Fraction of the available memory a Krylov basis may take by default, and the absolute cap of that default.
DEFAULT_FRACTION = 0.25
DEFAULT_CAP_BYTES = 32 * 2**30


class BasisMemoryError(MemoryError, ValueError):
    """The Krylov basis needed for the requested eigenpairs does not fit in ``max_basis_bytes``.

    Subclasses both ``MemoryError`` and ``ValueError`` (it is raised before anything is allocated, for an
    argument combination that cannot work).
    """


def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes available for new allocations on ``device``.

    CUDA: free bytes reported by ``torch.cuda.mem_get_info`` plus what PyTorch's caching allocator holds but does not
    use. CPU: ``psutil.virtual_memory().available``, else ``MemAvailable`` of ``/proc/meminfo``, else 8 GiB.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is a dependency of the dev environment only
        pass
    try:  # pragma: no cover
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover
        pass
    return 8 * 2**30  # pragma: no cover


def default_basis_budget(device: torch.device | str | None = None) -> int:
    """Default ``max_basis_bytes``: 25% of :func:`available_memory`, capped at 32 GiB."""
    return int(min(DEFAULT_FRACTION * available_memory(device), DEFAULT_CAP_BYTES))
