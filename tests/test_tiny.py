"""Tiny checkpoint and synthetic video fixtures (ptrain.testing.tiny)."""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ptrain.testing.tiny import (
    COGVIDEOX_TEXT_LEN,
    COGVIDEOX_VARIANT_CONFIGS,
    LTX_SCHEDULER_CONFIG,
    WORDS,
    main,
    resolve_variant,
    synthetic_video_specs,
    write_synthetic_videos,
    write_tiny_checkpoint,
)

# model_name -> (pipeline class, {component: (library, class)}, extra pipeline-call kwargs)
MODELS: dict[str, tuple[str, dict[str, tuple[str, str]], dict]] = {
    "ltx_video": (
        "LTXPipeline",
        {
            "transformer": ("diffusers", "LTXVideoTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLLTXVideo"),
            "text_encoder": ("transformers", "T5EncoderModel"),
            "tokenizer": ("transformers", "T5TokenizerFast"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        },
        {},
    ),
    "cogvideox": (
        "CogVideoXPipeline",
        {
            "transformer": ("diffusers", "CogVideoXTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLCogVideoX"),
            "text_encoder": ("transformers", "T5EncoderModel"),
            "tokenizer": ("transformers", "T5TokenizerFast"),
            "scheduler": ("diffusers", "CogVideoXDDIMScheduler"),
        },
        # The pipeline's default (226) ignores the config; 2b's sincos embedding needs max_text_seq_length.
        {"max_sequence_length": COGVIDEOX_TEXT_LEN},
    ),
    "hunyuan_video": (
        "HunyuanVideoPipeline",
        {
            "transformer": ("diffusers", "HunyuanVideoTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLHunyuanVideo"),
            "text_encoder": ("transformers", "LlamaModel"),
            "tokenizer": ("transformers", "LlamaTokenizerFast"),
            "text_encoder_2": ("transformers", "CLIPTextModel"),
            "tokenizer_2": ("transformers", "CLIPTokenizer"),
            "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        },
        {"guidance_scale": 1.0},
    ),
    "wan": (
        "WanPipeline",
        {
            "transformer": ("diffusers", "WanTransformer3DModel"),
            "vae": ("diffusers", "AutoencoderKLWan"),
            "text_encoder": ("transformers", "UMT5EncoderModel"),
            "tokenizer": ("transformers", "T5TokenizerFast"),
            "scheduler": ("diffusers", "UniPCMultistepScheduler"),
        },
        {},
    ),
}
CASES = [
    pytest.param("ltx_video", None, id="ltx_video"),
    pytest.param("cogvideox", "2b", id="cogvideox-2b"),
    pytest.param("cogvideox", "5b", id="cogvideox-5b"),
    pytest.param("cogvideox", "1.5", id="cogvideox-1.5"),
    pytest.param("hunyuan_video", None, id="hunyuan_video"),
    pytest.param("wan", None, id="wan"),
]
# Scheduler values of the real checkpoints.
SCHEDULER_VALUES: dict[tuple[str, str | None], dict] = {
    ("ltx_video", None): LTX_SCHEDULER_CONFIG,
    ("cogvideox", "2b"): dict(
        prediction_type="v_prediction",
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=3.0,
        set_alpha_to_one=True,
        steps_offset=0,
    ),
    ("cogvideox", "5b"): dict(prediction_type="v_prediction", snr_shift_scale=1.0, timestep_spacing="trailing"),
    ("cogvideox", "1.5"): dict(prediction_type="v_prediction", snr_shift_scale=1.0, timestep_spacing="trailing"),
    ("hunyuan_video", None): dict(shift=7.0, num_train_timesteps=1000, use_dynamic_shifting=False),
    ("wan", None): dict(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    ),
}
# (spatial, temporal) VAE compression, latent channels
VAE_FACTS = {"ltx_video": (8, 8, 8), "cogvideox": (8, 4, 16), "hunyuan_video": (8, 4, 16), "wan": (8, 4, 16)}


def _cls(library: str, name: str) -> type:
    return getattr(importlib.import_module(library), name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """checkpoint(model_name, variant) -> a tiny checkpoint dir, written once per module."""
    cache: dict[tuple[str, str | None], Path] = {}

    def get(model_name: str, variant: str | None = None) -> Path:
        if (model_name, variant) not in cache:
            out = tmp_path_factory.mktemp(f"{model_name}-{variant}")
            cache[model_name, variant] = write_tiny_checkpoint(out, model_name, seed=0, variant=variant)
        return cache[model_name, variant]

    return get


@pytest.fixture(scope="module")
def ckpt(checkpoint) -> Path:
    return checkpoint("ltx_video")


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory) -> Path:
    return write_synthetic_videos(tmp_path_factory.mktemp("videos"), num_videos=8, seed=0)


@pytest.mark.parametrize("model_name, variant", CASES)
def test_checkpoint_loads_and_generates(checkpoint, model_name: str, variant: str | None) -> None:
    ckpt = checkpoint(model_name, variant)
    pipeline_name, components, call_kwargs = MODELS[model_name]
    assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < 5_000_000

    # model_index.json names exactly these components, each resolving to the expected class
    # (transformers 5 writes e.g. "LlamaTokenizer" for the LlamaTokenizerFast alias).
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_name
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    assert listed == set(components)
    loaded = {}
    for name, (library, cls_name) in components.items():
        assert index[name][0] == library and _cls(library, index[name][1]) is _cls(library, cls_name), name
        assert (ckpt / name).is_dir()
        if name.startswith(("transformer", "vae", "text_encoder")):
            assert list((ckpt / name).glob("*.safetensors")), name
        cls = _cls(library, cls_name)
        if library == "diffusers":
            loaded[name] = cls.from_pretrained(ckpt, subfolder=name)
        else:
            loaded[name] = cls.from_pretrained(ckpt / name)
        assert isinstance(loaded[name], cls)
    for key, value in SCHEDULER_VALUES[model_name, variant].items():
        assert loaded["scheduler"].config[key] == value, key

    # Text encoder widths match what the transformer consumes; every token id has an embedding.
    transformer, vae = loaded["transformer"], loaded["vae"]
    text_dim_key = {"ltx_video": "caption_channels", "wan": "text_dim"}.get(model_name, "text_embed_dim")
    assert transformer.config[text_dim_key] == loaded["text_encoder"].config.hidden_size
    assert loaded["text_encoder"].config.vocab_size >= len(loaded["tokenizer"])
    if model_name == "hunyuan_video":
        assert transformer.config.pooled_projection_dim == loaded["text_encoder_2"].config.hidden_size
        assert loaded["text_encoder_2"].config.vocab_size >= len(loaded["tokenizer_2"])

    pipe = _cls("diffusers", pipeline_name).from_pretrained(ckpt)
    pipe.set_progress_bar_config(disable=True)
    spatial, temporal, channels = VAE_FACTS[model_name]
    ratios = (
        (pipe.vae_spatial_compression_ratio, pipe.vae_temporal_compression_ratio)
        if model_name == "ltx_video"
        else (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal)
    )
    assert ratios == (spatial, temporal)
    assert transformer.config.in_channels == channels
    with torch.no_grad():
        latents = vae.encode(torch.rand(1, 3, 9, 32, 32) * 2 - 1).latent_dist.sample()
        assert latents.shape == (1, channels, 8 // temporal + 1, 32 // spatial, 32 // spatial)
        assert vae.decode(latents).sample.shape == (1, 3, 9, 32, 32)

    out = pipe(
        prompt="a red cat moving left",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
        **call_kwargs,
    )
    assert out.frames.shape == (1, 9, 3, 32, 32)
    assert torch.isfinite(out.frames).all()


def test_ltx_tokenizer_and_text_encoder(ckpt: Path) -> None:
    from transformers import AutoTokenizer, T5EncoderModel

    text_encoder = T5EncoderModel.from_pretrained(ckpt / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(ckpt / "tokenizer")
    tokens = tokenizer(
        ["a red cat", "a zebra"],
        padding="max_length",
        max_length=16,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    assert tokenizer.model_max_length == 128
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokens.input_ids.shape == (2, 16)
    assert tokens.attention_mask[0].tolist() == [1] * 4 + [0] * 12  # 3 words + </s>
    assert tokens.input_ids[0, 3].item() == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in tokens.input_ids[1].tolist()  # unknown words fall back to characters
    with torch.no_grad():
        hidden = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert hidden.shape == (2, 16, text_encoder.config.d_model)


def test_cogvideox_variants(checkpoint) -> None:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import AutoTokenizer

    assert tuple(COGVIDEOX_VARIANT_CONFIGS) == ("2b", "5b", "1.5", "5b-i2v", "1.5-i2v")
    expected = {  # rope, patch_size_t, vae scaling_factor, invert_scale_latents, in_channels, learned pos, ofs
        "2b": (False, None, 1.15258426, False, 16, False, None),
        "5b": (True, None, 0.7, False, 16, False, None),
        "1.5": (True, 2, 0.7, True, 16, False, None),
        "5b-i2v": (True, None, 0.7, False, 32, True, None),
        "1.5-i2v": (True, 2, 0.7, True, 32, False, 32),
    }
    for variant, (rope, patch_size_t, scaling, invert, channels, learned, ofs) in expected.items():
        ckpt = checkpoint("cogvideox", variant)
        transformer = CogVideoXTransformer3DModel.from_pretrained(ckpt, subfolder="transformer")
        vae = AutoencoderKLCogVideoX.from_pretrained(ckpt, subfolder="vae")
        assert transformer.config.use_rotary_positional_embeddings is rope, variant
        assert (
            transformer.config.use_learned_positional_embeddings is learned
            and transformer.config.in_channels == channels
        )
        assert transformer.config.patch_size_t == patch_size_t and transformer.config.ofs_embed_dim == ofs
        assert transformer.config.max_text_seq_length == COGVIDEOX_TEXT_LEN
        assert (vae.config.scaling_factor, vae.config.invert_scale_latents) == (scaling, invert)
    assert AutoTokenizer.from_pretrained(ckpt / "tokenizer").model_max_length == COGVIDEOX_TEXT_LEN


def test_hunyuan_tokenizers_follow_the_prompt_template(checkpoint) -> None:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel, LlamaTokenizerFast

    ckpt = checkpoint("hunyuan_video")
    tokenizer = LlamaTokenizerFast.from_pretrained(ckpt / "tokenizer")
    template, crop_start = DEFAULT_PROMPT_TEMPLATE["template"], DEFAULT_PROMPT_TEMPLATE["crop_start"]
    # The template's system part is exactly crop_start tokens (as with Llama 3), so cropping leaves the prompt.
    assert len(tokenizer(template.split("{}")[0]).input_ids) == crop_start
    tokens = tokenizer(
        template.format("a red cat moving left"), max_length=crop_start + 16, padding="max_length", truncation=True
    )
    assert tokenizer.convert_ids_to_tokens(tokens.input_ids[crop_start : crop_start + 6]) == [
        "a",
        "\u2581red",
        "\u2581cat",
        "\u2581moving",
        "\u2581left",
        "<|eot_id|>",
    ]
    assert tokens.attention_mask[crop_start:] == [1] * 6 + [0] * 10  # right padding
    assert tokenizer.pad_token_id is not None and tokenizer.unk_token_id not in tokens.input_ids
    text_encoder = LlamaModel.from_pretrained(ckpt / "text_encoder")
    assert text_encoder.config.num_hidden_layers > 2  # the pipeline takes hidden_states[-3]

    tokenizer_2 = CLIPTokenizer.from_pretrained(ckpt / "tokenizer_2")
    assert tokenizer_2.model_max_length == 77
    for word in WORDS:
        assert len(tokenizer_2(word, add_special_tokens=False).input_ids) == 1, word
    text_encoder_2 = CLIPTextModel.from_pretrained(ckpt / "text_encoder_2")
    assert text_encoder_2.config.max_position_embeddings == 77
    assert text_encoder_2.config.eos_token_id == tokenizer_2.eos_token_id  # pooled output is read at eos


@pytest.mark.parametrize("model_name, variant", [("ltx_video", None), ("hunyuan_video", None), ("wan", None)])
def test_checkpoint_is_deterministic(checkpoint, tmp_path: Path, model_name: str, variant: str | None) -> None:
    ckpt = checkpoint(model_name, variant)
    again = write_tiny_checkpoint(tmp_path / "again", model_name, seed=0, variant=variant)
    other = write_tiny_checkpoint(tmp_path / "other", model_name, seed=1, variant=variant)
    weights = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*.safetensors"))
    assert weights
    for name in weights:
        assert (again / name).read_bytes() == (ckpt / name).read_bytes(), name
        assert (other / name).read_bytes() != (ckpt / name).read_bytes(), name


def test_unknown_model_name_or_variant(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ltx_video"):
        write_tiny_checkpoint(tmp_path, model_name="nope")
    with pytest.raises(ValueError, match="valid: 2b, 5b, 1.5, 5b-i2v, 1.5-i2v"):
        write_tiny_checkpoint(tmp_path, model_name="cogvideox", variant="7b")
    assert resolve_variant("cogvideox", "i2v") == "5b-i2v"  # `--variant i2v` works for every model
    for model_name in ("ltx_video", "hunyuan_video"):
        with pytest.raises(ValueError, match="valid: t2v, i2v$"):
            write_tiny_checkpoint(tmp_path, model_name=model_name, variant="2b")
    with pytest.raises(ValueError, match="valid: t2v, i2v, 2.2-t2v, 2.2-i2v, 2.2-ti2v$"):
        write_tiny_checkpoint(tmp_path, model_name="wan", variant="2b")


def test_cli_variant(tmp_path: Path, capsys) -> None:
    main(["--model_name", "cogvideox", "--variant", "1.5", "--output_dir", str(tmp_path / "c")])
    assert "cogvideox (1.5)" in capsys.readouterr().out
    assert json.loads((tmp_path / "c/transformer/config.json").read_text())["patch_size_t"] == 2
    with pytest.raises(SystemExit):
        main(["--model_name", "wan", "--variant", "1.5", "--output_dir", str(tmp_path / "w")])
    assert "valid: t2v" in capsys.readouterr().err


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
