"""Validation sampling during training with the model's diffusers pipeline and the *training* transformer.

Every rank runs the same pipeline call (FSDP gathers the sharded weights as the
transformer runs; LoRA stays active); rank 0 writes the mp4 files under
output_dir/validation/step-N/ and logs a frame to tensorboard.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ptrain.config import ConfigError, DataArgs, ValidationArgs

log = logging.getLogger("ptrain")


@dataclass
class ValidationItem:
    prompt: str
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    image: Path | None = None  # first frame (--train_mode i2v / inpaint)


def load_validation_items(v: ValidationArgs, d: DataArgs, mode: str = "normal") -> list[ValidationItem]:
    def item(prompt: str, row: dict | None = None) -> ValidationItem:
        row = row or {}

        def pick(key: str, default: int) -> int:
            value = row.get(key)
            return int(value) if value not in (None, "") else default

        return ValidationItem(
            prompt=prompt,
            height=pick("height", v.validation_height or d.height),
            width=pick("width", v.validation_width or d.width),
            num_frames=pick("num_frames", v.validation_num_frames or d.num_frames),
            num_inference_steps=pick("num_inference_steps", v.validation_num_inference_steps),
        )

    items = []
    if v.validation_prompts:
        items += [item(p.strip()) for p in v.validation_prompts.split(v.validation_prompt_separator) if p.strip()]
        images = [
            Path(p.strip()) for p in (v.validation_images or "").split(v.validation_prompt_separator) if p.strip()
        ]
        if images:
            if len(images) not in (1, len(items)):
                raise ConfigError(
                    f"--validation_images: {len(images)} images for {len(items)} prompts (give one, or one per prompt)"
                )
            for i, it in enumerate(items):
                it.image = images[i if len(images) > 1 else 0]
    if v.validation_dataset_file is not None:
        from ptrain.data.sources import read_table

        for row in read_table(Path(v.validation_dataset_file)):
            prompt = str(row.get("prompt") or row.get("caption") or "").strip()
            if not prompt:
                raise ConfigError(f"--validation_dataset_file {v.validation_dataset_file}: a row has no prompt column")
            items.append(item(prompt, row))
            image = str(row.get("image") or "").strip()
            if image:
                items[-1].image = Path(v.validation_dataset_file).parent / image
    for it in items:
        if it.image is not None and not it.image.is_file():
            raise ConfigError(f"validation image {it.image}: no such file")
    if mode in ("i2v", "inpaint") and any(it.image is None for it in items):
        raise ConfigError(
            f"--train_mode {mode} samples validation videos from a first frame: give --validation_images (or an "
            "image column in --validation_dataset_file)"
        )
    return items


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"


@torch.no_grad()
def run_validation(spec, transformer, items: list[ValidationItem], args: ValidationArgs, step: int,
                   output_dir: Path, seed: int, metrics=None) -> list[Path]:  # fmt: skip
    from diffusers.utils import export_to_video

    rank0 = dist.get_rank() == 0
    target = Path(output_dir) / "validation" / f"step-{step}"
    if rank0:
        target.mkdir(parents=True, exist_ok=True)
    was_training = transformer.training
    transformer.eval()
    written = []
    extra = spec.validation_kwargs()
    if args.validation_guidance_scale is not None:
        extra["guidance_scale"] = args.validation_guidance_scale
    try:
        for i, it in enumerate(items):
            for k in range(args.num_validation_videos):
                gen = torch.Generator().manual_seed(seed + 1000 * i + k)
                image = {}
                if it.image is not None:
                    from PIL import Image

                    with Image.open(it.image) as im:
                        image = {"image": im.convert("RGB")}
                frames = spec.sampling_pipe(
                    prompt=it.prompt, height=it.height, width=it.width, num_frames=it.num_frames,
                    num_inference_steps=it.num_inference_steps, generator=gen, output_type="np", **image, **extra,
                ).frames[0]  # fmt: skip
                if rank0:
                    path = target / f"{i:02d}-{k}-{_slug(it.prompt)}.mp4"
                    export_to_video(list(frames), str(path), fps=spec.fps)
                    written.append(path)
                    if metrics is not None:
                        metrics.log_image(f"validation/{i:02d}-{k}", frames[0], step)
    finally:
        transformer.train(was_training)
    if rank0:
        log.info("validation: %d videos in %s", len(written), target)
    dist.barrier()
    return written
