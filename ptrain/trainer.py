"""The training loop.

`train(cfg)` plans the run before loading any weights (`plan_run`: process group, mesh, resume point, data
scan, step counts), hands a dry run to ptrain/dry_run.py, and otherwise builds a `Trainer` and runs its loop:
`train_step` (micro-batches through `forward_backward`, then `optimizer_step`), `log_step`, `maybe_validate`,
`maybe_checkpoint`; at the end `export`. One loop for every model: all model-specific work goes through the
bound ModelSpec (ptrain/models/), the model set-up through ptrain/parallelize.py and the micro-batch through
ptrain/step.py, which the memory planner runs too.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental import implicit_replication
from tqdm import tqdm

from ptrain import attention
from ptrain.checkpoint import (
    CheckpointDamaged,
    Checkpointer,
    Layout,
    ModelState,
    OptimizerState,
    RNGState,
    TrainState,
    check_layout,
    complete_checkpoints,
    read_marker,
    resolve_resume,
    supersede,
)
from ptrain.collective import ALIKE, PeerFailed, all_max, raise_if_any_failed
from ptrain.config import Config, ConfigError, to_dict
from ptrain.data import (
    CPSampleAgreement,
    Usable,
    VideoDataset,
    build_dataloader,
    make_sampler,
    scan_dataset,
    summary,
    warn_long_captions,
)
from ptrain.data.precompute import Decision, PrecomputedDataset, decide, precompute
from ptrain.data.scan_cache import SCAN_CACHE, ScanCache
from ptrain.data.video import FrameSampling
from ptrain.errors import OutputWriteError, RunStopped
from ptrain.export import WRITE_ERRORS, begin_export, export_complete, export_full, export_lora, publish_export
from ptrain.export_comfyui import export_comfyui_lora
from ptrain.hub import is_hub_id, origin, peek_checkpoint, resolve_model_sources
from ptrain.interrupts import phase
from ptrain.loss_scale import LossScaler
from ptrain.metrics import MetricsWriter, device_peak_tflops, peak_memory_gb
from ptrain.models.spec import Components, ExpertPlan, ModelSpec, get_spec, plan_experts, read_model_index
from ptrain.objectives import sample_generators, to_device
from ptrain.optim import found_inf_for, skips_on_device
from ptrain.parallel import ParallelDims, init_distributed
from ptrain.parallel.compile import mark_step_begin, step_per_call
from ptrain.parallel.swap import streamed
from ptrain.parallelize import DTYPES, build_trainable, check_parallel_options, make_trainable_model
from ptrain.profiling import StepProfiler
from ptrain.step import Prepared, TrainStep, clip_gradients, make_inputs, set_gradient_sync
from ptrain.validation import (
    VALIDATION_INDEX,
    check_validation_shapes,
    load_validation_items,
    run_validation,
    tiled_decode,
)

log = logging.getLogger("ptrain")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    exported: Path | None = None
    transformer: torch.nn.Module | None = None
    components: Components | None = None
    spec: ModelSpec | None = None
    optimizer: torch.optim.Optimizer | None = None


class BarAwareHandler(logging.StreamHandler):
    """Log records written through tqdm.write: a line logged while the progress bar is drawn clears the bar, is
    printed on a line of its own and the bar is drawn again below it (it was appended to the bar's line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def setup_logging(rank: int, level: str) -> None:
    logging.basicConfig(
        level=level if rank == 0 else "WARNING",
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
        handlers=[BarAwareHandler(sys.stderr)],
    )
    if rank != 0:  # what every rank logs alike is shown once, by rank 0
        logging.getLogger().handlers[0].addFilter(lambda record: not getattr(record, "alike", False))
    # diffusers/transformers chatter (e.g. CPU generator notices) would drown the progress bar.
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel("ERROR")
    if rank != 0:  # one set of "Loading weights" bars (rank 0's), not one per rank
        import diffusers.utils.logging
        import transformers.utils.logging

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    # Known-harmless library notices: torchdata calls a deprecated torch API; FSDP2 warns that the root
    # returns a view (ptrain never modifies the output in place).
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")


def encoder_modules(comps: Components) -> list[torch.nn.Module]:
    """The frozen encoders: VAE, text encoder(s) (whatever else the spec loaded that is a module)."""
    mods = [comps.vae, comps.text_encoder, *comps.extra.values()]
    return [m for m in mods if isinstance(m, torch.nn.Module)]


def offload_encoders(comps: Components) -> None:
    """Move the frozen encoders to CPU memory (they come back to the device only inside `encoders_on`)."""
    for m in encoder_modules(comps):
        m.to("cpu")


@contextlib.contextmanager
def encoders_on(comps: Components, device: torch.device, offloaded: bool, stream_text: bool = False):
    """With offloaded encoders: move them to `device` for the block, back to CPU memory after it. `stream_text`
    (validation, with the training state resident): only the VAE moves; the text encoders stay in CPU memory and
    each of their layers visits the device while it runs (ptrain.parallel.swap.streamed)."""
    if not offloaded or device.type == "cpu":
        yield
        return
    moved = [comps.vae] if stream_text else encoder_modules(comps)
    streamed_ones = [m for m in encoder_modules(comps) if m not in moved]
    for m in moved:
        m.to(device)
    try:
        with contextlib.ExitStack() as stack:
            for m in streamed_ones:
                stack.enter_context(streamed(m, device))
            yield
    finally:
        offload_encoders(comps)


def _global_step_stats(loss: torch.Tensor, replaced: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[mean loss over the dp x cp ranks, samples replaced in the global batch] in one all-reduce, on the device
    (no host sync): every rank gets the same values, so they all decide alike (NaN guard, logging). A cp group
    shares its samples, so their replacement count is divided back out."""
    # the count is a host tensor (the loader's): a pinned, non-blocking copy (a pageable one would wait for the GPU)
    t = torch.stack([loss.detach().float().reshape(()), to_device(replaced.float(), loss.device).reshape(())])
    if group is None:
        return t
    dist.all_reduce(t, group=group)
    mean_loss, replaced = t.unbind()
    return torch.stack([mean_loss / dist.get_world_size(group), replaced / cp])  # no host tensor: no copy


def find_resume(cfg: Config, out: Path, layout: Layout) -> tuple[Path | None, bool]:
    """The checkpoint to resume from (or None) and whether it needs resharding; errors name what changed."""
    from ptrain.collective import all_max

    c, m = cfg.checkpoint, cfg.model
    err, resume = None, None
    try:
        resume = resolve_resume(c.resume_from_checkpoint, out)
    except ConfigError as e:
        err = e
    raise_if_any_failed(err, f"finding the checkpoint to resume in {out}")
    # every rank looks at output_dir itself: a folder not shared by every node, or a stale view of it, gave ranks
    # different answers, and rank 0 waited in the checkpoint load for ranks that trained from scratch (30 minutes)
    marker = read_marker(resume) if resume is not None else {"step": -1}
    step = marker["step"]
    newest, oldest = all_max(step), -all_max(-step)
    if newest != oldest:
        def name(s):
            return f"checkpoint step {s}" if s >= 0 else "no checkpoint"
        raise ConfigError(f"the ranks see different checkpoints in {out}: {name(newest)} on some, {name(oldest)} on "
                          f"others (this rank: {name(step)}); --output_dir must be one folder on storage every node "
                          "mounts (a shared filesystem), given by the same path on each")  # fmt: skip
    if resume is None:
        return None, False
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


@dataclass
class RunPlan:
    """What a run will do, known before any weights are loaded: layout, resume point, usable data, steps."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    dims: ParallelDims
    mesh: object
    out: Path
    layout: Layout
    spec: ModelSpec
    overrides: dict
    rules: object
    sampling: FrameSampling
    usable: Usable
    steps_per_epoch: int
    resume: Path | None = None
    resharded: bool = False
    #: The newest checkpoint is at --train_steps and its export is complete: nothing to do.
    finished: bool = False
    #: flag -> the hub id it named (the config now holds the snapshot folder)
    hub_ids: dict = field(default_factory=dict)
    #: --enable_precomputation's outcome (auto decided here, with its reason)
    precompute: Decision = field(default_factory=lambda: Decision(False, "not decided"))
    #: when resuming: the flags changed since the previous start ("--flag old -> new"; see changed_flags)
    changed: list = field(default_factory=list)
    #: --expert on a two-expert checkpoint (Wan 2.2 A14B), else None
    experts: ExpertPlan | None = None

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch_size


def plan_run(cfg: Config) -> RunPlan:
    """Process group and mesh, the resume point (a changed layout fails fast), the model's shape rules from its
    configs and the data scan (bad data fails fast), and the step count; no weights are read."""
    rank, world, device = init_distributed(cfg.parallel.dist_timeout_s, cfg.parallel.fsdp_cpu_offload)
    setup_logging(rank, cfg.log.log_level)
    p, t, m = cfg.parallel, cfg.train, cfg.model
    # a dry run of one process planning for --plan_world_size GPUs checks the degrees against that world
    planned = cfg.plan.plan_world_size if cfg.plan.dry_run and cfg.plan.plan_world_size and world == 1 else None
    dims = ParallelDims.build(p.dp_degree, p.dp_shards, p.cp_degree, planned or world,
                              *(["--plan_world_size"] if planned else []))  # fmt: skip
    mesh = dims.build_mesh(p.dist_timeout_s, p.fsdp_cpu_offload) if planned is None else None
    log.info("ptrain: %s on %s (%s)%s", dims.describe(), device, dist.get_backend(),
             f", planned for --plan_world_size {planned} (this dry run is one process)" if planned else "")  # fmt: skip
    for note in cfg.compat_notes:
        log.info("flag from another trainer: %s", note)
    for warning in unused_flag_warnings(cfg):
        log.warning("%s", warning)
    check_parallel_options(cfg, dims, device, cfg.plan.dry_run)
    out = Path(t.output_dir)
    global_batch = t.batch_size * dims.dp * t.gradient_accumulation_steps
    layout = Layout(planned or world, dims.dp_replicate, dims.dp_shard, dims.cp, global_batch)
    resume, resharded = find_resume(cfg, out, layout)
    # --model_name auto: the checkpoint's family (a hub id's from its fetched configs); a contradicting one: error
    peeked = None if not is_hub_id(m.pretrained_model_name_or_path) else peek_checkpoint(m)
    m.resolve_model_name(peeked)
    spec = get_spec(m.model_name)
    wants_validation = cfg.validation.validation_prompts or cfg.validation.validation_dataset_file
    # a two-expert checkpoint (Wan 2.2 A14B): the --expert trained, its timestep range, the other one to validate
    experts = plan_experts(m, cfg.objective, read_model_index(peeked or m.pretrained_model_name_or_path),
                           bool(wants_validation))  # fmt: skip
    if m.train_mode == "inpaint" and wants_validation and spec.inpaint_pipeline_cls is None:
        raise ConfigError(
            f"--train_mode inpaint: diffusers has no pipeline that samples {spec.name}'s inpaint layout, so ptrain "
            "cannot validate it; leave out --validation_prompts / --validation_dataset_file"
        )
    overrides = {
        "transformer": m.transformer_id, "vae": m.vae_id, "text_encoder": m.text_encoder_id,
        "tokenizer": m.tokenizer_id, "text_encoder_2": m.text_encoder_2_id, "tokenizer_2": m.tokenizer_2_id,
    }  # fmt: skip
    # a dry run plans from the configs: it fetches no weights (the run itself downloads them)
    needed = list(spec.component_classes)
    if experts is not None:  # the trained expert's folder, and the other one's when the run validates
        needed = [c for c in needed if c != "transformer"] + [experts.folder] + [experts.other] * bool(experts.other)
    hub_ids = resolve_model_sources(m, needed, list(spec.optional_components), weights=not cfg.plan.dry_run)
    if "--pretrained_model_name_or_path" not in hub_ids:  # (a snapshot's folders are checked as it is fetched)
        _check_local_components(Path(m.pretrained_model_name_or_path), needed, {n for n, v in overrides.items() if v})
    if hub_ids:  # hub ids -> snapshot folders
        overrides = {name: getattr(m, f"{name}_id") for name in overrides}
    if experts is not None and experts.folder != "transformer" and overrides["transformer"] is None:
        overrides["transformer"] = str(Path(m.pretrained_model_name_or_path) / experts.folder)
    rules = spec.shape_rules(m.pretrained_model_name_or_path, overrides)  # from the configs, no weights
    sampling = FrameSampling.from_args(cfg.data)
    # the probes of a previous start on this output_dir: a restart or resume does not decode every file again
    usable = scan_dataset(cfg.data, sampling, rules, ScanCache(out / SCAN_CACHE, write=not cfg.plan.dry_run),
                          first_frames=m.train_mode != "normal")  # fmt: skip
    for shape in sorted(set(usable.buckets)):  # before any weights load, so --dry_run refuses what the run would
        rules.check(shape.frames, shape.height, shape.width)
    if cfg.validation.enabled():  # the validation videos' sizes and images too
        check_validation_shapes(rules.check, load_validation_items(cfg.validation, cfg.data, m.train_mode))
    steps_per_epoch = make_sampler(usable, t.batch_size, 0, dims.dp, t.gradient_accumulation_steps,
                                   t.seed).steps_per_epoch  # fmt: skip
    if t.num_train_epochs:
        t.train_steps = t.num_train_epochs * steps_per_epoch
        log.info("--num_train_epochs %d: %d steps (%d per epoch of %d samples, global batch %d)", t.num_train_epochs,
                 t.train_steps, steps_per_epoch, len(usable.records), global_batch)  # fmt: skip
    run = RunPlan(cfg, rank, world, device, dims, mesh, out, layout, spec, overrides, rules, sampling, usable,
                  steps_per_epoch, resume, resharded, hub_ids=hub_ids, experts=experts)  # fmt: skip
    run.precompute = _decide_precomputation(run)
    if cfg.activation_checkpoint.ac_mode == "auto":  # planned with the encoders where they will be
        resolve_auto_ac(cfg, world, rank, device, out, run.precompute.enabled)
    if resume is not None:
        run.changed = changed_flags(out / "config.json", run_config(run))
        if m.training_type == "lora":
            _refuse_other_adapters(out / "config.json", m, spec.default_target_modules, resume)
    if resume is not None and not cfg.plan.dry_run:
        run.finished = _resume_is_finished(run)
    return run


class OutputLock:
    """output_dir/.ptrain.lock, held (flock) by rank 0 while the run trains: a second run in the same folder stops
    at start instead of writing the same checkpoints. The OS releases it when the process ends, however it ends."""

    def __init__(self, handle=None):
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def lock_output_dir(out: Path, rank: int) -> OutputLock:
    """Rank 0 takes output_dir's lock (creating the folder); collective: if it is held, every rank raises a
    ConfigError naming the holder."""
    from ptrain.collective import all_max

    lock, held_by = OutputLock(), None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / ".ptrain.lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            held_by = handle.read().strip() or "another process"
            handle.close()
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            lock.handle = handle
    if all_max(int(held_by is not None)):
        raise ConfigError(f"--output_dir {out} is in use by another ptrain run ({held_by or 'see rank 0'}): two "
                          "runs would write the same checkpoints; wait for it, stop it, or use another --output_dir")  # fmt: skip
    check_shared_dir(out, rank)
    return lock


def check_shared_dir(out: Path, rank: int, tries: int = 3) -> None:
    """Collective: every rank sees the file rank 0 writes in output_dir, or all raise a ConfigError naming the
    hosts that do not. A folder local to each node (a relative path on several nodes) made rank 0's checkpoint
    saves fail with another rank's "Connection closed by peer" and resumes disagree (the sixth audit)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    probe = out / ".ptrain.shared"
    token = [f"{socket.gethostname()} {os.getpid()} {time.time_ns()}" if rank == 0 else None]
    if rank == 0:
        with open(probe, "w") as f:
            f.write(token[0])
            f.flush()
            os.fsync(f.fileno())
    dist.broadcast_object_list(token, src=0)
    sees = rank == 0
    for _ in range(tries if rank else 0):  # a network filesystem may show the new file a moment later
        try:
            sees = probe.read_text() == token[0]
        except OSError:
            sees = False
        if sees:
            break
        time.sleep(1.0)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (rank, socket.gethostname(), sees))
    if rank == 0:  # every rank has looked
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, host, ok in views if not ok]
    if blind:
        raise ConfigError(f"--output_dir {out} is not one folder seen by every rank: {', '.join(blind)} "
                          f"cannot see the file rank 0 wrote there ({probe}). Checkpoints and exports need a folder on "
                          "storage every node mounts (a shared filesystem), given by the same path on each")  # fmt: skip


#: Flags whose change between starts of one run is expected (where to resume, how long, what to log; the output
#: folder itself, which may have been moved or copied).
_RESTART_FLAGS = {"resume_from_checkpoint", "train_steps", "num_train_epochs", "dry_run", "hub_ids", "config",
                  "output_dir", "logging_steps", "report_to", "profile_from_step", "profile_num_steps",
                  "log_step_breakdown", "log_level", "plan_gpu_memory_gb", "plan_world_size"}  # fmt: skip


#: Flags that change only what the export writes: added to a finished run, it exports again (a rerun's export of
#: the same checkpoint writes the same bytes) instead of refusing the changed settings.
_EXPORT_FLAGS = {"export_comfyui", "export_ema", "export_every_checkpoint"}


def run_config(run: RunPlan) -> dict:
    """What output_dir/config.json records of a start: every flag, and the hub ids behind snapshot folders."""
    return {**to_dict(run.cfg), **({"hub_ids": run.hub_ids} if run.hub_ids else {})}


#: LoRA's flags (and other trainers' names for them), which a full fine-tune does not use.
_LORA_FLAGS = ("--rank", "--lora_alpha", "--target_modules", "--network_dim", "--network_alpha")


def unused_flag_warnings(cfg: Config) -> list[str]:
    """Flags given on the command line that the run will not use as the user likely meant, each said once at
    start (a new-user trial: they were accepted without a word)."""
    given = {a.split("=", 1)[0] for a in cfg.argv if a.startswith("--")}
    out = []
    lora = [f for f in _LORA_FLAGS if f in given]
    if lora and cfg.model.training_type != "lora":
        out.append(f"{', '.join(lora)}: LoRA's settings, unused by --training_type {cfg.model.training_type} (every "
                   "weight trains)")  # fmt: skip
    t, o = cfg.train, cfg.optim
    if o.lr_warmup_steps > t.train_steps and not t.num_train_epochs:
        out.append(f"--lr_warmup_steps {o.lr_warmup_steps} exceeds --train_steps {t.train_steps}: the learning rate "
                   f"reaches only {t.train_steps / o.lr_warmup_steps:.0%} of --lr {o.lr:g} by the last step")  # fmt: skip
    return out


def _check_local_components(base: Path, needed: list[str], overridden: set[str]) -> None:
    """A local --pretrained_model_name_or_path has a folder for every component loaded from it: checked before
    the dry run says "valid" (a ptrain full fine-tune's output, a transformer alone, failed only at load)."""
    if not base.is_dir():
        return
    missing = [c for c in needed if c not in overridden and not (base / c).is_dir()]
    if not missing:
        return
    hint = ""
    if (base / "transformer").is_dir() and "transformer" not in missing:
        hint = (f" If it holds a fine-tuned transformer (e.g. a ptrain full fine-tune's output), give the base "
                f"model's folder or hub id here and this one with --transformer_id {base / 'transformer'}")
    raise ConfigError(f"--pretrained_model_name_or_path {base}: no {', '.join(c + '/' for c in missing)} folder: "
                      "ptrain loads a diffusers pipeline folder (model_index.json, transformer/, vae/, text "
                      f"encoders, tokenizers, scheduler/).{hint}")  # fmt: skip


def _refuse_other_adapters(previous: Path, m, default_targets: list[str], resume) -> None:
    """A LoRA resume whose adapters differ from the checkpoint's (the previous start's config.json) stops here,
    before any weights load: another --lora_alpha rescales every update learned so far; another --rank does not
    fit the saved matrices; fewer --target_modules would drop trained adapters without a word (DCP loads the keys
    the new model has), more would add untrained ones to a model the checkpoint says is trained."""
    try:
        before = json.loads(previous.read_text())
    except (OSError, ValueError):
        return
    if before.get("training_type", "lora") != "lora":
        return
    then = sorted(before.get("target_modules") or default_targets)
    now = sorted(m.target_modules or default_targets)
    why = []
    if "lora_alpha" in before and before["lora_alpha"] != m.lora_alpha:
        why.append(f"--lora_alpha {before['lora_alpha']} -> {m.lora_alpha}: the adapters were trained at scale "
                   "lora_alpha / rank, and another alpha rescales every update learned so far")  # fmt: skip
    if "rank" in before and before["rank"] != m.rank:
        why.append(f"--rank {before['rank']} -> {m.rank}: the checkpoint's adapter matrices have rank {before['rank']}")
    if then != now:
        lost, new = sorted(set(then) - set(now)), sorted(set(now) - set(then))
        why.append(f"--target_modules {' '.join(then)} -> {' '.join(now)}: "
                   + "; ".join(([f"the trained adapters of {', '.join(lost)} would be dropped"] if lost else [])
                               + ([f"{', '.join(new)} would start untrained"] if new else [])))  # fmt: skip
    if why:
        raise ConfigError(f"resume from {resume} with other LoRA adapters: {'; '.join(why)}. Keep the checkpoint's "
                          "settings, or start a new run in another --output_dir")  # fmt: skip


def changed_flags(previous: Path, now: dict) -> list[str]:
    """The flags (outside _RESTART_FLAGS) that differ from the previous start's output_dir/config.json, as
    "--flag old -> new" ([] if there is no readable previous config)."""
    try:
        before = json.loads(previous.read_text())
    except (OSError, ValueError):
        return []
    return [f"--{k} {before[k]} -> {v}" for k, v in now.items()
            if k in before and before[k] != v and k not in _RESTART_FLAGS]  # fmt: skip


def resolve_auto_ac(cfg: Config, world: int, rank: int, device: torch.device, out: Path,
                    precomputed: bool = False) -> None:  # fmt: skip
    """--ac_mode auto: rank 0 asks the memory planner (in a child process: it runs on a fake process group) for the
    least recompute that fits --gpu_memory_gb (default: this GPU's memory); every rank applies the choice to its
    config. The choice is kept in output_dir/ac_auto.json and reused while the flags and budget stay the same.
    `precomputed`: the run's precomputation decision (without it the encoders stay on the device: planned so)."""
    from ptrain.collective import all_max
    from ptrain.planner import AC_LADDER, with_flags

    if cfg.model.model_name == "auto" and not is_hub_id(cfg.model.pretrained_model_name_or_path):
        cfg.model.resolve_model_name()  # the plan's key holds the family (plan_run resolves it before this)
    a = cfg.activation_checkpoint
    budget = a.gpu_memory_gb
    if budget is None and device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory / 1e9
    if budget is None:
        raise ConfigError("--ac_mode auto plans against the GPU's memory; there is no GPU here: give --gpu_memory_gb")
    index = _plan_auto_ac(cfg, world, budget, out, precomputed) if rank == 0 else -1
    index = all_max(index)
    if index < 0:
        raise ConfigError(
            f"--ac_mode auto: even full activation checkpointing does not fit {budget:g} GB per GPU (planned; see "
            "above): shard over more GPUs (--dp_shards), use --cp_degree, lower the resolution or frames, or LoRA"
        )
    name, flags = AC_LADDER[index]
    chosen = with_flags(cfg, flags).activation_checkpoint
    a.gradient_checkpointing, a.ac_mode, a.ac_every_n_blocks = (
        chosen.gradient_checkpointing, chosen.ac_mode, chosen.ac_every_n_blocks,
    )  # fmt: skip
    log.info("--ac_mode auto: %s (%s) for %g GB per GPU", name, " ".join(flags), budget)


def _plan_auto_ac(cfg: Config, world: int, budget: float, out: Path, precomputed: bool = False) -> int:
    """Rank 0's part of resolve_auto_ac: the AC_LADDER index that fits (-1: none), from the cache or the planner."""
    from ptrain.planner import AC_LADDER, read_plan, start_plan

    ignore = ("train_steps", "num_train_epochs", "resume_from_checkpoint", "dry_run", "log_level",
              "gradient_checkpointing", "ac_every_n_blocks")  # auto decides these
    key = {k: v for k, v in to_dict(cfg).items() if k not in ignore} | {"world": world, "budget_gb": budget,
                                                                        "precomputed": precomputed}  # fmt: skip
    cache = out / "ac_auto.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        index = saved.get("index")
        same_ladder = index == -1 or (isinstance(index, int) and 0 <= index < len(AC_LADDER)
                                      and saved.get("name") == AC_LADDER[index][0])  # fmt: skip
        if saved.get("key") == key and same_ladder:  # a plan from an older ladder is planned again
            log.info("--ac_mode auto: the plan of %s (same flags and budget)", cache)
            return index
    log.info("--ac_mode auto: planning the memory of each AC mode for %g GB per GPU (simulated, no GPU used)", budget)
    lines: list[str] = []
    try:  # a fresh process (the planner runs on a fake process group of its own), as the other planner calls
        flags = [*cfg.argv, "--enable_precomputation", "on" if precomputed else "off"]  # as decided for this run
        res = read_plan(start_plan(cfg.model.pretrained_model_name_or_path, world, flags, "--budget_gb", str(budget),
                                   "--choose_ac"), lines=lines)  # fmt: skip
    finally:
        for line in lines:
            log.info("  %s", line)
    index = -1 if res["index"] is None else res["index"]
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "index": index, "name": res["name"], "lines": res["lines"]}, indent=2))
    return index


