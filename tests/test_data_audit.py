"""The new-user data audit, on real files: a truncated image (scan, runtime replacement, precompute stand-in),
i2v first-frame images, 16-bit grey and float images, UTF-8 byte-order marks, empty captions, error locations, the
reduced-size decode's geometry (no offset; its differences are the decoder's 4:2:0 chroma), and videos as they are
displayed: mirrored by their display matrix, non-square pixels, a variable frame rate."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptrain.config import ConfigError, DataArgs
from ptrain.data import VideoDataset, scan_dataset, summary
from ptrain.data.buckets import Bucket
from ptrain.data.sources import load_records
from ptrain.data.video import FrameSampling, load_clip, load_image, probe, probe_image
from ptrain.testing.tiny import render_frames, synthetic_video_specs, write_video


def _video(path: Path, w: int = 48, h: int = 32, frames: int = 12, seed: int = 0) -> Path:
    spec = dataclasses.replace(synthetic_video_specs(1, seed, [(w, h)])[0], num_frames=frames, fps=12)
    write_video(path, render_frames(spec), 12)
    return path


def _jpeg(path: Path, width: int = 200, height: int = 600, cut: bool = False) -> Path:
    """A noisy JPEG; with `cut` only the first half of its bytes (a copy interrupted half-way)."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2] if cut else data)
    return path


