"""One micro-batch of training, shared by the trainer and the memory planner.

A `TrainStep` runs: inputs (latents and text conditioning) -> the objective's noisy sample and target -> the
train mode's conditioning (i2v / inpaint) -> transformer forward -> loss -> backward. Where the inputs come
from is decided once, when the data path is built (`make_inputs`):

- `EncodedInputs`: decoded video and captions, encoded by the frozen VAE and text encoder(s) every step;
- `PrecomputedInputs`: latents drawn from cached VAE distributions, cached text embeddings and first-frame
  conditioning (--enable_precomputation, ptrain/data/precompute.py);
- `SimulatedInputs`: latents of the configured shape and random text states of the encoders' shapes (the
  memory planner, on fake tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptrain.attention import kernel_context
from ptrain.data.video import to_unit_range
from ptrain.models.spec import Components, Conditioning, ModelSpec


@dataclass
class Inputs:
    latents: torch.Tensor
    cond: Conditioning
    #: The decoded clip (B, C, F, H, W) when the inputs were encoded this step (modes that condition on pixels).
    video: torch.Tensor | None = None


class EncodedInputs:
    """Video and captions encoded every step (the frozen encoders must be on the device)."""

    needs_encoders = True

    def __init__(self, spec: ModelSpec, comps: Components, device: torch.device, max_sequence_length: int):
        self.spec, self.comps, self.device, self.max_seq = spec, comps, device, max_sequence_length

    def __call__(self, batch: dict, generators: list[torch.Generator]) -> Inputs:
        spec, mode = self.spec, self.spec.mode
        video = to_unit_range(batch["video"].to(self.device, non_blocking=True))  # the loader sends uint8
        latents = spec.encode_video(self.comps, video, generators)
        if "first_frame" in batch and mode != "normal":
            video = video.clone()  # the dataset's first-frame images condition, the clip trains
            video[:, :, 0] = to_unit_range(batch["first_frame"].to(self.device, non_blocking=True)).to(video)
        images = {"images": video[:, :, 0]} if spec.text_needs_image(mode) else {}
        cond = spec.encode_text(self.comps, list(batch["caption"]), self.max_seq, **images)
        if spec.precomputes_condition(mode):
            cond.tensors.update(spec.image_condition(self.comps, video[:, :, 0], tuple(latents.shape)))
        return Inputs(latents, cond, video)


class PrecomputedInputs:
    """Latents drawn from the cached VAE posteriors, cached text embeddings and (i2v) the cached first-frame
    conditioning (ModelSpec.image_condition): the step needs no encoder."""

    needs_encoders = False

    def __init__(self, spec: ModelSpec, comps: Components, device: torch.device):
        self.spec, self.comps, self.device = spec, comps, device

    def __call__(self, batch: dict, generators: list[torch.Generator]) -> Inputs:
        # The loader pins its batches on CUDA: these copies do not block the host.
        dist_params = batch["latent_dist"].to(self.device, non_blocking=True)
        latents = self.spec.latents_from_dist(self.comps, dist_params, generators)
        cond = Conditioning({k.split(".", 1)[1]: v.to(self.device, non_blocking=True) for k, v in batch.items()
                             if k.startswith(("text.", "image."))})  # fmt: skip
        return Inputs(latents, cond)


class SimulatedInputs:
    """Latents of the shape the VAE gives a (B, 3, F, H, W) clip and random text states of the encoders' shapes
    (the memory planner: the transformer's step without text encoders). Made once, as a loader's batch would
    be before the step. i2v's first-frame conditioning is encoded on every call, as EncodedInputs does, or once
    here when `precomputed` (as the cache holds it)."""

    needs_encoders = False

    def __init__(self, spec: ModelSpec, comps: Components, device, video_shape, seq_len: int, text_dtype,
                 precomputed: bool = False):  # fmt: skip
        vae = comps.vae
        video = torch.zeros(tuple(video_shape), device=device, dtype=vae.dtype)
        with torch.no_grad():
            shape = vae.encode(video).latent_dist.mean.shape
        latents = torch.randn(shape, device=device, dtype=torch.float32)
        cond = spec.simulated_conditioning(comps.transformer.config, shape[0], seq_len, device, text_dtype)
        self.spec, self.comps, self.first = spec, comps, video[:, :, 0]
        self.each_call = spec.precomputes_condition(spec.mode) and not precomputed
        if spec.precomputes_condition(spec.mode) and precomputed:
            cond.tensors.update(spec.image_condition(comps, self.first, tuple(shape)))
        self.inputs = Inputs(latents, cond, video if spec.needs_pixels(spec.mode) else None)

    def __call__(self, batch: dict, generators: list[torch.Generator]) -> Inputs:
        if not self.each_call:
            return self.inputs
        x = self.inputs
        image = self.spec.image_condition(self.comps, self.first, tuple(x.latents.shape))
        return Inputs(x.latents, Conditioning({**x.cond.tensors, **image}), x.video)


def make_inputs(precomputed: bool, spec: ModelSpec, comps: Components, device, max_sequence_length: int):
    """The latent source of a run, chosen once from --enable_precomputation."""
    if precomputed:
        return PrecomputedInputs(spec, comps, device)
    return EncodedInputs(spec, comps, device, max_sequence_length)


@dataclass
class Prepared:
    """A micro-batch ready for the transformer: the objective's sample (noisy input, timesteps, target, weights,
    loss mask) and the conditioning; `tokens` is its transformer sequence length summed over the batch; `key`
    the target's shape without the batch dimension (ptrain/flops.py counts FLOPs per key)."""

    sample: object
    cond: Conditioning
    tokens: int
    batch: int = 1
    key: tuple = ()


