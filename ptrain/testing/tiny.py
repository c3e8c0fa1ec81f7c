"""Tiny random checkpoints and synthetic test videos.

This module owns the offline fixtures every test and smoke run uses:

* `write_tiny_checkpoint` builds a randomly initialised, few-hundred-KB model
  saved with its diffusers pipeline's `save_pretrained`, i.e. in the exact
  folder layout of the real checkpoint (model_index.json, transformer/, vae/,
  text_encoder/, tokenizer/, scheduler/, ...), so loading code is exercised
  unchanged. Families (`CHECKPOINT_VARIANTS`; the first variant is the default):
  ltx_video (t2v, i2v), cogvideox (2b, 5b, 1.5, 5b-i2v, 1.5-i2v), hunyuan_video (t2v, i2v),
  wan (t2v, i2v; Wan 2.2: 2.2-t2v and 2.2-i2v with two experts as A14B, 2.2-ti2v as TI2V-5B).
  Tokenizers (T5, Llama, CLIP) are built locally from small word lists;
  nothing is downloaded.
* `write_synthetic_videos` writes H.264 mp4 files of moving coloured shapes in
  varied sizes, lengths and frame rates, plus the caption/video index files
  (CogVideoX-style prompts.txt + videos.txt, and metadata.csv).

CLI:
    python -m ptrain.testing.tiny --model_name ltx_video --output_dir DIR [--seed 0] [--variant V]
    python -m ptrain.testing.tiny --videos --output_dir DIR [--num_videos 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import csv
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# --------------------------------------------------------------------------
# Tokenizer vocabulary (shared with the synthetic captions)
# --------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 30),
    "purple": (140, 50, 190),
}
SHAPES = ("square", "circle")
DIRECTIONS = ("left", "right", "up", "down")

WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [
            *"a an the of and with in on at to from is are over under near".split(),
            *"video clip scene shot frame image photo camera view close slow fast".split(),
            *COLORS,
            *"gray pink brown bright dark light".split(),
            *SHAPES,
            *"triangle ball box line shape shapes".split(),
            *DIRECTIONS,
            *"moving moves flying running walking jumping turning rolling across around".split(),
            *"background gradient sky sea water grass field road city street room".split(),
            *"cat dog bird fish horse person man woman child car tree flower sun".split(),
            *"big small tiny large one two three".split(),
        ]
    )
)
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def build_tokenizer(model_max_length: int = 128):
    """A T5-style Unigram tokenizer over `WORDS`; unknown words fall back to characters."""
    from transformers import T5TokenizerFast  # alias of the tokenizers-backed T5Tokenizer in transformers 5

    vocab: list[tuple[str, float]] = [(t, 0.0) for t in SPECIAL_TOKENS]
    vocab.append(("\u2581", -2.0))  # word-boundary piece
    vocab += [("\u2581" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in _CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _bpe_chains(pieces: Iterable[Sequence[str]], from_right: bool = False) -> tuple[list[str], list[tuple[str, str]]]:
    """The tokens and BPE merges that join each symbol sequence into one token, one symbol at a time.

    Chains grow from an anchor symbol (a leading '\u2581' or a trailing '</w>'), so chains of different
    words cannot fire inside each other; unanchored chains can (a later word may then stay split).
    """
    tokens: dict[str, None] = {}
    merges: dict[tuple[str, str], None] = {}
    for symbols in pieces:
        symbols = list(reversed(symbols)) if from_right else list(symbols)
        token = symbols[0]
        for symbol in symbols[1:]:
            pair = (symbol, token) if from_right else (token, symbol)
            merges[pair] = None
            token = pair[0] + pair[1]
            tokens[token] = None
    return list(tokens), list(merges)


LLAMA_SPECIAL_TOKENS = ("<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>")
LLAMA_HEADER_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_LLAMA_CHARS = _CHARS + ':;"()/'


def build_llama_tokenizer(model_max_length: int = 512, image: bool = False):
    """A Llama-3-like BPE tokenizer (`LlamaTokenizerFast`) covering `WORDS` and HunyuanVideo's prompt template.

    transformers 5 rebuilds a LlamaTokenizerFast from tokenizer.json with its own Metaspace
    pre-tokenizer, so words after a space are '\u2581word' pieces and words after a header or newline
    are bare pieces. Each template word, blank line, digit and punctuation mark is one token, so the
    template's system part tokenises to exactly its `crop_start` (95) tokens, BOS included, as with
    Llama 3, and cropping leaves just the prompt. Other text falls back to characters, then bytes.
    Padding is on the right (the pipeline crops the template from the left).

    `image=True`: the same for HunyuanVideo-I2V's template (`crop_start` 103) with an `<image>` token at
    position 5, where the pipeline splices in the image tokens.
    """
    import re

    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_video, pipeline_hunyuan_video_image2video
    from transformers import LlamaTokenizerFast  # alias of LlamaTokenizer in transformers 5

    source = pipeline_hunyuan_video_image2video if image else pipeline_hunyuan_video
    template = re.sub(r"<\|\w+\|>|<image>", "|", source.DEFAULT_PROMPT_TEMPLATE["template"])
    words = list(dict.fromkeys([*WORDS, *re.findall(r"[A-Za-z]+", template)]))
    spaced, spaced_merges = _bpe_chains(["\u2581", *w] for w in words)
    # Bare (unanchored) chains rank after all '\u2581' ones; the template's come first so they always complete.
    bare_words = ["\n\n", *re.findall(r"(?<![A-Za-z ])[A-Za-z]+", template), *sorted(WORDS, key=len, reverse=True)]
    bare, bare_merges = _bpe_chains(w for w in dict.fromkeys(bare_words) if len(w) > 1)
    vocab = [
        *LLAMA_SPECIAL_TOKENS,
        *LLAMA_HEADER_TOKENS,
        *(f"<0x{b:02X}>" for b in range(256)),  # byte fallback: no text maps to <unk>
        "\u2581",
        "\n",
        *_LLAMA_CHARS,
        *spaced,
        *bare,
    ]
    tokenizer = LlamaTokenizerFast(
        vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))},
        merges=spaced_merges + bare_merges,
        unk_token="<unk>",
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        padding_side="right",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [*LLAMA_HEADER_TOKENS, *(["<image>"] if image else [])]}
    )
    return tokenizer


CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")  # the last two ids, as in CLIP


def build_clip_tokenizer(model_max_length: int = 77):
    """A CLIP byte-level BPE tokenizer (`CLIPTokenizer`) in which every word of `WORDS` is one token.

    Chains grow leftwards from the word-final 'x</w>' symbol, so they never interfere; other words
    fall back to pieces and characters. bos/eos/pad/unk are CLIP's, pad = eos = unk = <|endoftext|>.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    tokens, merges = _bpe_chains(([*w[:-1], w[-1] + "</w>"] for w in WORDS if len(w) > 1), from_right=True)
    vocab = [*alphabet, *(c + "</w>" for c in alphabet), *tokens, *CLIP_SPECIAL_TOKENS]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(dict.fromkeys(vocab))}, merges=merges, model_max_length=model_max_length
    )


