"""LTX-Video: LTXVideoTransformer3DModel + AutoencoderKLLTXVideo + T5, flow matching.

Conditioning and latent handling follow diffusers' LTXPipeline so that trained
weights behave the same there: T5 embeddings padded to max_sequence_length with
an attention mask, latents normalised with the VAE's mean/std and packed into a
token sequence, RoPE interpolation scale from the VAE compression ratios.
"""

from __future__ import annotations

import torch

from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)
from torch import nn
from transformers import AutoTokenizer, T5EncoderModel

from ptrain.errors import ConfigError
from ptrain.export_comfyui import Rule
from ptrain.models.spec import Components, Conditioning, ModelSpec, register
from ptrain.parallel.context import CPPlan


@register
class LTXVideoSpec(ModelSpec):
    name = "ltx_video"
    pipeline_cls = LTXPipeline
    transformer_cls = LTXVideoTransformer3DModel
    component_classes = {
        "transformer": LTXVideoTransformer3DModel,
        "vae": AutoencoderKLLTXVideo,
        "text_encoder": T5EncoderModel,
        "tokenizer": AutoTokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    }
    default_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    block_attrs = ("transformer_blocks",)
    attention_masks = ("none", "additive")  # self-attention; cross-attention to padded text
    #: Packed tokens after proj_in; RoPE (B, N, D) pairs; per-token timesteps (B, N) when given; attn2 is
    #: cross-attention to text (not split).
    cp_plan = CPPlan(
        split="proj_in", split_kind="tokens", rotary=(("rope", 1),), token_kwargs=(("timestep", 1),),
        attention=("transformer_blocks.*.attn1",),
    )  # fmt: skip
    default_max_sequence_length = 128
    text_dim_key = "caption_channels"
    #: LTXPipeline's default frame rate; sets the temporal RoPE interpolation scale.
    frame_rate = 25
    fps = 25
    train_modes = ("normal", "i2v", "inpaint")
    i2v_pipeline_cls = LTXImageToVideoPipeline
    #: LTX conditions by clean tokens, not by channels: an inpaint model samples from a first frame with the
    #: image-to-video pipeline.
    inpaint_pipeline_cls = LTXImageToVideoPipeline
    input_layer = "proj_in"

    def condition(self, mode, components, video, latents, prepared, cond, generators):
        """LTX-Video's own conditioning (LTXImageToVideoPipeline, LTXConditionPipeline): given latent cells are
        clean, their tokens get timestep 0 (per-token timesteps t * (1 - mask)), and the loss leaves them out.
        i2v gives the first latent frame: the first frame (or the dataset's first-frame image) encoded alone, the
        causal VAE's first latent frame (image_condition, in `cond`: computed this step or precomputed). inpaint
        gives the cells a random keep mask covers entirely, from the latents of the video with its generated part
        zeroed (what the pipeline would encode); no input channels are added, so the model keeps working in LTX's
        pipelines."""
        if mode == "normal":
            return prepared, cond
        if mode == "i2v":
            keep = self.first_frame_keep(latents)
            given = torch.cat([cond.tensors["first_latents"].to(latents), latents[:, :, 1:]], dim=2)
            cond = cond.without("first_latents")
        else:
            pixels, keep = self.keep_masks(mode, components, video, latents, generators)
            given = self.condition_latents(components, video.float() * pixels).to(latents)
        cfg = components.transformer.config
        token_keep = LTXPipeline._pack_latents(keep, cfg.patch_size, cfg.patch_size_t).squeeze(-1)  # (B, N)
        return self.clean_given(prepared, keep, given, token_keep), cond

    def check_shape(self, num_frames, height, width, components) -> None:
        vae = components.vae
        s, t = vae.spatial_compression_ratio, vae.temporal_compression_ratio
        p = components.transformer.config.patch_size
        if (num_frames - 1) % t:
            raise ConfigError(
                f"--num_frames {num_frames}: LTX-Video needs {t}k+1 frames (e.g. {t + 1}, {4 * t + 1}, {6 * t + 1})"
            )
        for flag, v in (("--height", height), ("--width", width)):
            if v % (s * p):
                raise ConfigError(f"{flag} {v}: LTX-Video needs a multiple of {s * p} (VAE x patch size)")

    def encode_text(self, components, captions, max_sequence_length, images=None) -> Conditioning:
        embeds, mask, _, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            device=components.text_encoder.device,
        )  # fmt: skip
        return Conditioning({"encoder_hidden_states": embeds, "encoder_attention_mask": mask})

    def normalize_latents(self, components, latents) -> torch.Tensor:
        from ptrain.objectives import to_device

        # the VAE's buffers sit on the host once precomputation has offloaded it: copied pinned, non-blocking (a
        # pageable copy would make the host wait for the GPU every micro-batch)
        vae = components.vae
        mean, std = (to_device(x, latents.device) for x in (vae.latents_mean, vae.latents_std))
        return LTXPipeline._normalize_latents(latents, mean, std, vae.config.scaling_factor)

    def forward(self, transformer: nn.Module, noisy_latents, timesteps, cond) -> torch.Tensor:
        b, c, f, h, w = noisy_latents.shape
        cfg = transformer.config
        p, pt = cfg.patch_size, cfg.patch_size_t
        tokens = LTXPipeline._pack_latents(noisy_latents, p, pt)
        vae_t, vae_s = self._vae_ratios
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            timestep=timesteps,
            encoder_attention_mask=cond.tensors["encoder_attention_mask"],
            num_frames=f // pt,
            height=h // p,
            width=w // p,
            rope_interpolation_scale=(vae_t / self.frame_rate, vae_s, vae_s),
            return_dict=False,
        )[0]
        return LTXPipeline._unpack_latents(out, f // pt, h // p, w // p, p, pt)

    def simulated_conditioning(self, config, batch, seq_len, device, dtype) -> Conditioning:
        cond = super().simulated_conditioning(config, batch, seq_len, device, dtype)
        cond.tensors["encoder_attention_mask"] = torch.ones(batch, seq_len, device=device, dtype=dtype)
        return cond

    def on_bind(self, components: Components) -> None:
        self._vae_ratios = (components.vae.temporal_compression_ratio, components.vae.spatial_compression_ratio)

    def comfyui_lora_rules(self, config) -> list[Rule]:
        """ComfyUI's LTXV model (comfy/ldm/lightricks/model.py in Comfy-Org/ComfyUI) keeps the original LTX-Video
        names: blocks as in diffusers, `patchify_proj` for proj_in and `adaln_single` for time_embed (the
        renames diffusers' `convert_ltx_transformer_checkpoint_to_diffusers` undoes)."""
        block = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
        return [
            Rule(block, r"\g<0>"),
            Rule(r"proj_in", "patchify_proj"),
            Rule(r"time_embed\.(emb\.timestep_embedder\.linear_[12]|linear)", r"adaln_single.\1"),
            Rule(r"caption_projection\.linear_[12]|proj_out", r"\g<0>"),
        ]
