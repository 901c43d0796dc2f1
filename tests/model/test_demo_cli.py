"""The `nit` command end to end: `nit demo --quick` trains two tiny checkpoints, then `nit sample`
and `nit eval` run on them."""
import json
import os
import re

import numpy as np
import pytest

from nit_model.cli import build_parser, main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo"))
    assert main(["demo", "--quick", "--out", out, "--no-progress", "--threads", "1"]) == 0
    return out


def test_demo_quick_writes_the_report(demo_dir, capsys):
    report = open(os.path.join(demo_dir, "REPORT.md")).read()
    for needle in ("## Training", "| native |", "| fixed |", "## Per-resolution evaluation", "| size (HxW) |",
                   "real-vs-real FD (floor)", "Packed mixed-resolution sampling against one resolution per batch",
                   "| 16 images, 16 distinct sizes (",
                   "![loss curves](loss.png)", "samples/native/contact_sheet.png"):
        assert needle in report, needle
    for rel in ("loss.png", "samples/native/contact_sheet.png", "samples/fixed/contact_sheet.png", "results.json"):
        assert os.path.isfile(os.path.join(demo_dir, rel)), rel
    r = json.load(open(os.path.join(demo_dir, "results.json")))
    assert r["train"]["native"]["steps"] == 6 and r["train"]["fixed"]["steps"] == 6
    assert r["train"]["native"]["tokens_per_s"] > 0
    assert len(r["bench"]) == 2 and all(b["speedup"] > 0 for b in r["bench"].values())
    assert all(b["max_abs_diff"] < 1e-4 for b in r["bench"].values())  # packing changes no image
    rows = r["eval"]["rows"]
    assert [(row["height"], row["width"]) for row in rows] == [(32, 32), (16, 48), (64, 64), (96, 96)]
    assert [row["native"]["seen"] for row in rows] == [True, True, True, False]
    assert [row["fixed"]["seen"] for row in rows] == [True, False, False, False]
    assert [row["category"] for row in rows] == ["seen", "seen by native only", "seen by native only",
                                                 "unseen larger"]
    # the RoPE methods: the native model with each, the baseline with the first (the same sampler)
    assert r["eval"]["methods"] == ["auto", "normal", "yarn"]
    assert set(rows[3]["by_method"]["native"]) == {"auto", "normal", "yarn"}
    assert set(rows[3]["by_method"]["fixed"]) == {"auto"}
    assert "## RoPE scaling at the unseen sizes" in report and "| native: auto | native: normal |" in report
    for row in r["rope"]["rows"]:  # one contact-sheet row per method (auto repeats yarn)
        assert os.path.isfile(os.path.join(demo_dir, row["contact_sheet"])), row
    assert [row["method"] for row in r["rope"]["rows"]] == ["normal", "yarn"]
    # the command that repeats the evaluation by hand uses the demo's own evaluation sampler
    st = r["settings"]
    assert f"--num 32 --steps {st['eval_steps']} --cfg-scale {st['eval_cfg_scale']:g} --cfg-interval" in report


def test_demo_evaluates_with_8_euler_steps_by_default():
    from nit_model.demo import DemoSettings
    from nit_model.cli import build_parser
    from nit_model.demo import settings_from_args
    s = settings_from_args(build_parser().parse_args(["demo"]))
    assert s.eval_steps == DemoSettings().eval_steps == 8 and s.train_steps == 2400


def test_demo_records_its_precision_and_why(demo_dir):
    r = json.load(open(os.path.join(demo_dir, "results.json")))
    assert r["precision"] in ("fp32", "bf16") and r["precision_reason"]
    assert f"Precision of training and sampling: **{r['precision']}**" in open(os.path.join(demo_dir, "REPORT.md")).read()
    assert r["eval"]["settings"]["precision"] == r["precision"]


@pytest.mark.parametrize("flags, want", [({"amx_bf16", "avx512_bf16"}, "bf16"), ({"avx512_bf16"}, "fp32"),
                                         (set(), "fp32")])
def test_demo_precision_is_bf16_only_with_amx(monkeypatch, flags, want):
    import nit_model.precision as precision
    from nit_model.demo import demo_precision
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: frozenset(flags))
    got, why = demo_precision("auto")
    assert got == want and ("AMX" in why if want == "bf16" else "fp32" in why)
    assert demo_precision("fp32") == ("fp32", "chosen with --precision")
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16; got 'fp8'"):
        demo_precision("fp8")


