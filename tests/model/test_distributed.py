"""Two CPU processes on gloo (torchrun) against one process accumulating the same packs."""
import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from nit_model.model import NiT
from nit_model.train import TrainConfig, train

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_stay_in_sync_and_match_one_process(tmp_path):
    # 400 shapes of 16-32 px in packs of 256 tokens: ~50 packs an epoch, so the 8 packs of the
    # run stay inside epoch 0 (where rank r's k-th pack is the single process's pack 2k + r)
    cfg = TrainConfig.from_yaml("tiny-shapes").replace(
        data={"num_items": 400, "min_side": 16, "max_side": 32, "token_budget": 256},
        optim={"warmup_steps": 0}, train={"steps": 4, "log_every": 1, "ckpt_every": 1000, "num_threads": 1})
    cfg_path = tmp_path / "config.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), WORKER, str(tmp_path), str(cfg_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    w = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert out[0]["world_size"] == "2"
    # DDP: both ranks apply the same all-reduced gradient, so their weights are identical
    for k in w[0]:
        assert torch.equal(w[0][k], w[1][k]), k
    assert out[0]["losses"] == out[1]["losses"] and len(out[0]["losses"]) == 4
    assert out[0]["checkpoint"] == out[1]["checkpoint"] and out[0]["checkpoint"].endswith("step-00000004")

    # one process accumulating the same two packs per step: the same steps up to float rounding
    # (gloo sums the two ranks' gradients, the single process adds them into .grad: different order)
    single = train(cfg.replace(train={"grad_accum": 2}), out_dir=tmp_path / "single", progress=False)
    # the gradient itself (its norm before clipping), which Adam's scale invariance would hide from the weights
    torch.testing.assert_close(torch.tensor([h["grad_norm"] for h in single.history]),
                               torch.tensor(out[0]["grad_norms"]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(single.losses), torch.tensor(out[0]["losses"]), rtol=1e-5, atol=1e-6)
    sd = single.model.state_dict()
    for k, v in w[0].items():
        torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # the steps moved the weights far beyond that tolerance, so the comparison can fail
    torch.manual_seed(cfg.train.seed)
    fresh = NiT(cfg.nit_config()).state_dict()
    assert max((sd[k] - fresh[k]).abs().max().item() for k in fresh) > 1e-3