# --------------------------------------------------------------------------
# Tiny checkpoints
# --------------------------------------------------------------------------

T5_D_MODEL = 32

LTX_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=8,
    out_channels=8,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=8,
    cross_attention_dim=16,  # must equal heads * head_dim: captions are projected to the inner dim
    num_layers=2,
    caption_channels=T5_D_MODEL,
)

# Three spatio-temporal 2x stages and patch_size 1: spatial 8x, temporal 8x,
# so (1, 3, 9, 32, 32) -> latents (1, 8, 2, 4, 4).
LTX_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=8,
    block_out_channels=(8, 16, 16, 16),
    decoder_block_out_channels=(8, 16, 16, 16),
    layers_per_block=(1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1),
    spatio_temporal_scaling=(True, True, True, False),
    decoder_spatio_temporal_scaling=(True, True, True, False),
    decoder_inject_noise=(False, False, False, False, False),
    upsample_residual=(False, False, False, False),
    upsample_factor=(1, 1, 1, 1),
    timestep_conditioning=False,
    patch_size=1,
    patch_size_t=1,
    encoder_causal=True,
    decoder_causal=False,
)

# Values of Lightricks/LTX-Video scheduler/scheduler_config.json.
LTX_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.95,
    max_shift=2.05,
    base_image_seq_len=1024,
    max_image_seq_len=4096,
    shift_terminal=0.1,
    invert_sigmas=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)


