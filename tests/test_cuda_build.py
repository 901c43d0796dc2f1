"""Compile checks of the CUDA backend that run without a GPU (nothing here executes a kernel).

1. Every csrc/cuda/*.cu compiles with plain nvcc for sm_80 and sm_90, with the flags of
   setup.py and torch's extension builder, warnings as errors (one test per file x arch).
2. The torch glue (csrc/cuda/*_glue.cpp, one translation unit) compiles with g++ against this
   torch's headers, warnings as errors. CPU wheels lack c10's generated cuda_cmake_macros.h;
   C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it (on Linux it only feeds export macros).
3. The chunk/slot bookkeeping of the deterministic per-image sums (csrc/cuda/packed_rows.cuh,
   host-device code) runs on the host over many packs, empty images included: every row is
   visited once with its image, every piece gets its own slot, and each image's slot range
   holds exactly its pieces.
4. The glue, linked with the sm_80 kernel objects and link-time stand-ins for libc10_cuda,
   loads into torch next to nit_kernels._C: every launcher is defined, and every op schema of
   csrc/registration.cpp gets a CUDA kernel whose C++ signature torch accepts.

Compiles run in a thread pool (one per core) started by the first test that needs them; the
tests skip cleanly without nvcc or g++.
"""
import ast
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
GLUE_FILES = sorted((CSRC / "cuda").glob("*_glue.cpp"))
ARCHS = ("80", "90")


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").exists():
            return str(Path(root) / "bin" / "nvcc")
    return None


NVCC = _nvcc()
GXX = shutil.which("g++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ not found")


def _setup_nvcc_flags() -> list:
    """The `nvcc = [...]` list of setup.py, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "nvcc"):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no `nvcc = [...]` flag list; update tests/test_cuda_build.py")


def _nvcc_command(src: Path, arch: str, out: Path) -> list:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    # what torch's BuildExtension adds for .cu files, then setup.py's flags, then -Werror
    return ([NVCC, "-c", str(src), "-o", str(out), "-std=c++20", "-Xcompiler", "-fPIC"]
            + list(COMMON_NVCC_FLAGS) + _setup_nvcc_flags()
            + [f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}",
               "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"])


def _cuda_root() -> Path:
    """The toolkit holding include/cuda_runtime.h (nvcc may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  NVCC and str(Path(NVCC).resolve().parent.parent), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c)
    pytest.skip(f"no CUDA toolkit with include/cuda_runtime.h among {candidates}")


def _cuda_include() -> Path:
    return _cuda_root() / "include"


def _torch_includes() -> list:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


def _gxx_torch_command(src: Path, out: Path) -> list:
    return ([GXX, "-std=c++20", "-c", "-O0", "-fPIC", "-Wall", "-Werror", "-Wno-unknown-pragmas",
             "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", f"-I{CSRC}", f"-I{_cuda_include()}",
             f"-I{sysconfig.get_paths()['include']}"] + _torch_includes() + [str(src), "-o", str(out)])


