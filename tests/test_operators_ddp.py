"""Real 2-process DDP (gloo, CPU): all-reduced HVPs equal the single-process Hessian of the union of the data."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_hessian import HessianOperator, hessian_eigenvalues, hutchinson_trace, stochastic_lanczos_quadrature
from tests.cases import make_case

K = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shard(batches, rank):
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if rank == 0:  # two unequal batches: 20 samples
        return [(x[:7], y[:7]), (x[7:20], y[7:20])]
    return [(x[20:], y[20:])]  # one batch: 28 samples


def _worker(rank, world_size, port, out_dir, case):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model, loss_fn, batches = make_case(case, seed=3)
        local = _shard(batches, rank)
        eigenvalues = hessian_eigenvalues(model, loss_fn, local, k=K)
        operator = HessianOperator(model, loss_fn, local)
        trace = hutchinson_trace(operator.matvec, operator.num_params, num_samples=4, seed=1)
        quad = stochastic_lanczos_quadrature(operator.matvec, operator.num_params, num_probes=2, num_steps=10)
        torch.save(
            {
                "eigenvalues": eigenvalues,
                "loss": operator.loss(),
                "gradient": operator.gradient(),
                "trace": trace.value,
                "nodes": quad.nodes,
                "samples": operator.num_samples,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["relu_ce", "bn_tanh_ce"])
def test_two_process_gloo_matches_single_process_union(tmp_path, case):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), case), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model, loss_fn, batches = make_case(case, seed=3)
    union = _shard(batches, 0) + _shard(batches, 1)
    expected = hessian_eigenvalues(model, loss_fn, union, k=K)
    operator = HessianOperator(model, loss_fn, union)
    trace = hutchinson_trace(operator.matvec, operator.num_params, num_samples=4, seed=1)
    quad = stochastic_lanczos_quadrature(operator.matvec, operator.num_params, num_probes=2, num_steps=10)
    for result in ranks:
        assert result["samples"] == 48
        torch.testing.assert_close(result["eigenvalues"], expected, rtol=1e-6, atol=0)
        assert ((result["eigenvalues"] - expected).abs() / expected.abs()).max() < 1e-10
        assert result["loss"] == pytest.approx(operator.loss(), rel=1e-12)
        torch.testing.assert_close(result["gradient"], operator.gradient(), rtol=1e-10, atol=1e-13)
        assert result["trace"] == pytest.approx(trace.value, rel=1e-10)
        torch.testing.assert_close(result["nodes"], quad.nodes, rtol=1e-8, atol=1e-10)
    # every rank holds bit-identical results
    assert torch.equal(ranks[0]["eigenvalues"], ranks[1]["eigenvalues"])
    assert torch.equal(ranks[0]["nodes"], ranks[1]["nodes"])
