"""The training loop: build everything from the config, then step, accumulate, clip, log, export.

One loop for every model: all model-specific work goes through the ModelSpec.
"""

from __future__ import annotations

import contextlib
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
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ptrain.checkpoint import (
    CheckpointDamaged,
    Checkpointer,
    Layout,
    TrainState,
    check_layout,
    complete_checkpoints,
    read_marker,
    resolve_resume,
)
from ptrain.config import Config, ConfigError, to_dict
from ptrain.data import VideoDataset, build_dataloader, make_sampler, scan_dataset, summary
from ptrain.data.precompute import PrecomputedDataset, precompute
from ptrain.data.video import FrameSampling
from ptrain.ema import EMA
from ptrain.export import begin_export, export_complete, export_full, export_lora, publish_export
from ptrain.export_comfyui import export_comfyui_lora
from ptrain.metrics import MetricsWriter, device_peak_tflops, peak_memory_gb
from ptrain.models.spec import Components, Conditioning, ModelSpec, get_spec
from ptrain.objectives import sample_generators
from ptrain.optim import build_optimizer, build_scheduler
from ptrain.parallel import ParallelDims, apply_ac, apply_compile, apply_data_parallel, init_distributed
from ptrain.parallel.context import apply_context_parallel
from ptrain.validation import load_validation_items, run_validation

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
    optimizer: torch.optim.Optimizer | None = None


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
    import re

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


def encoder_modules(comps: Components) -> list[torch.nn.Module]:
    """The frozen encoders: VAE, text encoder(s) (whatever else the spec loaded that is a module)."""
    mods = [comps.vae, comps.text_encoder, *comps.extra.values()]
    return [m for m in mods if isinstance(m, torch.nn.Module)]


def offload_encoders(comps: Components) -> None:
    """Move the frozen encoders to CPU memory (they come back to the device only inside `encoders_on`)."""
    for m in encoder_modules(comps):
        m.to("cpu")


@contextlib.contextmanager
def encoders_on(comps: Components, device: torch.device, offloaded: bool):
    """With offloaded encoders: move them to `device` for the block, back to CPU memory after it."""
    if not offloaded or device.type == "cpu":
        yield
        return
    for m in encoder_modules(comps):
        m.to(device)
    try:
        yield
    finally:
        offload_encoders(comps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _global_step_stats(loss: torch.Tensor, replaced: int, group, cp: int) -> tuple[float, int]:
    """(mean loss over the dp x cp ranks, samples replaced in the global batch) in one all-reduce: every rank
    gets the same values, so they all decide alike (NaN guard, logging). A cp group shares its samples, so
    their replacement count is divided back out."""
    t = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(float(replaced), dtype=torch.float32)])
    if group is None:
        return t[0].item(), replaced
    dist.all_reduce(t, group=group)
    return (t[0] / dist.get_world_size(group)).item(), round(t[1].item() / cp)


def find_resume(cfg: Config, out: Path, layout: Layout) -> tuple[Path | None, bool]:
    """The checkpoint to resume from (or None) and whether it needs resharding; errors name what changed."""
    c, m = cfg.checkpoint, cfg.model
    resume = resolve_resume(c.resume_from_checkpoint, out)
    if resume is None:
        return None, False
    marker = read_marker(resume)
    for key, now in (("model_name", m.model_name), ("training_type", m.training_type)):
        if marker.get(key) != now:
            raise ConfigError(
                f"checkpoint {resume} was written with --{key} {marker.get(key)}, this run has --{key} {now}; "
                "use another --output_dir or --resume_from_checkpoint none"
            )
    resharded = check_layout(marker, layout, resume, c.allow_reshard)
    why = (
        " (found in output_dir; --resume_from_checkpoint none starts over)"
        if c.resume_from_checkpoint == "auto"
        else ""
    )
    log.info("resuming from %s at step %d%s", resume, marker["step"], why)
    return resume, resharded


