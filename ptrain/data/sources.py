"""Dataset formats -> a list of (caption, media path, kind) records.

Formats, detected under --data_root in this order, or given by --dataset_file:

- line files: `prompts.txt` + `videos.txt` (one line per sample, paths relative to the folder; finetrainers'
  `prompt.txt` / `caption.txt` / `captions.txt` and `video.txt` are found too); the CogVideoX scripts'
  `--caption_column prompts.txt --video_column videos.txt` name those files, and `--image_column images.txt`
  (CogVideo's I2V) a line file of first-frame images;
- a metadata table in the folder: `metadata.{csv,jsonl,json,parquet}`;
- caption-file pairs: `clip.mp4` + `clip.txt` (or `photo.jpg` + `photo.txt`), searched recursively;
- a table (--dataset_file): CSV / JSON / JSONL / parquet with a caption column and a video and/or image path
  column. VideoX-Fun's metadata (`file_path`, `text`, `type` = video|image) is read as it is. Paths are relative
  to --data_root when given, else to the table's folder.

Several datasets at once: --dataset_config FILE (JSON or TOML) with a `datasets` list whose entries take
data_root / dataset_file / caption_column / video_column / image_column and `repeats` (a number; 1.5 = every
sample once, a fixed seeded half of them twice).

A record that is known bad before any decoding (a caption that is not UTF-8 or not a string, a media file
without a caption file, a table row or list line without a path) carries an `error` and is reported and skipped
by the scan like an undecodable video. A --caption_column / --video_column / --image_column that the layout
does not use (a line file that is not there, a column name for a folder without a table) is an error: it would
otherwise be ignored and other captions trained.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptrain.config import ConfigError, DataArgs

log = logging.getLogger("ptrain")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.json", "metadata.parquet")
#: Files taken as videos. Camcorder, phone, DVD and broadcast containers are included: those decord cannot read
#: (MPEG-TS with H.264 such as AVCHD .mts, animated GIF, Ogg) are then skipped with their reason and the ffmpeg
#: command that converts them (ptrain.data.video.CONVERT_HINTS), not ignored.
VIDEO_EXTS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
                        ".mts", ".m2ts", ".3gp", ".3g2", ".vob", ".mxf", ".dv", ".ogv", ".gif"})  # fmt: skip
IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
_TO_IMAGE = "convert it to .jpg or .png (e.g. with an image editor, or ImageMagick: magick {x} out.png)"
_TO_VIDEO = "convert it to .mp4: ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4"
#: Media types ptrain does not read: a caption beside one is a counted skip that says what to do (any other file
#: beside a caption, e.g. README.md + README.txt, is not taken for a sample).
UNREAD_MEDIA = {
    **{x: _TO_IMAGE.format(x=f"IN{x}") for x in (".heic", ".heif", ".avif", ".jxl", ".dng", ".cr2", ".cr3", ".nef",
                                                 ".arw", ".raf", ".orf", ".rw2", ".psd", ".svg", ".ico", ".jp2")},
    **dict.fromkeys((".m2v", ".h264", ".264", ".h265", ".265", ".hevc", ".ivf", ".y4m", ".rm", ".rmvb", ".asf",
                     ".f4v", ".mjpeg", ".mjpg", ".divx", ".xvid", ".mod", ".tod", ".vro", ".bik"), _TO_VIDEO),
}  # fmt: skip
#: Column names tried, in order, when --caption_column / --video_column / --image_column are not given.
CAPTION_COLUMNS = ("caption", "text", "prompt", "captions", "description")
#: (`file_name`: Hugging Face videofolder / imagefolder metadata, as finetrainers reads it; an image path in a
#: video column trains as an image, by its extension.)
VIDEO_COLUMNS = ("video", "file_path", "video_path", "path", "file", "filename", "file_name")
IMAGE_COLUMNS = ("image", "image_path", "img")
#: Line files of the list layout, as finetrainers looks for them (the CogVideoX scripts name theirs by flag).
LIST_CAPTIONS = ("prompts.txt", "prompt.txt", "captions.txt", "caption.txt")
LIST_VIDEOS = ("videos.txt", "video.txt")


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
    #: Why that image is unusable (an empty cell, a missing file): a skip in i2v / inpaint only, since a
    #: --train_mode normal run ignores the column (`scan_dataset(first_frames=False)`).
    first_frame_error: str | None = None

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


def read_lines(path: Path) -> list[str]:
    """A line file's lines, stripped, trailing blank ones dropped. Lines end at "\n" (and "\r\n") only, as editors
    and `wc -l` count them: str.splitlines also splits at U+2028, U+0085 and other breaks a caption may hold, and
    the caption and video files then no longer paired up."""
    lines = [line.rstrip("\r") for line in read_text(path).split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _record(caption: str, path: Path, kind: str | None = None, error: str | None = None) -> Record:
    kind = kind or media_kind(path) or "video"
    if error is None and _bad_utf8(caption):
        error = _utf8_error(caption)
    return Record(caption, path, kind, error)


def _cogvideox_folder(root: Path, prompts_name: str = "prompts.txt", videos_name: str = "videos.txt",
                      images_name: str | None = None) -> list[Record]:  # fmt: skip
    """Line files: caption i, video i (and first-frame image i, CogVideo's I2V `images.txt`) on line i. A blank
    video line is a counted skip naming the line, not a dropped caption."""
    files = [root / prompts_name, root / videos_name] + ([root / images_name] if images_name else [])
    columns = [read_lines(f) for f in files]
    if len({len(c) for c in columns}) != 1:
        counts = " but ".join(f"{f.name} has {len(c)} lines" for f, c in zip(files, columns))
        raise ConfigError(f"--data_root {root}: {counts}; they must pair up line by line")
    records = []
    for n, (caption, path, *image) in enumerate(zip(*columns), start=1):
        if not path:
            records.append(_record(caption, root / f"{videos_name} line {n}", error="empty line: no video path"))
            continue
        rec = _record(caption, root / path)
        if image:
            rec = _with_first_frame(rec, root, image[0], f"{images_name} line {n}")
        records.append(rec)
    return records


def _with_first_frame(rec: Record, root: Path, image: str, where: str) -> Record:
    """`rec` with its first-frame image (i2v / inpaint conditioning), or an error if there is none."""
    if not image:
        return dataclasses.replace(rec, first_frame_error=f"{where}: empty (no first-frame image)")
    first = root / image
    missing = None if first.is_file() else f"first-frame image {first} not found"
    return dataclasses.replace(rec, first_frame=first, first_frame_error=missing)


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
    for n, row in enumerate(rows, start=1):
        caption = row.get(cap)
        error = None
        if isinstance(caption, (list, tuple, dict)):  # str() would train "['a cat', 'a kitten']" as the caption
            what = f"a list of {len(caption)}" if not isinstance(caption, dict) else "an object"
            error = f"caption is {what}, not text; give one caption per row (a row for each trains them all)"
        caption = "" if caption is None or (isinstance(caption, float) and math.isnan(caption)) else str(caption)
        video = str(row.get(vid) or "").strip() if vid else ""
        image = str(row.get(img) or "").strip() if img else ""
        declared = str(row.get("type") or "").strip().lower()  # VideoX-Fun: video | image
        if video:
            kind = declared if declared in ("video", "image") else None
            rec = _record(caption.strip(), root / video, kind, error)
            if image:  # an image beside the video: its first frame for i2v / inpaint
                rec = _with_first_frame(rec, root, image, f"row {n}")
            records.append(rec)
        elif image:
            records.append(_record(caption.strip(), root / image, "image", error))
        else:  # counted and named, not dropped
            names = " / ".join(c for c in (vid, img) if c)
            why = f"no media path ({names} empty or missing)"
            records.append(_record(caption.strip(), Path(f"{path} row {n}"), error=why))
    return records


def _contains(folder: str, top: str) -> bool:
    """Whether real path `folder` is a folder above real path `top` (a link to "/" included)."""
    return folder != top and os.path.commonpath([folder, top]) == folder


def _walk_files(root: Path) -> tuple[list[Path], int]:
    """Every file under root, following symlinked folders (a dataset assembled from links; Path.rglob does not
    follow them before Python 3.13) but entering each real folder once (a link loop); names starting with "." are
    left out (macOS' ._* AppleDouble files, .DS_Store, .ipynb_checkpoints). (files, hidden names left out)"""
    files, hidden, seen = [], 0, set()
    top = os.path.realpath(root)
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        hidden += sum(d.startswith(".") for d in dirs) + sum(n.startswith(".") for n in names)
        up = [d for d in dirs if _contains(os.path.realpath(os.path.join(folder, d)), top)]
        if up:  # a link to a folder above root would take in everything beside root
            log.warning("%s: not following %s: it links to a folder that contains --data_root", folder,
                        ", ".join(up))  # fmt: skip
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in up)
        files += [Path(folder) / n for n in names if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))]
    return sorted(files), hidden


