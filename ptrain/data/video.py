"""Decoding: videos with decord, images with PIL (a 1-frame video); probe, frame sampling, resize + crop."""

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


#: Sizes ptrain refuses as absurd (a decoding bug, a thumbnail, a panorama strip or a decompression bomb).
MIN_SIDE, MAX_ASPECT, MAX_PIXELS = 16, 8.0, 64 * 2**20


def check_size(kind: str, path: Path, height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"{kind} {path}: {width}x{height} is too small (at least {MIN_SIDE} px a side)")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"{kind} {path}: {width}x{height} has an extreme aspect ratio (more than {MAX_ASPECT:g}:1)")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{kind} {path}: {width}x{height} is over {MAX_PIXELS // 2**20} megapixels")


def probe_image(path: Path) -> VideoInfo:
    """Size of an image (after its EXIF rotation) as a 1-frame video, or an exception naming the file."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"image {path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.verify()  # structure check; must come first on a freshly opened file
        with Image.open(path) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError) as e:
        raise ValueError(f"image {path}: cannot decode ({type(e).__name__}: {e})") from e
    if rotated:
        w, h = h, w
    check_size("image", path, h, w)
    return VideoInfo(1, h, w, 0.0)


def load_image(
    path: Path, height: int, width: int, reshape_mode: str = "center_crop", rng: np.random.Generator | None = None
) -> torch.Tensor:
    """-> (C, 1, H, W) float32 in [-1, 1]. EXIF rotation applied; alpha composited on white; grey -> RGB."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        elif im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before RGB
            arr = np.asarray(im, dtype=np.float64)
            im = Image.fromarray((arr * 255.0 / max(arr.max(), 1.0)).astype(np.uint8))
        rgb = np.array(im.convert("RGB"))  # a writable copy
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    x = resize_crop(x, height, width, reshape_mode, rng).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()


def probe_media(path: Path, kind: str) -> VideoInfo:
    return probe_image(path) if kind == "image" else probe(path)


def probe(path: Path) -> VideoInfo:
    """Frame count and size, or an exception naming the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"video {path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"video {path}: empty file (0 bytes)")
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
    check_size("video", path, int(shape[0]), int(shape[1]))
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


def resize_crop(
    frames: torch.Tensor, height: int, width: int, mode: str = "center_crop", rng: np.random.Generator | None = None
) -> torch.Tensor:
    """frames (F, C, h, w) float -> (F, C, height, width).

    center_crop / random_crop: scale to cover the target (aspect kept), then crop; resize: stretch to the target.
    """
    h, w = frames.shape[-2:]
    if mode == "resize":
        nh, nw = height, width
    else:
        scale = max(height / h, width / w)
        nh, nw = max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))
    if (nh, nw) != (h, w):
        frames = F.interpolate(frames, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    if mode == "random_crop":
        rng = rng or np.random.default_rng()
        top, left = int(rng.integers(0, nh - height + 1)), int(rng.integers(0, nw - width + 1))
    else:
        top, left = (nh - height) // 2, (nw - width) // 2
    return frames[:, :, top : top + height, left : left + width]


@dataclass(frozen=True)
class FrameSampling:
    """Which frames of a clip make one sample.

    The window [skip_start, total - skip_end) is optionally resampled to `fps` or thinned to every `stride`-th
    frame; then `num_frames` consecutive frames are taken from its start (with fps or stride), or spread evenly
    over it (without).
    """

    num_frames: int
    fps: float | None = None
    stride: int | None = None
    skip_start: int = 0
    skip_end: int = 0
    random_start: bool = False  # --random_frame_crop: consecutive frames from a random start (seeded)

    def _candidates(self, total: int, source_fps: float) -> list[int] | None:
        start, end = self.skip_start, total - self.skip_end
        if end <= start:
            return []
        if self.fps and source_fps:
            return [start + i for i in fps_indices(end - start, source_fps, self.fps)]
        if self.stride or self.random_start:
            return list(range(start, end, self.stride or 1))
        return None  # spread evenly over the window

    @classmethod
    def from_args(cls, d) -> FrameSampling:
        """From the data flags (--num_frames, --fps, --video_sample_stride, --skip_frames_start/end,
        --random_frame_crop)."""
        return cls(
            d.num_frames, d.fps, d.video_sample_stride, d.skip_frames_start, d.skip_frames_end, d.random_frame_crop
        )

    def available(self, total: int, source_fps: float = 0.0) -> int:
        """How many frames the sampling can draw from a clip of `total` frames."""
        c = self._candidates(total, source_fps)
        return max(0, total - self.skip_start - self.skip_end) if c is None else len(c)

    def indices(self, total: int, source_fps: float = 0.0, rng: np.random.Generator | None = None) -> list[int]:
        c = self._candidates(total, source_fps)
        if c is None:
            return [self.skip_start + i for i in even_indices(total - self.skip_start - self.skip_end, self.num_frames)]
        if len(c) < self.num_frames:
            raise ValueError(f"clip has {len(c)} usable frames, fewer than --num_frames {self.num_frames}")
        first = 0
        if self.random_start:
            first = int((rng or np.random.default_rng()).integers(0, len(c) - self.num_frames + 1))
        return c[first : first + self.num_frames]

    def describe(self) -> str:
        how = f"at {self.fps} fps" if self.fps else f"every {self.stride} frames" if self.stride else "spread evenly"
        if self.random_start:
            how = f"{how if (self.fps or self.stride) else 'consecutive'}, from a random start"
        skip = f", skipping {self.skip_start} first / {self.skip_end} last" if self.skip_start or self.skip_end else ""
        return f"{self.num_frames} frames {how}{skip}"


def load_clip(
    path: Path,
    sampling: FrameSampling | int,
    height: int,
    width: int,
    fps: float | None = None,
    reshape_mode: str = "center_crop",
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """-> (C, F, H, W) float32 in [-1, 1]. `sampling` may be just a frame count (spread evenly, or at `fps`)."""
    if isinstance(sampling, int):
        sampling = FrameSampling(sampling, fps)
    vr = _reader(path)
    idx = sampling.indices(len(vr), float(vr.get_avg_fps() or 0.0), rng)
    frames = vr.get_batch(idx).asnumpy()  # (F, h, w, 3) uint8
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = resize_crop(x, height, width, reshape_mode, rng).clamp(-1.0, 1.0)
    return x.permute(1, 0, 2, 3).contiguous()
