"""Write the full-size model configs the memory planner and benchmarks use (no hub here, so they live in the repo).

Each variant becomes a diffusers-layout folder without weights: `benchmarks/model_configs/<variant>/`
with `transformer/`, `vae/`, `scheduler/`, `text_encoder/` (and `text_encoder_2/`) config files. Values are
those of the released checkpoints' config.json files (CogVideoX: THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5B;
Lightricks/LTX-Video 0.9; hunyuanvideo-community/HunyuanVideo; Wan-AI/Wan2.1-T2V-1.3B/14B-Diffusers;
Wan-AI/Wan2.2-TI2V-5B-Diffusers), where
diffusers' class defaults already equal the released 2B / LTX / HunyuanVideo / Wan-14B configs; the parameter
counts are checked in tests/test_planner.py against the published sizes.

    python benchmarks/make_model_configs.py                  # rewrites benchmarks/model_configs/
    python benchmarks/make_model_configs.py wan2.2-ti2v-5b   # one variant
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import CLIPTextConfig, LlamaConfig, T5Config, UMT5Config

ROOT = Path(__file__).with_name("model_configs")

T5_XXL = T5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=32128,
                  feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
UMT5_XXL = UMT5Config(d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64, vocab_size=256384,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)  # fmt: skip
LLAVA_LLAMA3_8B_TEXT = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128320,
                                   max_position_embeddings=8192, rope_theta=500000.0)  # fmt: skip
CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        vocab_size=49408, max_position_embeddings=77, projection_dim=768)  # fmt: skip

# Wan 2.2 TI2V-5B (Wan-AI/Wan2.2-TI2V-5B-Diffusers): the Wan team's config wan_ti2v_5B.py (dim 3072 = 24 heads x
# 128, ffn 14336, 30 layers, 48 latent channels in and out) and its VAE's vae/config.json (the Wan 2.2 VAE: 48
# latent channels, residual blocks, a 2x2 patchify, 16x spatial), latents_mean / latents_std as that file gives them.
WAN22_TI2V_5B = {"num_attention_heads": 24, "ffn_dim": 14336, "num_layers": 30, "in_channels": 48, "out_channels": 48}
WAN22_VAE = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True, "in_channels": 12, "out_channels": 12,
    "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
    "latents_mean": [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                     0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                     -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                     -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                     0.3573, -0.0548, -0.1681, -0.0667],
    "latents_std": [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
}  # fmt: skip
COG_5B = {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": True}
# variant -> (model_name, transformer overrides of the diffusers class defaults, vae overrides, encoders)
VARIANTS = {
    "cogvideox-2b": ("cogvideox", {}, {"scaling_factor": 1.15258426}, {"text_encoder": T5_XXL}),
    "cogvideox-5b": ("cogvideox", COG_5B, {"scaling_factor": 0.7}, {"text_encoder": T5_XXL}),
    "cogvideox1.5-5b": (
        "cogvideox",
        {**COG_5B, "patch_size_t": 2, "patch_bias": False, "sample_height": 300, "sample_width": 300,
         "sample_frames": 81},
        {"scaling_factor": 0.7, "invert_scale_latents": True},
        {"text_encoder": T5_XXL},
    ),  # fmt: skip
    "ltx-video": ("ltx_video", {}, {}, {"text_encoder": T5_XXL}),
    "hunyuan-video": ("hunyuan_video", {}, {}, {"text_encoder": LLAVA_LLAMA3_8B_TEXT, "text_encoder_2": CLIP_L}),
    "wan2.1-1.3b": ("wan", {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}, {},
                    {"text_encoder": UMT5_XXL}),  # fmt: skip
    "wan2.1-14b": ("wan", {}, {}, {"text_encoder": UMT5_XXL}),
    "wan2.2-ti2v-5b": ("wan", WAN22_TI2V_5B, WAN22_VAE, {"text_encoder": UMT5_XXL}),
}
#: model_index.json settings a variant's pipeline reads (Wan 2.2 TI2V: a timestep per video token).
MODEL_INDEX = {"wan2.2-ti2v-5b": {"_class_name": "WanPipeline", "expand_timesteps": True}}


def write(variant: str) -> Path:
    from ptrain.models.spec import get_spec

    model_name, tr, va, encoders = VARIANTS[variant]
    spec = get_spec(model_name)
    out = ROOT / variant
    shutil.rmtree(out, ignore_errors=True)
    for name, overrides in (("transformer", tr), ("vae", va)):
        cls = spec.component_classes[name]
        with torch.device("meta"):  # the class defaults, without allocating weights
            config = {k: v for k, v in cls().config.items() if not k.startswith("_")}
        config.update(overrides)
        config["_class_name"] = cls.__name__
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text(json.dumps(config, indent=2, default=list) + "\n")
    sched = spec.component_classes["scheduler"]
    (out / "scheduler").mkdir()
    sched_config = {k: v for k, v in sched().config.items() if not k.startswith("_")}
    sched_config["_class_name"] = sched.__name__
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_config, indent=2, default=list) + "\n")
    for name, config in encoders.items():
        config.architectures = [spec.component_classes[name].__name__]
        config.save_pretrained(out / name)
    if variant in MODEL_INDEX:
        (out / "model_index.json").write_text(json.dumps(MODEL_INDEX[variant], indent=2) + "\n")
    (out / "ptrain_variant.json").write_text(json.dumps({"model_name": model_name, "variant": variant}) + "\n")
    return out


if __name__ == "__main__":
    import sys

    for v in sys.argv[1:] or VARIANTS:
        print(write(v))
