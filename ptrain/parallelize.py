"""(config, bound spec, mesh) -> the trainable, parallelized transformer and its optimizer.

The one model set-up that both the trainer and the memory planner (ptrain/planner.py) run, in the role of
torchtitan's `parallelize_fn`:

1. `make_trainable_model`: LoRA adapters (or the trainable subset of a full fine-tune) on the loaded
   transformer, seeded alike on every rank, and FP8 storage of frozen weights (--layerwise_upcasting_modules).
   The planner runs it on the meta device.
2. `parallelize`: the parallel plan in its fixed order: context parallelism -> activation checkpointing ->
   compile per block -> placement on the device and fully_shard / replicate, one unit (block) at a time, so
   the device never holds the whole model before it is sharded (ptrain/parallel/).
3. `build_trainable`: `parallelize`, then the parameter groups, the optimizer, the learning-rate schedule and
   the EMA, returned together as a `TrainableModel`.
"""

from __future__ import annotations

import functools
import logging
import random
import re
from dataclasses import dataclass

import numpy as np
import torch

from ptrain.config import Config, ConfigError
from ptrain.ema import EMA
from ptrain.fused_backward import FusedBackward
from ptrain.models.spec import ModelSpec
from ptrain.optim import build_optimizer, build_scheduler, check_adamw_8bit, skips_on_device
from ptrain.parallel import ParallelDims, apply_ac, apply_compile, apply_data_parallel
from ptrain.parallel.context import apply_context_parallel
from ptrain.parallel.offload import apply_activation_offload
from ptrain.parallel.swap import apply_block_swap

log = logging.getLogger("ptrain")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_trainable(transformer: torch.nn.Module, cfg: Config, spec: ModelSpec) -> None:
    """LoRA adapters on the frozen base (--training_type lora), the --trainable_modules subset, or everything."""
    m = cfg.model
    if m.training_type == "lora":
        from peft import LoraConfig

        transformer.requires_grad_(False)
        targets = m.target_modules or spec.default_target_modules
        if len(targets) == 1 and any(c in targets[0] for c in "*|()[]^$+?\\"):
            targets = targets[0]  # one regex: peft full-matches it against module names
        try:
            transformer.add_adapter(
                LoraConfig(r=m.rank, lora_alpha=m.lora_alpha, init_lora_weights=True, target_modules=targets)
            )
        except ValueError as e:
            raise ConfigError(f"--target_modules {targets}: {e}") from e
        if spec.expanded_input:  # its new input channels start at zero: they must train, beside the adapters
            transformer.get_submodule(spec.expanded_input).requires_grad_(True)
        for p in transformer.parameters():
            if p.requires_grad:  # LoRA weights train in float32 whatever the frozen base's dtype
                p.data = p.data.float()
    elif m.trainable_modules:
        transformer.requires_grad_(False)
        matched = 0
        for name, p in transformer.named_parameters():
            if any(pattern in name for pattern in m.trainable_modules):
                p.requires_grad_(True)
                matched += 1
        if not matched:
            raise ConfigError(f"--trainable_modules {m.trainable_modules}: no parameter name contains any of them")
    else:
        transformer.requires_grad_(True)
    transformer.train()


def store_frozen_in_fp8(transformer: torch.nn.Module, dtype: torch.dtype, skip_patterns: list[str]) -> int:
    """Cast the frozen weights of Linear/Conv layers to an FP8 storage dtype (not matching `skip_patterns`).

    Compute stays in --transformer_dtype: FSDP2's mixed-precision policy casts each shard up before the
    all-gather, so only the stored shards are FP8 (finetrainers' "layerwise upcasting", sharded).
    Returns the number of parameters cast.
    """
    layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    cast = 0
    for name, module in transformer.named_modules():
        if not isinstance(module, layers) or any(re.search(pat, name) for pat in skip_patterns):
            continue
        if any(re.search(pat, name.replace(".base_layer", "")) for pat in skip_patterns):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
                cast += p.numel()
    return cast