def _t5_encoder(vocab_size: int, umt5: bool = False):
    """A 2-layer T5 v1.1 (or UMT5: per-layer relative position bias) encoder of width `T5_D_MODEL`."""
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=vocab_size,
        d_model=T5_D_MODEL,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as the real T5-XXL encoder
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return (UMT5EncoderModel if umt5 else T5EncoderModel)(config).eval()


def _build_ltx_video(seed: int, variant: str):
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer = build_tokenizer(model_max_length=128)
    # Re-seed before each component so each one is independent of the others' sizes.
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(len(tokenizer))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTXVideo(**LTX_VAE_CONFIG).eval()
    torch.manual_seed(seed + 2)
    transformer = LTXVideoTransformer3DModel(**LTX_TRANSFORMER_CONFIG).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**LTX_SCHEDULER_CONFIG)
    # i2v: the same weights (LTX-Video conditions on a clean first latent frame), saved as LTXImageToVideoPipeline
    cls = LTXPipeline
    if variant == "i2v":
        from diffusers import LTXImageToVideoPipeline as cls
    return cls(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


# CogVideoX (THUDM/CogVideoX-2b, -5b, CogVideoX1.5-5B). VAE: four blocks -> spatial 8x, the first two
# compress time -> temporal 4x, 16 latent channels: (1, 3, 9, 32, 32) -> (1, 16, 3, 4, 4). 4k+1 frames
# encode to k+1 latent frames, but the decoder works in 2-latent-frame chunks and returns 4n+1 frames
# only for an odd latent count n (frames 8m+1: 9, 17, 49, ...); an even one gives 4n (13 -> 4 -> 16).
# sample_height/width are in latent pixels (pipeline default size = 8x them), sample_frames in frames.
COGVIDEOX_TEXT_LEN = 16  # max_text_seq_length (226 in the real models) = tokenizer model_max_length

COGVIDEOX_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    num_attention_heads=2,
    attention_head_dim=16,  # RoPE splits it 4/6/6 over (t, h, w)
    in_channels=16,
    out_channels=16,
    time_embed_dim=32,
    text_embed_dim=T5_D_MODEL,
    num_layers=2,
    sample_width=4,
    sample_height=4,
    sample_frames=9,
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=COGVIDEOX_TEXT_LEN,
)

COGVIDEOX_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    temporal_compression_ratio=4,
)

# Values of THUDM/CogVideoX-2b scheduler/scheduler_config.json (CogVideoXDDIMScheduler).
COGVIDEOX_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
    snr_shift_scale=3.0,
)

# What each variant changes, as in the real checkpoints' configs (2B vs 5B vs 1.5-5B text-to-video).
COGVIDEOX_VARIANT_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "2b": dict(transformer={}, vae=dict(scaling_factor=1.15258426), scheduler={}),
    "5b": dict(
        transformer=dict(use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False),
        vae=dict(scaling_factor=0.7),
        scheduler=dict(snr_shift_scale=1.0),
    ),
    # patch_size_t=2: the transformer needs an even latent frame count. CogVideoXPipeline pads an odd
    # count with one leading latent frame and drops it before decoding (81 frames -> 21 -> 22 latents
    # in the real model, 9 -> 3 -> 4 here). RoPE is sliced from a (sample_height/2, sample_width/2)
    # patch grid, which caps sizes at 8 * sample_height/width pixels (2400 in the real model, 256 here).
    "1.5": dict(
        transformer=dict(
            patch_size_t=2,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
            ofs_embed_dim=None,  # 512 only in the image-to-video model
            patch_bias=False,
            sample_height=32,
            sample_width=32,
        ),
        vae=dict(scaling_factor=0.7, invert_scale_latents=True),
        scheduler=dict(snr_shift_scale=1.0),
    ),
    # Image-to-video (CogVideoXImageToVideoPipeline): noise + image latents on channels (in_channels 32).
    # CogVideoX-5b-I2V also has learned positional embeddings (sampling only at its sample size, 32x32 here);
    # CogVideoX1.5-5B-I2V an `ofs` embedding as wide as the time embedding.
    "5b-i2v": dict(
        transformer=dict(in_channels=32, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True),
        vae=dict(scaling_factor=0.7),
        scheduler=dict(snr_shift_scale=1.0),
    ),
    "1.5-i2v": dict(
        transformer=dict(
            in_channels=32, patch_size_t=2, use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False, ofs_embed_dim=32, patch_bias=False, sample_height=32,
            sample_width=32,
        ),  # fmt: skip
        vae=dict(scaling_factor=0.7, invert_scale_latents=True),
        scheduler=dict(snr_shift_scale=1.0),
    ),
}


