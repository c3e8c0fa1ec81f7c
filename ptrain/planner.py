"""GPU memory planner that needs no GPU.

One training step of the *real* ptrain code path — the Config parsed from ptrain's own flags, the spec bound
to the --train_mode (input widening), the model set-up the trainer runs (ptrain/parallelize.py: LoRA / full
fine-tune, FP8 storage, context parallelism, activation checkpointing, FSDP2 / HSDP / replicate, optimizer,
EMA) and the trainer's micro-batch (ptrain/step.py: objective, the mode's conditioning, loss) — runs on fake tensors
(`FakeTensorMode`) in one process that plays rank 0 of a fake process group of the requested world size.
`torch.distributed._tools`' memory trackers (FSDPMemTracker, or MemTracker without FSDP) record the per-rank
peak by category. Weights are never materialised: the transformer is built from its `config.json` on the
meta device, so a 13B model costs nothing but shape propagation.

Whole models with many blocks are slow to simulate on a CPU, so `plan()` simulates 3 and 4 blocks per block
list and extrapolates linearly (every block adds the same parameters, gradients, optimizer state and saved
activations); tests/test_planner.py checks the extrapolation against a full simulation.

What it does not model: the CUDA caching allocator (reserved > allocated; fragmentation), NCCL's own buffers,
the CUDA context (~0.5-1 GB), and kernel workspaces (cuBLAS, flash attention). Fake tensors live on the CPU
device, so attention runs through the CPU SDPA kernels, whose saved tensors (output + log-sum-exp) match the
fused CUDA kernels'. Ring attention (`--cp_mode ring`) likewise: on the CPU device each ring block runs the CPU
flash op, on a GPU the fused kernel that ptrain.parallel.context.ring_kernel picks (FlashAttention, or the
memory-efficient kernel at the step whose keys carry a text padding mask); both return one block's output +
log-sum-exp and hold no score matrix, so the simulated memory is the GPU's (tests/test_ring_attention.py runs the
ring on fake CUDA tensors with the CUDA kernels and on fake CPU tensors: the same peak). Not simulated: ring
blocks that fall back to the math kernel on a GPU (float64, head dims the fused kernels refuse), which holds each
block's float32 scores (heads x local tokens x block tokens) several times over; ptrain warns when it runs.

CLI: python -m ptrain.planner --model_dir DIR --world_size 8 [--budget_gb 80] -- [ptrain flags]   (prints JSON)
From a run: python -m ptrain --dry_run --plan_gpu_memory_gb 80 --plan_world_size 8 [flags]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ptrain.objectives import sample_generators

GIB = 2**30


def _fake_world(world: int) -> None:
    """(Re)initialise the default process group as a fake one of `world` ranks (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() == "fake" and dist.get_world_size() == world:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def _meta_model(cls, model_dir: Path, subfolder: str, overrides: dict | None = None, dtype=None):
    config = dict(cls.load_config(model_dir, subfolder=subfolder))
    config.update(overrides or {})
    with torch.device("meta"):
        model = cls.from_config(config)
    if dtype is not None:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype != torch.float32 else set()
        model.to(dtype)
        for name, module in model.named_modules():  # as from_pretrained(torch_dtype=...) does
            if any(k in name.split(".") for k in keep):
                module.to(torch.float32)
    return model


def encoder_bytes(spec, model_dir: Path, dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    """Resident weight bytes of the frozen VAE and text encoders (from their configs; 0 when absent)."""
    out = {}
    for name in ("vae", "text_encoder", "text_encoder_2"):
        cls = spec.component_classes.get(name)
        if cls is None or not (model_dir / name / "config.json").is_file():
            continue
        if name == "vae":
            model = _meta_model(cls, model_dir, name)
        else:
            config = cls.config_class.from_pretrained(model_dir / name)
            with torch.device("meta"):
                model = cls(config)
        dtype = dtypes.get(name, torch.bfloat16)
        out[name] = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    return out


def simulate(
    flags: list[str],
    world: int,
    model_dir: str | Path,
    num_blocks: tuple[int, ...] | None = None,
    fake: bool = True,
) -> dict:
    """Peak memory of rank 0 in one training step of `ptrain FLAGS` on `world` ranks (fake), in bytes by category.

    `num_blocks` overrides the transformer's block counts (one per block list of the model). `fake=False`
    runs the same code on real (uninitialised) tensors in an already initialised process group: the check that
    the simulation counts what a real run allocates.
    """
    from ptrain.config import parse_config

    cfg = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)])
    return simulate_config(cfg, world, model_dir, num_blocks, fake)


