"""Decoding: videos with decord, images with PIL (a 1-frame video); probe, frame sampling, resize + crop."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class VideoInfo:
    """A media file as the scan saw it. `height` x `width` is the size as displayed: rotation, mirroring and the
    pixel aspect ratio applied (what buckets and crops use). decord applies a display matrix's rotation but not
    its mirroring, nor a pixel aspect ratio: `decoded` is the size of decord's frames where it differs from the
    displayed one (non-square pixels), `flip` the mirroring to apply to them ("hflip" / "vflip", or ""),
    `times` each frame's start time in seconds for a variable-frame-rate video (None for a constant rate),
    `field` the first field's row parity of an interlaced video (0: top first, 1: bottom first; None: progressive)
    and `hdr` its HDR transfer ("HLG" / "PQ", or "": decord converts without tone mapping)."""

    num_frames: int
    height: int
    width: int
    fps: float = 0.0
    decoded: tuple[int, int] | None = None
    flip: str = ""
    times: tuple[float, ...] | None = field(default=None, repr=False)
    field: int | None = None
    hdr: str = ""

    @property
    def decoded_size(self) -> tuple[int, int]:
        return self.decoded or (self.height, self.width)


@dataclass(frozen=True)
class Geometry:
    """What decord leaves out of how a video is displayed: the pixel aspect ratio (`sar`, a pixel's width over its
    height), whether decord's frames are turned by 90 degrees from the coded ones (`turned`: the pixel aspect then
    stretches their height), and the mirroring of the display matrix (`flip`: decord applies the matrix's rotation
    only; the flip to apply to its frames so they show as ffmpeg and players show them); an interlaced video's
    first field (`field`: 0 top, 1 bottom, None progressive) and an HDR transfer (`hdr`)."""

    sar: float = 1.0
    turned: bool = False
    flip: str = ""
    field: int | None = None
    hdr: str = ""


_STREAM = re.compile(r"Stream #\d+:\d+.*?: Video: .*?, (\d+)x(\d+)(?: \[SAR (\d+):(\d+) DAR [^\]]*\])?")
_ROTATION = re.compile(r"rotation of (-?[\d.]+) degrees")
_FIELD_ORDER = {"top first": 0, "bottom first": 1, "top coded first (swapped)": 1, "bottom coded first (swapped)": 0}
_HDR_TRANSFER = {"arib-std-b67": "HLG", "smpte2084": "PQ"}
_warned_no_ffmpeg: list[str] = []


def ffmpeg_describe(path: Path) -> str | None:
    """`ffmpeg -i path`'s description of the file (imageio-ffmpeg's binary), or None without a runnable ffmpeg
    (said once, in a warning)."""
    import subprocess

    try:
        import imageio_ffmpeg

        return subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
                              capture_output=True, text=True, errors="replace", timeout=60).stderr  # fmt: skip
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as e:
        if not _warned_no_ffmpeg:
            _warned_no_ffmpeg.append(str(e))
            log.warning("cannot run ffmpeg to read videos' pixel aspect ratio and mirroring, or why one fails to "
                        "decode (%s: %s): square pixels and no mirroring assumed", type(e).__name__, e)  # fmt: skip
        return None


#: Video codecs decord's FFmpeg build decodes (seen here and in a new-user trial: H.264 and HEVC in 8 and 10 bits,
#: VP8 / VP9, ProRes, MPEG-1/2/4, Motion JPEG, DV)
_DECORD_CODECS = frozenset({"h264", "hevc", "vp8", "vp9", "prores", "mpeg1video", "mpeg2video", "mpeg4", "mjpeg",
                            "dvvideo", "msmpeg4v3", "wmv2", "flv1", "theora"})  # fmt: skip
_CODEC = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+)")


def decode_failure_hint(path: Path) -> str:
    """What to do with a video decord cannot open: by its container (CONVERT_HINTS), else by what ffmpeg finds in
    it: no video stream (an audio file), or the codec of its video stream (AV1, which yt-dlp often downloads, is
    not in decord's FFmpeg build) with the command that re-encodes it to H.264. "" when nothing is known."""
    path = Path(path)
    stem = path.with_suffix("")
    hint = CONVERT_HINTS.get(path.suffix.lower())
    if hint:
        return hint.format(path=path, stem=stem)
    if path.is_file() and not os.access(path, os.R_OK):
        return "this user may not read the file (check its permissions)"
    out = ffmpeg_describe(path)
    if out is None or "Input #" not in out or "Invalid data found" in out or "moov atom not found" in out:
        return ""  # not opened (gone, unreadable), damaged or not media at all: the error says "cannot decode"
    codec = next((m.group(1) for m in map(_CODEC.search, out.splitlines()) if m and "attached pic" not in m.string),
                 None)  # fmt: skip
    if codec is None:
        return "ffmpeg finds no video stream in it (an audio-only file?)"
    if codec in _DECORD_CODECS:  # decord reads these: the file is damaged, not of the wrong kind
        return ""
    import shlex

    webm = path.suffix.lower() == ".webm"  # (WebM holds VP8 / VP9 / AV1 only: VP9 there, H.264 elsewhere)
    tmp = shlex.quote(f"{stem}.reencoded{path.suffix}")
    return (f"its video stream is {codec}, which decord's FFmpeg build may not decode; re-encode it in place: "
            f"ffmpeg -i {shlex.quote(str(path))} -c:v {'libvpx-vp9' if webm else 'libx264'} -pix_fmt yuv420p "
            f"{tmp} && mv {tmp} {shlex.quote(str(path))}")


def video_geometry(path: Path) -> Geometry:
    """The pixel aspect ratio and display-matrix mirroring of a video's first video stream.

    Read from ffmpeg's description of the file (imageio-ffmpeg's binary; `ffmpeg -i` reads the headers and a first
    frame: 13 ms for a 320x240 clip, 50 ms for a 720p one here, a quarter of decord's probe); the mirroring,
    which that description cannot tell from a rotation (a horizontal mirror reads "rotation of -180"), from the
    track header's matrix of an MP4 / MOV file (other containers carry no mirroring). Without a runnable ffmpeg,
    square pixels and no mirroring are assumed, with one warning."""
    out = ffmpeg_describe(path)
    if out is None:
        return Geometry()
    lines = out.splitlines()
    for i, line in enumerate(lines):
        m = _STREAM.search(line)
        if m is None or "attached pic" in line:
            continue
        sar = 1.0
        if m.group(3) and int(m.group(3)) > 0 and int(m.group(4)) > 0:
            sar = int(m.group(3)) / int(m.group(4))
        side = []  # the stream's own lines (side data), up to the next stream
        for nxt in lines[i + 1 :]:
            if "Stream #" in nxt:
                break
            side.append(nxt)
        # the pixel format's parenthesis: "yuv420p10le(tv, bt2020nc/bt2020/arib-std-b67, top first)"
        fmt = re.search(r"Video: [^,]*(?:\([^)]*\))*[^,]*, \w+\(([^)]*)\)", line)
        props = [t.strip() for t in fmt.group(1).split(",")] if fmt else []
        field = next((_FIELD_ORDER[t] for t in props if t in _FIELD_ORDER), None)
        hdr = next((_HDR_TRANSFER[k] for t in props for k in _HDR_TRANSFER if t.endswith("/" + k) or t == k), "")
        rot = next((float(r.group(1)) for r in map(_ROTATION.search, side) if r), None)
        if rot is None:
            return Geometry(sar, field=field, hdr=hdr)
        turned = round(abs(rot)) % 180 == 90
        # a turned or flipped frame's rows are no longer its fields: a (rare) interlaced one is decoded as it is
        return Geometry(sar, turned, _mp4_flip(path), None, hdr)
    return Geometry()


def _mp4_flip(path: Path) -> str:
    """The flip decord's frames need for the mirroring in an MP4 / MOV video track's matrix ("" if none, or not
    an ISO media file). decord rotates by the matrix's angle and ignores its mirroring; ffmpeg's own decode of
    each of the 8 rotation x mirror combinations is matched by a vertical flip of decord's frame when the matrix
    keeps the axes (a = +-1) and by a horizontal one when it swaps them (tests/test_data_audit.py checks all 8)."""
    matrix = _tkhd_matrix(path)
    if matrix is None:
        return ""
    a, b, c, d = matrix
    if a * d - b * c >= 0:
        return ""
    return "vflip" if abs(a) >= abs(b) else "hflip"


def _boxes(f, start: int, end: int):
    """(type, payload start, box end) of the ISO media boxes in f[start:end]."""
    import struct

    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        head = f.read(16)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head[:8])
        body = pos + 8
        if size == 1 and len(head) == 16:
            size, body = struct.unpack(">Q", head[8:16])[0], pos + 16
        elif size == 0:
            size = end - pos
        if size < body - pos:
            return  # not a box structure
        yield kind, body, pos + size
        pos += size


