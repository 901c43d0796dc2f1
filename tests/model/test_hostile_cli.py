"""Hostile input to the model package and the `nit` command: non-finite numbers are refused with
a message (API and CLI), and bad user input ends in one line ``nit <cmd>: error: ...`` with exit
code 2, never a traceback. Process-level cases run `python -m nit_model` in a subprocess."""
import math
import os
import subprocess
import sys

import pytest
import torch

from nit_model.weights import save_weights
from nit_model.cli import main as cli_main
from nit_model.model_config import NiTConfig
from nit_model.model import NiT
from nit_model.sampling import sample, sample_tokens
from nit_model.train import ConfigError, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAN, INF = float("nan"), float("inf")


def run_nit(*args, timeout=120, cwd=None, env=None):
    """`python -m nit_model ARGS` in a fresh process importing this checkout."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "nit_model", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=e)


def assert_one_line_error(proc, cmd, *needles):
    """Exit code 2, no traceback, and one stderr line `nit CMD: error: ...` holding every needle."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"nit {cmd}: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_weights(NiT(NiTConfig.from_name("tiny")), str(path))
    return str(path)


# ------------------------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize("kw, match", [
    ({"cfg_scale": NAN}, r"cfg_scale must be a finite number, got nan"),
    ({"cfg_scale": INF}, r"cfg_scale must be a finite number, got inf"),
    ({"cfg_scale": -1.0}, r"cfg_scale must be >= 0"),
    ({"cfg_interval": (NAN, 1.0)}, r"cfg_interval\[0\] must be a finite number, got nan"),
    ({"cfg_interval": (0.0, INF)}, r"cfg_interval\[1\] must be a finite number, got inf"),
    ({"steps": NAN}, r"steps must be an integer >= 1, got nan"),
    ({"steps": 2.5}, r"steps must be an integer >= 1, got 2.5"),
    ({"steps": 0}, r"steps must be an integer >= 1, got 0"),
    ({"token_budget": INF}, r"token_budget must be an integer >= 1, got inf"),
    ({"token_budget": 0}, r"token_budget must be an integer >= 1, got 0"),
    ({"seed": NAN}, r"seed must be an integer >= 0, got nan"),
    ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
])
def test_sampling_refuses_non_finite_and_out_of_range_numbers(kw, match):
    model = NiT(NiTConfig.from_name("tiny")).eval()
    with pytest.raises(ValueError, match=match):
        sample_tokens(model, [(2, 2)], [0], progress=False, **{"steps": 1, **kw})
    with pytest.raises(ValueError, match=match):
        sample(model, [(8, 8)], progress=False, **{"steps": 1, **kw})


def test_sample_refuses_a_non_finite_num():
    model = NiT(NiTConfig.from_name("tiny")).eval()
    for bad in (NAN, INF, 0, 1.5):
        with pytest.raises(ValueError, match=r"num must be an integer >= 1"):
            sample(model, [(8, 8)], num=bad, steps=1, progress=False)


