"""Validation sampling during training with the model's diffusers pipeline and the *training* transformer.

The (prompt, video) list is split over the data-parallel ranks: each samples its share with the same seeds
a single process would use (FSDP gathers the sharded weights as the transformer runs, so every rank makes the
same number of pipeline calls; LoRA stays active; the context-parallel ranks of one share sample together) and
writes the mp4 files under output_dir/validation/step-N/; rank 0 gathers the list and logs a frame strip of each
video to tensorboard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ptrain.collective import raise_if_any_failed
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
    if v.validation_dataset_file is not None and Path(v.validation_dataset_file).suffix.lower() == ".txt":
        from ptrain.data.sources import read_lines

        # one prompt per line (CogVideo's finetune scripts' prompts.txt), read as the data's line files are
        lines = read_lines(Path(v.validation_dataset_file))
        items += [item(line) for line in lines if line]
        if not any(lines):
            raise ConfigError(f"--validation_dataset_file {v.validation_dataset_file}: no prompt in it")
    elif v.validation_dataset_file is not None:
        from ptrain.data.sources import read_table

        for row in read_table(Path(v.validation_dataset_file)):
            prompt = str(row.get("prompt") or row.get("caption") or "").strip()
            if not prompt:
                raise ConfigError(f"--validation_dataset_file {v.validation_dataset_file}: a row has no prompt column")
            items.append(item(prompt, row))
            image = str(row.get("image") or "").strip()
            if image:
                items[-1].image = Path(v.validation_dataset_file).parent / image
    opened: dict[Path, None] = {}
    for it in items:
        if it.image is not None and not it.image.is_file():
            raise ConfigError(f"validation image {it.image}: no such file")
        if it.image is not None and it.image not in opened:  # read now: at the first validation the steps since the
            opened[it.image] = _check_image(it.image)  # last checkpoint would be lost
    if mode == "normal" and any(it.image is not None for it in items):
        raise ConfigError("validation images (--validation_images, or an image column in --validation_dataset_file) "
                          "are first frames for --train_mode i2v / inpaint; this run is --train_mode normal "
                          "(text to video): leave them out, or train an image-to-video mode")  # fmt: skip
    if mode in ("i2v", "inpaint") and any(it.image is None for it in items):
        raise ConfigError(
            f"--train_mode {mode} samples validation videos from a first frame: give --validation_images (or an "
            "image column in --validation_dataset_file)"
        )
    return items


def _check_image(path: Path) -> None:
    """ConfigError unless `path` is an image PIL decodes (a video or a truncated file is refused at start-up)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"validation image {path}: not an image ptrain can read ({e}); give a PNG or JPEG "
                          "frame") from None  # fmt: skip


_AS_VALIDATION = {"--num_frames": "--validation_num_frames", "--height": "--validation_height",
                  "--width": "--validation_width"}


def check_validation_shapes(check, items: list[ValidationItem]) -> None:
    """Each validation video's size against the model's rules (`check`(frames, height, width): ShapeRules.check,
    a spec's check_shape), at start-up and in --dry_run: a size the pipeline refuses would otherwise stop the run
    at its first validation, the steps after the last checkpoint lost. The error names the validation flag."""
    for n, it in enumerate(items):
        try:
            check(it.num_frames, it.height, it.width)
        except ConfigError as e:
            text = re.sub(r"--(num_frames|height|width)\b", lambda m: _AS_VALIDATION[m.group(0)], str(e))
            raise ConfigError(f"validation prompt {n} ({it.prompt[:40]!r}): {text} (the validation size comes from "
                              "--validation_height / --validation_width / --validation_num_frames or the row of "
                              "--validation_dataset_file, else the training's)") from None  # fmt: skip


@contextlib.contextmanager
def tiled_decode(vae, enabled: bool = True):
    """The VAE's tiling on for the block (validation: the training state is resident while it decodes, and an
    untiled decode can peak above the training step: 14.7 GiB of activations for CogVideoX-5B at 49x480x720,
    3.8 GiB tiled, simulated by ptrain/planner.py), the previous setting restored after. `enabled` False
    (--enable_tiling off) leaves the VAE as it is."""
    if not enabled or not hasattr(vae, "enable_tiling") or getattr(vae, "use_tiling", False):
        yield
        return
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.disable_tiling()


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"


def validation_plan(items: list[ValidationItem], videos: int, dp: int, dp_rank: int) -> list[tuple[int, int, bool]]:
    """What one data-parallel rank samples: (prompt index, video index, kept) in order.

    Video j of the (prompt, video) list is kept by dp rank j % dp; every rank samples the same number of videos
    (one with fewer repeats its round's first video, then drops it), so a sharded transformer's collectives stay
    in step. If the prompts' step counts differ (--validation_dataset_file), every rank samples every video
    (same reason) and keeps its own."""
    pairs = [(i, k) for i in range(len(items)) for k in range(videos)]
    if dp > 1 and len({items[i].num_inference_steps for i, _ in pairs}) > 1:
        return [(i, k, j % dp == dp_rank) for j, (i, k) in enumerate(pairs)]
    plan = []
    for first in range(0, len(pairs), dp):
        j = first + dp_rank
        plan.append((*pairs[j], True) if j < len(pairs) else (*pairs[first], False))
    return plan