def _two_videos_and_an_image(root: Path, cut: bool) -> Path:
    """The audit's folder: two mp4s and a 200x600 JPEG (alone in its aspect-ratio bucket), each with a caption."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        _video(root / f"v{i}.mp4", seed=i)
        (root / f"v{i}.txt").write_text(f"clip {i}")
    _jpeg(root / "tall.jpg", cut=cut)
    (root / "tall.txt").write_text("a tall photo")
    return root


def _ltx_scan(tiny_ckpt, root: Path, **kw):
    from ptrain.models.spec import get_spec

    args = DataArgs(data_root=root, enable_bucket=True, height=32, width=32, num_frames=9, **kw)
    rules = get_spec("ltx_video").shape_rules(str(tiny_ckpt), {})
    return args, scan_dataset(args, FrameSampling.from_args(args), rules)


# --- 1. a truncated image --------------------------------------------------------------------------------------


def test_truncated_image_is_skipped_by_the_scan_with_its_reason(tiny_ckpt, tmp_path):
    """The scan decodes images (verify() alone passes a JPEG cut in half): a counted, named skip, not a
    training-time failure."""
    root = _two_videos_and_an_image(tmp_path / "data", cut=True)
    with pytest.raises(ValueError, match=r"tall.jpg: cannot decode \(OSError: image file is truncated"):
        probe_image(root / "tall.jpg")
    _, usable = _ltx_scan(tiny_ckpt, root)
    assert [r.video.name for r in usable.records] == ["v0.mp4", "v1.mp4"]
    assert list(usable.skipped) == [str(root / "tall.jpg")] and usable.skip_reasons() == {"cannot decode": 1}
    assert "truncated" in usable.skipped[str(root / "tall.jpg")]


def test_sample_alone_in_its_bucket_that_breaks_is_replaced_at_its_shape(tiny_ckpt, tmp_path):
    """An image that breaks after the scan, alone in its bucket (1x56x16 here): a video of another bucket stands
    in, cropped to that shape; counted once; the same choice at the same position. (Before: the image was
    retried as its own replacement until '9 samples in a row failed to decode'.)"""
    root = _two_videos_and_an_image(tmp_path / "data", cut=False)
    args, usable = _ltx_scan(tiny_ckpt, root)
    img = [r.video.name for r in usable.records].index("tall.jpg")
    bucket = usable.buckets[img]
    assert bucket.frames == 1 and sum(b == bucket for b in usable.buckets) == 1
    _jpeg(root / "tall.jpg", cut=True)
    ds = VideoDataset(usable.records, args, FrameSampling.from_args(args), 3, usable.buckets, usable.infos)
    for position in range(6):
        item = ds[(img, position)]
        assert item["replaced"] == 1 and item["index"] != img
        assert item["video"].shape == (3, 1, bucket.height, bucket.width)
        assert item["caption"] == usable.records[item["index"]].caption
        assert ds[(img, position)]["index"] == item["index"]
    for i in range(3):  # nothing left to decode: stops, naming every file once
        (root / ("tall.jpg", "v0.mp4", "v1.mp4")[i]).write_bytes(b"gone")
    with pytest.raises(RuntimeError, match=r"3 samples in a row failed to decode; the data has gone bad \(no other"):
        ds[(img, 0)]


def test_replacement_never_retries_the_failed_sample(tmp_path):
    """A bucket of two whose first file breaks: every draw is replaced by the other, and counted once (before,
    the failed sample was in its own replacement pool, so some draws counted 2 or more)."""
    for i in range(2):
        _video(tmp_path / f"{i}.mp4", 32, 32, seed=i)
        (tmp_path / f"{i}.txt").write_text(f"clip {i}")
    args = DataArgs(data_root=tmp_path, height=32, width=32, num_frames=9)
    usable = scan_dataset(args, FrameSampling(9))
    (tmp_path / "0.mp4").write_bytes(b"gone bad")
    ds = VideoDataset(usable.records, args, FrameSampling(9), seed=1)
    items = [ds[(0, pos)] for pos in range(24)]
    assert [it["replaced"] for it in items] == [1] * 24 and {it["index"] for it in items} == {1}
    # a repeated file is several samples: its other copies are not tried either
    repeated = VideoDataset([usable.records[0], usable.records[0], usable.records[1]], args, FrameSampling(9), seed=1)
    items = [repeated[(0, pos)] for pos in range(24)]
    assert [it["replaced"] for it in items] == [1] * 24 and {it["index"] for it in items} == {2}


def test_precompute_encodes_a_stand_in_for_a_sample_alone_in_its_bucket(tiny_ckpt, tmp_path, single_process_env):
    """With precomputation, the image that broke after the scan (alone in its bucket) gets a stand-in encoded at
    its shape from another bucket, instead of 'no other sample of its shape 1x56x16 could replace it'."""
    from ptrain.config import parse_config
    from ptrain.data.precompute import PrecomputedDataset, precompute, sample_key
    from ptrain.models.spec import get_spec
    from ptrain.parallel import init_distributed

    root = _two_videos_and_an_image(tmp_path / "data", cut=False)
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(root),
                        "--enable_bucket", "--height", "32", "--width", "32", "--num_frames", "9", "--output_dir",
                        str(tmp_path / "out")]).validate()  # fmt: skip
    init_distributed()
    spec = get_spec("ltx_video")
    sampling = FrameSampling.from_args(cfg.data)
    usable = scan_dataset(cfg.data, sampling, spec.shape_rules(str(tiny_ckpt), {}))
    img = [r.video.name for r in usable.records].index("tall.jpg")
    _jpeg(root / "tall.jpg", cut=True)
    comps = spec.load_components(str(tiny_ckpt), dict.fromkeys(("transformer", "vae", "text_encoder"), torch.float32),
                                 torch.device("cpu"), {})  # fmt: skip
    spec = spec.bind(comps)
    videos = VideoDataset(usable.records, cfg.data, sampling, 0, usable.buckets, usable.infos)
    folder = precompute(cfg, usable, spec, comps, videos, 16, torch.device("cpu"))
    ds = PrecomputedDataset(usable, folder, 0.0, 0)  # before: RuntimeError "... could replace it"
    man = json.loads((folder / "manifest.json").read_text())
    assert list(man["failed"]) == [sample_key(usable, img)] and list(man["stand_ins"]) == [sample_key(usable, img)]
    item, other = ds[(img, 4)], ds[(1 - img if img < 2 else 0, 4)]
    assert item["replaced"] == 1 and item["index"] != img and other["replaced"] == 0
    assert item["latent_dist"].shape[-3:] != other["latent_dist"].shape[-3:]  # encoded at the image's 1x56x16
    assert item["latent_dist"].shape[-3] == 1

    # a damaged cache file (the second audit: every start reused it and failed the same way) names the folder
    name = ds.files[1 - img if img < 2 else 0]
    (folder / name).write_bytes((folder / name).read_bytes()[:50])
    from ptrain.safe_load import UnsafeFileError

    with pytest.raises(UnsafeFileError, match=f"The precomputed cache {folder} is damaged: delete that folder"):
        ds[(1 - img if img < 2 else 0, 4)]


def test_i2v_first_frame_image_is_decoded_by_the_scan(tmp_path):
    """A table row's first-frame image (i2v / inpaint) is decoded at the scan like the media: a truncated one
    skips its row with the reason."""
    for i in range(2):
        _video(tmp_path / f"{i}.mp4", 32, 32, seed=i)
        _jpeg(tmp_path / f"{i}.jpg", cut=i == 1)  # 200x600: verify() alone passes it cut in half
    (tmp_path / "metadata.csv").write_text("caption,video,image\nfirst,0.mp4,0.jpg\nsecond,1.mp4,1.jpg\n")
    args = DataArgs(data_root=tmp_path, height=32, width=32, num_frames=9)
    usable = scan_dataset(args, FrameSampling(9))
    assert [r.caption for r in usable.records] == ["first"]
    reason = usable.skipped[str(tmp_path / "1.mp4")]
    assert f"first-frame image {tmp_path / '1.jpg'}: cannot decode" in reason and "truncated" in reason
    assert usable.skip_reasons() == {"cannot decode": 1}


# --- 2. 16-bit images ------------------------------------------------------------------------------------------


def test_16_bit_grey_images_are_scaled_by_their_bit_depth(tmp_path):
    """A dark 16-bit image stays dark: values / 257 (65535 -> 255), not / the image's own maximum."""
    ramp = np.tile(np.linspace(0, 16383, 64).round().astype(np.uint16), (48, 1))  # up to a quarter of full scale
    Image.fromarray(ramp).save(tmp_path / "dark.png")
    Image.fromarray(ramp).save(tmp_path / "dark.tif")
    assert Image.open(tmp_path / "dark.png").mode.startswith("I")
    expected = np.rint(ramp / 257.0)
    for name in ("dark.png", "dark.tif"):
        x = load_image(tmp_path / name, 48, 64, as_uint8=True)
        assert x.shape == (3, 1, 48, 64) and torch.equal(x[0], x[1])
        assert int(x.max()) == 64 and abs(float(x[0, 0].double().mean()) - expected.mean()) < 0.5, name
    Image.fromarray(np.full((32, 32), 65535, np.uint16)).save(tmp_path / "white.png")
    assert int(load_image(tmp_path / "white.png", 32, 32, as_uint8=True).min()) == 255


