"""Dataset formats -> a list of (caption, video path) records.

Supported here: the CogVideoX folder layout (`prompts.txt` + `videos.txt`, one
line per sample, paths relative to the folder) and a CSV / JSON / JSONL file
with caption and video-path columns. Paths in a file are relative to
--data_root when given, else to the file's folder.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from ptrain.config import ConfigError, DataArgs

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json")


@dataclass(frozen=True)
class Record:
    caption: str
    video: Path


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _cogvideox_folder(root: Path, prompts_name: str = "prompts.txt", videos_name: str = "videos.txt") -> list[Record]:
    prompts, videos = root / prompts_name, root / videos_name
    captions, paths = _read_lines(prompts), _read_lines(videos)
    if len(captions) != len(paths):
        raise ConfigError(
            f"--data_root {root}: {prompts.name} has {len(captions)} lines but {videos.name} has {len(paths)}; "
            "they must pair up line by line"
        )
    return [Record(c, root / p) for c, p in zip(captions, paths) if p]


def read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):  # {"data": [...]} style
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise ConfigError(f"dataset file {path}: expected a JSON list of objects")
            return data
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"dataset file {path}: cannot parse: {e}") from e
    raise ConfigError(f"dataset file {path}: unsupported extension {suffix!r} (use .csv, .json or .jsonl)")


def _table(path: Path, root: Path, caption_column: str, video_column: str) -> list[Record]:
    rows = read_table(path)
    if not rows:
        raise ConfigError(f"dataset file {path}: no rows")
    columns = set(rows[0])
    for flag, col in (("--caption_column", caption_column), ("--video_column", video_column)):
        if col not in columns:
            raise ConfigError(f"dataset file {path}: no column {col!r} ({flag}); columns are {sorted(columns)}")
    records = []
    for row in rows:
        video = str(row.get(video_column) or "").strip()
        if video:
            records.append(Record(str(row.get(caption_column) or "").strip(), root / video))
    return records


def load_records(args: DataArgs) -> list[Record]:
    if args.dataset_file is not None:
        path = Path(args.dataset_file)
        root = Path(args.data_root) if args.data_root is not None else path.parent
        records = _table(path, root, args.caption_column, args.video_column)
    else:
        root = Path(args.data_root)
        if (root / args.caption_column).is_file() and (root / args.video_column).is_file():
            # the CogVideoX scripts' --caption_column prompts.txt --video_column videos.txt
            records = _cogvideox_folder(root, args.caption_column, args.video_column)
        elif (root / "prompts.txt").is_file() and (root / "videos.txt").is_file():
            records = _cogvideox_folder(root)
        else:
            meta = next((root / n for n in METADATA_NAMES if (root / n).is_file()), None)
            if meta is None:
                raise ConfigError(
                    f"--data_root {root}: found neither prompts.txt + videos.txt nor one of {list(METADATA_NAMES)}; "
                    "or pass --dataset_file"
                )
            records = _table(meta, root, args.caption_column, args.video_column)
    if not records:
        raise ConfigError(f"no samples found under --data_root {args.data_root} / --dataset_file {args.dataset_file}")
    return records