def frame_strip(frames: np.ndarray, count: int = 4) -> np.ndarray:
    """`count` frames spread over the video, side by side: (H, count x W, 3) (one tensorboard image per video)."""
    idx = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    return np.concatenate([np.asarray(frames[t]) for t in idx], axis=1)


@torch.no_grad()
def run_validation(spec, transformer, items: list[ValidationItem], args: ValidationArgs, step: int,
                   output_dir: Path, seed: int, metrics=None, dp: int = 1, dp_rank: int = 0,
                   writes: bool = True) -> list[Path]:  # fmt: skip
    """Sample the validation videos, split over the `dp` data-parallel ranks (validation_plan; the context-parallel
    ranks of one dp rank sample together and only the one with `writes` writes). Video k of prompt i is seeded
    seed + 1000 i + k whatever the layout. Rank 0 gathers the written files and logs a frame strip of each to
    tensorboard; it returns them all (the other ranks: []). Collective when several processes run."""
    from diffusers.utils import export_to_video

    target = Path(output_dir) / "validation" / f"step-{step}"
    was_training = transformer.training
    transformer.eval()
    written = []
    extra = spec.validation_kwargs()
    if args.validation_guidance_scale is not None:
        extra["guidance_scale"] = args.validation_guidance_scale
    err = None  # a write error (disk full, unwritable folder): sampling goes on (the ranks' forwards are
    # collective), the writing stops, and every rank raises it after the loop
    try:
        for i, k, kept in validation_plan(items, args.num_validation_videos, dp, dp_rank):
            it = items[i]
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
            if kept and writes and err is None:
                path = target / f"{i:02d}-{k}-{_slug(it.prompt)}.mp4"
                try:
                    target.mkdir(parents=True, exist_ok=True)
                    export_to_video(list(frames), str(path), fps=spec.fps)
                except OSError as e:
                    err = e
                    continue
                info = {"prompt": it.prompt, "seed": seed + 1000 * i + k, "height": it.height, "width": it.width,
                        "num_frames": it.num_frames, "frames_written": len(frames),
                        "num_inference_steps": it.num_inference_steps,
                        **({"image": str(it.image)} if it.image is not None else {})}  # fmt: skip
                written.append((str(path), f"{i:02d}-{k}", frame_strip(frames), info))
    finally:
        transformer.train(was_training)
    raise_if_any_failed(err, f"writing the validation videos to {target}")
    return _gather_written(written, target, step, metrics)


VALIDATION_INDEX = "prompts.json"


def _gather_written(written: list, target: Path, step: int, metrics) -> list[Path]:
    """Rank 0 collects every rank's (path, tag, frame strip, info), logs the strips and the file list, and writes
    target/prompts.json: for each video its prompt, seed, size, frames asked and written, steps (and image). A
    pipeline that returns another frame count than asked (HunyuanVideo-I2V drops 4, CogVideoX 1.0 decodes an even
    latent count to 4 frames each) is said in the log."""
    multi = dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if multi else 0
    gathered = [None] * dist.get_world_size() if multi and rank == 0 else None
    if multi:
        dist.gather_object([(rank, *w) for w in written], gathered, dst=0)
    else:
        gathered = [[(0, *w) for w in written]]
    if rank != 0:
        raise_if_any_failed(None, f"writing {target / VALIDATION_INDEX}")
        return []
    rows = sorted((row for part in gathered for row in part), key=lambda row: row[2])
    for _, _, tag, strip, _ in rows:
        if metrics is not None:
            metrics.log_image(f"validation/{tag}", strip, step)
    log.info("validation: %d videos in %s (%s)", len(rows), target,
             ", ".join(f"{Path(p).name} by rank {r}" for r, p, _, _, _ in rows))  # fmt: skip
    for _, p, _, _, info in rows:
        if info["frames_written"] != info["num_frames"]:
            log.warning("validation: %s has %d frames, not the %d asked: the model's pipeline returns that many for "
                        "this frame count", Path(p).name, info["frames_written"], info["num_frames"])  # fmt: skip
    err = None
    if rows:
        try:
            index = {Path(p).name: info for _, p, _, _, info in rows}
            (target / VALIDATION_INDEX).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            err = e
    raise_if_any_failed(err, f"writing {target / VALIDATION_INDEX}")
    return [Path(p) for _, p, _, _, _ in rows]
