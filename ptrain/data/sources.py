"""Dataset formats -> a list of (caption, media path, kind) records.

Formats, detected under --data_root in this order, or given by --dataset_file:

- the CogVideoX folder: `prompts.txt` + `videos.txt` (one line per sample, paths relative to the folder);
  the CogVideoX scripts' `--caption_column prompts.txt --video_column videos.txt` name those files;
- a metadata table in the folder: `metadata.{csv,jsonl,json,parquet}`;
- caption-file pairs: `clip.mp4` + `clip.txt` (or `photo.jpg` + `photo.txt`), searched recursively;
- a table (--dataset_file): CSV / JSON / JSONL / parquet with a caption column and a video and/or image path
  column. VideoX-Fun's metadata (`file_path`, `text`, `type` = video|image) is read as it is. Paths are relative
  to --data_root when given, else to the table's folder.

Several datasets at once: --dataset_config FILE (JSON or TOML) with a `datasets` list whose entries take
data_root / dataset_file / caption_column / video_column / image_column and `repeats` (a number; 1.5 = every
sample once, a fixed seeded half of them twice).

A record that is known bad before any decoding (a caption that is not UTF-8, a media file without a caption
file) carries an `error` and is reported and skipped by the scan like an undecodable video.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptrain.config import ConfigError, DataArgs

METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json", "metadata.parquet")
#: Files taken as videos. Camcorder, phone, DVD and broadcast containers are included: those decord cannot read
#: (MPEG-TS with H.264 such as AVCHD .mts, animated GIF, Ogg) are then skipped with their reason and the ffmpeg
#: command that converts them (ptrain.data.video.CONVERT_HINTS), not ignored.
VIDEO_EXTS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
                        ".mts", ".m2ts", ".3gp", ".3g2", ".vob", ".mxf", ".dv", ".ogv", ".gif"})  # fmt: skip
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
#: Column names tried, in order, when --caption_column / --video_column / --image_column are not given.
CAPTION_COLUMNS = ("caption", "text", "prompt", "captions", "description")
VIDEO_COLUMNS = ("video", "file_path", "video_path", "path", "file", "filename")
IMAGE_COLUMNS = ("image", "image_path", "img")


@dataclass(frozen=True)
class Record:
    caption: str
    video: Path  # the media file: a video, or an image when kind == "image" (a 1-frame video)
    kind: str = "video"
    error: str | None = None  # known bad before decoding (reported and skipped by the scan)
    dataset: int = 0  # 0-based index in --dataset_config's `datasets` (0 otherwise); messages say entry i + 1
    #: A row's image beside its video: the first frame --train_mode i2v / inpaint conditions on (default: the
    #: clip's own first frame).
    first_frame: Path | None = None

    @property
    def path(self) -> Path:
        return self.video


def media_kind(path: str | Path) -> str | None:
    ext = Path(path).suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def _bad_utf8(text: str) -> bool:
    """Text read with errors='surrogateescape' holds lone surrogates where the bytes were not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _utf8_error(text: str) -> str:
    i = next(i for i, ch in enumerate(text) if "\udc80" <= ch <= "\udcff")
    return f"caption is not valid UTF-8 (byte 0x{ord(text[i]) - 0xDC00:02x} at character {i}); re-save it as UTF-8"


#: Text files are read as UTF-8 with an optional byte-order mark: Excel's "CSV UTF-8" and Notepad write one, and
#: read as plain UTF-8 it would stay in the first column name or caption ('\ufefffile_path').
ENCODING = "utf-8-sig"


def read_text(path: Path) -> str:
    """A caption / list / table file as text; bytes that are not UTF-8 become lone surrogates (_bad_utf8 finds
    them, so a caption is reported, not garbled)."""
    return path.read_text(encoding=ENCODING, errors="surrogateescape")


def _read_lines(path: Path) -> list[str]:
    lines = read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _record(caption: str, path: Path, kind: str | None = None, error: str | None = None) -> Record:
    kind = kind or media_kind(path) or "video"
    if error is None and _bad_utf8(caption):
        error = _utf8_error(caption)
    return Record(caption, path, kind, error)


def _cogvideox_folder(root: Path, prompts_name: str = "prompts.txt", videos_name: str = "videos.txt") -> list[Record]:
    prompts, videos = root / prompts_name, root / videos_name
    captions, paths = _read_lines(prompts), _read_lines(videos)
    if len(captions) != len(paths):
        raise ConfigError(
            f"--data_root {root}: {prompts.name} has {len(captions)} lines but {videos.name} has {len(paths)}; "
            "they must pair up line by line"
        )
    return [_record(c, root / p) for c, p in zip(captions, paths) if p]


