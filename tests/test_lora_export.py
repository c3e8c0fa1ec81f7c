"""In-process training (a world of one on gloo): only LoRA weights train, and the exported
LoRA loaded into LTXPipeline reproduces the trained transformer's output."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODELS, TINY_ARGS, full

from ptrain.config import parse_config
from ptrain.trainer import train


@pytest.mark.parametrize("model", MODELS)
def test_lora_trains_only_adapters_and_exports_to_pipeline(model, tiny_ckpts, tiny_data, tmp_path, single_process_env):
    from ptrain.models.spec import get_spec

    spec_cls = get_spec(model)
    ckpt = tiny_ckpts(model)
    base = spec_cls.transformer_cls.from_pretrained(ckpt, subfolder="transformer").state_dict()
    cfg = parse_config(
        ["--model_name", model, "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(tiny_data),
         "--output_dir", str(tmp_path), "--train_steps", "3", "--lr", "5e-3", "--rank", "4", "--lora_alpha", "8",
         "--checkpointing_steps", "0", *TINY_ARGS]
    )  # fmt: skip
    result = train(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    transformer, spec, comps = result.transformer, result.spec, result.components

    # Only adapter weights changed; every base weight is bit-identical.
    trained = {k.replace("base_layer.", ""): v for k, v in transformer.state_dict().items()}
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys and all(full(trained[k]).abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    for k, v in base.items():
        assert torch.equal(full(trained[k]), v), f"frozen weight {k} changed"

    # The exported file loads in the model's pipeline with lora_alpha kept, and reproduces the trained output.
    pipe = spec.pipeline_cls.from_pretrained(ckpt, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    cfg_loaded = next(iter(pipe.transformer.peft_config.values()))
    assert cfg_loaded.r == 4 and cfg_loaded.lora_alpha == 8

    from ptrain.objectives import sample_generators

    gens = sample_generators(0, [0])
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = spec.encode_video(comps, video, gens)
    cond = spec.encode_text(comps, ["a red square moving left"], spec.max_sequence_length(comps))
    prepared = spec.make_objective(cfg.objective, comps).prepare(latents, gens)
    transformer.eval()
    with torch.no_grad():
        ours = spec.forward(transformer, prepared.noisy, prepared.timesteps, cond)
        theirs = spec.forward(pipe.transformer, prepared.noisy, prepared.timesteps, cond)
        plain = spec_cls.transformer_cls.from_pretrained(ckpt, subfolder="transformer")
        untrained = spec.forward(plain, prepared.noisy, prepared.timesteps, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - untrained).abs().max() > 1e-4, "LoRA had no effect on the output"
