"""Training: loss goes down, exact resume, atomic checkpoints, keep-last-N, EMA, config and input errors."""
import json
import math
import os

import pytest
import torch

from nit_model.weights import CheckpointMismatchError, load_model
from nit_model.cli import main as cli_main
from nit_model.data import LatentWriter
from nit_model.train import ConfigError, TrainConfig, train
from nit_model.trainer import EMA
from nit_model.trainer import checkpointing as ck
from nit_model.trainer.config import shipped_configs


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def small(**sections) -> TrainConfig:
    """tiny-shapes shrunk to a few packs of 256 tokens; 64 items (about 9 packs) per epoch, so a
    dozen steps cross epoch boundaries."""
    base = TrainConfig.from_yaml("tiny-shapes")
    cfg = base.replace(data={"num_items": 64, "min_side": 16, "max_side": 32, "token_budget": 256},
                       optim={"warmup_steps": 0, "schedule": "constant"},
                       train={"steps": 4, "log_every": 1, "ckpt_every": 1000, "num_threads": 1})
    return cfg.replace(**sections) if sections else cfg


def _steps_logged(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


# ------------------------------------------------------------------------------ learning


def test_tiny_shapes_loss_decreases(tmp_path):
    cfg = small(data={"token_budget": 512, "num_items": 2000, "max_side": 48}, optim={"warmup_steps": 5},
                train={"steps": 48, "log_every": 8})
    r = train(cfg, out_dir=tmp_path, progress=False)
    assert r.step == 48 and len(r.losses) == 48 and r.loss_steps == list(range(1, 49))
    early, late = sum(r.losses[:8]) / 8, sum(r.losses[-8:]) / 8
    # an untrained tiny NiT sits at E|eps - x|^2 ~ 1.3 with a per-step spread ~0.1: halving it is learning
    assert late < 0.6 * early, (early, late, r.losses)
    assert r.tokens_per_s > 0 and r.tokens > 48 * 256
    assert _steps_logged(tmp_path) == [8, 16, 24, 32, 40, 48]
    # the final checkpoint is complete and its weights load into a NiT of the saved config
    assert ck.is_complete(r.checkpoint)
    m = load_model(os.path.join(r.checkpoint, "model.safetensors"))
    for k, v in m.state_dict().items():
        assert torch.equal(v, r.model.state_dict()[k].cpu()), k
    ema = r.ema_model()  # the EMA weights, in a NiT for sampling; equal to the checkpoint's
    saved = load_model(os.path.join(r.checkpoint, "ema.safetensors")).state_dict()
    for k, v in ema.state_dict().items():
        assert torch.equal(v, r.ema[k]) and torch.equal(v, saved[k]), k
    assert not torch.equal(ema.final_layer.linear.weight, r.model.final_layer.linear.weight)
    for name in ("optimizer.pt", "trainer.pt"):  # no arbitrary pickles
        torch.load(os.path.join(r.checkpoint, name), weights_only=True)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule_warmup_then_decay(tmp_path, schedule):
    """The rate each step used (log.jsonl, one line per step): linear warm-up over 3 steps, then
    the schedule from the peak towards min_lr_ratio x peak, which step train.steps would reach."""
    peak, ratio, steps, warm = 2e-3, 0.1, 9, 3
    cfg = small(optim={"lr": peak, "warmup_steps": warm, "schedule": schedule, "min_lr_ratio": ratio},
                train={"steps": steps})
    train(cfg, out_dir=tmp_path, progress=False)
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        lrs = [json.loads(line)["lr"] for line in f if line.strip()]
    want = [peak * (s + 1) / warm for s in range(warm)]
    for s in range(warm, steps):
        frac = (s - warm) / (steps - warm)
        decay = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac}[schedule]
        want.append(peak * (ratio + (1 - ratio) * decay) if schedule != "constant" else peak)
    assert lrs == pytest.approx(want, rel=1e-9)
    if schedule != "constant":
        assert lrs[warm] == pytest.approx(peak) and all(a > b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    with pytest.raises(ConfigError, match=r"optim\.min_lr_ratio must lie in \[0, 1\].*got 1\.5"):
        small().apply_overrides(["optim.min_lr_ratio=1.5"])
    with pytest.raises(ConfigError, match=r"optim\.schedule must be one of constant, cosine, linear"):
        small().apply_overrides(["optim.schedule=step"])


# ------------------------------------------------------------------------------ resume


class Crash(Exception):
    pass


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: autocast, fp32 masters and checkpoints
def test_interrupted_and_resumed_run_matches_uninterrupted_bitwise(tmp_path, precision):
    cfg = small(train={"steps": 6, "grad_accum": 2, "ckpt_every": 3, "precision": precision})
    full = train(cfg, out_dir=tmp_path / "full", progress=False)

    def crash_at_5(row):
        if row["step"] == 5:
            raise Crash

    run = tmp_path / "interrupted"
    with pytest.raises(Crash):
        train(cfg, out_dir=run, progress=False, callback=crash_at_5)
    assert ck.resolve_checkpoint("latest", run).endswith("step-00000003")
    resumed = train(cfg, out_dir=run, resume="latest", progress=False)
    # CPU, num_workers=0, one thread: the same ops in the same order give the same bits
    assert resumed.loss_steps == [4, 5, 6]
    assert resumed.losses == full.losses[3:], (resumed.losses, full.losses)
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full.ema.items():
        assert torch.equal(v, resumed.ema[k]), k
    a = torch.load(os.path.join(full.checkpoint, "optimizer.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed.checkpoint, "optimizer.pt"), weights_only=True)
    for i, st in a["state"].items():
        for key in st:
            assert torch.equal(st[key], b["state"][i][key]), (i, key)
    ta = torch.load(os.path.join(full.checkpoint, "trainer.pt"), weights_only=True)
    tb = torch.load(os.path.join(resumed.checkpoint, "trainer.pt"), weights_only=True)
    assert (ta["step"], ta["epoch"], ta["pos"], ta["tokens"]) == (tb["step"], tb["epoch"], tb["pos"], tb["tokens"])
    assert ta["epoch"] >= 1  # the 12 packs crossed an epoch boundary
    # the log holds every step once: the rows of the lost steps 4-5 were replaced
    assert _steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_keep_last_and_latest(tmp_path):
    r = train(small(train={"steps": 4, "ckpt_every": 1, "keep_last": 2}), out_dir=tmp_path, progress=False)
    kept = [os.path.basename(p) for _, p in ck.list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-00000003", "step-00000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert r.checkpoint == ck.resolve_checkpoint("latest", tmp_path)
    # resuming from an older checkpoint sets the later ones aside (not mixed into `latest`)
    train(small(train={"steps": 4, "ckpt_every": 1, "keep_last": 2}), out_dir=tmp_path, progress=False,
          resume=str(tmp_path / "checkpoints" / "step-00000003"))
    kept = [os.path.basename(p) for _, p in ck.list_checkpoints(tmp_path / "checkpoints")]
    assert kept == ["step-00000003", "step-00000004"]
    aside = [d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("abandoned-")]
    assert len(aside) == 1 and os.listdir(tmp_path / "checkpoints" / aside[0]) == ["step-00000004"]
    # a run of another configuration is not resumed, mixed with nor pruned
    with pytest.raises(ConfigError, match=r"holds a run with another configuration.*train\.seed.*--overwrite"):
        train(small(train={"steps": 1, "seed": 5}), out_dir=tmp_path, progress=False)
    r = train(small(train={"steps": 1}), out_dir=tmp_path, progress=False, overwrite=True)
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [1] and _steps_logged(tmp_path) == [1]


# ------------------------------------------------------------------------------ atomic checkpoints


def _writers(tag, fail_at=None):
    def make(name):
        def write(path):
            if name == fail_at:
                with open(path, "w") as f:
                    f.write("half")
                raise OSError("disk full (simulated)")
            with open(path, "w") as f:
                f.write(f"{tag}:{name}")
        return write
    return [(n, make(n)) for n in ck.CKPT_FILES]


def test_crash_during_checkpoint_write_keeps_previous(tmp_path):
    root = str(tmp_path / "checkpoints")
    first = ck.save_checkpoint(root, 1, _writers("one"))
    with pytest.raises(OSError, match="simulated"):
        ck.save_checkpoint(root, 2, _writers("two", fail_at="optimizer.pt"))
    assert sorted(os.listdir(root)) == ["latest", "step-00000001"]
    assert ck.resolve_checkpoint("latest", str(tmp_path)) == first
    with open(os.path.join(first, "trainer.pt")) as f:
        assert f.read() == "one:trainer.pt"
    # a killed process leaves its temporary directory (and maybe an incomplete step-* copy): ignored
    debris = os.path.join(root, ".tmp-step-00000002-4242")
    os.makedirs(debris)
    open(os.path.join(debris, "model.safetensors"), "w").close()
    os.makedirs(os.path.join(root, "step-00000009"))
    open(os.path.join(root, "step-00000009", "model.safetensors"), "w").close()
    os.remove(os.path.join(root, "latest"))  # even without the pointer, only complete checkpoints count
    assert ck.resolve_checkpoint("latest", str(tmp_path)) == first
    assert ck.resolve_checkpoint(str(tmp_path)) == first
    second = ck.save_checkpoint(root, 2, _writers("two"), keep_last=5)
    assert not os.path.exists(debris)  # cleaned by the next save
    assert ck.resolve_checkpoint("latest", str(tmp_path)) == second


def test_resume_errors(tmp_path):
    with pytest.raises(ck.CheckpointNotFound, match="no complete checkpoint"):
        train(small(), out_dir=tmp_path / "empty", resume="latest", progress=False)
    with pytest.raises(ck.CheckpointNotFound, match="does not exist"):
        train(small(), out_dir=tmp_path / "x", resume=str(tmp_path / "nope"), progress=False)


# ------------------------------------------------------------------------------ other configs


def test_checkpoint_of_another_config_fails_before_training(tmp_path):
    r = train(small(train={"steps": 1}), out_dir=tmp_path / "a", progress=False)
    # AdamW's fused kernel on CPU (one pass over the weights and moments)
    assert torch.load(os.path.join(r.checkpoint, "optimizer.pt"), weights_only=True)["param_groups"][0]["fused"]
    other = small(model={"depth": 2}, train={"steps": 3})
    with pytest.raises(ConfigError, match=r"model\.depth: checkpoint 4, now 2"):
        train(other, out_dir=tmp_path / "a", resume="latest", progress=False)
    with pytest.raises(ConfigError, match=r"data\.token_budget"):
        train(small(data={"token_budget": 512}), out_dir=tmp_path / "a", resume="latest", progress=False)
    with pytest.raises(CheckpointMismatchError, match=r"train\.init_from.*missing key\(s\).*blocks\.4"):
        train(small(model={"depth": 6}, train={"init_from": r.checkpoint}), out_dir=tmp_path / "b", progress=False)
    assert not os.path.exists(tmp_path / "b" / "checkpoints")
    # optimizer hyper-parameters may change on resume, and the new ones apply
    more = train(small(train={"steps": 2}, optim={"weight_decay": 0.5, "lr": 3e-3}), out_dir=tmp_path / "a",
                 resume="latest", progress=False)
    groups = torch.load(os.path.join(more.checkpoint, "optimizer.pt"), weights_only=True)["param_groups"]
    assert (groups[0]["weight_decay"], groups[0]["lr"]) == (0.5, 3e-3)
    # init_from a checkpoint of the same architecture starts from its EMA weights
    fine = train(small(train={"steps": 1, "init_from": r.checkpoint}), out_dir=tmp_path / "c", progress=False)
    assert fine.step == 1


# ------------------------------------------------------------------------------ EMA


def test_ema_update_is_the_formula_with_foreach(monkeypatch):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    ema = EMA(model, decay=0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters())]
    assert len(calls) == 3  # one multi-tensor op per update, not one per parameter
    sd = ema.state_dict()
    for (name, p), e in zip(model.named_parameters(), expected):
        torch.testing.assert_close(sd[name], e, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(sd[name], p)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


# ------------------------------------------------------------------------------ config and data errors


def test_config_errors_name_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train\.stepz; valid keys of 'train': steps, grad_accum"):
        small().apply_overrides(["train.stepz=3"])
    with pytest.raises(ConfigError, match="unknown section.*'trian'.*valid sections: model, data"):
        TrainConfig.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"train\.steps must be an integer, got 'abc'"):
        small().apply_overrides(["train.steps=abc"])
    with pytest.raises(ConfigError, match=r"model: NiTConfig: unknown key\(s\) 'dept'; known keys: .*depth"):
        small().apply_overrides(["model.dept=2"])
    with pytest.raises(ConfigError, match=r"data\.packing must be one of lpfhp, ffd"):
        small().apply_overrides(["data.packing=best"])
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        small().apply_overrides(["data.kind=latents"])
    with pytest.raises(ConfigError, match=r"data\.min_side=2 px is smaller than one patch \(model\.patch_size=4\)"):
        small().apply_overrides(["data.min_side=2"])
    with pytest.raises(ConfigError, match=r"model\.class_dropout_prob"):
        small().apply_overrides(["model.class_dropout_prob=0", "flow.label_dropout=0.1"])
    with pytest.raises(ConfigError, match="no config file"):
        TrainConfig.from_yaml("no-such-config")
    # overrides parse as YAML; floats written without a dot are accepted
    cfg = small().apply_overrides(["optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "train.steps=7"])
    assert (cfg.optim.lr, cfg.optim.betas, cfg.train.steps) == (3e-4, (0.8, 0.9), 7)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_shipped_configs_and_lr_scaling():
    assert {"tiny-shapes", "nit-s", "nit-b", "nit-l", "nit-xl", "nit-xxl"} <= set(shipped_configs())
    depths = {}
    for name in ("nit-s", "nit-b", "nit-l", "nit-xl", "nit-xxl"):
        cfg = TrainConfig.from_yaml(name)
        o = cfg.optim
        assert (o.lr, o.base_packs, o.betas, o.weight_decay, o.eps, o.max_grad_norm, cfg.ema.decay) == \
            (5e-5, 4, (0.9, 0.95), 1e-2, 1e-6, 1.0, 0.9999)
        assert cfg.data.kind == "latents" and cfg.nit_config().in_channels == 32
        depths[name] = cfg.nit_config().depth
        # linear scaling with the packs per step: 8 GPUs x 2 accumulations = 16 packs -> 4x the base lr
        assert cfg.replace(train={"grad_accum": 2}).lr(world_size=8) == pytest.approx(2e-4)
    assert depths == {"nit-s": 12, "nit-b": 12, "nit-l": 24, "nit-xl": 28, "nit-xxl": 40}


def _write_latents(root, sizes, channels=32, classes=3):
    g = torch.Generator().manual_seed(0)
    with LatentWriter(str(root), shard_size=8, dtype=torch.float32, meta={"classes": [str(i) for i in range(classes)]}) as w:
        for i, (h, w_) in enumerate(sizes):
            w.add(i, torch.randn(channels, h, w_, generator=g), i % classes, f"img{i}.png")


def test_bad_data_fails_before_the_first_step(tmp_path):
    nit_s = TrainConfig.from_yaml("nit-s")
    with pytest.raises(ConfigError, match="data.path: latent folder .* does not exist"):
        train(nit_s, out_dir=tmp_path / "run", progress=False)
    root = tmp_path / "lat"
    _write_latents(root, [(4, 6), (1, 3), (5, 5)])
    two = nit_s.replace(data={"path": str(root), "token_budget": 64}, model={"patch_size": 2, "num_classes": 3})
    with pytest.raises(ConfigError, match=r"item 1 of the data is 1x3, smaller than one patch \(model.patch_size=2\)"):
        train(two, out_dir=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"the data has 32 channels but model.in_channels=4"):
        train(nit_s.replace(data={"path": str(root)}, model={"in_channels": 4}), out_dir=tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match=r"exceed the budget of 16 tokens"):
        train(nit_s.replace(data={"path": str(root), "token_budget": 16}), out_dir=tmp_path / "run", progress=False)
    assert not os.path.exists(tmp_path / "run")
    # an image folder with an image smaller than one patch (tiny: 4 px)
    from PIL import Image
    (tmp_path / "img" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 12)).save(tmp_path / "img" / "cat" / "ok.png")
    Image.new("RGB", (3, 9)).save(tmp_path / "img" / "cat" / "small.png")
    folder = small(data={"kind": "folder", "path": str(tmp_path / "img")})
    with pytest.raises(ConfigError, match=r"small\.png.*smaller than one stride \(4 px\)"):
        train(folder, out_dir=tmp_path / "run", progress=False)
    assert not os.path.exists(tmp_path / "run")


def test_nit_s_trains_on_latents(tmp_path):
    root = tmp_path / "lat"
    _write_latents(root, [(4, 6), (3, 3), (5, 5), (2, 7), (6, 4), (1, 1), (8, 8), (3, 5)])
    cfg = TrainConfig.from_yaml("nit-s").replace(data={"path": str(root), "token_budget": 96, "num_workers": 0},
                                                 train={"steps": 2, "log_every": 1, "num_threads": 1})
    r = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert r.step == 2 and all(torch.isfinite(torch.tensor(r.losses)))
    assert r.history[0]["lr"] == pytest.approx(5e-5 / 4)  # one pack per step, base 4 packs
    assert load_model(os.path.join(r.checkpoint, "ema.safetensors")).config.hidden_size == 384


# ------------------------------------------------------------------------------ numerics and REPA


def test_bf16_autocast_step_on_cpu(tmp_path):
    cfg = small(model={"depth": 1, "encoder_depth": 1}, data={"token_budget": 64, "max_side": 16},
                train={"steps": 2, "precision": "bf16"})
    r = train(cfg, out_dir=tmp_path / "bf16", progress=False)
    assert all(torch.isfinite(torch.tensor(r.losses)))
    assert all(p.dtype == torch.float32 for p in r.model.parameters())  # fp32 master weights
    fp32 = train(cfg.replace(train={"precision": "fp32"}), out_dir=tmp_path / "fp32", progress=False)
    # step 1 predicts zeros either way (adaLN-Zero init); step 2 runs bf16 matmuls under autocast
    assert r.losses[0] == fp32.losses[0] and r.losses[1] != fp32.losses[1]
    assert r.losses[1] == pytest.approx(fp32.losses[1], rel=2e-2)


class RandomFeatures:
    """A stand-in REPA encoder: a fixed random projection of each clean token to z_dim."""

    def __init__(self, in_dim, z_dim):
        self.w = torch.randn(in_dim, z_dim, generator=torch.Generator().manual_seed(3))

    def __call__(self, x, packed):
        return x.reshape(x.shape[0], -1) @ self.w


def test_repa_projection_loss_trains_the_projector(tmp_path):
    cfg = small(train={"steps": 2}, flow={"dir_weight": 0.5})
    r = train(cfg, out_dir=tmp_path / "a", progress=False, encoder=RandomFeatures(48, 64))
    row = r.history[-1]
    assert row["proj"] is not None and 0 < row["proj"] <= 2 and row["dir"] is not None
    assert row["loss"] == pytest.approx(row["mse"] + 0.5 * row["dir"] + row["proj"], rel=1e-5)
    plain = train(cfg.replace(train={"steps": 1}), out_dir=tmp_path / "b", progress=False)
    assert plain.history[-1]["proj"] is None
    assert not any(p.requires_grad for p in plain.model.projector.parameters())  # unused without REPA: frozen
    assert not torch.equal(r.model.projector[0].weight, plain.model.projector[0].weight)
    with pytest.raises(ConfigError, match=r"features of shape .* expected \[N, model.z_dim\]"):
        train(cfg, out_dir=tmp_path / "c", progress=False, encoder=RandomFeatures(48, 5))


# ------------------------------------------------------------------------------ command line


def test_cli_train_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--config", "tiny-shapes", "--out", str(out), "--no-progress", "--set", "train.steps=2",
            "--set", "data.token_budget=128", "--set", "data.max_side=32", "--set", "train.num_threads=1"]
    assert cli_main(args) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert ck.resolve_checkpoint("latest", str(out)).endswith("step-00000002")
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--config", "tiny-shapes", "--set", "train.stepz=1"])
    assert e.value.code == 2
    assert "valid keys of 'train': steps" in capsys.readouterr().err
