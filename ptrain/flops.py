"""FLOPs of a training step, counted once per sample shape on fake tensors: model FLOPs (MFU) and hardware
FLOPs (HFU, with activation-checkpoint recompute).

The count runs the trainer's own micro-batch (ptrain/step.py) on a copy of the transformer built from its
config on fake tensors (no weights, no GPU, no process group), made trainable as the run makes it (LoRA or
full), without compile and without FSDP. Model FLOPs leave activation checkpointing off; hardware FLOPs apply
the run's --ac_mode. FLOPs are linear in the number of blocks, so a model is counted with 1 and 2 blocks per
block list and extrapolated (exact, and fast for a 42-block model).

torch's FlopCounterMode has formulas for the CUDA SDPA kernels but none for the CPU flash kernel
(`_scaled_dot_product_flash_attention_for_cpu`), which fake CPU tensors dispatch to: importing this module
registers one, so attention is counted: 4*B*H*Lq*Lk*D forward and twice that backward (model FLOPs, what the
math kernel's matmuls count).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

aten = torch.ops.aten


def _sdpa_forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs of the backward: the gradients of both matmuls (twice the forward), as the math kernel counts;
    torch's formula for the CUDA flash backward adds the kernel's recompute of the scores (hardware FLOPs)."""
    return 2 * sdpa_flop_count(query_shape, key_shape, value_shape)


for _op, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward),
):
    if hasattr(aten, _op) and getattr(aten, _op) not in flop_registry:
        register_flop_formula(getattr(aten, _op))(_formula)


def _count(cfg, spec, model_dir, video_shape: tuple, blocks: tuple[int, ...], ac: bool) -> tuple[int, tuple]:
    """FLOPs of one forward + backward of the micro-batch on fake tensors, with `blocks` blocks per list, and
    the shape of its training target without the batch dimension (the key the trainer looks FLOPs up by)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ptrain.parallel import apply_ac
    from ptrain.objectives import sample_generators
    from ptrain.parallelize import make_trainable_model
    from ptrain.planner import meta_components
    from ptrain.step import SimulatedInputs, TrainStep

    comps = meta_components(cfg, spec, Path(model_dir), blocks)
    bound = spec.bind(comps, cfg.model.train_mode, cfg.model.mask_probs(), cfg.model.training_type)
    transformer = comps.transformer
    make_trainable_model(transformer, cfg, bound)
    transformer.float()  # FLOPs do not depend on the dtype; one dtype keeps every input consistent
    comps.vae.float()
    # an optional encoder (Wan 2.1 I2V's CLIP), run by the mode's conditioning
    extra = [module.float() for module in comps.extra.values() if isinstance(module, torch.nn.Module)]
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer.to_empty(device="cpu")
        comps.vae.to_empty(device="cpu")
        for module in extra:
            module.to_empty(device="cpu")
        if ac:
            a = cfg.activation_checkpoint
            apply_ac(bound.blocks(transformer), a.ac_mode, a.every_n())
        seq = cfg.data.max_sequence_length or bound.max_sequence_length(comps)
        inputs = SimulatedInputs(bound, comps, "cpu", video_shape, seq, torch.float32)
        step = TrainStep(bound, comps, transformer, bound.make_objective(cfg.objective, comps), inputs)
        positions = list(range(video_shape[0]))
        prepared = step.prepare({"position": positions}, sample_generators(0, positions))
        counter = FlopCounterMode(display=False)
        with counter:
            step.backward(step.loss(prepared))
    return int(counter.get_total_flops()), tuple(prepared.sample.target.shape[1:])


def step_flops(cfg, spec, model_dir, frames: int, height: int, width: int) -> tuple[tuple, int, int]:
    """(key, model FLOPs, hardware FLOPs) of one sample of `frames` x `height` x `width` pixels, all blocks; the
    key is the shape of the sample's training target (without the batch dimension)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.layerwise_upcasting_modules = None  # FP8 storage changes no FLOPs (compute is in the compute dtype)
    config = spec.transformer_cls.load_config(model_dir, subfolder="transformer")
    targets = tuple(int(config[k]) for k in spec.block_count_keys)
    video = (1, 3, frames, height, width)
    a = cfg.activation_checkpoint
    counts = []
    for ac in (False, True) if a.gradient_checkpointing else (False,):
        # --ac_mode selective recomputes one block in a period: count whole periods, from a base that has the real
        # block count modulo the period (as the planner extrapolates)
        period = a.period() if ac else 1
        first = tuple(1 + (n - 1) % period for n in targets)
        base, key = _count(cfg, spec, model_dir, video, first, ac)
        total = base
        for i, n in enumerate(targets):
            blocks = tuple(b + period if j == i else b for j, b in enumerate(first))
            bump, _ = _count(cfg, spec, model_dir, video, blocks, ac)
            total += (n - first[i]) * (bump - base) // period
        counts.append(total)
    return key, counts[0], counts[-1]
