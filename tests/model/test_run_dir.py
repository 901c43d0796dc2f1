"""Run directories: one trainer at a time (an OS lock a kill -9 releases), one command that resumes
in every state (--resume auto), damaged checkpoints skipped and moved aside, debris removed,
one file mode, and `nit ckpt list|verify`."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from nit_model.cli import main as cli_main
from nit_model.train import ConfigError, TrainConfig, train
from nit_model.trainer import checkpointing as ck
from nit_model.trainer.rundir import RunDirLocked, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config", "tiny-shapes", "--no-progress", "--set", "data.num_items=64", "--set", "data.max_side=32",
        "--set", "data.token_budget=256", "--set", "train.num_threads=1", "--set", "optim.warmup_steps=0",
        "--set", "train.log_every=1"]


def small(**train_keys) -> TrainConfig:
    return TrainConfig.from_yaml("tiny-shapes", overrides=[a for a in TINY[4:] if a != "--set"]).replace(
        train={"ckpt_every": 1, "keep_last": 5, **train_keys})


def nit_proc(*args, env=None):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "nit_model", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e)


def _wait_for(pred, timeout=60.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_trainer_is_refused_and_kill_9_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    a = nit_proc("train", *TINY, "--out", run, "--set", "train.steps=100000", "--set", "train.ckpt_every=100000")
    try:
        lock = run / ".lock"
        _wait_for(lambda: lock.exists() and f"pid {a.pid}" in lock.read_text())
        t0 = time.monotonic()
        b = nit_proc("train", *TINY, "--out", run, "--set", "train.steps=3")
        out, err = b.communicate(timeout=120)
        assert b.returncode == 2, (b.returncode, err[-2000:])
        assert f"is in use by another trainer (pid {a.pid} on host {socket.gethostname()})" in err, err
        assert "Traceback" not in err and time.monotonic() - t0 < 60
        assert a.poll() is None  # the first trainer goes on
    finally:
        a.send_signal(signal.SIGKILL)
        a.communicate(timeout=60)
    assert a.returncode == -signal.SIGKILL
    with RunLock(str(run)):  # the kernel released the dead trainer's lock: taken at once
        pass
    # in-process: a held lock refuses train() before it touches the directory
    with RunLock(str(run)):
        with pytest.raises(RunDirLocked, match=rf"pid {os.getpid()} on host"):
            train(small(steps=1), out_dir=run, progress=False)


def test_resume_auto_is_one_command_for_every_state(tmp_path, capsys):
    run = str(tmp_path / "run")
    cmd = ["train", *TINY, "--out", run, "--set", "train.ckpt_every=2"]
    assert cli_main(cmd + ["--set", "train.steps=2"]) == 0  # empty directory: starts afresh
    assert "trained to step 2" in capsys.readouterr().out
    assert cli_main(cmd + ["--set", "train.steps=4"]) == 0  # the same command with more steps: resumes
    out = capsys.readouterr().out
    assert "resuming from" in out and "step-00000002" in out and "trained to step 4" in out
    # killed before its first checkpoint (only a log and config): starts afresh, no error
    fresh = str(tmp_path / "fresh")
    os.makedirs(fresh)
    open(os.path.join(fresh, "log.jsonl"), "w").write('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    r = train(small(steps=2), out_dir=fresh, progress=False)
    assert r.step == 2 and r.loss_steps == [1, 2]
    # a different configuration is refused with the difference named; --overwrite replaces it
    with pytest.raises(SystemExit) as e:
        cli_main(cmd + ["--set", "train.steps=4", "--set", "train.seed=7"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds a run with another configuration" in err and "train.seed" in err, err
    assert cli_main(cmd + ["--set", "train.steps=1", "--set", "train.seed=7", "--overwrite"]) == 0
    assert [s for s, _ in ck.list_checkpoints(os.path.join(run, "checkpoints"))] == [1]


def test_damaged_checkpoints_are_skipped_moved_aside_and_training_goes_on(tmp_path, capsys):
    run = tmp_path / "run"
    full = train(small(steps=4), out_dir=tmp_path / "full", progress=False)
    train(small(steps=3), out_dir=run, progress=False)
    root = run / "checkpoints"
    mode = ck.file_mode()
    for step in (1, 2, 3):
        names = sorted(os.listdir(root / ck.checkpoint_name(step)))
        assert names == sorted([*ck.CKPT_FILES, ck.MANIFEST])
        assert {oct(os.stat(root / ck.checkpoint_name(step) / n).st_mode & 0o777) for n in names} == {oct(mode)}
    m3 = root / "step-00000003" / "model.safetensors"
    m3.write_bytes(m3.read_bytes()[:1000])  # truncated
    o2 = root / "step-00000002" / "optimizer.pt"
    data = bytearray(o2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    o2.write_bytes(bytes(data))
    assert "model.safetensors has 1000 bytes" in ck.verify_checkpoint(str(root / "step-00000003"))[0]
    assert "optimizer.pt does not match its sha256" in ck.verify_checkpoint(str(root / "step-00000002"))[0]
    # debris of a killed save and of a killed pointer update; a step re-saved in place and killed
    # between its two renames leaves the only copy of step 1 in .tmp-old-*: it is put back
    os.makedirs(root / ".tmp-step-00000004-999")
    (root / "latest.tmp-999").write_text("x")
    os.rename(root / "step-00000001", root / ".tmp-old-step-00000001-999")
    capsys.readouterr()
    r = train(small(steps=4), out_dir=run, progress=False)
    err = capsys.readouterr().err
    assert "step-00000003 is damaged (model.safetensors has 1000 bytes" in err and "corrupt-step-00000003" in err
    assert "step-00000002 is damaged (optimizer.pt does not match" in err
    assert r.loss_steps == [2, 3, 4]  # resumed from step 1, the newest undamaged checkpoint
    for k, v in full.model.state_dict().items():  # and reached what an undamaged run reaches
        assert torch.equal(v, r.model.state_dict()[k]), k
    names = sorted(os.listdir(root))
    assert "corrupt-step-00000003" in names and "corrupt-step-00000002" in names
    assert not any(n.startswith(".tmp-") or n.startswith("latest.tmp") for n in names), names
    # sampling from the run directory skips a damaged newest checkpoint too (read-only: not moved)
    from nit_model.sampling import load_sampling_model
    e4 = root / "step-00000004" / "ema.safetensors"
    e4.write_bytes(e4.read_bytes()[:-8])
    capsys.readouterr()
    sm = load_sampling_model(str(run))
    assert sm.source.endswith(os.path.join("step-00000003", "ema.safetensors")), sm.source
    assert "step-00000004 is damaged (ema.safetensors has" in capsys.readouterr().err
    assert (root / "step-00000004").is_dir()
    # a damaged checkpoint named directly is an error, not a silent fallback
    with pytest.raises(ck.CheckpointNotFound, match="is damaged"):
        ck.resolve_checkpoint(str(root / "corrupt-step-00000003"))


def test_nit_ckpt_list_and_verify(tmp_path, capsys):
    run = tmp_path / "run"
    train(small(steps=2), out_dir=run, progress=False)
    assert cli_main(["ckpt", "verify", str(run)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2
    os.makedirs(run / "checkpoints" / "abandoned-20260101-000000" / "step-00000009")
    (run / "checkpoints" / "step-00000002" / "ema.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(SystemExit) as e:
        cli_main(["ckpt", "verify", str(run)])
    out = capsys.readouterr().out
    assert e.value.code == 1 and "step-00000002: damaged (ema.safetensors has 10 bytes" in out, out
    assert cli_main(["ckpt", "list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step-00000001" in out and "abandoned-20260101-000000" in out and "latest -> step-00000002" in out, out
