"""HunyuanVideo: HunyuanVideoTransformer3DModel + AutoencoderKLHunyuanVideo + Llama (prompt template) + CLIP.

Text goes through the pipeline's own encode_prompt (Llama hidden states with
the prompt template cropped, CLIP pooled projection), latents are scaled by the
VAE scaling factor, the guidance embedding gets 1000 x TRAIN_GUIDANCE as at
inference with guidance 1, and the objective is flow matching with the
scheduler's shift (7.0 for the released model) unless --flow_shift is given.
Double-stream and single-stream blocks are sharded / checkpointed per block.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from torch import nn
from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

from ptrain.config import ConfigError
from ptrain.models.spec import Conditioning, ModelSpec, register
from ptrain.parallel.context import CPPlan

#: Distilled-guidance value embedded during training (finetrainers and musubi-tuner train with 1.0).
TRAIN_GUIDANCE = 1.0


@register
class HunyuanVideoSpec(ModelSpec):
    name = "hunyuan_video"
    pipeline_cls = HunyuanVideoPipeline
    transformer_cls = HunyuanVideoTransformer3DModel
    component_classes = {
        "transformer": HunyuanVideoTransformer3DModel,
        "vae": AutoencoderKLHunyuanVideo,
        "text_encoder": LlamaModel,
        "tokenizer": AutoTokenizer,
        "text_encoder_2": CLIPTextModel,
        "tokenizer_2": AutoTokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    default_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    block_attrs = ("transformer_blocks", "single_transformer_blocks")
    #: x_embedder tokens; RoPE (N, D) pairs; double- and single-stream joint attention over [video; text]
    #: with the text padding mask (the token refiner's text self-attention is not split).
    cp_plan = CPPlan(
        split="x_embedder", split_kind="tokens", rotary=(("rope", 0),),
        attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"), text="suffix",
    )  # fmt: skip
    default_max_sequence_length = 256
    block_count_keys = ("num_layers", "num_single_layers")
    fps = 24

    def check_shape(self, num_frames, height, width, components) -> None:
        t = components.vae.temporal_compression_ratio
        s = components.vae.spatial_compression_ratio * components.transformer.config.patch_size
        if (num_frames - 1) % t:
            raise ConfigError(f"--num_frames {num_frames}: HunyuanVideo needs {t}k+1 frames (e.g. 33, 49, 129)")
        for flag, v in (("--height", height), ("--width", width)):
            if v % s:
                raise ConfigError(f"{flag} {v}: HunyuanVideo needs a multiple of {s}")

    def encode_text(self, components, captions, max_sequence_length) -> Conditioning:
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, device=components.text_encoder.device,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        return Conditioning(
            {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled}
        )

    def encode_video(self, components, video, generators) -> torch.Tensor:
        return self.sample_latents(components, video, generators) * components.vae.config.scaling_factor

    def simulated_conditioning(self, config, batch, seq_len, device, dtype) -> Conditioning:
        cond = super().simulated_conditioning(config, batch, seq_len, device, dtype)
        cond.tensors["encoder_attention_mask"] = torch.ones(batch, seq_len, device=device, dtype=torch.long)
        cond.tensors["pooled_projections"] = torch.randn(batch, config["pooled_projection_dim"], device=device, dtype=dtype)
        return cond

    def forward(self, transformer: nn.Module, noisy_latents, timesteps, cond) -> torch.Tensor:
        guidance = torch.full((noisy_latents.shape[0],), TRAIN_GUIDANCE * 1000.0, device=noisy_latents.device)
        return transformer(
            hidden_states=noisy_latents,
            timestep=timesteps,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_attention_mask=cond.tensors["encoder_attention_mask"],
            pooled_projections=cond.tensors["pooled_projections"],
            guidance=guidance,
            return_dict=False,
        )[0]
