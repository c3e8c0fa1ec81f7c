"""Sample shapes: the model's shape rules, and the bucket (frames x height x width) each sample trains at.

Without --enable_bucket every sample has the one shape --num_frames x --height x --width. With it:

- aspect-ratio buckets at a pixel area (--height x --width, or --video_sample_size^2 / --image_sample_size^2),
  sides a multiple of the model's factor (VAE compression x patch size), aspect ratios up to 4:1; a sample goes
  to the bucket nearest its own aspect ratio, so frames are scaled and cropped, never stretched;
- frame buckets: the largest count the model accepts (e.g. 8k+1 for LTX-Video) that the clip has, capped by
  --num_frames, or by the token budget of --training_with_video_token_length; an image is a 1-frame sample;
- --video_resolution_buckets FxHxW ...: an explicit list instead;
- --random_hw_adapt: each sample's area is drawn (seeded by its index, fixed across epochs) from
  (1, 0.75, 0.5)^2 x the sample size, at least 256^2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np

from ptrain.config import ConfigError, DataArgs
from ptrain.errors import FixedSizeError

MAX_BUCKET_ASPECT = 4.0
HW_ADAPT_SCALES = (1.0, 0.75, 0.5)
HW_ADAPT_MIN_SIDE = 256


@dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    @classmethod
    def parse(cls, text: str) -> Bucket:
        f, h, w = (int(x) for x in text.lower().split("x"))
        return cls(f, h, w)


@dataclass
class ShapeRules:
    """What shapes a model accepts, from its `check_shape` (raising ConfigError) and its token count."""

    check: Callable[[int, int, int], None]
    tokens: Callable[[int, int, int], int]  # transformer sequence length of one sample of that shape
    max_frames: int = 1024
    #: (channels, frames, height, width) of the VAE latent of a sample of that shape (None: not known)
    latent_shape: Callable[[int, int, int], tuple[int, int, int, int]] | None = None
    #: the model's default text sequence length (--max_sequence_length's default)
    text_sequence_length: int | None = None

    def __post_init__(self) -> None:
        self._frame_ok = cache(self._frame_ok_uncached)
        valid = [f for f in range(1, 4 * 64 + 2) if self._frame_ok(f)]
        if not valid:
            raise ConfigError("the model accepts no frame count up to 257 (check its VAE config)")
        self.multiple = next(m for m in range(1, 513) if self._ok(valid[0], m, m))

    def _ok(self, f: int, h: int, w: int) -> bool:
        """Whether the probe's frame count and side multiple suit the model (a one-size model's refusal of the
        probe's size says nothing about those: `check` still refuses every other size)."""
        try:
            self.check(f, h, w)
            return True
        except FixedSizeError:
            return True
        except ConfigError:
            return False

    def _frame_ok_uncached(self, f: int) -> bool:
        return self._ok(f, 4096, 4096)  # 4096 is a multiple of every model's spatial factor

    def frame_ok(self, f: int) -> bool:
        return self._frame_ok(f)

    def largest_frames(self, limit: int, above: int = 0) -> int | None:
        """The largest accepted frame count in (above, limit], or None."""
        return next((f for f in range(limit, above, -1) if self._frame_ok(f)), None)

    def shortest_video(self) -> int:
        """The smallest accepted count above 1 (a video bucket; 1 frame is an image)."""
        return next(f for f in range(2, 4096) if self._frame_ok(f))


def aspect_buckets(area: int, multiple: int, max_aspect: float = MAX_BUCKET_ASPECT) -> list[tuple[int, int]]:
    """(height, width) pairs of about `area` pixels, sides multiples of `multiple`, aspect within max_aspect; the
    same shapes wide as tall (each height's width is rounded, so stepping the height alone gave portrait shapes a
    finer choice of aspect ratios than landscape ones: 54 shapes at 480x720 where there are 72, and 16x48 without
    48x16 at 32x32)."""
    out = set()
    h = multiple
    while h <= math.sqrt(area * max_aspect) + multiple:
        w = max(multiple, round(area / h / multiple) * multiple)
        if 1 / max_aspect <= h / w <= max_aspect:
            out.update(((h, w), (w, h)))
        h += multiple
    if not out:  # area below one multiple squared: the smallest square
        out.add((multiple, multiple))
    return sorted(out)


def _nearest(options: list[tuple[int, int]], height: int, width: int, area: int) -> tuple[int, int]:
    target = math.log(height / width)
    return min(options, key=lambda hw: (round(abs(math.log(hw[0] / hw[1]) - target), 6), abs(hw[0] * hw[1] - area)))


