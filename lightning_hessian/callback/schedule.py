"""When :class:`~lightning_hessian.callback.HessianSpectrum` probes, and which kind of probe it runs.

The schedule counts the calls of the probing hook and the probes run. A probe runs on every ``every_n_epochs``-th
call; every ``full_every``-th probe, starting with the first, is *full* (power-law test, density), the others are
*cheap*. Outside fitting (``trainer.validate()``) every probe is full. The overhead guard (``max_overhead``) skips a
scheduled probe while the probes' cumulative time exceeds ``max_overhead`` times the training time.

The counters change only when a call is committed (:meth:`ProbeSchedule.commit`), after its probe has finished: a
checkpoint taken during a probe records the state before it, so a resumed run repeats that probe and keeps the
schedule of an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["INIT_FREE_SECONDS", "ProbeKind", "ProbeSchedule", "plan_init_probe"]

ProbeKind = Literal["full", "cheap"]

#: Under the overhead guard, a probe at initialisation estimated at most this many seconds always runs in full.
INIT_FREE_SECONDS = 60.0


def plan_init_probe(
    full_seconds: float,
    cheap_seconds: float,
    fit_seconds: float,
    max_overhead: float,
    free_seconds: float = INIT_FREE_SECONDS,
) -> ProbeKind | None:
    """Kind of the probe at initialisation under the overhead guard, from estimates taken before any training.

    The probe may take ``allowed = max(free_seconds, max_overhead * fit_seconds)``: it runs in full when
    ``full_seconds <= allowed``, as a cheap probe when ``cheap_seconds <= allowed``, else not at all. A fit of unknown
    length (``fit_seconds = inf``) allows the full probe.

    Args:
        full_seconds: estimated seconds of a full probe.
        cheap_seconds: estimated seconds of a cheap probe.
        fit_seconds: estimated training seconds of the whole fit (``inf`` if unbounded or unknown).
        max_overhead: the guard's share of the training time.
        free_seconds: a probe at most this long always runs.

    Returns:
        ``"full"``, ``"cheap"`` or ``None`` (skip the probe at initialisation).

    Example::

        >>> plan_init_probe(900.0, 45.0, 4_300.0, 0.2)
        'cheap'
        >>> plan_init_probe(900.0, 45.0, 10_000.0, 0.2)
        'full'
        >>> plan_init_probe(1_800.0, 90.0, 4.0, 0.2) is None
        True
    """
    allowed = max(free_seconds, max_overhead * fit_seconds)
    if full_seconds <= allowed:
        return "full"
    return "cheap" if cheap_seconds <= allowed else None


@dataclass
class ProbeSchedule:
    """Call and probe counters, the full/cheap decision and the overhead guard.

    Attributes:
        every_n_epochs: probe on every n-th call of the hook.
        full_every: every this many probes is a full probe (``None``: never).
        max_overhead: overhead guard (``None``: off).
        calls: committed calls of the hook.
        num_probes: committed probes.
        probe_seconds: wall time of the committed probes.
        train_seconds: training time between hooks (probes excluded).
        init_done: whether the probe at initialisation ran. It is the first full probe of the schedule: it counts in
            ``num_probes`` (so the epoch-0 probe is cheap, the next full one is the ``full_every``-th probe) and its
            time in ``probe_seconds`` (so the overhead guard sees it).
    """

    every_n_epochs: int
    full_every: int | None
    max_overhead: float | None = None
    calls: int = 0
    num_probes: int = 0
    probe_seconds: float = 0.0
    train_seconds: float = 0.0
    init_done: bool = False
    _last_hook_end: float | None = None

    def training_started(self) -> None:
        """Start the training clock (``on_train_start``)."""
        self._last_hook_end = time.perf_counter()

    def hook_started(self) -> None:
        """Add the training time since the previous hook."""
        now = time.perf_counter()
        if self._last_hook_end is not None:
            self.train_seconds += now - self._last_hook_end
        self._last_hook_end = now

    def hook_ended(self) -> None:
        """Restart the training clock after the hook (its probe excluded)."""
        self._last_hook_end = time.perf_counter()

    def over_budget(self) -> bool:
        """Whether the overhead guard asks to skip the next probe (never the first epoch probe)."""
        if self.max_overhead is None or self.num_probes <= int(self.init_done):
            return False  # the first epoch probe always runs, so every key is logged from the first epoch on
        return self.probe_seconds > self.max_overhead * self.train_seconds

    def plan(self, fitting: bool, agree: Callable[[bool], bool] = bool) -> ProbeKind | None:
        """The probe this call runs, without changing any counter.

        Args:
            fitting: whether the trainer is fitting (outside fitting every probe is full and the guard is off).
            agree: logical OR over ranks, so every rank takes the same decision.

        Returns:
            ``"full"``, ``"cheap"`` or ``None`` (no probe on this call).
        """
        if self.calls % self.every_n_epochs:
            return None
        if fitting and agree(self.over_budget()):
            return None
        if self.full_every is not None and (self.num_probes % self.full_every == 0 or not fitting):
            return "full"
        return "cheap"

    def commit(self, kind: ProbeKind | None, seconds: float = 0.0) -> None:
        """Count this call (and its probe, if one ran)."""
        self.calls += 1
        if kind is not None:
            self.num_probes += 1
            self.probe_seconds += seconds

    def commit_init(self, seconds: float) -> None:
        """Record the probe at initialisation (after it finished) as the schedule's first (full) probe."""
        self.init_done = True
        self.num_probes += 1
        self.probe_seconds += seconds

    def state_dict(self) -> dict[str, Any]:
        """Counters for a checkpoint."""
        return {
            "calls": self.calls,
            "num_probes": self.num_probes,
            "probe_seconds": self.probe_seconds,
            "train_seconds": self.train_seconds,
            "init_done": self.init_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self.calls = int(state.get("calls", 0))
        self.num_probes = int(state.get("num_probes", 0))
        self.probe_seconds = float(state.get("probe_seconds", 0.0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        # checkpoints older than the probe at initialisation: a run that already probed must not probe "at init"
        self.init_done = bool(state.get("init_done", self.calls > 0 or self.num_probes > 0))