def _tkhd_matrix(path: Path) -> tuple[float, float, float, float] | None:
    """(a, b, c, d) of the first video track's header matrix in an MP4 / MOV file, or None."""
    import struct

    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(4)
        if f.read(4) not in (b"ftyp", b"moov", b"wide", b"free", b"mdat", b"skip"):
            return None
        for kind, body, end in _boxes(f, 0, size):
            if kind != b"moov":
                continue
            for trak, tbody, tend in _boxes(f, body, end):
                if trak != b"trak":
                    continue
                matrix, video = None, False
                for box, bbody, bend in _boxes(f, tbody, tend):
                    if box == b"tkhd":
                        f.seek(bbody)
                        version = f.read(1)[0]
                        f.seek(bbody + 4 + (32 if version == 1 else 20) + 16)
                        m = struct.unpack(">9i", f.read(36))
                        matrix = tuple(v / 65536 for v in (m[0], m[1], m[3], m[4]))
                    elif box == b"mdia":
                        for sub, sbody, _ in _boxes(f, bbody, bend):
                            if sub == b"hdlr":
                                f.seek(sbody + 8)
                                video = f.read(4) == b"vide"
                if video and matrix is not None:
                    return matrix
    return None


def frame_times(vr) -> tuple[float, ...] | None:
    """Each frame's start time (s) when the video's frame rate varies (None for a constant rate, for fewer than 3
    frames, or for timestamps that do not increase): a frame interval more than 25% off the median one."""
    n = len(vr)
    if n < 3:
        return None
    times = np.asarray(vr.get_frame_timestamp(np.arange(n)), dtype=np.float64)[:, 0]
    steps = np.diff(times)
    median = float(np.median(steps))
    if median <= 0 or (steps <= 0).any() or (np.abs(steps - median) <= 0.25 * median).all():
        return None
    return tuple(float(t) for t in times)


