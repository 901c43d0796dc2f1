"""Fixtures shared by the model tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny shapes: a second OpenMP thread only adds
    synchronisation (and stalls on a busy machine). Use with ``pytestmark = pytest.mark.usefixtures``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