def _decide_precomputation(run: RunPlan) -> Decision:
    """--enable_precomputation (auto: ptrain.data.precompute.decide) decided by rank 0, whose disk and cache
    folder it looks at, and sent to the other ranks so that all take the same data path; logged with its reason."""
    decision = decide(run.cfg, run.usable, run.spec, run.rules, run.global_batch) if run.rank == 0 else None
    if run.world > 1:
        box = [decision]
        dist.broadcast_object_list(box, src=0)
        decision = box[0]
    log.info("precomputation: %s", decision.describe())
    return decision


def _resume_is_finished(run: RunPlan) -> bool:
    """Whether the resume checkpoint already ends the run (then its export decides whether anything is left)."""
    t, done_step = run.cfg.train, read_marker(run.resume)["step"]
    if done_step > t.train_steps:
        raise ConfigError(
            f"checkpoint {run.resume} is at step {done_step}, past --train_steps {t.train_steps}: raise --train_steps, "
            f"or pick an earlier checkpoint with --resume_from_checkpoint N"
        )
    if done_step < t.train_steps:
        return False
    if export_complete(run.out, done_step):
        changed = run.changed
        if changed and all(c.split()[0][2:] in _EXPORT_FLAGS for c in changed):  # an export the run did not write
            log.info("run is complete at step %d; %s: exporting again", done_step, "; ".join(changed))
            return False
        if changed:  # rerunning a finished run is a no-op; with other settings the user means a new run
            raise ConfigError(
                f"--output_dir {run.out} holds a finished run (checkpoint {run.resume.name} at --train_steps "
                f"{t.train_steps}, exported) made with other settings: {'; '.join(changed)}. Nothing would train "
                "with them. Use another --output_dir for a new run, --resume_from_checkpoint none to start over "
                "in this one (its checkpoints are moved aside, not deleted), or raise --train_steps to continue it"
            )
        log.info(
            "run is complete: checkpoint %s is at --train_steps %d and the weights are exported in %s; "
            "nothing to do (raise --train_steps to train further)", run.resume, t.train_steps, run.out,
        )  # fmt: skip
        return True
    log.info("run is complete at step %d but its export is missing or partial: exporting again", done_step)
    return False


