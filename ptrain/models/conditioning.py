"""Masks and conditioning inputs for --train_mode i2v / inpaint, shared by the model specs.

Convention (as diffusers' Wan and HunyuanVideo image-to-video pipelines build their masks): a *keep* mask is 1
where the content is given to the model and 0 where the model generates it. Image-to-video is the keep mask of
the first frame only.

Inpaint training draws one mask type per sample from that sample's own generator (so the masks, like the noise,
do not depend on the parallel layout), with the probabilities of --inpaint_mask_probs:

- block: a random rectangle (a quarter to three quarters of each side) is generated in every frame;
- frames: a random contiguous range of frames is generated (never the whole clip), the others are given;
- first_frame: only the first frame is given (image-to-video);
- full: nothing is given (text-to-video through the inpaint model).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ptrain.config import MASK_TYPES


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand(1, generator=g))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def sample_keep_mask(
    mode: str, probs: dict[str, float], shape: tuple[int, ...], generators: list[torch.Generator]
) -> tuple[torch.Tensor, list[str]]:
    """Pixel-space keep masks (B, 1, F, H, W) in float32 for videos of `shape` (B, C, F, H, W), and the mask type
    drawn for each sample. i2v always keeps the first frame; inpaint draws a type from `probs`. The draws are real
    host values also while the memory planner simulates the step on fake tensors (its sizes depend on them)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return _sample_keep_mask(mode, probs, shape, generators)


def _sample_keep_mask(mode, probs, shape, generators):
    b, _, f, h, w = shape
    keep = torch.zeros(b, 1, f, h, w)
    names = [k for k in MASK_TYPES if probs.get(k, 0) > 0]
    weights = torch.tensor([float(probs[k]) for k in names])
    kinds = []
    for i, g in enumerate(generators):
        kind = "first_frame" if mode == "i2v" else names[int(torch.multinomial(weights, 1, generator=g))]
        if kind == "frames" and f < 2:
            kind = "full"  # a single frame (an image) has no range to keep
        if kind == "first_frame":
            keep[i, :, 0] = 1
        elif kind == "block":
            bh, bw = max(1, round(h * (0.25 + 0.5 * _uniform(g)))), max(1, round(w * (0.25 + 0.5 * _uniform(g))))
            top, left = _randint(g, 0, h - bh), _randint(g, 0, w - bw)
            keep[i] = 1
            keep[i, :, :, top : top + bh, left : left + bw] = 0
        elif kind == "frames":
            start = _randint(g, 0, f - 1)
            end = _randint(g, start + 1, f if start > 0 else f - 1)  # [start, end) generated, never all frames
            keep[i] = 1
            keep[i, :, start:end] = 0
        kinds.append(kind)
    return keep, kinds


def frame_groups(keep: torch.Tensor, temporal: int) -> torch.Tensor:
    """(B, 1, F, H, W) -> (B, temporal, F', H, W): the pixel frames behind each latent frame of a causal video VAE
    (latent frame 0 <- pixel frame 0, repeated; latent frame j <- pixel frames (j-1)t+1 .. jt), as diffusers'
    WanImageToVideoPipeline packs its mask."""
    first = keep[:, :, :1].repeat_interleave(temporal, dim=2)
    full = torch.cat([first, keep[:, :, 1:]], dim=2)
    b, _, n, h, w = full.shape
    if n % temporal:
        raise ValueError(f"{keep.shape[2]} frames are not {temporal}k+1")
    return full.view(b, n // temporal, temporal, h, w).transpose(1, 2)


def latent_keep_mask(keep: torch.Tensor, latent_shape: tuple[int, ...], temporal: int, packed: bool = False):
    """The pixel keep mask on the latent grid (B, 1 or `temporal` if packed, F', h, w): a latent cell is given only
    where all of its pixels are (min-pooling), so no generated pixel leaks in as given content."""
    grouped = frame_groups(keep, temporal)  # (B, t, F', H, W)
    b, t, f, h, w = grouped.shape
    lh, lw = latent_shape[-2:]
    if h % lh or w % lw:
        raise ValueError(f"pixel size {h}x{w} is not a multiple of the latent size {lh}x{lw}")
    cells = -F.max_pool2d(-grouped.reshape(b, t * f, h, w), kernel_size=(h // lh, w // lw))
    cells = cells.view(b, t, f, lh, lw)
    return cells if packed else cells.amin(dim=1, keepdim=True)


def uint8_images(frames: torch.Tensor) -> list[np.ndarray]:
    """Frames (B, 3, H, W) in [-1, 1] -> B uint8 HWC arrays, the input the pipelines' image processors take."""
    pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return list(pixels.cpu().numpy())
