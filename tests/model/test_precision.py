"""The bf16 precision policy: device detection, refusals, one weight cast per step in the MLP, bf16
training close to fp32, bf16 sampling, checkpoints in fp32."""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nit_model import precision as prec
from nit_model.model import Mlp
from nit_model.train import ConfigError, train

from test_train import small  # noqa: E402  (tests/model is on sys.path under pytest)


def _cpuinfo_flags() -> set:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("flags, want", [({"amx_bf16", "avx512_bf16"}, "bf16"), ({"avx512_bf16"}, "fp32"),
                                         (set(), "fp32")])
def test_default_precision_follows_the_cpu_flags(monkeypatch, flags, want):
    monkeypatch.setattr(prec, "cpu_bf16_flags", lambda: frozenset(flags))
    assert prec.default_precision("cpu") == want
    assert prec.check_precision("auto", "cpu") == want
    assert prec.check_precision("bf16", "cpu") == "bf16"  # emulated bf16 still runs on any CPU


def test_default_precision_on_this_machine():
    assert prec.default_precision() == ("bf16" if "amx_bf16" in _cpuinfo_flags() else "fp32")
    if not torch.cuda.is_available():
        assert prec.default_precision("cuda") == "fp32"


def test_bf16_is_refused_with_one_line_where_the_device_cannot():
    with pytest.raises(prec.PrecisionError, match="must be one of auto, fp32, bf16; got 'fp16'"):
        prec.check_precision("fp16", "cpu")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one (or pre-Ampere GPUs)")
    with pytest.raises(prec.PrecisionError) as e:
        prec.check_precision("bf16", "cuda", where="train.precision")
    assert "\n" not in str(e.value) and "train.precision=bf16 cannot run on cuda" in str(e.value)


def test_trainer_refuses_bf16_on_a_device_without_it(tmp_path, monkeypatch):
    monkeypatch.setattr(prec, "bf16_support", lambda device=None: (False, False, "no bf16 here"))
    with pytest.raises(ConfigError, match="train.precision=bf16 cannot run on cpu: no bf16 here"):
        train(small(train={"steps": 1, "precision": "bf16"}), out_dir=tmp_path, progress=False)


# ------------------------------------------------------------------------------ casts


class _CountCasts(TorchDispatchMode):
    """Counts fp32 -> low-precision copies of tensors of one shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape and \
                args[0].dtype == torch.float32 and kwargs.get("dtype") == torch.bfloat16:
            self.count += 1
        return func(*args, **kwargs)


def test_mlp_casts_fc2_weight_once_per_step_under_autocast():
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(50, 32, requires_grad=True)
    counter = _CountCasts(mlp.fc2.weight.shape)
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = mlp(x)
        y.float().square().sum().backward()
    assert counter.count == 1, f"fc2.weight was cast to bf16 {counter.count} times in one forward+backward"
    assert mlp.fc2.weight.grad.dtype == torch.float32 and mlp.fc2.bias.grad.dtype == torch.float32


@pytest.mark.parametrize("backend", [None, "reference"])
def test_mlp_under_autocast_matches_torch_autocast(backend):
    """The fused Mlp (biases outside the matmuls, bias_gelu, recomputed GELU) against
    fc2(gelu(fc1(x))) under torch's own autocast: values and every gradient, in bf16."""
    g = torch.Generator().manual_seed(1)
    mlp = Mlp(24, 96, backend=backend)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    x, dy = torch.randn(45, 24, generator=g) * 2, torch.randn(45, 24, generator=g)

    def run(fn):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xx)
        y.backward(dy.bfloat16())
        out = [y, xx.grad] + [p.grad.clone() for p in mlp.parameters()]
        mlp.zero_grad(set_to_none=True)
        return out

    ours = run(mlp)
    ref = run(lambda xx: mlp.fc2(F.gelu(mlp.fc1(xx), approximate="tanh")))
    for name, o, r in zip(("y", "dx", "fc1.w", "fc1.b", "fc2.w", "fc2.b"), ours, ref):
        assert o.dtype == r.dtype, name
        torch.testing.assert_close(o.float(), r.float(), rtol=2 ** -6, atol=3e-2 * r.abs().max().item(), msg=name)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_conditioning_runs_in_fp32_under_cpu_autocast(backend):
    """The per-image conditioning Linears (timestep MLP, adaLN of the blocks and the final layer) are
    not cast to bf16 on CPU (their weights are read once for B rows); the reference backend keeps
    autocast's policy. The modulations reach the fused ops in the tokens' dtype either way."""
    from nit_kernels import PackedSeqs
    from nit_model.model import NiT
    from nit_model.model_config import NiTConfig

    torch.manual_seed(0)
    model = NiT(NiTConfig.from_name("tiny", backend=backend))
    linears = {"t": model.t_embedder.mlp[2], "block": model.blocks[1].adaLN_modulation[-1],
               "final": model.final_layer.adaLN_modulation[-1]}
    seen = {}
    for name, m in linears.items():
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    packed = PackedSeqs.from_sizes([(3, 4), (2, 5)])
    x = torch.randn(packed.total_tokens, model.config.patch_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.rand(2), torch.tensor([1, 2]), packed)
    out.float().square().mean().backward()
    want = torch.float32 if backend is None else torch.bfloat16
    assert seen == {name: want for name in linears}
    assert out.dtype == torch.bfloat16
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for m in linears.values() for p in m.parameters())