# --- 3. UTF-8 byte-order marks ---------------------------------------------------------------------------------


def test_byte_order_marks_are_read_as_utf8_sig(tmp_path):
    """Excel's "CSV UTF-8" (BOM + CRLF), BOM captions and lists, JSON / JSONL / --dataset_config with a BOM."""
    _video(tmp_path / "a.mp4", 32, 32)
    bom = "\ufeff"
    (tmp_path / "m.csv").write_bytes((bom + "file_path,text\r\na.mp4,a caf\u00e9\r\n").encode())
    (tmp_path / "m.json").write_text(bom + json.dumps([{"file_path": "a.mp4", "text": "a caf\u00e9"}]), "utf-8")
    (tmp_path / "m.jsonl").write_text(bom + json.dumps({"file_path": "a.mp4", "text": "a caf\u00e9"}) + "\n", "utf-8")
    for name in ("m.csv", "m.json", "m.jsonl"):
        (rec,) = load_records(DataArgs(dataset_file=tmp_path / name))
        assert rec.caption == "a caf\u00e9" and rec.video == tmp_path / "a.mp4" and rec.error is None, name
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _video(pairs / "b.mp4", 32, 32)
    (pairs / "b.txt").write_text(bom + "a dog\n", "utf-8")
    (rec,) = load_records(DataArgs(data_root=pairs))
    assert rec.caption == "a dog"
    folder = tmp_path / "cog"
    folder.mkdir()
    _video(folder / "c.mp4", 32, 32)
    (folder / "prompts.txt").write_text(bom + "a bird\n", "utf-8")
    (folder / "videos.txt").write_text(bom + "c.mp4\n", "utf-8")
    (rec,) = load_records(DataArgs(data_root=folder))
    assert rec.caption == "a bird" and rec.video == folder / "c.mp4"
    (tmp_path / "ds.toml").write_text(bom + '[[datasets]]\ndata_root = "pairs"\n', "utf-8")
    (tmp_path / "ds.json").write_text(bom + json.dumps({"datasets": [{"data_root": "pairs"}]}), "utf-8")
    for name in ("ds.toml", "ds.json"):
        assert [r.caption for r in load_records(DataArgs(dataset_config=tmp_path / name))] == ["a dog"]
    (pairs / "b.txt").write_bytes(b"\xef\xbb\xbfbad \xff byte")  # BOM kept apart from real non-UTF-8 bytes
    (rec,) = load_records(DataArgs(data_root=pairs))
    assert rec.error is not None and "not valid UTF-8 (byte 0xff at character 4)" in rec.error