def make_trainable_model(transformer: torch.nn.Module, cfg: Config, spec: ModelSpec) -> None:
    """Step 1: what trains (the same seed on every rank first: adapters start identical on all ranks and
    layouts), then FP8 storage of the frozen weights if asked."""
    m = cfg.model
    seed_everything(cfg.train.seed)
    make_trainable(transformer, cfg, spec)
    if "transformer" in (m.layerwise_upcasting_modules or []):
        fp8 = getattr(torch, m.layerwise_upcasting_storage_dtype)
        n = store_frozen_in_fp8(transformer, fp8, m.layerwise_upcasting_skip_modules_pattern)
        log.info("layerwise upcasting: %s frozen transformer weights stored in %s", f"{n:,}", fp8)


def param_groups(transformer: torch.nn.Module, cfg: Config) -> list[dict]:
    """Trainable parameters, split off a half-learning-rate group for --trainable_modules_low_learning_rate."""
    low = cfg.model.trainable_modules_low_learning_rate or []
    normal, slow = [], []
    for name, p in transformer.named_parameters():
        if p.requires_grad:
            (slow if any(pattern in name for pattern in low) else normal).append(p)
    groups = [{"params": normal}] if normal else []
    if slow:
        groups.append({"params": slow, "lr": cfg.optim.lr / 2})
    return groups


def trains_plain(cfg: Config) -> bool:
    """Whether this training type can train the plain module when it runs in one process: LoRA, --full_bf16 or
    float32 (a full fine-tune below float32 keeps FSDP2 for its float32 master weights: ptrain/parallel/fsdp.py)."""
    m = cfg.model
    return m.training_type == "lora" or m.transformer_dtype == "float32" or cfg.optim.full_bf16


def plain_single_process(cfg: Config, dims: ParallelDims) -> bool:
    """Whether the transformer will be the plain module of one process (no FSDP2 wrapper; the rule of
    ptrain.parallel.fsdp.is_plain, decided before the model exists): `trains_plain`, and not with
    --fsdp_cpu_offload or FP8-stored weights."""
    return (dims.dp_replicate * dims.dp_shard * dims.cp == 1 and not cfg.parallel.fsdp_cpu_offload
            and not cfg.model.layerwise_upcasting_modules and trains_plain(cfg))  # fmt: skip


def _check_block_swap(count: int, dims: ParallelDims) -> None:
    if count and dims.world_size > 1:
        raise ConfigError(f"--blocks_to_swap is for one GPU; on {dims.world_size}, FSDP2 shards the weights instead")


def _cudagraphs_error(cfg: Config, layout: str) -> ConfigError:
    return ConfigError(f"--compile_mode {cfg.compile.compile_mode} replays CUDA graphs, which need the plain module "
                       f"of one process (LoRA, --full_bf16 or float32; here: {layout}): FSDP2 gathers its parameters "
                       "to new memory every step; use --compile_mode default or max-autotune-no-cudagraphs")  # fmt: skip


def check_parallel_options(cfg: Config, dims: ParallelDims, device: torch.device, dry_run: bool = False) -> None:
    """The options that depend on the layout or the device, checked when the run is planned (and by --dry_run,
    also for --plan_world_size), not after the weights load. The same rules hold where the model is built
    (`block_swap`, `parallelize`, `build_optimizer`), for callers that skip the plan (the memory planner)."""
    _check_block_swap(cfg.parallel.blocks_to_swap, dims)
    if cfg.compile.cudagraphs() and not plain_single_process(cfg, dims):
        raise _cudagraphs_error(cfg, f"{dims.describe()}, {cfg.model.training_type}, {cfg.model.transformer_dtype}")
    if cfg.optim.optimizer == "adamw-8bit":
        check_adamw_8bit(device, dry_run)