def build_parallel_transformer(transformer, cfg: Config, spec: ModelSpec, mesh, dims: ParallelDims, device) -> None:
    """The parallel plan, in its fixed order: AC -> compile per block -> placement -> fully_shard / replicate."""
    ac, p, m = cfg.activation_checkpoint, cfg.parallel, cfg.model
    if dims.cp > 1:
        if spec.cp_plan is None:
            raise ConfigError(f"--cp_degree {dims.cp}: {spec.name} has no context-parallel plan")
        apply_context_parallel(transformer, spec.cp_plan, mesh.world["cp"], p.cp_mode)
    blocks = spec.blocks(transformer)
    if ac.gradient_checkpointing:
        n = apply_ac(blocks, ac.ac_mode, ac.ac_every_n_blocks)
        log.info("activation checkpointing (%s): %d blocks", ac.ac_mode, n)
    if cfg.compile.compile:
        n = apply_compile(blocks, cfg.compile.compile_backend)
        log.info("torch.compile (%s): %d blocks", cfg.compile.compile_backend, n)
    if p.fsdp_cpu_offload:  # parameters stay in CPU memory (FSDP2 copies shards in as needed); buffers move
        for module in transformer.modules():
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
    elif any(t.device != device for t in [*transformer.parameters(), *transformer.buffers()]):
        transformer.to(device)
    plan = apply_data_parallel(
        transformer, blocks, mesh, dims, DTYPES[m.transformer_dtype], spec.fp32_module_names(transformer),
        cpu_offload=p.fsdp_cpu_offload,
    )  # fmt: skip
    log.info(plan)


def print_dry_run(
    cfg: Config, dims: ParallelDims, usable, global_batch: int, steps_per_epoch: int, resume, sampling, rules
) -> None:
    """--dry_run: what the run would do (rank 0 prints; no weights are loaded, nothing is written)."""
    if dist.get_rank() != 0:
        return
    d, t = cfg.data, cfg.train
    lines = [
        "ptrain dry run: config, parallel degrees and data are valid",
        f"  layout: {dims.describe()}",
        f"  model: {cfg.model.model_name} ({cfg.model.training_type}) from {cfg.model.pretrained_model_name_or_path}",
    ]
    lines += [f"  {line}" for line in summary(usable, global_batch, rules.tokens)]
    if not usable.bucketed:
        lines.append(f"  tokens/sample: {rules.tokens(d.num_frames, d.height, d.width):,}")
    lines += [
        f"  frames: {sampling.describe()}, {d.reshape_mode}",
        f"  global batch {global_batch}: {steps_per_epoch} steps per epoch, {t.train_steps} steps "
        f"= {t.train_steps * global_batch / len(usable.records):.2f} epochs",
        f"  resume: {resume or 'none (fresh start)'}",
    ]
    if dims.cp > 1:
        lines.append(
            f"  context parallel: {cfg.parallel.cp_mode} over {dims.cp} ranks; each holds 1/{dims.cp} (rounded up) of every "
            f"sample's video tokens (block activations / {dims.cp}); per-GPU peak: python -m ptrain.planner"
        )
    print("\n".join(lines), flush=True)