def _build_cogvideox(seed: int, variant: str):
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    overrides = COGVIDEOX_VARIANT_CONFIGS[variant]
    tokenizer = build_tokenizer(model_max_length=COGVIDEOX_TEXT_LEN)
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(len(tokenizer))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLCogVideoX(**{**COGVIDEOX_VAE_CONFIG, **overrides["vae"]}).eval()
    torch.manual_seed(seed + 2)
    transformer = CogVideoXTransformer3DModel(**{**COGVIDEOX_TRANSFORMER_CONFIG, **overrides["transformer"]}).eval()
    scheduler = CogVideoXDDIMScheduler(**{**COGVIDEOX_SCHEDULER_CONFIG, **overrides["scheduler"]})
    cls = CogVideoXPipeline
    if variant.endswith("i2v"):
        from diffusers import CogVideoXImageToVideoPipeline as cls
    return cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


# HunyuanVideo (hunyuanvideo-community/HunyuanVideo). Text: a Llama (hidden states 3rd from last,
# template cropped) and CLIP-L's pooled output. VAE: spatial 8x, temporal 4x (frames 4k+1), 16 latent
# channels. Sizes must be multiples of 16.
LLAMA_HIDDEN_SIZE = 32  # 4096 in the real model
CLIP_HIDDEN_SIZE = 16  # 768 in the real model

HUNYUAN_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,  # double-stream `transformer_blocks`
    num_single_layers=2,  # `single_transformer_blocks`
    num_refiner_layers=1,
    mlp_ratio=4.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    text_embed_dim=LLAMA_HIDDEN_SIZE,
    pooled_projection_dim=CLIP_HIDDEN_SIZE,
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
)

HUNYUAN_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)

# As hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json: defaults but shift 7.0.
HUNYUAN_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=7.0)


def _build_hunyuan_video(seed: int, variant: str):
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoImageToVideoPipeline,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    i2v = variant == "i2v"
    tokenizer = build_llama_tokenizer(image=i2v)
    tokenizer_2 = build_clip_tokenizer()
    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=LLAMA_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=3,  # the pipeline takes hidden_states[-3]
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024 if i2v else tokenizer.model_max_length,  # + 576 image tokens
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    image_processor = None
    if i2v:
        # HunyuanVideo-I2V's text encoder is a Llava (llava-llama-3-8b): a CLIP ViT-L/14 at 336 px gives the 576
        # image tokens the pipeline's template splices in at <image>.
        from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=336, patch_size=14)  # fmt: skip
        text_encoder = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=vision, text_config=llama, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=576,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        ).eval()
        image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    else:
        text_encoder = LlamaModel(llama).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer_2),
            hidden_size=CLIP_HIDDEN_SIZE,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=CLIP_HIDDEN_SIZE,
            max_position_embeddings=tokenizer_2.model_max_length,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer_2.bos_token_id,
            eos_token_id=tokenizer_2.eos_token_id,  # the pooled output is taken at the first eos
            pad_token_id=tokenizer_2.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLHunyuanVideo(**HUNYUAN_VAE_CONFIG).eval()
    torch.manual_seed(seed + 3)
    config = dict(HUNYUAN_TRANSFORMER_CONFIG)
    if i2v:  # HunyuanVideo-I2V (33 channels): [noise, image latents, mask]
        config.update(in_channels=33, image_condition_type="latent_concat")
    transformer = HunyuanVideoTransformer3DModel(**config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER_CONFIG)
    parts = dict(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae, scheduler=scheduler,
                 text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)  # fmt: skip
    if i2v:
        return HunyuanVideoImageToVideoPipeline(image_processor=image_processor, **parts)
    return HunyuanVideoPipeline(**parts)


# Wan 2.1 (Wan-AI/Wan2.1-T2V-1.3B-Diffusers). VAE: spatial 8x, temporal 4x (frames 4k+1), z_dim 16
# with the default (real) 16-entry latents_mean/latents_std. Sizes must be multiples of 16.
WAN_TEXT_LEN = 512  # tokenizer model_max_length = WanPipeline's default max_sequence_length

