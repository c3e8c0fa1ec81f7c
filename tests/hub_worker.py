"""Worker for tests/test_hub.py (under torchrun, gloo): rank 0 waits 1 s, then every rank resolves the hub id;
each writes when it called, when rank 0 started, when it got its snapshot folder, and the folder."""

import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ptrain.config import parse_config
from ptrain.hub import resolve_model_sources

repo, out = sys.argv[1], Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()
m = parse_config(["--pretrained_model_name_or_path", repo]).model
called = time.time()
if rank == 0:
    time.sleep(1.0)
start = time.time()
resolve_model_sources(m, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
record = {"called": called, "start": start, "resolved": time.time(), "folder": m.pretrained_model_name_or_path}
(out / f"rank{rank}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