# ------------------------------------------------------------------------------ training and sampling


def test_bf16_training_reaches_the_fp32_loss(tmp_path):
    """Same data, seeds and step count: the bf16 run's mean loss over its last steps is within 2% of fp32's."""
    cfg = small(data={"token_budget": 256, "num_items": 400, "max_side": 32}, optim={"warmup_steps": 3},
                train={"steps": 24, "log_every": 8})
    runs = {p: train(cfg.replace(train={"precision": p}), out_dir=tmp_path / p, progress=False)
            for p in ("fp32", "bf16")}
    late = {p: sum(r.losses[-8:]) / 8 for p, r in runs.items()}
    first = {p: r.losses[0] for p, r in runs.items()}
    assert first["bf16"] == first["fp32"]  # adaLN-Zero: the first step predicts zeros in either precision
    assert late["fp32"] < 0.9 * first["fp32"], late  # the run learns, so the comparison means something
    assert abs(late["bf16"] - late["fp32"]) <= 0.02 * late["fp32"], late
    r = runs["bf16"]
    assert all(p.dtype == torch.float32 for p in r.model.parameters())
    from safetensors.torch import load_file
    for name in ("model.safetensors", "ema.safetensors"):
        assert all(v.dtype == torch.float32 for v in load_file(os.path.join(r.checkpoint, name)).values()), name
    opt = torch.load(os.path.join(r.checkpoint, "optimizer.pt"), weights_only=True)
    assert all(t.dtype == torch.float32 for s in opt["state"].values() for t in s.values() if t.dim() > 0)


def test_sampling_in_bf16_is_close_to_fp32(tmp_path):
    from nit_model.model_config import NiTConfig
    from nit_model.model import NiT
    from nit_model.sampling import sample_tokens

    torch.manual_seed(0)
    model = NiT(NiTConfig.from_name("tiny", depth=2, encoder_depth=1))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    kw = dict(steps=3, cfg_scale=2.0, seed=0, progress=False)
    a = sample_tokens(model, [(3, 4), (2, 2)], [1, 2], precision="fp32", **kw)
    b = sample_tokens(model, [(3, 4), (2, 2)], [1, 2], precision="bf16", **kw)
    for x, y in zip(a, b):
        assert y.dtype == torch.float32 and not torch.equal(x, y)  # bf16 really ran
        torch.testing.assert_close(y, x, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="precision must be one of"):
        sample_tokens(model, [(2, 2)], [1], precision="fp16", **kw)


def test_nit_sample_precision_flag(tmp_path):
    import json

    from nit_model.cli import main as cli_main

    run = tmp_path / "run"
    train(small(model={"depth": 1, "encoder_depth": 1}, train={"steps": 1}), out_dir=run, progress=False)
    out = tmp_path / "s"
    cli_main(["sample", "--ckpt", str(run), "--sizes", "16x16", "--num", "1", "--steps", "1", "--precision", "bf16",
              "--out", str(out), "--no-progress", "--no-png"])
    assert json.loads((out / "samples.json").read_text())["settings"]["precision"] == "bf16"


def test_nit_eval_precision_flag(tmp_path):
    import json

    from nit_model.cli import main as cli_main

    run = tmp_path / "run"
    train(small(model={"depth": 1, "encoder_depth": 1}, train={"steps": 1}), out_dir=run, progress=False)
    args = ["eval", "--ckpt", f"m={run}", "--sizes", "16x16", "--num", "2", "--steps", "1", "--num-real", "4",
            "--classifier-steps", "2", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    if prec.bf16_support("cpu")[0]:
        cli_main(args + ["--precision", "bf16", "--out", str(tmp_path / "e")])
        assert json.loads((tmp_path / "e" / "eval.json").read_text())["settings"]["precision"] == "bf16"
    cli_main(args + ["--precision", "auto", "--out", str(tmp_path / "a")])
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["settings"]["precision"] == prec.default_precision("cpu")
