"""Mutation proof of the cuda_sim checks: copies of csrc/ with one bug each are built through
NIT_CUDA_SIM_CSRC (only the mutated kernel file recompiles; the glue and the other objects come
from the content-keyed cache) and run in a subprocess; each bug must be caught, by the check that
names it in the error, or (for a wrong mask of the softmax) by the accuracy rule.

Every edit must apply exactly once, so a change to the kernels that moves the mutated line makes
these tests fail loudly instead of passing without a mutation.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nit_kernels import dispatch

_WHY = dispatch.get("cuda_sim").load_error()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_WHY is not None, reason=f"cuda_sim unavailable: {_WHY}")]

ROOT = Path(__file__).resolve().parents[1]

_ATTN_LONG = """check_against_reference("varlen_attention", "cuda_sim", pack_of([(7, 10), (2, 3)]), {dtype},
                            shape={{"heads": 1, "head_dim": {hd}}}, causal={causal})"""

# name: (file, original text, mutated text, script, what the error must contain)
MUTATIONS = {
    # the barrier before K/V are overwritten: a warp still reading the previous tile races the loads
    "race-attention-fwd-first-syncthreads": (
        "cuda/attention.cu",
        "    __syncthreads();  // every warp is done with the previous K/V tiles\n",
        "",
        _ATTN_LONG.format(dtype="torch.float32", hd=64, causal=False),
        "race"),
    # the causal/length mask lets every row see one key past the end of its image
    "off-by-one-key-mask": (
        "cuda/attention.cu",
        "int64_t lim = rg.sk - n0;",
        "int64_t lim = rg.sk - n0 + 1;",
        _ATTN_LONG.format(dtype="torch.float32", hd=64, causal=False),
        "max error"),
    # K/V tiles load one key row past the end of each image: past the end of k for the last one
    "off-by-one-key-load": (
        "cuda/attention.cu",
        "const int keys = static_cast<int>(rg.sk - n0 < BN ? rg.sk - n0 : BN);",
        "const int keys = static_cast<int>(rg.sk - n0 + 1 < BN ? rg.sk - n0 + 1 : BN);",
        _ATTN_LONG.format(dtype="torch.float32", hd=64, causal=False),
        "out of bounds"),
    # a broadcast whose mask leaves out lane 31, which makes the call too
    "shuffle-mask-leaves-out-a-lane": (
        "cuda/attention.cu",
        "const float alpha = st.rescale_to(warp_max(block_max));",
        "const float alpha = st.rescale_to(__shfl_sync(0x7fffffffu, warp_max(block_max), 0));",
        _ATTN_LONG.format(dtype="torch.float16", hd=64, causal=False),
        "shuffle"),
    # head_dim 128 in fp16 needs 78 KB of dynamic shared memory: launched without the opt-in
    "smem-over-48k-without-opt-in": (
        "cuda/attention.cu",
        "cudaError_t err = allow_smem(kernel, L::bytes);",
        "cudaError_t err = cudaSuccess;",
        _ATTN_LONG.format(dtype="torch.float16", hd=128, causal=True),
        "cudaFuncSetAttribute"),
    # the last row of the output is never written
    "output-row-never-written": (
        "cuda/gated_residual.cu",
        "  const int64_t row = group_row<kGroup>(pack.num_tokens);\n  if (row < 0) return;",
        "  const int64_t row = group_row<kGroup>(pack.num_tokens);\n  if (row < 0 || row == pack.num_tokens - 1) return;",
        """check_against_reference("gated_residual", "cuda_sim", pack_of([(3, 5), (1, 1)]), torch.float32,
                            shape={"dim": 40})""",
        "uninitialised"),
    # some threads leave before a __syncthreads() the others wait at
    "barrier-not-reached-by-all": (
        "cuda/packed_rows.cu",
        "    red[threadIdx.y][threadIdx.x] = acc;\n    __syncthreads();",
        "    red[threadIdx.y][threadIdx.x] = acc;\n    if (threadIdx.y == 1) return;\n    __syncthreads();",
        """check_against_reference("gated_residual", "cuda_sim", pack_of([(3, 5), (1, 1)]), torch.float32,
                            shape={"dim": 40})""",
        "barrier"),
}

_SCRIPT = """
import torch
from nit_kernels.testing import check_against_reference, pack_of
try:
{body}
    print("NO ERROR")
except Exception as e:
    print(f"{{type(e).__name__}}: {{e}}")
"""


def _mutate(tmp: Path, name: str) -> Path:
    file, old, new, _, _ = MUTATIONS[name]
    src = tmp / name / "csrc"
    shutil.copytree(ROOT / "csrc", src)
    path = src / file
    text = path.read_text()
    assert text.count(old) == 1, f"mutation {name}: the text to mutate occurs {text.count(old)} times in {file}"
    path.write_text(text.replace(old, new))
    return src


def _run(src: Path, name: str) -> str:
    body = textwrap.indent(MUTATIONS[name][3], "    ")
    env = {**os.environ, "NIT_CUDA_SIM_CSRC": str(src), "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _SCRIPT.format(body=body)], env=env, capture_output=True, text=True,
                       timeout=600)
    return f"rc={r.returncode}\n{r.stdout}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from nit_kernels.backends import cuda_sim

    cuda_sim.build()  # the unmutated glue and objects, shared through the cache
    tmp = tmp_path_factory.mktemp("mutants")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
        futures = {n: ex.submit(_run, _mutate(tmp, n), n) for n in MUTATIONS}
        # controls: the same scripts on the real sources
        futures.update({("control", n): ex.submit(_run, ROOT / "csrc", n) for n in CONTROLS})
        return {n: f.result() for n, f in futures.items()}


@pytest.mark.parametrize("name", MUTATIONS)
def test_mutation_is_caught(outcomes, name):
    out = outcomes[name]
    expected = MUTATIONS[name][4]
    assert "NO ERROR" not in out, f"mutation {name} was not caught:\n{out}"
    assert expected in out, f"mutation {name}: expected an error mentioning {expected!r}, got:\n{out}"


CONTROLS = ("race-attention-fwd-first-syncthreads", "shuffle-mask-leaves-out-a-lane", "output-row-never-written")


@pytest.mark.parametrize("name", CONTROLS)
def test_unmutated_sources_pass(outcomes, name):
    # the errors above come from the bugs: the same scripts on the real sources raise nothing
    out = outcomes[("control", name)]
    assert "NO ERROR" in out, f"{name} script fails on the unmutated sources:\n{out}"