def _caption_pairs(root: Path, extension: str = ".txt") -> list[Record]:
    """`clip.mp4` + `clip.txt` (or --caption_extension; either case: CLIP.MP4 + CLIP.TXT) pairs anywhere under
    root, symlinked folders included; media without a caption file are reported. A caption beside a file of a
    type ptrain does not read (an iPhone .heic, an .m2v stream) is a counted skip naming the type; a caption file
    with nothing beside it is counted in one warning. A video and an image of one name (a clip and its thumbnail)
    share the caption file and both train: said once, with the count."""
    files, hidden = _walk_files(root)
    if hidden:
        log.info("%s: %d hidden files and folders (names starting with '.') left out", root, hidden)
    by_name = {str(f.with_name(f.name.lower())): f for f in files}  # case-insensitive lookup, folder by folder
    records, shared, paired = [], {}, set()
    present = set(files)
    media_files = [f for f in files if media_kind(f)]
    exact = {m.with_suffix(extension) for m in media_files} & present  # captions of a media file of their own name
    for media in media_files:
        txt = media.with_suffix(extension)  # the exact name first: clip.mp4 + clip.txt beside Clip.mp4 + Clip.txt
        if txt not in present:  # then either case, unless that caption is another file's by its exact name
            txt = by_name.get(str(media.with_name(media.stem.lower() + extension.lower())))
            if txt in exact:
                records.append(_record("", media, error=f"no caption file {media.stem}{extension} beside it "
                                       f"({txt.name} captions the file of its exact name)"))  # fmt: skip
                continue
        if txt is None:
            records.append(_record("", media, error=f"no caption file {media.stem}{extension} beside it"))
            continue
        paired.add(txt)
        shared.setdefault(txt, []).append(media)
        caption = read_text(txt).strip()
        error = f"{txt.name}: {_utf8_error(caption)}" if _bad_utf8(caption) else None
        records.append(_record(caption, media, error=error))
    captions = [f for f in files if f.suffix.lower() == extension.lower() and f not in paired]
    stems: dict[str, list[Path]] = {}
    for f in files:
        if f.suffix.lower() != extension.lower() and not media_kind(f):
            stems.setdefault(str(f.with_name(f.stem.lower())), []).append(f)
    alone = []
    for txt in captions:
        others = [o for o in stems.get(str(txt.with_name(txt.stem.lower())), []) if o.suffix.lower() in UNREAD_MEDIA]
        if not others:  # (a README.txt beside README.md is not a sample)
            alone.append(txt)
            continue
        kind = others[0].suffix.lower()
        records.append(_record("", others[0], error=f"captioned by {txt.name}, but {kind} is not a type ptrain "
                               f"reads; {UNREAD_MEDIA[kind]}"))  # fmt: skip
    if alone:
        log.warning("%d caption files under %s have no video or image beside them and are not used (e.g. %s)",
                    len(alone), root, ", ".join(str(p.relative_to(root)) for p in alone[:3]))  # fmt: skip
    several = [group for group in shared.values() if len(group) > 1]
    if several:
        log.warning("%d caption files under %s each caption several media files of one name (e.g. %s): each of "
                    "them trains as a sample with that caption; move thumbnails or stills out of the folder if "
                    "they are not training data", len(several), root, ", ".join(f.name for f in several[0]))  # fmt: skip
    return records