class BucketPlan:
    """Assigns every sample its training shape (one Bucket), or a reason it cannot train."""

    def __init__(self, args: DataArgs, rules: ShapeRules | None, num_frames: int | None = None) -> None:
        self.args, self.rules = args, rules
        self.num_frames = num_frames or args.num_frames
        self.explicit = [Bucket.parse(b) for b in args.video_resolution_buckets or []]
        self.enabled = bool(args.enable_bucket or self.explicit)
        if self.enabled and rules is None:
            raise ConfigError("--enable_bucket needs the model's shape rules")
        for b in self.explicit:
            try:
                rules.check(b.frames, b.height, b.width)
            except ConfigError as e:
                raise ConfigError(f"--video_resolution_buckets {b}: {e}") from e
        self._areas: dict[str, list[int]] = {}
        if self.enabled and not self.explicit:
            video = (args.video_sample_size**2) if args.video_sample_size else args.height * args.width
            image = (args.image_sample_size**2) if args.image_sample_size else video
            for kind, base in (("video", video), ("image", image)):
                if args.random_hw_adapt:
                    areas = [max(HW_ADAPT_MIN_SIDE**2, round(base * s * s)) for s in HW_ADAPT_SCALES]
                    self._areas[kind] = sorted(set(areas), reverse=True)
                else:
                    self._areas[kind] = [base]
            self._grid = {a: aspect_buckets(a, rules.multiple) for ks in self._areas.values() for a in ks}

    def describe(self) -> str:
        if not self.enabled:
            return f"one shape: {self.num_frames}x{self.args.height}x{self.args.width}"
        if self.explicit:
            return "explicit buckets " + " ".join(str(b) for b in self.explicit)
        a = self.args
        areas = ", ".join(f"{k} {'/'.join(str(round(math.sqrt(x))) for x in v)}^2" for k, v in self._areas.items())
        budget = f", frames within {a.token_sample_size}^2 x {self.num_frames} pixels" if (
            a.training_with_video_token_length) else ""  # fmt: skip
        return (
            f"aspect-ratio buckets at {areas} px (sides multiple of {self.rules.multiple}), "
            f"up to {self.num_frames} frames{budget}"
        )

    def _frame_budget(self, height: int, width: int) -> int:
        if not self.args.training_with_video_token_length:
            return self.num_frames
        t = self.args.token_sample_size
        return max(1, min(self.num_frames, int(t * t * self.num_frames / (height * width))))

    def assign(self, kind: str, height: int, width: int, frames_available: int, index: int = 0) -> Bucket:
        """The sample's bucket; ValueError with the reason if it has none."""
        a = self.args
        if not self.enabled:
            if kind == "image" and self.num_frames > 1:
                raise ValueError(
                    f"image (1 frame) < --num_frames {self.num_frames}: add --enable_bucket to train images as "
                    "1-frame samples"
                )
            if frames_available < self.num_frames:
                raise ValueError(f"{frames_available} usable frames < --num_frames {self.num_frames}")
            return Bucket(self.num_frames, a.height, a.width)
        if kind == "image" and not self.rules.frame_ok(1):
            raise ValueError("image: this model does not train 1-frame samples (1 frame is not a valid count)")
        if self.explicit:
            fits = [
                b for b in self.explicit if (b.frames == 1 if kind == "image" else 1 < b.frames <= frames_available)
            ]
            if not fits:
                have = "an image" if kind == "image" else f"{frames_available} usable frames"
                raise ValueError(f"{have}: no bucket in --video_resolution_buckets fits")
            target = math.log(height / width)
            return min(
                fits,
                key=lambda b: (round(abs(math.log(b.height / b.width) - target), 6), -b.frames,
                               abs(b.height * b.width - height * width)),
            )  # fmt: skip
        areas = self._areas[kind]
        area = areas[0]
        if len(areas) > 1:  # --random_hw_adapt: fixed per sample index (same in every epoch and layout)
            area = areas[int(np.random.default_rng([index, 0x4A7]).integers(0, len(areas)))]
        h, w = _nearest(self._grid[area], height, width, area)
        if kind == "image":
            return Bucket(1, h, w)
        shortest = self.rules.shortest_video()
        f = self.rules.largest_frames(min(frames_available, self._frame_budget(h, w)), above=1)
        if f is None:
            if frames_available < shortest:
                raise ValueError(
                    f"too short: {frames_available} usable frames, the shortest video bucket has {shortest}"
                )
            raise ValueError(f"{h}x{w} leaves no frame budget (--training_with_video_token_length)")
        return Bucket(f, h, w)


def histogram(buckets: list[Bucket], kinds: list[str]) -> dict[Bucket, dict[str, int]]:
    out: dict[Bucket, dict[str, int]] = {}
    for b, k in zip(buckets, kinds):
        out.setdefault(b, {"video": 0, "image": 0})[k] += 1
    return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))