# --- 4. empty captions -----------------------------------------------------------------------------------------


def test_empty_captions_are_kept_counted_and_named_once(tmp_path, caplog):
    for name in ("a", "b", "c"):
        _video(tmp_path / f"{name}.mp4", 32, 32)
    (tmp_path / "a.txt").write_bytes(b"")  # a 0-byte caption file
    (tmp_path / "b.txt").write_text("  \n")
    (tmp_path / "c.txt").write_text("a cat")
    args = DataArgs(data_root=tmp_path, height=32, width=32, num_frames=9)
    with caplog.at_level(logging.WARNING, logger="ptrain"):
        usable = scan_dataset(args, FrameSampling(9))
    assert len(usable.records) == 3  # kept: the empty prompt is a legitimate target
    lines = [r.getMessage() for r in caplog.records if "empty caption" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("2 of 3 usable samples have an empty caption"), lines
    assert str(tmp_path / "a.mp4") in lines[0] and str(tmp_path / "b.mp4") in lines[0]
    assert any("2 with an empty caption" in line for line in summary(usable, 1))
    # an empty CSV cell and a JSON null are empty captions too
    (tmp_path / "m.csv").write_text("caption,video\n,a.mp4\na cat,c.mp4\n")
    (tmp_path / "m.json").write_text(
        json.dumps([{"caption": None, "video": "a.mp4"}, {"caption": "x", "video": "c.mp4"}])
    )
    for name in ("m.csv", "m.json"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ptrain"):
            scan_dataset(dataclasses.replace(args, data_root=None, dataset_file=tmp_path / name), FrameSampling(9))
        assert any(r.getMessage().startswith("1 of 2 usable samples have an empty caption") for r in caplog.records)


# --- 5. error locations ----------------------------------------------------------------------------------------


def test_jsonl_errors_name_the_file_and_its_line(tmp_path):
    good = json.dumps({"caption": "a", "video": "a.mp4"})
    (tmp_path / "d.jsonl").write_text(f"{good}\n\n{good}\n{{broken\n")
    with pytest.raises(ConfigError, match=r"d.jsonl: line 4: cannot parse: Expecting property name"):
        load_records(DataArgs(dataset_file=tmp_path / "d.jsonl"))
    # lines end at "\n" only: a raw U+2028 inside a caption (valid JSON) is not a line break; CRLF is fine
    odd = json.dumps({"caption": "a\u2028b", "video": "a.mp4"}, ensure_ascii=False)
    (tmp_path / "u.jsonl").write_text(f"{odd}\r\n{good}\r\n", encoding="utf-8", newline="")
    assert [r.caption for r in load_records(DataArgs(dataset_file=tmp_path / "u.jsonl"))] == ["a\u2028b", "a"]
    (tmp_path / "e.jsonl").write_text(f"{good}\n{good}\n[1, 2]\n")
    with pytest.raises(ConfigError, match=r"e.jsonl: line 3: expected a JSON object, got list"):
        load_records(DataArgs(dataset_file=tmp_path / "e.jsonl"))


def test_dataset_config_entries_are_numbered_unambiguously(tmp_path):
    """The 3rd entry is 'entry 3 of 3 (index 2)' in every message, including errors from reading its data."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _video(tmp_path / name / "v.mp4", 32, 32)
        (tmp_path / name / "v.txt").write_text("v")
    (tmp_path / "empty").mkdir()
    entries = [{"data_root": "a"}, {"data_root": "b"}]

    def error(third: dict) -> str:
        (tmp_path / "ds.json").write_text(json.dumps({"datasets": [*entries, third]}))
        with pytest.raises(ConfigError) as e:
            load_records(DataArgs(dataset_config=tmp_path / "ds.json"))
        return str(e.value)

    where = "datasets entry 3 of 3 (index 2)"
    assert f"{where}: unknown keys ['wieght']" in error({"data_root": "a", "wieght": 2})
    assert f"{where}: data_root {tmp_path / 'nope'}: not found" in error({"data_root": "nope"})
    assert f"{where}: repeats must be a number > 0, got 0" in error({"data_root": "a", "repeats": 0})
    assert f"{where}: repeats must be a number > 0, got 'two'" in error({"data_root": "a", "repeats": "two"})
    assert f"{where}: caption_extension 'txt': give it with its dot" in error({"data_root": "a",
                                                                              "caption_extension": "txt"})  # fmt: skip
    assert f"{where}: --data_root {tmp_path / 'empty'}: found neither" in error({"data_root": "empty"})


# --- 6. reduced-size decode: the geometry is exact, the difference is the decoder's 4:2:0 chroma ----------------


def _testsrc(path: Path, pix_fmt: str) -> Path:
    """ffmpeg's testsrc (sharp, saturated colour bars and text) at 320x240, H.264 lossless-ish."""
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=24", "-frames:v", "24", "-pix_fmt", pix_fmt, "-c:v", "libx264",
                    "-qp", "0", str(path)], check=True)  # fmt: skip
    return path


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def test_reduced_size_decode_has_no_offset_on_sharp_patterns(tmp_path):
    """The audit's sharp pattern at 64x64 (covering size 64x86, crop 11 px from the left in both paths): with
    4:4:4 chroma the decoder-scaled frames match a full-size decode + resize (no geometric offset in ptrain's
    crop); with 4:2:0 the luma still matches, and the larger colour differences (mean ~0.06, p99 ~0.74 in [-1, 1]
    units) are the decoder scaling the subsampled chroma planes itself (a sub-pixel chroma shift and a softer
    chroma), which ptrain cannot change through decord."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import _full_size_reference

    for pix_fmt in ("yuv444p", "yuv420p"):
        path = _testsrc(tmp_path / f"{pix_fmt}.mp4", pix_fmt)
        ref = _full_size_reference(path, 9, 64, 64)
        reduced = load_clip(path, 9, 64, 64, source=probe(path))
        d = (reduced - ref).abs()
        luma = (_luma(reduced) - _luma(ref)).abs()
        shifted = (_luma(reduced)[..., 1:] - _luma(ref)[..., :-1]).abs().mean()  # one pixel off would fit better
        assert luma.mean() < 0.01 and luma.mean() * 3 < shifted, (pix_fmt, float(luma.mean()), float(shifted))
        if pix_fmt == "yuv444p":
            assert d.mean() < 0.005 and d.flatten().quantile(0.99) < 0.05, (float(d.mean()), float(d.max()))
        else:
            assert d.mean() > 3 * luma.mean()  # the difference is in the colour, not the geometry


def test_bucket_shape_of_a_stand_in_is_kept(tmp_path):
    """VideoDataset.replacement prefers the sample's own bucket, then its own kind among buckets with enough
    frames; a 9-frame bucket is never stood in for by a 1-frame image."""
    for i in range(2):
        _video(tmp_path / f"{i}.mp4", 32, 32, seed=i)
    _jpeg(tmp_path / "p.jpg", 32, 32)
    from ptrain.data.sources import Record

    recs = [Record("a", tmp_path / "0.mp4"), Record("b", tmp_path / "1.mp4"), Record("c", tmp_path / "p.jpg", "image")]
    buckets = [Bucket(9, 32, 32), Bucket(9, 32, 64), Bucket(1, 32, 32)]
    ds = VideoDataset(recs, DataArgs(height=32, width=32, num_frames=9), FrameSampling(9), 0, buckets)
    assert ds.replacement(0, 5, {0}) == 1 and ds.replacement(0, 5, {0, 1}) is None
    assert ds.replacement(2, 5, {2}) in (0, 1)


@pytest.mark.parametrize("width", [48, 72])
def test_narrow_width_video_upscaled_with_the_scanned_size(tmp_path, width):
    """Found with the stand-in test: the scan reported a width decord misreads (48, 72) as the safe width it
    reopens at, so load_clip with that size opened the video as it is and failed whenever it was not reduced
    (a 48x32 clip trained at 64x64, or cropped to a tall bucket). The scan now reports the video's own size."""
    frames = np.zeros((10, 32, width, 3), dtype=np.uint8)
    frames[:, :, : width // 2] = 255  # left half white
    path = tmp_path / f"w{width}.mp4"
    write_video(path, frames, fps=8)
    info = probe(path)
    assert (info.height, info.width) == (32, width)
    for height, out_width in ((64, 64), (56, 16), (32, 32)):
        clip = load_clip(path, 5, height, out_width, source=info)
        assert clip.shape == (3, 5, height, out_width)
        assert torch.equal(clip, load_clip(path, 5, height, out_width)), (height, out_width)


# --- 7. videos as displayed: display-matrix mirroring, non-square pixels, variable frame rate --------------------


def _ffmpeg(*args: str) -> None:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-y", "-nostdin", *args], check=True)


def _ffmpeg_frame0(path: Path, height: int, width: int) -> np.ndarray:
    """Frame 0 as ffmpeg itself shows it (its display-matrix handling: rotation and mirroring), (H, W, 3) uint8."""
    import imageio_ffmpeg

    raw = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-nostdin", "-i", str(path),
                          "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, check=True).stdout  # fmt: skip
    return np.frombuffer(raw, np.uint8).reshape(height, width, 3)


def test_mirrored_videos_decode_as_ffmpeg_shows_them(tmp_path):
    """A display matrix can mirror as well as rotate (e.g. `ffmpeg -display_hflip`, some front cameras). decord
    applies the rotation and ignores the mirroring, so a horizontally mirrored clip came out upside down (decord
    rotates it by 180 degrees). Every rotation x mirror combination now decodes as ffmpeg shows it."""
    base = tmp_path / "base.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=12", "-frames:v", "4", "-c:v", "libx264", "-qp", "0",
            "-pix_fmt", "yuv444p", str(base))  # fmt: skip
    for rotation in (0, 90, 180, 270):
        for mirror in (False, True):
            path = tmp_path / f"r{rotation}{'m' if mirror else ''}.mp4"
            _ffmpeg("-display_rotation", str(rotation), *(["-display_hflip"] if mirror else []), "-i", str(base),
                    "-c", "copy", str(path))  # fmt: skip
            info = probe(path)
            h, w = (96, 64) if rotation % 180 else (64, 96)
            assert (info.height, info.width) == (h, w), (rotation, mirror, info)
            assert bool(info.flip) == mirror, (rotation, mirror, info)
            want = _ffmpeg_frame0(path, h, w).astype(int)
            for source in (info, None):  # the scan's probe, and load_clip probing for itself
                got = load_clip(path, 1, h, w, source=source, as_uint8=True)[:, 0].permute(1, 2, 0).numpy()
                assert np.abs(got.astype(int) - want).mean() < 1.0, (rotation, mirror)