def _run(cmd: list, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# Link-time stand-ins for the libc10_cuda symbols the glue references (CPU wheels do not ship
# the library). They are never called: the library is only loaded to register its kernels.
_C10_CUDA_STUBS = textwrap.dedent("""
    #include <c10/cuda/CUDACachingAllocator.h>
    #include <c10/cuda/CUDAException.h>
    #include <c10/cuda/CUDAFunctions.h>
    #include <c10/cuda/CUDAStream.h>
    #include <c10/util/Exception.h>

    namespace c10::cuda {
    [[noreturn]] static void absent() { TORCH_CHECK(false, "libc10_cuda is not part of this link check"); }
    DeviceIndex device_count() noexcept { return 0; }
    cudaError_t GetDevice(DeviceIndex*) { absent(); }
    cudaError_t SetDevice(DeviceIndex, bool) { absent(); }
    cudaError_t MaybeSetDevice(DeviceIndex) { absent(); }
    DeviceIndex ExchangeDevice(DeviceIndex) { absent(); }
    CUDAStream getStreamFromPool(const bool, DeviceIndex) { absent(); }
    CUDAStream getStreamFromPool(const int, DeviceIndex) { absent(); }
    CUDAStream getDefaultCUDAStream(DeviceIndex) { absent(); }
    CUDAStream getCurrentCUDAStream(DeviceIndex) { absent(); }
    void setCurrentCUDAStream(CUDAStream) { absent(); }
    void c10_cuda_check_implementation(const int32_t, const char*, const char*, const uint32_t, const bool) { absent(); }
    cudaStream_t CUDAStream::stream() const { absent(); }
    bool CUDAStream::query() const { absent(); }
    void CUDAStream::synchronize() const { absent(); }
    namespace CUDACachingAllocator { std::atomic<CUDAAllocator*> allocator; }
    }  // namespace c10::cuda
""")


class _Builds:
    """All compiles of this module, submitted at once to a pool with one worker per core."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
        self.objects = {}
        self.futures = {}
        # the slowest translation units first, so the pool's tail is short
        jobs = sorted(((f, a) for f in CU_FILES for a in ARCHS) if NVCC else [],
                      key=lambda fa: -fa[0].stat().st_size)
        if GXX and GLUE_FILES:
            self.futures["glue"] = self.pool.submit(self._glue)
        for f, a in jobs:
            out = tmp / f"{f.stem}.sm{a}.o"
            self.objects[(f.name, a)] = out
            self.futures[(f.name, a)] = self.pool.submit(_run, _nvcc_command(f, a, out))

    def _glue(self):
        unit = self.tmp / "cuda_glue_all.cpp"
        # one translation unit: torch's headers are parsed once; each glue file has its own namespace
        unit.write_text("".join(f'#include "{p}"\n' for p in GLUE_FILES))
        return _run(_gxx_torch_command(unit, self.tmp / "cuda_glue_all.o"))

    def result(self, key) -> subprocess.CompletedProcess:
        return self.futures[key].result()


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    b = _Builds(tmp_path_factory.mktemp("cuda_build"))
    yield b
    b.pool.shutdown(wait=True, cancel_futures=True)


def _report(what: str, r: subprocess.CompletedProcess) -> str:
    return f"{what} failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}\ncommand: {' '.join(r.args)}"


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu files"
    stems = {f.stem for f in CU_FILES}
    # one file per op family, named as in csrc/cpu: adaln (adaln_modulate, residual_adaln),
    # gated_residual, rope (rope_2d, qk_norm_rope), attention (varlen_attention)
    for family in ("adaln", "gated_residual", "rope", "attention"):
        assert family in stems, f"csrc/cuda/{family}.cu is missing"
        assert (CSRC / "cuda" / f"{family}_glue.cpp").exists(), f"csrc/cuda/{family}_glue.cpp is missing"
        assert (CSRC / "cpu" / f"{family}.cpp").exists(), f"csrc/cpu/{family}.cpp is missing"


def test_setup_builds_cuda_sources_for_both_archs():
    text = (ROOT / "setup.py").read_text()
    flags = _setup_nvcc_flags()
    assert "-DNIT_WITH_CUDA" in flags
    assert re.search(r'"csrc", "cuda", "\*\.cu"', text) and re.search(r'"csrc", "cuda", "\*\.cpp"', text)
    assert re.search(r'NIT_CUDA_ARCHS", "80;90"', text), "default CUDA archs must be sm_80 and sm_90"
    # .cu and .cpp of one op must not share a stem: both would compile to <stem>.o
    cpp_stems = {p.stem for p in (CSRC / "cuda").glob("*.cpp")}
    assert not cpp_stems & {f.stem for f in CU_FILES}


def _setup_module():
    """setup.py imported as a module (its setup() call runs only as __main__)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nit_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("value, expected", [("80;90", ["80", "90"]), ("8.6, sm_90a", ["86", "90a"]),
                                             ("compute_80;", ["80"])])
def test_setup_reads_cuda_archs(value, expected):
    assert _setup_module().cuda_archs(value) == expected


@pytest.mark.parametrize("value, message", [("75", "sm_75, but the CUDA kernels need sm_80"),
                                            ("80;7.0", "sm_70, but the CUDA kernels need sm_80"),
                                            ("ampere", "'ampere' is not a CUDA arch"),
                                            (";", "names no arch")])
def test_setup_refuses_bad_cuda_archs(value, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        _setup_module().cuda_archs(value)


def test_setup_py_fails_fast_on_an_arch_older_than_sm80():
    # before nvcc runs (bf16 WMMA has no sm_75 form, so nvcc itself would fail deep in a kernel)
    env = dict(os.environ, NIT_CUDA_ARCHS="75", NIT_BUILD_CUDA="auto")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "sm_75, but the CUDA kernels need sm_80" in r.stderr, r.stderr[-2000:]


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("src", [f.name for f in CU_FILES])
def test_nvcc_compiles(builds, src, arch):
    r = builds.result((src, arch))
    assert r.returncode == 0, _report(f"nvcc {src} for sm_{arch}", r)
    assert builds.objects[(src, arch)].stat().st_size > 0


_SLOT_CHECK = textwrap.dedent(r"""
    // Host run of walk_chunk / image_slots over many packs (see tests/test_cuda_build.py).
    #include <cstdio>
    #include <random>
    #include <vector>

    #include "cuda/packed_rows.cuh"

    using namespace nit::cuda;

    static int failures = 0;
    #define EXPECT(cond, ...) do { if (!(cond)) { ++failures; std::printf(__VA_ARGS__); std::printf("\n"); return; } } while (0)

    static void check(const std::vector<int32_t>& cu) {
      const int B = static_cast<int>(cu.size()) - 1;
      const int64_t N = cu.back();
      const SlotLayout L = slot_layout(N, B);
      const Pack pack{cu.data(), B, N};
      std::vector<int> seen(N, 0), owner(L.num_slots, -1);
      for (int64_t c = 0; c < L.num_chunks; ++c) {
        int seg_now = -1;
        int64_t rows = 0;
        bool ok = true;
        walk_chunk(pack, L.rows_per_chunk, c,
            [&](int64_t r, int seg) {
              ok = ok && r >= 0 && r < N && seg >= 0 && seg < B && cu[seg] <= r && r < cu[seg + 1];
              if (r >= 0 && r < N) ++seen[r];
              if (seg != seg_now) ok = ok && rows == 0;  // a new piece starts after a flush
              seg_now = seg;
              ++rows;
            },
            [&](int64_t slot) {
              ok = ok && rows > 0 && slot == c + seg_now && slot >= 0 && slot < L.num_slots &&
                   owner[slot] == -1;
              if (slot >= 0 && slot < L.num_slots) owner[slot] = seg_now;
              rows = 0;
            });
        EXPECT(ok && rows == 0, "N=%lld B=%d: bad walk of chunk %lld", (long long)N, B, (long long)c);
      }
      for (int64_t r = 0; r < N; ++r) EXPECT(seen[r] == 1, "N=%lld B=%d: row %lld seen %d times", (long long)N, B, (long long)r, seen[r]);
      int64_t owned_total = 0;
      for (int b = 0; b < B; ++b) {
        int64_t s0, s1;
        image_slots(cu.data(), b, N, L.rows_per_chunk, L.num_slots, &s0, &s1);
        for (int64_t s = s0; s < s1; ++s) EXPECT(owner[s] == b, "N=%lld B=%d: slot %lld of image %d owned by %d", (long long)N, B, (long long)s, b, owner[s]);
        owned_total += s1 - s0;
      }
      int64_t flushed = 0;
      for (int o : owner) flushed += o >= 0;
      EXPECT(owned_total == flushed, "N=%lld B=%d: %lld slots flushed, %lld read", (long long)N, B, (long long)flushed, (long long)owned_total);
    }

    static std::vector<int32_t> cu_of(const std::vector<int32_t>& lens) {
      std::vector<int32_t> cu(1, 0);
      for (int32_t l : lens) cu.push_back(cu.back() + l);
      return cu;
    }

    int main() {
      check(cu_of({1}));
      check(cu_of({16}));
      check(cu_of({17}));
      check(cu_of({0, 5}));
      check(cu_of({5, 0}));
      check(cu_of({3, 0, 0, 40, 0, 1}));
      check(cu_of({1, 7, 5, 15, 16, 18}));
      check(cu_of({100000}));                 // many rows per chunk
      check(cu_of(std::vector<int32_t>(3000, 33)));
      std::mt19937 rng(1234);
      for (int t = 0; t < 300; ++t) {
        std::vector<int32_t> lens(1 + rng() % 40);
        for (auto& l : lens) l = (rng() % 5 == 0) ? 0 : 1 + rng() % (t % 3 == 0 ? 4000 : 70);
        check(cu_of(lens));
      }
      std::printf("%s\n", failures ? "FAILED" : "OK");
      return failures ? 1 : 0;
    }
""")


@needs_nvcc
def test_chunk_slot_bookkeeping_on_host(tmp_path):
    src = tmp_path / "slot_check.cu"
    src.write_text(_SLOT_CHECK)
    exe = tmp_path / "slot_check"
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    r = _run([NVCC, str(src), "-o", str(exe), "-std=c++20", *COMMON_NVCC_FLAGS, f"-I{CSRC}",
              "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"])
    assert r.returncode == 0, _report("nvcc of the host slot check", r)
    r = _run([str(exe)], timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), _report("host slot check", r)


@needs_gxx
def test_glue_compiles_against_torch_headers(builds):
    r = builds.result("glue")
    assert r.returncode == 0, _report("g++ of csrc/cuda/*_glue.cpp", r)


def _schema_names() -> list:
    """The schemas of csrc/registration.cpp that every compiled backend implements: all of them but
    the CPU-only ops (nit_kernels._autograd.EXTRA_BUILT_OPS), which the CUDA glue leaves out."""
    from nit_kernels import _autograd

    text = (CSRC / "registration.cpp").read_text()
    names = re.findall(r'm\.def\("(\w+)\(', text)
    assert names, "no m.def(...) schemas found in csrc/registration.cpp"
    cpu_only = {n for op in _autograd.EXTRA_BUILT_OPS for n in (_autograd.contract(op).fwd, _autograd.contract(op).bwd)}
    assert cpu_only <= set(names), f"CPU-only ops without a schema: {sorted(cpu_only - set(names))}"
    return [n for n in names if n not in cpu_only]


@needs_nvcc
@needs_gxx
def test_glue_links_and_registers_a_cuda_kernel_for_every_schema(builds):
    if torch.version.cuda is not None:
        pytest.skip("CUDA build of torch: the real extension registers the kernels (see test_cuda_gpu.py)")
    from nit_kernels.backends import _extension

    if _extension.IMPORT_ERROR is not None:
        pytest.skip(f"nit_kernels._C is needed for the schemas: {_extension.IMPORT_ERROR}")
    glue = builds.result("glue")
    assert glue.returncode == 0, _report("g++ of the glue", glue)
    for f in CU_FILES:
        r = builds.result((f.name, "80"))
        assert r.returncode == 0, _report(f"nvcc {f.name}", r)

    tmp = builds.tmp
    stubs = tmp / "c10_cuda_stubs.cpp"
    stubs.write_text(_C10_CUDA_STUBS)
    r = _run(_gxx_torch_command(stubs, tmp / "c10_cuda_stubs.o"))
    assert r.returncode == 0, _report("g++ of the libc10_cuda stand-ins", r)

    torch_lib = Path(torch.__file__).parent / "lib"
    root = _cuda_root()
    static_rt = [p for d in ("lib64", "lib", "targets/x86_64-linux/lib") for p in [root / d / "libcudart_static.a"]
                 if p.exists()]
    if not static_rt:
        pytest.skip(f"libcudart_static.a not found under {root}")
    cuda_lib = static_rt[0].parent
    lib = tmp / "libnit_cuda_link_check.so"
    objects = [str(tmp / "cuda_glue_all.o"), str(tmp / "c10_cuda_stubs.o")]
    objects += [str(builds.objects[(f.name, "80")]) for f in CU_FILES]
    # --no-undefined: a launcher declared in launchers.h but defined nowhere fails here
    r = _run([GXX, "-shared", "-o", str(lib), *objects, "-Wl,--no-undefined", f"-L{torch_lib}", "-lc10",
              "-ltorch_cpu", f"-L{cuda_lib}", "-lcudart_static", "-ldl", "-lpthread", "-lrt"])
    assert r.returncode == 0, _report("link of glue + kernels", r)

    # A fresh process: torch aborts on a signature mismatch at registration.
    script = textwrap.dedent("""
        import sys, torch
        import nit_kernels.backends._extension  # loads nit_kernels._C, which defines the schemas
        torch.ops.load_library(sys.argv[1])
        names = sys.argv[2:]
        # computed: an op without tensor arguments (limits) has one kernel for every backend
        missing = [n for n in names if not torch._C._dispatch_has_computed_kernel_for_dispatch_key("nit::" + n, "CUDA")]
        print("registered", len(names) - len(missing), "missing", missing)
        sys.exit(1 if missing else 0)
    """)
    r = _run([sys.executable, "-c", script, str(lib), *_schema_names()], timeout=300)
    assert r.returncode == 0, _report("loading the CUDA kernels into torch", r)
    assert f"registered {len(_schema_names())} missing []" in r.stdout
