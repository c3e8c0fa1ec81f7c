"""The data scan's cache (ptrain/data/scan_cache.py): a second scan reads unchanged files from it and probes changed
ones, failures from a file's content are kept and those from reading it are not, a stale or damaged cache is
ignored, and probing on threads gives the serial scan's result. Real videos and images throughout."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ptrain.data import filter_usable
from ptrain.data.scan_cache import PROBE_VERSION, ScanCache
from ptrain.data.sources import Record
from ptrain.testing.tiny import render_frames, synthetic_video_specs, write_video


def _video(path: Path, w: int, h: int, seed: int = 0) -> Path:
    spec = dataclasses.replace(synthetic_video_specs(1, seed, [(w, h)])[0], num_frames=12, fps=12)
    write_video(path, render_frames(spec), 12)
    return path


def _folder(root: Path) -> list[Record]:
    root.mkdir(parents=True, exist_ok=True)
    _video(root / "a.mp4", 64, 32)
    _video(root / "b.mp4", 32, 32, seed=1)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "c.png")
    (root / "cut.mp4").write_bytes((root / "a.mp4").read_bytes()[:300])  # truncated: cannot decode
    recs = [Record("a", root / "a.mp4"), Record("b", root / "b.mp4"), Record("c", root / "c.png", "image"),
            Record("cut", root / "cut.mp4"), Record("gone", root / "missing.mp4")]  # fmt: skip
    return recs


def _same(u, v) -> bool:
    return u.infos == v.infos and u.skipped == v.skipped and u.buckets == v.buckets and u.records == v.records


def test_second_scan_reads_unchanged_files_from_the_cache(tmp_path):
    recs = _folder(tmp_path / "data")
    path = tmp_path / "out" / "scan_cache.json"
    first = filter_usable(recs, 5, cache=ScanCache(path))
    names = ("c.png", "cut.mp4", "missing.mp4")  # an image is 1 frame: no bucket without --enable_bucket
    assert path.is_file() and sorted(first.skipped) == [str(tmp_path / "data" / n) for n in names]
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 4  # the missing file (a read failure) is not kept; the truncated one (content) is
    cache = ScanCache(path)
    second = filter_usable(recs, 5, cache=cache)
    assert cache.hits == 4 and _same(first, second)

    # a changed file is probed again: b.mp4 is now 48x32, the truncated file was repaired
    _video(tmp_path / "data" / "b.mp4", 48, 32, seed=2)
    (tmp_path / "data" / "cut.mp4").write_bytes((tmp_path / "data" / "a.mp4").read_bytes())
    cache = ScanCache(path)
    third = filter_usable(recs, 5, cache=cache)
    assert cache.hits == 2
    assert [(i.height, i.width) for i in third.infos] == [(32, 64), (32, 48), (32, 64)]
    assert sorted(third.skipped) == [str(tmp_path / "data" / n) for n in ("c.png", "missing.mp4")]


def test_a_stale_or_damaged_cache_is_ignored_and_a_read_only_one_not_written(tmp_path, caplog):
    recs = _folder(tmp_path / "data")
    path = tmp_path / "scan_cache.json"
    reference = filter_usable(recs, 5)
    path.write_text('{"version": ')  # cut short
    with caplog.at_level(logging.WARNING):
        cache = ScanCache(path)
    assert "is unreadable (JSONDecodeError" in caplog.text and cache.entries == {}
    assert _same(filter_usable(recs, 5, cache=cache), reference)
    data = json.loads(path.read_text())
    data["version"] = PROBE_VERSION - 1  # written by other probe rules
    path.write_text(json.dumps(data))
    cache = ScanCache(path)
    assert cache.entries == {}
    assert _same(filter_usable(recs, 5, cache=cache), reference) and cache.hits == 0
    path.unlink()
    filter_usable(recs, 5, cache=ScanCache(path, write=False))  # --dry_run: reads, never writes
    assert not path.exists()


def test_probing_on_threads_gives_the_serial_result(tmp_path, monkeypatch):
    import ptrain.data as data

    recs = _folder(tmp_path / "data")
    assert data.probe_threads() == min(8, os.cpu_count() or 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 * (os.cpu_count() or 1)))
    assert data.probe_threads() == 1  # many ranks on the host: one thread each
    serial = filter_usable(recs, 5)
    monkeypatch.setattr(data, "probe_threads", lambda: 4)
    assert _same(filter_usable(recs, 5), serial)
