"""Per-resolution evaluation: which sizes a run saw, the table, and the whole pipeline on random
models (the Fréchet distance itself is tested on Gaussians in test_frechet.py)."""
import json
import math
import types

import pytest
import torch

from nit_model.model_config import NiTConfig
from nit_model.evaluate import (EvalReport, evaluate_models, markdown_table, method_summary, method_table,
                                parse_named_checkpoints, seen_in_training, size_category, training_palette)
from nit_model.model import NiT
from nit_model.shapes_eval import ClassifierConfig, train_classifier
from nit_model.train import TrainConfig


def test_seen_sizes_follow_the_training_data():
    native = TrainConfig.from_yaml("tiny-shapes")  # 16-64 px, aspect <= 3, patch 4
    assert seen_in_training((32, 32), native) and seen_in_training((16, 48), native)
    assert seen_in_training((64, 64), native) and seen_in_training((64, 24), native)
    assert not seen_in_training((96, 96), native)      # larger than any side trained on
    assert not seen_in_training((16, 64), native)      # 1:4, beyond the trained aspect ratio
    assert not seen_in_training((12, 12), native)      # smaller than min_side
    fixed = native.apply_overrides(["data.min_side=32", "data.max_side=32", "data.max_aspect=1.0"])
    assert seen_in_training((32, 32), fixed) and not seen_in_training((32, 64), fixed)
    assert seen_in_training((32, 32), None) is None


def test_training_palette_follows_the_checkpoints():
    mono = TrainConfig.from_yaml("tiny-shapes")  # the demo's recipe draws white on black
    colour = mono.apply_overrides(["data.shapes_palette=colour"])

    def run(tc):  # the part of a SamplingModel that training_palette reads
        return types.SimpleNamespace(train_config=tc)

    assert mono.data.shapes_palette == "mono"
    assert training_palette({"a": run(mono), "b": run(mono), "bare": run(None)}) == "mono"
    assert training_palette({"a": run(colour)}) == "colour"
    assert training_palette({"bare": run(None)}) == "colour"  # nothing recorded: the dataset's default
    with pytest.raises(ValueError, match=r"different shapes palettes \(a: mono, b: colour\)"):
        training_palette({"a": run(mono), "b": run(colour)})
    assert ClassifierConfig(palette="mono").key() != ClassifierConfig().key()  # one cached judge per palette


def _report():
    rows = [{"height": 32, "width": 32, "tokens": 64, "floor": 1.0, "real_accuracy": 1.0,
             "a": {"accuracy": 0.9, "frechet": 2.0, "seen": True}, "b": {"accuracy": 0.8, "frechet": 3.0, "seen": True}},
            {"height": 32, "width": 96, "tokens": 192, "floor": 1.5, "real_accuracy": 0.95,
             "a": {"accuracy": 0.7, "frechet": 4.0, "seen": False}, "b": {"accuracy": 0.2, "frechet": 9.0, "seen": False}},
            {"height": 128, "width": 128, "tokens": 1024, "floor": 1.2, "real_accuracy": 1.0,
             "a": {"accuracy": 0.5, "frechet": 8.0, "seen": False}, "b": {"accuracy": 0.6, "frechet": 6.0, "seen": False}}]
    settings = dict(num=8, steps=4, solver="euler", cfg_scale=1.0, cfg_interval=[0, 1], seed=0, num_real=16)
    return EvalReport(rows, {"a": {}, "b": {}}, settings)


def test_summary_and_table():
    rep = _report()
    s = rep.summary()
    assert s["a"]["seen_sizes"] == 1 and s["a"]["unseen_sizes"] == 2
    assert s["a"]["unseen_frechet"] == pytest.approx(6.0) and s["b"]["unseen_frechet"] == pytest.approx(7.5)
    assert s["a"]["unseen_accuracy"] == pytest.approx(0.6)
    assert s["a"]["best_frechet_sizes"] == 2 and s["b"]["best_frechet_sizes"] == 1
    md = markdown_table(rep)
    lines = md.splitlines()
    assert lines[0].startswith("| size (HxW) | aspect | tokens | a: seen? | a acc | a FD |")
    assert "| 32x96 | 1:3 | 192 | **unseen** | 70% | **4.00** | **unseen** | 20% | 9.00 | 95% | 1.50 |" in md
    assert "| 128x128 | 1:1 | 1024 |" in md and "**6.00**" in md