WAN_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,  # RoPE splits it 8/4/4 over (t, h, w)
    in_channels=16,
    out_channels=16,
    text_dim=T5_D_MODEL,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,  # `blocks`
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

#: Width of the tiny I2V variant's CLIP vision tower (the transformer's image_dim; 1280 in Wan 2.1 I2V).
WAN_CLIP_DIM = 32

WAN_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],  # lists, not tuples: the encoder concatenates them to lists
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # sic (diffusers' spelling)
)

#: Wan 2.2's VAE, tiny: 48 latent channels, residual blocks, patchified by 2 (12 = 3 x 2 x 2 input channels),
#: 16x spatial compression (the real one: base_dim 160, decoder_base_dim 256).
WAN22_VAE_CONFIG: dict[str, Any] = dict(
    WAN_VAE_CONFIG, z_dim=48, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    scale_factor_spatial=16, latents_mean=[0.0] * 48, latents_std=[1.0] * 48,
)  # fmt: skip

# The real scheduler is diffusers' UniPCMultistepScheduler defaults plus these (as written by diffusers'
# scripts/convert_wan_to_diffusers.py for the 2.1 T2V models).
WAN_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
)


def _build_wan(seed: int, variant: str):
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )

    tokenizer = build_tokenizer(model_max_length=WAN_TEXT_LEN)
    torch.manual_seed(seed)
    text_encoder = _t5_encoder(len(tokenizer), umt5=True)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(**WAN_VAE_CONFIG).eval()
    torch.manual_seed(seed + 2)
    scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER_CONFIG)
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    if variant == "i2v":
        # Wan 2.1 I2V: 36 input channels (noise 16 + mask 4 + condition latents 16), CLIP vision embeddings
        # (penultimate hidden states, image_dim) through added key/value projections in cross-attention.
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        inner = WAN_TRANSFORMER_CONFIG["num_attention_heads"] * WAN_TRANSFORMER_CONFIG["attention_head_dim"]
        config = dict(WAN_TRANSFORMER_CONFIG, in_channels=36, image_dim=WAN_CLIP_DIM, added_kv_proj_dim=inner)
        transformer = WanTransformer3DModel(**config).eval()
        torch.manual_seed(seed + 3)
        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(hidden_size=WAN_CLIP_DIM, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
        ).eval()
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return WanImageToVideoPipeline(
            transformer=transformer, image_encoder=image_encoder, image_processor=processor, **parts
        )
    if variant in ("2.2-t2v", "2.2-i2v"):
        # Wan 2.2 A14B: two experts of one config, transformer/ for the high-noise steps and transformer_2/ for
        # the low-noise ones, switched at boundary_ratio (diffusers' Wan2.2-{T2V,I2V}-A14B-Diffusers: 0.875, 0.9).
        # I2V takes the 36 channels of 2.1 I2V without CLIP image embeddings.
        config = dict(WAN_TRANSFORMER_CONFIG, in_channels=36) if variant == "2.2-i2v" else WAN_TRANSFORMER_CONFIG
        transformer = WanTransformer3DModel(**config).eval()
        torch.manual_seed(seed + 4)
        transformer_2 = WanTransformer3DModel(**config).eval()
        cls, ratio = (WanImageToVideoPipeline, 0.9) if variant == "2.2-i2v" else (WanPipeline, 0.875)
        return cls(transformer=transformer, transformer_2=transformer_2, boundary_ratio=ratio, **parts)
    if variant == "2.2-ti2v":
        # Wan 2.2 TI2V-5B: the Wan 2.2 VAE (48 latent channels, residual, a 2x2 patchify before its 8x encoder:
        # 16x spatially) and a timestep per video token (expand_timesteps); image-to-video by a clean first frame.
        torch.manual_seed(seed + 1)
        parts["vae"] = AutoencoderKLWan(**WAN22_VAE_CONFIG).eval()
        torch.manual_seed(seed + 3)
        transformer = WanTransformer3DModel(**dict(WAN_TRANSFORMER_CONFIG, in_channels=48, out_channels=48)).eval()
        return WanPipeline(transformer=transformer, expand_timesteps=True, **parts)
    transformer = WanTransformer3DModel(**WAN_TRANSFORMER_CONFIG).eval()
    return WanPipeline(transformer=transformer, **parts)


