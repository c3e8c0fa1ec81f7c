"""The data scan's probe results, kept between runs: a restart, a resume or a second run on the same data reads
them instead of opening every file again (a 720p clip costs ~0.25 s of decoding to probe: an hour per 15,000 clips
on one process).

The cache is one JSON file, by default `output_dir/scan_cache.json`, written by rank 0 after the scan. An entry
holds while its file's size and modification time are unchanged, and only for the probe rules of its
`PROBE_VERSION`: any other file is probed again. Failures are kept only when they come from the file's content (a
ValueError: cannot decode, too small, ...); a file that could not be read at all (OSError: missing, permissions, a
network mount's hiccup) is probed again at the next scan.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from ptrain.data.video import VideoInfo

log = logging.getLogger("ptrain")

#: What a probe reports. Change it whenever probe / probe_image report something new or differently (it makes
#: every cached entry stale). 1: display size, mirroring, non-square pixels, frame times, field order, HDR.
PROBE_VERSION = 1
SCAN_CACHE = "scan_cache.json"


def file_stamp(path: Path) -> list[int] | None:
    """[size, mtime in ns] of a file, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _info_to_json(info: VideoInfo) -> dict:
    d = asdict(info)
    d["decoded"] = list(info.decoded) if info.decoded else None
    d["times"] = list(info.times) if info.times is not None else None
    return d


def _info_from_json(d: dict) -> VideoInfo:
    d = dict(d)
    d["decoded"] = tuple(d["decoded"]) if d.get("decoded") else None
    d["times"] = tuple(d["times"]) if d.get("times") is not None else None
    return VideoInfo(**d)


class ScanCache:
    """Probe results by (kind, path), each with its file's stamp. `path` None: a cache that holds nothing and is
    never written; `write` False: read only (a dry run changes nothing)."""

    def __init__(self, path: Path | None, write: bool = True):
        self.path = Path(path) if path is not None else None
        self.write = write
        self.entries: dict[str, dict] = {}
        self.hits = 0
        if self.path is None or not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") == PROBE_VERSION and isinstance(data.get("entries"), dict):
                self.entries = data["entries"]
            else:
                log.info("scan cache %s is from other probe rules (version %s): probing every file again",
                         self.path, data.get("version"))  # fmt: skip
        except (OSError, ValueError, AttributeError) as e:
            log.warning("scan cache %s is unreadable (%s: %s): probing every file again", self.path,
                        type(e).__name__, e)  # fmt: skip

    @staticmethod
    def key(path: Path, kind: str) -> str:
        return f"{kind}:{os.path.abspath(path)}"

    def get(self, path: Path, kind: str) -> tuple | None:
        """("ok", VideoInfo) or ("bad", reason) if the file is unchanged since it was cached; else None."""
        entry = self.entries.get(self.key(path, kind))
        if entry is None or entry.get("stamp") != file_stamp(path):
            return None
        try:
            result = ("ok", _info_from_json(entry["info"])) if "info" in entry else ("bad", str(entry["reason"]))
        except (KeyError, TypeError, ValueError):
            return None  # an entry of another shape: probe again
        self.hits += 1
        return result

    def save(self, results: dict[str, dict]) -> None:
        """Write `results` (key -> entry, from `entry`) as the cache, atomically (a temporary file renamed over it);
        a failure to write is a warning (the scan's results are in hand)."""
        if self.path is None or not self.write:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".scan_cache-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": PROBE_VERSION, "entries": results}, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("could not write the scan cache %s (%s): the next start probes every file again",
                        self.path, e)  # fmt: skip


def entry(result: tuple, stamp: list[int] | None) -> dict | None:
    """A cache entry for a probe result ("ok", VideoInfo) / ("bad", reason, cacheable), or None if it is not
    kept (no stamp, or a failure to read the file rather than its content)."""
    if stamp is None:
        return None
    if result[0] == "ok":
        return {"stamp": stamp, "info": _info_to_json(result[1])}
    return {"stamp": stamp, "reason": result[1]} if result[2] else None
