"""--dry_run: what a planned run would do, printed by rank 0; no weights are loaded, nothing is written.

With --plan_gpu_memory_gb the memory planner (ptrain/planner.py) also simulates the run's per-GPU peak, in a
fresh process (it needs its own fake process group): each phase's peak (start-up, the step, precompute or the
step's VAE encode, validation), the run's peak and the reserved estimate, and a layout that fits if this one
does not.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from ptrain.data import summary


def dry_run(run) -> None:
    """Print the summary of `run` (a ptrain.trainer.RunPlan) and, if asked, the memory plan (rank 0 only)."""
    if dist.get_rank() != 0:
        return
    cfg, usable, dims = run.cfg, run.usable, run.dims
    d, t = cfg.data, cfg.train
    lines = [
        "ptrain dry run: config, parallel degrees and data are valid",
        f"  layout: {dims.describe()}",
        f"  model: {cfg.model.model_name} ({cfg.model.training_type}) from {cfg.model.pretrained_model_name_or_path}",
    ]
    lines += [f"  {line}" for line in summary(usable, run.global_batch, run.rules.tokens)]
    if not usable.bucketed:
        lines.append(f"  tokens/sample: {run.rules.tokens(d.num_frames, d.height, d.width):,}")
    lines += [
        f"  frames: {run.sampling.describe()}, {d.reshape_mode}",
        f"  global batch {run.global_batch}: {run.steps_per_epoch} steps per epoch, {t.train_steps} steps "
        f"= {t.train_steps * run.global_batch / len(usable.records):.2f} epochs",
        f"  resume: {run.resume or 'none (fresh start)'}",
        *([f"  flags changed since that run's previous start: {'; '.join(run.changed)}"] if run.changed else []),
        f"  precomputation: {run.precompute.describe()}",
        f"  loader workers per rank: {d.num_workers(run.precompute.enabled)}",
    ]
    if dims.cp > 1:
        lines.append(
            f"  context parallel: {cfg.parallel.cp_mode} over {dims.cp} ranks; each holds 1/{dims.cp} (rounded up) of "
            f"every sample's video tokens (block activations / {dims.cp}); per-GPU peak: python -m ptrain.planner"
        )
    print("\n".join(lines), flush=True)
    if cfg.plan.plan_gpu_memory_gb:
        plan_memory(cfg, cfg.plan.plan_world_size or run.world, "on" if run.precompute.enabled else "off")


def plan_memory(cfg, world: int, precomputed: str = "off") -> None:
    """--plan_gpu_memory_gb: the planner's lines and its suggestion, if the configured layout does not fit."""
    budget = cfg.plan.plan_gpu_memory_gb
    print(f"  memory plan for {world} GPUs of {budget:g} GB (simulated, no GPU used; about a minute per layout):",
          flush=True)  # fmt: skip
    flags = cfg.argv or sys.argv[1:]  # the flags parsed (`ptrain dry-run FLAGS` has a command before them)
    flags = [*flags, "--enable_precomputation", precomputed]  # as decided for this run (auto: from the data)
    from ptrain.planner import read_plan, start_plan

    lines: list[str] = []
    try:
        res = read_plan(start_plan(cfg.model.pretrained_model_name_or_path, world, flags, "--budget_gb", str(budget)),
                        lines=lines)  # fmt: skip
    finally:
        print("\n".join(f"    {line}" for line in lines), flush=True)
    if not res["fits"] and res["suggestion"]:
        flags = list(res["suggestion"]["flags"])
        if "--no_gradient_checkpointing" in flags and cfg.activation_checkpoint.ac_mode != "auto":
            i = flags.index("--ac_mode")  # the rung's "--ac_mode full" only replaces an `auto`: not needed here
            del flags[i : i + 2]
        print(f"  suggestion: {res['suggestion']['name']}: add {' '.join(flags)}", flush=True)
