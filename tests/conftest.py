"""Shared test set-up.

TRITON_INTERPRET must be set before any @triton.jit kernel runs, so it is set here, before the
test modules import nit_kernels. Tests marked `gpu` skip cleanly without a CUDA device.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("NIT_KERNELS_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
