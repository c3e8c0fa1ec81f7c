"""Issue 5's data pipeline on real encoded files: formats, images, buckets, the bucketed sampler, loader state,
bad input (skips, --strict_data, runtime replacement) and the mixed-data acceptance (dry run + 2-process run)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, first_error, run_ptrain
from PIL import Image

from ptrain.config import ConfigError, DataArgs
from ptrain.data import VideoDataset, build_dataloader, filter_usable, scan_dataset
from ptrain.data.buckets import Bucket, BucketPlan, ShapeRules, aspect_buckets
from ptrain.data.sampler import BucketBatchSampler
from ptrain.data.sources import load_records
from ptrain.data.video import FrameSampling, load_image, probe_image
from ptrain.testing.tiny import render_frames, synthetic_video_specs, write_mixed_dataset, write_video


def ltx_like_rules() -> ShapeRules:
    """LTX-Video's rules (8k+1 frames, sides multiple of 32) as its check_shape states them."""

    def check(f, h, w):
        if (f - 1) % 8 or h % 32 or w % 32:
            raise ConfigError(f"bad shape {f}x{h}x{w}")

    return ShapeRules(check, lambda f, h, w: ((f - 1) // 8 + 1) * (h // 32) * (w // 32))


def four_k_rules(multiple: int = 16) -> ShapeRules:
    def check(f, h, w):
        if (f - 1) % 4 or h % multiple or w % multiple:
            raise ConfigError(f"bad shape {f}x{h}x{w}")

    return ShapeRules(check, lambda f, h, w: 1)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return write_mixed_dataset(tmp_path_factory.mktemp("mixed") / "data", seed=0)


def _video(path: Path, w: int, h: int, frames: int, fps: int = 12, seed: int = 0) -> Path:
    spec = synthetic_video_specs(1, seed, [(w, h)])[0]
    import dataclasses

    write_video(path, render_frames(dataclasses.replace(spec, num_frames=frames, fps=fps)), fps)
    return path


# --- formats -------------------------------------------------------------------------------------------


def test_caption_file_pairs_images_and_bad_captions(tmp_path):
    _video(tmp_path / "a.mp4", 48, 32, 12)
    (tmp_path / "a.txt").write_text("a clip\n")
    sub = tmp_path / "more"
    sub.mkdir()
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(sub / "b.png")
    (sub / "b.txt").write_text("a picture")
    _video(sub / "nocap.mp4", 48, 32, 12)
    _video(sub / "latin1.mp4", 48, 32, 12)
    (sub / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    recs = {r.video.name: r for r in load_records(DataArgs(data_root=tmp_path))}
    assert recs["a.mp4"].caption == "a clip" and recs["a.mp4"].kind == "video" and recs["a.mp4"].error is None
    assert recs["b.png"].kind == "image" and recs["b.png"].caption == "a picture"
    assert "no caption file nocap.txt" in recs["nocap.mp4"].error
    assert "not valid UTF-8 (byte 0xe9" in recs["latin1.mp4"].error
    usable = filter_usable(list(recs.values()), FrameSampling(9), BucketPlan(
        DataArgs(enable_bucket=True, height=32, width=48, num_frames=9), four_k_rules()))  # fmt: skip
    assert sorted(r.video.name for r in usable.records) == ["a.mp4", "b.png"]
    assert set(Path(p).name for p in usable.skipped) == {"nocap.mp4", "latin1.mp4"}


def test_caption_pairs_follow_symlinked_folders_and_count_what_they_leave_out(tmp_path, caplog):
    """Found by a new-user trial: files inside a symlinked folder were dropped without a word (rglob does not follow
    links), a caption beside a .heic / .m2v and a caption alone vanished unsaid, CLIP.MP4 + CLIP.TXT was "no caption
    file", and macOS' ._* files were listed as samples without captions."""
    import logging

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _video(elsewhere / "linked.mp4", 48, 32, 12)
    (elsewhere / "linked.txt").write_text("behind a link")
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "link").symlink_to(elsewhere, target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # entered once, not forever
    (root / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # above root: not followed
    (tmp_path / "beside.mp4").write_bytes(b"")
    _video(root / "CLIP.MP4", 48, 32, 12)
    (root / "CLIP.TXT").write_text("upper case")
    (root / "photo.heic").write_bytes(b"\0" * 64)
    (root / "photo.txt").write_text("an iphone photo")
    (root / "alone.txt").write_text("nothing beside me")
    (root / "README.md").write_text("# notes")  # a caption-named .txt beside a non-media file is not a sample
    (root / "README.txt").write_text("notes")
    _video(root / "case.mp4", 48, 32, 12)  # two clips whose names differ only in case keep their own captions
    (root / "case.txt").write_text("lower")
    _video(root / "Case.mp4", 48, 32, 12)
    (root / "Case.txt").write_text("upper")
    (root / "._CLIP.MP4").write_bytes(b"\0" * 64)  # AppleDouble metadata, not a video
    _video(root / "Own.mp4", 48, 32, 12)  # Own.txt is Own.mp4's: own.mp4, without one, must not take it
    (root / "Own.txt").write_text("mine")
    _video(root / "own.mp4", 48, 32, 12)
    with caplog.at_level(logging.INFO, logger="ptrain"):
        recs = {r.video.name: r for r in load_records(DataArgs(data_root=root))}
    assert set(recs) == {"linked.mp4", "CLIP.MP4", "photo.heic", "case.mp4", "Case.mp4", "Own.mp4", "own.mp4"}
    assert recs["Own.mp4"].caption == "mine" and recs["Own.mp4"].error is None
    assert recs["own.mp4"].error == "no caption file own.txt beside it (Own.txt captions the file of its exact name)"
    assert (recs["case.mp4"].caption, recs["Case.mp4"].caption) == ("lower", "upper")
    assert recs["linked.mp4"].caption == "behind a link" and recs["linked.mp4"].error is None
    assert recs["linked.mp4"].video == root / "sub" / "link" / "linked.mp4"  # the user's path, not the target's
    assert recs["CLIP.MP4"].caption == "upper case" and recs["CLIP.MP4"].error is None
    assert "captioned by photo.txt, but .heic is not a type ptrain reads; convert it to .jpg or .png" in \
        recs["photo.heic"].error
    assert "2 caption files under" in caplog.text and "alone.txt" in caplog.text and "README.txt" in caplog.text
    assert "several media files of one name" not in caplog.text
    assert "1 hidden files and folders" in caplog.text
    assert "not following up: it links to a folder that contains --data_root" in caplog.text
    from ptrain.data.sources import _contains

    assert _contains("/", "/data/clips") and _contains("/data", "/data/clips")  # a link to "/" is one above too
    assert not _contains("/data/clips", "/data/clips") and not _contains("/data/cl", "/data/clips")


def test_videox_fun_json_parquet_and_dataset_config(tmp_path, mixed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    fun = load_records(DataArgs(dataset_file=mixed / "metadata.json"))
    assert Counter(r.kind for r in fun) == {"video": 9, "image": 4}  # `type` column read as it is
    assert fun[0].video == mixed / "videos/000.mp4" and fun[0].caption.endswith("background")
    # parquet with custom column names, relative to --data_root
    table = pa.table({"desc": [r.caption for r in fun[:3]], "clip": [str(r.video.relative_to(mixed)) for r in fun[:3]]})
    pq.write_table(table, tmp_path / "d.parquet")
    recs = load_records(DataArgs(dataset_file=tmp_path / "d.parquet", data_root=mixed, caption_column="desc",
                                 video_column="clip"))  # fmt: skip
    assert [r.video for r in recs] == [r.video for r in fun[:3]]
    with pytest.raises(ConfigError, match=r"no caption column \(tried caption, text"):
        load_records(DataArgs(dataset_file=tmp_path / "d.parquet", data_root=mixed))
    # two datasets: the mixed one twice, a caption-pair folder 1.5 times; videos x2 with --video_repeat
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(4):
        _video(pairs / f"{i}.mp4", 32, 32, 10, seed=i)
        (pairs / f"{i}.txt").write_text(f"clip {i}")
    (tmp_path / "ds.toml").write_text(
        f'[[datasets]]\ndataset_file = "{mixed / "metadata.json"}"\nrepeats = 2\n\n'
        '[[datasets]]\ndata_root = "pairs"\nrepeats = 1.5\n'
    )
    recs = load_records(DataArgs(dataset_config=tmp_path / "ds.toml"))
    assert Counter(r.dataset for r in recs) == {0: 26, 1: 6}
    assert len(recs) == len(load_records(DataArgs(dataset_config=tmp_path / "ds.toml")))  # fixed subset
    recs = load_records(DataArgs(dataset_config=tmp_path / "ds.toml", video_repeat=2))
    assert Counter(r.kind for r in recs) == {"video": 2 * (18 + 6), "image": 8}
    (tmp_path / "bad.json").write_text(json.dumps({"datasets": [{"data_root": "pairs", "wieght": 2}]}))
    with pytest.raises(ConfigError, match=r"unknown keys \['wieght'\]"):
        load_records(DataArgs(dataset_config=tmp_path / "bad.json"))


def test_images_alpha_grey_and_exif(mixed, tmp_path):
    alpha = load_image(mixed / "images/alpha.png", 40, 72)
    assert alpha.shape == (3, 1, 40, 72)
    assert alpha[:, 0, :, :18].min() > 0.99  # the transparent band is composited on white
    grey = load_image(mixed / "images/gray.png", 40, 72)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # an EXIF-rotated JPEG (orientation 6: 90 degrees) reports and loads its displayed size
    img = Image.fromarray(np.zeros((20, 60, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    info = probe_image(tmp_path / "rot.jpg")
    assert (info.height, info.width, info.num_frames) == (60, 20, 1)
    with pytest.raises(ValueError, match="extreme aspect ratio"):
        Image.fromarray(np.zeros((16, 200, 3), np.uint8)).save(tmp_path / "strip.png")
        probe_image(tmp_path / "strip.png")


@pytest.mark.parametrize(
    "name,codec,pixfmt",
    [("a.avi", "mpeg4", "yuv420p"), ("b.mov", "libx264", "yuv444p"), ("c.webm", "libvpx-vp9", "yuv420p"),
     ("d.mkv", "mjpeg", "yuvj420p")],
)  # fmt: skip
def test_containers_and_codecs_decode(tmp_path, name, codec, pixfmt):
    """Not only H.264 mp4: MPEG-4 AVI, H.264 4:4:4 MOV, VP9 WebM and MJPEG MKV are found, probed and decoded."""
    import imageio.v2 as imageio

    from ptrain.data.video import load_clip, probe

    frames = np.zeros((20, 48, 80, 3), np.uint8)
    frames[:, :, :40] = 255
    with imageio.get_writer(tmp_path / name, format="FFMPEG", fps=10, codec=codec, pixelformat=pixfmt,
                            macro_block_size=1, ffmpeg_log_level="error") as w:  # fmt: skip
        for f in frames:
            w.append_data(f)
    (tmp_path / name).with_suffix(".txt").write_text("half white")
    (rec,) = load_records(DataArgs(data_root=tmp_path))
    assert rec.kind == "video" and rec.caption == "half white"
    info = probe(rec.video)
    assert (info.num_frames, info.height, info.width) == (20, 48, 80) and abs(info.fps - 10) < 0.5
    clip = load_clip(rec.video, 9, 32, 32)
    assert clip.shape == (3, 9, 32, 32)
    row = clip[:, 0, 16].mean(0)
    assert row[:4].min() > 0.8 and row[-4:].max() < -0.8  # the white half stays left (centre crop of 80 -> 53 px)


def test_skips_under_repeats_count_files_and_samples(tmp_path, caplog):
    """A new-user trial: with `repeats = 3` one bad file printed "skipping 1 of 6 samples" beside "3 usable, 1
    skipped" (files against entries). Both counts are said now, and the reasons read as labels ("caption not text:
    1", not "caption is a 1")."""
    import logging

    from ptrain.data import summary

    root = tmp_path / "rep"
    root.mkdir()
    _video(root / "good.mp4", 48, 32, 12)
    (root / "good.txt").write_text("fine")
    (root / "bad.mp4").write_bytes(b"")
    (root / "bad.txt").write_text("empty file")
    (tmp_path / "rep.toml").write_text('[[datasets]]\ndata_root = "rep"\nrepeats = 3\n')
    args = DataArgs(dataset_config=tmp_path / "rep.toml", num_frames=9, height=32, width=48)
    with caplog.at_level(logging.WARNING, logger="ptrain"):
        usable = scan_dataset(args, FrameSampling(9))
    assert len(usable.records) == 3 and len(usable.skipped) == 1 and usable.skipped_samples == 3
    assert "skipping 1 file (3 of 6 samples, counting repeats)" in caplog.text
    lines = summary(usable, 1)
    assert lines[0].startswith("samples: 3 usable (3 videos, 0 images), 1 skipped file (3 samples, counting repeats)")
    assert any(line == "  skipped by reason: empty file: 1" for line in lines), lines
    table = tmp_path / "t.json"
    table.write_text(json.dumps([{"video": str(root / "good.mp4"), "caption": ["a", "b"]}]))
    usable = filter_usable(load_records(DataArgs(dataset_file=table)), FrameSampling(9))
    assert usable.skip_reasons() == {"caption not text": 1}


def test_no_sample_long_enough_suggests_buckets(tmp_path):
    _video(tmp_path / "short.mp4", 48, 32, 5)
    (tmp_path / "short.txt").write_text("five frames")
    args = DataArgs(data_root=tmp_path, num_frames=9, height=32, width=48)
    with pytest.raises(ConfigError, match=r"none of the 1 samples is usable .*clips shorter than --num_frames 9 .*"
                                          r"train with --enable_bucket"):  # fmt: skip
        scan_dataset(args, FrameSampling(9))


def test_an_undecodable_codec_or_audio_file_says_what_to_do(tmp_path):
    """A new-user trial: an AV1 video (yt-dlp's usual download) and an audio-only .mp4 failed with decord's bare
    "cannot find video stream with wanted index: -1". The skip now names the codec and the re-encoding command, or
    says there is no video stream."""
    import subprocess

    import imageio_ffmpeg

    from ptrain.data.video import probe

    ff = imageio_ffmpeg.get_ffmpeg_exe()
    av1, audio = tmp_path / "av1.mp4", tmp_path / "voice.mp4"
    made = subprocess.run([ff, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=s=64x48:d=0.5",
                           "-c:v", "libsvtav1", "-pix_fmt", "yuv420p", str(av1)], capture_output=True)  # fmt: skip
    subprocess.run([ff, "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", "sine=d=0.5", "-c:a", "aac",
                    str(audio)], check=True, capture_output=True)  # fmt: skip
    with pytest.raises(ValueError, match="no video stream in it"):
        probe(audio)
    from ptrain.data.video import decode_failure_hint

    assert decode_failure_hint(tmp_path / "gone.mp4") == ""  # ffmpeg cannot open it: no guess at its streams
    if made.returncode != 0:
        pytest.skip("this ffmpeg has no AV1 encoder")
    try:
        probe(av1)
    except ValueError as e:
        assert "its video stream is av1" in str(e) and f"ffmpeg -i {av1} -c:v libx264" in str(e)
        assert f"&& mv {tmp_path / 'av1.reencoded.mp4'} {av1}" in str(e)
    # (a decord build with an AV1 decoder reads it: nothing to say)


# --- buckets -------------------------------------------------------------------------------------------


def test_bucket_assignment_keeps_aspect_and_frames():
    rules = ltx_like_rules()
    assert rules.multiple == 32 and rules.shortest_video() == 9
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in aspect_buckets(512 * 512, 32))
    for area, multiple in ((512 * 512, 32), (480 * 720, 16), (32 * 32, 16)):  # as many wide shapes as tall ones
        shapes = set(aspect_buckets(area, multiple))
        assert shapes == {(w, h) for h, w in shapes}, (area, multiple)
    plan = BucketPlan(DataArgs(enable_bucket=True, height=512, width=512, num_frames=49), rules)
    land = plan.assign("video", 1080, 1920, frames_available=300)
    assert land.frames == 49 and land.width > land.height and abs(land.width / land.height - 16 / 9) < 0.2
    assert abs(land.width * land.height - 512 * 512) / (512 * 512) < 0.1
    port = plan.assign("video", 1920, 1080, frames_available=30)
    assert (port.height, port.width) == (land.width, land.height) and port.frames == 25  # largest 8k+1 <= 30
    assert plan.assign("image", 600, 600, 1) == Bucket(1, 512, 512)
    with pytest.raises(ValueError, match="too short: 5 usable frames, the shortest video bucket has 9"):
        plan.assign("video", 512, 512, frames_available=5)
    # without buckets: one shape; images need buckets
    fixed = BucketPlan(DataArgs(height=64, width=96, num_frames=9), rules)
    assert fixed.assign("video", 1080, 1920, 50) == Bucket(9, 64, 96)
    with pytest.raises(ValueError, match="add --enable_bucket"):
        fixed.assign("image", 64, 64, 1)


def test_token_length_budget_and_explicit_buckets():
    rules = four_k_rules()
    args = DataArgs(enable_bucket=True, video_sample_size=768, num_frames=49, training_with_video_token_length=True,
                    token_sample_size=512)  # fmt: skip
    b = BucketPlan(args, rules).assign("video", 768, 768, frames_available=200)
    assert (b.height, b.width, b.frames) == (768, 768, 21)  # 512^2 x 49 ~ 768^2 x 21
    small = BucketPlan(DataArgs(**{**args.__dict__, "video_sample_size": 512}), rules).assign("video", 512, 512, 200)
    assert small.frames == 49
    explicit = BucketPlan(DataArgs(video_resolution_buckets=["49x480x720", "49x720x480", "25x480x720", "1x512x512"]),
                          rules)  # fmt: skip
    assert explicit.assign("video", 1080, 1920, 100) == Bucket(49, 480, 720)
    assert explicit.assign("video", 1080, 1920, 30) == Bucket(25, 480, 720)
    assert explicit.assign("video", 1920, 1080, 100) == Bucket(49, 720, 480)
    assert explicit.assign("image", 100, 200, 1) == Bucket(1, 512, 512)
    with pytest.raises(ValueError, match="no bucket in --video_resolution_buckets fits"):
        explicit.assign("video", 480, 720, 20)
    with pytest.raises(ConfigError, match="--video_resolution_buckets 48x480x720"):
        BucketPlan(DataArgs(video_resolution_buckets=["48x480x720"]), rules)
    # --random_hw_adapt: areas drawn per sample index, the same every time
    hw = BucketPlan(DataArgs(enable_bucket=True, video_sample_size=1024, random_hw_adapt=True, num_frames=49), rules)
    sizes = [hw.assign("video", 1000, 1000, 100, index=i) for i in range(30)]
    assert sizes == [hw.assign("video", 1000, 1000, 100, index=i) for i in range(30)]
    assert {s.height for s in sizes} == {1024, 768, 512}


def _bucket_steps(ids, global_batch, dp, accum, steps, seed=5):
    per_rank = global_batch // (dp * accum)
    out: dict[int, list] = {}
    for r in range(dp):
        it = iter(BucketBatchSampler(ids, per_rank, r, dp, accum, seed))
        for step in range(steps):
            for _ in range(accum):
                out.setdefault(step, []).extend(next(it))
    return {s: sorted(v) for s, v in out.items()}


def test_bucket_sampler_one_shape_per_step_and_layout_independent():
    ids = [0] * 7 + [1] * 5 + [2] * 2 + [3] * 1
    ref = _bucket_steps(ids, 4, dp=1, accum=1, steps=12)
    for dp, accum in ((2, 1), (4, 1), (2, 2), (1, 4)):
        assert _bucket_steps(ids, 4, dp, accum, 12) == ref, (dp, accum)
    spe = BucketBatchSampler(ids, 4, 0, 1, 1, 5).steps_per_epoch
    assert spe == 2 + 2 + 1 + 1
    for step, items in ref.items():
        assert len({ids[i] for i, _ in items}) == 1, f"step {step} mixes buckets"
        assert sorted(p for _, p in items) == list(range(step * 4, step * 4 + 4))
    # each epoch covers every sample
    for e in range(2):
        seen = {i for s in range(e * spe, (e + 1) * spe) for i, _ in ref[s]}
        assert seen == set(range(len(ids)))
    assert _bucket_steps(ids, 4, 1, 1, 6, seed=6) != _bucket_steps(ids, 4, 1, 1, 6, seed=5)


def test_stateful_dataloader_round_trip_mid_epoch(mixed):
    args = DataArgs(dataset_file=mixed / "metadata.json", enable_bucket=True, height=32, width=32, num_frames=17,
                    dataloader_num_workers=1)  # fmt: skip
    sampling = FrameSampling.from_args(args)
    usable = scan_dataset(args, sampling, four_k_rules(8))

    def take(loader_iter, n):
        return [(b["index"].tolist(), b["video"].shape, b["video"].sum().item()) for b in
                (next(loader_iter) for _ in range(n))]  # fmt: skip

    loader, _ = build_dataloader(usable, args, sampling, 0, 2, 1, 1, seed=3)
    it = iter(loader)
    take(it, 5)
    state = loader.state_dict()
    expected = take(it, 6)
    loader2, _ = build_dataloader(usable, args, sampling, 0, 2, 1, 1, seed=3)
    loader2.load_state_dict(state)
    assert take(iter(loader2), 6) == expected
    assert len({shape for _, shape, _ in expected}) > 1  # several buckets were crossed


# --- bad input -----------------------------------------------------------------------------------------


def test_strict_data_lists_every_bad_file(mixed):
    args = DataArgs(data_root=mixed, enable_bucket=True, height=32, width=32, num_frames=17, strict_data=True)
    with pytest.raises(ConfigError) as e:
        scan_dataset(args, FrameSampling.from_args(args), four_k_rules(8))
    msg = str(e.value)
    assert "--strict_data: 4 of 13 samples are unusable" in msg
    for name, why in (("corrupt.mp4", "cannot decode"), ("missing.mp4", "no such file"),
                      ("short.mp4", "too short"), ("empty.jpg", "empty file")):  # fmt: skip
        assert name in msg and why in msg


def test_file_that_breaks_after_the_scan_is_replaced_deterministically(tmp_path):
    for i in range(4):
        _video(tmp_path / f"{i}.mp4", 32, 32, 12, seed=i)
        (tmp_path / f"{i}.txt").write_text(f"clip {i}")
    args = DataArgs(data_root=tmp_path, height=32, width=32, num_frames=9)
    usable = scan_dataset(args, FrameSampling(9))
    (tmp_path / "2.mp4").write_bytes(b"gone bad")
    ds = VideoDataset(usable.records, args, FrameSampling(9), seed=1)
    idx = [r.video.name for r in usable.records].index("2.mp4")
    a, b = ds[(idx, 11)], ds[(idx, 11)]
    assert a["replaced"] == 1 and a["index"] != idx and a["index"] == b["index"] and torch.equal(a["video"], b["video"])
    assert ds[(idx, 12)]["replaced"] == 1 and ds[((idx + 1) % 4, 11)]["replaced"] == 0
    for i in range(4):
        (tmp_path / f"{i}.mp4").write_bytes(b"all gone")
    with pytest.raises(RuntimeError, match="failed to decode; the data has gone bad"):
        ds[(0, 0)]


# --- acceptance: dry run and a 2-process run on the mixed folder --------------------------------------------


@pytest.mark.heavy  # suite time; CI runs it
def test_mixed_folder_dry_run_and_bucketed_training(tiny_ckpt, mixed, tmp_path):
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(mixed), "--enable_bucket",
            "--height", "32", "--width", "32", "--num_frames", "17", "--transformer_dtype", "float32",
            "--dataloader_num_workers", "0", "--report_to", "none"]  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "ptrain", *args, "--output_dir", str(tmp_path / "dry"), "--dry_run"],
                       cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "samples: 9 usable (6 videos, 3 images), 4 skipped" in out
    for name, why in (("corrupt.mp4", "cannot decode"), ("missing.mp4", "no such file"),
                      ("short.mp4", "too short"), ("empty.jpg", "empty file")):  # fmt: skip
        assert any(name in line and why in line for line in out.splitlines()), (name, out)
    assert "F x H x W" in out and "tokens/sample" in out and "steps per epoch" in out
    assert "precomputation: on (auto: 111.1 passes over 9 samples" in out and "loader workers per rank: 0" in out
    buckets = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit() and "x" in line.split()[0]]
    assert len(set(b.split("x", 1)[1] for b in buckets)) >= 3 and any(b.startswith("1x") for b in buckets)

    run = run_ptrain(2, [*args, "--train_steps", "4", "--dp_shards", "2", "--checkpointing_steps", "0"],
                     tmp_path / "run")  # fmt: skip
    assert run.returncode == 0, first_error(run.stderr)
    assert len(run.losses) == 4 and all(np.isfinite(run.losses))
    assert all(m["data_skipped"] == 4 and m["data_replaced"] == 0 for m in run.metrics)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    # the scan's cache: written by the run (2 ranks probed, rank 0 wrote), never by the dry run
    assert not (tmp_path / "dry" / "scan_cache.json").exists()
    assert "from the scan cache" in run.stderr and (tmp_path / "run" / "scan_cache.json").is_file()


def test_bucketed_training_matches_across_layouts(tiny_ckpt, mixed, tmp_path):
    """With buckets, 1 process x batch 2 and FSDP 2 x batch 1 see the same samples: same per-step losses."""
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(mixed), "--enable_bucket",
            "--height", "32", "--width", "32", "--num_frames", "17", "--transformer_dtype", "float32",
            "--vae_dtype", "float32", "--text_encoder_dtype", "float32", "--dataloader_num_workers", "0",
            "--report_to", "none", "--train_steps", "3", "--checkpointing_steps", "0", "--seed", "3"]  # fmt: skip
    one = run_ptrain(1, [*args, "--batch_size", "2"], tmp_path / "one")
    two = run_ptrain(2, [*args, "--batch_size", "1", "--dp_shards", "2"], tmp_path / "two")
    assert one.returncode == 0 and two.returncode == 0, first_error(one.stderr + two.stderr)
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-4)


# --- precomputation ----------------------------------------------------------------------------------------


def test_precomputed_training_equals_on_the_fly_and_cache_is_keyed(tiny_ckpt, tiny_data, tmp_path):
    """Latent distributions + text embeddings cached (sharded over 2 ranks) give the losses of on-the-fly
    encoding for the same noise/timesteps (caption dropout included); a reuse run reads the same cache."""
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--height", "32",
            "--width", "32", "--num_frames", "9", "--transformer_dtype", "float32", "--vae_dtype", "float32",
            "--text_encoder_dtype", "float32", "--dataloader_num_workers", "0", "--report_to", "none",
            "--train_steps", "3", "--checkpointing_steps", "0", "--caption_dropout_p", "0.5", "--seed", "4"]  # fmt: skip
    cache = tmp_path / "cache"
    fly = run_ptrain(1, [*args, "--batch_size", "2", "--enable_precomputation", "off"], tmp_path / "fly")
    pre = run_ptrain(2, [*args, "--batch_size", "1", "--dp_shards", "2", "--enable_precomputation",
                         "--precomputation_dir", str(cache)], tmp_path / "pre")  # fmt: skip
    assert fly.returncode == 0 and pre.returncode == 0, first_error(fly.stderr + pre.stderr)
    np.testing.assert_allclose(pre.losses, fly.losses, rtol=1e-5)
    assert "precomputation: 8 samples in" in pre.stderr
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (folder / "complete").is_file() and len(list(folder.glob("0*.safetensors"))) == 8
    stamp = (folder / "00000000.safetensors").stat().st_mtime_ns
    again = run_ptrain(1, [*args, "--batch_size", "2", "--enable_precomputation", "--precomputation_dir", str(cache),
                           "--precomputation_reuse"], tmp_path / "again")  # fmt: skip
    assert again.returncode == 0, first_error(again.stderr)
    assert "precomputation: reusing" in again.stderr
    assert (folder / "00000000.safetensors").stat().st_mtime_ns == stamp
    np.testing.assert_allclose(again.losses, fly.losses, rtol=1e-5)
    # One caption edited (a new key): the 7 unchanged samples are taken from the complete cache, one is encoded
    rows = (tiny_data / "metadata.csv").read_text().splitlines()
    rows[1] = "an edited caption," + rows[1].split(",", 1)[1]
    (tmp_path / "edited.csv").write_text("\n".join(rows) + "\n")
    edited = run_ptrain(1, [*args, "--batch_size", "2", "--enable_precomputation", "--precomputation_dir", str(cache),
                            "--precomputation_reuse", "--dataset_file", str(tmp_path / "edited.csv"),
                            "--train_steps", "1"],
                        tmp_path / "edited")  # fmt: skip
    assert edited.returncode == 0, first_error(edited.stderr)
    assert "precomputation: 8 samples in" in edited.stderr and "(7 taken from an earlier cache" in edited.stderr
    (new,) = [p for p in cache.iterdir() if p.is_dir() and p != folder]
    ours, theirs = json.loads((new / "manifest.json").read_text()), json.loads((folder / "manifest.json").read_text())
    shared = [k for k in ours["files"] if k in theirs["files"]]
    assert len(shared) == 7 and all((new / ours["files"][k]).read_bytes() == (folder / theirs["files"][k]).read_bytes()
                                    for k in shared)  # fmt: skip


def test_cache_key_changes_with_data_and_settings(tiny_ckpt, tiny_data, tmp_path):
    import os
    import shutil

    from ptrain.config import parse_config
    from ptrain.data.precompute import cache_dir, manifest

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)

    def key(*extra):
        cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(data),
                            "--height", "32", "--width", "32", "--num_frames", "9", *extra]).validate()  # fmt: skip
        usable = scan_dataset(cfg.data, FrameSampling.from_args(cfg.data))
        return cache_dir(cfg, manifest(cfg, usable, 128)).name

    base = key()
    assert key() == base
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(data), "--height", "32",
                        "--width", "32", "--num_frames", "9"]).validate()  # fmt: skip
    usable = scan_dataset(cfg.data, FrameSampling.from_args(cfg.data))
    assert cache_dir(cfg, manifest(cfg, usable, 128, vae_tiling=True)).name != base  # tiled latents differ
    assert key("--height", "64") != base and key("--id_token", "TOK") != base and key("--vae_dtype", "float32") != base
    video = next((data / "videos").iterdir())
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert key() != base
    with pytest.raises(ConfigError, match="--enable_precomputation stores one crop"):
        key("--enable_precomputation", "--reshape_mode", "random_crop")


