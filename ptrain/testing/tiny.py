"""Tiny random checkpoints and synthetic test videos.

This module owns the offline fixtures every test and smoke run uses:

* `write_tiny_checkpoint` builds a randomly initialised, few-hundred-KB model
  saved in the exact diffusers folder layout of the real checkpoint
  (model_index.json, transformer/, vae/, text_encoder/, tokenizer/,
  scheduler/), so loading code is exercised unchanged. The tokenizer is built
  locally from a small word list; nothing is downloaded.
* `write_synthetic_videos` writes H.264 mp4 files of moving coloured shapes in
  varied sizes, lengths and frame rates, plus the caption/video index files
  (CogVideoX-style prompts.txt + videos.txt, and metadata.csv).

CLI:
    python -m ptrain.testing.tiny --model_name ltx_video --output_dir DIR [--seed 0]
    python -m ptrain.testing.tiny --videos --output_dir DIR [--num_videos 8] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Callable, Sequence
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


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
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
    return T5EncoderModel(config).eval()


def _build_ltx_video(seed: int):
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
    return LTXPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


CHECKPOINT_BUILDERS: dict[str, Callable[[int], Any]] = {"ltx_video": _build_ltx_video}


def build_tiny_pipeline(model_name: str = "ltx_video", seed: int = 0):
    """The in-memory tiny pipeline for `model_name` (random weights, deterministic in `seed`)."""
    if model_name not in CHECKPOINT_BUILDERS:
        raise ValueError(
            f"unknown model_name {model_name!r}; supported: {', '.join(sorted(CHECKPOINT_BUILDERS))}"
        )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
        return CHECKPOINT_BUILDERS[model_name](seed)


def write_tiny_checkpoint(output_dir: str | Path, model_name: str = "ltx_video", seed: int = 0) -> Path:
    """Save a tiny random `model_name` checkpoint in diffusers layout to `output_dir`; return it."""
    output_dir = Path(output_dir)
    pipe = build_tiny_pipeline(model_name, seed)
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
    parser.add_argument("--videos", action="store_true", help="write the synthetic video dataset instead")
    parser.add_argument("--num_videos", type=int, default=8)
    args = parser.parse_args(argv)

    if args.videos:
        out = write_synthetic_videos(args.output_dir, num_videos=args.num_videos, seed=args.seed)
        print(f"wrote {args.num_videos} videos + prompts.txt, videos.txt, metadata.csv to {out}")
    else:
        out = write_tiny_checkpoint(args.output_dir, model_name=args.model_name, seed=args.seed)
        print(f"wrote tiny {args.model_name} checkpoint (seed {args.seed}) to {out}")
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(out)}  ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
