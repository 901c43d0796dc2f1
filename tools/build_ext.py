"""python3 tools/build_ext.py: ``setup.py build_ext --inplace``, compiling sources in parallel even without ninja.

torch's BuildExtension compiles in parallel (MAX_JOBS) only through ninja; without it, it compiles
one translation unit after the other, which for the CUDA sources takes many minutes. Where ninja is
missing (or NIT_BUILD_NO_NINJA=1), each source is compiled in a forked process instead, MAX_JOBS at
a time (default: the CPU count). Processes, not threads: torch swaps the compiler executable on the
shared compiler object around each .cu file, which threads would race on.
"""
import os
import runpy
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                      extra_preargs=None, extra_postargs=None, depends=None):
    """CCompiler.compile with each object compiled in a child process, MAX_JOBS at a time."""
    from setuptools._distutils.errors import CompileError
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    pending = [obj for obj in objects if obj in build]
    running, failed = {}, []
    while pending or running:
        while pending and len(running) < jobs:
            obj = pending.pop(0)
            src, ext = build[obj]
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:  # the child compiles one object and leaves without running any cleanup
                code = 1
                try:
                    self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                    code = 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            running[pid] = src
        pid, status = os.wait()
        if status != 0:
            failed.append(running[pid])
        running.pop(pid)
    if failed:
        raise CompileError(f"compiling {', '.join(failed)} failed (see above)")
    return objects


def main() -> None:
    import torch.utils.cpp_extension as cpp_ext
    if os.environ.get("NIT_BUILD_NO_NINJA") == "1" or not cpp_ext.is_ninja_available():
        from setuptools._distutils import ccompiler
        cpp_ext.is_ninja_available = lambda: False
        ccompiler.CCompiler.compile = _parallel_compile
        print(f"tools/build_ext.py: no ninja; compiling {os.environ.get('MAX_JOBS') or os.cpu_count()} sources at a "
              "time in child processes", flush=True)
    os.chdir(ROOT)
    sys.argv = ["setup.py", "build_ext", "--inplace"] + sys.argv[1:]
    sys.path.insert(0, ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")


if __name__ == "__main__":
    main()