def _column_flags(args: DataArgs) -> tuple[tuple[str, str | None], ...]:
    return (("--caption_column", args.caption_column), ("--video_column", args.video_column),
            ("--image_column", args.image_column))  # fmt: skip


def _unused_columns(args: DataArgs, layout: str, used: tuple[str | None, ...] = ()) -> None:
    """A --caption_column / --video_column / --image_column the folder's layout does not read: an error, not an
    ignored flag (a mistyped caption file name had trained prompts.txt's captions without a word)."""
    for flag, value in _column_flags(args):
        if value and value not in used:
            raise ConfigError(f"{flag} {value}: --data_root {args.data_root} is read as {layout}, which has no such "
                              "column or file; remove the flag, or name a line file there (e.g. --caption_column "
                              "prompts.txt --video_column videos.txt)")  # fmt: skip


def _list_files(root: Path, args: DataArgs) -> tuple[str, str] | None:
    """The (captions, videos) line files of the list layout: named by --caption_column / --video_column, else the
    one pair of finetrainers' names present; None if none."""
    named = []
    for flag, value in _column_flags(args):
        if value and Path(value).suffix.lower() == ".txt" and not (root / value).is_file():
            have = sorted(p.name for p in root.glob("*.txt"))[:8]
            raise ConfigError(f"{flag} {value}: no such file in --data_root {root} (its .txt files: "
                              f"{', '.join(have) or 'none'})")  # fmt: skip
        named.append(value if value and (root / value).is_file() else None)
    caps = [named[0]] if named[0] else [n for n in LIST_CAPTIONS if (root / n).is_file()]
    vids = [named[1]] if named[1] else [n for n in LIST_VIDEOS if (root / n).is_file()]
    if not caps or not vids:
        return None
    if len(caps) > 1 or len(vids) > 1:
        raise ConfigError(f"--data_root {root}: several caption / video line files ({', '.join(caps + vids)}); "
                          "name the pair to train with --caption_column and --video_column")  # fmt: skip
    return caps[0], vids[0]