def test_non_square_pixels_are_shown_at_their_display_aspect(tmp_path):
    """An anamorphic video (DVD / HDV footage: pixels wider than tall) was trained at its coded aspect, squeezed.
    A 160x120 video with 2:1 pixels holding a 20x40 px white box is displayed 320x120 with the box square: the
    scan reports the display size (its bucket follows it) and the frames show the box square, at full size and
    in the decoder-scaled path alike."""
    path = tmp_path / "anamorphic.mp4"
    scene = "color=black:size=160x120:rate=12,drawbox=x=70:y=40:w=20:h=40:color=white:t=fill,setsar=2/1"
    _ffmpeg("-f", "lavfi", "-i", scene, "-frames:v", "6", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p",
            str(path))  # fmt: skip
    info = probe(path)
    assert (info.height, info.width, info.decoded) == (120, 320, (120, 160))

    def box(clip: torch.Tensor) -> tuple[int, int]:
        white = clip[0, 0] > 0
        return int(white.any(1).sum()), int(white.any(0).sum())  # rows, columns

    assert box(load_clip(path, 3, 120, 320, source=info)) == (40, 40)
    h, w = box(load_clip(path, 3, 60, 60, source=info))  # decoder-scaled to 60x160, centre crop
    assert abs(h - 20) <= 1 and abs(w - 20) <= 1, (h, w)
    h, w = box(load_clip(path, 3, 60, 60))  # full-size decode, resized here
    assert abs(h - 20) <= 1 and abs(w - 20) <= 1, (h, w)
    from ptrain.data import filter_usable
    from ptrain.data.sources import Record

    lines = summary(filter_usable([Record("a", path)], 3), 1)
    assert "videos decoded as displayed: 1 non-square pixels (stretched to their display aspect)" in lines[1]