# builder(seed, variant) -> pipeline
CHECKPOINT_BUILDERS: dict[str, Callable[[int, str], Any]] = {
    "ltx_video": _build_ltx_video,
    "cogvideox": _build_cogvideox,
    "hunyuan_video": _build_hunyuan_video,
    "wan": _build_wan,
}
# Valid variants per model; the first is the default.
CHECKPOINT_VARIANTS: dict[str, tuple[str, ...]] = {
    "ltx_video": ("t2v", "i2v"),
    "cogvideox": tuple(COGVIDEOX_VARIANT_CONFIGS),
    "hunyuan_video": ("t2v", "i2v"),
    "wan": ("t2v", "i2v", "2.2-t2v", "2.2-i2v", "2.2-ti2v"),
}


#: `--variant i2v` for every model: CogVideoX's default image-to-video variant is the 5B one.
VARIANT_ALIASES: dict[str, dict[str, str]] = {"cogvideox": {"i2v": "5b-i2v"}}


def resolve_variant(model_name: str, variant: str | None = None) -> str:
    """`variant`, or `model_name`'s default one; ValueError for an unknown model or variant."""
    if model_name not in CHECKPOINT_BUILDERS:
        raise ValueError(f"unknown model_name {model_name!r}; supported: {', '.join(sorted(CHECKPOINT_BUILDERS))}")
    valid = CHECKPOINT_VARIANTS[model_name]
    if variant is None:
        return valid[0]
    variant = VARIANT_ALIASES.get(model_name, {}).get(variant, variant)
    if variant not in valid:
        raise ValueError(f"unknown variant {variant!r} for {model_name}; valid: {', '.join(valid)}")
    return variant


def build_tiny_pipeline(model_name: str = "ltx_video", seed: int = 0, variant: str | None = None):
    """The in-memory tiny pipeline for `model_name` (random weights, deterministic in `seed`)."""
    variant = resolve_variant(model_name, variant)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        return CHECKPOINT_BUILDERS[model_name](seed, variant)


def write_tiny_checkpoint(
    output_dir: str | Path, model_name: str = "ltx_video", seed: int = 0, variant: str | None = None
) -> Path:
    """Save a tiny random `model_name` checkpoint (`variant`, default the first) in diffusers layout; return the dir."""
    output_dir = Path(output_dir)
    pipe = build_tiny_pipeline(model_name, seed, variant)
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


# --------------------------------------------------------------------------
# Synthetic videos
# --------------------------------------------------------------------------

# (width, height). decord 0.6 mis-reads some small widths (8, 12, 16, 24, 48, 72 among
# 8..320: wrong channel count, then a copy error), so those are avoided here.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (64, 48),
    (56, 72),
    (80, 45),  # written as 80x46: yuv420p needs even sides
    (96, 96),
    (40, 72),
    (88, 40),
    (64, 64),
    (56, 32),
)
FPS_CHOICES = (8, 12, 15, 24, 25, 30)


@dataclass(frozen=True)
class VideoSpec:
    """One synthetic sample; `path` is relative to the dataset root."""

    path: str
    width: int
    height: int
    num_frames: int
    fps: int
    caption: str
    color: str
    shape: str
    direction: str
    background: str


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def synthetic_video_specs(
    num_videos: int = 8, seed: int = 0, sizes: Sequence[tuple[int, int]] | None = None
) -> list[VideoSpec]:
    """The samples `write_synthetic_videos` writes for these arguments (sizes rounded up to even)."""
    rng = np.random.default_rng(seed)
    sizes = list(sizes or DEFAULT_SIZES)
    color_names = list(COLORS)
    specs = []
    for i in range(num_videos):
        w, h = sizes[i % len(sizes)]
        color, background = rng.choice(color_names, size=2, replace=False).tolist()
        shape = str(rng.choice(SHAPES))
        direction = str(rng.choice(DIRECTIONS))
        specs.append(
            VideoSpec(
                path=f"videos/{i:03d}.mp4",
                width=w + w % 2,
                height=h + h % 2,
                num_frames=int(rng.integers(12, 41)),
                fps=int(rng.choice(FPS_CHOICES)),
                caption=f"{_article(color)} {color} {shape} moving {direction} "
                f"on {_article(background)} {background} gradient background",
                color=color,
                shape=shape,
                direction=direction,
                background=background,
            )
        )
    return specs


