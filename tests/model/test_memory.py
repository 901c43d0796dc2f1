"""Peak-memory estimates (nit_model.memory): close to measured runs, and plans that cannot fit are
refused fast, before anything large is allocated, by the API and by `nit sample` / `nit train`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nit_model.weights import save_weights
from nit_model.model_config import NiTConfig
from nit_model.memory import (MemoryRefusal, available_memory, check_fits, count_parameters, sampling_estimate,
                              training_estimate)
from nit_model.model import NiT
from nit_model.sampling import sample
from nit_model.train import TrainConfig, train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MEASURE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
import nit_kernels as nk
from nit_model.model_config import NiTConfig
from nit_model.model import NiT
from nit_model.memory import sampling_estimate, training_estimate
from nit_model.sampling import sample_tokens

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

mode, side, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = NiTConfig.from_name("tiny")
m, sizes = NiT(cfg), [(side, side)] * n
if mode == "sample":
    sample_tokens(m, [(2, 2)], [0], steps=1, progress=False)  # warm-up: lazy initialisations
    est = sampling_estimate(cfg, sizes, token_budget=10**9, guidance=True, pixels_per_token=0)
    base = rss()
    sample_tokens(m, sizes, [0] * n, steps=1, cfg_scale=2.0, progress=False, token_budget=10**9)
else:
    opt = torch.optim.AdamW(m.parameters(), foreach=True)
    est = training_estimate(cfg, side * side * n)
    base = rss()
    pk = nk.PackedSeqs.from_sizes(sizes)
    out = m(torch.randn(pk.total_tokens, 3, 4, 4), torch.rand(n), torch.zeros(n, dtype=torch.long), pk)
    out.square().mean().backward()
    opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - base, "estimate": est.bytes}))
"""


def _env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_parameter_count_from_shapes_equals_the_model():
    for kw in ({}, {"adaln_lora_dim": 16}, {"qk_norm": False, "class_dropout_prob": 0.0}):
        cfg = NiTConfig.from_name("tiny", **kw)
        assert count_parameters(cfg) == NiT(cfg).num_params, kw


@pytest.mark.slow
@pytest.mark.parametrize("mode, side, n", [("sample", 8, 384), ("train", 8, 192)])
def test_estimate_is_within_the_stated_factor_of_a_measured_run(mode, side, n):
    """Many 8x8-token images (49k tokens forwarded with guidance; a 12k-token training pack): the
    estimate lies within [0.75, 1.6] x the measured growth of the peak resident memory."""
    proc = subprocess.run([sys.executable, "-c", MEASURE, mode, str(side), str(n)], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = r["estimate"] / r["measured"]
    assert 0.75 <= ratio <= 1.6, r


def test_refusal_names_the_estimate_the_memory_and_what_to_change():
    cfg = NiTConfig.from_name("tiny")
    est = sampling_estimate(cfg, [(25000, 25000)], token_budget=8192, guidance=False, pixels_per_token=16)
    assert est.bytes > 1 << 42  # 625 M tokens: terabytes
    avail, source = available_memory()
    assert 0 < avail and source
    with pytest.raises(MemoryRefusal, match=r"sampling needs about .* TiB \(activations \(625,000,000 tokens.*"
                                            r"but only .* is available \(.*\); request smaller sizes"):
        check_fits(est, advice="request smaller sizes")
    check_fits(est, advice="", force=True)  # force: no refusal
    # the API refuses before allocating: a 100000 x 100000 px image returns at once
    model = NiT(cfg).eval()
    t0 = time.perf_counter()
    with pytest.raises(MemoryRefusal, match=r"request smaller sizes \(one image alone is too big"):
        sample(model, [(100000, 100000)], steps=1, progress=False)
    with pytest.raises(MemoryRefusal, match=r"lower the token budget"):
        sample(model, [(32, 32)], num=10**9, steps=1, progress=False, output="latents")
    assert time.perf_counter() - t0 < 5
    # training: a pack that cannot fit is refused from the config alone
    cfg_t = TrainConfig.from_yaml("tiny-shapes", overrides=["data.token_budget=100000000"])
    est_t = training_estimate(cfg_t.nit_config(), cfg_t.data.token_budget)
    assert est_t.bytes > 1 << 40


def _run_capped(args, cap_bytes):
    """`python -m nit_model ARGS` under an address-space cap; (returncode, stderr, seconds)."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-m", "nit_model", *map(str, args)], env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=cap)
    _, err = p.communicate(timeout=180)
    return p.returncode, err, time.monotonic() - t0


@pytest.mark.slow
def test_cli_refuses_fast_under_a_memory_cap(tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    save_weights(NiT(NiTConfig.from_name("tiny")), str(ckpt))
    cap = 12 << 30  # a cap that torch's import fits in and no tested plan does
    for sizes in ("8192x8192",):  # 100000x100000 is refused in-process above
        rc, err, secs = _run_capped(["sample", "--ckpt", ckpt, "--sizes", sizes, "--num", "1", "--steps", "1",
                                     "--out", tmp_path / "s", "--no-progress"], cap)
        assert rc == 2 and "Traceback" not in err, (sizes, rc, err[-3000:])
        assert err.startswith("nit sample: error: sampling needs about") and "is available" in err, err
        assert "request smaller sizes" in err and "--force" in err and secs < 60, (err, secs)
        assert rc != -signal.SIGKILL
    rc, err, secs = _run_capped(["train", "--config", "tiny-shapes", "--out", tmp_path / "run",
                                 "--set", "data.token_budget=4000000"], cap)
    assert rc == 2 and err.startswith("nit train: error: training needs about"), err[-3000:]
    assert "data.token_budget" in err and "--force" in err and secs < 60, (err, secs)
    assert not (tmp_path / "run").exists()
