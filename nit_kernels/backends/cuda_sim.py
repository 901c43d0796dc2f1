"""The ``cuda_sim`` test backend: the CUDA kernels of csrc/cuda run on CPU tensors in the SIMT
simulator of csrc/sim, through the same torch glue (argument checks included) as ``cuda``.

It is never chosen automatically; ask for it with ``backend="cuda_sim"``. Every call runs under
the simulator's checks (barrier, shuffle mask, WMMA rules, launch limits, initcheck, racecheck:
see csrc/sim/runtime.h and csrc/sim/glue_hooks.h); a failed check raises RuntimeError naming it.

Built just in time on first use, from the csrc/ next to this package or from the folder named by
``NIT_CUDA_SIM_CSRC`` (a test builds mutated copies that way), cached by content under
``NIT_CUDA_SIM_BUILD`` (default ~/.cache/nit_kernels/cuda_sim):
  - the kernels and the simulator: one plain g++ object per .cu / runtime.cpp (no torch headers,
    a few seconds each), linked into libnit_cuda_sim_<hash>.so and loaded RTLD_GLOBAL;
  - the glue: csrc/cuda/*_glue.cpp as one translation unit against torch (the slow one, ~40 s),
    keyed by the glue's own sources only, so a mutated kernel reuses it.
The ops are registered as ``nit_sim::<op>`` with the schemas of csrc/registration.cpp and the
fakes and autograd of the op contracts (nit_kernels/_autograd.py). Environment:
NIT_CUDA_SIM_ARCH=80|90 (limits of sm_80, default, or sm_90), NIT_CUDA_SIM_RACECHECK=0 (one run
per call instead of two).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Optional

import torch

from .. import _autograd
from ..dispatch import Call
from . import cuda

NAMESPACE = "nit_sim"
_PACKAGE_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_lock = threading.Lock()
_OPS: Optional[dict] = None
_lib_def = None  # the torch.library.Library holding the nit_sim schemas (kept alive)


def csrc_dir() -> Path:
    return Path(os.environ.get("NIT_CUDA_SIM_CSRC") or _PACKAGE_CSRC)


def build_dir() -> Path:
    return Path(os.environ.get("NIT_CUDA_SIM_BUILD") or Path.home() / ".cache" / "nit_kernels" / "cuda_sim")


def cuda_include() -> Optional[Path]:
    """The toolkit include folder holding cuda_fp16.h and cuda_bf16.h (host paths), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for r in roots:
        if r and all((Path(r) / "include" / h).exists() for h in ("cuda_fp16.h", "cuda_bf16.h", "cuda_runtime.h")):
            return Path(r) / "include"
    return None


def load_error() -> Optional[str]:
    """Why cuda_sim cannot be built here (cheap: nothing is compiled)."""
    if shutil.which("g++") is None:
        return "cuda_sim needs g++ to build the CUDA kernels for the host"
    if cuda_include() is None:
        return ("cuda_sim needs the CUDA toolkit headers cuda_fp16.h, cuda_bf16.h, cuda_runtime.h "
                "(set CUDA_HOME; looked in CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
    src = csrc_dir()
    if not (src / "cuda").is_dir() or not (src / "sim").is_dir():
        return f"cuda_sim needs the sources csrc/cuda and csrc/sim, not found under {src}"
    return None


def refuse(call: Call) -> Optional[str]:
    if call.device.type != "cpu":
        return f"cuda_sim runs the CUDA kernels on CPU tensors, got {call.device}"
    return cuda.refuse_kernel(call)


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
# `extern __shared__ T name[];` cannot be turned into a definition by a macro: the kernel sources
# are compiled with this one declaration rewritten to a pointer to the simulator's buffer.
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*)\s+(\w+)\s*\[\s*\]\s*;")
_CXXFLAGS = ["-std=c++20", "-O2", "-fPIC", "-DNIT_CUDA_SIM", "-Wall", "-Wno-unused-function"]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def _headers(src: Path) -> bytes:
    """Every header a kernel TU may include (changing one rebuilds every kernel)."""
    files = sorted([*src.glob("common/*.h"), *src.glob("cuda/*.cuh"), src / "cuda" / "launchers.h",
                    *src.glob("sim/**/*.h")])
    return b"".join(f.name.encode() + f.read_bytes() for f in files)


def _run(cmd: list, what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"cuda_sim: building {what} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")


