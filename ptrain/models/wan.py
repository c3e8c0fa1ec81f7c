"""Wan 2.1: WanTransformer3DModel + AutoencoderKLWan + UMT5 (+ CLIP vision for I2V), flow matching.

Latents are normalised with the VAE's latents_mean / latents_std exactly as
WanPipeline undoes it; text goes through the pipeline's encode_prompt (zero-padded
UMT5 states). The default flow shift is the scheduler's `flow_shift` (3.0 for
the released 1.3B / 14B T2V configs). Modules diffusers keeps in float32
(`_keep_in_fp32_modules`) keep a float32 compute dtype under FSDP2.

Image-to-video and inpaint use WanImageToVideoPipeline's layout: noisy latents, a 4-channel keep mask (the
pixel frames behind each latent frame) and the latents of the conditioning video, 16 + 4 + 16 = 36 input
channels; a transformer with `image_dim` (Wan 2.1 I2V) also gets the CLIP image embeddings of the first frame.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, UMT5EncoderModel

from ptrain.errors import ConfigError
from ptrain.export_comfyui import Rule
from ptrain.models.conditioning import uint8_images
from ptrain.models.spec import Conditioning, ModelSpec, register
from ptrain.parallel.context import CPPlan


@register
class WanSpec(ModelSpec):
    name = "wan"
    pipeline_cls = WanPipeline
    transformer_cls = WanTransformer3DModel
    component_classes = {
        "transformer": WanTransformer3DModel,
        "vae": AutoencoderKLWan,
        "text_encoder": UMT5EncoderModel,
        "tokenizer": AutoTokenizer,
        "scheduler": UniPCMultistepScheduler,
    }
    optional_components = {"image_encoder": CLIPVisionModel, "image_processor": CLIPImageProcessor}
    default_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    block_attrs = ("blocks",)
    text_dim_key = "text_dim"
    #: The Conv3d patch embedding's grid output (flattened by the model); RoPE (1, N, 1, D) pairs; per-token
    #: timesteps (Wan 2.2 style) when given; attn2 is cross-attention to text/image (not split).
    cp_plan = CPPlan(
        split="patch_embedding", split_kind="grid", rotary=(("rope", 1),), token_kwargs=(("timestep", 1),),
        attention=("blocks.*.attn1",),
    )  # fmt: skip
    default_max_sequence_length = 512
    train_modes = ("normal", "i2v", "inpaint")
    i2v_pipeline_cls = WanImageToVideoPipeline
    inpaint_pipeline_cls = WanImageToVideoPipeline
    i2v_needs_pixels = True
    input_layer = "patch_embedding"

    def temporal_ratio(self, components) -> int:
        return 2 ** sum(components.vae.config.temperal_downsample)

    @staticmethod
    def expands_timesteps(components) -> bool:
        """Wan 2.2 TI2V (`expand_timesteps` in model_index.json): a timestep per video token, and image-to-video by
        a clean first latent frame whose tokens get timestep 0, as LTX-Video conditions (no extra channels)."""
        return bool(components.settings.get("expand_timesteps"))

    def mode_in_channels(self, mode, components) -> int:
        c = self.latent_channels(components)
        if mode == "normal" or self.expands_timesteps(components):
            return c
        return 2 * c + self.temporal_ratio(components)

    def check_mode(self, mode, components, training_type) -> str | None:
        if mode == "inpaint" and self.expands_timesteps(components):
            raise ConfigError(
                "--train_mode inpaint: this Wan 2.2 TI2V checkpoint (expand_timesteps) conditions by clean first-"
                "frame tokens, and diffusers has no pipeline that samples an inpaint layout for it; use --train_mode "
                "i2v or normal"
            )
        expanded = super().check_mode(mode, components, training_type)
        image_dim = components.transformer.config.get("image_dim")
        if mode != "normal" and image_dim and "image_encoder" not in components.extra:
            raise ConfigError(
                f"this Wan transformer takes CLIP image embeddings (image_dim={image_dim}) but the checkpoint has "
                "no image_encoder/ and image_processor/ folders (a Wan 2.1 I2V checkpoint has them)"
            )
        return expanded

    def image_condition(self, components, first, latent_shape):
        """i2v as WanImageToVideoPipeline prepares its input. Wan 2.1: the keep mask of the first frame packed 4
        pixel frames per latent frame and the latents (posterior mode, normalised) of the first frame followed by
        zero frames, as `concat_latents`; with `image_dim`, the CLIP embeddings of the first frame. Wan 2.2 TI2V
        (expand_timesteps): the first frame's latents, which condition() makes clean tokens."""
        from ptrain.models.conditioning import latent_keep_mask

        if self.expands_timesteps(components):
            return super().image_condition(components, first, latent_shape)
        b, _, f, h, w = latent_shape
        t = self.temporal_ratio(components)
        pixels = first.new_zeros(b, 3, (f - 1) * t + 1, *first.shape[-2:], dtype=torch.float32)
        pixels[:, :, 0] = first.float()
        keep = torch.zeros_like(pixels[:, :1])
        keep[:, :, 0] = 1.0
        latent_keep = latent_keep_mask(keep, tuple(latent_shape), t, packed=True)
        given = self.condition_latents(components, pixels)
        tensors = {"concat_latents": torch.cat([latent_keep.to(given), given], dim=1)}
        if components.transformer.config.get("image_dim"):
            tensors["encoder_hidden_states_image"] = self.image_embeds(components, first)
        return tensors

    def image_embeds(self, components, frames: torch.Tensor) -> torch.Tensor:
        """CLIP image embeddings of first frames (B, 3, H, W) in [-1, 1], as the pipeline's encode_image makes them
        (its processor on the uint8 frames); the memory planner's fake frames get the encoder's work on a processed
        image's shape."""
        with torch.no_grad():
            if is_fake(frames):
                size = self.sampling_pipe.image_processor.crop_size
                encoder = components.extra["image_encoder"]
                image = torch.zeros(frames.shape[0], 3, size["height"], size["width"], device=frames.device,
                                    dtype=encoder.dtype)  # fmt: skip
                return encoder(pixel_values=image, output_hidden_states=True).hidden_states[-2]
            return self.sampling_pipe.encode_image(uint8_images(frames), frames.device)

    def condition(self, mode, components, video, latents, prepared, cond, generators):
        """i2v: image_condition's tensors, already in `cond` (computed this step or precomputed); for Wan 2.2 TI2V
        the first latent frame is clean, its tokens get timestep 0 and it is left out of the loss. inpaint as
        WanImageToVideoPipeline's layout with a random keep mask: the mask packed 4 pixel frames per latent frame,
        and the latents of the video with the generated pixels zeroed; with `image_dim`, CLIP embeddings of the
        given first-frame pixels."""
        if mode == "normal":
            return prepared, cond
        if mode == "i2v":
            if not self.expands_timesteps(components):
                return prepared, cond
            keep = self.first_frame_keep(latents)  # WanImageToVideoPipeline with expand_timesteps
            first = cond.tensors["first_latents"].to(latents)  # broadcast over F
            p = components.transformer.config.patch_size
            token_keep = keep[:, 0, :: p[0], :: p[1], :: p[2]].flatten(1)  # (B, N), the pipeline's mask[:, ::2, ::2]
            return self.clean_given(prepared, keep, first, token_keep), cond.without("first_latents")
        keep, latent_keep = self.keep_masks(mode, components, video, latents, generators, packed=True)
        pixels = video.float() * keep
        given = self.condition_latents(components, pixels)
        tensors = dict(cond.tensors, concat_latents=torch.cat([latent_keep, given.to(latents)], dim=1))
        if components.transformer.config.get("image_dim"):
            tensors["encoder_hidden_states_image"] = self.image_embeds(components, pixels[:, :, 0])
        return prepared, Conditioning(tensors)

    def check_shape(self, num_frames, height, width, components) -> None:
        vae = components.vae.config
        t = 2 ** sum(vae.temperal_downsample)
        # the VAE's spatial factor: 8, or 16 for Wan 2.2's (which patchifies by 2 before its 8x encoder)
        s = int(vae.get("scale_factor_spatial") or 2 ** len(vae.temperal_downsample))
        s *= components.transformer.config.patch_size[-1]
        if (num_frames - 1) % t:
            raise ConfigError(f"--num_frames {num_frames}: Wan needs {t}k+1 frames (e.g. 33, 81)")
        for flag, v in (("--height", height), ("--width", width)):
            if v % s:
                raise ConfigError(f"{flag} {v}: Wan needs a multiple of {s}")

    def make_objective(self, args, components):
        from ptrain.objectives import FlowMatching

        shift = args.flow_shift if args.flow_shift is not None else components.scheduler.config.get("flow_shift", 1.0)
        return FlowMatching(args, float(shift))

    def encode_text(self, components, captions, max_sequence_length, images=None) -> Conditioning:
        return Conditioning({"encoder_hidden_states": self.prompt_embeds(components, captions, max_sequence_length)})

    def normalize_latents(self, components, latents) -> torch.Tensor:
        from ptrain.objectives import to_device

        # from the config's lists on the host each micro-batch: staged pinned, so no copy waits for the GPU
        c = components.vae.config
        mean = to_device(torch.tensor(c.latents_mean), latents.device).view(1, -1, 1, 1, 1)
        std = to_device(torch.tensor(c.latents_std), latents.device).view(1, -1, 1, 1, 1)
        return (latents - mean) / std

    def on_bind(self, components) -> None:
        self._expand = self.expands_timesteps(components)
        self._patch = tuple(components.transformer.config.patch_size)

    def forward(self, transformer: nn.Module, noisy_latents, timesteps, cond) -> torch.Tensor:
        x = self.model_input(noisy_latents, cond)
        if getattr(self, "_expand", False) and timesteps.ndim == 1:  # the pipeline's per-token timesteps
            b, _, f, h, w = x.shape
            p = self._patch
            timesteps = timesteps.view(b, 1).expand(b, (f // p[0]) * (h // p[1]) * (w // p[2]))
        return transformer(
            hidden_states=x,
            timestep=timesteps,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_hidden_states_image=cond.tensors.get("encoder_hidden_states_image"),
            return_dict=False,
        )[0]

    def comfyui_lora_rules(self, config) -> list[Rule]:
        """The original Wan 2.1 names ComfyUI's Wan model uses (comfy/ldm/wan/model.py; the renames of diffusers'
        `convert_wan_transformer_to_diffusers` reversed): self_attn / cross_attn q, k, v, o, ffn.0 / ffn.2, ..."""
        b = r"blocks\.(\d+)\."
        return [
            Rule(b + r"attn1\.to_(q|k|v)", r"blocks.\1.self_attn.\2"),
            Rule(b + r"attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
            Rule(b + r"attn2\.to_(q|k|v)", r"blocks.\1.cross_attn.\2"),
            Rule(b + r"attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
            Rule(b + r"attn2\.add_(k|v)_proj", r"blocks.\1.cross_attn.\2_img"),
            Rule(b + r"ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
            Rule(b + r"ffn\.net\.2", r"blocks.\1.ffn.2"),
            Rule(r"condition_embedder\.(time|text)_embedder\.linear_1", r"\1_embedding.0"),
            Rule(r"condition_embedder\.(time|text)_embedder\.linear_2", r"\1_embedding.2"),
            Rule(r"condition_embedder\.time_proj", "time_projection.1"),
            Rule(r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
            Rule(r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
            Rule(r"proj_out", "head.head"),
            Rule(r"patch_embedding", "patch_embedding"),
        ]