def simulate_config(cfg, world: int, model_dir: str | Path, num_blocks: tuple[int, ...] | None = None,
                    fake: bool = True) -> dict:  # fmt: skip
    """simulate() of a parsed Config (left unchanged)."""
    from ptrain.models.spec import get_spec

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = copy.deepcopy(cfg)
    if cfg.activation_checkpoint.ac_mode == "auto":
        from ptrain.config import ConfigError

        raise ConfigError("--ac_mode auto is the planner's choice among AC modes: plan with --budget_gb (or "
                          "--plan_gpu_memory_gb in a dry run), or name an --ac_mode")  # fmt: skip
    cfg.compile.compile = False  # compile changes no memory the tracker sees; it would only cost time here
    spec = get_spec(cfg.model.model_name)
    if fake:
        _fake_world(world)
        try:
            return _simulate(cfg, spec, world, model_dir, num_blocks, fake, t0)
        finally:  # leave no fake default group behind for code that initialises a real one later
            dist.destroy_process_group()
    if dist.get_world_size() != world:
        raise ValueError(f"fake=False needs the process group of {world} ranks to be initialised")
    return _simulate(cfg, spec, world, model_dir, num_blocks, fake, t0)


class _NoHook:
    """A stand-in hook handle for parameters that need none (see _measure_step)."""

    def remove(self) -> None:
        pass


def meta_components(cfg, spec, model_dir: Path, num_blocks):
    """The transformer (with `num_blocks` per block list if given), VAE and scheduler on the meta device."""
    from ptrain.models.spec import Components
    from ptrain.parallelize import DTYPES

    m = cfg.model
    overrides = dict(zip(spec.block_count_keys, num_blocks)) if num_blocks else {}
    transformer = _meta_model(
        spec.transformer_cls, model_dir, "transformer", overrides,
        DTYPES[m.transformer_dtype] if m.training_type == "lora" or cfg.optim.full_bf16 else torch.float32,
    )  # fmt: skip
    vae = _meta_model(spec.component_classes["vae"], model_dir, "vae", dtype=DTYPES[m.vae_dtype])
    sched_cls = spec.component_classes["scheduler"]
    scheduler = (
        sched_cls.from_config(sched_cls.load_config(model_dir, subfolder="scheduler"))
        if (model_dir / "scheduler").is_dir()
        else sched_cls()
    )
    extra = {k: None for k in spec.component_classes if k not in ("transformer", "vae", "scheduler",
                                                                   "text_encoder", "tokenizer")}  # fmt: skip
    return Components(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler,
                      extra=extra)  # fmt: skip


def _planned_attention(cfg) -> str:
    """The SDPA kernel simulated: the fused kernels a GPU picks save what the CPU flash kernel saves (output and
    log-sum-exp); only the math kernel differs (it saves the attention weights), so only it is simulated as chosen."""
    return "math" if cfg.compile.attention_backend == "math" else "auto"