def _cell(acc, fd, tiling, seen):
    return {"accuracy": acc, "frechet": fd, "tiling": tiling, "seen": seen}


def test_method_table_marks_the_best_cell_of_each_row_and_the_best_method():
    rows = [{"height": 32, "width": 32, "floor": 1.0, "real_accuracy": 1.0, "real_tiling": 0.01, "category": "seen",
             "by_method": {"n": {"normal": _cell(0.9, 2.0, 0.0, True), "yarn": _cell(0.9, 2.0, 0.0, True)}}},
            {"height": 128, "width": 128, "floor": 1.2, "real_accuracy": 1.0, "real_tiling": 0.02,
             "category": "unseen larger",
             "by_method": {"n": {"normal": _cell(0.3, 9.0, 0.8, False), "yarn": _cell(0.7, 5.0, 0.05, False)}}},
            {"height": 16, "width": 64, "floor": 1.1, "real_accuracy": 1.0, "real_tiling": 0.0,
             "category": "unseen aspect",
             "by_method": {"n": {"normal": _cell(0.6, 4.0, 0.1, False), "yarn": _cell(0.6, 4.5, 0.1, False)}}}]
    for r in rows:
        r["n"] = r["by_method"]["n"]["normal"]
    rep = EvalReport(rows, {"n": {}}, dict(num=8), ["normal", "yarn"])
    s = method_summary(rep)
    assert s["best"] == {"n": "yarn"}
    assert s["n"]["yarn"]["unseen_accuracy"] == pytest.approx(0.65) and s["n"]["normal"]["unseen_tiling"] == 0.45
    md = method_table(rep)
    assert md.splitlines()[0] == "| size (HxW) | category | normal | yarn | real acc / FD floor / tiling |"
    assert "| 128x128 | unseen larger | 30% / 9.0 / 0.80 | **70% / 5.0 / 0.05** | 100% / 1.2 / 0.02 |" in md
    assert "| 16x64 | unseen aspect | **60% / 4.0 / 0.10** | 60% / 4.5 / 0.10 |" in md  # a tie: lower FD
    assert "**yarn** (best at unseen sizes)" in md


def test_size_categories():
    def row(h, w, **seen):
        return {"height": h, "width": w, **{n: {"seen": v} for n, v in seen.items()}}

    native = TrainConfig.from_yaml("tiny-shapes")
    models = {"native": types.SimpleNamespace(train_config=native),
              "fixed": types.SimpleNamespace(train_config=native.apply_overrides(["data.max_side=32"]))}
    names = ["native", "fixed"]
    assert size_category(row(32, 32, native=True, fixed=True), names, models) == "seen"
    assert size_category(row(64, 64, native=True, fixed=False), names, models) == "seen by native only"
    assert size_category(row(128, 128, native=False, fixed=False), names, models) == "unseen larger"
    assert size_category(row(16, 64, native=False, fixed=False), names, models) == "unseen aspect"
    assert size_category(row(16, 64, native=None), ["native"]) == "unseen"


def test_parse_named_checkpoints():
    assert parse_named_checkpoints(["native=runs/a", "runs/b/"]) == {"native": "runs/a", "b": "runs/b/"}
    with pytest.raises(ValueError, match="two checkpoints are named"):
        parse_named_checkpoints(["x=runs/a", "x=runs/b"])