@pytest.mark.heavy  # 31 s: CI runs it (keeps the local suite under 20 minutes)
def test_bucketed_resume_continues_at_the_same_samples(tiny_ckpt, mixed, tmp_path):
    """Stop after 2 steps, resume to 4: steps 3-4 and the final LoRA equal an uninterrupted bucketed run."""
    from safetensors.torch import load_file

    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(mixed), "--enable_bucket",
            "--height", "32", "--width", "32", "--num_frames", "17", "--transformer_dtype", "float32",
            "--vae_dtype", "float32", "--text_encoder_dtype", "float32", "--dataloader_num_workers", "0",
            "--report_to", "none", "--checkpointing_steps", "2", "--seed", "9", "--lr", "1e-3"]  # fmt: skip
    full = run_ptrain(1, [*args, "--train_steps", "4"], tmp_path / "full")
    first = run_ptrain(1, [*args, "--train_steps", "2"], tmp_path / "resumed")
    second = run_ptrain(1, [*args, "--train_steps", "4"], tmp_path / "resumed")
    assert full.returncode == 0 and first.returncode == 0 and second.returncode == 0, first_error(
        full.stderr + first.stderr + second.stderr
    )
    assert "resuming from" in second.stderr
    assert "--enable_tiling / --enable_slicing auto: off on cpu" in second.stderr
    assert second.losses == full.losses  # metrics.jsonl holds steps 1-2 from the first run, 3-4 from the second
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- --enable_precomputation auto (the default) -------------------------------------------------------------


