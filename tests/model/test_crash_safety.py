"""kill -9 a trainer at random moments (before its first checkpoint, between checkpoints and in the
middle of writing one), rerun the one unchanged command each time, and get the weights of an
uninterrupted run bit for bit."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from nit_model.train import TrainConfig, train
from nit_model.trainer import checkpointing as ck

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = ["data.num_items=64", "data.max_side=32", "data.token_budget=256", "train.num_threads=1",
             "optim.warmup_steps=0", "train.log_every=1", "train.steps=10", "train.ckpt_every=2", "train.keep_last=2"]


def _command(out):
    args = [sys.executable, "-m", "nit_model", "train", "--config", "tiny-shapes", "--out", str(out), "--no-progress"]
    for o in OVERRIDES:
        args += ["--set", o]
    return args


def _env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["NIT_TEST_CHECKPOINT_PAUSE_S"] = "0.15"  # each checkpoint takes ~1 s: room to kill inside it
    return e


def _mid_checkpoint(root):
    return os.path.isdir(root) and any(n.startswith(".tmp-step-") for n in os.listdir(root))


@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_same_command_gives_the_uninterrupted_weights(tmp_path):
    rng = random.Random(1234)
    ref = train(TrainConfig.from_yaml("tiny-shapes", overrides=OVERRIDES), out_dir=tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    root = str(run / "checkpoints")
    # when to kill: a random time after start, or as soon as a checkpoint is being written
    plan = ["time", "checkpoint", "time", "checkpoint"]
    kills = []
    for how in plan:
        proc = subprocess.Popen(_command(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.monotonic()
        delay = rng.uniform(1.0, 4.0)
        while proc.poll() is None:
            if (how == "time" and time.monotonic() - t0 > delay) or (how == "checkpoint" and _mid_checkpoint(root)):
                if how == "checkpoint":
                    time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the save
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (-signal.SIGKILL, 0), (how, proc.returncode, err[-3000:])
        kills.append((how, proc.returncode, ck.list_checkpoints(root)[-1][0] if ck.list_checkpoints(root) else 0))
        if proc.returncode == 0:  # finished before the moment came
            break
    assert any(how == "checkpoint" and rc == -signal.SIGKILL for how, rc, _ in kills), kills
    done = subprocess.run(_command(run), env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    final = ck.resolve_checkpoint("latest", str(run))
    assert final.endswith("step-00000010"), (final, kills)
    got = load_file(os.path.join(final, "model.safetensors"))
    want = ref.model.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), (k, kills)
    ema = load_file(os.path.join(final, "ema.safetensors"))
    for k, v in ref.ema.items():
        assert torch.equal(ema[k], v), (k, kills)
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
