"""Data parallelism with FSDP2: fully_shard (FSDP / HSDP) or FSDP2-style replicate (DDP).

Every repeated block becomes its own communication group, then the root takes
the remaining parameters. Parameters are held in float32 (or the loaded dtype
for frozen weights), computed in --transformer_dtype, and gradients are reduced
in float32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ptrain.parallel.dims import Meshes, ParallelDims


def apply_data_parallel(
    model: nn.Module,
    block_lists: list[nn.ModuleList],
    mesh: Meshes,
    dims: ParallelDims,
    param_dtype: torch.dtype,
) -> str:
    """Shard or replicate `model` in place; returns a one-line description."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if dims.ddp_enabled:
        dp_mesh = mesh.hsdp["dp_replicate"]
        for blocks in block_lists:
            for block in blocks:
                replicate(block, mesh=dp_mesh, mp_policy=mp)
        replicate(model, mesh=dp_mesh, mp_policy=mp)
        return f"DDP (FSDP2 replicate) over {dims.dp_replicate} replicas"
    if dims.dp_replicate > 1:
        dp_mesh = mesh.hsdp
        what = f"HSDP: {dims.dp_replicate} replicas x {dims.dp_shard * dims.cp} shards"
    else:
        dp_mesh = mesh.dp_shard_cp
        what = f"FSDP2 over {dims.dp_shard * dims.cp} shards"
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again right away in backward: keep them gathered.
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    return what