def test_enable_precomputation_spellings(tmp_path):
    from ptrain.config import parse_config

    def value(*argv):
        return parse_config(["--pretrained_model_name_or_path", ".", *argv]).data.enable_precomputation

    assert value() == "auto"
    assert value("--enable_precomputation") == value("--enable_precomputation", "--height", "64") == "on"
    assert value("--enable_precomputation", "true") == value("--enable_precomputation=on") == "on"
    assert value("--enable_precomputation", "false") == value("--enable_precomputation", "off") == "off"
    preset = tmp_path / "p.toml"
    preset.write_text("[data]\nenable_precomputation = true\n")
    assert value("--config", str(preset)) == "on"
    assert value("--config", str(preset), "--enable_precomputation", "auto") == "auto"
    with pytest.raises(SystemExit):
        value("--enable_precomputation", "sometimes")
    assert DataArgs(enable_precomputation=False).enable_precomputation == "off"
    assert DataArgs().num_workers(precomputed=True) == 0 and DataArgs().num_workers(precomputed=False) == 2
    assert DataArgs(dataloader_num_workers=3).num_workers(precomputed=True) == 3


def test_auto_precomputation_decisions(tiny_ckpt, tiny_data):
    """auto: on for more than one pass, off (with the reason) for one pass, per-pass random crops, a mode that
    encodes pixels every step, or a cache that would not fit the disk; on / off as given; on errors where it
    cannot work."""
    from ptrain.config import parse_config
    from ptrain.data.precompute import decide
    from ptrain.models.spec import get_spec

    spec = get_spec("ltx_video")
    rules = spec.shape_rules(str(tiny_ckpt), {})

    def decision(*extra, batch=4):
        cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                            "--height", "32", "--width", "32", "--num_frames", "9", "--batch_size", str(batch),
                            "--output_dir", "/nonexistent/out", *extra]).validate()  # fmt: skip
        usable = scan_dataset(cfg.data, FrameSampling.from_args(cfg.data), rules)
        return decide(cfg, usable, spec, rules, batch)

    on = decision("--train_steps", "4")  # 16 samples drawn of 8
    assert on.enabled and on.reuse and "auto: 2.0 passes over 8 samples" in on.reason and on.estimate_bytes > 0
    once = decision("--train_steps", "2")  # 8 of 8
    assert not once.enabled and "one pass or less (2 steps x global batch 4 = 8 samples of 8)" in once.reason
    crop = decision("--train_steps", "40", "--reshape_mode", "random_crop")
    assert not crop.enabled and "random_crop" in crop.reason
    inpaint = decision("--train_steps", "40", "--train_mode", "inpaint")
    assert not inpaint.enabled and "encodes conditioning frames" in inpaint.reason
    with pytest.raises(ConfigError, match="inpaint for ltx_video encodes conditioning frames.*: it cannot use"):
        decision("--train_steps", "40", "--train_mode", "inpaint", "--enable_precomputation")
    i2v = decision("--train_steps", "4", "--train_mode", "i2v")  # the first frame's conditioning is stored too
    assert i2v.enabled and i2v.estimate_bytes > on.estimate_bytes
    spec = get_spec("cogvideox")  # which noises the first frame anew every step
    noised = decision("--train_steps", "40", "--train_mode", "i2v")
    assert not noised.enabled and "i2v for cogvideox encodes conditioning frames (masked or noised)" in noised.reason
    huge = decision("--train_steps", "40", "--max_sequence_length", str(10**10))  # ~1.3 TB of text per sample
    assert not huge.enabled and "would fill more than half of the" in huge.reason
    assert not decision("--train_steps", "40", "--enable_precomputation", "off").enabled
    explicit = decision("--train_steps", "1", "--enable_precomputation")
    assert explicit.enabled and not explicit.reuse
    assert decision("--train_steps", "1", "--enable_precomputation", "--precomputation_reuse").reuse