def render_frames(spec: VideoSpec) -> np.ndarray:
    """uint8 frames (T, H, W, 3): a drifting background gradient with a shape crossing it."""
    t = np.arange(spec.num_frames, dtype=np.float32)[:, None, None]
    y = np.arange(spec.height, dtype=np.float32)[None, :, None]
    x = np.arange(spec.width, dtype=np.float32)[None, None, :]
    bg = np.asarray(COLORS[spec.background], np.float32)
    # Diagonal gradient that drifts over time, between the background colour and a darker shade.
    ramp = 0.5 + 0.5 * np.sin(2 * np.pi * ((x / spec.width + y / spec.height) / 2 + t / spec.num_frames))
    frames = bg * (0.45 + 0.55 * ramp[..., None])

    # Shape centre travels across the frame in `direction`.
    progress = t / max(spec.num_frames - 1, 1)
    size = max(4.0, min(spec.width, spec.height) / 4)
    lo_x, hi_x, lo_y, hi_y = size, spec.width - size, size, spec.height - size
    cx = np.full_like(t, spec.width / 2)
    cy = np.full_like(t, spec.height / 2)
    if spec.direction == "right":
        cx = lo_x + (hi_x - lo_x) * progress
    elif spec.direction == "left":
        cx = hi_x - (hi_x - lo_x) * progress
    elif spec.direction == "down":
        cy = lo_y + (hi_y - lo_y) * progress
    else:
        cy = hi_y - (hi_y - lo_y) * progress
    if spec.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= size**2
    else:
        mask = (np.abs(x - cx) <= size) & (np.abs(y - cy) <= size)
    frames = np.where(mask[..., None], np.asarray(COLORS[spec.color], np.float32), frames)
    return np.clip(frames, 0, 255).astype(np.uint8)


def write_video(path: str | Path, frames: np.ndarray, fps: int) -> None:
    """Write uint8 (T, H, W, 3) frames (even H and W) as H.264 yuv420p mp4."""
    import imageio.v2 as imageio

    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even width and height, got {w}x{h}")
    with imageio.get_writer(
        str(path),
        format="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,  # keep the exact size (imageio would otherwise pad to 16)
        ffmpeg_log_level="error",
        output_params=["-threads", "1"],  # single-threaded x264 is bit-reproducible
    ) as writer:
        for frame in frames:
            writer.append_data(frame)


def write_textured_video(
    path: str | Path, width: int, height: int, num_frames: int, fps: int = 24, seed: int = 0
) -> Path:
    """A synthetic clip with detail like camera footage: render_frames' scene under a fine random texture that pans
    (2 px down, 3 px right per frame), so H.264 spends real bits on it and a resize has edges to smooth. Benchmarks
    and the reduced-size decode test use it as the real-world-ish video."""
    spec = dataclasses.replace(synthetic_video_specs(1, seed, [(width, height)])[0], num_frames=num_frames, fps=fps)
    frames = render_frames(spec).astype(np.int16)
    rng = np.random.default_rng(seed)
    texture = rng.integers(-40, 40, size=(spec.height + 2 * num_frames, spec.width + 3 * num_frames, 1), dtype=np.int16)
    for t in range(num_frames):
        frames[t] += texture[2 * t : 2 * t + spec.height, 3 * t : 3 * t + spec.width]
    write_video(path, np.clip(frames, 0, 255).astype(np.uint8), fps)
    return Path(path)


