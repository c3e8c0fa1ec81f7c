"""Tiny checkpoint and synthetic video fixtures (ptrain.testing.tiny)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ptrain.testing.tiny import (
    LTX_SCHEDULER_CONFIG,
    synthetic_video_specs,
    write_synthetic_videos,
    write_tiny_checkpoint,
)

COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "ltx_video", seed=0)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    return write_synthetic_videos(tmp_path_factory.mktemp("videos"), num_videos=8, seed=0)


def test_model_index_lists_components(ckpt: Path) -> None:
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["_class_name"] == "LTXPipeline"
    for name in COMPONENTS:
        assert name in index and (ckpt / name).is_dir()
    assert list((ckpt / "transformer").glob("*.safetensors"))
    assert list((ckpt / "vae").glob("*.safetensors"))
    assert list((ckpt / "text_encoder").glob("*.safetensors"))


def test_components_load(ckpt: Path) -> None:
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel

    transformer = LTXVideoTransformer3DModel.from_pretrained(ckpt, subfolder="transformer")
    vae = AutoencoderKLLTXVideo.from_pretrained(ckpt, subfolder="vae")
    text_encoder = T5EncoderModel.from_pretrained(ckpt / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(ckpt, subfolder="scheduler")

    assert transformer.config.in_channels == vae.config.latent_channels
    assert transformer.config.caption_channels == text_encoder.config.d_model
    assert text_encoder.config.vocab_size >= len(tokenizer)
    for key, value in LTX_SCHEDULER_CONFIG.items():
        assert scheduler.config[key] == value, key

    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (8, 8)
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1).latent_dist.sample()
        assert latents.shape == (1, vae.config.latent_channels, 2, 4, 4)
        assert vae.decode(latents).sample.shape == (1, 3, 9, 32, 32)

    tokens = tokenizer(["a red cat", "a zebra"], padding="max_length", max_length=16, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    assert tokenizer.model_max_length == 128
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokens.input_ids.shape == (2, 16)
    assert tokens.attention_mask[0].tolist() == [1] * 4 + [0] * 12  # 3 words + </s>
    assert tokens.input_ids[0, 3].item() == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in tokens.input_ids[1].tolist()  # unknown words fall back to characters
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert hidden.shape == (2, 16, text_encoder.config.d_model)


def test_pipeline_loads_and_runs(ckpt: Path) -> None:
    from diffusers import LTXPipeline

    pipe = LTXPipeline.from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt="a cat", height=32, width=32, num_frames=9, num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 9, 3, 32, 32)
    assert torch.isfinite(out.frames).all()


def test_checkpoint_is_deterministic(ckpt: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / name).read_bytes() == (ckpt / name).read_bytes()


def test_unknown_model_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ltx_video"):
        write_tiny_checkpoint(tmp_path, model_name="nope")


def test_synthetic_videos(video_dir: Path) -> None:
    import decord

    specs = synthetic_video_specs(num_videos=8, seed=0)
    prompts = (video_dir / "prompts.txt").read_text().splitlines()
    videos = (video_dir / "videos.txt").read_text().splitlines()
    with open(video_dir / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(prompts) == len(videos) == len(rows) == len(specs) == 8
    assert [r["caption"] for r in rows] == prompts
    assert [r["video"] for r in rows] == videos == [s.path for s in specs]

    assert len({(s.width, s.height) for s in specs}) > 4
    assert len({s.num_frames for s in specs}) > 4
    for spec in specs:
        reader = decord.VideoReader(str(video_dir / spec.path))
        assert len(reader) == spec.num_frames, spec
        assert reader[0].shape == (spec.height, spec.width, 3), spec
        assert reader.get_avg_fps() == pytest.approx(spec.fps), spec
        assert reader.get_batch([0, spec.num_frames - 1]).shape == (2, spec.height, spec.width, 3)