def test_auto_precomputation_on_for_epochs_and_reused_by_the_next_run(tiny_ckpt, tiny_data, tmp_path,
                                                                      single_process_env):  # fmt: skip
    """The default (auto) precomputes a 2-epoch run with no loader workers; a second run with the same data, model
    and settings (here: a single pass, which would not precompute on its own) reuses that cache without
    recomputing it; the cache's estimated size is close to its real one."""
    import logging

    from ptrain.config import parse_config
    from ptrain.data.precompute import decide
    from ptrain.models.spec import get_spec
    from ptrain.trainer import train

    out = tmp_path / "out"
    base = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--height", "32",
            "--width", "32", "--num_frames", "9", "--transformer_dtype", "float32", "--vae_dtype", "float32",
            "--text_encoder_dtype", "float32", "--report_to", "none", "--checkpointing_steps", "0", "--batch_size",
            "4", "--seed", "5", "--output_dir", str(out), "--precomputation_dir", str(tmp_path / "cache")]  # fmt: skip
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("ptrain").addHandler(handler)
    try:
        first = train(parse_config([*base, "--train_steps", "4"]))
        said_first, records[:] = list(records), []
        second = train(parse_config([*base, "--train_steps", "2", "--resume_from_checkpoint", "none"]))
    finally:
        logging.getLogger("ptrain").removeHandler(handler)
    assert any(m.startswith("precomputation: on (auto: 2.0 passes over 8 samples") for m in said_first), said_first
    assert any(m.startswith("data: ") and m.endswith("; 0 loader workers") for m in said_first)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    files = sorted(folder.glob("0*.safetensors"))
    assert (folder / "complete").is_file() and len(files) == 8
    stamps = [p.stat().st_mtime_ns for p in files]
    assert any(m.startswith("precomputation: on (auto: reusing the complete cache") for m in records), records
    assert any(m.startswith("precomputation: reusing") for m in records)
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("0*.safetensors"))] == stamps
    assert second.losses == first.losses[:2]  # the same samples, noise and latents as the first run's steps 1-2
    cfg = parse_config([*base, "--train_steps", "4"]).validate()
    spec = get_spec("ltx_video")
    rules = spec.shape_rules(str(tiny_ckpt), {})
    est = decide(cfg, scan_dataset(cfg.data, FrameSampling.from_args(cfg.data), rules), spec, rules, 4).estimate_bytes
    real = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert 0.7 * real < est < 1.5 * real, (est, real)


