"""Launched by torchrun from test_distributed.py: train, then save this rank's weights and losses.

usage: python -m torch.distributed.run --nproc_per_node N ddp_worker.py OUT_DIR CONFIG_JSON
"""
import json
import os
import sys

from safetensors.torch import save_file

from nit_model.train import TrainConfig, train


def main(out: str, config_json: str) -> None:
    with open(config_json) as f:
        cfg = TrainConfig.from_dict(json.load(f))
    r = train(cfg, out_dir=os.path.join(out, "run"), progress=False)
    rank = int(os.environ["RANK"])
    save_file({k: v.detach().contiguous() for k, v in r.model.state_dict().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": r.losses, "grad_norms": [h["grad_norm"] for h in r.history], "checkpoint": r.checkpoint, "world_size": os.environ["WORLD_SIZE"]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