def nearest_frames(times: tuple[float, ...] | np.ndarray, targets: np.ndarray) -> list[int]:
    """Index of the frame shown at each target time (the one whose start time is nearest)."""
    times = np.asarray(times)
    after = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    before = after - 1
    pick = np.where(targets - times[before] <= times[after] - targets, before, after)
    return [int(i) for i in pick]


#: Output widths decord 0.6 cannot produce: at such a native width it returns 4-channel frames, and asked to
#: scale to one it fails ("The size must exactly match"); seen with every source, the only ones from 8 to 1400 px.
DECORD_BAD_WIDTHS = frozenset({8, 12, 16, 24, 48, 72})


def _reader(path: Path, size: tuple[int, int] | None = None, native_width: int | None = None):
    """A decord reader that yields (H, W, 3) frames, scaled to `size` (height, width) by the decoder if given.

    decord 0.6 misdecodes some narrow widths (DECORD_BAD_WIDTHS) with a 4th channel; such a video is reopened
    with decord resizing it to a width that is a multiple of 64 (aspect kept), which decodes correctly; the
    frames are resized to the training size afterwards anyway. With the source width known (`native_width`)
    that is decided without decoding a frame; otherwise frame 0 is decoded to see.
    """
    import decord

    if size is not None:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, width=size[1], height=size[0])
    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    if native_width is not None and native_width not in DECORD_BAD_WIDTHS:
        return vr
    shape = vr[0].shape
    if len(shape) == 3 and shape[2] != 3:
        h, w = shape[:2]
        new_w = -(-w // 64) * 64
        new_h = max(2, round(h * new_w / w / 2) * 2)
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1, width=new_w, height=new_h)
    return vr


