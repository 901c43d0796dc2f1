"""Shared test set-up.

The Triton kernels run compiled on a CUDA machine and under the Triton interpreter
(TRITON_INTERPRET=1, on CPU tensors) where there is none. The choice must be made before any
@triton.jit kernel is decorated, i.e. here, before the test modules import nit_kernels: an
explicit TRITON_INTERPRET in the environment wins; otherwise the interpreter is switched on only
when torch sees no CUDA device. torch.cuda.is_available() answers without creating a CUDA context
(and is simply False on a CPU-only torch), so collection on a CPU machine stays device-free.
Tests marked `gpu` skip cleanly without a CUDA device.
"""
import os

import torch

os.environ["NIT_TEST_TRITON_INTERPRET_ASKED"] = "1" if os.environ.get("TRITON_INTERPRET") == "1" else "0"
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("NIT_KERNELS_BACKEND", None)  # tests choose backends explicitly

import pytest  # noqa: E402


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