def test_sample_cli_on_the_demo_checkpoint(demo_dir, tmp_path, capsys):
    out = str(tmp_path / "s")
    ckpt = os.path.join(demo_dir, "native")
    assert main(["sample", "--ckpt", ckpt, "--sizes", "16x16,8x24", "--labels", "2", "--num", "2", "--steps", "2",
                 "--solver", "heun", "--cfg-scale", "2", "--cfg-interval", "0.2,0.9", "--seed", "3", "--out", out,
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "sampled 4 images at 2 size(s) in 1 pack(s)" in text
    files = sorted(os.listdir(out))
    assert files == ["contact_sheet.png", "images", "samples.json", "samples_2x16x16x3.npz", "samples_2x8x24x3.npz"]
    assert sorted(os.listdir(os.path.join(out, "images")))[0] == "00000_16x16_triangle.png"
    with np.load(os.path.join(out, "samples_2x8x24x3.npz")) as z:
        assert z["arr_0"].shape == (2, 8, 24, 3) and z["arr_0"].dtype == np.uint8
    meta = json.load(open(os.path.join(out, "samples.json")))
    assert meta["settings"]["solver"] == "heun" and meta["settings"]["cfg_interval"] == [0.2, 0.9]
    # the same request again gives the same pixels
    out2 = str(tmp_path / "s2")
    main(["sample", "--ckpt", ckpt, "--sizes", "16x16,8x24", "--labels", "2", "--num", "2", "--steps", "2",
          "--solver", "heun", "--cfg-scale", "2", "--cfg-interval", "0.2,0.9", "--seed", "3", "--out", out2,
          "--no-progress", "--no-png"])
    assert not os.path.exists(os.path.join(out2, "images"))
    for name in ("samples_2x16x16x3.npz", "samples_2x8x24x3.npz"):
        with np.load(os.path.join(out, name)) as a, np.load(os.path.join(out2, name)) as b:
            np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    capsys.readouterr()
    for argv, match in ((["--sizes", "18x16"], r"18x16.*nearest valid sizes: 16x16, 20x16"),
                        (["--cfg-interval", "0.5"], "LOW,HIGH")):
        with pytest.raises(SystemExit) as e:
            main(["sample", "--ckpt", ckpt, "--out", out, "--no-progress", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("nit sample: error: ") and re.search(match, err), err


def test_sample_cli_rope_options_reach_the_sampler(demo_dir, tmp_path, capsys):
    ckpt = os.path.join(demo_dir, "native")
    base = ["sample", "--ckpt", ckpt, "--sizes", "16x16,96x32", "--num", "1", "--steps", "1", "--no-progress",
            "--no-png"]
    out = str(tmp_path / "default")
    assert main(base + ["--out", out]) == 0
    # default: auto, with the training max side of the checkpoint (64 px at patch 4)
    meta = json.load(open(os.path.join(out, "samples.json")))
    assert meta["settings"]["rope"] == {"method": "auto", "ori_max_pe_len": 16, "decouple": False}
    out = str(tmp_path / "yarn")
    assert main(base + ["--out", out, "--rope-method", "yarn", "--rope-ori-max-pe-len", "6", "--rope-decouple"]) == 0
    meta = json.load(open(os.path.join(out, "samples.json")))
    assert meta["settings"]["rope"] == {"method": "yarn", "ori_max_pe_len": 6, "decouple": True}
    out = str(tmp_path / "normal")
    assert main(base + ["--out", out, "--rope-method", "normal"]) == 0
    assert json.load(open(os.path.join(out, "samples.json")))["settings"]["rope"] == {"method": "normal"}
    capsys.readouterr()
    for argv, match in ((["--rope-method", "ntk"], "unknown RoPE method 'ntk'; choose one of normal, linear"),
                        (["--rope-method", "yarn", "--rope-ori-max-pe-len", "0"], "positive number of tokens")):
        with pytest.raises(SystemExit) as e:
            main(base + ["--out", out, *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("nit sample: error: ") and len(err.splitlines()) == 1, err
        assert re.search(match, err), err


def test_eval_cli_rope_methods_table(demo_dir, tmp_path, capsys):
    out = str(tmp_path / "e")
    assert main(["eval", "--ckpt", f"native={os.path.join(demo_dir, 'native')}", "--sizes", "32x32,96x96",
                 "--num", "2", "--steps", "1", "--num-real", "4", "--classifier-steps", "8", "--cache-dir",
                 os.path.join(demo_dir, "cache"), "--out", out, "--no-progress",
                 "--rope-methods", "normal,yarn,ntk-aware"]) == 0
    text = capsys.readouterr().out
    assert "| size (HxW) | category | normal | yarn | ntk-aware | real acc / FD floor / tiling |" in text
    assert "| 96x96 | unseen larger |" in text and "## Per RoPE method" in open(os.path.join(out, "EVAL.md")).read()
    rep = json.load(open(os.path.join(out, "eval.json")))
    assert rep["methods"] == ["normal", "yarn", "ntk-aware"]
    cells = rep["rows"][0]["by_method"]["native"]
    assert cells["normal"] == cells["yarn"] == cells["ntk-aware"]  # 32x32 is within range: sampled once
    with pytest.raises(SystemExit) as e:
        main(["eval", "--ckpt", os.path.join(demo_dir, "native"), "--rope-methods", "yarn,bogus", "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nit eval: error: unknown RoPE method 'bogus'" in err and len(err.splitlines()) == 1


def test_eval_cli_with_a_baseline(demo_dir, tmp_path, capsys):
    out = str(tmp_path / "e")
    assert main(["eval", "--ckpt", f"native={os.path.join(demo_dir, 'native')}", "--baseline-ckpt",
                 os.path.join(demo_dir, "fixed"), "--sizes", "32x32,32x96", "--num", "2", "--steps", "1",
                 "--num-real", "4", "--classifier-steps", "8", "--cache-dir", os.path.join(demo_dir, "cache"), "--out", out,
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| 32x96 | 1:3 | 192 | **unseen** |" in text and "baseline acc" in text
    rep = json.load(open(os.path.join(out, "eval.json")))
    assert set(rep["models"]) == {"native", "baseline"}
    with pytest.raises(SystemExit) as e:
        main(["eval", "--no-progress"])
    assert e.value.code == 2 and "nit eval: error: give at least one --ckpt" in capsys.readouterr().err


def test_eval_cli_no_ema_samples_the_raw_weights(demo_dir, tmp_path, capsys):
    args = ["eval", "--ckpt", f"native={os.path.join(demo_dir, 'native')}", "--sizes", "32x32", "--num", "2",
            "--steps", "1", "--num-real", "4", "--classifier-steps", "8", "--cache-dir", os.path.join(demo_dir, "cache"),
            "--no-progress"]
    sources = {}
    for flag in ([], ["--no-ema"]):
        out = str(tmp_path / ("raw" if flag else "ema"))
        assert main(args + flag + ["--out", out]) == 0
        sources[bool(flag)] = json.load(open(os.path.join(out, "eval.json")))["models"]["native"]["source"]
    capsys.readouterr()
    assert os.path.basename(sources[False]) == "ema.safetensors"
    assert os.path.basename(sources[True]) == "model.safetensors"


def test_help_explains_the_knobs(capsys):
    for cmd in ("demo", "sample", "eval", "extract-latents"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])
    text = capsys.readouterr().out
    for needle in ("--train-steps", "--quick", "--eval-num", "--cfg-interval", "--sizes", "--baseline-ckpt",
                   "--vae"):
        assert needle in text, needle


def test_auto_threads_leaves_the_cores_other_processes_use(monkeypatch):
    import torch
    from nit_model import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for busy, want in [(0.1, 8), (2.6, 5), (7.9, 1), (12.0, 1)]:
        monkeypatch.setattr(demo, "_busy_cores", lambda b=busy: b)
        assert demo.auto_threads() == want, busy


def test_busy_cores_is_a_core_count():
    from nit_model import demo

    busy = demo._busy_cores(window=0.05)
    assert 0.0 <= busy <= (os.cpu_count() or 1) + 1e-6


def test_demo_settings_take_the_guidance_interval_and_precision():
    from nit_model.demo import DemoSettings, settings_from_args
    args = build_parser().parse_args(["demo", "--cfg-interval", "0.2,0.9", "--precision", "fp32"])
    s = settings_from_args(args)
    assert s.cfg_interval == (0.2, 0.9) and s.precision == "fp32"
    d = settings_from_args(build_parser().parse_args(["demo"]))
    assert d.cfg_interval == DemoSettings().cfg_interval and d.precision == "auto"
    for bad, needle in (("0.5", "--cfg-interval is LOW,HIGH"), ("0.9,0.2", "0 <= LOW <= HIGH <= 1"),
                        ("a,b", "--cfg-interval is LOW,HIGH")):
        with pytest.raises(ValueError, match=needle):
            settings_from_args(build_parser().parse_args(["demo", "--cfg-interval", bad]))


def test_rope_rows_show_auto_when_its_method_is_not_listed(tmp_path):
    import types

    import torch

    from nit_model.demo import DemoSettings, _rope_rows
    from nit_model.rope_scaling import AUTO_METHOD
    imgs = {("native", m, (96, 96)): torch.zeros(2, 3, 96, 96) for m in ("auto", "normal", AUTO_METHOD)}
    report = types.SimpleNamespace(images=imgs)
    rows = _rope_rows(DemoSettings(out=str(tmp_path), rope_methods=("auto", "normal")), report, [(96, 96)])
    assert [r["method"] for r in rows] == [f"auto ({AUTO_METHOD} beyond the trained sides)", "normal"]
    assert all(os.path.isfile(os.path.join(str(tmp_path), r["contact_sheet"])) for r in rows)
    rows = _rope_rows(DemoSettings(out=str(tmp_path), rope_methods=("auto", AUTO_METHOD)), report, [(96, 96)])
    assert [r["method"] for r in rows] == [AUTO_METHOD]
