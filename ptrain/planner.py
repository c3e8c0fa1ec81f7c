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

Phases (`phases` in the result, each with its peak and categories):
- `startup`: the transformer arriving on the device as the trainer places it (ptrain/parallelize.py: each FSDP
  unit is placed just before it is sharded; the plain module of one process arrives whole), with the EMA.
- `forward_backward`, `optimizer`: the training step. `peak_bytes` is the larger of these two: the step's peak
  (the memory table, the goals and `advise` compare it).
- `precompute` (with --enable_precomputation: the VAE encodes one sample at the run's shape beside the text
  encoders, before the transformer is placed) or `encode` (without it: each step's VAE encode, with the training
  state resident), and `validation` (when validation is configured: the VAE decodes one video at the largest
  validation shape, with the training state resident; the text encoders too when they stay resident in training,
  else only their largest layer: validation streams them layer by layer). The VAE runs for real on fake tensors.
  --enable_tiling / --enable_slicing auto turn tiling (and, for a batch above 1, slicing) on when the untiled
  encode phase would peak above the step (with the encoders added to the step when they stay resident: no
  precomputation, no --offload_encoders); validation decodes tiled unless --enable_tiling off. Not simulated:
  the denoising forward of validation (no gradients: one block's activations at a time) and the parameters
  FSDP leaves gathered after it (the root and last block).
- Encoders (VAE, text encoders) count only in the phases that use them when they leave the device otherwise
  (--enable_precomputation moves them off after precomputing; --offload_encoders between uses); without either,
  they stay resident from the load on, and the start-up and step phases count them too ("VAE (resident)",
  "Text encoders (resident)"; `peak_bytes`, the transformer's step, leaves them out: the memory table shows them
  as "+ resident encoders").
`run_peak_bytes` is the largest phase and `run_peak_phase` its name.

"Reserved": the caching allocator holds more than the allocated peak. `reserved_estimate_bytes` = run peak x
1.10 + 1.5 GiB, the upper envelope of the four H200 measurements of issue 16 (reserved / allocated: CogVideoX-5B
LoRA 20.0 / 18.8 GiB, LTX-Video LoRA 7.82 / 6.32, CogVideoX-5B full fine-tune 110 / 104, CogVideoX-5B precompute
pass 81.5 / 73.3; benchmarks/results/gpu_h200.json and the project's platform notes); `device_estimate_bytes`
adds the CUDA context, assumed 1 GiB (not measured; it is outside torch's reserved figure).

Allocated: replaying the code that ran on the H200 (CodePath: FSDP2 in one process, foreach AdamW), the planner
is within 5% of all three allocated peaks measured there (-0.6%, -0.2%, -0.2%; tests/test_planner.py pins them).

What it does not model otherwise: fragmentation beyond that slack, NCCL's own buffers and kernel workspaces
(cuBLAS, flash attention). Fake tensors live on the CPU device, so attention runs through the CPU SDPA kernels,
whose saved tensors (output + log-sum-exp) match the fused CUDA kernels'.
Ring attention (`--cp_mode ring`): on the CPU device each ring block runs the CPU
flash op, on a GPU the fused kernel that ptrain.parallel.context.ring_kernel picks (FlashAttention, or the
memory-efficient kernel at the step whose keys carry a text padding mask); both return one block's output +
log-sum-exp and hold no score matrix, so the simulated memory is the GPU's (tests/test_ring_attention.py runs the
ring on fake CUDA tensors with the CUDA kernels and on fake CPU tensors: the same peak). Not simulated: ring
blocks that fall back to the math kernel on a GPU (float64, head dims the fused kernels refuse), which holds each
block's float32 scores (heads x local tokens x block tokens) several times over; ptrain warns when it runs.

CLI: python -m ptrain.planner --model_dir DIR --world_size 8 [--budget_gb 80] -- [ptrain flags]   (prints JSON;
with --budget_gb also one line per phase on stderr)
From a run: python -m ptrain --dry_run --plan_gpu_memory_gb 80 --plan_world_size 8 [flags]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import json
import logging
import math
import subprocess
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ptrain.objectives import sample_generators

GIB = 2**30
#: The training step's phases: `peak_bytes` is their max.
STEP_PHASES = ("forward_backward", "optimizer")
#: reserved ~ allocated x (1 + RESERVED_SLACK) + RESERVED_EXTRA_BYTES (module docstring: the H200 measurements)
RESERVED_SLACK, RESERVED_EXTRA_BYTES = 0.10, int(1.5 * GIB)
#: The CUDA context beside torch's reserved memory (assumed, not measured).
CUDA_CONTEXT_BYTES = GIB


@dataclasses.dataclass(frozen=True)
class CodePath:
    """Choices of ptrain's code that the planner makes as the trainer makes them, unless told otherwise here: to
    replay a measurement of code that ptrain has since changed (the H200 references in tests/test_planner.py).
    `fsdp_in_one_process`: FSDP2 wraps a one-process LoRA run too (ptrain now trains the plain module there);
    `foreach_optimizer`: torch's multi-tensor AdamW, whose step allocates a copy of the second moments (ptrain
    now runs the fused kernel)."""

    fsdp_in_one_process: bool = False
    foreach_optimizer: bool = False


#: What the trainer runs.
TRAINER = CodePath()


class PeakBytes(TorchDispatchMode):
    """Bytes held by the tensor storages created while it is active (freed ones subtracted), and their peak.

    For what runs outside a training step, where torch's memory trackers do not fit: placement and sharding (no
    module runs) and the VAE (its encoder runs its blocks once per chunk of frames, which MemTracker refuses).
    Tensors that existed before are not counted, nor DTensor ops: they run below this mode, so neither the views
    they make of the local shards nor the whole-shape fake tensors of DTensor's sharding propagation (made the
    first time an op is seen, in the same fake mode) are counted; the shards FSDP2 allocates are plain tensors."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # this mode is off while it runs: a DTensor op's inner ops are not seen
        if any(t is DTensor for t in types):
            return out
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                if st not in self._seen:
                    n = st.nbytes()
                    self._seen[st] = weakref.ref(st, lambda _, n=n: self._freed(n))
                    self.current += n
                    self.peak = max(self.peak, self.current)
        return out


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


def _meta_component(cls, folder: Path, dtype):
    """An optional component as the trainer loads it: a transformers model from its config on the meta device (in
    the image encoder's dtype), or a processor (small files, read as they are)."""
    if not issubclass(cls, torch.nn.Module):
        return cls.from_pretrained(folder)
    with torch.device("meta"):
        return cls(cls.config_class.from_pretrained(folder)).to(dtype).eval()  # run under no_grad, as the VAE


def encoder_bytes(spec, model_dir: Path, dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    """Resident weight bytes of the frozen VAE, text encoders and image encoder (from their configs; absent ones left
    out)."""
    return {k: v for k, v in _encoder_bytes(spec.name, Path(model_dir), tuple(sorted(dtypes.items())))
            if k != "text_layer"}  # fmt: skip


def text_layer_bytes(spec, model_dir: Path, dtypes: dict[str, torch.dtype]) -> int:
    """The largest weights one text-encoder submodule owns (ptrain.parallel.swap.streamed keeps one on the device)."""
    return dict(_encoder_bytes(spec.name, Path(model_dir), tuple(sorted(dtypes.items()))))["text_layer"]


@functools.lru_cache(maxsize=16)
def _encoder_bytes(spec_name: str, model_dir: Path, dtypes: tuple) -> tuple:
    """((name, bytes), ...) of the VAE, the text encoders and an image encoder (Wan 2.1 I2V's CLIP, in the text
    encoders' dtype), and ("text_layer", bytes): the largest set of weights one text-encoder submodule owns (what
    validation's streamed text encoders hold on the device at a time)."""
    from ptrain.models.spec import get_spec

    spec, dtypes, out, layer = get_spec(spec_name), dict(dtypes), {}, 0
    classes = {**spec.checkpoint_classes(model_dir), **spec.optional_components}  # e.g. HunyuanVideo-I2V's Llava
    dtypes.setdefault("image_encoder", dtypes.get("text_encoder", torch.bfloat16))
    for name in ("vae", "text_encoder", "text_encoder_2", "image_encoder"):
        cls = classes.get(name)
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
        if name.startswith("text_encoder"):
            owned = (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
            layer = max(layer, max(owned) * dtype.itemsize)
    return (*out.items(), ("text_layer", layer))


@functools.lru_cache(maxsize=64)
def vae_activation_bytes(vae_cls, model_dir: Path, dtype: torch.dtype, op: str, shape: tuple, tiling: bool,
                         slicing: bool) -> int:  # fmt: skip
    """Peak bytes the VAE allocates beyond its weights to encode a (B, 3, F, H, W) video of `shape` (the video
    included) or, `op` "decode", to decode its latents into one (the video out included), with its tiling /
    slicing on or off: the VAE's own code on fake tensors (seconds untiled; tiled, every tile is a pass of the
    encoder or decoder, up to a minute at 720p). Cached per process."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    vae = _meta_model(vae_cls, model_dir, "vae", dtype=dtype)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        vae.to_empty(device="cpu")
        vae.eval()
        latents = None
        if op == "decode":  # the untiled encode gives the latents' shape only
            latents = vae.encode(torch.zeros(shape, dtype=dtype)).latent_dist.mean
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
        with PeakBytes() as peak:
            if latents is None:
                vae.encode(torch.zeros(shape, dtype=dtype))
            else:  # LTX-Video's decoder is conditioned on the decode timestep when its config says so
                temb = {"temb": torch.zeros(shape[0], dtype=dtype)} if vae.config.get("timestep_conditioning") else {}
                vae.decode(latents, **temb)
    return peak.peak


def simulate(
    flags: list[str],
    world: int,
    model_dir: str | Path,
    num_blocks: tuple[int, ...] | None = None,
    fake: bool = True,
    vae_phases: bool = True,
) -> dict:
    """Peak memory of rank 0 in one training step of `ptrain FLAGS` on `world` ranks (fake), in bytes by category.

    `num_blocks` overrides the transformer's block counts (one per block list of the model). `fake=False`
    runs the same code on real (uninitialised) tensors in an already initialised process group: the check that
    the simulation counts what a real run allocates. With the phases around the step (`finish`; `vae_phases`:
    see there).
    """
    return finish(_run(flags, world, model_dir, num_blocks, fake), flags, model_dir, vae_phases)


def _spec_of(cfg, model_dir: Path):
    """The model spec of a planned config: --model_name auto (the default) resolved from `model_dir`'s transformer
    class, in `cfg` (a named family that contradicts the folder is a ConfigError)."""
    from ptrain.models.registry import get_spec, resolve_model_name

    cfg.model.model_name = resolve_model_name(cfg.model.model_name, model_dir)
    return get_spec(cfg.model.model_name)


def _run(flags: list[str], world: int, model_dir, num_blocks=None, fake: bool = True) -> dict:
    """simulate() without `finish`: the start-up and the step, whose figures extrapolate linearly in blocks."""
    from ptrain.config import parse_config

    cfg = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)])
    return simulate_config(cfg, world, model_dir, num_blocks, fake)


def simulate_config(cfg, world: int, model_dir: str | Path, num_blocks: tuple[int, ...] | None = None,
                    fake: bool = True, code: CodePath = TRAINER) -> dict:  # fmt: skip
    """simulate() of a parsed Config (left unchanged); `code`: see CodePath."""

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = copy.deepcopy(cfg)
    if cfg.activation_checkpoint.ac_mode == "auto":
        from ptrain.config import ConfigError

        raise ConfigError("--ac_mode auto is the planner's choice among AC modes: plan with --budget_gb (or "
                          "--plan_gpu_memory_gb in a dry run), or name an --ac_mode")  # fmt: skip
    cfg.compile.compile = False  # compile changes no memory the tracker sees; it would only cost time here
    spec = _spec_of(cfg, model_dir)
    if fake:
        _fake_world(world)
        try:
            return _simulate(cfg, spec, world, model_dir, num_blocks, fake, t0, code)
        finally:  # leave no fake default group behind for code that initialises a real one later
            dist.destroy_process_group()
    if dist.get_world_size() != world:
        raise ValueError(f"fake=False needs the process group of {world} ranks to be initialised")
    return _simulate(cfg, spec, world, model_dir, num_blocks, fake, t0, code)


class _NoHook:
    """A stand-in hook handle for parameters that need none (see _measure_step)."""

    def remove(self) -> None:
        pass


def meta_components(cfg, spec, model_dir: Path, num_blocks):
    """The transformer (with `num_blocks` per block list if given), VAE and scheduler on the meta device."""
    from ptrain.models.spec import Components, pipeline_settings, read_model_index
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
    # A mode whose prompt reads the image needs to know the checkpoint's text encoder (HunyuanVideo-I2V's Llava);
    # the step's text states are simulated, so it is built on the meta device and never run.
    text_encoder = None
    if spec.text_needs_image(m.train_mode) and (model_dir / "text_encoder").is_dir():
        text_encoder = _meta_component(spec.checkpoint_classes(model_dir)["text_encoder"], model_dir / "text_encoder",
                                       DTYPES[m.text_encoder_dtype])  # fmt: skip
    for name, cls in spec.optional_components.items():  # e.g. Wan 2.1 I2V's CLIP image encoder and processor
        if (model_dir / name).is_dir():
            extra[name] = _meta_component(cls, model_dir / name, DTYPES[m.text_encoder_dtype])
    settings = pipeline_settings(read_model_index(model_dir))  # e.g. Wan 2.2 TI2V's expand_timesteps
    return Components(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=None,
                      scheduler=scheduler, extra=extra, settings=settings)  # fmt: skip


class _Parent(torch.nn.Module):
    """A fresh parent module around one VAE encode inside the tracked step (a mode's conditioning frames). torch's
    MemTracker refuses a module called twice in one tracked iteration at the top level, and the Wan VAE calls its
    encoder once per chunk of frames; under a parent the repeated calls are nested ones, which it tracks."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _encode_under_a_parent(vae) -> None:
    encode = vae.encode
    vae.encode = lambda *args, **kwargs: _Parent(encode)(*args, **kwargs)


def _planned_attention(cfg) -> str:
    """The SDPA kernel simulated: the fused kernels a GPU picks save what the CPU flash kernel saves (output and
    log-sum-exp); only the math kernel differs (it saves the attention weights), so only it is simulated as chosen."""
    return "math" if cfg.compile.attention_backend == "math" else "auto"


#: Depth of DTensor's output-metadata rebuilds in progress (their allocations are no memory of the run).
_DTENSOR_META = threading.local()


@functools.cache
def _untracked_dtensor_meta(tracker_cls: type) -> type:
    """`tracker_cls` that does not count what DTensor's sharding propagation allocates to rebuild output metadata
    (`torch.empty_strided` per output spec, `_dtensor_meta_untracked`). torch 2.13 runs that propagation under a
    fake mode of its own, which its trackers skip; torch 2.11 runs it under the caller's, so its trackers counted
    it: under FSDP2 the fused AdamW step's output specs made the optimizer phase's states 5x the real ones
    (`tests/test_planner.py::test_simulation_matches_a_real_run` failed on torch 2.11)."""
    from torch.distributed.tensor import DTensor

    class Tracker(tracker_cls):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if getattr(_DTENSOR_META, "depth", 0) and not any(t is DTensor for t in types):
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    Tracker.__name__ = f"Untracked{tracker_cls.__name__}"
    return Tracker


@contextlib.contextmanager
def _dtensor_meta_untracked():
    """Mark DTensor's output-metadata rebuilds (see _untracked_dtensor_meta) while the trackers run."""
    from torch.distributed.tensor import _op_schema

    original = getattr(_op_schema, "_rebuild_tensor_from_dtensor_meta", None)
    if original is None:  # another torch: nothing to mark
        yield
        return

    def rebuild(arg):
        _DTENSOR_META.depth = getattr(_DTENSOR_META, "depth", 0) + 1
        try:
            return original(arg)
        finally:
            _DTENSOR_META.depth -= 1

    _op_schema._rebuild_tensor_from_dtensor_meta = rebuild
    try:
        yield
    finally:
        _op_schema._rebuild_tensor_from_dtensor_meta = original


def _measure_step(cfg, spec, comps, model, dims, device) -> tuple[dict, object, int]:
    """Peak bytes by category of the trainer's micro-batches (every one of --gradient_accumulation_steps:
    objective, the mode's conditioning, loss, backward) and of its optimizer step, each tracked on its own in the
    steady state; also returns the prepared batch and the bytes resident between steps (the training state:
    parameters, buffers, optimizer state, EMA; gradients are freed by the step)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    from ptrain.parallelize import DTYPES
    from ptrain.step import SimulatedInputs, TrainStep, clip_gradients, set_gradient_sync

    t, d, transformer, optimizer, b = cfg.train, cfg.data, model.transformer, model.optimizer, cfg.train.batch_size
    inputs = SimulatedInputs(spec, comps, device, (b, 3, d.num_frames, d.height, d.width),
                             d.max_sequence_length or spec.max_sequence_length(comps),
                             DTYPES[cfg.model.text_encoder_dtype], d.enable_precomputation == "on")  # fmt: skip
    accum = t.gradient_accumulation_steps
    step = TrainStep(spec, comps, transformer, spec.make_objective(cfg.objective, comps), inputs, dims.cp, accum,
                     _planned_attention(cfg))  # fmt: skip
    batch = {"position": list(range(b))}

    def new_tracker():
        if isinstance(transformer, FSDPModule):
            return _untracked_dtensor_meta(FSDPMemTracker)(transformer, optimizer)
        tracker = _untracked_dtensor_meta(MemTracker)()
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
        if model.fused_backward is not None:  # the backward stepped unit by unit (--fused_backward_pass)
            model.fused_backward.finish(device)
        else:
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
    last = lambda: micro_batch(accum - 1)
    for phase, fn in (("forward_backward", last), ("optimizer", lambda: optimizer_step(2))):
        if phase == "forward_backward":
            for micro in range(accum - 1):
                micro_batch(micro)
        tracker = new_tracker()
        with tracker, _no_gradient_buffering(), _dtensor_meta_untracked(), warnings.catch_warnings():
            # --fused_backward_pass frees each gradient in its hook, before the tracker's own hook looks at it
            warnings.filterwarnings("ignore", "Expected a tensor or a traceable wrapper-subclass of tensor, but got "
                                    "<class 'NoneType'>")  # fmt: skip
            fn()
        per_dev = next(iter(tracker.get_tracker_snapshot("peak").values()))
        phases[phase] = {
            "peak_bytes": int(per_dev["Total"]),
            "categories": {str(getattr(k, "value", k)): int(v) for k, v in per_dev.items() if str(k) != "Total"},
        }
    resident = int(next(iter(tracker.get_tracker_snapshot().values()))["Total"])  # after the optimizer step
    return phases, prepared, resident + _add_ema(phases, model.ema)


@contextlib.contextmanager
def _no_gradient_buffering():
    """Keep torch's memory trackers from holding gradients that training frees.

    Their ModTracker learns that a module's backward has finished through a multi-grad hook on the module's
    inputs in mode "all", which holds each input's gradient until every input's has arrived. An input shared by
    all blocks (CogVideoX's time embedding) gets its gradient only at the very end of the backward, so every
    block's hook held the gradients of its hidden states and text states until then: 8.9 GiB in the end-of-
    backward peak of a CogVideoX-5B full fine-tune at 49x480x720, memory no training run holds. (FSDP2 hid it:
    its mixed precision casts each unit's inputs, so no input is shared.) Mode "any" reports the module's backward
    at its first input gradient and holds none; only the per-module attribution of the tracker (not used here)
    moves, the totals are the trainer's."""
    from torch.distributed._tools import mod_tracker

    original = mod_tracker.register_multi_grad_hook

    def any_mode(tensors, fn, *, mode="any"):
        return original(tensors, fn, mode="any")

    mod_tracker.register_multi_grad_hook = any_mode
    try:
        yield
    finally:
        mod_tracker.register_multi_grad_hook = original


def _add_ema(phases: dict, ema) -> int:
    """The EMA shadows (local shards, as the trainable parameters) are resident for the whole run; the trackers
    only see tensors of modules and optimizers, so they are added to every phase here. Returns their bytes."""
    if ema is None:
        return 0
    ema_bytes = sum((s.to_local() if hasattr(s, "to_local") else s).untyped_storage().nbytes() for s in ema.shadow)
    for ph in phases.values():
        ph["peak_bytes"] += ema_bytes
        ph["categories"]["EMA"] = ema_bytes
    return ema_bytes


def _simulate(cfg, spec, world: int, model_dir: Path, num_blocks, fake: bool, t0: float,
              code: CodePath = TRAINER) -> dict:  # fmt: skip
    """The trainer's set-up (ptrain.parallelize) and step (ptrain.step) on fake tensors, measured."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ptrain.parallel import ParallelDims
    from ptrain.parallelize import build_trainable, make_trainable_model, place_states

    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    dims = ParallelDims.build(p.dp_degree, p.dp_shards, p.cp_degree, world)
    mesh = dims.build_mesh()  # outside FakeTensorMode (inside it fails)
    device = torch.device("cpu")
    comps = meta_components(cfg, spec, model_dir, num_blocks)
    _encode_under_a_parent(comps.vae)  # the mode's conditioning encodes inside the tracked step
    transformer = comps.transformer
    blocks_used = tuple(int(transformer.config[k]) for k in spec.block_count_keys)
    # The trainer's set-up on the meta model (the mode's input widening, LoRA, FP8 storage: fake tensors cannot
    # be swapped in place by Module.to, which peft uses), materialised as fake tensors afterwards.
    spec = spec.bind(comps, m.train_mode, m.mask_probs(), m.training_type)
    spec.check_shape(d.num_frames, d.height, d.width, comps)
    if cfg.validation.enabled():  # the validation videos' sizes too: --dry_run refuses what the run would
        from ptrain.validation import check_validation_shapes, load_validation_items

        check_validation_shapes(lambda f, h, w: spec.check_shape(f, h, w, comps),
                                load_validation_items(cfg.validation, d, m.train_mode))  # fmt: skip
    make_trainable_model(transformer, cfg, spec)
    n_total = sum(q.numel() for q in transformer.parameters())  # with the LoRA adapters, as the trainer counts
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext():
        comps.vae.to_empty(device=device)
        for module in comps.extra.values():  # an optional encoder (Wan 2.1 I2V's CLIP)
            if isinstance(module, torch.nn.Module):
                module.to_empty(device=device)
        # The start-up as the trainer runs it: each FSDP unit reaches the device (here: is materialised from the
        # meta device) just before it is sharded, the plain module of one process whole; fused AdamW as trained.
        place = functools.partial(place_states, device=device, materialize=True)
        with PeakBytes() as startup:
            model = build_trainable(transformer, cfg, spec, mesh, dims, device, t.train_steps, planning=True,
                                    place=place, fused=not code.foreach_optimizer,
                                    fsdp_in_one_process=code.fsdp_in_one_process)  # fmt: skip
        steps, prepared, resident = _measure_step(cfg, spec, comps, model, dims, device)
        latent_shape = tuple(prepared.sample.target.shape)
    phases = {"startup": {"peak_bytes": startup.peak, "categories": {
        "Resident": startup.current, "Unit being placed": startup.peak - startup.current}}, **steps}  # fmt: skip
    top = max(steps.values(), key=lambda ph: ph["peak_bytes"])
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
        # --activation_offload: what the measured forward moved to host memory (ptrain/parallel/offload.py)
        "offload_host_bytes": getattr(getattr(transformer, "_ptrain_offload", None), "host_bytes", 0),
        "peak_bytes": top["peak_bytes"],
        "categories": top["categories"],
        "phases": phases,
        "resident_bytes": resident,
        **({"code_path": dataclasses.asdict(code)} if code != TRAINER else {}),
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


def _step(base: dict, bump: dict, i: int) -> int:
    """How many blocks of list `i` a bump adds to the base: 1, or the AC period (plan_config)."""
    return bump["blocks"][i] - base["blocks"][i]


def _extrapolate(base: dict, bumps: list[dict], targets: tuple[int, ...]) -> dict:
    """Each phase linear in each block count: value(n) = base + sum_i (n_i - base_i) * (bump_i - base) / step_i;
    the step's peak is the larger of its phases' peaks. The start-up is linear too: the shards of the units placed
    so far plus the one being placed (a block, or the root's own parameters last)."""
    out = dict(base)

    def lin(get):
        v = get(base)
        for i, bump in enumerate(bumps):
            v += (targets[i] - base["blocks"][i]) * (get(bump) - get(base)) / _step(base, bump, i)
        return int(v)

    phases = {}
    for name, ph in base["phases"].items():
        phases[name] = {
            "peak_bytes": lin(lambda r, n=name: r["phases"][n]["peak_bytes"]),
            "categories": {k: lin(lambda r, n=name, k=k: r["phases"][n]["categories"].get(k, 0))
                           for k in ph["categories"]},
        }  # fmt: skip
    top = max((phases[n] for n in STEP_PHASES), key=lambda ph: ph["peak_bytes"])
    out.update(phases=phases, peak_bytes=top["peak_bytes"], categories=top["categories"])
    out["resident_bytes"] = lin(lambda r: r["resident_bytes"])
    out["params_total"] = lin(lambda r: r["params_total"])
    out["params_trainable"] = lin(lambda r: r["params_trainable"])
    out["blocks"] = list(targets)
    out["simulated_blocks"] = [base["blocks"], *[b["blocks"] for b in bumps]]
    out["seconds"] = round(base["seconds"] + sum(b["seconds"] for b in bumps), 1)
    return out


def plan(flags: list[str], world: int, model_dir: str | Path, full: bool = False, vae_phases: bool = True) -> dict:
    """simulate() for the whole model: directly when `full` or the model is small, else 3 and 4 blocks per block
    list (with --ac_mode selective: whole AC periods, plan_config), extrapolated to the real block counts; then
    `finish` (`vae_phases`: see there)."""
    from ptrain.config import parse_config

    return plan_config(parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)]), world, model_dir,
                       full, vae_phases)  # fmt: skip


def plan_config(cfg, world: int, model_dir: str | Path, full: bool = False, vae_phases: bool = True,
                phases: bool = True, code: CodePath = TRAINER) -> dict:  # fmt: skip
    """plan() of a parsed Config; `phases=False` leaves out `finish` (the start-up and the step only: the AC and
    layout choices compare the step's peak); `code`: see CodePath."""

    model_dir = Path(model_dir)
    spec = _spec_of(cfg, model_dir)
    config = spec.transformer_cls.load_config(model_dir, subfolder="transformer")
    targets = tuple(int(config[k]) for k in spec.block_count_keys)
    # From 3 blocks on, FSDP's prefetch pattern no longer changes. With --ac_mode selective the blocks alternate
    # (checkpointed or not: the peak grows by different amounts per block, depending on where the backward meets
    # a recompute), so the bump adds one whole period of blocks, and the base has as many blocks as the real count
    # modulo the period: the extrapolation lands on the real pattern.
    period = cfg.activation_checkpoint.period()
    base_blocks = tuple(3 + (n - 3) % period for n in targets)
    if full or any(n < b + period for n, b in zip(targets, base_blocks)):  # too few blocks to extrapolate from
        res = simulate_config(cfg, world, model_dir, code=code)
        res["simulated_blocks"] = [res["blocks"]]
        return finish(res, cfg, model_dir, vae_phases) if phases else res
    swap = cfg.parallel.blocks_to_swap
    sim = (lambda blocks: _swap_everything(cfg, blocks)) if swap else (lambda blocks: cfg)
    base = simulate_config(sim(base_blocks), world, model_dir, base_blocks, code=code)
    bumps = []
    for i in range(len(targets)):
        blocks = tuple(b + period if j == i else b for j, b in enumerate(base_blocks))
        bumps.append(simulate_config(sim(blocks), world, model_dir, blocks, code=code))
    res = _extrapolate(base, bumps, targets)
    res["offload_host_bytes"] = _extrapolate_host(base, bumps, targets, "offload_host_bytes")
    if swap:
        res["swap_host_bytes"] = _extrapolate_host(base, bumps, targets, "swap_host_bytes")
        _resident_unswapped(res, base, bumps, targets, swap)
    return finish(res, cfg, model_dir, vae_phases) if phases else res


def vae_decision(
    tiling: str, slicing: str, untiled_peak: int, step_peak: int, batch: int, with_encoders: bool = False
) -> tuple[bool, bool, str]:
    """--enable_tiling / --enable_slicing (auto, on, off) -> (tiling, slicing, why) for the VAE's encode. auto: on
    when the encode phase's untiled peak would exceed `step_peak` (the step's, with the encoders when they stay
    resident: `with_encoders`); slicing only for a batch above 1 (one sample at a time)."""
    over = untiled_peak > step_peak
    why = (f"planned VAE encode phase {size_gb(untiled_peak)} untiled {'>' if over else '<='} the step's "
           f"{size_gb(step_peak)}{' with the encoders resident' if with_encoders else ''}")  # fmt: skip
    return (tiling == "on" or (tiling == "auto" and over),
            slicing == "on" or (slicing == "auto" and over and batch > 1), why)  # fmt: skip


def size_gb(nbytes: int) -> str:
    """Bytes in decimal units (GB = 10^9, as the planner's other lines), MB / KB below a GB (tiny test models)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1e3:.1f} KB"


def validation_shape(cfg) -> tuple[int, int, int] | None:
    """The largest (frames, height, width) validation samples, or None when the run does not validate."""
    from ptrain.validation import load_validation_items

    v = cfg.validation
    items = load_validation_items(v, cfg.data, cfg.model.train_mode) if v.enabled() else []
    if not items:
        return None
    it = max(items, key=lambda it: it.num_frames * it.height * it.width)
    return it.num_frames, it.height, it.width


def _vae_phase(state: dict, weights: dict, activations: int, tiling: bool, slicing: bool) -> dict:
    cats = {**state, **weights, "VAE activations": activations}
    return {"peak_bytes": sum(cats.values()), "categories": cats, "vae_tiling": tiling, "vae_slicing": slicing}


def finish(res: dict, flags, model_dir, vae_phases: bool = True) -> dict:
    """The phases around the step (module docstring) from a simulated or extrapolated start-up and step: the VAE's
    encode (precompute or each step's) with the auto tiling decision (`vae`), validation's decode, the run's peak
    over every phase, and the reserved / device estimates. `vae_phases=False` decides only (one untiled encode),
    leaving out the VAE phases, whose tiled simulations take longer. `flags`: the run's flags or its Config."""
    from ptrain.config import parse_config
    from ptrain.parallelize import DTYPES

    model_dir = Path(model_dir)
    cfg = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)]) if isinstance(flags, list) else flags
    m, d = cfg.model, cfg.data
    spec, dtype = _spec_of(cfg, model_dir), DTYPES[m.vae_dtype]
    enc = encoder_bytes(spec, model_dir, _encoder_dtypes(cfg))
    act = functools.partial(vae_activation_bytes, spec.component_classes["vae"], model_dir, dtype)
    weights = {"VAE": enc.get("vae", 0), "Text encoders": sum(v for k, v in enc.items() if k.startswith("text_")),
               **({"Image encoder": enc["image_encoder"]} if "image_encoder" in enc else {})}
    # --enable_precomputation auto is decided from the data (ptrain/data/precompute.py); the planner takes it as
    # off (the VAE encodes every step, with the training state resident) unless the caller resolved it (dry run)
    pre = d.enable_precomputation == "on"
    resident_encoders = encoders_resident(cfg)
    batch = 1 if pre else cfg.train.batch_size
    state = {} if pre else {"Training state": res["resident_bytes"]}
    shape = (batch, 3, d.num_frames, d.height, d.width)
    untiled = sum(state.values()) + sum(weights.values()) + act("encode", shape, False, False)
    step = res["peak_bytes"] + (sum(weights.values()) if resident_encoders else 0)
    tiling, slicing, why = vae_decision(m.enable_tiling, m.enable_slicing, untiled, step, batch, resident_encoders)
    res["vae"] = {"tiling": tiling, "slicing": slicing, "decision": why, "encoder_bytes": enc,
                  "encoders_resident": resident_encoders}  # fmt: skip
    phases = dict(res["phases"])
    if resident_encoders:  # loaded to the device at start and kept there: in every phase that does not use them
        for name in ("startup", *STEP_PHASES):
            if name in phases:
                ph = phases[name]
                phases[name] = {"peak_bytes": ph["peak_bytes"] + sum(weights.values()),
                                "categories": {**ph["categories"], **{f"{k} (resident)": v for k, v in weights.items()}}}  # fmt: skip
    if vae_phases:
        phases["precompute" if pre else "encode"] = _vae_phase(state, weights, act("encode", shape, tiling, slicing),
                                                               tiling, slicing)  # fmt: skip
        val = validation_shape(cfg)
        if val is not None:  # validation decodes tiled unless --enable_tiling off
            tiled = m.enable_tiling != "off"
            # encoders kept off the device (precomputed, --offload_encoders): the VAE comes in whole, the text
            # encoders one layer at a time (ptrain.trainer.encoders_on, stream_text)
            text = {"Text encoders": weights["Text encoders"]} if resident_encoders else {
                "Text encoder layer (streamed)": text_layer_bytes(spec, model_dir, _encoder_dtypes(cfg))}
            if resident_encoders and "Image encoder" in weights:  # Wan 2.1 I2V's CLIP stays on the device too
                text["Image encoder"] = weights["Image encoder"]
            phases["validation"] = _vae_phase({"Training state": res["resident_bytes"]}, {"VAE": weights["VAE"], **text},
                                              act("decode", (1, 3, *val), tiled, False), tiled, False)  # fmt: skip
    run_phase = max(phases, key=lambda n: phases[n]["peak_bytes"])
    run_peak = phases[run_phase]["peak_bytes"]
    reserved = int(run_peak * (1 + RESERVED_SLACK) + RESERVED_EXTRA_BYTES)
    if cfg.compile.cudagraphs():  # said with the figures, not left for the GPU to show
        res["not_planned"] = (f"--compile_mode {cfg.compile.compile_mode}: the CUDA graphs' own memory pool (their "
                              "recorded inputs and outputs) is not in these figures; it is not yet measured")  # fmt: skip
    res.update(phases=phases, run_peak_phase=run_phase, run_peak_bytes=run_peak, reserved_estimate_bytes=reserved,
               device_estimate_bytes=reserved + CUDA_CONTEXT_BYTES,
               reserved_model=f"reserved = run peak x {1 + RESERVED_SLACK:.2f} + {RESERVED_EXTRA_BYTES / GIB:g} GiB "
               f"(H200 measurements); device = reserved + {CUDA_CONTEXT_BYTES / GIB:g} GiB CUDA context (assumed)")  # fmt: skip
    return res


def _extrapolate_host(base: dict, bumps: list[dict], targets: tuple[int, ...], key: str) -> int:
    """Host bytes (`key`: swap_host_bytes with every block swapped, offload_host_bytes), extrapolated like the
    rest."""
    v = base[key]
    for i, bump in enumerate(bumps):
        v += (targets[i] - base["blocks"][i]) * (bump[key] - base[key]) // _step(base, bump, i)
    return v


#: --ac_mode auto's ladder, least recompute first: (name, flags). "ops" recomputes only cheap ops (norms,
#: activations, elementwise) in every block; every n-th block recomputes 1/n of the forward; keep_attention all of
#: it but the attention kernels (about half of it for long videos, more for short ones), with about full AC's
#: memory; full all of it.
AC_LADDER = (
    ("no AC", ["--no_gradient_checkpointing", "--ac_mode", "full"]),
    ("op-level AC", ["--gradient_checkpointing", "--ac_mode", "ops"]),
    ("AC every 4th block", ["--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "4"]),
    ("AC every 2nd block", ["--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "2"]),
    ("full AC, attention kept", ["--gradient_checkpointing", "--ac_mode", "keep_attention"]),
    ("full AC", ["--gradient_checkpointing", "--ac_mode", "full"]),
)


def device_bytes(peak_bytes: int) -> int:
    """What a planned (allocated) peak takes of a GPU: the reserved estimate (allocator slack, see the module
    docstring) and the CUDA context."""
    return int(peak_bytes * (1 + RESERVED_SLACK) + RESERVED_EXTRA_BYTES + CUDA_CONTEXT_BYTES)


def fits(peak_bytes: int, budget_gb: float) -> bool:
    """Whether a planned peak fits `budget_gb` (10^9 bytes) per GPU (device_bytes)."""
    return device_bytes(peak_bytes) <= budget_gb * 1e9


def with_flags(cfg, flags: list[str]):
    """A copy of `cfg` with some flags given again (e.g. an AC_LADDER rung), parsed as the command line is."""
    from ptrain.config import field_values

    out = copy.deepcopy(cfg)
    for group, values in field_values(flags).items():
        for key, value in values.items():
            setattr(getattr(out, group), key, value)
    if "--ac_mode" in flags and "--ac_every_n_blocks" not in flags:  # another rung: not the configured every-n
        out.activation_checkpoint.ac_every_n_blocks = None
    return out


def choose_ac(cfg, world: int, model_dir: str | Path, budget_gb: float, report=None) -> dict:
    """--ac_mode auto: plan the AC_LADDER's rungs in order on `cfg`'s layout and return the first that fits
    `budget_gb`: {"index" (None when not even full AC fits), "name", "flags", "peak_bytes", "lines"}, one line
    per planned rung (also given to `report`)."""
    lines = []
    encoders = resident_encoder_bytes(cfg, model_dir)
    for index, (name, flags) in enumerate(AC_LADDER):
        res = plan_config(with_flags(cfg, flags), world, model_dir, phases=False)
        ok = fits(res["peak_bytes"] + encoders, budget_gb)
        with_enc = " with the resident encoders" if encoders else ""
        lines.append(f"{name}: step {_gb_on_device(res['peak_bytes'] + encoders)}{with_enc} planned, "
                     f"{'fits' if ok else 'does not fit'} {budget_gb:g} GB")  # fmt: skip
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


def describe_phases(res: dict, budget_gb: float | None = None) -> list[str]:
    """The phases' peaks, the run's peak and the reserved estimate as lines (GB = 10^9 bytes), for the CLI and
    the dry run; a phase over `budget_gb` is named."""
    names = {"startup": "start-up (load, shard)", "forward_backward": "step forward/backward",
             "optimizer": "step optimizer", "precompute": "precompute (VAE encode, text encoders)",
             "encode": "VAE encode in the step", "validation": "validation (VAE decode)"}  # fmt: skip
    parts = []
    for name, ph in res["phases"].items():
        vae = ""
        if "vae_tiling" in ph:
            vae = f", VAE tiling {'on' if ph['vae_tiling'] else 'off'}" + (", slicing on" if ph["vae_slicing"] else "")
        parts.append(f"{names.get(name, name)} {ph['peak_bytes'] / 1e9:.1f} GB{vae}")
    lines = ["phases: " + "; ".join(parts)]
    if "vae" in res:
        lines.append(f"VAE: {res['vae']['decision']}")
    for key, what in (("swap_host_bytes", "block swap"), ("offload_host_bytes", "activation offload")):
        if res.get(key):
            lines.append(f"host memory for {what}: {res[key] / 1e9:.1f} GB (pinned; not in the GPU figures)")
    lines.append(f"run peak {res['run_peak_bytes'] / 1e9:.1f} GB ({res['run_peak_phase']}); reserved estimate "
                 f"{res['reserved_estimate_bytes'] / 1e9:.1f} GB, {res['device_estimate_bytes'] / 1e9:.1f} GB with "
                 f"the CUDA context ({res['reserved_model']})")  # fmt: skip
    if res.get("not_planned"):
        lines.append(f"not planned: {res['not_planned']}")
    over = [names.get(n, n) for n, ph in res["phases"].items() if budget_gb and not fits(ph["peak_bytes"], budget_gb)]
    if over and fits(res["peak_bytes"], budget_gb):
        lines.append(f"the transformer's step fits, but {', '.join(over)} do(es) not fit {budget_gb:g} GB on the device "
                     "(with the allocator's slack and the CUDA context): see the phases above")  # fmt: skip
    return lines


def encoders_resident(cfg) -> bool:
    """Whether the VAE and text encoders stay on the device through training: neither precomputed
    (`--enable_precomputation on`; the planner takes auto as off unless the caller resolved it) nor
    --offload_encoders."""
    return not (cfg.data.enable_precomputation == "on" or cfg.model.offload_encoders)


def _encoder_dtypes(cfg) -> dict:
    from ptrain.parallelize import DTYPES

    m = cfg.model
    return {"vae": DTYPES[m.vae_dtype], "text_encoder": DTYPES[m.text_encoder_dtype],
            "text_encoder_2": DTYPES[m.text_encoder_2_dtype]}  # fmt: skip


def resident_encoder_bytes(cfg, model_dir: str | Path) -> int:
    """The VAE's, text encoders' and image encoder's weights when they stay on the device through training
    (`encoders_resident`; `finish` adds them to the start-up and step phases), else 0."""
    if not encoders_resident(cfg):
        return 0
    return sum(encoder_bytes(_spec_of(cfg, Path(model_dir)), Path(model_dir), _encoder_dtypes(cfg)).values())


def _gb_on_device(peak_bytes: int) -> str:
    return f"{peak_bytes / 1e9:.1f} GB ({device_bytes(peak_bytes) / 1e9:.1f} GB on the device)"


def _label(layout: str) -> str:
    return "single process" if layout == "FSDP 1" else layout


def _nothing_fits(cfg, world: int) -> str:
    """What to try when no layout and AC mode fits: the memory options the search does not vary, by training type."""
    m = cfg.model
    if m.training_type == "lora":
        options = ("--blocks_to_swap N (frozen blocks streamed from CPU memory), --layerwise_upcasting_modules "
                   "transformer (FP8 storage of the frozen weights), --activation_offload (instead of AC)")  # fmt: skip
        more = "or plan more GPUs (FSDP shards the frozen weights, --cp_degree the tokens)" if world == 1 else (
            "or plan more GPUs")
    else:
        options = ("--full_bf16 (bfloat16 weights and moments), --fused_backward_pass, --optimizer adamw-8bit or "
                   "came, --fsdp_cpu_offload; or LoRA (--training_type lora)")  # fmt: skip
        more = "or plan more GPUs"
    if encoders_resident(cfg):  # often the largest saving, and a flag away (a new-user trial)
        auto = " (planned as off here, as --enable_precomputation auto is: training decides it from the data)" if (
            cfg.data.enable_precomputation == "auto") else ""
        options = (f"--enable_precomputation on (every sample encoded once before training; the VAE and text "
                   f"encoders then leave the GPU){auto} or --offload_encoders; {options}")  # fmt: skip
    return (f"nothing tried fits (layouts x AC modes); plan these with the same command: {options}; lower "
            f"--num_frames / the resolution; {more}")


def advise(flags: list[str], world: int, model_dir: str | Path, budget_gb: float, report=print,
           vae_phases: bool = True) -> dict:  # fmt: skip
    """Plan the run as configured; if it does not fit `budget_gb` (GB, 10^9), find each layout's least-recompute
    AC rung that fits (planning each layout's rungs in order up to the first fit) and suggest the fastest of
    those: the least recompute, then the least communication. `report` receives one line per planned candidate.

    "Fits" is the run's peak over its phases (the step with the encoders when they stay resident, the VAE's
    encode, validation) as it takes the device (device_bytes: the allocator's slack and the CUDA context): the
    figure the phases line shows. The candidates compare the step with the resident encoders; the suggestion's
    other phases are planned again and named if they do not fit."""
    from ptrain.config import parse_config

    cfg = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)])
    auto = cfg.activation_checkpoint.ac_mode == "auto"
    as_configured = None if auto else plan_config(cfg, world, model_dir, vae_phases=vae_phases)
    fit = as_configured is not None and fits(as_configured["run_peak_bytes"], budget_gb)
    if as_configured is not None:
        run = as_configured["run_peak_bytes"]
        where = "" if as_configured["run_peak_phase"] in STEP_PHASES else f", in its {as_configured['run_peak_phase']}"
        report(f"as configured ({as_configured['layout']}): {_gb_on_device(run)} per GPU at its peak{where}: "
               f"{'fits in' if fit else 'exceeds'} {budget_gb:g} GB")  # fmt: skip
        for line in describe_phases(as_configured, budget_gb):
            report("  " + line)
    if cfg.data.enable_precomputation == "auto" and encoders_resident(cfg):
        report("  (--enable_precomputation auto is planned as off: the VAE and text encoders on the GPU through "
               "training; training decides it from the data, and `on` plans them off the GPU)")  # fmt: skip
    result = {"as_configured": as_configured, "fits": fit, "suggestion": None, "fitting": []}
    if fit:
        return result
    encoders = resident_encoder_bytes(cfg, model_dir)
    for layout, layout_flags in layouts(world, cfg.model.training_type):
        for rung, (ac_name, ac_flags) in enumerate(AC_LADDER):
            extra = [*layout_flags, *ac_flags]
            res = plan_config(with_flags(cfg, extra), world, model_dir, phases=False)
            need = res["peak_bytes"] + encoders
            ok = fits(need, budget_gb)
            with_enc = " with the resident encoders" if encoders else ""
            report(f"  {_label(layout)}, {ac_name}: step {_gb_on_device(need)}{with_enc}: {'fits' if ok else 'too big'}")
            if ok:
                result["fitting"].append({"name": f"{_label(layout)}, {ac_name}", "flags": extra, "plan": res,
                                          "rung": rung})  # fmt: skip
                break
        if result["fitting"] and result["fitting"][0]["rung"] == 0:
            break  # no recompute and the least communication: nothing later can be faster
    if not result["fitting"]:
        report("  " + _nothing_fits(cfg, world))
        return result
    best = min(result["fitting"], key=lambda c: c["rung"])  # stable: the first layout (least communication) wins ties
    result["suggestion"] = best
    report(f"  fastest that fits: {best['name']} (least recompute, then least communication)")
    if vae_phases:  # the suggestion's other phases (VAE encode, validation) at its layout
        whole = finish(dict(best["plan"]), with_flags(cfg, best["flags"]), model_dir)
        best["run_peak_bytes"] = whole["run_peak_bytes"]
        if not fits(whole["run_peak_bytes"], budget_gb):
            report(f"  but its {whole['run_peak_phase']} phase peaks at {_gb_on_device(whole['run_peak_bytes'])}: "
                   "precompute the latents (--enable_precomputation on), --enable_tiling on, or --offload_encoders")  # fmt: skip
    return result


def start_plan(model_dir, world: int, flags: list[str], *options: str) -> subprocess.Popen:
    """`python -m ptrain.planner` for `flags` on `world` ranks, started in a fresh process (the planner needs its own
    fake process group) that runs beside the caller; `read_plan` collects its result."""
    cmd = [sys.executable, "-m", "ptrain.planner", "--model_dir", str(model_dir), "--world_size", str(world),
           *options, "--", *flags]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_plan(proc: subprocess.Popen, timeout: float | None = None, lines: list[str] | None = None) -> dict:
    """The JSON result of a `start_plan` process (waits for it, at most `timeout` s: then it is killed); RuntimeError
    with its error output if it failed. `lines` receives the lines it reported as it planned (--budget_gb,
    --choose_ac), also when it failed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"memory planner still running after {timeout:g} s: stopped") from e
    if lines is not None:
        lines += [line[len(REPORT) :] for line in err.splitlines() if line.startswith(REPORT)]
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"memory planner failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


#: The prefix of the lines `python -m ptrain.planner` reports on stderr as it plans (read_plan's `lines`).
REPORT = "PLAN "


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m ptrain.planner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", required=True, help="diffusers checkpoint folder, or one with only config files")
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="simulate every block (no extrapolation)")
    ap.add_argument("--budget_gb", type=float, help="GPU memory to fit in: try cheaper-to-costlier layouts")
    ap.add_argument("--choose_ac", action="store_true",
                    help="with --budget_gb: only --ac_mode auto's choice for the configured layout (choose_ac)")  # fmt: skip
    ap.add_argument(
        "--no_vae_phases",
        action="store_true",
        help="only decide --enable_tiling/--enable_slicing auto: leave out the VAE phases (faster)",
    )
    args = ap.parse_args(own)
    if args.choose_ac and not args.budget_gb:
        ap.error("--choose_ac needs --budget_gb")

    def report(line: str) -> None:
        print(REPORT + line, file=sys.stderr, flush=True)

    # the libraries' notices repeat for every planned candidate (diffusers: "modules ... should be kept in
    # float32", on each model built; FSDP2: its root returns a view): once would be noise, twenty are
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        if args.choose_ac:
            from ptrain.config import parse_config

            cfg = parse_config([*flags, "--pretrained_model_name_or_path", args.model_dir])
            res = choose_ac(cfg, args.world_size, args.model_dir, args.budget_gb, report)
        elif args.budget_gb:
            res = advise(flags, args.world_size, args.model_dir, args.budget_gb, report, not args.no_vae_phases)
        else:
            res = plan(flags, args.world_size, args.model_dir, args.full, not args.no_vae_phases)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