def _kernel_library(src: Path, out: Path) -> Path:
    """libnit_cuda_sim_<hash>.so from csrc/sim/runtime.cpp and csrc/cuda/*.cu (per-TU cache)."""
    inc = [f"-I{src / 'sim' / 'include'}", f"-I{src}", f"-I{cuda_include()}"]
    headers = _headers(src)
    units = [src / "sim" / "runtime.cpp", *sorted((src / "cuda").glob("*.cu"))]
    (out / "obj").mkdir(parents=True, exist_ok=True)
    jobs = []
    for u in units:
        text = u.read_text()
        if u.suffix == ".cu":
            # the relative name keeps the object's cache key independent of where the sources live
            text = f'#line 1 "csrc/cuda/{u.name}"\n' + _EXTERN_SHARED.sub(r"\1* const \2 = ::nit::sim::dynamic_shared<\1>();", text)
        key = _digest(text.encode(), headers, " ".join(_CXXFLAGS).encode())
        obj = out / "obj" / f"{u.stem}-{key}.o"
        jobs.append((u, text, obj))

    def compile_one(job):
        u, text, obj = job
        if obj.exists():
            return
        tu = obj.with_suffix(".cpp")
        tu.write_text(text)
        tmp = obj.with_suffix(f".{os.getpid()}.o")
        _run(["g++", *_CXXFLAGS, *inc, "-c", str(tu), "-o", str(tmp)], f"{u.name} for the simulator")
        os.replace(tmp, obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        list(ex.map(compile_one, jobs))
    objs = [str(j[2]) for j in jobs]
    lib = out / f"libnit_cuda_sim_{_digest(*(o.encode() for o in objs))}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.so")
        _run(["g++", "-shared", "-o", str(tmp), *objs], "the simulator library")
        os.replace(tmp, lib)
    return lib


def _glue_library(src: Path, out: Path) -> None:
    """Builds (cached by content) and loads the glue of csrc/cuda as nit_sim ops."""
    from torch.utils import cpp_extension

    files = [src / "checks.h", *sorted((src / "cuda").glob("*_glue.cpp")), src / "cuda" / "glue.h",
             src / "cuda" / "launchers.h", *sorted((src / "sim").glob("*.h"))]
    key = _digest(*(str(f.relative_to(src)).encode() + f.read_bytes() for f in files))
    root = out / f"glue-{key}"
    snap = root / "csrc"
    if not (root / "nit_sim_glue.cpp").exists():
        for f in files:
            dst = snap / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        unity = "".join(f'#include "cuda/{f.name}"\n' for f in files if f.name.endswith("_glue.cpp"))
        (root / "nit_sim_glue.cpp").write_text("// every CUDA glue file as one translation unit (simulator build)\n"
                                              + unity)
    cpp_extension.load(
        name=f"nit_sim_glue_{key}", sources=[str(root / "nit_sim_glue.cpp")],
        extra_cflags=["-O0", "-DNIT_CUDA_SIM", f"-I{snap}", f"-I{cuda_include()}"],
        build_directory=str(root), is_python_module=False, with_cuda=False, verbose=False)


def _define_schemas(src: Path) -> None:
    """The nit_sim library: the op schemas of csrc/registration.cpp."""
    global _lib_def
    text = (src / "registration.cpp").read_text()
    schemas = re.findall(r'm\.def\(\s*"([^"]+)"\s*\)', text)
    if not schemas:
        raise RuntimeError(f"cuda_sim: no op schemas found in {src / 'registration.cpp'}")
    _lib_def = torch.library.Library(NAMESPACE, "DEF")
    for s in schemas:
        _lib_def.define(s)


def build() -> dict:
    """Builds (or reuses) and loads the simulator once per process; the kernel interface."""
    global _OPS
    with _lock:
        if _OPS is None:
            err = load_error()
            if err is not None:
                raise RuntimeError(err)
            src, out = csrc_dir(), build_dir()
            out.mkdir(parents=True, exist_ok=True)
            kernels = _kernel_library(src, out)
            ctypes.CDLL(str(kernels), mode=ctypes.RTLD_GLOBAL)  # the glue's launchers resolve here
            _define_schemas(src)
            _glue_library(src, out)
            ops = cuda.BUILT_OPS
            _autograd.register(NAMESPACE, "cuda_sim", ops)
            _OPS = _autograd.kernel_interface(NAMESPACE, ops, operand=cuda.operand)
    return _OPS


def _lazy(op: str):
    def run(*args, **kwargs):
        return build()[op](*args, **kwargs)

    run.__name__ = op
    return run


OPS = {op: _lazy(op) for op in cuda.BUILT_OPS}
