"""Minimal data path: dataset formats, decoding (resize + center crop, even frames), skips, sampler determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ptrain.config import ConfigError, DataArgs, ObjectiveArgs
from ptrain.data import VideoDataset, filter_usable
from ptrain.data.sampler import GlobalBatchSampler
from ptrain.data.sources import load_records
from ptrain.data.video import even_indices, load_clip, probe
from ptrain.objectives import FlowMatching, sample_generators
from ptrain.testing.tiny import write_video


def test_cogvideox_folder_and_csv_agree(tiny_data):
    folder = load_records(DataArgs(data_root=tiny_data))
    csv = load_records(DataArgs(dataset_file=tiny_data / "metadata.csv"))
    assert len(folder) == 8 and folder == csv
    assert all(r.video.is_file() and r.caption for r in folder)


def test_json_and_jsonl_with_custom_columns(tiny_data, tmp_path):
    rows = [{"text": r.caption, "file_path": str(r.video)} for r in load_records(DataArgs(data_root=tiny_data))]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("d.json", "d.jsonl"):
        recs = load_records(DataArgs(dataset_file=tmp_path / name, caption_column="text", video_column="file_path"))
        assert [r.caption for r in recs] == [r["text"] for r in rows]


def test_format_errors_name_the_file(tiny_data, tmp_path):
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    (tmp_path / "videos.txt").write_text("videos/000.mp4\n")
    with pytest.raises(ConfigError, match="prompts.txt has 2 lines but videos.txt has 1"):
        load_records(DataArgs(data_root=tmp_path))
    with pytest.raises(ConfigError, match=r"no column 'clip' \(--video_column\)"):
        load_records(DataArgs(dataset_file=tiny_data / "metadata.csv", video_column="clip"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"found neither line files \(prompts.txt \+ videos.txt\)"):
        load_records(DataArgs(data_root=empty))


def test_even_frames_and_center_crop_without_stretch(tmp_path):
    # 24 frames, 96x48 (2:1), frame i is filled with value 10*i; the centre column band is white.
    frames = np.zeros((24, 48, 96, 3), dtype=np.uint8)
    for i in range(24):
        frames[i] = 10 * i
    frames[:, :, 36:60] = 255  # central 24 px of 96
    path = tmp_path / "v.mp4"
    write_video(path, frames, fps=24)
    assert probe(path).num_frames == 24 and (probe(path).height, probe(path).width) == (48, 96)
    assert even_indices(24, 9) == [0, 3, 6, 9, 12, 14, 17, 20, 23]
    clip = load_clip(path, 9, height=32, width=32)
    assert clip.shape == (3, 9, 32, 32) and clip.min() >= -1 and clip.max() <= 1
    # 48x96 scaled to cover 32x32 -> 32x64, centre crop keeps the middle 32 columns: the white band
    # (24 of 96 px) becomes 16 px wide and centred; a stretch to 32x32 would have made it 8 px.
    row = clip[:, 0, 16].mean(0)
    white = (row > 0.8).nonzero().flatten()
    assert 13 <= len(white) <= 17 and abs(white.float().mean().item() - 15.5) < 1.0
    # Frame order follows time (brightness grows with the frame index outside the band).
    corner = clip[0, :, 2, 2]
    assert torch.all(corner[1:] >= corner[:-1])


@pytest.mark.parametrize("width", [48, 72])
def test_narrow_widths_decord_misreads_still_decode(tmp_path, width):
    frames = np.zeros((10, 32, width, 3), dtype=np.uint8)
    frames[:, :, : width // 2] = 255  # left half white
    path = tmp_path / f"w{width}.mp4"
    write_video(path, frames, fps=8)
    assert probe(path).num_frames == 10
    clip = load_clip(path, 5, height=32, width=32)
    assert clip.shape == (3, 5, 32, 32)
    row = clip[:, 0, 16].mean(0)
    assert row[:8].min() > 0.8 and row[-8:].max() < -0.8  # the white half is on the left, colours intact


def test_ffmpegs_messages_are_named_with_the_file_not_printed_bare(tmp_path, capfd, caplog):
    """A damaged H.264 stream decodes with FFmpeg concealing the damage and printing "[h264 @ 0x...] error while
    decoding MB ..." lines that name no file. While ptrain decodes for training those lines are captured: a video
    that decodes is named in one warning per file with FFmpeg's first message; one that fails raises an error
    naming the file with it; other output written to stderr meanwhile is written back."""
    import logging
    import os

    from ptrain.data.video import decoder_messages

    good = tmp_path / "good.mp4"
    frames = (np.random.default_rng(0).random((12, 32, 48, 3)) * 255).astype(np.uint8)
    write_video(good, frames, fps=8)
    data = good.read_bytes()
    caplog.set_level(logging.WARNING, logger="ptrain")
    warned, failed = [], []
    for n in range(12):  # flipped bytes at several places in the frame data: concealed, or fatal to decoding
        bad = bytearray(data)
        at = len(data) // 3 + n * 397
        bad[at : at + 6] = bytes(b ^ 0x55 for b in bad[at : at + 6])
        path = tmp_path / f"damaged{n}.mp4"
        path.write_bytes(bytes(bad))
        source = probe(path)  # (the scan's probe is outside the capture: it runs in threads)
        capfd.readouterr()
        caplog.clear()
        try:
            clip = load_clip(path, 8, 32, 48, source=source)
            assert clip.shape == (3, 8, 32, 48)
            if any(str(path) in r.getMessage() for r in caplog.records):
                warned.append(path)
                load_clip(path, 8, 32, 48, source=source)  # once per file and process
                msgs = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
                assert len(msgs) == 1 and "FFmpeg reported" in msgs[0] and "re-encode" in msgs[0], msgs
        except ValueError as e:
            failed.append(path)
            assert str(path) in str(e) and "FFmpeg: " in str(e)
        err = capfd.readouterr().err
        assert "@ 0x" not in err and ".cc:" not in err, err  # no bare decoder lines
    assert warned, "no corruption was concealed with messages: the test no longer exercises the capture"
    load_clip(good, 8, 32, 48)
    assert not [r for r in caplog.records if str(good) in r.getMessage()]
    with decoder_messages() as said:
        os.write(2, b"another thread's line\n")
    assert said.lines == [] and "another thread's line" in capfd.readouterr().err


def test_unusable_videos_are_skipped_and_counted(tiny_data, tmp_path):
    records = load_records(DataArgs(data_root=tiny_data))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    short = tmp_path / "short.mp4"
    write_video(short, np.zeros((4, 32, 32, 3), dtype=np.uint8), fps=8)
    from ptrain.data.sources import Record

    extra = [Record("broken", tmp_path / "broken.mp4"), Record("short", short), Record("gone", tmp_path / "x.mp4")]
    usable = filter_usable(records + extra, 9)
    assert len(usable.records) == len(records)
    reasons = usable.skipped
    assert set(reasons) == {str(r.video) for r in extra}
    assert "cannot decode" in reasons[str(tmp_path / "broken.mp4")]
    assert "4 frames < --num_frames 9" in reasons[str(short)]
    assert "no such file" in reasons[str(tmp_path / "x.mp4")]


def _step_samples(num_samples, global_batch, dp, accum, steps, seed=3):
    """{step: sorted positions and indices} gathered over every rank of a layout."""
    per_rank = global_batch // (dp * accum)
    out = {}
    for r in range(dp):
        it = iter(GlobalBatchSampler(num_samples, per_rank, r, dp, accum, seed))
        for step in range(steps):
            for _ in range(accum):
                out.setdefault(step, []).extend(next(it))
    return {s: sorted(v) for s, v in out.items()}


def test_sampler_is_layout_independent():
    ref = _step_samples(10, 8, dp=1, accum=1, steps=5)
    for dp, accum in ((2, 1), (4, 1), (2, 2), (1, 8), (8, 1)):
        assert _step_samples(10, 8, dp, accum, 5) == ref, (dp, accum)
    # Each epoch is a permutation: 5 steps x 8 = 40 positions over 10 samples -> each index seen 4 times.
    counts = Counter(i for v in ref.values() for i, _ in v)
    assert set(counts.values()) == {4}
    # Different seeds give different orders.
    assert _step_samples(10, 8, 1, 1, 2, seed=4) != _step_samples(10, 8, 1, 1, 2, seed=3)


def test_sampler_state_resumes():
    s = GlobalBatchSampler(7, 2, 1, 2, 1, seed=0)
    it = iter(s)
    [next(it) for _ in range(5)]
    state = s.state_dict()
    expected = [next(it) for _ in range(4)]
    s2 = GlobalBatchSampler(7, 2, 1, 2, 1, seed=0)
    s2.load_state_dict(state)
    assert [b for b, _ in zip(s2, range(4))] == expected


def test_noise_and_timesteps_depend_only_on_seed_and_position():
    fm = FlowMatching(ObjectiveArgs(flow_weighting_scheme="logit_normal"), shift=3.0)
    lat = torch.zeros(3, 4, 2, 2, 2)
    a = fm.prepare(lat, sample_generators(1, [10, 11, 12]))
    b = fm.prepare(lat[:1], sample_generators(1, [11]))
    torch.testing.assert_close(a.noisy[1:2], b.noisy)
    torch.testing.assert_close(a.timesteps[1:2], b.timesteps)
    assert (a.timesteps > 0).all() and (a.timesteps < 1000).all()
    c = fm.prepare(lat[:1], sample_generators(2, [11]))
    assert not torch.equal(b.timesteps, c.timesteps)


def test_v_prediction_recovers_x0_from_the_true_velocity():
    from diffusers import CogVideoXDDIMScheduler

    from ptrain.objectives import VPrediction

    sched = CogVideoXDDIMScheduler(snr_shift_scale=3.0, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    vp = VPrediction(sched)
    x0 = torch.randn(2, 4, 2, 3, 3)
    p = vp.prepare(x0, sample_generators(0, [0, 1]))
    a = sched.alphas_cumprod[p.timesteps].view(-1, 1, 1, 1, 1)
    noise = (p.noisy - a.sqrt() * x0) / (1 - a).sqrt()
    v = a.sqrt() * noise - (1 - a).sqrt() * x0  # the velocity a perfect model predicts
    assert vp.loss(v, p).item() < 1e-8
    assert vp.loss(torch.zeros_like(v), p).item() > 1e-3


def test_dataset_item(tiny_data):
    records = load_records(DataArgs(data_root=tiny_data))
    from ptrain.data.video import FrameSampling

    ds = VideoDataset(records, DataArgs(data_root=tiny_data, height=32, width=48, num_frames=9), FrameSampling(9))
    item = ds[(3, 17)]
    assert item["video"].shape == (3, 9, 32, 48) and item["position"] == 17 and item["caption"] == records[3].caption
    assert isinstance(Path(records[3].video), Path)


def test_dry_run_reports_bad_files_and_exits_0(tiny_ckpt, tiny_data, tmp_path):
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "videos" / "broken.mp4").write_text("not a video")
    with open(data / "prompts.txt", "a") as f:
        f.write("broken\nmissing\n")
    with open(data / "videos.txt", "a") as f:
        f.write("videos/broken.mp4\nvideos/nope.mp4\n")
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "-m", "ptrain", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(data),
         "--num_frames", "9", "--height", "32", "--width", "32", "--output_dir", str(out), "--dry_run"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert "samples: 8 usable (8 videos, 0 images), 2 skipped" in p.stdout
    assert "broken.mp4: cannot decode" in p.stdout
    assert "nope.mp4: no such file" in p.stdout
    assert not out.exists()  # a dry run writes nothing


def test_frame_window_stride_and_skips():
    from ptrain.data.video import FrameSampling

    assert FrameSampling(5, skip_start=2, skip_end=3).indices(20) == [2, 6, 9, 12, 16]  # even over [2, 17)
    assert FrameSampling(4, stride=3, skip_start=1).indices(20) == [1, 4, 7, 10]
    assert FrameSampling(4, stride=3).available(10) == 4 and FrameSampling(5, stride=3).available(10) == 4
    with pytest.raises(ValueError, match="4 usable frames, fewer than --num_frames 5"):
        FrameSampling(5, stride=3).indices(10)
    assert FrameSampling(3, fps=8, skip_start=4).indices(40, source_fps=24) == [4, 7, 10]


def test_captions_crops_and_dropout_are_seeded_per_sample(tiny_data):
    from ptrain.data.video import FrameSampling

    records = load_records(DataArgs(data_root=tiny_data))
    args = DataArgs(data_root=tiny_data, height=32, width=32, num_frames=9, id_token="TOK",
                    caption_dropout_p=0.5, reshape_mode="random_crop")  # fmt: skip
    ds = VideoDataset(records, args, FrameSampling(9), seed=5)
    items = [ds[(i % 8, i)] for i in range(24)]
    again = [ds[(i % 8, i)] for i in range(24)]
    assert [a["caption"] for a in items] == [b["caption"] for b in again]
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(items, again))
    kept = [a["caption"] for a in items if a["caption"]]
    assert 0 < len(kept) < 24 and all(c.startswith("TOK ") for c in kept)
    # random_crop picks different windows for different positions of the same video
    assert any(not torch.equal(items[0]["video"], items[k]["video"]) for k in (8, 16))


# --- decoding at the covering size (the decoder scales) ------------------------------------------------------


def _full_size_reference(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    """The previous decode path, written out: full-size frames -> float -> antialiased bilinear to the covering
    size -> centre crop; (C, F, H, W) in [-1, 1]."""
    import decord
    import torch.nn.functional as F

    from ptrain.data.video import FrameSampling, cover_size

    vr = decord.VideoReader(str(path))
    x = torch.from_numpy(vr.get_batch(FrameSampling(frames).indices(len(vr))).asnumpy()).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1.0
    nh, nw = cover_size(*x.shape[-2:], height, width)
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True).clamp(-1, 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[:, :, top : top + height, left : left + width].permute(1, 0, 2, 3)


#: Reduced-size decode vs _full_size_reference, in [-1, 1] units (1 level of 255 = 0.0078). Measured (2026-11-27,
#: decord 0.6) on the textured 1280x720 clip, seeds 0-3, at 64x96 / 128x160 / 256x256: mean 0.0085-0.0167, 99th
#: percentile 0.028-0.123, max 0.23-0.51; on the smooth 320x240 clip mean 0.006-0.012, max 0.018-0.37. The
#: decoder's scaler (ffmpeg swscale, bicubic, scaling the 4:2:0 chroma planes before converting) differs from
#: torch's antialiased bilinear on full-size RGB mostly at sharp colour edges (single pixels: the max).
REDUCED_MEAN, REDUCED_P99, REDUCED_MAX = 0.025, 0.2, 0.75


@pytest.mark.parametrize("kind", ["synthetic", "textured"])
def test_reduced_size_decode_is_frame_exact_within_tolerance(tmp_path, kind):
    """A video larger than the training size is decoded at its covering size: the same frames (each closer to its
    own full-size frame than to any other of the clip), within the stated tolerance of full-size decode + resize;
    without the scan's size (no `source`) frames are decoded at full size and resized as uint8, within 1 level."""
    import dataclasses

    from ptrain.data.video import decode_size
    from ptrain.testing.tiny import render_frames, synthetic_video_specs, write_textured_video

    path = tmp_path / f"{kind}.mp4"
    if kind == "textured":  # camera-like detail at 1280x720 (a real-world-ish clip)
        write_textured_video(path, 1280, 720, 9, seed=1)
    else:  # the fixture's smooth scene (gradient + a moving shape) at 320x240
        spec = dataclasses.replace(synthetic_video_specs(1, 3, [(320, 240)])[0], num_frames=24)
        write_video(path, render_frames(spec), fps=24)
    info = probe(path)
    for height, width in ((64, 96), (128, 160)):
        assert decode_size(info.height, info.width, height, width) is not None
        ref = _full_size_reference(path, 9, height, width)
        reduced = load_clip(path, 9, height, width, source=info)
        assert reduced.shape == ref.shape == (3, 9, height, width)
        d = (reduced - ref).abs()
        assert d.mean() < REDUCED_MEAN and d.flatten().quantile(0.99) < REDUCED_P99 and d.max() < REDUCED_MAX, (
            kind, height, width, float(d.mean()), float(d.flatten().quantile(0.99)), float(d.max()))  # fmt: skip
        per_frame = torch.stack([(reduced[:, i, None] - ref).abs().mean(dim=(0, 2, 3)) for i in range(9)])
        assert torch.equal(per_frame.argmin(dim=1), torch.arange(9)), per_frame
        assert torch.all(per_frame.diagonal() * 2 < per_frame.masked_fill(torch.eye(9, dtype=torch.bool), 9).amin(1))
        full = load_clip(path, 9, height, width)  # decoded at full size, resized as uint8
        assert (full - ref).abs().max() <= 1.5 / 127.5


