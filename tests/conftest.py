"""Shared test set-up.

The Triton kernels run compiled on a CUDA machine and under the Triton interpreter
(TRITON_INTERPRET=1, on CPU tensors) where there is none. The choice must be made before any
@triton.jit kernel is decorated, i.e. here, before the test modules import nit_kernels: an
explicit TRITON_INTERPRET in the environment wins; otherwise the interpreter is switched on only
when torch sees no CUDA device. torch.cuda.is_available() answers without creating a CUDA context
(and is simply False on a CPU-only torch), so collection on a CPU machine stays device-free.
Tests marked `gpu` skip cleanly without a CUDA device.
"""
import hashlib
import os
import pathlib
import tempfile

import torch


def _inductor_cache_dir() -> str:
    """A torch.compile cache keyed on this checkout's op code.

    Inductor's caches key compiled graphs on the traced graph, not on the Python autograd
    formulas or the C++ kernels behind an op name, so a cache shared with another version of
    these ops (another checkout, an older build) can hand back a backward built for a different
    op contract and give wrong gradients. Tests therefore compile into a cache of their own.
    """
    root = pathlib.Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted([*root.glob("nit_kernels/**/*.py"), *root.glob("csrc/**/*.*")]):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return os.path.join(tempfile.gettempdir(), f"nit-test-inductor-{h.hexdigest()[:16]}")


os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_dir())

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