class TrainStep:
    """The model-side work of one micro-batch. `accum` divides the loss (gradient accumulation); with context
    parallelism the backward scales by `cp`: cp ranks' gradients sum to the sample's gradient, and FSDP averages
    over dp_shard x cp."""

    def __init__(self, spec: ModelSpec, comps: Components, transformer, objective, inputs, cp: int = 1, accum: int = 1,
                 attention: str = "auto"):  # fmt: skip
        self.spec, self.comps, self.transformer, self.objective = spec, comps, transformer, objective
        self.inputs, self.cp, self.accum = inputs, cp, accum
        #: --attention_backend: only the transformer's forward and backward (AC recompute included) are held to it;
        #: the VAE and text encoders keep torch's choice
        self.kernels = kernel_context(attention)

    def prepare(self, batch: dict, generators: list[torch.Generator], strata=None) -> Prepared:
        """Inputs, the objective's noisy sample and the mode's conditioning (the encoders' part of the step)."""
        x = self.inputs(batch, generators)
        sample = self.objective.prepare(x.latents, generators, strata)
        cond = x.cond
        if self.spec.mode != "normal":
            sample, cond = self.spec.condition(self.spec.mode, self.comps, x.video, x.latents, sample, cond, generators)
        b = x.latents.shape[0]
        tokens = self.spec.tokens_per_sample(x.latents.shape, self.comps) * b
        return Prepared(sample, cond, tokens, b, tuple(sample.target.shape[1:]))

    def loss(self, p: Prepared) -> torch.Tensor:
        """Forward and loss, divided by the accumulation steps."""
        with self.kernels():
            pred = self.spec.forward(self.transformer, p.sample.noisy, p.sample.timesteps, p.cond)
        return self.objective.loss(pred, p.sample) / self.accum

    def backward(self, loss: torch.Tensor) -> None:
        with self.kernels():
            (loss * self.cp if self.cp > 1 else loss).backward()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to --max_grad_norm (0: no clipping, the norm is still measured); the global norm as a plain tensor."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def set_gradient_sync(transformer, dims, last: bool) -> None:
    """Gradient accumulation: sharded gradients (FSDP, HSDP) are reduce-scattered on every micro-batch, so they
    stay sharded (FSDP2 without sync would keep whole float32 gradients on every rank); HSDP skips only the
    all-reduce across replicas until the last one. DDP (replicate) syncs on the last micro-batch only."""
    if not hasattr(transformer, "set_requires_gradient_sync"):  # one process: a plain module
        return
    if dims.dp_shard * dims.cp > 1:
        transformer.set_requires_all_reduce(last)
    else:
        transformer.set_requires_gradient_sync(last)
