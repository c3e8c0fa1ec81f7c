"""Runs ptrain.planner.simulate on real tensors in a real gloo process group (launched by tests/test_planner.py)."""

import json
import sys

import torch.distributed as dist

from ptrain.planner import simulate

if __name__ == "__main__":
    model_dir, *flags = sys.argv[1:]
    dist.init_process_group("gloo")
    res = simulate(flags, dist.get_world_size(), model_dir, fake=False, vae_phases=False)
    if dist.get_rank() == 0:
        print("PLANRESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()
