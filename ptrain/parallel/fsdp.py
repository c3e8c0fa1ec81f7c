"""Data parallelism with FSDP2: fully_shard (FSDP / HSDP) or FSDP2-style replicate (DDP); one process: none.

Every repeated block becomes its own communication group, then the root takes
the remaining parameters. Parameters are held in float32 (or the loaded dtype
for frozen weights), computed in --transformer_dtype, and gradients are reduced
in float32.

A world of one process gets no wrapper at all: FSDP2 would only add parameter copies at every unshard and
DTensor dispatch in clipping and the optimizer. The module stays plain and computes in --transformer_dtype under
torch.autocast; the float32-kept submodules run with autocast off. Two cases keep FSDP2 in one process, for what
it does there: --fsdp_cpu_offload (it moves the parameters in and out) and FP8-stored frozen weights
(--layerwise_upcasting_modules: its mixed-precision policy upcasts them to the compute dtype per block).
The caller also keeps FSDP2 (`plain_single=False`) for a full fine-tune below float32: its float32 master weights
would be cast under autocast op by op, which the memory planner puts at about 8 GiB more than FSDP2's per-block
bf16 copies for CogVideoX-5B (93.9 vs 86.2 GiB, simulated); LoRA (a frozen base already in the compute dtype) and
float32 runs are plain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ptrain.parallel.dims import Meshes, ParallelDims


def apply_data_parallel(
    model: nn.Module,
    block_lists: list[nn.ModuleList],
    mesh: Meshes,
    dims: ParallelDims,
    param_dtype: torch.dtype,
    fp32_modules: list[str] | None = None,
    cpu_offload: bool = False,
    plain_single: bool = True,
    place: Callable[[nn.Module], None] | None = None,
) -> str:
    """Shard or replicate `model` in place; returns a one-line description.

    Submodules named in `fp32_modules` (diffusers' `_keep_in_fp32_modules`, e.g. Wan's norms and time
    embedder) become their own FSDP units that compute in float32 whatever --transformer_dtype is.

    `place(module)` brings the parameters and buffers under `module` that are not on the device yet onto it
    (ptrain.parallelize.place_states). It is called on each FSDP2 unit just before the unit is wrapped, so a
    model that arrives in CPU memory reaches the device one unit at a time: fully_shard keeps only the unit's
    shard and frees the whole unit when it returns, so the device never holds more than the shards so far plus
    one unit. The plain module of one process is placed whole.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # Inputs keep their dtype, as in diffusers: the fp32 modules upcast themselves (FP32LayerNorm computes in float32
    # and returns the input's dtype; Wan casts the timestep to the time embedder's dtype). Casting the inputs up
    # would hand float32 activations to the next bf16 layer (Wan I2V's image embedder: norm1 -> ff).
    mp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    keep32 = _fp32_submodules(model, fp32_modules or []) if param_dtype != torch.float32 else []
    place = place or (lambda module: None)
    if is_plain(model, dims, plain_single, cpu_offload):
        place(model)
        return single_process(model, param_dtype, keep32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    if dims.ddp_enabled:
        dp_mesh = mesh.hsdp["dp_replicate"]
        for sub in keep32:
            place(sub)
            replicate(sub, mesh=dp_mesh, mp_policy=mp32, offload_policy=offload)
        for blocks in block_lists:
            for block in blocks:
                place(block)
                replicate(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
        place(model)
        replicate(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
        return f"DDP (FSDP2 replicate) over {dims.dp_replicate} replicas"
    if dims.dp_replicate > 1:
        dp_mesh = mesh.hsdp
        what = f"HSDP: {dims.dp_replicate} replicas x {dims.dp_shard * dims.cp} shards"
    else:
        dp_mesh = mesh.dp_shard_cp
        what = f"FSDP2 over {dims.dp_shard * dims.cp} shards"
    for sub in keep32:
        place(sub)
        fully_shard(sub, mesh=dp_mesh, mp_policy=mp32, offload_policy=offload)
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            # The last block's parameters are needed again right away in backward: keep them gathered.
            last = i == len(blocks) - 1
            place(block)
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=not last, offload_policy=offload)
    place(model)  # what is left: the root's own parameters (embeddings, output layers) and buffers
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False, offload_policy=offload)
    if cpu_offload:
        what += ", parameters/gradients/optimizer state offloaded to CPU"
    return what


def is_plain(model: nn.Module, dims: ParallelDims, plain_single: bool = True, cpu_offload: bool = False) -> bool:
    """Whether apply_data_parallel leaves `model` plain (one process, no FSDP2 wrapper): see the module docstring."""
    fp8 = any(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in model.parameters())
    return dims.dp_replicate * dims.dp_shard * dims.cp == 1 and plain_single and not cpu_offload and not fp8


def single_process(model: nn.Module, param_dtype: torch.dtype, keep32: list[nn.Module]) -> str:
    """One process: the plain module; below float32, its forward runs under autocast to `param_dtype` (master
    and trainable weights keep their dtype, as FSDP2's mixed precision keeps them) and `keep32` submodules run
    in float32 with autocast off. In float32 its floating inputs are cast to float32, as FSDP2 casts them."""
    if param_dtype == torch.float32:
        # As FSDP2's cast_forward_inputs would: text states from a bfloat16 encoder enter a float32 model.
        model.forward = _autocast_forward(model.forward, None)
        return "one process: plain module (no FSDP), float32"
    model.forward = _autocast_forward(model.forward, param_dtype)
    for sub in keep32:
        sub.forward = _autocast_forward(sub.forward, None)
    dtype = str(param_dtype).removeprefix("torch.")
    return f"one process: plain module (no FSDP), autocast to {dtype}; {len(keep32)} submodules kept in float32"


def _autocast_forward(forward, dtype: torch.dtype | None):
    """`forward` under autocast to `dtype`, or (None) with autocast off and floating inputs cast to float32."""

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    @functools.wraps(forward)
    def run(*args, **kwargs):
        device = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        if dtype is not None:
            with torch.autocast(device, dtype=dtype):
                return forward(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            args, kwargs = torch.utils._pytree.tree_map(up, (args, kwargs))
            return forward(*args, **kwargs)

    return run


def _fp32_submodules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Submodules (with parameters) whose attribute name is in `names`; nested matches are skipped."""
    found: list[tuple[str, nn.Module]] = []
    for fqn, sub in model.named_modules():
        leaf = fqn.rsplit(".", 1)[-1]
        if leaf in names and any(True for _ in sub.parameters()):
            if not any(fqn.startswith(prev + ".") for prev, _ in found):
                found.append((fqn, sub))
    return [sub for _, sub in found]