def _measure_step(cfg, spec, comps, model, dims, device) -> tuple[dict, object]:
    """Peak bytes by category of the trainer's micro-batches (every one of --gradient_accumulation_steps:
    objective, the mode's conditioning, loss, backward) and of its optimizer step, each tracked on its own in the
    steady state; also returns the prepared batch."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    from ptrain.parallelize import DTYPES
    from ptrain.step import SimulatedInputs, TrainStep, clip_gradients, set_gradient_sync

    t, d, transformer, optimizer, b = cfg.train, cfg.data, model.transformer, model.optimizer, cfg.train.batch_size
    inputs = SimulatedInputs(spec, comps, device, (b, 3, d.num_frames, d.height, d.width),
                             d.max_sequence_length or spec.max_sequence_length(comps),
                             DTYPES[cfg.model.text_encoder_dtype])  # fmt: skip
    accum = t.gradient_accumulation_steps
    step = TrainStep(spec, comps, transformer, spec.make_objective(cfg.objective, comps), inputs, dims.cp, accum,
                     _planned_attention(cfg))  # fmt: skip
    batch = {"position": list(range(b))}

    def new_tracker():
        if isinstance(transformer, FSDPModule):
            return FSDPMemTracker(transformer, optimizer)
        tracker = MemTracker()
        # One process trains the plain module; MemTracker hooks every parameter's gradient and a frozen one (LoRA's
        # base) cannot take a hook: mark those as hooked already (they never get a gradient).
        for p in transformer.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
        tracker.track_external(transformer, optimizer)
        return tracker

    def micro_batch(micro: int):  # with the trainer's gradient sync for accumulation
        set_gradient_sync(transformer, dims, last=micro == accum - 1)
        prepared = step.prepare(batch, sample_generators(t.seed, batch["position"]))
        step.backward(step.loss(prepared))
        return prepared

    def forward_backward():
        for micro in range(accum):
            prepared = micro_batch(micro)
        return prepared

    def optimizer_step(step_number):
        clip_gradients(model.params, cfg.optim.max_grad_norm)
        optimizer.step()
        model.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if model.ema is not None:
            model.ema.update(step_number)

    # Step 1 creates the optimizer state lazily; step 2 is the steady state that is measured, its two
    # phases separately (each phase's peak grows linearly with the block count; their max need not).
    prepared = forward_backward()
    optimizer_step(1)
    phases = {}
    # The trackers follow one forward each: the micro-batches before the last run untracked, and the last one (whose
    # peak holds the gradients the earlier ones accumulated) is measured.
    last = lambda: micro_batch(accum - 1)  # noqa: E731
    for phase, fn in (("forward_backward", last), ("optimizer", lambda: optimizer_step(2))):
        if phase == "forward_backward":
            for micro in range(accum - 1):
                micro_batch(micro)
        tracker = new_tracker()
        with tracker:
            fn()
        per_dev = next(iter(tracker.get_tracker_snapshot("peak").values()))
        phases[phase] = {
            "peak_bytes": int(per_dev["Total"]),
            "categories": {str(getattr(k, "value", k)): int(v) for k, v in per_dev.items() if str(k) != "Total"},
        }
    ema = model.ema
    if ema is not None:
        # The EMA shadows (local shards, as the trainable parameters) are resident for the whole run; the trackers
        # only see tensors of modules and optimizers, so they are added to every phase here.
        ema_bytes = sum((s.to_local() if hasattr(s, "to_local") else s).untyped_storage().nbytes() for s in ema.shadow)
        for ph in phases.values():
            ph["peak_bytes"] += ema_bytes
            ph["categories"]["EMA"] = ema_bytes
    return phases, prepared


def _simulate(cfg, spec, world: int, model_dir: Path, num_blocks, fake: bool, t0: float) -> dict:
    """The trainer's set-up (ptrain.parallelize) and step (ptrain.step) on fake tensors, measured."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ptrain.parallel import ParallelDims
    from ptrain.parallelize import build_trainable, make_trainable_model

    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    dims = ParallelDims.build(p.dp_degree, p.dp_shards, p.cp_degree, world)
    mesh = dims.build_mesh()  # outside FakeTensorMode (inside it fails)
    device = torch.device("cpu")
    comps = meta_components(cfg, spec, model_dir, num_blocks)
    transformer = comps.transformer
    blocks_used = tuple(int(transformer.config[k]) for k in spec.block_count_keys)
    # The trainer's set-up on the meta model (the mode's input widening, LoRA, FP8 storage: fake tensors cannot
    # be swapped in place by Module.to, which peft uses), materialised as fake tensors afterwards.
    spec = spec.bind(comps, m.train_mode, m.mask_probs(), m.training_type)
    spec.check_shape(d.num_frames, d.height, d.width, comps)
    n_total = sum(q.numel() for q in transformer.parameters())
    make_trainable_model(transformer, cfg, spec)
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        transformer.to_empty(device=device)
        comps.vae.to_empty(device=device)
        model = build_trainable(transformer, cfg, spec, mesh, dims, device, t.train_steps, planning=True)
        phases, prepared = _measure_step(cfg, spec, comps, model, dims, device)
        latent_shape = tuple(prepared.sample.target.shape)
    top = max(phases.values(), key=lambda ph: ph["peak_bytes"])
    return {
        "model": m.model_name,
        "training_type": m.training_type,
        "world_size": world,
        "layout": dims.describe(),
        "cp": dims.cp,
        "frames_hw": [d.num_frames, d.height, d.width],
        "batch_size": t.batch_size,
        "tokens": prepared.tokens,
        "tokens_per_rank": math.ceil(prepared.tokens / dims.cp),
        "latent_shape": list(latent_shape),
        "blocks": list(blocks_used),
        "params_total": n_total,
        "params_trainable": sum(q.numel() for q in model.params),
        "swap_host_bytes": _swap_host_bytes(transformer, phases),
        "peak_bytes": top["peak_bytes"],
        "categories": top["categories"],
        "phases": phases,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _swap_host_bytes(transformer, phases: dict) -> int:
    """--blocks_to_swap: the swapped blocks' frozen weights live in host memory; fake tensors all live on one
    device, so the tracker counted them as parameters: they leave every phase's peak (the in-flight device copies
    the swap makes while a block runs stay counted). Returns their bytes."""
    swap = getattr(transformer, "_ptrain_block_swap", None)
    host = swap.host_bytes() if swap is not None else 0
    for ph in phases.values():
        ph["peak_bytes"] -= host
        ph["categories"]["Parameter"] = ph["categories"].get("Parameter", 0) - host
    return host


def _swap_everything(cfg, blocks: tuple[int, ...]):
    """A copy of cfg that swaps every simulated block (for extrapolating --blocks_to_swap; see plan_config)."""
    out = copy.deepcopy(cfg)
    out.parallel.blocks_to_swap = sum(blocks)
    return out


def _resident_unswapped(res: dict, base: dict, bumps: list[dict], targets: tuple[int, ...], count: int) -> None:
    """Extrapolated with every block swapped: put back the frozen weights of the blocks --blocks_to_swap leaves on
    the device (the first `count` blocks of the block lists, in order, are swapped)."""
    add, left = 0, count
    for i, n in enumerate(targets):
        swapped = min(n, max(0, left))
        left -= swapped
        add += (n - swapped) * (bumps[i]["swap_host_bytes"] - base["swap_host_bytes"])
    for ph in res["phases"].values():
        ph["peak_bytes"] += add
        ph["categories"]["Parameter"] = ph["categories"].get("Parameter", 0) + add
    res["swap_host_bytes"] -= add
    top = max(res["phases"].values(), key=lambda ph: ph["peak_bytes"])
    res.update(peak_bytes=top["peak_bytes"], categories=top["categories"])


def _extrapolate(base: dict, bumps: list[dict], targets: tuple[int, ...]) -> dict:
    """Each phase linear in each block count: value(n) = base + sum_i (n_i - base_i) * (bump_i - base);
    the step's peak is the larger phase peak."""
    out = dict(base)

    def lin(get):
        v = get(base)
        for i, bump in enumerate(bumps):
            v += (targets[i] - base["blocks"][i]) * (get(bump) - get(base))
        return int(v)

    phases = {}
    for name, ph in base["phases"].items():
        phases[name] = {
            "peak_bytes": lin(lambda r, n=name: r["phases"][n]["peak_bytes"]),
            "categories": {k: lin(lambda r, n=name, k=k: r["phases"][n]["categories"].get(k, 0))
                           for k in ph["categories"]},
        }  # fmt: skip
    top = max(phases.values(), key=lambda ph: ph["peak_bytes"])
    out.update(phases=phases, peak_bytes=top["peak_bytes"], categories=top["categories"])
    out["params_total"] = lin(lambda r: r["params_total"])
    out["params_trainable"] = lin(lambda r: r["params_trainable"])
    out["blocks"] = list(targets)
    out["simulated_blocks"] = [base["blocks"], *[b["blocks"] for b in bumps]]
    out["seconds"] = round(base["seconds"] + sum(b["seconds"] for b in bumps), 1)
    return out


def plan(flags: list[str], world: int, model_dir: str | Path, full: bool = False) -> dict:
    """simulate() for the whole model: directly when `full` or the model is small, else 3 and 4 blocks per block
    list, extrapolated to the real block counts."""
    from ptrain.config import parse_config

    return plan_config(parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)]), world, model_dir,
                       full)  # fmt: skip