def parallelize(transformer, cfg: Config, spec: ModelSpec, mesh, dims: ParallelDims, device, place=None,
                fsdp_in_one_process: bool = False) -> None:  # fmt: skip
    """Step 2, the parallel plan in its fixed order: context parallelism -> AC -> compile per block -> placement
    and fully_shard / replicate, unit by unit. `place(module)`: how a unit reaches the device (default
    `place_states`; the memory planner materialises meta tensors). `fsdp_in_one_process`: wrap a one-process
    LoRA or float32 run in FSDP2 too, as ptrain did before it trained the plain module there (the planner
    replays measurements of that code: ptrain.planner.CodePath)."""
    ac, p, m = cfg.activation_checkpoint, cfg.parallel, cfg.model
    if dims.cp > 1:
        if spec.cp_plan is None:
            raise ConfigError(f"--cp_degree {dims.cp}: {spec.name} has no context-parallel plan")
        apply_context_parallel(transformer, spec.cp_plan, mesh.world["cp"], p.cp_mode)
    blocks = spec.blocks(transformer)
    if ac.ac_mode == "auto":
        raise RuntimeError("--ac_mode auto must be resolved (ptrain.trainer.plan_run) before the model is built")
    if ac.gradient_checkpointing:
        n = apply_ac(blocks, ac.ac_mode, ac.every_n(), early_stop=not p.blocks_to_swap)
        every = f", every {ac.every_n()}" if ac.ac_mode == "selective" else ""
        log.info("activation checkpointing (%s%s): %d of %d blocks", ac.ac_mode, every, n, sum(len(b) for b in blocks))
        if ac.ac_mode == "keep_attention" and cfg.compile.attention_backend == "math":
            log.warning("--ac_mode keep_attention with --attention_backend math: the math kernel's attention is plain "
                        "matmuls, there is no fused kernel output to keep; it recomputes as full AC does")  # fmt: skip
    if ac.activation_offload:
        transformer._ptrain_offload = apply_activation_offload(blocks, device)
        log.info("activation offload: what %d blocks save for the backward waits in pinned host memory",
                 sum(len(b) for b in blocks))  # fmt: skip
    swap = block_swap(transformer, blocks, p.blocks_to_swap, dims, device, place)
    if cfg.compile.compile:
        c = cfg.compile
        n = apply_compile(blocks, c.compile_backend, skip=swap.blocks if swap else (), mode=c.compile_mode)
        mode = "" if c.compile_mode == "default" else f", mode {c.compile_mode}"
        log.info("torch.compile (%s): %d blocks%s", c.compile_backend, n, mode)
    # Placement happens unit by unit inside apply_data_parallel (`place` before each fully_shard / replicate): no
    # rank ever holds the whole model on the device before sharding it. With --fsdp_cpu_offload the shards then go
    # back to CPU memory (FSDP2's CPUOffloadPolicy) and only buffers stay on the device. Block-swapped weights
    # stay in host memory.
    plan = apply_data_parallel(
        transformer, blocks, mesh, dims, DTYPES[m.transformer_dtype], spec.fp32_module_names(transformer),
        cpu_offload=p.fsdp_cpu_offload,
        plain_single=not fsdp_in_one_process and trains_plain(cfg),
        place=place or functools.partial(place_states, device=device, skip=swap.host_params if swap else ()),
    )  # fmt: skip
    log.info(plan)
    if cfg.compile.cudagraphs() and hasattr(transformer, "set_requires_gradient_sync"):  # FSDP2 / replicate
        raise _cudagraphs_error(cfg, plan)


def block_swap(transformer, blocks, count: int, dims: ParallelDims, device, place=None):
    """--blocks_to_swap (ptrain/parallel/swap.py), or None; the planner reads `transformer._ptrain_block_swap` (and
    its `place` materialises the swapped blocks' meta tensors first)."""
    _check_block_swap(count, dims)
    if not count:
        return None
    swap = apply_block_swap(blocks, count, device, place)
    transformer._ptrain_block_swap = swap
    log.info("block swap: frozen weights of %d blocks (%.2f GiB) in host memory, one block at a time on %s",
             count, swap.host_bytes() / 2**30, device)  # fmt: skip
    return swap


