"""Build of the C++/CUDA extension `nit_kernels._C`.

Knobs (environment variables, read here and nowhere else):
  NIT_BUILD_EXT=0            skip the extension; the package still imports and runs on the
                             reference and Triton backends.
  NIT_BUILD_CUDA=auto|0|1    auto (default): add csrc/cuda when the installed torch is a CUDA
                             build and nvcc is found; 1: require it; 0: never.
  NIT_CUDA_ARCHS="80;90"     GPU architectures to compile for (default sm_80 and sm_90); each
                             must be sm_80 or newer (the bf16 tensor-core MMAs need sm_80):
                             an older one is refused here, before nvcc runs.
  NIT_CPU_ARCH=x86-64-v3     -march for the CPU kernels (x86-64-v3 = AVX2 + FMA). Set it to
                             "native" for this machine only, or "x86-64" for pre-AVX2 CPUs.
                             Nothing is probed: the flag is what you set.
"""
import glob
import os
import platform
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("NIT_BUILD_CUDA", "auto").strip().lower()
    if flag not in ("auto", "0", "1"):
        raise SystemExit(f"NIT_BUILD_CUDA must be auto, 0 or 1, got {flag!r}")
    have_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    have_cuda_torch = torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not (have_nvcc and have_cuda_torch):
            raise SystemExit(
                "NIT_BUILD_CUDA=1 needs a CUDA build of torch and nvcc; found "
                f"torch.version.cuda={torch.version.cuda!r}, nvcc={'yes' if have_nvcc else 'no'}"
            )
        return True
    return have_nvcc and have_cuda_torch


MIN_CUDA_ARCH = 80  # bf16 WMMA fragments (attention kernels) exist from sm_80 on


def cuda_archs(value=None):
    """The compute capabilities of NIT_CUDA_ARCHS (or `value`) as strings like "80", "90a".

    Accepts ";" or "," separated entries written 80, 8.0, sm_80 or compute_90a. Raises
    SystemExit with the reason for an entry that is not an arch or is older than sm_80.
    """
    raw = os.environ.get("NIT_CUDA_ARCHS", "80;90") if value is None else value
    archs = []
    for entry in raw.replace(",", ";").split(";"):
        a = entry.strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not a:
            continue
        digits = a[:-1] if a.endswith("a") else a
        if not digits.isdigit():
            raise SystemExit(f"NIT_CUDA_ARCHS: {entry.strip()!r} is not a CUDA arch (expected e.g. 80, 8.6, sm_90a)")
        if int(digits) < MIN_CUDA_ARCH:
            raise SystemExit(
                f"NIT_CUDA_ARCHS={raw!r} asks for sm_{digits}, but the CUDA kernels need sm_{MIN_CUDA_ARCH} "
                f"or newer (bf16 tensor-core MMAs); drop it or build without CUDA (NIT_BUILD_CUDA=0)")
        archs.append(a)
    if not archs:
        raise SystemExit(f"NIT_CUDA_ARCHS={raw!r} names no arch (expected e.g. \"80;90\")")
    return archs


def _cpu_arch_flags():
    arch = os.environ.get("NIT_CPU_ARCH")
    if arch is None:
        arch = "x86-64-v3" if platform.machine() in ("x86_64", "AMD64") else ""
    return [f"-march={arch}"] if arch else []


def _extensions():
    if os.environ.get("NIT_BUILD_EXT", "1") == "0":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = _rel([os.path.join(HERE, "csrc", "registration.cpp")])
    sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"] + _cpu_arch_flags()
    include_dirs = [os.path.join(HERE, "csrc")]
    # the archs are checked whenever CUDA may be built, so a bad list fails here, not in nvcc
    archs = cuda_archs() if os.environ.get("NIT_BUILD_CUDA", "auto").strip() != "0" else []
    if _want_cuda():
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DNIT_WITH_CUDA"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # PTX of the newest arch as well, so GPUs newer than the list can JIT-compile the kernels
        nvcc += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        ext = CUDAExtension(
            "nit_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DNIT_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "nit_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