def plan_config(cfg, world: int, model_dir: str | Path, full: bool = False) -> dict:
    """plan() of a parsed Config."""
    from ptrain.models.spec import get_spec

    model_dir = Path(model_dir)
    spec = get_spec(cfg.model.model_name)
    config = spec.transformer_cls.load_config(model_dir, subfolder="transformer")
    targets = tuple(int(config[k]) for k in spec.block_count_keys)
    if full or all(n <= 4 for n in targets):
        res = simulate_config(cfg, world, model_dir)
        res["simulated_blocks"] = [res["blocks"]]
        return res
    base_blocks = tuple(3 for _ in targets)  # from 3 blocks on, FSDP's prefetch pattern no longer changes
    swap = cfg.parallel.blocks_to_swap
    sim = (lambda blocks: _swap_everything(cfg, blocks)) if swap else (lambda blocks: cfg)  # noqa: E731
    base = simulate_config(sim(base_blocks), world, model_dir, base_blocks)
    bumps = []
    for i in range(len(targets)):
        blocks = tuple(4 if j == i else 3 for j in range(len(targets)))
        bumps.append(simulate_config(sim(blocks), world, model_dir, blocks))
    res = _extrapolate(base, bumps, targets)
    if swap:
        res["swap_host_bytes"] = _extrapolate_swap(base, bumps, targets)
        _resident_unswapped(res, base, bumps, targets, swap)
    return res


