"""CogVideoX (2B / 5B / 1.5): CogVideoXTransformer3DModel + AutoencoderKLCogVideoX + T5, v-prediction.

Follows diffusers' CogVideoX pipeline and LoRA trainer: latents scaled by the VAE
scaling factor and fed as (B, F, C, H, W); text padded to the transformer's
max_text_seq_length; 3D RoPE from the pipeline when the config uses rotary
embeddings (5B, 1.5); v-prediction with the checkpoint's scheduler (snr shift
included) and the trainer's 1 / (1 - alpha_bar) loss weighting.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from torch import nn
from transformers import AutoTokenizer, T5EncoderModel

from ptrain.errors import ConfigError, FixedSizeError
from ptrain.export_comfyui import Rule
from ptrain.models.spec import Conditioning, ModelSpec, register
from ptrain.objectives import sample_posterior, to_device
from ptrain.parallel.context import CPPlan


@register
class CogVideoXSpec(ModelSpec):
    name = "cogvideox"
    pipeline_cls = CogVideoXPipeline
    transformer_cls = CogVideoXTransformer3DModel
    component_classes = {
        "transformer": CogVideoXTransformer3DModel,
        "vae": AutoencoderKLCogVideoX,
        "text_encoder": T5EncoderModel,
        "tokenizer": AutoTokenizer,
        "scheduler": CogVideoXDDIMScheduler,
    }
    default_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    block_attrs = ("transformer_blocks",)
    #: patch_embed returns [text; video] tokens; RoPE comes in as a forward argument (N, D) pair; joint
    #: attention over [text; video] with the text replicated on every cp rank.
    cp_plan = CPPlan(
        split="patch_embed", split_kind="text_prefix", token_kwargs=(("image_rotary_emb", 0),),
        attention=("transformer_blocks.*.attn1",), text="prefix",
    )  # fmt: skip
    default_max_sequence_length = 226
    fps = 8
    train_modes = ("normal", "i2v", "inpaint")
    i2v_pipeline_cls = CogVideoXImageToVideoPipeline
    i2v_needs_pixels = True
    i2v_precomputable = False  # the image is noised anew every step
    input_layer = "patch_embed.proj"

    def mode_in_channels(self, mode, components) -> int:
        """i2v: noise + image latents (CogVideoX-5b-I2V: 32). inpaint: noise + mask + masked-video latents
        (CogVideoX-Fun InP: 33)."""
        c = self.latent_channels(components)
        return {"normal": c, "i2v": 2 * c, "inpaint": 2 * c + 1}[mode]

    def condition(self, mode, components, video, latents, prepared, cond, generators):
        """i2v as diffusers' CogVideoX image-to-video trainer and pipeline: the first frame, with a little noise
        (sigma = exp(N(-3, 0.5)) per sample), encoded by the VAE and scaled as the pipeline does, then zero
        latent frames after it. `ofs` = 2 where the config has the embedding (1.5-I2V), as the pipeline passes it.
        inpaint: CogVideoX-Fun InP's input, as VideoX-Fun trains and samples it (scripts/cogvideox_fun/train.py,
        CogVideoX_Fun_Pipeline_Inpaint): the latent keep mask and the latents of the video with its generated
        pixels set to -1 (black), both times the VAE's scaling factor; all zeros where nothing is given (the
        pipeline's text-to-video input). forward concatenates them to the noisy latents on channels."""
        if mode == "normal":
            return prepared, cond
        b = video.shape[0]
        if mode == "inpaint":
            keep, latent_keep = self.keep_masks(mode, components, video, latents, generators)
            given = self.condition_latents(components, video.float() * keep - (1 - keep))
            extra = torch.cat([latent_keep * components.vae.config.scaling_factor, given], dim=1)
            extra = extra * (keep.flatten(1).amax(dim=1) > 0).to(extra).view(-1, 1, 1, 1, 1)
        else:
            image = video[:, :, :1].float()
            sigma = torch.exp(torch.cat([torch.normal(-3.0, 0.5, (1,), generator=g) for g in generators]))
            noise = torch.stack([torch.randn(image.shape[1:], generator=g) for g in generators])
            image = image + to_device(noise, image.device) * to_device(sigma, image.device).view(-1, 1, 1, 1, 1)
            params = self.encode_latent_dist(components, image)
            z = sample_posterior(params, generators).float()
            vae = components.vae
            scale = vae.config.scaling_factor
            z = z / scale if vae.config.get("invert_scale_latents") else z * scale
            extra = torch.cat([z, z.new_zeros(b, z.shape[1], latents.shape[2] - 1, *z.shape[3:])], dim=2)
        tensors = dict(cond.tensors, concat_latents=extra.to(latents))
        if components.transformer.config.get("ofs_embed_dim"):
            tensors["ofs"] = torch.full((b,), 2.0, device=latents.device)
        return prepared, Conditioning(tensors)

    def check_shape(self, num_frames, height, width, components) -> None:
        t = components.vae.config.temporal_compression_ratio
        s = 2 ** (len(components.vae.config.block_out_channels) - 1)
        cfg = components.transformer.config
        if (num_frames - 1) % t:
            raise ConfigError(f"--num_frames {num_frames}: CogVideoX needs {t}k+1 frames (e.g. 9, 49)")
        latent_frames = (num_frames - 1) // t + 1
        pt = cfg.patch_size_t or 1
        if latent_frames % pt:
            raise ConfigError(
                f"--num_frames {num_frames}: gives {latent_frames} latent frames, but this CogVideoX (1.5, "
                f"patch_size_t={pt}) needs a multiple of {pt}; e.g. {((latent_frames // pt + 1) * pt - 1) * t + 1}"
            )
        for flag, v in (("--height", height), ("--width", width)):
            if v % (s * cfg.patch_size):
                raise ConfigError(f"{flag} {v}: CogVideoX needs a multiple of {s * cfg.patch_size}")
        if cfg.get("use_learned_positional_embeddings"):  # CogVideoX-5B-I2V: diffusers' patch embedding refuses
            # other sizes (a ValueError at the first step); checked here, before any weights load
            want = (cfg.sample_height * s, cfg.sample_width * s)
            if (height, width) != want:
                raise FixedSizeError(
                    f"--height {height} --width {width}: this CogVideoX transformer has learned positional embeddings "
                    f"for {want[0]}x{want[1]} only (CogVideoX-5B-I2V: 480x720); train and validate at that size"
                )

    def max_sequence_length(self, components) -> int:
        return int(components.transformer.config.max_text_seq_length)

    def make_objective(self, args, components):
        from ptrain.objectives import VPrediction

        return VPrediction(components.scheduler, args)

    def encode_text(self, components, captions, max_sequence_length, images=None) -> Conditioning:
        return Conditioning({"encoder_hidden_states": self.prompt_embeds(components, captions, max_sequence_length)})

    def normalize_latents(self, components, latents) -> torch.Tensor:
        return latents * components.vae.config.scaling_factor

    def on_bind(self, components) -> None:
        self._rotary: dict = {}  # per bound spec: (latent shape, device) -> (cos, sin)

    def rotary(self, transformer: nn.Module, f: int, h: int, w: int, device: torch.device):
        """The 3D RoPE tables of a latent shape, as the pipeline builds them, made once per shape and device (the
        pipeline rebuilds them on every call)."""
        if not transformer.config.use_rotary_positional_embeddings:
            return None
        key = (f, h, w, str(device))
        if key not in self._rotary:
            s = self.pipe.vae_scale_factor_spatial
            self._rotary[key] = self.pipe._prepare_rotary_positional_embeddings(h * s, w * s, f, device)
        return self._rotary[key]

    def forward(self, transformer: nn.Module, noisy_latents, timesteps, cond) -> torch.Tensor:
        b, c, f, h, w = noisy_latents.shape
        rotary = self.rotary(transformer, f, h, w, noisy_latents.device)
        x = self.model_input(noisy_latents, cond)
        out = transformer(
            hidden_states=x.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            timestep=timesteps,
            image_rotary_emb=rotary,
            ofs=cond.tensors.get("ofs"),
            return_dict=False,
        )[0]
        return out.permute(0, 2, 1, 3, 4)

    def validation_kwargs(self) -> dict:
        return {"max_sequence_length": int(self.pipe.transformer.config.max_text_seq_length)}

    def comfyui_lora_rules(self, config) -> list[Rule]:
        """ComfyUI's own CogVideoX model (comfy/ldm/cogvideo/model.py in comfyanonymous/ComfyUI): `blocks.N`
        with q, k, v, attn_out, ff_proj, ff_out; `time_embedding_linear_1`; other modules as in diffusers."""
        b = r"transformer_blocks\.(\d+)\."
        return [
            Rule(b + r"attn1\.to_(q|k|v)", r"blocks.\1.\2"),
            Rule(b + r"attn1\.to_out\.0", r"blocks.\1.attn_out"),
            Rule(b + r"ff\.net\.0\.proj", r"blocks.\1.ff_proj"),
            Rule(b + r"ff\.net\.2", r"blocks.\1.ff_out"),
            Rule(b + r"(norm[12]\.linear)", r"blocks.\1.\2"),
            Rule(r"(time|ofs)_embedding\.linear_([12])", r"\1_embedding_linear_\2"),
            Rule(r"patch_embed\.(proj|text_proj)|norm_out\.linear|proj_out", r"\g<0>"),
        ]