def train(cfg: Config) -> TrainResult:
    """Run ptrain as configured (every rank calls it)."""
    cfg.validate()
    run = plan_run(cfg)
    if cfg.plan.dry_run:
        from ptrain.dry_run import dry_run

        dry_run(run)
        return TrainResult()
    if run.finished:
        # Every rank leaves together: one that tore its process group down while another was still setting
        # up its own aborted ("terminate called without an active exception", seen in the chaos run).
        dist.barrier()
        return TrainResult(exported=run.out)
    return Trainer(run).train()


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption, torchrun stopping its workers) during the loop:
    the first asks the run to stop after the current step and save a checkpoint there; a second Ctrl-C stops at
    once (KeyboardInterrupt, as before: the steps since the last checkpoint are lost). The ranks agree on the
    step to stop after with an all-reduce on a CPU (gloo) group each step: a host-side exchange of one integer,
    no wait for the device."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, world: int):
        import signal
        import threading

        self.name: str | None = None
        self.number = 0
        self._previous: dict = {}
        self._group = dist.new_group(backend="gloo") if world > 1 else None
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        if self.name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.name is None:
            self.name, self.number = signal.Signals(signum).name, signum
            log.warning("%s: stopping after this step with a checkpoint there (Ctrl-C again stops at once, losing "
                        "the steps since the last checkpoint)", self.name)  # fmt: skip

    def agreed(self) -> int:
        """Collective (every rank, every step): the signal number any rank received (0: none)."""
        if self._group is None:
            return self.number
        t = torch.tensor([self.number], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return int(t.numpy()[0])  # a CPU tensor: no device sync

    def close(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class GCControl:
    """Python's garbage collector off in the loop, a generation-1 collection every `every` steps (0: untouched)."""

    def __init__(self, every: int):
        self.every = every
        self.was_enabled = gc.isenabled()
        if every:
            gc.disable()
            gc.collect()  # start clean: what the set-up left behind

    def maybe_collect(self, step: int) -> None:
        if self.every and step % self.every == 0:
            gc.collect(1)

    def close(self) -> None:
        if self.every and self.was_enabled:
            gc.enable()


@dataclass
class StepStats:
    """What one optimizer step measured (loss: the global batch's mean; replaced samples: summed over it)."""

    #: On the device until a logging step reads them (no host sync in other steps).
    loss: torch.Tensor | float = 0.0
    grad_norm: torch.Tensor | float = 0.0
    finite: torch.Tensor | bool = True
    #: non-finite and not a float16 overflow (ptrain/loss_scale.py): counts against --max_nan_steps
    diverged: torch.Tensor | bool = False
    #: float16 compute: the loss scale this step ran with (None otherwise)
    loss_scale: torch.Tensor | None = None
    replaced: torch.Tensor | int = 0
    data_time: float = 0.0
    tokens: int = 0
    phase: dict = field(default_factory=lambda: {"forward_s": 0.0, "backward_s": 0.0})
    #: (model, hardware) FLOPs of this rank's micro-batches (0 when not counted)
    flops: tuple[float, float] = (0.0, 0.0)


class Trainer:
    """Builds the model, checkpointer and data path of a planned run (`build_*`), then runs the loop."""

    def __init__(self, run: RunPlan):
        self.run, self.cfg, self.device = run, run.cfg, run.device
        #: --compile_mode with CUDA graphs: each forward starts a new step of torch's CUDA-graph trees
        self.cudagraphs = self.cfg.compile.cudagraphs() and self.device.type == "cuda"
        self.state = TrainState()
        self.accum = self.cfg.train.gradient_accumulation_steps
        self.v_every = self.cfg.validation.validation_steps
        if self.cfg.validation.validation_epochs:
            self.v_every = self.cfg.validation.validation_epochs * run.steps_per_epoch
        self.cp_agree: CPSampleAgreement | None = None  # set in train() when a cp group decodes its samples
        self.out_lock = lock_output_dir(run.out, run.rank)
        if run.rank == 0 and run.changed:
            log.warning("resuming from %s with flags changed since the previous start (%s): %s; the checkpoint's "
                        "state continues under the new values", run.resume, run.out / "config.json",
                        "; ".join(run.changed))  # fmt: skip
        self.load_model()
        self.log_phase_peak("the load (the encoders on the device)")
        # Precomputation runs before the transformer is placed on the device: its peak (VAE and text encoders)
        # never adds to the training state's.
        self.max_seq = self.cfg.data.max_sequence_length or self.spec.max_sequence_length(self.comps)
        if run.rank == 0:
            d = self.cfg.data
            warn_long_captions((f"{d.id_token} {r.caption}" if d.id_token else r.caption for r in run.usable.records),
                               self.comps.tokenizer, self.max_seq)  # fmt: skip
        self.dataset = self.precompute() if run.precompute.enabled else None
        if self.dataset is not None:
            self.log_phase_peak("precompute (VAE encode, text encoders)")
        self.build_model()
        self.build_checkpointer()
        self.resume()
        if run.rank == 0:  # only once the start has loaded: a start that fails (e.g. a resume refused for a changed
            # --rank) leaves the previous start's record and the later checkpoints where they were
            self.supersede_later_checkpoints()
            (run.out / "config.json").write_text(json.dumps(run_config(run), indent=2))
        self.build_data()
        self.build_step()

    # --- set-up ------------------------------------------------------------------------------------
    def load_model(self) -> None:
        """Load the components and bind the spec to them and the train mode (the transformer stays unplaced)."""
        cfg, run, m = self.cfg, self.run, self.cfg.model
        dtypes = {
            # Full fine-tuning keeps float32 master weights (FSDP2 computes in --transformer_dtype);
            # LoRA keeps the frozen base in --transformer_dtype to save memory.
            "transformer": DTYPES[m.transformer_dtype] if m.training_type == "lora" or cfg.optim.full_bf16
            else torch.float32,
            "vae": DTYPES[m.vae_dtype],
            "text_encoder": DTYPES[m.text_encoder_dtype],
            "text_encoder_2": DTYPES[m.text_encoder_2_dtype],
        }
        planning = self.start_vae_planning()  # beside the loading
        log.info("loading %s from %s", m.model_name, m.pretrained_model_name_or_path)
        try:
            comps = run.spec.load_components(m.pretrained_model_name_or_path, dtypes, self.device, run.overrides,
                                             m.variant)  # fmt: skip
        except BaseException:
            if planning is not None:
                planning.kill()
            raise
        self.configure_vae(comps.vae, planning)
        if run.experts is not None:
            self.load_other_expert(comps, run.experts, DTYPES[m.transformer_dtype])
        self.offloaded = m.offload_encoders and self.device.type != "cpu"
        if m.offload_encoders:
            log.info("--offload_encoders: %s", "the VAE and text encoders wait in CPU memory between uses" if
                     self.offloaded else f"nothing to move on {self.device} (the encoders are in its memory already)")  # fmt: skip
        if self.offloaded:
            offload_encoders(comps)
        # may widen the transformer's input channels for the mode
        spec = run.spec.bind(comps, m.train_mode, m.mask_probs(), m.training_type)
        if spec.expanded_input and m.training_type == "lora" and cfg.checkpoint.export_comfyui:
            raise ConfigError(
                f"--export_comfyui: this run widens {spec.expanded_input} for --train_mode {m.train_mode}, which a "
                "ComfyUI LoRA file cannot carry; export without it (ptrain writes input_layer.safetensors beside "
                "the LoRA) or train from a checkpoint that has the input channels"
            )
        for shape in sorted(set(run.usable.buckets)):  # every training shape (one without --enable_bucket)
            spec.check_shape(shape.frames, shape.height, shape.width, comps)
        self.spec, self.comps, self.transformer = spec, comps, comps.transformer

    def load_other_expert(self, comps: Components, experts: ExpertPlan, dtype: torch.dtype) -> None:
        """The trained expert's pipeline slot; the frozen other expert when the run validates: in CPU memory, in
        the compute dtype (on a GPU each of its layers visits the device only while it runs in validation)."""
        m = self.cfg.model
        comps.expert_slot = experts.folder
        if experts.other is None:
            return
        src = m.pretrained_model_name_or_path
        log.info("--expert %s: loading the other expert (%s/) into CPU memory for validation", experts.expert,
                 experts.other)  # fmt: skip
        kwargs = {"variant": m.variant} if m.variant else {}
        try:
            other = self.run.spec.transformer_cls.from_pretrained(
                src, subfolder=experts.other, torch_dtype=dtype, use_safetensors=True, **kwargs
            )
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the other expert from {src}/{experts.other}{origin(src)}: {e}") from e

        def same_dtype(module, args, kwargs):  # the pipeline feeds it in the trained expert's dtype (float32 for a
            # full fine-tune's master weights); timesteps stay as they are
            def cast(name, v):
                return v.to(dtype) if "hidden_states" in name and torch.is_tensor(v) and v.is_floating_point() else v

            return tuple(cast("hidden_states", a) for a in args[:1]) + args[1:], {k: cast(k, v) for k, v in
                                                                                  kwargs.items()}  # fmt: skip

        other.register_forward_pre_hook(same_dtype, with_kwargs=True)
        comps.other_expert = other.requires_grad_(False).eval()

    def start_vae_planning(self):
        """--enable_tiling / --enable_slicing auto on a GPU: rank 0 starts the memory planner (a fresh process: it
        needs its own fake process group) for this run's flags and world, to read its decision after loading."""
        m = self.cfg.model
        if self.device.type != "cuda" or "auto" not in (m.enable_tiling, m.enable_slicing) or self.run.rank != 0:
            return None
        from ptrain.planner import start_plan

        log.info("--enable_tiling / --enable_slicing auto: planning the run's memory beside the loading (python -m "
                 "ptrain.planner; up to a minute; on / off skips it)")  # fmt: skip
        return start_plan(m.pretrained_model_name_or_path, self.run.world, self.cfg.argv, "--no_vae_phases")

    def configure_vae(self, vae, planning) -> None:
        """Turn the VAE's tiling / slicing on as --enable_tiling / --enable_slicing say: on, off, or auto: on a GPU
        the planner's decision (tiling when the VAE encode's untiled peak would exceed the step's), on a CPU off
        (there is no device memory to save, and CPU runs keep the untiled numerics)."""
        m = self.cfg.model
        flags = {"enable_tiling": m.enable_tiling, "enable_slicing": m.enable_slicing}
        auto = {}
        if "auto" in flags.values():
            auto = self.auto_vae(planning) if self.device.type == "cuda" else {}
            if self.device.type != "cuda":
                log.info("--enable_tiling / --enable_slicing auto: off on %s (no GPU memory to save)", self.device)
        for flag, value in flags.items():
            if value == "on" and not hasattr(vae, flag):
                raise ConfigError(f"--{flag}: {type(vae).__name__} has no {flag}()")
            if (value == "on" or (value == "auto" and auto.get(flag))) and hasattr(vae, flag):
                getattr(vae, flag)()
        on = [f"VAE {flag[len('enable_'):]} on" for flag, value in flags.items() if value == "on"]
        if on:
            log.info("--enable_tiling / --enable_slicing: %s (as given)", ", ".join(on))

    def auto_vae(self, planning) -> dict[str, bool]:
        """Rank 0 reads the planner's decision and every rank receives it (a failed plan: off, with a warning)."""
        decision = [{}]
        if planning is not None:
            from ptrain.planner import describe_phases, read_plan

            try:
                res = read_plan(planning, timeout=900)
                v = res["vae"]
                decision = [{"enable_tiling": v["tiling"], "enable_slicing": v["slicing"]}]
                log.info("--enable_tiling / --enable_slicing auto: %s: VAE tiling %s, slicing %s", v["decision"],
                         "on" if v["tiling"] else "off", "on" if v["slicing"] else "off")  # fmt: skip
                for line in describe_phases(res):
                    log.info("planned %s", line)
            except (RuntimeError, ValueError, KeyError) as e:
                log.warning("--enable_tiling / --enable_slicing auto: the memory planner failed, VAE tiling and "
                            "slicing stay off (give on / off to choose): %s", e)  # fmt: skip
        if self.run.world > 1:
            dist.broadcast_object_list(decision, src=0)
        return decision[0]

    def log_phase_peak(self, phase: str) -> None:
        """On CUDA: log the allocator's peak since the last reset as `phase`'s, then reset it (each phase's own)."""
        if self.device.type == "cuda":
            log.info("peak memory of %s: %.2f GiB allocated, %.2f GiB reserved", phase, *peak_memory_gb(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def build_model(self) -> None:
        """The trainable, parallelized transformer with its optimizer, schedule and EMA (ptrain/parallelize.py)."""
        cfg, run = self.cfg, self.run
        attention.report(self.spec, self.transformer.config, DTYPES[cfg.model.transformer_dtype], self.device,
                         cfg.compile.attention_backend)  # fmt: skip
        make_trainable_model(self.transformer, cfg, self.spec)
        self.model = build_trainable(self.transformer, cfg, self.spec, run.mesh, run.dims, self.device,
                                     cfg.train.train_steps)  # fmt: skip
        self.scaler = None
        if DTYPES[cfg.model.transformer_dtype] == torch.float16:
            self.scaler = LossScaler(self.device)
            log.info("float16 compute: dynamic loss scaling (ptrain/loss_scale.py; initial scale %g; bfloat16 needs "
                     "none where the GPU has it)", float(self.scaler.value))  # fmt: skip

    def build_checkpointer(self) -> None:
        run, c, m = self.run, self.cfg.checkpoint, self.cfg.model
        every = c.checkpointing_steps
        if c.checkpointing_epochs:
            every = c.checkpointing_epochs * run.steps_per_epoch
        trainable_only = m.training_type == "lora" and not c.checkpoint_full_model
        mod = self.model
        self.checkpointer = Checkpointer(
            run.out,
            sharded={"model": ModelState(mod.transformer, trainable_only),
                     "optim": OptimizerState(mod.transformer, mod.optimizer, trainable_only), "ema": mod.ema},
            per_rank={"rng": RNGState(), "lr_scheduler": mod.lr_scheduler,
                      **({"loss_scale": self.scaler} if self.scaler is not None else {})},
            train_state=self.state, layout=run.layout, every=every, limit=c.checkpointing_limit,
            meta={"model_name": m.model_name, "training_type": m.training_type, "num_samples": len(run.usable.records),
                  "data": run.usable.fingerprints()},
            trainable_only=trainable_only, async_save=c.async_checkpoint,
            export_fn=self.export if c.export_every_checkpoint else None,
        )  # fmt: skip
        self.checkpointer.clean_partial()

    def resume(self) -> None:
        """Load the resume checkpoint; a damaged one (auto / latest) is renamed and the previous one tried."""
        run, c = self.run, self.cfg.checkpoint
        fresh = [g["initial_lr"] for g in self.model.optimizer.param_groups]  # this run's --lr (and group scales)
        while run.resume is not None:
            try:
                self.checkpointer.load(run.resume, run.resharded)
                self.apply_configured_lr(fresh)
                break
            except CheckpointDamaged as e:
                if c.resume_from_checkpoint not in ("auto", "latest"):  # the one asked for: say so, touch nothing
                    raise ConfigError(f"--resume_from_checkpoint {c.resume_from_checkpoint}: {e}") from e
                self.checkpointer.mark_damaged(run.resume, e.reason)  # never picked again: no crash loop
                run.resume, run.resharded = find_resume(self.cfg, run.out, run.layout)
                if run.resume is None:
                    raise ConfigError(
                        f"{e}, and there is no older checkpoint; --resume_from_checkpoint none starts over"
                    ) from e
        if run.resume is not None and run.resharded:  # same samples from here on: restart where the old layout stopped
            self.state.base_position, self.state.base_step = self.state.samples_seen, self.state.step

    def apply_configured_lr(self, fresh: list[float]) -> None:
        """After a checkpoint load: this run's learning rates, not the checkpoint's. The optimizer's and the
        scheduler's states hold their base rates (--lr), so a resume with another --lr kept the old one without a
        word. The base rates are set to this run's and the current rate recomputed from the schedule (diffusers'
        schedulers are LambdaLR: base rate x the schedule's factor at the step); a changed rate at the resumed step
        (another --lr, or a schedule stretched by another --train_steps) is logged with both values."""
        sched, groups = self.model.lr_scheduler, self.model.optimizer.param_groups
        before = list(sched.get_last_lr())
        now = [base * fn(sched.last_epoch) for base, fn in zip(fresh, sched.lr_lambdas)]
        sched.base_lrs = list(fresh)
        for g, base, lr in zip(groups, fresh, now):
            g["initial_lr"] = base
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        sched._last_lr = list(now)
        if any(abs(a - b) > 1e-12 + 1e-9 * abs(a) for a, b in zip(before, now)):
            log.warning("learning rate at the resumed step %d: %.6g under this run's --lr / --lr_scheduler / "
                        "--train_steps, %.6g under the checkpoint's; training continues at %.6g", self.state.step,
                        now[0], before[0], now[0])  # fmt: skip

    def build_data(self) -> None:
        """The latent source (chosen once: precomputed or encoded every step) and this rank's loader."""
        cfg, run, spec, comps = self.cfg, self.run, self.spec, self.comps
        t, usable = cfg.train, run.usable
        dataset = self.dataset
        self.inputs = make_inputs(dataset is not None, spec, comps, self.device, self.max_seq)
        # The micro-batches training consumed (not the loader's sampler counter, which runs ahead by the workers'
        # prefetch) give the stream position.
        sampler_state = {
            "micro_batches_done": (self.state.step - self.state.base_step) * self.accum,
            "base_position": self.state.base_position,
        } if run.resume is not None else None  # fmt: skip
        self.loader, self.sampler = build_dataloader(
            usable, cfg.data, run.sampling, run.mesh.dp.get_local_rank(), run.dims.dp, t.batch_size, self.accum,
            t.seed, sampler_state, dataset,
        )  # fmt: skip
        log.info(
            "data: %d usable samples (%d skipped); global batch %d = batch_size %d x dp %d x grad accum %d; %s; "
            "%d loader workers", len(usable.records), len(usable.skipped), self.sampler.global_batch_size,
            t.batch_size, run.dims.dp, self.accum, usable.plan.describe(), cfg.data.num_workers(dataset is not None),
        )  # fmt: skip
        if usable.bucketed:
            for line in summary(usable, self.sampler.global_batch_size, run.rules.tokens)[1:]:
                log.info("  %s", line)
        if run.resume is not None:
            self.warn_data_changed(read_marker(run.resume), usable)

    def warn_data_changed(self, marker: dict, usable) -> None:
        """The sample order of a resumed run follows the data; if the data or its bucket shapes changed since the
        checkpoint, say that the batches from here are not an uninterrupted run's (training goes on)."""
        then, now = marker.get("num_samples"), len(usable.records)
        was, fp = marker.get("data") or {}, usable.fingerprints()
        if then is not None and then != now:
            what = f"the dataset changed ({then} usable samples then, {now} now)"
        elif was.get("samples") not in (None, fp["samples"]):
            what = f"the dataset changed (the same {now} usable samples in number, but other files or captions)"
        elif was.get("buckets") not in (None, fp["buckets"]):
            what = ("the samples' bucket shapes changed (another --height / --width / --num_frames, "
                    "--video_resolution_buckets or bucket option, or a ptrain version with other bucket rules)")
        else:
            return
        log.warning("%s since %s: the batches from here differ from an uninterrupted run's", what, self.run.resume,
                    extra=ALIKE)

    def precompute(self) -> PrecomputedDataset:
        """Encode every sample once (sharded over ranks; plan_run decided to); the encoders then leave the GPU."""
        cfg, run, spec = self.cfg, self.run, self.spec
        videos = VideoDataset(run.usable.records, cfg.data, run.sampling, cfg.train.seed, run.usable.buckets,
                              run.usable.infos)  # fmt: skip
        with encoders_on(self.comps, self.device, self.offloaded):
            folder = precompute(cfg, run.usable, spec, self.comps, videos, self.max_seq, self.device,
                                run.precompute.reuse)  # fmt: skip
        if self.device.type != "cpu":  # the encoders are needed again only for validation
            self.offloaded = True
            offload_encoders(self.comps)
            torch.cuda.empty_cache()
        return PrecomputedDataset(run.usable, folder, cfg.data.caption_dropout_p, cfg.train.seed)

    def build_step(self) -> None:
        """The micro-batch step, validation prompts, metrics and the loop's counters."""
        cfg, run = self.cfg, self.run
        objective = self.spec.make_objective(cfg.objective, self.comps)
        self.step = TrainStep(self.spec, self.comps, self.transformer, objective, self.inputs, run.dims.cp, self.accum,
                              cfg.compile.attention_backend)  # fmt: skip
        self.validation_items = load_validation_items(cfg.validation, cfg.data, cfg.model.train_mode)
        if self.validation_items and run.rank == 0:
            every = f"every {self.v_every} steps and " if self.v_every else ""
            log.info("validation: %d prompt(s) x %d video(s), sampled %sat the end (step %d)%s",
                     len(self.validation_items), cfg.validation.num_validation_videos, every, cfg.train.train_steps,
                     "" if self.v_every else "; --validation_steps N samples every N steps too")  # fmt: skip
        self.loss_group = run.mesh.dp_cp.get_group() if run.world > 1 else None
        to = cfg.log.report_to
        self.metrics = MetricsWriter(run.out, run.rank == 0, to in ("tensorboard", "all"),
                                     resume_step=self.state.step if run.resume else None,
                                     wandb_config=to_dict(cfg) if to in ("wandb", "all") else None)  # fmt: skip
        self.result = TrainResult(spec=self.spec, components=self.comps, transformer=self.transformer,
                                  optimizer=self.model.optimizer)  # fmt: skip
        self.peak_tflops = device_peak_tflops(self.device, cfg.log.peak_tflops)
        self.flops = self.count_flops() if self.peak_tflops else {}
        self.nan_in_a_row, self.nan_total, self.replaced_since_log = 0, 0, 0  # on the device during the loop
        self.peak_carry = (0.0, 0.0)  # CUDA: the steps' peak before a validation reset it (GiB allocated, reserved)
        self.window = (time.perf_counter(), self.state.step)  # (time, step) of the last logged step
        self.losses: list[tuple] = []  # (loss, grad norm) per step, read from the device at the end

    def count_flops(self) -> dict[tuple, tuple[int, int]]:
        """Model and hardware (with recompute) FLOPs per sample of every training shape, for mfu / hfu: counted
        once on fake tensors by ptrain/flops.py, so they hold under --compile too."""
        from ptrain.flops import step_flops

        m = self.cfg.model
        if m.transformer_id:
            log.warning("--transformer_id: no mfu / hfu (FLOPs are counted from the checkpoint's transformer config)")
            return {}
        out = {}
        for shape in sorted(set(self.run.usable.buckets)):
            key, model, hardware = step_flops(
                self.cfg, self.run.spec, m.pretrained_model_name_or_path, shape.frames, shape.height, shape.width
            )
            out[key] = (model, hardware)
            log.info("FLOPs per sample at %dx%dx%d: %.4g model, %.4g with recompute", shape.frames, shape.height,
                     shape.width, model, hardware)  # fmt: skip
        return out

    # --- the loop ----------------------------------------------------------------------------------
    def supersede_later_checkpoints(self) -> None:
        """Rank 0, when the run branches from an earlier checkpoint (--resume_from_checkpoint N / PATH) or starts
        over (none) in an output_dir with later checkpoints: those belong to the run it branches from; they are
        moved aside (checkpoint.supersede), so that a later `auto` start resumes this run, not that one."""
        spec = self.cfg.checkpoint.resume_from_checkpoint
        if spec in (None, "auto", "latest"):
            return
        step = read_marker(self.run.resume)["step"] if self.run.resume is not None else None
        moved = supersede(self.run.out, step)
        if moved is not None:
            log.warning("--resume_from_checkpoint %s: the checkpoints after %s belong to the run this one branches "
                        "from; moved to %s (an `auto` start would otherwise resume them); delete that folder when "
                        "you no longer need it", spec, f"step {step}" if step is not None else "the start",
                        moved)  # fmt: skip

    def close_loader(self) -> None:
        """Stop this rank's loader workers now. They ignore SIGTERM (ignore_stop_signals), so after an exception in
        the loop (its traceback keeps the loader alive until the interpreter exits, when torch no longer shuts
        workers down) Python's exit, which terminates and then joins child processes, waited for them forever: a
        failed rank hung instead of exiting."""
        it, self.data_iter = getattr(self, "data_iter", None), None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            self.close_loader()

    def _train(self) -> TrainResult:
        train_steps = self.cfg.train.train_steps
        self.data_iter = iter(self.loader)
        if self.run.dims.cp > 1 and isinstance(self.loader.dataset, VideoDataset):  # each cp rank decodes its samples
            self.cp_agree = CPSampleAgreement(self.loader.dataset, self.run.mesh.world["cp"].get_group(),
                                              self.run.world)  # fmt: skip
        # the step's peak from here on, not the start-up's
        self.log_phase_peak("the start-up (transformer placed and sharded unit by unit, checkpoint resumed)")
        self.window = (time.perf_counter(), self.state.step)  # the step time's window starts here
        bar = tqdm(total=train_steps, initial=self.state.step, disable=self.run.rank != 0, desc="train",
                   dynamic_ncols=True)  # fmt: skip
        gc_control = GCControl(self.cfg.train.gc_every_n_steps)
        lg = self.cfg.log
        profiler = StepProfiler(lg.profile_from_step, lg.profile_num_steps, self.run.out, self.run.rank, self.device)
        stop = StopRequest(self.run.world)
        try:
            with phase("during training (a second Ctrl-C stops at once)",
                       "the steps since the last checkpoint are lost; rerun the same command to resume from it"):
                self.redo_missed_validation()
                while self.state.step < train_steps:
                    step = self.state.step + 1
                    gc_control.maybe_collect(step)
                    profiler.step_begin(step)
                    stats = self.train_step(step)
                    self.log_step(step, stats, bar)
                    profiler.step_end(step)
                    self.check_nan_guard(step)
                    # the checkpoint before validation: a validation that fails (e.g. out of memory) loses no step
                    self.maybe_checkpoint(step, last_step=step == train_steps)
                    self.maybe_validate(step)
                    signum = stop.agreed()
                    if signum:
                        self.stop_at(step, signum)
                self.checkpointer.wait()
        finally:
            stop.close()
            profiler.close(self.state.step)
            gc_control.close()
            bar.close()
            self.metrics.close()
        self.result.losses = [float(loss) for loss, _ in self.losses]
        self.result.grad_norms = [float(norm) for _, norm in self.losses]
        if self.checkpointer.every:
            rerun = (f"training is complete and checkpointed at step {self.state.step}; rerun the same command to "
                     "export again (nothing is trained again)")  # fmt: skip
        else:
            rerun = "no checkpoint was kept (--checkpointing_steps 0): a rerun trains again"
        try:
            with phase("while exporting the trained weights", rerun):
                self.export_final()
        finally:
            self.out_lock.release()
        return self.result

    def logs_at(self, step: int) -> bool:
        """Whether `step` is a logging step (every --logging_steps, and the last): the only steps whose values the
        host reads from the device."""
        return step % self.cfg.log.logging_steps == 0 or step == self.cfg.train.train_steps

    def train_step(self, step: int) -> StepStats:
        """One optimizer step: every micro-batch of the accumulation, then the (guarded) optimizer update. With
        --log_step_breakdown a logging step waits for the device around its phases to time them; the other steps
        never wait."""
        stats = StepStats()
        breakdown = self.cfg.log.log_step_breakdown and self.logs_at(step)
        step_loss = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            td = time.perf_counter()
            batch = next(self.data_iter)
            if self.cp_agree is not None:
                batch = self.cp_agree.agree(batch)
            stats.data_time += time.perf_counter() - td
            stats.replaced = stats.replaced + batch["replaced"].sum()  # a tensor: no int() per step
            set_gradient_sync(self.transformer, self.run.dims, last=micro == self.accum - 1)
            loss, prepared = self.forward_backward(batch, stats.phase, breakdown)
            step_loss += loss
            stats.tokens += prepared.tokens
            model, hardware = self.flops.get(prepared.key, (0, 0))  # per sample; a cp rank does 1/cp of it
            stats.flops = (stats.flops[0] + model * prepared.batch / self.run.dims.cp,
                           stats.flops[1] + hardware * prepared.batch / self.run.dims.cp)  # fmt: skip
        self.optimizer_step(step, step_loss, stats, breakdown)
        return stats

    def forward_backward(self, batch: dict, phase: dict, breakdown: bool = False) -> tuple[torch.Tensor, Prepared]:
        """One micro-batch: inputs and conditioning (offloaded encoders visit the device once), forward, backward.
        Returns the loss (divided by the accumulation steps) and the prepared micro-batch (tokens, FLOPs key).
        `breakdown`: wait for the device around the forward and backward, to time them (`phase`)."""
        t = self.cfg.train
        gens = sample_generators(t.seed, batch["position"])
        strata = None
        if self.cfg.objective.uniform_sampling:  # sample j of the global batch draws from slice j of G
            g = self.sampler.global_batch_size
            strata = ((torch.as_tensor(batch["position"]) - self.state.base_position) % g, g)
        with encoders_on(self.comps, self.device, self.offloaded and self.inputs.needs_encoders):
            prepared = self.step.prepare(batch, gens, strata)
        self.sync(breakdown)
        tf = time.perf_counter()
        mark_step_begin(self.cudagraphs)
        loss = self.step.loss(prepared)
        self.sync(breakdown)
        tb = time.perf_counter()
        self.step.backward(loss if self.scaler is None else self.scaler.scale(loss))
        self.sync(breakdown)
        phase["forward_s"] += tb - tf
        phase["backward_s"] += time.perf_counter() - tb
        return loss.detach(), prepared

    def optimizer_step(self, step: int, step_loss: torch.Tensor, stats: StepStats, breakdown: bool = False) -> None:
        """Clip, agree on the step's loss across ranks, and step unless the loss or norm is not finite. The
        decision stays on the device with the fused optimizers (their `found_inf` skips the update and the step
        count); others (CAME, 8-bit AdamW) decide on the host."""
        mod, dims = self.model, self.run.dims
        if mod.fused_backward is not None:  # the backward stepped (and clipped) unit by unit: ptrain/fused_backward.py
            stats.grad_norm = mod.fused_backward.finish(self.device)
        else:
            if self.scaler is not None:
                self.scaler.unscale_(mod.params)
            stats.grad_norm = clip_gradients(mod.params, self.cfg.optim.max_grad_norm)
        stats.loss, stats.replaced = _global_step_stats(step_loss, stats.replaced, self.loss_group, dims.cp)
        stats.finite = torch.isfinite(stats.loss) & torch.isfinite(stats.grad_norm)
        # a non-finite step: skipped; it counts against --max_nan_steps unless it is a float16 overflow of the
        # scaled gradients (finite loss), which only lowers the loss scale
        stats.diverged = ~stats.finite
        if self.scaler is not None:
            stats.loss_scale = self.scaler.value.clone()
            self.scaler.update(stats.finite)
            stats.diverged = ~torch.isfinite(stats.loss)
        to = time.perf_counter()
        if mod.fused_backward is not None:  # stepped in the backward
            pass
        elif skips_on_device(mod.optimizer):
            mod.optimizer.found_inf = found_inf_for(mod.params, stats.finite)
            with implicit_replication():  # found_inf is a plain tensor beside DTensor parameters
                mod.optimizer.step()
        elif bool(stats.finite):
            mod.optimizer.step()
        if mod.ema is not None:
            mod.ema.update(step, stats.finite)
        self.nan_in_a_row = torch.where(stats.diverged, self.nan_in_a_row + 1, 0)
        self.nan_total = self.nan_total + stats.diverged.int()
        mod.lr_scheduler.step()
        mod.optimizer.zero_grad(set_to_none=True)
        if breakdown:
            self.sync(True)
            stats.phase["optimizer_s"] = time.perf_counter() - to

    def sync(self, enabled: bool) -> None:
        """Wait for the device (only for --log_step_breakdown's phase times, on logging steps)."""
        if enabled and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def log_step(self, step: int, stats: StepStats, bar) -> None:
        """Advance the train state and the progress bar; every --logging_steps (and the last step) read the step's
        values from the device, warn about skipped steps and replaced samples, and write the metrics."""
        state, run = self.state, self.run
        global_tokens = stats.tokens * run.dims.dp
        state.step = step
        state.samples_seen += self.sampler.global_batch_size
        state.tokens_seen += global_tokens
        self.losses.append((stats.loss, stats.grad_norm))
        self.replaced_since_log = self.replaced_since_log + stats.replaced
        bar.update(1)
        if not self.logs_at(step):
            return
        loss, grad_norm, finite = float(stats.loss), float(stats.grad_norm), bool(stats.finite)  # host sync
        # The host runs ahead of the device between logging steps: a step's time is the window's average.
        now, (then, before) = time.perf_counter(), self.window
        elapsed, self.window = (now - then) / (step - before), (now, step)
        self.sync_counters()
        scale = None if stats.loss_scale is None else float(stats.loss_scale)
        if not finite and scale is not None and not bool(stats.diverged):
            log.info("step %d: float16 gradients overflowed at loss scale %g: optimizer step skipped, the scale "
                     "halved (ptrain/loss_scale.py)", step, scale)  # fmt: skip
        elif not finite:
            log.warning(
                "step %d: non-finite loss %s / grad norm %s: optimizer step skipped (%d in a row, %d in total)",
                step, loss, grad_norm, self.nan_in_a_row, state.nan_steps_total,
            )  # fmt: skip
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{global_tokens / elapsed:,.0f}")
        alloc, reserved = (max(now, before) for now, before in zip(peak_memory_gb(self.device), self.peak_carry))
        self.peak_carry = (0.0, 0.0)
        values = {
            "loss": loss, "lr": self.model.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            "step_time_s": elapsed, "data_time_s": stats.data_time, "tokens_per_s": global_tokens / elapsed,
            "samples_seen": state.samples_seen, "data_skipped": len(run.usable.skipped),
            "data_replaced": state.data_replaced, "skipped_step": not finite, "peak_memory_gb": alloc,
            "peak_reserved_gb": reserved, **(stats.phase if self.cfg.log.log_step_breakdown else {}),
            **({"loss_scale": scale} if scale is not None else {}),
        }  # fmt: skip
        if stats.flops[0] and self.peak_tflops:  # model FLOPs (mfu) and with AC recompute (hfu), per rank
            values["tflops_per_step"] = stats.flops[0] / 1e12
            values["mfu"] = stats.flops[0] / elapsed / (self.peak_tflops * 1e12)
            values["hfu"] = stats.flops[1] / elapsed / (self.peak_tflops * 1e12)
        self.metrics.log(step, values)

    def sync_counters(self) -> None:
        """Bring the device-side counters to the host (logging steps, checkpoints, the end): replaced samples
        (warned about), non-finite steps in a row and in total."""
        replaced = round(float(self.replaced_since_log))
        if replaced:
            log.warning("step %d: %d sample(s) failed to decode and were replaced", self.state.step, replaced,
                        extra=ALIKE)  # the global batch's count: the same on every rank
        self.state.data_replaced += replaced
        self.replaced_since_log = 0
        self.nan_in_a_row = int(self.nan_in_a_row)
        self.state.nan_steps_total += int(self.nan_total)
        self.nan_total = 0

    def check_nan_guard(self, step: int) -> None:
        """--max_nan_steps, checked where the counters reach the host (logging steps and the last step)."""
        limit = self.cfg.checkpoint.max_nan_steps
        if not self.logs_at(step):
            return
        if limit and self.nan_in_a_row >= limit:
            self.checkpointer.wait()
            good = complete_checkpoints(self.run.out)
            raise FloatingPointError(
                f"{self.nan_in_a_row} non-finite steps in a row (--max_nan_steps {limit}); stopping. "
                f"Last complete checkpoint: {good[-1][1] if good else 'none'}. Lower --lr or check the data."
            )

    def validation_due(self, step: int) -> bool:
        return bool(self.validation_items) and (bool(self.v_every) and step % self.v_every == 0
                                                or step == self.cfg.train.train_steps)  # fmt: skip

    def redo_missed_validation(self) -> None:
        """Collective, at a resume: the checkpoint is saved before its step's validation, so a run that stopped in
        that validation (out of memory, a write error, a kill) resumes past it. Its folder has no prompts.json (the
        last file a validation writes): sample it now, before the next step."""
        step = self.state.step
        if not step or not self.validation_due(step):
            return
        index = self.run.out / "validation" / f"step-{step}" / VALIDATION_INDEX
        if not all_max(int(self.run.rank == 0 and not index.exists())):  # rank 0 decides: every rank validates
            return
        log.info("validation at step %d did not finish before the run stopped (no %s): sampling it now", step, index)
        self.maybe_validate(step)

    def maybe_validate(self, step: int) -> None:
        if not self.validation_due(step):
            return
        ema = self.model.ema
        with_ema = self.cfg.ema.validate_with_ema
        if with_ema:
            log.info("validation at step %d samples with the EMA weights (--validate_with_ema)", step)
        if self.device.type == "cuda":  # validation's peak is logged on its own; the steps' so far are kept
            self.peak_carry = tuple(map(max, peak_memory_gb(self.device), self.peak_carry))
            torch.cuda.reset_peak_memory_stats(self.device)
        with (
            ema.swapped_in() if with_ema else contextlib.nullcontext(),
            encoders_on(self.comps, self.device, self.offloaded, stream_text=True),
            # a two-expert checkpoint's frozen other expert: in CPU memory, a layer at a time on the GPU
            streamed(self.comps.other_expert, self.device) if self.comps.other_expert is not None and
            self.device.type != "cpu" else contextlib.nullcontext(),
            tiled_decode(self.comps.vae, self.cfg.model.enable_tiling != "off"),
            step_per_call(self.transformer, self.cudagraphs),
        ):
            mesh = self.run.mesh
            try:
                run_validation(self.spec, self.transformer, self.validation_items, self.cfg.validation, step,
                               self.run.out, self.cfg.train.seed, self.metrics, self.run.dims.dp,
                               mesh.dp.get_local_rank(), mesh.world["cp"].get_local_rank() == 0)  # fmt: skip
            except (OSError, PeerFailed) as e:
                raise self.write_failed(f"writing the validation videos of step {step}", e) from e
        self.log_phase_peak(f"validation at step {step} (VAE decode tiled: {self.cfg.model.enable_tiling != 'off'})")

    def write_failed(self, what: str, e: BaseException) -> OutputWriteError:
        """An output other than a checkpoint could not be written: the cause, the free space, and what is kept."""
        self.checkpointer.wait()  # an async save in flight is committed first: it is what a rerun resumes from
        cause = f"{e.strerror} ({e.filename})" if isinstance(e, OSError) and e.strerror else f"{e}"
        try:
            space = f"; {shutil.disk_usage(self.run.out).free / 2**30:.2f} GiB free on that filesystem"
        except OSError:
            space = ""
        good = complete_checkpoints(self.run.out)
        if good:
            kept = (f"The latest checkpoint, {good[-1][1].name}, is intact: fix the cause (e.g. free disk space), "
                    "then run the same command; it resumes from there (a finished run only exports)")  # fmt: skip
        else:
            kept = ("No checkpoint holds this run's weights (--checkpointing_steps 0, or none due yet): a rerun starts "
                    "over")  # fmt: skip
        return OutputWriteError(f"{what} failed at step {self.state.step}: {cause}{space}. {kept}.")

    def stop_at(self, step: int, signum: int) -> None:
        """Every rank, after `step`, on a signal any rank received: save a checkpoint there (unless one was just
        saved or checkpointing is off), wait for it, and raise RunStopped."""
        import signal

        name = signal.Signals(signum).name
        c = self.checkpointer
        if c.every and c.saved_step != step:
            self.sync_counters()
            c.save(step, last_step=True)
        c.wait()
        if c.every:
            how = f"checkpoint step-{step} saved in {c.root}; rerun the same command to resume from it"
        else:
            how = "no checkpoint (--checkpointing_steps 0): a rerun starts over"
        raise RunStopped(f"stopped by {name} after step {step} of {self.cfg.train.train_steps}: {how}", 128 + signum)

    def maybe_checkpoint(self, step: int, last_step: bool) -> None:
        self.checkpointer.poll()  # commits a finished async save
        if self.checkpointer.due(step, last_step):
            self.sync_counters()  # the marker records the train state's counters
            self.checkpointer.save(step, last_step=last_step)

    # --- export ------------------------------------------------------------------------------------
    def export(self, target: Path) -> Path | None:
        """The trained weights in diffusers format into `target` (LoRA file, or the full transformer)."""
        if self.cfg.model.training_type == "lora":
            path = export_lora(self.transformer, self.spec.pipeline_cls, target, self.spec.expanded_input)
            if self.cfg.checkpoint.export_comfyui:  # rank 0: ComfyUI's key names beside it
                err = None
                try:
                    if path is not None:
                        export_comfyui_lora(self.spec, path, self.transformer.config)
                except WRITE_ERRORS as e:
                    err = e
                raise_if_any_failed(err, f"writing the ComfyUI file in {target}")
            return path
        return export_full(self.transformer, target)

    def export_final(self) -> None:
        """Staged: the export (and --export_ema's) appears whole, with a marker, or not at all."""
        out, ema = self.run.out, self.model.ema
        try:
            staging = begin_export(out)
            exported = self.export(staging)
            if ema is not None and self.cfg.ema.export_ema:
                with ema.swapped_in():
                    self.export(staging / "ema")
            publish_export(staging, out, self.state.step)
        except (*WRITE_ERRORS, PeerFailed) as e:
            raise self.write_failed(f"writing the export to {out}", e) from e
        self.result.exported = out / exported.relative_to(staging) if exported is not None else None
        if self.run.rank == 0:
            final = f"final loss {self.result.losses[-1]:.5f}, " if self.result.losses else ""
            log.info("done: %d steps, %sweights in %s", self.state.step, final, self.result.exported)
            if self.comps.expert_slot == "transformer_2":
                log.info("these are the low-noise expert's (transformer_2): %s", "load them with "
                         "pipe.load_lora_weights(dir, load_into_transformer_2=True)" if self.cfg.model.training_type ==
                         "lora" else "pass the exported transformer/ as the pipeline's transformer_2=")  # fmt: skip