def test_decode_size_covers_the_crop_and_avoids_decord_widths():
    from ptrain.data.video import DECORD_BAD_WIDTHS, cover_size, decode_size

    assert decode_size(720, 1280, 64, 96) == cover_size(720, 1280, 64, 96) == (64, 114)
    assert decode_size(144, 176, 480, 720) is None  # an upscale: decode at the source size
    assert decode_size(480, 854, 480, 720) is None  # same height: nothing to reduce
    assert decode_size(720, 1280, 30, 40, "resize") == (30, 40)
    assert cover_size(72, 96, 36, 48) == (36, 48) and decode_size(72, 96, 36, 48) == (36, 50)  # 48: next good width
    for w in (96, 160, 128, 200):  # 4:3 sources whose covering width would be 48 or 72 (decord cannot output them)
        h = w * 3 // 4
        for target in (48, 72):
            size = decode_size(h, w, target * 3 // 4, target)
            if size is not None:
                assert size[1] not in DECORD_BAD_WIDTHS and size[1] >= target and size[0] >= target * 3 // 4


@pytest.mark.parametrize("width", [48, 72])
def test_narrow_widths_with_the_scanned_size_decode_without_a_probe_frame(tmp_path, width):
    """The dataset passes the scan's size: a video at a width decord misreads is reopened at a safe width directly."""
    frames = np.zeros((10, 32, width, 3), dtype=np.uint8)
    frames[:, :, : width // 2] = 255
    path = tmp_path / f"w{width}.mp4"
    write_video(path, frames, fps=8)
    clip = load_clip(path, 5, height=32, width=32, source=probe(path))
    row = clip[:, 0, 16].mean(0)
    assert clip.shape == (3, 5, 32, 32) and row[:8].min() > 0.8 and row[-8:].max() < -0.8


def test_loader_pixels_travel_as_uint8_and_convert_to_the_float_sample(tiny_data, tmp_path):
    """The training loader's dataset sends uint8 pixels (video and first frame); converted (to_unit_range, done on
    the device by the step) they equal the float sample exactly."""
    import dataclasses

    from PIL import Image

    from ptrain.data.video import FrameSampling, to_unit_range

    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(tmp_path / "first.png")
    records = load_records(DataArgs(data_root=tiny_data))
    records[2] = dataclasses.replace(records[2], first_frame=tmp_path / "first.png")
    args = DataArgs(data_root=tiny_data, height=32, width=48, num_frames=9)
    floats, uint8 = (VideoDataset(records, args, FrameSampling(9), as_uint8=u) for u in (False, True))
    for key in ((2, 5), (4, 6)):
        a, b = floats[key], uint8[key]
        assert b["video"].dtype == b["first_frame"].dtype == torch.uint8 and a["video"].dtype == torch.float32
        assert torch.equal(to_unit_range(b["video"]), a["video"]) and torch.equal(to_unit_range(b["first_frame"]),
                                                                                  a["first_frame"])  # fmt: skip


def test_a_resume_is_told_when_its_data_or_buckets_changed(caplog):
    """The sample order follows the usable samples and their bucket shapes. A checkpoint records their
    fingerprints; a resume with the same number of samples but other files / captions, or other bucket shapes
    (which a bucketed run resumed across another --height or a change of bucket rules gets), said nothing and
    trained other batches than an uninterrupted run. A moved data folder (same names) keeps them."""
    from types import SimpleNamespace

    from ptrain.data import Usable
    from ptrain.data.buckets import Bucket
    from ptrain.data.sources import Record
    from ptrain.trainer import Trainer

    def usable(root, captions, shapes):
        recs = [Record(c, Path(root) / f"{k}.mp4") for k, c in enumerate(captions)]
        return Usable(recs, {}, [Bucket.parse(s) for s in shapes])

    before = usable("/a", ["cat", "dog"], ["9x32x32", "9x32x48"])
    marker = {"num_samples": 2, "data": before.fingerprints()}
    trainer = SimpleNamespace(run=SimpleNamespace(resume="out/checkpoints/step-4"))

    def warned(now) -> str:
        caplog.clear()
        Trainer.warn_data_changed(trainer, marker, now)
        return " ".join(r.getMessage() for r in caplog.records)

    assert warned(usable("/moved/elsewhere", ["cat", "dog"], ["9x32x32", "9x32x48"])) == ""
    assert "2 usable samples then, 3 now" in warned(usable("/a", ["cat", "dog", "owl"], ["9x32x32"] * 3))
    msg = warned(usable("/a", ["cat", "cow"], ["9x32x32", "9x32x48"]))
    assert "other files or captions" in msg and "since out/checkpoints/step-4" in msg
    assert "differ from an uninterrupted run" in msg
    assert "bucket shapes changed" in warned(usable("/a", ["cat", "dog"], ["9x32x48", "9x32x32"]))
    assert warned(usable("/a", ["cat", "dog"], ["9x32x48", "9x32x32"])).count("changed") == 1
    assert Trainer.warn_data_changed(trainer, {"num_samples": 2}, before) is None  # older checkpoints: no data key