def _load_one(args: DataArgs) -> list[Record]:
    if args.dataset_file is not None:
        path = Path(args.dataset_file)
        root = Path(args.data_root) if args.data_root is not None else path.parent
        return _table(path, root, args)
    root = Path(args.data_root)
    if root.is_file():
        hint = ""
        if root.suffix.lower() in (".csv", ".json", ".jsonl", ".parquet"):
            hint = (f"; give a table with --dataset_file {root} (or --data_root its folder, where it is named "
                    f"{' / '.join(METADATA_NAMES)})")  # fmt: skip
        raise ConfigError(f"--data_root {root}: a file, not a folder{hint}")
    if not root.is_dir():
        raise ConfigError(f"--data_root {root}: no such folder")
    lists = _list_files(root, args)
    if lists is not None:
        cap, vid = lists
        img = args.image_column if args.image_column and (root / args.image_column).is_file() else None
        _unused_columns(args, f"line files ({cap} + {vid}{' + ' + img if img else ''})", (cap, vid, img))
        if (cap, vid) not in ((args.caption_column, args.video_column), ("prompts.txt", "videos.txt")):
            log.info("data: %s read as line files %s + %s", root, cap, vid)
        return _cogvideox_folder(root, cap, vid, img)
    meta = next((root / n for n in METADATA_NAMES if (root / n).is_file()), None)
    if meta is not None:
        return _table(meta, root, args)
    _unused_columns(args, f"caption files ({args.caption_extension} beside each video or image)")
    records = _caption_pairs(root, args.caption_extension)
    if not records:
        raise ConfigError(
            f"--data_root {root}: found neither line files (prompts.txt + videos.txt), one of {list(METADATA_NAMES)}, "
            f"nor video/image files with {args.caption_extension} captions beside them; or pass --dataset_file"
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


DATASET_KEYS = {"data_root", "dataset_file", "caption_column", "video_column", "image_column", "caption_extension",
                "repeats", "weight"}  # fmt: skip


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


#: Other trainers' dataset-config keys (musubi-tuner, diffusion-pipe, finetrainers) -> what ptrain reads instead.
FOREIGN_KEYS = {
    "video_directory": "data_root", "image_directory": "data_root", "path": "data_root",
    "video_jsonl_file": "dataset_file", "image_jsonl_file": "dataset_file", "num_repeats": "repeats",
    "resolution": "--height / --width", "resolutions": "--height / --width", "target_frames": "--num_frames",
    "frame_buckets": "--num_frames / --video_resolution_buckets", "ar_buckets": "--video_resolution_buckets",
    "video_resolution_buckets": "--video_resolution_buckets", "image_resolution_buckets": "--video_resolution_buckets",
    "enable_bucket": "--enable_bucket", "enable_ar_bucket": "--enable_bucket", "batch_size": "--batch_size",
    "id_token": "--id_token", "reshape_mode": "--reshape_mode", "cache_directory": "--precomputation_dir",
    "frame_extraction": "--fps / --video_sample_stride / --random_frame_crop", "frame_stride": "--video_sample_stride",
    "dataset_type": "nothing (the media kind is read from each file's extension)",
    "caption_prefix": "--id_token", "general": "flags on the command line (e.g. --height, --batch_size)",
}  # fmt: skip
_KEYS_TEXT = "data_root, dataset_file, caption_column, video_column, image_column, caption_extension, repeats"


def _foreign(keys: set[str]) -> str:
    """'; ptrain's keys are ...; from another trainer: a -> b, ...' for an unknown-keys error."""
    mapped = [f"{k} -> {FOREIGN_KEYS[k]}" for k in sorted(keys) if k in FOREIGN_KEYS]
    return f"; ptrain's keys are {_KEYS_TEXT}" + (f"; from another trainer: {', '.join(mapped)}" if mapped else "")


def read_dataset_config(path: Path) -> list[dict]:
    """The `datasets` list of a --dataset_config JSON/TOML file, paths resolved against the file's folder and
    `repeats` (or `weight`) a positive number. Keys of other trainers' dataset configs (musubi-tuner's
    [general] / video_directory, diffusion-pipe's [[directory]], finetrainers' dataset_type ...) are errors that
    say what ptrain reads instead, at the top level too (musubi's [general] had been ignored without a word)."""
    raw = _read_config_file(path)
    entries = raw.get("datasets") if isinstance(raw, dict) else raw
    if isinstance(raw, dict) and set(raw) - {"datasets"}:
        extra = set(raw) - {"datasets"}
        if "directory" in extra:  # diffusion-pipe
            raise ConfigError(f"--dataset_config {path}: [[directory]] tables are diffusion-pipe's; write each as a "
                              "[[datasets]] table with data_root = its path (and repeats = its num_repeats); the "
                              "sizes and frame buckets are flags here (--height, --width, --num_frames, "
                              "--enable_bucket)")  # fmt: skip
        raise ConfigError(f"--dataset_config {path}: top-level keys {sorted(extra)} are not read (only `datasets`)"
                          + _foreign(extra))  # fmt: skip
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"--dataset_config {path}: expected a non-empty `datasets` list of tables/objects")
    out = []
    for i, entry in enumerate(entries):
        where = _entry_name(path, i, len(entries))
        unknown = set(entry) - DATASET_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}{_foreign(unknown)}")
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
        ext = e.get("caption_extension")
        if ext is not None and (not isinstance(ext, str) or not ext.startswith(".") or len(ext) < 2):
            raise ConfigError(f"{where}: caption_extension {ext!r}: give it with its dot, e.g. \".txt\"")
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
                caption_extension=entry.get("caption_extension", args.caption_extension),
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