def test_sample_that_failed_to_precompute_is_replaced_from_its_bucket(tmp_path):
    """A sample the cache could not decode (manifest "failed") trains as another cached sample of its bucket, chosen
    by (seed, position) and counted as replaced; a bucket with no cached sample left is an error naming the file."""
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from ptrain.data.precompute import PrecomputedDataset, sample_key

    recs = [SimpleNamespace(video=Path(f"{i}.mp4"), kind="video", caption=f"c{i}", first_frame=None) for i in range(4)]
    usable = SimpleNamespace(records=recs, buckets=[Bucket(9, 32, 32)] * 3 + [Bucket(9, 32, 64)])
    keys = [sample_key(usable, i) for i in range(4)]
    for i in (0, 2, 3):
        save_file({"latent_dist": torch.full((2,), float(i))}, tmp_path / f"{i:08d}.safetensors")
    man = {"files": {keys[i]: f"{i:08d}.safetensors" for i in (0, 2, 3)}, "failed": {keys[1]: "1.mp4: gone bad"}}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    ds = PrecomputedDataset(usable, tmp_path, caption_dropout_p=0.0, seed=0)
    picks = {ds[(1, pos)]["index"] for pos in range(20)}
    assert picks == {0, 2} and all(ds[(1, pos)]["replaced"] == 1 for pos in range(3))
    assert ds[(1, 7)]["index"] == ds[(1, 7)]["index"] and ds[(2, 7)]["replaced"] == 0
    man["files"].pop(keys[3])
    man["failed"][keys[3]] = "3.mp4: gone bad"
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(RuntimeError, match=r"3.mp4 failed to decode while precomputing \(3.mp4: gone bad\)"):
        PrecomputedDataset(usable, tmp_path, caption_dropout_p=0.0, seed=0)


