"""Real 2-process gloo runs: a failure on one rank raises ProbeProductError on every rank, and nothing hangs."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_hessian.errors import ProbeProductError
from lightning_hessian.operators import HessianOperator
from tests.cases import make_case

TIMEOUT_S = 60
FAIL_AT = 3  # the product (1-based) that fails on rank 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _faulty_loss(base, rank: int, mode: str):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = base(model, batch)
        if rank == 1 and calls["n"] == FAIL_AT:  # one batch per rank and product: call k is product k
            if mode == "raise":
                raise ArithmeticError("injected failure")
            return loss * float("nan")
        return loss

    return loss_fn


MODES = {  # mode: (words in the message, exception class chained on rank 1)
    "raise": (f"product #{FAIL_AT}", "ArithmeticError"),
    "nan": (f"product #{FAIL_AT}", "FloatingPointError"),  # non-finite values are chained as one
    "matmat": (f"products #{2 * FAIL_AT - 1}-{2 * FAIL_AT}", "ArithmeticError"),
    "count": ("counting the probe samples", "ValueError"),
    "loss": ("probe loss", "ArithmeticError"),
    "gradient": ("probe gradient", "FloatingPointError"),
}


def _one_mode(rank: int, mode: str) -> dict:
    outcome: dict = {}
    model, base, batches = make_case("relu_ce", seed=3)
    local = [batches[rank]]
    try:
        if mode == "count":
            HessianOperator(model, base, [{"no": "tensor"}] if rank == 1 else local)
        elif mode in ("raise", "nan"):
            op = HessianOperator(model, _faulty_loss(base, rank, mode), local, strategy="double_backward")
            for _ in range(FAIL_AT + 1):
                op.matvec(torch.ones(op.num_params, dtype=torch.float64))
                outcome["products"] = op.num_products
        elif mode == "matmat":
            op = HessianOperator(model, _faulty_loss(base, rank, "raise"), local, strategy="double_backward")
            for _ in range(FAIL_AT + 1):
                op.matmat(torch.ones(op.num_params, 2, dtype=torch.float64))
        elif mode == "loss":
            op = HessianOperator(model, _faulty_loss(base, rank, "raise"), local, cache_graph=False)
            for _ in range(FAIL_AT + 1):
                op.loss()
        elif mode == "gradient":
            op = HessianOperator(model, _faulty_loss(base, rank, "nan"), local, cache_graph=False)
            for _ in range(FAIL_AT + 1):
                op.gradient()
    except ProbeProductError as exc:
        outcome["error"] = str(exc)
        outcome["cause"] = type(exc.__cause__).__name__ if exc.__cause__ is not None else None
    check = torch.ones(1)
    dist.all_reduce(check)  # the group is still usable after the failure
    outcome["after"] = float(check)
    return outcome


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        outcomes = {mode: _one_mode(rank, mode) for mode in MODES}
        torch.save(outcomes, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_failure_on_one_rank_raises_on_every_rank(tmp_path):
    """Each mode in turn, in one process group: exception / NaN in the k-th product (matvec and matmat) on rank 1,
    a batch without a tensor at construction, an exception in ``loss()``, a NaN gradient."""
    context = mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks hung for {TIMEOUT_S} s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for mode, (what, cause1) in MODES.items():
        for outcome in (ranks[0][mode], ranks[1][mode]):
            assert "error" in outcome, (mode, outcome)
            assert what in outcome["error"] and "1 of 2 rank(s)" in outcome["error"], outcome["error"]
            assert outcome["after"] == 2.0
        assert "another rank is the cause" in ranks[0][mode]["error"] and ranks[0][mode]["cause"] is None, mode
        assert ranks[1][mode]["cause"] == cause1, mode
    for mode in ("raise", "nan"):
        assert ranks[0][mode]["products"] == ranks[1][mode]["products"] == FAIL_AT - 1