def _extrapolate_swap(base: dict, bumps: list[dict], targets: tuple[int, ...]) -> int:
    """Host bytes with every block swapped, extrapolated like the rest."""
    v = base["swap_host_bytes"]
    for i, bump in enumerate(bumps):
        v += (targets[i] - base["blocks"][i]) * (bump["swap_host_bytes"] - base["swap_host_bytes"])
    return v


#: --ac_mode auto's ladder, least recompute first: (name, flags). "ops" recomputes only cheap ops (norms,
#: activations, elementwise) in every block; every n-th block recomputes 1/n of the forward; full all of it.
AC_LADDER = (
    ("no AC", ["--no_gradient_checkpointing", "--ac_mode", "full"]),
    ("op-level AC", ["--gradient_checkpointing", "--ac_mode", "ops"]),
    ("AC every 4th block", ["--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "4"]),
    ("AC every 2nd block", ["--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "2"]),
    ("full AC", ["--gradient_checkpointing", "--ac_mode", "full"]),
)
#: What "reserved" adds to the planned (allocated) peak when deciding whether a plan fits a GPU: the caching
#: allocator's slack and the CUDA context. On the H200 (../shared/reference/platform_notes.md) reserved was 1.06x
#: allocated for CogVideoX-5B LoRA (20.0 / 18.8 GiB) and 1.24x for LTX-Video (7.82 / 6.32); the context ~0.5-1 GB.
FIT_SLACK, FIT_CONTEXT_BYTES = 0.10, 2**30


def fits(peak_bytes: int, budget_gb: float) -> bool:
    """Whether a planned peak fits `budget_gb` (10^9 bytes) with the allocator slack and the CUDA context."""
    return peak_bytes * (1 + FIT_SLACK) + FIT_CONTEXT_BYTES <= budget_gb * 1e9


def with_flags(cfg, flags: list[str]):
    """A copy of `cfg` with some flags given again (e.g. an AC_LADDER rung), parsed as the command line is."""
    from ptrain.config import field_values

    out = copy.deepcopy(cfg)
    for group, values in field_values(flags).items():
        for key, value in values.items():
            setattr(getattr(out, group), key, value)
    return out


def choose_ac(cfg, world: int, model_dir: str | Path, budget_gb: float, report=None) -> dict:
    """--ac_mode auto: plan the AC_LADDER's rungs in order on `cfg`'s layout and return the first that fits
    `budget_gb`: {"index" (None when not even full AC fits), "name", "flags", "peak_bytes", "lines"}, one line
    per planned rung (also given to `report`)."""
    lines = []
    for index, (name, flags) in enumerate(AC_LADDER):
        res = plan_config(with_flags(cfg, flags), world, model_dir)
        ok = fits(res["peak_bytes"], budget_gb)
        lines.append(f"{name}: {res['peak_bytes'] / 1e9:.2f} GB planned, {'fits' if ok else 'does not fit'}")
        if report is not None:
            report(lines[-1])
        if ok:
            return {"index": index, "name": name, "flags": flags, "peak_bytes": res["peak_bytes"], "lines": lines}
    return {"index": None, "name": None, "flags": None, "peak_bytes": res["peak_bytes"], "lines": lines}


def layouts(world: int, training_type: str) -> list[tuple[str, list[str]]]:
    """Layouts to try, least communication per step first (replicas, then sharding, then context parallel)."""
    out = []
    if training_type == "lora" and world > 1:
        out.append((f"DDP {world}", ["--dp_degree", str(world), "--dp_shards", "1", "--cp_degree", "1"]))
    out.append((f"FSDP {world}", ["--dp_degree", "1", "--dp_shards", str(world), "--cp_degree", "1"]))
    for cp in (2, 4, 8):
        if world % cp == 0 and world > cp:
            out.append((f"FSDP {world // cp} x cp {cp}",
                        ["--dp_degree", "1", "--dp_shards", str(world // cp), "--cp_degree", str(cp)]))  # fmt: skip
    return out


def advise(flags: list[str], world: int, model_dir: str | Path, budget_gb: float, report=print) -> dict:
    """Plan the run as configured; if it does not fit `budget_gb` (GB, 10^9), find each layout's least-recompute
    AC rung that fits (planning each layout's rungs in order up to the first fit) and suggest the fastest of
    those: the least recompute, then the least communication. `report` receives one line per planned candidate."""
    from ptrain.config import parse_config

    cfg = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)])
    auto = cfg.activation_checkpoint.ac_mode == "auto"
    as_configured = None if auto else plan_config(cfg, world, model_dir)
    fit = as_configured is not None and fits(as_configured["peak_bytes"], budget_gb)
    if as_configured is not None:
        report(f"as configured ({as_configured['layout']}): {as_configured['peak_bytes'] / 1e9:.1f} GB per GPU "
               f"{'fits in' if fit else 'exceeds'} {budget_gb:g} GB (with {FIT_SLACK:.0%} allocator slack and "
               f"{FIT_CONTEXT_BYTES / 2**30:g} GiB CUDA context)")  # fmt: skip
    result = {"as_configured": as_configured, "fits": fit, "suggestion": None, "fitting": []}
    if fit:
        return result
    for layout, layout_flags in layouts(world, cfg.model.training_type):
        for rung, (ac_name, ac_flags) in enumerate(AC_LADDER):
            extra = [*layout_flags, *ac_flags]
            res = plan_config(with_flags(cfg, extra), world, model_dir)
            ok = fits(res["peak_bytes"], budget_gb)
            report(f"  {layout}, {ac_name}: {res['peak_bytes'] / 1e9:.1f} GB {'fits' if ok else 'too big'}")
            if ok:
                result["fitting"].append({"name": f"{layout}, {ac_name}", "flags": extra, "plan": res, "rung": rung})
                break
        if result["fitting"] and result["fitting"][0]["rung"] == 0:
            break  # no recompute and the least communication: nothing later can be faster
    if not result["fitting"]:
        report("  nothing tried fits: lower --num_frames / resolution, use LoRA, or plan more GPUs")
        return result
    best = min(result["fitting"], key=lambda c: c["rung"])  # stable: the first layout (least communication) wins ties
    result["suggestion"] = best
    report(f"  fastest that fits: {best['name']} (least recompute, then least communication)")
    return result


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m ptrain.planner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", required=True, help="diffusers checkpoint folder, or one with only config files")
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="simulate every block (no extrapolation)")
    ap.add_argument("--budget_gb", type=float, help="GPU memory to fit in: try cheaper-to-costlier layouts")
    args = ap.parse_args(own)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        if args.budget_gb:
            res = advise(flags, args.world_size, args.model_dir, args.budget_gb,
                         report=lambda line: print("PLAN " + line, file=sys.stderr, flush=True))  # fmt: skip
        else:
            res = plan(flags, args.world_size, args.model_dir, args.full)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