#: FFmpeg's log lines ("[h264 @ 0x55ef...] error while decoding MB 0 2, bytestream 2414") and decord's own
#: ("[19:20:54] /.../video_reader.cc:83: ERROR opening: ..."): group 1 is the message.
_FFMPEG_LINE = re.compile(r"^\[[\w,.:/ -]+ @ 0x[0-9a-fA-F]+\] (.*)$")
_DECORD_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] \S+\.(?:cc|h):\d+: (.*)$")


class _Capture:
    """A process's file for decoder_messages, and the lock that keeps the redirect to one thread at a time (both
    made again in a forked loader worker: a file inherited from the parent shares its offset)."""

    lock = threading.Lock()
    file = None

    @classmethod
    def reset(cls) -> None:
        cls.lock, cls.file = threading.Lock(), None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Capture.reset)


@dataclass
class DecoderMessages:
    """What FFmpeg and decord said while a video was decoded (messages without their prefix)."""

    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def decoder_messages():
    """-> DecoderMessages, filled when the block ends: FFmpeg and decord write to the process's stderr (fd 2)
    from C, lines that name no file and land between the log lines. Within the block fd 2 goes to a file; their
    lines are kept for the caller to report with the file's name, anything else written there (another thread's
    output) is written back to stderr unchanged. Only one thread captures at a time: where another already does
    (or fd 2 cannot be redirected), the block runs without capture and the lines print as before."""
    said = DecoderMessages()
    if not _Capture.lock.acquire(blocking=False):
        yield said
        return
    try:
        try:
            if _Capture.file is None:
                _Capture.file = tempfile.TemporaryFile()
            sys.stdout.flush()
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no fd 2 (closed), or no file to capture into
            yield said
            return
        cap = _Capture.file
        cap.seek(0)
        cap.truncate()
        os.dup2(cap.fileno(), 2)
        try:
            yield said
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            cap.seek(0)
            other = []
            for line in cap.read().decode(errors="replace").splitlines():
                m = _FFMPEG_LINE.match(line) or _DECORD_LINE.match(line)
                if m:
                    said.lines.append(m.group(1).strip())
                elif line.strip():
                    other.append(line)
            if other:
                with contextlib.suppress(OSError):  # (a closed stderr must not fail the decode)
                    os.write(2, ("\n".join(other) + "\n").encode())
    finally:
        _Capture.lock.release()


@contextlib.contextmanager
def quiet_ffmpeg():
    """FFmpeg's log off within the block (decord's level, ERROR, after it): for the data scan, whose probes run
    in threads, where decoder_messages cannot tell which file a line is about. Each file a probe fails on is
    named with its reason; one that opens but is damaged is named when it is decoded for training."""
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    try:
        yield
    finally:
        decord.logging.set_level(decord.logging.ERROR)


#: Files whose decoding FFmpeg complained about, already reported by this process.
_DAMAGE_REPORTED: set[str] = set()


def report_damage(path: Path, lines: list[str]) -> None:
    """One warning per file and process: FFmpeg decoded `path` but reported errors (concealed corruption: parts
    of frames are guessed, smeared or grey). The file is trained on as decoded; the warning says how to fix it."""
    if not lines or str(path) in _DAMAGE_REPORTED:
        return
    _DAMAGE_REPORTED.add(str(path))
    import shlex

    q = shlex.quote(str(path))
    log.warning("video %s: FFmpeg reported %d decoding error%s (first: %r): it is damaged and the damaged parts of "
                "its frames are concealed guesses; check it, then re-encode it (ffmpeg -i %s -c:v libx264 -pix_fmt "
                "yuv420p fixed.mp4) or remove it", path, len(lines), "" if len(lines) == 1 else "s", lines[0][:200],
                q)  # fmt: skip


#: Sizes ptrain refuses as absurd (a decoding bug, a thumbnail, a panorama strip or a decompression bomb).
MIN_SIDE, MAX_ASPECT, MAX_PIXELS = 16, 8.0, 64 * 2**20