def test_precompute_leaves_out_a_file_that_broke_after_the_scan(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """The cache records the failure (naming the file) instead of stopping; training then replaces that sample."""
    import shutil

    from ptrain.config import parse_config
    from ptrain.data.precompute import PrecomputedDataset, precompute, sample_key
    from ptrain.models.spec import get_spec
    from ptrain.parallel import init_distributed

    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(data), "--height",
                        "32", "--width", "32", "--num_frames", "9", "--output_dir", str(tmp_path / "out")])  # fmt: skip
    cfg.validate()
    init_distributed()
    spec = get_spec("ltx_video")
    sampling = FrameSampling.from_args(cfg.data)
    usable = scan_dataset(cfg.data, sampling, spec.shape_rules(str(tiny_ckpt), {}))
    broken = usable.records[3].video
    broken.write_bytes(b"gone bad")
    comps = spec.load_components(str(tiny_ckpt), dict.fromkeys(("transformer", "vae", "text_encoder"), torch.float32),
                                 torch.device("cpu"), {})  # fmt: skip
    spec = spec.bind(comps)
    videos = VideoDataset(usable.records, cfg.data, sampling, 0, usable.buckets, usable.infos)
    folder = precompute(cfg, usable, spec, comps, videos, 16, torch.device("cpu"))
    failed = json.loads((folder / "manifest.json").read_text())["failed"]
    assert list(failed) == [sample_key(usable, 3)] and str(broken) in failed[sample_key(usable, 3)]
    assert len(list(folder.glob("0*.safetensors"))) == 7
    item = PrecomputedDataset(usable, folder, 0.0, 0)[(3, 5)]
    assert item["replaced"] == 1 and item["index"] != 3 and item["latent_dist"].shape[0] > 0