def _vfr_video(path: Path) -> Path:
    """2 s of a 48 fps source kept whole for its first 0.5 s and every 4th frame after (12 fps): 42 frames whose
    timestamps say so (a phone's variable frame rate)."""
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=48", "-t", "2", "-vf", "select='lt(n,24)+not(mod(n,4))'",
            "-fps_mode", "vfr", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path))  # fmt: skip
    return path


def test_variable_frame_rate_video_is_sampled_by_time(tmp_path):
    """--fps took every (average rate / fps)-th frame, so a variable-frame-rate clip's fast stretch came out slowed
    down and its slow stretch sped up. Frames are now the ones shown at each 1/fps step in time, the scan counts
    them the same way, and a constant-rate clip keeps its indices."""
    path = _vfr_video(tmp_path / "vfr.mp4")
    info = probe(path)
    assert info.num_frames == 42 and info.times is not None
    times = np.asarray(info.times)
    sampling = FrameSampling(12, fps=12)
    idx = sampling.indices(info.num_frames, info.fps, None, info.times)
    assert idx[:8] == [0, 4, 8, 12, 16, 20, 24, 25], idx
    np.testing.assert_allclose(np.diff(times[idx]), 1 / 12, atol=2e-3)
    assert sampling.available(info.num_frames, info.fps, info.times) == 24  # 0 .. 1.92 s at 12 fps
    even = FrameSampling(5).indices(info.num_frames, info.fps, None, info.times)  # spread evenly over the duration
    np.testing.assert_allclose(times[even], np.linspace(0, times[-1], 5), atol=0.05)
    # every 2nd frame, and consecutive frames from a random start: steps of the mean rate in time, as a
    # constant-rate clip's would be (they were index-based: 2 frames apart were 1/24 s or 1/6 s apart)
    # (each the frame shown at its time: at most one slow-stretch frame interval, 1/12 s, before it)
    step = 2 / info.fps
    strided = FrameSampling(8, stride=2).indices(info.num_frames, info.fps, None, info.times)
    np.testing.assert_allclose(times[strided], np.arange(8) * step, atol=1 / 12 + 1e-3)
    assert times[strided[-1]] > 0.55  # into the 12 fps stretch (index-based: 14 / 48 s)
    late = FrameSampling(6, random_start=True).indices(info.num_frames, info.fps, np.random.default_rng(3), info.times)
    np.testing.assert_allclose(times[late], times[late[0]] + np.arange(6) / info.fps, atol=1 / 12 + 1e-3)
    assert times[late[-1]] > 0.5
    assert FrameSampling(8, stride=2).available(info.num_frames, info.fps, info.times) == int(times[-1] / step) + 1
    clip = load_clip(path, sampling, 48, 64, source=info, as_uint8=True)
    import decord

    want = torch.from_numpy(decord.VideoReader(str(path)).get_batch(idx).asnumpy()).permute(3, 0, 1, 2)
    assert torch.equal(clip, want)

    cfr = _testsrc(tmp_path / "cfr.mp4", "yuv420p")
    c = probe(cfr)
    assert c.times is None
    assert FrameSampling(6, fps=12).indices(c.num_frames, c.fps, None, c.times) == [0, 2, 4, 6, 8, 10]