@pytest.mark.parametrize("override, match", [
    ("optim.lr=.nan", r"optim\.lr must be a finite number, got nan"),
    ("optim.lr=.inf", r"optim\.lr must be a finite number, got inf"),
    ("optim.lr=-.inf", r"optim\.lr must be a finite number, got -inf"),
    ("optim.max_grad_norm=.nan", r"optim\.max_grad_norm must be a finite number"),
    ("optim.betas=[.nan, 0.9]", r"optim\.betas\[0\] must be a finite number"),
    ("flow.mu=.nan", r"flow\.mu must be a finite number"),
    ("flow.sigma=.inf", r"flow\.sigma must be a finite number"),
    ("flow.dir_weight=.nan", r"flow\.dir_weight must be a finite number"),
    ("ema.decay=.nan", r"ema\.decay must be a finite number"),
    ("data.max_aspect=.inf", r"data\.max_aspect must be a finite number"),
    ("train.steps=.inf", r"train\.steps must be an integer, got inf"),
    ("model.mlp_ratio=.nan", r"mlp_ratio must be a finite number"),
    ("model.rope_theta=.inf", r"rope_theta must be a finite number"),
])
def test_train_config_refuses_non_finite_numbers(override, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_yaml("tiny-shapes", overrides=[override])


def test_nit_config_refuses_non_finite_fields():
    for field in ("mlp_ratio", "rope_theta", "class_dropout_prob"):
        with pytest.raises(ValueError, match=rf"{field} must be a finite number, got nan"):
            NiTConfig.from_name("tiny", **{field: math.nan})


@pytest.mark.slow
def test_cli_refuses_nan_cfg_scale_and_nan_lr_in_one_line(tiny_ckpt, tmp_path):
    proc = run_nit("sample", "--ckpt", tiny_ckpt, "--sizes", "16x16", "--num", "1", "--steps", "1",
                   "--cfg-scale", "nan", "--out", tmp_path / "s", "--no-progress")
    assert_one_line_error(proc, "sample", "cfg_scale must be a finite number, got nan")
    assert not (tmp_path / "s").exists()
    proc = run_nit("train", "--config", "tiny-shapes", "--out", tmp_path / "t", "--set", "optim.lr=.nan")
    assert_one_line_error(proc, "train", "optim.lr must be a finite number, got nan")
    assert not (tmp_path / "t").exists()


# ------------------------------------------------------------------------------ one-line errors


@pytest.mark.slow
def test_corrupt_or_truncated_weights_give_one_line_naming_the_path(tiny_ckpt, tmp_path, capsys):
    data = open(tiny_ckpt, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    proc = run_nit("sample", "--ckpt", truncated, "--sizes", "16x16", "--num", "1", "--steps", "1",
                   "--out", tmp_path / "s", "--no-progress")
    assert_one_line_error(proc, "sample", str(truncated), "safetensors")
    err = _cli_error(capsys, ["sample", "--ckpt", str(garbage), "--out", str(tmp_path / "s"), "--no-progress"])
    assert str(garbage) in err and "not a readable safetensors file" in err, err


@pytest.mark.slow
def test_unwritable_out_and_bad_threads_give_one_line(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # a path below a regular file cannot be created, whoever runs the test (root included)
    proc = run_nit("sample", "--ckpt", tiny_ckpt, "--sizes", "16x16", "--num", "1", "--steps", "1",
                   "--out", blocker / "out", "--no-progress")
    assert_one_line_error(proc, "sample", str(blocker / "out"))
    err = _cli_error(capsys, ["sample", "--ckpt", tiny_ckpt, "--threads", "-1", "--out", str(tmp_path / "s")])
    assert "--threads must be a positive number of threads, got -1" in err, err
    err = _cli_error(capsys, ["train", "--config", "tiny-shapes", "--out", str(blocker / "run"),
                              "--set", "train.steps=1", "--no-progress"])
    assert err.startswith("nit train: error: ") and str(blocker / "run") in err, err


def _cli_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, (e.value.code, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["kernels", "--tokens", "0"], "--tokens must be"),
    (["kernels", "--reps", "-2"], "--reps must be"),
    (["sample", "--ckpt", "/no/such/ckpt"], "/no/such/ckpt"),
    (["sample", "--ckpt", "CKPT", "--sizes", "0x16"], "sizes must be positive"),
    (["sample", "--ckpt", "CKPT", "--num", "0"], "num must be an integer >= 1"),
    (["sample", "--ckpt", "CKPT", "--labels", "99"], "class id 99 is out of range"),
    (["sample", "--ckpt", "CKPT", "--cfg-interval", "nan,1"], "cfg_interval[0] must be a finite number"),
    (["eval", "--ckpt", "/no/such/ckpt"], "/no/such/ckpt"),
    (["eval", "--ckpt", "CKPT", "--cfg-scale", "inf"], "cfg_scale must be a finite number"),
    (["eval", "--ckpt", "CKPT", "--threads", "-3"], "--threads must be a positive number"),
    (["train", "--config", "no-such-config"], "no config file"),
    (["train", "--config", "/etc/hostname", "--out", "OUT"], "a training config is a YAML mapping of sections"),
    (["eval", "--ckpt", "CKPT", "--classifier-steps", "0"], "--classifier-steps must be an integer >= 1"),
    (["eval", "--ckpt", "CKPT", "--num-real", "1"], "--num-real must be an integer >= 2"),
    (["train", "--config", "tiny-shapes", "--set", "train.steps=-1"], "train.steps must be positive"),
    (["extract-latents", "--data", "/no/such/images", "--out", "OUT"], "/no/such/images"),
    (["demo", "--train-steps", "0", "--out", "OUT"], "--train-steps must be"),
    (["demo", "--threads", "-1", "--out", "OUT"], "--threads must be a positive number"),
    (["demo", "--cfg-scale", "nan", "--out", "OUT"], "cfg_scale must be a finite number"),
])
def test_every_subcommand_refuses_bad_input_in_one_line(argv, needle, tiny_ckpt, tmp_path, capsys):
    argv = [a.replace("CKPT", tiny_ckpt).replace("OUT", str(tmp_path / "out")) for a in argv]
    if argv[0] in ("sample", "eval"):
        argv += ["--out", str(tmp_path / "out"), "--no-progress", "--steps", "1"]
        argv += [] if "--num" in argv else ["--num", "2"]
    err = _cli_error(capsys, argv)
    assert err.startswith(f"nit {argv[0]}: error: ") and needle in err, err


def test_train_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: train.device=cuda is valid here")
    err = _cli_error(capsys, ["train", "--config", "tiny-shapes", "--out", str(tmp_path / "r"), "--set",
                              "train.device=cuda"])
    assert err.startswith("nit train: error: train.device='cuda' but torch sees no CUDA device"), err