def test_interrupted_precomputation_continues_from_its_files(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """Ctrl-C (or a preemption) half-way through the precomputation: the files written so far are whole (written
    under a temporary name, then renamed) and the next run of the same key encodes only the samples without one.
    A half-written file (a crash in a write) is encoded again. The interrupt names the phase and the folder
    (ptrain.interrupts), and the continued cache equals an uninterrupted one."""
    from safetensors.torch import load_file

    from ptrain.config import parse_config
    from ptrain.data.precompute import precompute
    from ptrain.interrupts import message
    from ptrain.models.spec import get_spec
    from ptrain.parallel import init_distributed

    def setup(out: Path):
        cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                            "--height", "32", "--width", "32", "--num_frames", "9", "--output_dir", str(out)])  # fmt: skip
        return cfg.validate()

    init_distributed()
    cfg = setup(tmp_path / "a")
    spec = get_spec("ltx_video")
    sampling = FrameSampling.from_args(cfg.data)
    usable = scan_dataset(cfg.data, sampling, spec.shape_rules(str(tiny_ckpt), {}))
    comps = spec.load_components(str(tiny_ckpt), dict.fromkeys(("transformer", "vae", "text_encoder"), torch.float32),
                                 torch.device("cpu"), {})  # fmt: skip
    spec = spec.bind(comps)
    videos = VideoDataset(usable.records, cfg.data, sampling, 0, usable.buckets, usable.infos)
    loads, load = [], videos._load

    def interrupted_at_the_fifth(i, *a):
        loads.append(i)
        if len(loads) == 5:
            raise KeyboardInterrupt
        return load(i, *a)

    videos._load = interrupted_at_the_fifth
    with pytest.raises(KeyboardInterrupt) as info:
        precompute(cfg, usable, spec, comps, videos, 16, torch.device("cpu"))
    text, code = message(info.value)
    (folder,) = [p for p in (tmp_path / "a" / "precomputed").iterdir()]
    assert code == 130 and text.startswith("interrupted by SIGINT while precomputing") and str(folder) in text
    written = sorted(folder.glob("*.safetensors"))
    assert len(written) == 4 and not (folder / "complete").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in written[:3]}
    written[3].write_bytes(written[3].read_bytes()[:-10])  # half-written by a crash
    (folder / "00000005.safetensors.tmp").write_bytes(b"partial")

    loads.clear()
    videos._load = lambda i, *a: (loads.append(i), load(i, *a))[1]
    assert precompute(cfg, usable, spec, comps, videos, 16, torch.device("cpu")) == folder
    assert len(loads) == 5 and not list(folder.glob("*.tmp"))  # 4 never encoded + the half-written one
    assert {p: s for p, s in stamps.items() if (folder / p).stat().st_mtime_ns == s} == stamps
    assert (folder / "complete").is_file()

    fresh_cfg = setup(tmp_path / "b")
    videos._load = load
    fresh = precompute(fresh_cfg, usable, spec, comps, videos, 16, torch.device("cpu"))
    assert sorted(p.name for p in fresh.glob("*.safetensors")) == sorted(p.name for p in folder.glob("*.safetensors"))
    for p in fresh.glob("*.safetensors"):
        a, b = load_file(p), load_file(folder / p.name)
        assert all(torch.equal(a[k], b[k]) for k in a), p.name