def write_synthetic_videos(
    output_dir: str | Path,
    num_videos: int = 8,
    seed: int = 0,
    sizes: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Write `num_videos` mp4s under output_dir/videos plus prompts.txt, videos.txt and metadata.csv."""
    output_dir = Path(output_dir)
    (output_dir / "videos").mkdir(parents=True, exist_ok=True)
    specs = synthetic_video_specs(num_videos, seed, sizes)
    for spec in specs:
        write_video(output_dir / spec.path, render_frames(spec), spec.fps)
    (output_dir / "prompts.txt").write_text("".join(s.caption + "\n" for s in specs))
    (output_dir / "videos.txt").write_text("".join(s.path + "\n" for s in specs))
    with open(output_dir / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["caption", "video"])
        writer.writerows([s.caption, s.path] for s in specs)
    return output_dir


def write_mixed_dataset(output_dir: str | Path, seed: int = 0) -> Path:
    """A VideoX-Fun style dataset (metadata.json: file_path, text, type) mixing what users bring, good and bad.

    Good: 6 videos in three aspect ratios (landscape 16:9, portrait 9:16, square), 25-40 frames at varied fps;
    3 images (RGB JPEG, grayscale PNG, RGBA PNG with transparency). Bad: a corrupt .mp4 (random bytes), a
    listed file that does not exist, a 3-frame video (too short for any video bucket), an empty .jpg.
    """
    from PIL import Image

    out = Path(output_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    sizes = [(96, 54), (64, 36), (54, 96), (36, 64), (64, 64), (48, 48)]  # (width, height)
    for i, spec in enumerate(synthetic_video_specs(len(sizes), seed, sizes)):
        spec = dataclasses.replace(spec, num_frames=int(rng.integers(25, 41)))
        write_video(out / spec.path, render_frames(spec), spec.fps)
        rows.append({"file_path": spec.path, "text": spec.caption, "type": "video"})
    img = (rng.random((40, 72, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(out / "images/rgb.jpg", quality=90)
    Image.fromarray(img[..., 0]).save(out / "images/gray.png")
    rgba = np.concatenate([img, np.full((40, 72, 1), 128, np.uint8)], axis=-1)
    rgba[:, :20, 3] = 0
    Image.fromarray(rgba, "RGBA").save(out / "images/alpha.png")
    rows += [
        {"file_path": "images/rgb.jpg", "text": "a photo of noise", "type": "image"},
        {"file_path": "images/gray.png", "text": "a grey photo of noise", "type": "image"},
        {"file_path": "images/alpha.png", "text": "noise with a transparent band", "type": "image"},
    ]
    (out / "videos/corrupt.mp4").write_bytes(rng.bytes(4096))
    short = dataclasses.replace(synthetic_video_specs(1, seed + 1)[0], path="videos/short.mp4", num_frames=3)
    write_video(out / short.path, render_frames(short), short.fps)
    (out / "images/empty.jpg").write_bytes(b"")
    rows += [
        {"file_path": "videos/corrupt.mp4", "text": "a corrupt file", "type": "video"},
        {"file_path": "videos/missing.mp4", "text": "a file that is not there", "type": "video"},
        {"file_path": "videos/short.mp4", "text": "a three-frame clip", "type": "video"},
        {"file_path": "images/empty.jpg", "text": "an empty image", "type": "image"},
    ]
    (out / "metadata.json").write_text(json.dumps(rows, indent=1))
    return out


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ptrain.testing.tiny",
        description="Write a tiny random checkpoint (default) or, with --videos, a synthetic video dataset.",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--model_name", default="ltx_video", choices=sorted(CHECKPOINT_BUILDERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variant",
        default=None,
        help="model variant: "
        + "; ".join(f"{m}: {'|'.join(v)}" for m, v in CHECKPOINT_VARIANTS.items())
        + " (default: the first)",
    )
    parser.add_argument("--videos", action="store_true", help="write the synthetic video dataset instead")
    parser.add_argument("--num_videos", type=int, default=8)
    parser.add_argument(
        "--mixed", action="store_true",
        help="write a mixed dataset instead: videos of three aspect ratios, images, and bad files (metadata.json)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    if args.mixed:
        out = write_mixed_dataset(args.output_dir, seed=args.seed)
        print(f"wrote a mixed dataset (metadata.json) to {out}")
    elif args.videos:
        out = write_synthetic_videos(args.output_dir, num_videos=args.num_videos, seed=args.seed)
        print(f"wrote {args.num_videos} videos + prompts.txt, videos.txt, metadata.csv to {out}")
    else:
        try:
            variant = resolve_variant(args.model_name, args.variant)
        except ValueError as e:
            parser.error(str(e))
        out = write_tiny_checkpoint(args.output_dir, model_name=args.model_name, seed=args.seed, variant=variant)
        print(f"wrote tiny {args.model_name} ({variant}) checkpoint (seed {args.seed}) to {out}")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(out)}  ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