def plan_memory(cfg: Config, world: int) -> None:
    """--dry_run --plan_gpu_memory_gb: the planner in a fresh process (it needs its own fake process group)."""
    import subprocess
    import sys

    budget = cfg.plan.plan_gpu_memory_gb
    print(f"  memory plan for {world} GPUs of {budget:g} GB (simulated, no GPU used; about a minute per layout):",
          flush=True)  # fmt: skip
    cmd = [sys.executable, "-m", "ptrain.planner", "--model_dir", cfg.model.pretrained_model_name_or_path,
           "--world_size", str(world), "--budget_gb", str(budget), "--", *sys.argv[1:]]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line[len("PLAN ") :] for line in p.stderr.splitlines() if line.startswith("PLAN ")]
    print("\n".join(f"    {line}" for line in lines), flush=True)
    if p.returncode != 0:
        raise RuntimeError(f"memory planner failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if not res["fits"] and res["suggestion"]:
        print(f"  suggestion: {res['suggestion']['name']}: add {' '.join(res['suggestion']['flags'])}", flush=True)


def train(cfg: Config) -> TrainResult:
    cfg.validate()
    rank, world, device = init_distributed(cfg.parallel.dist_timeout_s)
    setup_logging(rank, cfg.log.log_level)
    p, t, m, c = cfg.parallel, cfg.train, cfg.model, cfg.checkpoint
    dims = ParallelDims.build(p.dp_degree, p.dp_shards, p.cp_degree, world)
    mesh = dims.build_mesh()
    dp_rank, dp_size = mesh.dp.get_local_rank(), dims.dp
    accum = t.gradient_accumulation_steps
    log.info("ptrain: %s on %s (%s)", dims.describe(), device, dist.get_backend())
    for note in cfg.compat_notes:
        log.info("flag from another trainer: %s", note)

    global_batch = t.batch_size * dp_size * accum
    out = Path(t.output_dir)
    layout = Layout(world, dims.dp_replicate, dims.dp_shard, dims.cp, global_batch)
    resume, resharded = find_resume(cfg, out, layout)  # before any heavy work: a changed layout fails fast
    spec = get_spec(m.model_name)
    wants_validation = cfg.validation.validation_prompts or cfg.validation.validation_dataset_file
    if m.train_mode == "inpaint" and wants_validation and spec.inpaint_pipeline_cls is None:
        raise ConfigError(
            f"--train_mode inpaint: diffusers has no pipeline that samples {spec.name}'s inpaint layout, so ptrain "
            "cannot validate it; leave out --validation_prompts / --validation_dataset_file"
        )
    overrides = {
        "transformer": m.transformer_id, "vae": m.vae_id, "text_encoder": m.text_encoder_id,
        "tokenizer": m.tokenizer_id, "text_encoder_2": m.text_encoder_2_id, "tokenizer_2": m.tokenizer_2_id,
    }  # fmt: skip
    rules = spec.shape_rules(m.pretrained_model_name_or_path, overrides)  # from the configs, no weights
    sampling = FrameSampling.from_args(cfg.data)
    usable = scan_dataset(cfg.data, sampling, rules)  # probe the data before loading any model: bad data fails fast
    steps_per_epoch = make_sampler(usable, t.batch_size, 0, dp_size, accum, t.seed).steps_per_epoch
    if t.num_train_epochs:
        t.train_steps = t.num_train_epochs * steps_per_epoch
        log.info(
            "--num_train_epochs %d: %d steps (%d per epoch of %d samples, global batch %d)",
            t.num_train_epochs, t.train_steps, steps_per_epoch, len(usable.records), global_batch,
        )  # fmt: skip
    if resume is not None and not cfg.plan.dry_run:
        done_step = read_marker(resume)["step"]
        if done_step > t.train_steps:
            raise ConfigError(
                f"checkpoint {resume} is at step {done_step}, past --train_steps {t.train_steps}: raise --train_steps, "
                f"or pick an earlier checkpoint with --resume_from_checkpoint N"
            )
        if done_step == t.train_steps:
            if export_complete(out, done_step):
                log.info(
                    "run is complete: checkpoint %s is at --train_steps %d and the weights are exported in %s; "
                    "nothing to do (raise --train_steps to train further)", resume, t.train_steps, out,
                )  # fmt: skip
                # Every rank leaves together: one that tore its process group down while another was still setting
                # up its own aborted ("terminate called without an active exception", seen in the chaos run).
                dist.barrier()
                return TrainResult(exported=out)
            log.info("run is complete at step %d but its export is missing or partial: exporting again", done_step)
    if cfg.plan.dry_run:
        print_dry_run(cfg, dims, usable, global_batch, steps_per_epoch, resume, sampling, rules)
        if cfg.plan.plan_gpu_memory_gb and rank == 0:
            plan_memory(cfg, cfg.plan.plan_world_size or world)
        return TrainResult()
    v_every = cfg.validation.validation_steps
    if cfg.validation.validation_epochs:
        v_every = cfg.validation.validation_epochs * steps_per_epoch
    ckpt_every = c.checkpointing_steps
    if c.checkpointing_epochs:
        ckpt_every = c.checkpointing_epochs * steps_per_epoch

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    dtypes = {
        # Full fine-tuning keeps float32 master weights (FSDP2 computes in --transformer_dtype);
        # LoRA keeps the frozen base in --transformer_dtype to save memory.
        "transformer": DTYPES[m.transformer_dtype] if m.training_type == "lora" else torch.float32,
        "vae": DTYPES[m.vae_dtype],
        "text_encoder": DTYPES[m.text_encoder_dtype],
        "text_encoder_2": DTYPES[m.text_encoder_2_dtype],
    }
    log.info("loading %s from %s", m.model_name, m.pretrained_model_name_or_path)
    comps = spec.load_components(m.pretrained_model_name_or_path, dtypes, device, overrides)
    for flag, method in (("enable_tiling", "enable_tiling"), ("enable_slicing", "enable_slicing")):
        if getattr(m, flag):
            if not hasattr(comps.vae, method):
                raise ConfigError(f"--{flag}: {type(comps.vae).__name__} has no {method}()")
            getattr(comps.vae, method)()
    offloaded = m.offload_encoders
    if offloaded and device.type != "cpu":
        offload_encoders(comps)
    spec.inpaint_mask_probs = m.mask_probs()
    spec.bind(comps, m.train_mode)
    spec.check_mode(m.train_mode, comps, m.training_type)  # may expand the transformer's input channels
    if spec.expanded_input and m.training_type == "lora" and c.export_comfyui:
        raise ConfigError(
            f"--export_comfyui: this run widens {spec.expanded_input} for --train_mode {m.train_mode}, which a "
            "ComfyUI LoRA file cannot carry; export without it (ptrain writes input_layer.safetensors beside the "
            "LoRA) or train from a checkpoint that has the input channels"
        )
    for shape in sorted(set(usable.buckets)):  # every training shape (one without --enable_bucket)
        spec.check_shape(shape.frames, shape.height, shape.width, comps)
    transformer = comps.transformer
    # Same seed on every rank before LoRA init: adapters start identical on all ranks and layouts.
    seed_everything(t.seed)
    make_trainable(transformer, cfg, spec)
    if "transformer" in (m.layerwise_upcasting_modules or []):
        fp8 = getattr(torch, m.layerwise_upcasting_storage_dtype)
        n = store_frozen_in_fp8(transformer, fp8, m.layerwise_upcasting_skip_modules_pattern)
        log.info("layerwise upcasting: %s frozen transformer weights stored in %s", f"{n:,}", fp8)

    build_parallel_transformer(transformer, cfg, spec, mesh, dims, device)

    groups = param_groups(transformer, cfg)
    params = [q for g in groups for q in g["params"]]
    n_train = sum(q.numel() for q in params)
    n_total = sum(q.numel() for q in transformer.parameters())
    log.info("trainable parameters: %s of %s (%s)", f"{n_train:,}", f"{n_total:,}", m.training_type)
    optimizer = build_optimizer(groups, cfg.optim, device)
    lr_scheduler = build_scheduler(optimizer, cfg.optim, t.train_steps)

    ema_args = cfg.ema
    ema = (
        EMA(transformer, ema_args.ema_decay, ema_args.ema_start_step, ema_args.ema_update_every)
        if ema_args.ema_decay
        else None
    )
    checkpointer = Checkpointer(
        out, c.checkpointing_limit, trainable_only=m.training_type == "lora" and not c.checkpoint_full_model,
        async_save=c.async_checkpoint,
    )  # fmt: skip
    checkpointer.clean_partial()
    state = TrainState()
    sampler_state = None
    while resume is not None:
        try:
            checkpointer.load(resume, transformer, optimizer, lr_scheduler, resharded, ema)
            break
        except CheckpointDamaged as e:
            if c.resume_from_checkpoint not in ("auto", "latest"):  # the one asked for: say so, touch nothing
                raise ConfigError(f"--resume_from_checkpoint {c.resume_from_checkpoint}: {e}") from e
            checkpointer.mark_damaged(resume, e.reason)  # never picked again: no crash loop
            resume, resharded = find_resume(cfg, out, layout)  # the previous intact one (or an error if none)
            if resume is None:
                raise ConfigError(f"{e}, and there is no older checkpoint; --resume_from_checkpoint none starts over")
    if resume is not None:
        state = TrainState(**read_marker(resume)["train_state"])
        if resharded:  # same samples from here on: restart the stream where the old layout stopped
            state.base_position, state.base_step = state.samples_seen, state.step
        # The micro-batches training consumed (not the loader's sampler counter, which runs ahead by the
        # workers' prefetch).
        sampler_state = {
            "micro_batches_done": (state.step - state.base_step) * accum,
            "base_position": state.base_position,
        }

    max_seq = cfg.data.max_sequence_length or spec.max_sequence_length(comps)
    dataset = None
    if cfg.data.enable_precomputation and m.train_mode != "normal" and any(r.first_frame for r in usable.records):
        raise ConfigError(
            f"--train_mode {m.train_mode} with first-frame images in the dataset (an image column beside the video "
            "column) conditions on those images every step: it cannot use --enable_precomputation"
        )
    if cfg.data.enable_precomputation and spec.needs_pixels(m.train_mode):
        raise ConfigError(
            f"--train_mode {m.train_mode} for {spec.name} encodes conditioning frames (masked or noised) every step: "
            "it cannot use --enable_precomputation"
        )
    if cfg.data.enable_precomputation:
        with encoders_on(comps, device, offloaded):
            folder = precompute(
                cfg, usable, spec, comps, VideoDataset(usable.records, cfg.data, sampling, t.seed, usable.buckets),
                max_seq, device,
            )  # fmt: skip
        dataset = PrecomputedDataset(usable, folder, cfg.data.caption_dropout_p, t.seed)
        if device.type != "cpu":  # the encoders are needed again only for validation
            offloaded = True
            offload_encoders(comps)
            torch.cuda.empty_cache()
    loader, sampler = build_dataloader(
        usable, cfg.data, sampling, dp_rank, dp_size, t.batch_size, accum, t.seed, sampler_state, dataset
    )
    log.info(
        "data: %d usable samples (%d skipped); global batch %d = batch_size %d x dp %d x grad accum %d; %s",
        len(usable.records), len(usable.skipped), sampler.global_batch_size, t.batch_size, dp_size, accum,
        usable.plan.describe(),
    )  # fmt: skip
    if usable.bucketed:
        for line in summary(usable, sampler.global_batch_size, rules.tokens)[1:]:
            log.info("  %s", line)
    if resume is not None and read_marker(resume).get("num_samples") not in (None, len(usable.records)):
        log.warning(
            "the dataset changed since %s (%s usable samples then, %d now): the sample order differs from an "
            "uninterrupted run",
            resume, read_marker(resume)["num_samples"], len(usable.records),
        )  # fmt: skip
    objective = spec.make_objective(cfg.objective, comps)
    validation_items = load_validation_items(cfg.validation, cfg.data, m.train_mode)
    loss_group = mesh.dp_cp.get_group() if world > 1 else None
    metrics = MetricsWriter(
        out, rank == 0, cfg.log.report_to == "tensorboard", resume_step=state.step if resume else None
    )
    result = TrainResult(spec=spec, components=comps, transformer=transformer, optimizer=optimizer)
    meta = {"model_name": m.model_name, "training_type": m.training_type, "num_samples": len(usable.records)}

    def export(target: Path) -> Path | None:
        if m.training_type == "lora":
            path = export_lora(transformer, spec.pipeline_cls, target, spec.expanded_input)
            if c.export_comfyui and path is not None:  # rank 0: a second file with ComfyUI's key names
                export_comfyui_lora(spec, path, transformer.config)
            return path
        return export_full(transformer, target)

    def save_checkpoint(final: bool = False) -> None:
        checkpointer.save(
            transformer, optimizer, lr_scheduler, state, layout, meta,
            export_fn=export if c.export_every_checkpoint else None, final=final, ema=ema,
        )  # fmt: skip

    peak_tflops = device_peak_tflops(device, cfg.log.peak_tflops)
    flops_per_step = None  # per rank, counted on the first step (FlopCounterMode; not under compile)
    breakdown = cfg.log.log_step_breakdown

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    data_iter = iter(loader)
    bar = tqdm(total=t.train_steps, initial=state.step, disable=rank != 0, desc="train", dynamic_ncols=True)
    nan_in_a_row = 0
    last_saved = state.step if resume else -1
    try:
        while state.step < t.train_steps:
            step = state.step + 1
            t0 = time.perf_counter()
            data_time = 0.0
            step_loss = torch.zeros((), device=device)
            tokens = 0
            replaced = 0
            phase = {"forward_s": 0.0, "backward_s": 0.0}
            count = flops_per_step is None and peak_tflops is not None and not cfg.compile.compile
            for micro in range(accum):
                td = time.perf_counter()
                batch = next(data_iter)
                data_time += time.perf_counter() - td
                replaced += int(batch["replaced"].sum())
                transformer.set_requires_gradient_sync(micro == accum - 1)
                gens = sample_generators(t.seed, batch["position"])
                strata = None
                if cfg.objective.uniform_sampling:  # sample j of the global batch draws from slice j of G
                    pos = torch.as_tensor(batch["position"])
                    strata = ((pos - state.base_position) % sampler.global_batch_size, sampler.global_batch_size)
                # One trip of offloaded encoders to the device per micro-batch: encoding and the mode's conditioning.
                needs_encoders = "latent_dist" not in batch or m.train_mode != "normal"
                with encoders_on(comps, device, offloaded and needs_encoders):
                    video = None
                    if "latent_dist" in batch:  # precomputed
                        latents = spec.latents_from_dist(comps, batch["latent_dist"].to(device), gens)
                        cond = Conditioning({k[5:]: v.to(device) for k, v in batch.items() if k.startswith("text.")})
                    else:
                        video = batch["video"].to(device, non_blocking=True)
                        latents = spec.encode_video(comps, video, gens)
                        if "first_frame" in batch and m.train_mode != "normal":
                            video = video.clone()  # the dataset's first-frame images condition, the clip trains
                            video[:, :, 0] = batch["first_frame"].to(video)
                        images = {"images": video[:, :, 0]} if spec.text_needs_image(m.train_mode) else {}
                        cond = spec.encode_text(comps, list(batch["caption"]), max_seq, **images)
                    prepared = objective.prepare(latents, gens, strata)
                    if m.train_mode != "normal":
                        prepared, cond = spec.condition(m.train_mode, comps, video, latents, prepared, cond, gens)
                counter = FlopCounterMode(display=False) if count and micro == 0 else contextlib.nullcontext()
                with counter:
                    if breakdown:
                        sync()
                    tf = time.perf_counter()
                    pred = spec.forward(transformer, prepared.noisy, prepared.timesteps, cond)
                    loss = objective.loss(pred, prepared) / accum
                    if breakdown:
                        sync()
                    tb = time.perf_counter()
                    # cp ranks' gradients sum to the sample's gradient and FSDP averages over dp_shard x cp.
                    (loss * dims.cp if dims.cp > 1 else loss).backward()
                    if breakdown:
                        sync()
                    phase["forward_s"] += tb - tf
                    phase["backward_s"] += time.perf_counter() - tb
                if count and micro == 0:
                    flops_per_step = counter.get_total_flops() * accum
                step_loss += loss.detach()
                tokens += spec.tokens_per_sample(latents.shape, comps) * latents.shape[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, t_max if (t_max := cfg.optim.max_grad_norm) > 0 else float("inf"), foreach=True
            )
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
            loss_value, replaced = _global_step_stats(step_loss, replaced, loss_group, dims.cp)
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            to = time.perf_counter()
            if finite:
                optimizer.step()
                nan_in_a_row = 0
                if ema is not None:
                    ema.update(step)
            else:
                nan_in_a_row += 1
                state.nan_steps_total += 1
                log.warning(
                    "step %d: non-finite loss %s / grad norm %s: optimizer step skipped (%d in a row, %d in total)",
                    step, loss_value, grad_norm, nan_in_a_row, state.nan_steps_total,
                )  # fmt: skip
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if breakdown:
                sync()
                phase["optimizer_s"] = time.perf_counter() - to

            elapsed = time.perf_counter() - t0
            global_tokens = tokens * dp_size
            if replaced:
                log.warning("step %d: %d sample(s) failed to decode and were replaced", step, replaced)
            state.data_replaced += replaced
            state.step = step
            state.samples_seen += sampler.global_batch_size
            state.tokens_seen += global_tokens
            result.losses.append(loss_value)
            result.grad_norms.append(grad_norm)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{global_tokens / elapsed:,.0f}")
            if step % cfg.log.logging_steps == 0 or step == t.train_steps:
                alloc, reserved = peak_memory_gb(device)
                metrics.log(
                    step,
                    {
                        "loss": loss_value,
                        "lr": lr_scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "step_time_s": elapsed,
                        "data_time_s": data_time,
                        "tokens_per_s": global_tokens / elapsed,
                        "samples_seen": state.samples_seen,
                        "data_skipped": len(usable.skipped),
                        "data_replaced": state.data_replaced,
                        "skipped_step": not finite,
                        "peak_memory_gb": alloc,
                        "peak_reserved_gb": reserved,
                        **(phase if breakdown else {}),
                        **(
                            {
                                "tflops_per_step": flops_per_step / 1e12,
                                "mfu": flops_per_step / elapsed / (peak_tflops * 1e12),
                            }
                            if flops_per_step and peak_tflops
                            else {}
                        ),  # fmt: skip
                    },
                )
            if c.max_nan_steps and nan_in_a_row >= c.max_nan_steps:
                checkpointer.wait()
                good = complete_checkpoints(out)
                raise FloatingPointError(
                    f"{nan_in_a_row} non-finite steps in a row (--max_nan_steps {c.max_nan_steps}); stopping. "
                    f"Last complete checkpoint: {good[-1][1] if good else 'none'}. Lower --lr or check the data."
                )
            if validation_items and v_every and (step % v_every == 0 or step == t.train_steps):
                if ema_args.validate_with_ema:
                    log.info("validation at step %d samples with the EMA weights (--validate_with_ema)", step)
                with (
                    ema.swapped_in() if ema_args.validate_with_ema else contextlib.nullcontext(),
                    encoders_on(comps, device, offloaded),
                ):
                    run_validation(spec, transformer, validation_items, cfg.validation, step, out, t.seed, metrics)
            checkpointer.poll()  # commits a finished async save
            if ckpt_every and step % ckpt_every == 0 and step < t.train_steps:
                save_checkpoint()
                last_saved = step
        if ckpt_every and last_saved != state.step:
            save_checkpoint(final=True)
        checkpointer.wait()
    finally:
        bar.close()
        metrics.close()

    staging = begin_export(out)  # exports appear whole, with a marker, or not at all (see publish_export)
    exported = export(staging)
    if ema is not None and ema_args.export_ema:
        with ema.swapped_in():
            export(staging / "ema")
    publish_export(staging, out, state.step)
    result.exported = out / exported.relative_to(staging) if exported is not None else None
    if rank == 0:
        final = f"final loss {result.losses[-1]:.5f}, " if result.losses else ""
        log.info("done: %d steps, %sweights in %s", state.step, final, result.exported)
    return result