def test_captions_the_text_encoder_cuts_are_counted_at_start(tiny_ckpt, tiny_data, tmp_path, single_process_env,
                                                             caplog):  # fmt: skip
    """A new-user trial: a 2,000-word caption trained on its first 128 tokens without a word (diffusers' warning
    is silenced, Wan's pipeline never warns). The start counts the captions over the limit, --id_token included."""
    import logging

    from conftest import TINY_ARGS
    from transformers import AutoTokenizer

    from ptrain.config import parse_config
    from ptrain.data import warn_long_captions
    from ptrain.trainer import Trainer, plan_run

    tok = AutoTokenizer.from_pretrained(tiny_ckpt / "tokenizer")
    with caplog.at_level(logging.WARNING, logger="ptrain"):
        assert warn_long_captions(["a cat", "a cat", "word " * 40, ""], tok, 16) == 1
    assert "1 of 2 distinct captions are longer than the text encoder's 16 tokens" in caplog.text
    caplog.clear()
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "1", "--id_token", "token " * 300,
                        *TINY_ARGS])  # fmt: skip
    run = plan_run(cfg.validate())  # (its logging set-up replaces the root's handlers, caplog's too)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("ptrain").addHandler(handler)
    try:
        Trainer(run).close_loader()
    finally:
        logging.getLogger("ptrain").removeHandler(handler)
    assert any("8 of 8 distinct captions are longer than the text encoder's" in m for m in seen), seen