def test_evaluate_models_end_to_end_on_random_models():
    torch.manual_seed(0)
    cfg = NiTConfig.from_name("tiny", depth=1, encoder_depth=1, hidden_size=32, num_heads=2, num_classes=6)
    models = {"m1": NiT(cfg).eval(), "m2": NiT(cfg).eval()}
    judge = train_classifier(ClassifierConfig(steps=3, batch=8))
    rep = evaluate_models(models, "16x16,8x24", num=3, steps=1, num_real=6, classifier=judge, progress=False)
    assert [(r["height"], r["width"], r["tokens"]) for r in rep.rows] == [(16, 16, 16), (8, 24, 12)]
    for r in rep.rows:
        for n in ("m1", "m2"):
            assert 0.0 <= r[n]["accuracy"] <= 1.0 and math.isfinite(r[n]["frechet"]) and r[n]["frechet"] >= 0
            assert r[n]["seen"] is None  # a bare module has no training config
        assert math.isfinite(r["floor"])
    assert rep.models["m1"]["images"] == 6 and rep.models["m1"]["packs"] == 1
    assert "| 16x16 | 1:1 | 16 |" in markdown_table(rep) and "(colour palette)" in markdown_table(rep)
    assert rep.settings["classifier"]["palette"] == "colour"  # bare modules record none: the default
    mono = evaluate_models(models, "16x16", num=2, steps=1, num_real=4, classifier=judge, palette="mono",
                           progress=False)
    assert mono.settings["classifier"]["palette"] == "mono" and "(mono palette)" in markdown_table(mono)
    with pytest.raises(ValueError, match="unknown palette 'sepia'"):
        evaluate_models(models, "16x16", num=2, classifier=judge, palette="sepia", progress=False)
    # several RoPE methods: sizes within the trained range are sampled once and shared
    cfg16 = NiTConfig.from_name("tiny", depth=1, encoder_depth=1, hidden_size=32, num_heads=2, num_classes=6,
                                rope_ori_max_pe_len=4)  # the training max side, as a checkpoint records it
    m = NiT(cfg16).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    multi = evaluate_models({"m": m}, "16x16,32x32", num=2, steps=1, num_real=4, classifier=judge, progress=False,
                            rope_methods="normal,yarn,auto")
    assert multi.methods == ["normal", "yarn", "auto"]
    small, large = (r["by_method"]["m"] for r in multi.rows)
    assert small["normal"] == small["yarn"] == small["auto"] and large["yarn"] == large["auto"]
    assert large["normal"] != large["yarn"]
    assert multi.models["m"]["images"] == 6  # 16x16 once, 32x32 with normal and with yarn
    assert all(math.isfinite(c["tiling"]) for c in large.values())
    assert "| 32x32 |" in method_table(multi)
    # methods per model: the baseline sampled with one, the other with two; the table leaves no hole
    per = evaluate_models({"m": m, "base": m}, "32x32", num=2, steps=1, num_real=4, classifier=judge,
                          progress=False, rope_methods={"m": "normal,yarn", "base": ["auto"]})
    assert per.methods == ["normal", "yarn", "auto"] and set(per.rows[0]["by_method"]["base"]) == {"auto"}
    assert per.rows[0]["by_method"]["base"]["auto"] == per.rows[0]["by_method"]["m"]["yarn"]  # same model, seeds
    assert "m: normal | m: yarn | base: auto |" in method_table(per)
    # the first samples of every (model, method, size) kept for the caller; sizes a method leaves
    # alone show the same images under every method
    kept = evaluate_models({"m": m}, "16x16,32x32", num=3, steps=1, num_real=4, classifier=judge, progress=False,
                           rope_methods="normal,yarn", keep_images=2)
    assert set(kept.images) == {("m", meth, hw) for meth in ("normal", "yarn") for hw in ((16, 16), (32, 32))}
    assert kept.images[("m", "yarn", (32, 32))].shape == (2, 3, 32, 32)
    assert torch.equal(kept.images[("m", "normal", (16, 16))], kept.images[("m", "yarn", (16, 16))])
    assert not torch.equal(kept.images[("m", "normal", (32, 32))], kept.images[("m", "yarn", (32, 32))])
    assert multi.images == {} and "images" not in json.loads(kept.to_json())
    with pytest.raises(ValueError, match="keep_images must be a number of images >= 0, got -1"):
        evaluate_models({"m": m}, "16x16", num=2, classifier=judge, progress=False, keep_images=-1)
    # bf16 sampling runs where the CPU can (autocast); the same cells' structure
    bf = evaluate_models({"m": m}, "16x16", num=2, steps=1, num_real=4, classifier=judge, progress=False,
                         precision="bf16")
    assert bf.settings["precision"] == "bf16" and math.isfinite(bf.rows[0]["m"]["frechet"])
    with pytest.raises(ValueError, match="names model.s. nobody that are not evaluated"):
        evaluate_models({"m": m}, "32x32", num=2, classifier=judge, progress=False, rope_methods={"nobody": "yarn"})
    with pytest.raises(ValueError, match="num must be >= 2"):
        evaluate_models(models, "16x16", num=1, classifier=judge, progress=False)
    latent = NiT(NiTConfig.from_name("tiny", in_channels=4, patch_size=1, depth=1, encoder_depth=1, hidden_size=32, num_heads=2))
    with pytest.raises(ValueError, match="RGB pixel model"):
        evaluate_models({"lat": latent}, "16x16", num=2, classifier=judge, progress=False)
