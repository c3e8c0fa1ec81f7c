"""In-process training (a world of one on gloo): only LoRA weights train, and the exported
LoRA loaded into LTXPipeline reproduces the trained transformer's output."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from conftest import TINY_ARGS
from ptrain.config import parse_config
from ptrain.trainer import train


@pytest.fixture
def single_process_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _random_inputs(transformer_cfg, gen):
    latents = torch.randn(2, transformer_cfg.in_channels, 2, 4, 4, generator=gen)
    text = torch.randn(2, 12, transformer_cfg.caption_channels, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 6:] = False
    return latents, torch.tensor([250.0, 800.0]), text, mask


def test_lora_trains_only_adapters_and_exports_to_pipeline(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    from diffusers import LTXPipeline, LTXVideoTransformer3DModel

    from ptrain.models.spec import Conditioning

    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer").state_dict()
    cfg = parse_config(
        ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
         "--output_dir", str(tmp_path), "--train_steps", "3", "--lr", "5e-3", "--rank", "4", "--lora_alpha", "8",
         *TINY_ARGS]
    )  # fmt: skip
    result = train(cfg)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    transformer, spec = result.transformer, result.spec

    # Only adapter weights changed; every base weight is bit-identical.
    trained = {k.replace("base_layer.", ""): v for k, v in transformer.state_dict().items()}
    lora_keys = [k for k in trained if "lora_" in k]
    assert lora_keys and all(trained[k].full_tensor().abs().sum() > 0 for k in lora_keys if "lora_B" in k)
    for k, v in base.items():
        assert torch.equal(trained[k].full_tensor(), v), f"frozen weight {k} changed"

    # The exported file loads in LTXPipeline with lora_alpha kept, and reproduces the trained output.
    pipe = LTXPipeline.from_pretrained(tiny_ckpt, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    cfg_loaded = next(iter(pipe.transformer.peft_config.values()))
    assert cfg_loaded.r == 4 and cfg_loaded.lora_alpha == 8

    latents, t, text, mask = _random_inputs(pipe.transformer.config, torch.Generator().manual_seed(0))
    cond = Conditioning({"encoder_hidden_states": text, "encoder_attention_mask": mask})
    transformer.eval()
    with torch.no_grad():
        ours = spec.forward(transformer, latents, t, cond)
        theirs = spec.forward(pipe.transformer, latents, t, cond)
        plain = LTXVideoTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer")
        untrained = spec.forward(plain, latents, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (ours - untrained).abs().max() > 1e-4, "LoRA had no effect on the output"

    # And the pipeline itself runs with the LoRA loaded.
    video = pipe(prompt="a red square", height=32, width=32, num_frames=9, num_inference_steps=2, output_type="pt")
    assert video.frames.shape == (1, 9, 3, 32, 32)
