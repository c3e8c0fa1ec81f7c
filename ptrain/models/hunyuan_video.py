"""HunyuanVideo: HunyuanVideoTransformer3DModel + AutoencoderKLHunyuanVideo + Llama (prompt template) + CLIP.

Text goes through the pipeline's own encode_prompt (Llama hidden states with
the prompt template cropped, CLIP pooled projection), latents are scaled by the
VAE scaling factor, the guidance embedding gets 1000 x TRAIN_GUIDANCE as at
inference with guidance 1, and the objective is flow matching with the
scheduler's shift (7.0 for the released model) unless --flow_shift is given.
Double-stream and single-stream blocks are sharded / checkpointed per block.

--train_mode i2v trains HunyuanVideo-I2V (`image_condition_type` latent_concat) as HunyuanVideoImageToVideoPipeline
samples it: the text encoder is a Llava that reads the first frame into the prompt, and the input is the noisy
latents, the first frame's latents (zero after it), then a 1-channel keep mask (16 + 16 + 1 = 33 channels).
--train_mode inpaint uses the same input layout with a random mask and the Llama text encoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
    DEFAULT_PROMPT_TEMPLATE as IMAGE_PROMPT_TEMPLATE,
)
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPTextModel, LlamaModel, LlavaForConditionalGeneration

from ptrain.errors import ConfigError
from ptrain.export_comfyui import Rule
from ptrain.models.conditioning import uint8_images
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
    attention_masks = ("bool",)  # joint attention over video and padded text
    #: x_embedder tokens; RoPE (N, D) pairs; double- and single-stream joint attention over [video; text]
    #: with the text padding mask (the token refiner's text self-attention is not split).
    cp_plan = CPPlan(
        split="x_embedder", split_kind="tokens", rotary=(("rope", 0),),
        attention=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"), text="suffix",
    )  # fmt: skip
    default_max_sequence_length = 256
    block_count_keys = ("num_layers", "num_single_layers")
    fps = 24
    train_modes = ("normal", "i2v", "inpaint")
    i2v_pipeline_cls = HunyuanVideoImageToVideoPipeline
    i2v_needs_pixels = True
    optional_components = {"image_processor": CLIPImageProcessor}
    input_layer = "x_embedder.proj"

    def checkpoint_classes(self, path):
        """A HunyuanVideo-I2V checkpoint's text encoder is a LlavaForConditionalGeneration (model_index.json)."""
        index = Path(path) / "model_index.json"
        listed = json.loads(index.read_text()).get("text_encoder", [None, None]) if index.is_file() else [None, None]
        if listed[-1] == LlavaForConditionalGeneration.__name__:
            return {**self.component_classes, "text_encoder": LlavaForConditionalGeneration}
        return self.component_classes

    def mode_in_channels(self, mode, components) -> int:
        c = self.latent_channels(components)
        return c if mode == "normal" else 2 * c + 1

    def text_needs_image(self, mode: str) -> bool:
        return mode == "i2v"

    def check_mode(self, mode, components, training_type) -> str | None:
        if mode not in self.train_modes:
            return super().check_mode(mode, components, training_type)  # names the modes it trains
        if components.transformer.config.get("image_condition_type") == "token_replace":
            raise ConfigError(
                "this HunyuanVideo transformer is image-to-video with image_condition_type token_replace, which "
                "ptrain does not train yet (latent_concat checkpoints train with --train_mode i2v)"
            )
        llava = isinstance(components.text_encoder, LlavaForConditionalGeneration)
        if mode == "i2v" and not (llava and "image_processor" in components.extra):
            raise ConfigError(
                "--train_mode i2v for HunyuanVideo needs HunyuanVideo-I2V's text encoder, a Llava that reads the "
                "first frame into the prompt (text_encoder: LlavaForConditionalGeneration, plus image_processor/); "
                "this checkpoint has a Llama text encoder: train --train_mode inpaint from it instead"
            )
        if mode != "i2v" and llava:
            raise ConfigError(
                f"this HunyuanVideo checkpoint's text encoder reads an image with the prompt (HunyuanVideo-I2V): "
                f"train it with --train_mode i2v, not {mode}"
            )
        return super().check_mode(mode, components, training_type)

    def image_condition(self, components, first, latent_shape):
        """i2v as the I2V pipeline's latent_concat input: the first frame encoded alone (posterior mode), zero
        latent frames after it, and the keep mask (1 on the first latent frame), as `concat_latents`."""
        b, _, f, h, w = latent_shape
        image = self.condition_latents(components, first[:, :, None].float())
        given = torch.cat([image, image.new_zeros(b, image.shape[1], f - 1, h, w)], dim=2)
        latent_keep = torch.zeros_like(given[:, :1])
        latent_keep[:, :, 0] = 1
        return {"concat_latents": torch.cat([given, latent_keep], dim=1)}

    def condition(self, mode, components, video, latents, prepared, cond, generators):
        """[noisy latents, conditioning latents, keep mask] on channels, the I2V pipeline's latent_concat input.
        i2v: image_condition's, already in `cond` (computed this step or precomputed). inpaint: the latents of the
        video with the generated pixels zeroed, and the random keep mask."""
        if mode != "inpaint":
            return prepared, cond
        keep, latent_keep = self.keep_masks(mode, components, video, latents, generators)
        given = self.condition_latents(components, video.float() * keep).to(latents)
        return prepared, Conditioning(dict(cond.tensors, concat_latents=torch.cat([given, latent_keep], dim=1)))

    def check_shape(self, num_frames, height, width, components) -> None:
        t = components.vae.temporal_compression_ratio
        s = components.vae.spatial_compression_ratio * components.transformer.config.patch_size
        if (num_frames - 1) % t:
            raise ConfigError(f"--num_frames {num_frames}: HunyuanVideo needs {t}k+1 frames (e.g. 33, 49, 129)")
        for flag, v in (("--height", height), ("--width", width)):
            if v % s:
                raise ConfigError(f"{flag} {v}: HunyuanVideo needs a multiple of {s}")

    def encode_text(self, components, captions, max_sequence_length, images=None) -> Conditioning:
        """Llama states with the prompt template cropped, CLIP pooled projection. With `images` (i2v: first frames
        (B, 3, H, W) in [-1, 1]), the I2V pipeline's Llava reads each image into its prompt."""
        if images is not None:
            interleave = self.image_interleave(components.transformer.config)
            with torch.no_grad():
                embeds, pooled, mask = self.sampling_pipe.encode_prompt(
                    image=uint8_images(images), prompt=captions,
                    device=components.text_encoder.device, max_sequence_length=max_sequence_length,
                    image_embed_interleave=interleave,
                )  # fmt: skip
            return Conditioning(
                {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled}
            )
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompt=captions, prompt_2=None, device=components.text_encoder.device,
            max_sequence_length=max_sequence_length,
        )  # fmt: skip
        return Conditioning(
            {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled}
        )

    @staticmethod
    def image_interleave(config) -> int:
        """How sparsely the I2V pipeline keeps the image's prompt tokens (its image_embed_interleave)."""
        return 4 if config.get("image_condition_type") == "token_replace" else 2

    def normalize_latents(self, components, latents) -> torch.Tensor:
        return latents * components.vae.config.scaling_factor

    def prompt_image_tokens(self, mode, config=None) -> int:
        """The Llava prompt's image tokens (every 2nd of 576 for latent_concat, the only I2V type trained; every 4th
        for token_replace), less the 4 template tokens the pipeline crops."""
        if mode != "i2v":
            return 0
        return IMAGE_PROMPT_TEMPLATE["image_emb_len"] // self.image_interleave(config or {}) - 4

    def simulated_conditioning(self, config, batch, seq_len, device, dtype) -> Conditioning:
        seq_len += self.prompt_image_tokens(self.mode, config)  # the Llava prompt: the image's tokens, then the text
        cond = super().simulated_conditioning(config, batch, seq_len, device, dtype)
        cond.tensors["encoder_attention_mask"] = torch.ones(batch, seq_len, device=device, dtype=torch.long)
        cond.tensors["pooled_projections"] = torch.randn(
            batch, config["pooled_projection_dim"], device=device, dtype=dtype
        )
        return cond

    def forward(self, transformer: nn.Module, noisy_latents, timesteps, cond) -> torch.Tensor:
        guidance = torch.full((noisy_latents.shape[0],), TRAIN_GUIDANCE * 1000.0, device=noisy_latents.device)
        x = self.model_input(noisy_latents, cond)
        return transformer(
            hidden_states=x,
            timestep=timesteps,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_attention_mask=cond.tensors["encoder_attention_mask"],
            pooled_projections=cond.tensors["pooled_projections"],
            guidance=guidance,
            return_dict=False,
        )[0]

    def comfyui_lora_rules(self, config) -> list[Rule]:
        """Original HunyuanVideo names as ComfyUI's LoRA loader takes them for this model (comfy/lora.py
        `model_lora_keys_unet`, HunyuanVideo branch: `diffusion_model.double_blocks.N.img_attn_qkv`, `img_mod.linear`,
        `img_mlp.fc1`, `single_blocks.N.linear1`, `modulation.linear`, ...). q/k/v are one fused Linear in the
        original model (and the MLP input joins them in `linear1`), so those LoRAs are fused exactly. The
        timestep/guidance/text MLP embedders use ComfyUI's own `in_layer`/`out_layer`
        (comfy/ldm/hunyuan_video/model.py), which its loader matches directly."""
        inner = config["num_attention_heads"] * config["attention_head_dim"]
        mlp = int(inner * config["mlp_ratio"])
        qkv = ("to_q", "to_k", "to_v")
        d, s = r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\."
        r = r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\."
        rt = r"txt_in.individual_token_refiner.blocks.\1."
        rules = [
            Rule(d + r"attn\.(?P<part>to_q|to_k|to_v)", r"double_blocks.\1.img_attn_qkv", qkv, (inner,) * 3),
            Rule(
                d + r"attn\.(?P<part>add_q_proj|add_k_proj|add_v_proj)",
                r"double_blocks.\1.txt_attn_qkv",
                ("add_q_proj", "add_k_proj", "add_v_proj"),
                (inner,) * 3,
            ),  # fmt: skip
            Rule(d + r"attn\.to_out\.0", r"double_blocks.\1.img_attn_proj"),
            Rule(d + r"attn\.to_add_out", r"double_blocks.\1.txt_attn_proj"),
            Rule(d + r"norm1\.linear", r"double_blocks.\1.img_mod.linear"),
            Rule(d + r"norm1_context\.linear", r"double_blocks.\1.txt_mod.linear"),
            Rule(d + r"ff\.net\.0\.proj", r"double_blocks.\1.img_mlp.fc1"),
            Rule(d + r"ff\.net\.2", r"double_blocks.\1.img_mlp.fc2"),
            Rule(d + r"ff_context\.net\.0\.proj", r"double_blocks.\1.txt_mlp.fc1"),
            Rule(d + r"ff_context\.net\.2", r"double_blocks.\1.txt_mlp.fc2"),
            Rule(
                s + r"(?P<part>attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)",
                r"single_blocks.\1.linear1",
                ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
                (inner, inner, inner, mlp),
            ),  # fmt: skip
            Rule(s + r"proj_out", r"single_blocks.\1.linear2"),
            Rule(s + r"norm\.linear", r"single_blocks.\1.modulation.linear"),
            Rule(r + r"attn\.(?P<part>to_q|to_k|to_v)", rt + "self_attn_qkv", qkv, (inner,) * 3),
            Rule(r + r"attn\.to_out\.0", rt + "self_attn_proj"),
            Rule(r + r"ff\.net\.0\.proj", rt + "mlp.fc1"),
            Rule(r + r"ff\.net\.2", rt + "mlp.fc2"),
            Rule(r + r"norm_out\.linear", rt + "adaLN_modulation.1"),
            Rule(r"context_embedder\.proj_in", "txt_in.input_embedder"),
            Rule(r"x_embedder\.proj", "img_in.proj"),
            # diffusers' AdaLayerNormContinuous gives (scale, shift), the original final layer (shift, scale).
            Rule(r"norm_out\.linear", "final_layer.adaLN_modulation.1", swap_halves=True),
            Rule(r"proj_out", "final_layer.linear"),
        ]
        for ours, theirs in (
            ("context_embedder.time_text_embed.timestep_embedder", "txt_in.t_embedder"),
            ("context_embedder.time_text_embed.text_embedder", "txt_in.c_embedder"),
            ("time_text_embed.timestep_embedder", "time_in"),
            ("time_text_embed.guidance_embedder", "guidance_in"),
            ("time_text_embed.text_embedder", "vector_in"),
        ):
            rules += [Rule(re.escape(ours) + r"\.linear_1", theirs + ".in_layer"),
                      Rule(re.escape(ours) + r"\.linear_2", theirs + ".out_layer")]  # fmt: skip
        return rules
