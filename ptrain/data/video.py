"""Video decoding with decord: probe, even frame sampling, aspect-preserving resize + center crop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    height: int
    width: int
    fps: float = 0.0

    def frames_at(self, fps: float | None) -> int:
        """How many frames the clip has once resampled to `fps` (unchanged without one)."""
        if not fps or not self.fps:
            return self.num_frames
        return len(fps_indices(self.num_frames, self.fps, fps))


def _reader(path: Path):
    """A decord reader that yields (H, W, 3) frames.

    decord 0.6 misdecodes some narrow widths (seen: 8, 12, 16, 24, 48, 72 px) with a 4th channel; such a
    video is reopened with decord resizing it to a width that is a multiple of 64 (aspect kept), which
    decodes correctly; the frames are resized to the training size afterwards anyway.
    """
    import decord

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    shape = vr[0].shape
    if len(shape) == 3 and shape[2] != 3:
        h, w = shape[:2]
        new_w = -(-w // 64) * 64
        new_h = max(2, round(h * new_w / w / 2) * 2)
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, width=new_w, height=new_h)
    return vr


def probe(path: Path) -> VideoInfo:
    """Frame count and size, or an exception naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"video {path}: no such file")
    try:
        vr = _reader(path)
        n = len(vr)
        shape = vr[0].shape
    except Exception as e:  # decord raises its own DECORDError / RuntimeError types
        raise ValueError(f"video {path}: cannot decode ({type(e).__name__}: {e})") from e
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"video {path}: decoder returned frames of shape {tuple(shape)}, not (H, W, 3)")
    if n < 1:
        raise ValueError(f"video {path}: no frames")
    return VideoInfo(n, int(shape[0]), int(shape[1]), float(vr.get_avg_fps() or 0.0))


def even_indices(total: int, num_frames: int) -> list[int]:
    """`num_frames` indices spread evenly over [0, total) (first and last frame included)."""
    if total < num_frames:
        raise ValueError(f"clip has {total} frames, fewer than --num_frames {num_frames}")
    if num_frames == 1:
        return [0]
    return [round(i * (total - 1) / (num_frames - 1)) for i in range(num_frames)]


def fps_indices(total: int, source_fps: float, target_fps: float) -> list[int]:
    """Source frame index of each frame of the clip resampled to `target_fps` (nearest frame in time)."""
    step = source_fps / target_fps
    count = int((total - 1) / step + 1e-9) + 1
    return [min(total - 1, int(k * step + 0.5)) for k in range(count)]


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """frames (F, C, h, w) float -> (F, C, height, width): scale to cover, then crop the centre."""
    h, w = frames.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    return frames[:, :, top : top + height, left : left + width]


def clip_indices(total: int, num_frames: int, source_fps: float = 0.0, fps: float | None = None) -> list[int]:
    """Frames of one sample: --num_frames consecutive frames at --fps from the start, or spread evenly."""
    if fps and source_fps:
        resampled = fps_indices(total, source_fps, fps)
        if len(resampled) < num_frames:
            raise ValueError(f"clip has {len(resampled)} frames at --fps {fps}, fewer than --num_frames {num_frames}")
        return resampled[:num_frames]
    return even_indices(total, num_frames)


def load_clip(path: Path, num_frames: int, height: int, width: int, fps: float | None = None) -> torch.Tensor:
    """-> (C, F, H, W) float32 in [-1, 1]."""
    vr = _reader(path)
    idx = clip_indices(len(vr), num_frames, float(vr.get_avg_fps() or 0.0), fps)
    frames = vr.get_batch(idx).asnumpy()  # (F, h, w, 3) uint8
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = resize_center_crop(x, height, width).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()
