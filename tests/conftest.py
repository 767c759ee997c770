"""Shared pytest fixtures."""

import pytest
import threadpoolctl
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """Every test on one intra-op thread.

    Tiny models and dense linear algebra run several times faster than with two threads spin-waiting on an
    oversubscribed 2-core machine (measured: a tiny HVP 16 ms with 2 threads, 1.1 ms with 1).
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(1):
        yield
    torch.set_num_threads(old)