def _read_csv(path: Path) -> list[dict]:
    """CSV rows; a malformed row is reported with its line number."""
    with open(path, newline="", encoding=ENCODING, errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        try:
            return list(reader)
        except csv.Error as e:
            raise ConfigError(f"dataset file {path}: line {reader.line_num}: cannot parse: {e}") from e


def _read_jsonl(path: Path) -> list[dict]:
    """One JSON object per non-blank line; an error names the file's own line (json's message counts from the start
    of the one line it was given, so it would always say line 1). Lines end at "\n" only (JSON Lines), not at the
    other breaks str.splitlines knows: a caption may hold a raw U+2028."""
    rows = []
    for n, line in enumerate(path.read_text(encoding=ENCODING).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"dataset file {path}: line {n}: cannot parse: {e.msg} (column {e.colno})") from e
        if not isinstance(row, dict):
            raise ConfigError(f"dataset file {path}: line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_table(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            data = json.loads(path.read_text(encoding=ENCODING))
            if isinstance(data, dict):  # {"data": [...]} style
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise ConfigError(f"dataset file {path}: expected a JSON list of objects")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"dataset file {path}: cannot parse: {e}") from e
    except OSError as e:  # pyarrow's ArrowInvalid is an OSError / ValueError subclass
        raise ConfigError(f"dataset file {path}: cannot read: {e}") from e
    raise ConfigError(f"dataset file {path}: unsupported extension {suffix!r} (use .csv, .json, .jsonl or .parquet)")


def _pick_column(path: Path, columns: set[str], given: str | None, flag: str, candidates: tuple[str, ...]):
    if given is not None:
        if given not in columns:
            raise ConfigError(f"dataset file {path}: no column {given!r} ({flag}); columns are {sorted(columns)}")
        return given
    return next((c for c in candidates if c in columns), None)


def _table(path: Path, root: Path, args: DataArgs) -> list[Record]:
    rows = read_table(path)
    if not rows:
        raise ConfigError(f"dataset file {path}: no rows")
    columns = set().union(*(r.keys() for r in rows))
    cap = _pick_column(path, columns, args.caption_column, "--caption_column", CAPTION_COLUMNS)
    vid = _pick_column(path, columns, args.video_column, "--video_column", VIDEO_COLUMNS)
    img = _pick_column(path, columns, args.image_column, "--image_column", IMAGE_COLUMNS)
    if cap is None:
        raise ConfigError(
            f"dataset file {path}: no caption column (tried {', '.join(CAPTION_COLUMNS)}); set --caption_column; "
            f"columns are {sorted(columns)}"
        )
    if vid is None and img is None:
        raise ConfigError(
            f"dataset file {path}: no video or image path column (tried {', '.join(VIDEO_COLUMNS + IMAGE_COLUMNS)}); "
            f"set --video_column or --image_column; columns are {sorted(columns)}"
        )
    records = []
    for row in rows:
        caption = row.get(cap)
        caption = "" if caption is None or (isinstance(caption, float) and math.isnan(caption)) else str(caption)
        video = str(row.get(vid) or "").strip() if vid else ""
        image = str(row.get(img) or "").strip() if img else ""
        declared = str(row.get("type") or "").strip().lower()  # VideoX-Fun: video | image
        if video:
            kind = declared if declared in ("video", "image") else None
            rec = _record(caption.strip(), root / video, kind)
            if image:  # an image beside the video: its first frame for i2v / inpaint
                first = root / image
                missing = None if first.is_file() else f"first-frame image {first} not found"
                rec = dataclasses.replace(rec, first_frame=first, error=rec.error or missing)
            records.append(rec)
        elif image:
            records.append(_record(caption.strip(), root / image, "image"))
    return records


def _caption_pairs(root: Path) -> list[Record]:
    """`clip.mp4` + `clip.txt` pairs anywhere under root; media without a caption file are reported."""
    records = []
    for media in sorted(p for p in root.rglob("*") if p.is_file() and media_kind(p)):
        txt = media.with_suffix(".txt")
        if not txt.is_file():
            records.append(_record("", media, error=f"no caption file {txt.name} beside it"))
            continue
        caption = read_text(txt).strip()
        error = f"{txt.name}: {_utf8_error(caption)}" if _bad_utf8(caption) else None
        records.append(_record(caption, media, error=error))
    return records


def _load_one(args: DataArgs) -> list[Record]:
    if args.dataset_file is not None:
        path = Path(args.dataset_file)
        root = Path(args.data_root) if args.data_root is not None else path.parent
        return _table(path, root, args)
    root = Path(args.data_root)
    if not root.is_dir():
        raise ConfigError(f"--data_root {root}: no such folder")
    cap, vid = args.caption_column, args.video_column
    if cap and vid and (root / cap).is_file() and (root / vid).is_file():
        return _cogvideox_folder(root, cap, vid)  # the CogVideoX scripts' --caption_column prompts.txt ...
    if (root / "prompts.txt").is_file() and (root / "videos.txt").is_file():
        return _cogvideox_folder(root)
    meta = next((root / n for n in METADATA_NAMES if (root / n).is_file()), None)
    if meta is not None:
        return _table(meta, root, args)
    records = _caption_pairs(root)
    if not records:
        raise ConfigError(
            f"--data_root {root}: found neither prompts.txt + videos.txt, one of {list(METADATA_NAMES)}, nor "
            "video/image files with .txt captions beside them; or pass --dataset_file"
        )
    return records


def repeat_records(records: list[Record], repeats: float, seed: int) -> list[Record]:
    """Every record floor(repeats) times, plus a fixed seeded subset for the fractional part."""
    if repeats <= 0:
        raise ConfigError(f"repeats must be > 0, got {repeats}")
    whole, frac = int(repeats), repeats - int(repeats)
    out = [r for r in records for _ in range(whole)]
    if frac > 1e-9:
        extra = np.random.default_rng([seed, 0x7E9]).permutation(len(records))[: round(frac * len(records))]
        out += [records[i] for i in sorted(extra)]
    return out


DATASET_KEYS = {"data_root", "dataset_file", "caption_column", "video_column", "image_column", "repeats", "weight"}


def _entry_name(path: Path, i: int, count: int) -> str:
    """How messages name entry `i` (0-based) of a --dataset_config: 1-based, as a person counts the [[datasets]]
    tables / list items, with the 0-based index beside it so neither reading is ambiguous."""
    return f"--dataset_config {path}: datasets entry {i + 1} of {count} (index {i})"


def _read_config_file(path: Path):
    """The parsed TOML / JSON of a --dataset_config (a UTF-8 byte-order mark is allowed in either)."""
    try:
        text = path.read_bytes().decode(ENCODING)
        return tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--dataset_config {path}: cannot parse: {e}") from e


def read_dataset_config(path: Path) -> list[dict]:
    """The `datasets` list of a --dataset_config JSON/TOML file, paths resolved against the file's folder and
    `repeats` (or `weight`) a positive number."""
    raw = _read_config_file(path)
    entries = raw.get("datasets") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"--dataset_config {path}: expected a non-empty `datasets` list of tables/objects")
    out = []
    for i, entry in enumerate(entries):
        where = _entry_name(path, i, len(entries))
        unknown = set(entry) - DATASET_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        if not entry.get("data_root") and not entry.get("dataset_file"):
            raise ConfigError(f"{where}: give data_root or dataset_file")
        e = dict(entry)
        for key in ("data_root", "dataset_file"):
            if e.get(key):
                e[key] = (path.parent / e[key]) if not Path(e[key]).is_absolute() else Path(e[key])
                if (key == "data_root" and not e[key].is_dir()) or (key == "dataset_file" and not e[key].is_file()):
                    raise ConfigError(f"{where}: {key} {e[key]}: not found")
        repeats = e.get("repeats", e.get("weight", 1.0))
        if isinstance(repeats, bool) or not isinstance(repeats, (int, float)) or not repeats > 0:
            raise ConfigError(f"{where}: repeats must be a number > 0, got {repeats!r}")
        e["repeats"] = float(repeats)
        out.append(e)
    return out


