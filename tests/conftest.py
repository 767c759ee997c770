"""Shared pytest fixtures."""

import pytest
import threadpoolctl
import torch


@pytest.fixture
def single_thread():
    """Dense linear algebra on one thread: multi-threaded BLAS spin-waits badly on an oversubscribed 2-core box."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpoolctl.threadpool_limits(1):
        yield
    torch.set_num_threads(old)