def check_size(kind: str, path: Path, height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"{kind} {path}: {width}x{height} is too small (at least {MIN_SIDE} px a side)")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"{kind} {path}: {width}x{height} has an extreme aspect ratio (more than {MAX_ASPECT:g}:1)")
    if height * width > MAX_PIXELS:
        raise ValueError(f"{kind} {path}: {width}x{height} is over {MAX_PIXELS // 2**20} megapixels")


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image as displayed (after its EXIF rotation), from its header and a structure check."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # structure check; must come first on a freshly opened file
        with Image.open(path) as im:
            w, h = im.size
            rotated = im.getexif().get(0x0112) in (5, 6, 7, 8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path}: cannot decode ({type(e).__name__}: {e})") from e
    return (w, h) if rotated else (h, w)


def _decode_image(path: Path) -> None:
    """Decode every pixel of an image (ValueError naming the file if that fails).

    verify() checks structure only: a JPEG cut short passes it and fails only when its pixels are read, which
    without this happens in training, where its bucket may hold nothing to replace it. A JPEG is decoded at up to
    1/8 scale (`draft`: the decoder still reads all of its compressed data, so a cut or corrupt stream still
    fails), which keeps the scan cheap for large photos."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, EOFError, struct / zlib errors...
        raise ValueError(f"image {path}: cannot decode ({type(e).__name__}: {e})") from e


def probe_image(path: Path) -> VideoInfo:
    """Size of an image (after its EXIF rotation) as a 1-frame video, or an exception naming the file. The size
    limits are checked before the pixels are decoded (a decompression bomb is refused unread)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image {path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"image {path}: empty file (0 bytes)")
    h, w = _image_size(path)
    check_size("image", path, h, w)
    _decode_image(path)
    return VideoInfo(1, h, w, 0.0)


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (float input is returned as it is)."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.float().div_(127.5).sub_(1.0)


#: PIL modes of grey images deeper than 8 bits (PIL's convert("RGB") would clip them, not scale them).
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I")


def grey_full_scale(im) -> int:
    """The value that is white in a 16/32-bit grey PIL image ("I;16*" / "I"): what its values are scaled by.

    From the format, never from the pixels: scaling by the image's own maximum would brighten a dark image (a
    16-bit image whose brightest pixel is a quarter of full scale came out 4x too bright). "I;16*" is 16-bit; an
    "I" TIFF says its depth (BitsPerSample, SampleFormat: signed or not); any other "I" image (a 16-bit PNG or PGM
    in some Pillow versions) is taken as 16-bit. Read it before any transpose: copies drop the TIFF tags."""
    if im.mode.startswith("I;16"):
        return 2**16 - 1
    tags = getattr(im, "tag_v2", {})
    bits, fmt = tags.get(258), tags.get(339)  # BitsPerSample, SampleFormat (2 = signed): an int or one per sample
    bits, fmt = (v[0] if isinstance(v, tuple) and v else v for v in (bits, fmt))
    if not bits:
        return 2**16 - 1
    return 2 ** (int(bits) - 1) - 1 if fmt == 2 else 2 ** int(bits) - 1


def grey_to_uint8(values: np.ndarray, full_scale: int) -> np.ndarray:
    """Integer grey values (white = `full_scale`) -> uint8, rounded; out-of-range values clipped."""
    scaled = np.rint(values.astype(np.float64) * (255.0 / full_scale))
    return np.clip(scaled, 0, 255).astype(np.uint8)


_warned_float: set[str] = set()


def float_grey_to_uint8(values: np.ndarray, path: Path) -> np.ndarray:
    """Float grey values -> uint8, with 1.0 as white (the convention of float TIFF and EXR; PIL's convert("RGB")
    would clip them to 0..255 and make a 0..1 image black). NaN is black; values outside [0, 1] are clipped, with
    one warning per file naming the range (an image stored as 0..255 floats comes out white)."""
    finite = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if (lo < -1e-3 or hi > 1.0 + 1e-3) and str(path) not in _warned_float:
        _warned_float.add(str(path))
        log.warning("image %s: float pixels range %.4g..%.4g; ptrain reads float images with 0.0 as black and 1.0 as "
                    "white, so values outside 0..1 are clipped", path, lo, hi)  # fmt: skip
    return np.clip(np.rint(finite * 255.0), 0, 255).astype(np.uint8)