def test_float_images_are_read_with_one_as_white(tmp_path, caplog):
    """A float TIFF (PIL mode "F", 0..1) came out black: PIL's conversion clipped its values to 0..255 as they
    were. 1.0 is now white; values outside 0..1 are clipped with a warning naming the file and range."""
    pixels = np.full((32, 32), 0.5, np.float32)
    pixels[:, :16] = 0.25
    Image.fromarray(pixels, mode="F").save(tmp_path / "f.tif")
    x = load_image(tmp_path / "f.tif", 32, 32, as_uint8=True)
    assert x[0, 0, 0, 0] == 64 and x[0, 0, 0, -1] == 128
    Image.fromarray(pixels * 255, mode="F").save(tmp_path / "g.tif")
    with caplog.at_level(logging.WARNING):
        assert int(load_image(tmp_path / "g.tif", 32, 32, as_uint8=True).min()) == 255
    assert "g.tif: float pixels range 63.75..127.5" in caplog.text


def test_interlaced_video_keeps_one_field_and_hdr_is_named(tmp_path):
    """An interlaced video (DVD, broadcast, 1080i camcorder footage) decoded whole shows combing wherever anything
    moves: its two fields are 1/50 s apart. ptrain keeps the first field's rows (no combing) and stretches them
    back to the display size. A frame whose even rows are white and odd rows black (the extreme of combing)
    comes out uniformly white (its top field). HDR (HLG / PQ) videos, which decord converts without tone
    mapping, are named in the data summary."""
    path = tmp_path / "interlaced.mp4"
    scene = "color=black:size=64x48:rate=25,geq=lum='if(mod(Y,2),16,235)':cb=128:cr=128,setfield=tff"
    _ffmpeg("-f", "lavfi", "-i", scene, "-frames:v", "4", "-c:v", "libx264", "-flags", "+ildct+ilme", "-x264-params",
            "tff=1", "-qp", "0", "-pix_fmt", "yuv444p", str(path))  # fmt: skip
    info = probe(path)
    assert info.field == 0 and (info.height, info.width) == (48, 64)
    clip = load_clip(path, 2, 48, 64, source=info, as_uint8=True)
    assert clip.shape == (3, 2, 48, 64) and int(clip.min()) > 230, int(clip.min())
    clip = load_clip(path, 2, 24, 32, source=info, as_uint8=True)  # smaller: still one field, not a blend
    assert int(clip.min()) > 230, int(clip.min())

    hdr = tmp_path / "hlg.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=12", "-frames:v", "4", "-vf",
            "setparams=color_trc=arib-std-b67:color_primaries=bt2020:colorspace=bt2020nc", "-c:v", "libx264",
            "-pix_fmt", "yuv420p10le", str(hdr))  # fmt: skip
    assert probe(hdr).hdr == "HLG"
    from ptrain.data import filter_usable
    from ptrain.data.sources import Record

    lines = summary(filter_usable([Record("a", path), Record("b", hdr)], 2), 1)
    assert "1 interlaced (one field kept: no combing)" in lines[1], lines
    assert any("1 HDR (HLG / PQ) video decoded without tone mapping" in line for line in lines), lines