def place_states(module: torch.nn.Module, device, materialize: bool = False, skip=()) -> None:
    """Bring the parameters and buffers under `module` that are not on `device` yet onto it, one submodule at a
    time (those of units already sharded are there, as DTensors, and are left alone). A moved tensor's CPU copy
    is freed as it goes (the parameter's data is replaced). `materialize`: meta tensors become uninitialised ones
    on `device` instead (the memory planner builds the transformer on the meta device). `skip`: ids of tensors
    that stay where they are (--blocks_to_swap's host-resident weights)."""

    def to_device(t: torch.Tensor) -> torch.Tensor:
        if t.device == device or id(t) in skip:
            return t
        return torch.empty_like(t, device=device) if materialize and t.is_meta else t.to(device)

    for sub in module.modules():
        own = [t for t in (*sub._parameters.values(), *sub._buffers.values()) if t is not None]
        if any(t.device != device for t in own):
            sub._apply(to_device, recurse=False)


@dataclass
class TrainableModel:
    """The parallelized transformer and what updates it."""

    transformer: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: EMA | None
    #: --fused_backward_pass: steps the optimizer unit by unit inside the backward (ptrain/fused_backward.py)
    fused_backward: FusedBackward | None = None


def build_trainable(
    transformer,
    cfg: Config,
    spec: ModelSpec,
    mesh,
    dims: ParallelDims,
    device,
    train_steps: int,
    fused: bool = True,
    planning: bool = False,
    place=None,
    fsdp_in_one_process: bool = False,
) -> TrainableModel:
    """Step 3: `parallelize`, then parameter groups, optimizer, learning-rate schedule over `train_steps`, EMA.
    `fused`: the fused AdamW / Adam kernel, else the multi-tensor one (ptrain.optim.build_optimizer); `planning`:
    the memory planner's call (8-bit AdamW is then a stand-in with its state layout); `place`,
    `fsdp_in_one_process`: see `parallelize`."""
    e = cfg.ema
    parallelize(transformer, cfg, spec, mesh, dims, device, place, fsdp_in_one_process)
    groups = param_groups(transformer, cfg)
    params = [q for g in groups for q in g["params"]]
    n_train = sum(q.numel() for q in params)
    n_total = sum(q.numel() for q in transformer.parameters())
    log.info("trainable parameters: %s of %s (%s)", f"{n_train:,}", f"{n_total:,}", cfg.model.training_type)
    optimizer = build_optimizer(groups, cfg.optim, device, fused, cfg.train.seed, planning)
    o = cfg.optim
    log.info("optimizer: %s%s", type(optimizer).__name__, f" (--full_bf16: bfloat16 weights and moments, "
             f"{o.bf16_rounding} rounding)" if o.full_bf16 else "")  # fmt: skip
    lr_scheduler = build_scheduler(optimizer, cfg.optim, train_steps)
    ema = EMA(transformer, e.ema_decay, e.ema_start_step, e.ema_update_every) if e.ema_decay else None
    if ema is not None:
        log.info("EMA of the trainable weights: decay %g, from step %d, every %d steps", e.ema_decay, e.ema_start_step,
                 e.ema_update_every)  # fmt: skip
    fused_backward = None
    if cfg.optim.fused_backward_pass:
        units = [list(block.parameters()) for blocks in spec.blocks(transformer) for block in blocks]
        on_device = skips_on_device(optimizer) or planning  # the planner's 8-bit stand-in allocates, never skips
        fused_backward = FusedBackward(optimizer, params, units, cfg.optim.max_grad_norm, on_device)
        log.info("fused backward pass: the optimizer steps %d units inside the backward and frees their gradients",
                 len(fused_backward.units))  # fmt: skip
    return TrainableModel(transformer, params, optimizer, lr_scheduler, ema, fused_backward)