def load_image(
    path: Path,
    height: int,
    width: int,
    reshape_mode: str = "center_crop",
    rng: np.random.Generator | None = None,
    as_uint8: bool = False,
) -> torch.Tensor:
    """-> (C, 1, H, W) float32 in [-1, 1] (uint8 with `as_uint8`). EXIF rotation applied; alpha composited on
    white; grey -> RGB. Resized as uint8, like video frames."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        full_scale = grey_full_scale(im) if im.mode in WIDE_GREY_MODES else None
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
        elif full_scale is not None:  # 16/32-bit grey: scale to 8 bits (by the bit depth) before RGB
            im = Image.fromarray(grey_to_uint8(np.asarray(im), full_scale))
        elif im.mode == "F":  # 32-bit float grey (a float TIFF): 1.0 is white
            im = Image.fromarray(float_grey_to_uint8(np.asarray(im), path))
        rgb = np.array(im.convert("RGB"))  # a writable copy
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]
    x = resize_crop(x, height, width, reshape_mode, rng)
    x = x.permute(1, 0, 2, 3).contiguous()
    return x if as_uint8 else to_unit_range(x)


def probe_media(path: Path, kind: str) -> VideoInfo:
    return probe_image(path) if kind == "image" else probe(path)


_REMUX = "decord cannot index {kind}: remux it to mp4 (no re-encoding): ffmpeg -i {{path}} -c copy {{stem}}.mp4"
_ENCODE = "decord cannot read {kind}: convert it to mp4: ffmpeg -i {{path}} -pix_fmt yuv420p {{stem}}.mp4"
#: What to do with a video of a container decord cannot read (probe's error names it with the file).
CONVERT_HINTS = {
    ".ts": _REMUX.format(kind="MPEG-TS with H.264"),
    ".mts": _REMUX.format(kind="MPEG-TS (AVCHD) with H.264"),
    ".m2ts": _REMUX.format(kind="MPEG-TS (AVCHD) with H.264"),
    ".gif": _ENCODE.format(kind="animated GIF"),
    ".ogv": _ENCODE.format(kind="Ogg video"),
}


def _first_line(e: Exception) -> str:
    """An exception's message cut to its first line and 300 characters (decord's carry C++ paths and advice)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text[:300] + ("..." if len(text) > 300 else "")


def probe(path: Path) -> VideoInfo:
    """Frame count, size as displayed (see VideoInfo), frame rate and timing, or an exception naming the file.

    The decoded size is the source's even where decord misreads its width (DECORD_BAD_WIDTHS; the frames are then
    checked on the reader reopened at a safe width): load_clip decides from it whether to reopen, and given the
    reopened width instead it would open a 48 px wide video as it is and fail whenever it is not reduced
    (upscaled)."""
    import decord

    if not Path(path).is_file():
        raise FileNotFoundError(f"video {path}: no such file")
    if Path(path).stat().st_size == 0:
        raise ValueError(f"video {path}: empty file (0 bytes)")
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        shape = vr[0].shape
        height, width = int(shape[0]), int(shape[1])
        if width in DECORD_BAD_WIDTHS:
            shape = _reader(path, native_width=width)[0].shape
        times = frame_times(vr)
    except Exception as e:  # decord raises its own DECORDError / RuntimeError types
        hint = decode_failure_hint(path)
        hint = f"; {hint}" if hint else ""
        raise ValueError(f"video {path}: cannot decode ({type(e).__name__}: {_first_line(e)}){hint}") from e
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"video {path}: decoder returned frames of shape {tuple(shape)}, not (H, W, 3)")
    if n < 1:
        raise ValueError(f"video {path}: no frames")
    geo = video_geometry(path)
    shown_h, shown_w = height, width
    if abs(geo.sar - 1.0) > 1e-3:  # non-square pixels: stretch the coded width (decord's height if it turned)
        if geo.turned:
            shown_h = max(1, round(height * geo.sar))
        else:
            shown_w = max(1, round(width * geo.sar))
    check_size("video", path, shown_h, shown_w)
    decoded = (height, width) if (shown_h, shown_w) != (height, width) else None
    fps = float(vr.get_avg_fps() or 0.0)
    return VideoInfo(n, shown_h, shown_w, fps, decoded, geo.flip, times, geo.field, geo.hdr)


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


