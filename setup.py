"""Build of the C++/CUDA extension `nit_kernels._C`.

Knobs (environment variables, read here and nowhere else):
  NIT_BUILD_EXT=0            skip the extension; the package still imports and runs on the
                             reference and Triton backends.
  NIT_BUILD_CUDA=auto|0|1    auto (default): add csrc/cuda when the installed torch is a CUDA
                             build and nvcc is found; 1: require it; 0: never.
  NIT_CUDA_ARCHS="80;90"     GPU architectures to compile for (default sm_80 and sm_90).
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
    if _want_cuda():
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        archs = os.environ.get("NIT_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
        nvcc = ["-O3", "--use_fast_math", "-lineinfo", "-DNIT_WITH_CUDA"]
        archs = [a for a in archs if a]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # PTX of the newest arch as well, so GPUs newer than the list can JIT-compile the kernels
        nvcc += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"] if archs else []
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
