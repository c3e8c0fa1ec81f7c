"""Write the full-size model configs the memory planner and benchmarks use (no hub here, so they live in the repo).

Each variant becomes a diffusers-layout folder without weights: `benchmarks/model_configs/<variant>/`
with `transformer/`, `vae/`, `scheduler/`, `text_encoder/` (and `text_encoder_2/`) config files. Values are
those of the released checkpoints' config.json files (CogVideoX: THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5B;
Lightricks/LTX-Video 0.9; hunyuanvideo-community/HunyuanVideo; Wan-AI/Wan2.1-T2V-1.3B/14B-Diffusers), where
diffusers' class defaults already equal the released 2B / LTX / HunyuanVideo / Wan-14B configs; the parameter
counts are checked in tests/test_planner.py against the published sizes.

    python benchmarks/make_model_configs.py   # rewrites benchmarks/model_configs/
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
}


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
    (out / "ptrain_variant.json").write_text(json.dumps({"model_name": model_name, "variant": variant}) + "\n")
    return out


if __name__ == "__main__":
    for v in VARIANTS:
        print(write(v))