def cover_size(h: int, w: int, height: int, width: int, mode: str = "center_crop") -> tuple[int, int]:
    """The size (h, w) frames are scaled to before cropping to height x width: the target itself (resize), or
    the smallest size that covers it with the aspect kept (center_crop / random_crop)."""
    if mode == "resize":
        return height, width
    scale = max(height / h, width / w)
    return max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))


def decode_size(
    h: int, w: int, height: int, width: int, mode: str = "center_crop", decoded: tuple[int, int] | None = None
) -> tuple[int, int] | None:
    """The size to let the decoder scale a video shown at h x w (decoded at `decoded`, if its pixels are not
    square) to, or None to decode it at its own size.

    Only a reduction (the covering size smaller than the decoded frames on both sides): the decoder then converts
    and scales each frame once, at the small size, instead of handing over full-size frames. A width decord cannot
    output (DECORD_BAD_WIDTHS) is widened to the next one it can; resize_crop takes that last step."""
    dh, dw = decoded or (h, w)
    nh, nw = cover_size(h, w, height, width, mode)
    if nh >= dh or nw >= dw:
        return None
    while nw in DECORD_BAD_WIDTHS:
        nw += 2
    return nh, min(nw, dw)


def resize_crop(
    frames: torch.Tensor,
    height: int,
    width: int,
    mode: str = "center_crop",
    rng: np.random.Generator | None = None,
    shown: tuple[int, int] | None = None,
) -> torch.Tensor:
    """frames (F, C, h, w) float or uint8 -> (F, C, height, width), same dtype.

    center_crop / random_crop: scale to cover the target (aspect kept), then crop; resize: stretch to the target.
    The aspect kept is that of `shown` (the size the frames are displayed at: non-square pixels) if given.
    uint8 frames are resized as uint8 (torch's antialiased bilinear kernel, within one level of resizing them as
    float and much faster in the (F, H, W, C) layout decord returns), so the float conversion happens at the
    training size.
    """
    h, w = shown or frames.shape[-2:]
    nh, nw = cover_size(h, w, height, width, mode)
    if (nh, nw) != tuple(frames.shape[-2:]):
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
    over it (without). A variable-frame-rate clip (`times`) is sampled by time throughout: at `fps`, at the mean
    rate / `stride`, consecutive frames at its mean rate, or evenly over its duration.
    """

    num_frames: int
    fps: float | None = None
    stride: int | None = None
    skip_start: int = 0
    skip_end: int = 0
    random_start: bool = False  # --random_frame_crop: consecutive frames from a random start (seeded)

    def _candidates(self, total: int, source_fps: float, times: tuple[float, ...] | None = None) -> list[int] | None:
        start, end = self.skip_start, total - self.skip_end
        if end <= start:
            return []
        rate = self.fps
        if not rate and (self.stride or self.random_start) and source_fps:
            rate = source_fps / (self.stride or 1)  # every stride-th / consecutive frames: that step of the mean rate
        if rate and times is not None:  # variable frame rate: the frame shown at each 1/rate step in time
            window = np.asarray(times[start:end])
            count = int((window[-1] - window[0]) * rate + 1e-6) + 1
            return [start + i for i in nearest_frames(window, window[0] + np.arange(count) / rate)]
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

    def available(self, total: int, source_fps: float = 0.0, times: tuple[float, ...] | None = None) -> int:
        """How many frames the sampling can draw from a clip of `total` frames (`times`: a variable-frame-rate
        clip's frame start times, see frame_times)."""
        c = self._candidates(total, source_fps, times)
        return max(0, total - self.skip_start - self.skip_end) if c is None else len(c)

    def indices(
        self,
        total: int,
        source_fps: float = 0.0,
        rng: np.random.Generator | None = None,
        times: tuple[float, ...] | None = None,
    ) -> list[int]:
        """Frame indices of one sample. A variable-frame-rate clip (`times`) is sampled by time: at --fps, or spread
        evenly over its duration (not over its frame count, which would speed up its slow-rate stretches)."""
        c = self._candidates(total, source_fps, times)
        if c is None:
            usable = total - self.skip_start - self.skip_end
            even = even_indices(usable, self.num_frames)  # raises for too few frames
            if times is not None and self.num_frames > 1:
                window = np.asarray(times[self.skip_start : total - self.skip_end])
                even = nearest_frames(window, np.linspace(window[0], window[-1], self.num_frames))
            return [self.skip_start + i for i in even]
        if len(c) < self.num_frames:
            raise ValueError(f"clip has {len(c)} usable frames, fewer than --num_frames {self.num_frames}")
        first = 0
        if self.random_start:
            first = int((rng or np.random.default_rng()).integers(0, len(c) - self.num_frames + 1))
        return c[first : first + self.num_frames]

    def rate_text(self) -> str:
        """How the frames a clip offers were counted, for a skip reason ('usable at --fps 8 (49 frames at 8 fps
        span 6.0 s)')."""
        parts = []
        if self.fps:
            need = (self.num_frames - 1) / self.fps
            parts.append(f"at --fps {self.fps:g} ({self.num_frames} frames at {self.fps:g} fps span {need:.1f} s)")
        elif self.stride:
            parts.append(f"taking every {self.stride}th frame (--video_sample_stride {self.stride})")
        if self.skip_start or self.skip_end:
            parts.append(f"after --skip_frames_start {self.skip_start} / --skip_frames_end {self.skip_end}")
        return "usable " + ", ".join(parts) if parts else "usable"

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
    source: VideoInfo | None = None,
    as_uint8: bool = False,
    scale_in_decoder: bool = True,
) -> torch.Tensor:
    """-> (C, F, H, W) float32 in [-1, 1] (uint8 with `as_uint8`: to_unit_range converts it later, e.g. on the
    device). `sampling` may be just a frame count (spread evenly, or at `fps`).

    The display geometry and timing come from `source` (the data scan's probe; probed here if not given):
    mirroring, non-square pixels and a variable frame rate are applied as VideoInfo says. With `source` given
    (and `scale_in_decoder`), a larger video is decoded at the size it is cropped from (decode_size: the decoder
    scales it; within a few levels of a full-size decode resized here, tests/test_data.py states how close);
    otherwise at its own size. Frames stay uint8 through the resize and crop; only the training-size clip is
    converted to float.
    """
    if isinstance(sampling, int):
        sampling = FrameSampling(sampling, fps)
    size = None
    if source is None:
        source = probe(path)
    elif scale_in_decoder and source.field is None:  # an interlaced frame is decoded whole: its fields split below
        size = decode_size(source.height, source.width, height, width, reshape_mode, source.decoded)
    try:
        with decoder_messages() as said:
            vr = None
            try:
                vr = _reader(path, size, source.decoded_size[1])
                idx = sampling.indices(len(vr), float(vr.get_avg_fps() or 0.0), rng, source.times)
                frames = torch.from_numpy(vr.get_batch(idx).asnumpy())  # (F, h, w, 3) uint8
            finally:
                del vr  # decord's decoder thread may still log: end it (the reader) while its lines are captured
    except Exception as e:  # decord's own types: named with the file and what FFmpeg said
        if not said.lines:
            raise
        raise ValueError(f"video {path}: cannot decode ({type(e).__name__}: {_first_line(e)}); FFmpeg: "
                         f"{said.lines[0][:200]}") from e  # fmt: skip
    report_damage(path, said.lines)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video {path}: decoder returned frames of shape {tuple(frames.shape)}, not (F, H, W, 3)")
    if source.flip:  # the display matrix's mirroring, which decord leaves out
        frames = frames.flip(1 if source.flip == "vflip" else 2)
    if source.field is not None:  # interlaced: keep the first field's rows (no combing), stretched back below
        frames = frames[:, source.field :: 2]
    shown = (source.height, source.width) if source.decoded or source.field is not None else None
    x = resize_crop(frames.permute(0, 3, 1, 2), height, width, reshape_mode, rng, shown)
    x = x.permute(1, 0, 2, 3).contiguous()
    return x if as_uint8 else to_unit_range(x)
