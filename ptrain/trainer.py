"""The training loop: build everything from the config, then step, accumulate, clip, log, export.

One loop for every model: all model-specific work goes through the ModelSpec.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from ptrain.config import Config, ConfigError, to_dict
from ptrain.data import build_dataloader
from ptrain.export import export_full, export_lora
from ptrain.metrics import MetricsWriter, peak_memory_gb
from ptrain.models.spec import Components, ModelSpec, get_spec
from ptrain.objectives import FlowMatching, sample_generators
from ptrain.optim import build_optimizer, build_scheduler
from ptrain.parallel import ParallelDims, apply_ac, apply_compile, apply_data_parallel, init_distributed

log = logging.getLogger("ptrain")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    exported: Path | None = None
    transformer: torch.nn.Module | None = None
    components: Components | None = None
    spec: ModelSpec | None = None


def setup_logging(rank: int, level: str) -> None:
    logging.basicConfig(
        level=level if rank == 0 else "WARNING",
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # diffusers/transformers chatter (e.g. CPU generator notices) would drown the progress bar.
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel("ERROR")
    # Known-harmless library notices: torchdata calls a deprecated torch API; FSDP2 warns that the root
    # returns a view (ptrain never modifies the output in place).
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


def make_trainable(transformer: torch.nn.Module, cfg: Config, spec: ModelSpec) -> None:
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
        for p in transformer.parameters():
            if p.requires_grad:  # LoRA weights train in float32 whatever the frozen base's dtype
                p.data = p.data.float()
    else:
        transformer.requires_grad_(True)
    transformer.train()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _global_mean(value: torch.Tensor, group) -> float:
    t = value.detach().float().reshape(1).clone()
    if group is not None:
        dist.all_reduce(t, group=group)
        t /= dist.get_world_size(group)
    return t.item()


def train(cfg: Config) -> TrainResult:
    cfg.validate()
    rank, world, device = init_distributed()
    setup_logging(rank, cfg.log.log_level)
    p, t, m = cfg.parallel, cfg.train, cfg.model
    dims = ParallelDims.build(p.dp_degree, p.dp_shards, p.cp_degree, world)
    mesh = dims.build_mesh()
    dp_rank, dp_size = mesh.dp.get_local_rank(), dims.dp
    log.info("ptrain: %s on %s (%s)", dims.describe(), device, dist.get_backend())

    out = Path(t.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    spec = get_spec(m.model_name)
    dtypes = {
        # Full fine-tuning keeps float32 master weights (FSDP2 computes in --transformer_dtype);
        # LoRA keeps the frozen base in --transformer_dtype to save memory.
        "transformer": DTYPES[m.transformer_dtype] if m.training_type == "lora" else torch.float32,
        "vae": DTYPES[m.vae_dtype],
        "text_encoder": DTYPES[m.text_encoder_dtype],
    }
    log.info("loading %s from %s", m.model_name, m.pretrained_model_name_or_path)
    comps = spec.load_components(m.pretrained_model_name_or_path, dtypes, device)
    spec.bind(comps)
    spec.check_shape(cfg.data.num_frames, cfg.data.height, cfg.data.width, comps)
    transformer = comps.transformer
    # Same seed on every rank before LoRA init: adapters start identical on all ranks and layouts.
    seed_everything(t.seed)
    make_trainable(transformer, cfg, spec)

    blocks = spec.blocks(transformer)
    if t.gradient_checkpointing:
        n = apply_ac(blocks, t.ac_mode, t.ac_every_n_blocks)
        log.info("activation checkpointing (%s): %d blocks", t.ac_mode, n)
    if t.compile:
        n = apply_compile(blocks, t.compile_backend)
        log.info("torch.compile (%s): %d blocks", t.compile_backend, n)
    transformer.to(device)
    log.info(apply_data_parallel(transformer, blocks, mesh, dims, DTYPES[m.transformer_dtype]))

    params = [q for q in transformer.parameters() if q.requires_grad]
    n_train = sum(q.numel() for q in params)
    n_total = sum(q.numel() for q in transformer.parameters())
    log.info("trainable parameters: %s of %s (%s)", f"{n_train:,}", f"{n_total:,}", m.training_type)
    optimizer = build_optimizer(params, cfg.optim, device)
    lr_scheduler = build_scheduler(optimizer, cfg.optim, t.train_steps)

    loader, sampler, usable = build_dataloader(
        cfg.data, dp_rank, dp_size, t.batch_size, t.gradient_accumulation_steps, t.seed
    )
    log.info(
        "data: %d usable videos (%d skipped); global batch %d = batch_size %d x dp %d x grad accum %d",
        len(usable.records),
        len(usable.skipped),
        sampler.global_batch_size,
        t.batch_size,
        dp_size,
        t.gradient_accumulation_steps,
    )
    objective = FlowMatching(t)
    max_seq = cfg.data.max_sequence_length or spec.default_max_sequence_length
    loss_group = mesh.dp_cp.get_group() if world > 1 else None
    metrics = MetricsWriter(out, rank == 0, cfg.log.report_to == "tensorboard")
    result = TrainResult(spec=spec, components=comps, transformer=transformer)

    data_iter = iter(loader)
    bar = tqdm(total=t.train_steps, disable=rank != 0, desc="train", dynamic_ncols=True)
    accum = t.gradient_accumulation_steps
    try:
        for step in range(1, t.train_steps + 1):
            t0 = time.perf_counter()
            data_time = 0.0
            step_loss = torch.zeros((), device=device)
            tokens = 0
            for micro in range(accum):
                td = time.perf_counter()
                batch = next(data_iter)
                data_time += time.perf_counter() - td
                transformer.set_requires_gradient_sync(micro == accum - 1)
                gens = sample_generators(t.seed, batch["position"])
                video = batch["video"].to(device, non_blocking=True)
                latents = spec.encode_video(comps, video, gens)
                cond = spec.encode_text(comps, list(batch["caption"]), max_seq)
                noisy, timesteps, target, weight = objective.prepare(latents, gens)
                pred = spec.forward(transformer, noisy, timesteps, cond)
                loss = objective.loss(pred, target, weight) / accum
                loss.backward()
                step_loss += loss.detach()
                tokens += spec.tokens_per_sample(latents.shape, comps) * latents.shape[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, t_max if (t_max := cfg.optim.max_grad_norm) > 0 else float("inf"), foreach=True
            )
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loss_value = _global_mean(step_loss, loss_group)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"step {step}: loss is {loss_value}; stopping (lower --lr?)")
            elapsed = time.perf_counter() - t0
            result.losses.append(loss_value)
            result.grad_norms.append(float(grad_norm))
            global_tokens = tokens * dp_size
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{global_tokens / elapsed:,.0f}")
            if step % cfg.log.logging_steps == 0 or step == t.train_steps:
                alloc, reserved = peak_memory_gb(device)
                metrics.log(
                    step,
                    {
                        "loss": loss_value,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        "step_time_s": elapsed,
                        "data_time_s": data_time,
                        "tokens_per_s": global_tokens / elapsed,
                        "samples_seen": step * sampler.global_batch_size,
                        "peak_memory_gb": alloc,
                        "peak_reserved_gb": reserved,
                    },
                )
    finally:
        bar.close()
        metrics.close()

    if m.training_type == "lora":
        result.exported = export_lora(transformer, spec.pipeline_cls, out)
    else:
        result.exported = export_full(transformer, out)
    if rank == 0:
        log.info("done: %d steps, final loss %.5f, weights in %s", t.train_steps, result.losses[-1], result.exported)
    return result