def test_camcorder_and_gif_files_are_found_and_unreadable_ones_named_with_a_fix(tmp_path):
    """An animated GIF or an AVCHD camcorder clip (.mts) beside its caption was silently ignored by the folder
    scan (an unknown extension), and DVD (.vob) / old-phone (.3gp) clips too. They are now found: those decord
    reads train, the others are skipped with the ffmpeg command that converts them."""
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=12", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(tmp_path / "cam.mts"))  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=12", "-t", "1", "-c:v", "mpeg2video",
            str(tmp_path / "dvd.vob"))  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=12", "-t", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p",
            str(tmp_path / "phone.3gp"))  # fmt: skip
    frames = [Image.new("RGB", (64, 48), (20 * i, 0, 0)) for i in range(10)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    for name in ("cam", "dvd", "phone", "anim"):
        (tmp_path / f"{name}.txt").write_text(f"a {name} clip")
    from ptrain.data import filter_usable

    records = load_records(DataArgs(data_root=tmp_path))
    assert sorted(r.video.name for r in records) == ["anim.gif", "cam.mts", "dvd.vob", "phone.3gp"]
    usable = filter_usable(records, 5)
    assert sorted(r.video.name for r in usable.records) == ["dvd.vob", "phone.3gp"]
    gif, mts = usable.skipped[str(tmp_path / "anim.gif")], usable.skipped[str(tmp_path / "cam.mts")]
    assert f"convert it to mp4: ffmpeg -i {tmp_path / 'anim.gif'} -pix_fmt yuv420p {tmp_path / 'anim'}.mp4" in gif
    assert f"remux it to mp4 (no re-encoding): ffmpeg -i {tmp_path / 'cam.mts'} -c copy {tmp_path / 'cam'}.mp4" in mts


def test_without_a_runnable_ffmpeg_geometry_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    """imageio-ffmpeg's binary missing or not executable: videos still train (square pixels, no mirroring
    assumed) and the log says so once, naming the error."""
    import imageio_ffmpeg

    from ptrain.data import video

    path = _testsrc(tmp_path / "a.mp4", "yuv420p")
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(tmp_path / "no-ffmpeg"))
    monkeypatch.setattr(video, "_warned_no_ffmpeg", [])
    with caplog.at_level(logging.WARNING):
        assert video.video_geometry(path) == video.Geometry()
        assert probe(path).height == 240
    assert caplog.text.count("cannot run ffmpeg to read videos' pixel aspect ratio") == 1
    assert "no-ffmpeg" in caplog.text