def load_records(args: DataArgs) -> list[Record]:
    if args.dataset_config is not None:
        records = []
        entries = read_dataset_config(Path(args.dataset_config))
        for i, entry in enumerate(entries):
            sub = dataclasses.replace(
                args, data_root=entry.get("data_root"), dataset_file=entry.get("dataset_file"),
                caption_column=entry.get("caption_column", args.caption_column),
                video_column=entry.get("video_column", args.video_column),
                image_column=entry.get("image_column", args.image_column),
            )  # fmt: skip
            try:
                part = [dataclasses.replace(r, dataset=i) for r in _load_one(sub)]
            except ConfigError as e:  # name the entry: several may point at similar folders / tables
                raise ConfigError(f"{_entry_name(Path(args.dataset_config), i, len(entries))}: {e}") from e
            records += repeat_records(part, entry["repeats"], seed=i)
    else:
        records = _load_one(args)
    if args.video_repeat > 1:  # VideoX-Fun: videos count N times per epoch, images once
        records = [r for rec in records for r in ([rec] * (args.video_repeat if rec.kind == "video" else 1))]
    if not records:
        raise ConfigError(
            f"no samples found under --data_root {args.data_root} / --dataset_file {args.dataset_file} / "
            f"--dataset_config {args.dataset_config}"
        )
    return records
