"""Data path: sources -> probe/filter -> buckets -> global-batch sampler -> decode -> StatefulDataLoader."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

from ptrain.collective import ALIKE
from ptrain.config import ConfigError, DataArgs
from ptrain.data.buckets import Bucket, BucketPlan, ShapeRules, histogram
from ptrain.data.sampler import BucketBatchSampler, GlobalBatchSampler
from ptrain.data.scan_cache import ScanCache, file_stamp
from ptrain.data.scan_cache import entry as cache_entry
from ptrain.data.sources import Record, load_records
from ptrain.data.video import FrameSampling, VideoInfo, load_clip, load_image, probe_media, quiet_ffmpeg

log = logging.getLogger("ptrain")

#: A sample that fails to decode during training is replaced by another of its bucket; after this many failed
#: replacements in a row the run stops (the data has gone bad, e.g. a lost mount).
MAX_REPLACEMENTS = 8


@dataclass
class Usable:
    records: list[Record]
    skipped: dict[str, str]  # path -> reason
    buckets: list[Bucket] = field(default_factory=list)  # the training shape of each usable record
    plan: BucketPlan | None = None
    #: The scan's probe of each usable record's file (frames, size, fps): decoding picks its decode size from it.
    infos: list[VideoInfo] = field(default_factory=list)
    #: Dataset entries skipped: more than len(skipped) (files) when repeats list a file several times.
    skipped_samples: int = 0

    @property
    def bucketed(self) -> bool:
        return self.plan is not None and self.plan.enabled

    def fingerprints(self) -> dict[str, str]:
        """Short hashes of what fixes the sample order: the usable samples (file name, kind, caption, in order)
        and their bucket shapes. A checkpoint records them; a resume whose data or buckets differ is told that its
        batches are not those an uninterrupted run would have had (a moved data folder keeps both)."""
        samples = hashlib.sha256()
        for r in self.records:
            first = r.first_frame.name if r.first_frame is not None else ""
            samples.update(f"{r.video.name}\0{r.kind}\0{first}\0{r.caption}\n".encode())
        shapes = hashlib.sha256("\n".join(map(str, self.buckets)).encode())
        return {"samples": samples.hexdigest()[:16], "buckets": shapes.hexdigest()[:16]}

    def skip_reasons(self) -> Counter:
        """Skips counted by kind of reason (the part before any numbers / paths)."""
        out: Counter = Counter()
        for reason in self.skipped.values():
            r = reason.split(": ", 1)[-1] if reason.startswith(("video ", "image ")) else reason
            out[_reason_kind(r)] += 1
        return out


#: (what a skip reason contains, its label in the data summary's "skipped by reason"), in the order tried
_REASON_KINDS = (
    ("no such file", "no such file"), ("empty file", "empty file"), ("cannot decode", "cannot decode"),
    ("too small", "too small"), ("extreme aspect", "extreme aspect"), ("megapixels", "too many megapixels"),
    ("not valid UTF-8", "caption not UTF-8"), ("no caption file", "no caption file"), ("too short", "too short"),
    ("usable frames <", "too few usable frames"), ("image (1 frame)", "image without --enable_bucket"),
    ("no bucket", "no bucket fits"), ("1-frame", "image: 1 frame not trainable"),
    ("< --num_frames", "fewer frames than --num_frames"), ("no video path", "no video path"),
    ("no media path", "no media path"), ("caption is a", "caption not text"),
    ("first-frame image", "first-frame image"), ("type ptrain reads", "unreadable file type"),
)  # fmt: skip


def _reason_kind(reason: str) -> str:
    return next((label for key, label in _REASON_KINDS if key in reason), "other")


def probe_threads() -> int:
    """Threads that probe files on each rank: the host's cores shared among its ranks (torchrun's
    LOCAL_WORLD_SIZE), at most 8. decord and PIL decode without the GIL, and ffmpeg runs as a process."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))
    return max(1, min(8, (os.cpu_count() or 1) // local))


def _probe_one(path: Path, kind: str) -> tuple[tuple, dict | None]:
    """(result, cache entry): ("ok", VideoInfo) or ("bad", reason, kept): a failure from the file's content
    (ValueError) is kept in the cache, one from reading it (OSError) is not."""
    stamp = file_stamp(path)
    try:
        result: tuple = ("ok", probe_media(path, kind))
    except ValueError as e:
        result = ("bad", str(e), True)
    except OSError as e:
        result = ("bad", str(e), False)
    return result, cache_entry(result, stamp)


def _probe_all(jobs: list[tuple[Path, str]], sampling: FrameSampling, cache: ScanCache | None = None) -> list[tuple]:
    """Probe each (path, kind) once, the jobs split over ranks when distributed and over threads within a rank
    (probe_threads), files unchanged since `cache` was written read from it; one result per job, the same on
    every rank: ("ok", VideoInfo, usable frames) or ("bad", reason). Rank 0 then rewrites the cache if anything
    was probed."""
    cache = cache or ScanCache(None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    start = time.perf_counter()
    mine: dict[int, tuple] = {}  # job -> (result, cache entry, probed now)
    todo = []
    for j in range(rank, len(jobs), world):
        hit = cache.get(*jobs[j])
        if hit is None:
            todo.append(j)
        else:
            mine[j] = (hit, cache.entries[ScanCache.key(*jobs[j])], False)
    threads = min(probe_threads(), len(todo))
    with quiet_ffmpeg() if any(jobs[j][1] == "video" for j in todo) else contextlib.nullcontext():
        if threads > 1:
            with ThreadPoolExecutor(threads, thread_name_prefix="ptrain-probe") as pool:
                for j, (result, entry) in zip(todo, pool.map(lambda j: _probe_one(*jobs[j]), todo)):
                    mine[j] = (result, entry, True)
        else:
            for j in todo:
                mine[j] = (*_probe_one(*jobs[j]), True)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        mine = {k: v for part in gathered for k, v in part.items()}
    probed = sum(m[2] for m in mine.values())
    if jobs:
        log.info("data scan: %d files in %.1f s (%d probed on %d rank(s) x %d thread(s), %d from the scan cache%s)",
                 len(jobs), time.perf_counter() - start, probed, world, max(1, threads), len(jobs) - probed,
                 f" {cache.path}" if cache.path is not None else "")  # fmt: skip
    if rank == 0 and probed:
        cache.save({ScanCache.key(*jobs[j]): m[1] for j, m in mine.items() if m[1] is not None})
    out = []
    for j in range(len(jobs)):
        result = mine[j][0]
        if result[0] == "ok":
            info = result[1]
            have = sampling.available(info.num_frames, info.fps, info.times) if jobs[j][1] == "video" else 1
            out.append(("ok", info, have))
        else:
            out.append(("bad", result[1]))
    return out


def filter_usable(
    records: list[Record], sampling: FrameSampling | int, plan: BucketPlan | None = None, cache: ScanCache | None = None
) -> Usable:
    """Probe every distinct file (split over ranks when distributed; unchanged files read from `cache`), give each
    usable record its bucket; drop and name the unusable ones.

    A row's first-frame image (i2v / inpaint conditioning) is decoded here too, like the media: the loader
    decodes it with every draw of its sample, so a broken one would otherwise fail only in training."""
    if isinstance(sampling, int):
        sampling = FrameSampling(sampling)
    if plan is None:
        plan = BucketPlan(DataArgs(num_frames=sampling.num_frames), None, sampling.num_frames)
    jobs: dict[tuple[str, str], int] = {}  # (path, kind) -> job number, in record order
    for r in records:
        if r.error is None and r.first_frame_error is None:
            jobs.setdefault((str(r.video), r.kind), len(jobs))
            if r.first_frame is not None:
                jobs.setdefault((str(r.first_frame), "image"), len(jobs))
    probed = _probe_all([(Path(path), kind) for path, kind in jobs], sampling, cache)
    usable, buckets, infos, skipped = [], [], [], {}
    for i, rec in enumerate(records):
        key = str(rec.video)
        if rec.error is not None or rec.first_frame_error is not None:
            skipped[key] = rec.error or rec.first_frame_error
            continue
        res = probed[jobs[(key, rec.kind)]]
        if res[0] == "bad":
            skipped[key] = res[1]
            continue
        first = probed[jobs[(str(rec.first_frame), "image")]] if rec.first_frame is not None else None
        if first is not None and first[0] == "bad":
            skipped[key] = f"{rec.kind} {key}: first-frame {first[1]}"
            continue
        _, info, have = res
        h, w, total = info.height, info.width, info.num_frames
        try:
            bucket = plan.assign(rec.kind, h, w, have, index=i)
        except ValueError as e:
            reason = str(e)
            if not plan.enabled and rec.kind == "video" and have < plan.num_frames:
                reason = f"{have} frames < --num_frames {plan.num_frames}"
                if have != total:
                    reason = f"{have} of its {total} frames {sampling.rate_text()} < --num_frames {plan.num_frames}"
            skipped[key] = f"{rec.kind} {key}: {reason}" if not reason.startswith(rec.kind) else reason
            continue
        usable.append(rec)
        buckets.append(bucket)
        infos.append(info)
    return Usable(usable, skipped, buckets, plan, infos, skipped_samples=len(records) - len(usable))


class VideoDataset(Dataset):
    """Item (index, stream position) -> the decoded sample at its bucket's shape.

    Everything random about a sample (frame window, crop, caption dropout) is seeded by (seed, position), so
    it is the same in every layout and after a resume. With `as_uint8` pixels (video, first_frame) stay uint8: a
    quarter of the bytes through the workers' queues and the host-to-device copy, and no float conversion in the
    workers (the training step converts on the device: ptrain.data.video.to_unit_range). A file that fails to
    decode here (it passed the scan) is replaced by another sample (`replacement`: of its bucket, else one that
    can be cropped to its shape) chosen by (seed, position, attempt): deterministic, and counted in the batch's
    `replaced` field (logged as `data_replaced`: the bad files met, each once per draw).
    """

    def __init__(
        self,
        records: list[Record],
        args: DataArgs,
        sampling: FrameSampling,
        seed: int = 0,
        buckets: list[Bucket] | None = None,
        infos: list[VideoInfo] | None = None,
        as_uint8: bool = False,
    ):
        self.records, self.args, self.sampling, self.seed = records, args, sampling, seed
        self.as_uint8 = as_uint8
        self.infos = infos  # the scan's probe of each file (None: decode at the source size)
        default = Bucket(sampling.num_frames, args.height, args.width)
        self.buckets = buckets or [default] * len(records)
        #: Some rows give a first-frame image: every item then carries `first_frame` (the clip's own otherwise).
        self.first_frames = any(r.first_frame is not None for r in records)
        self._same: dict[Bucket, list[int]] = {}
        for i, b in enumerate(self.buckets):
            self._same.setdefault(b, []).append(i)
        self._warned: set[str] = set()  # files whose failure this process has logged (once each)

    def __len__(self) -> int:
        return len(self.records)

    def caption_of(self, index: int) -> str:
        """The record's caption as trained (with --id_token), before caption dropout."""
        rec = self.records[index]
        return f"{self.args.id_token} {rec.caption}" if self.args.id_token else rec.caption

    def _load(self, index: int, rng: np.random.Generator, bucket: Bucket | None = None) -> torch.Tensor:
        """Record `index`'s pixels at `bucket`'s shape (default: its own bucket; another when it stands in)."""
        rec, b, a = self.records[index], bucket or self.buckets[index], self.args
        if rec.kind == "image":
            return load_image(rec.video, b.height, b.width, a.reshape_mode, rng, self.as_uint8)
        sampling = replace(self.sampling, num_frames=b.frames)
        source = self.infos[index] if self.infos else None
        return load_clip(rec.video, sampling, b.height, b.width, reshape_mode=a.reshape_mode, rng=rng, source=source,
                         as_uint8=self.as_uint8)  # fmt: skip

    def _load_item(self, index: int, bucket: Bucket, rng: np.random.Generator):
        """(video, first frame or None) of record `index` at `bucket`'s shape."""
        video = self._load(index, rng, bucket)
        first = self.records[index].first_frame
        if first is not None:
            return video, load_image(first, bucket.height, bucket.width, self.args.reshape_mode, rng,
                                     self.as_uint8)[:, 0]  # fmt: skip
        return video, (video[:, 0].clone() if self.first_frames else None)

    def _candidates(self, index: int, tried: set[int]) -> list[int]:
        """Samples that can stand in for `index` at its bucket's shape, none of a file already tried (a repeated
        file is several samples): the others of its bucket; when none is left (e.g. the only image of its aspect
        ratio), samples of other buckets with at least as many frames, cropped to this shape (every sample of a
        step has one shape), its own kind first."""
        bucket, kind = self.buckets[index], self.records[index].kind
        bad = {self.records[t].video for t in tried}
        same = [j for j in self._same[bucket] if self.records[j].video not in bad]
        if same:
            return same
        other = [j for j in range(len(self.records)) if self.buckets[j].frames >= bucket.frames]
        other = [j for j in other if self.records[j].video not in bad]
        return [j for j in other if self.records[j].kind == kind] or other

    def replacement(self, index: int, position: int, tried: set[int]) -> int | None:
        """The sample that replaces `index` at stream `position` after the samples in `tried` failed (never one
        of them, so a bucket of one is not retried until the run stops), or None if no sample is left;
        deterministic in (seed, position, number tried)."""
        pool = self._candidates(index, tried)
        if not pool:
            return None
        pick = np.random.default_rng([self.seed, position, 0xBAD, len(tried)])
        return pool[int(pick.integers(0, len(pool)))]

    def _failed(self, index: int, e: Exception) -> str:
        path = str(self.records[index].video)
        if path not in self._warned:  # a bad file drawn again fails again: say so once per process
            self._warned.add(path)
            log.warning("sample %s failed to decode (%s: %s); replacing it", path, type(e).__name__, e)
        return f"{path}: {type(e).__name__}: {e}"

    def item_as(self, index: int, position: int, bucket: Bucket) -> dict:
        """Record `index` at stream `position` and `bucket`'s shape, as __getitem__ gives it when `index` is the
        sample decoded there (itself or its stand-in): a context-parallel rank whose peer had to replace the sample
        takes the peer's stand-in with this (`CPSampleAgreement`). Raises what the decoder raises."""
        rng = np.random.default_rng([self.seed, position, 0xDA7A])
        video, first_frame = self._load_item(index, bucket, rng)
        return self._item(index, position, rng, video, first_frame, 0)

    def _item(self, index, position, rng, video, first_frame, replaced: int) -> dict:
        caption = self.caption_of(index)
        if self.args.caption_dropout_p and rng.random() < self.args.caption_dropout_p:
            caption = ""
        item = {"video": video, "caption": caption, "position": position, "index": index, "replaced": replaced}
        if self.first_frames:
            item["first_frame"] = first_frame
        return item

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key[0], key[1]
        bucket, asked = self.buckets[key[0]], key[0]
        tried: set[int] = set()
        errors: list[str] = []
        while True:
            # Per-sample randomness (crop offset, caption dropout) from (seed, position): same in every layout.
            rng = np.random.default_rng([self.seed, position, 0xDA7A])
            try:
                video, first_frame = self._load_item(index, bucket, rng)
                break
            except Exception as e:  # decord / PIL raise their own types; the file is named in the log
                errors.append(self._failed(index, e))
                tried.add(index)
                nxt = self.replacement(asked, position, tried) if len(errors) <= MAX_REPLACEMENTS else None
                if nxt is None:
                    why = "" if len(errors) > MAX_REPLACEMENTS else f" (no other sample can stand in at {bucket})"
                    raise RuntimeError(
                        f"{len(errors)} samples in a row failed to decode; the data has gone bad{why}:\n"
                        + "\n".join(errors)
                    ) from e
                index = nxt
        return self._item(index, position, rng, video, first_frame, len(errors))


class CPSampleAgreement:
    """The ranks of a context-parallel group train one sample together, each its part of the tokens, and each
    decodes it itself. A sample that fails on some of them only (a transient read error, a node whose copy of the
    data lacks a file the scan probed elsewhere) was replaced on those ranks alone: the step trained half of one
    video and half of another, silently. Every micro-batch, the ranks exchange which sample each decoded and how
    many it replaced (an all-gather of a few integers on a CPU group: no wait for the device); where they differ,
    the ranks that decoded the asked sample take the stand-in of the rank that replaced the most (its earlier
    picks failed there; stand-ins are deterministic in the stream position, so ranks that replaced alike agree),
    and the replacement is counted once per group."""

    def __init__(self, dataset: VideoDataset, cp_group, world: int):
        self.dataset, self.world = dataset, world
        self.peers = dist.get_process_group_ranks(cp_group)
        self.group = dist.new_group(backend="gloo")

    def agree(self, batch: dict) -> dict:
        mine = torch.stack([batch["index"], batch["replaced"]]).to(torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        peers = torch.stack([every[r] for r in self.peers])  # (cp, 2, batch)
        for b in range(mine.shape[1]):
            decoded = peers[:, 0, b]
            if bool((decoded == decoded[0]).all()):
                continue
            k = int(peers[:, 1, b].argmax())
            want, position = int(decoded[k]), int(batch["position"][b])
            if int(mine[0, b]) != want:
                self._take(batch, b, want, position, int(mine[0, b]), self.peers[k])
            batch["replaced"][b] = peers[k, 1, b]
        return batch

    def _take(self, batch: dict, b: int, want: int, position: int, had: int, peer: int) -> None:
        ds, video = self.dataset, batch["video"][b]
        log.warning("sample %s at stream position %d: context-parallel rank %d had to replace it and decoded %s; "
                    "this rank takes that one too, so the group trains one sample", ds.records[had].video, position,
                    peer, ds.records[want].video)  # fmt: skip
        try:
            item = ds.item_as(want, position, Bucket(video.shape[1], video.shape[2], video.shape[3]))
        except Exception as e:
            raise RuntimeError(f"sample {ds.records[want].video} (the stand-in context-parallel rank {peer} decoded "
                               f"at stream position {position}) fails to decode on this rank too: {type(e).__name__}: "
                               f"{e}; every rank must read the same data") from e  # fmt: skip
        batch["video"][b] = item["video"]
        batch["caption"][b] = item["caption"]
        batch["index"][b] = want
        if "first_frame" in item:
            batch["first_frame"][b] = item["first_frame"]


def scan_dataset(
    args: DataArgs, sampling: FrameSampling, rules: ShapeRules | None = None, cache: ScanCache | None = None,
    first_frames: bool = True,
) -> Usable:
    """Read the dataset description, probe every file (or read it from `cache`) and bucket the samples; log and
    count what is skipped (or stop with every reason under --strict_data).

    `first_frames=False` (a --train_mode normal run: a first-frame image column conditions i2v / inpaint only)
    drops the rows' first-frame images before the scan: they are neither probed, loaded nor keyed, and a missing
    one skips nothing."""
    records = load_records(args)
    if not first_frames:
        records = [replace(r, first_frame=None, first_frame_error=None) for r in records]
    usable = filter_usable(records, sampling, BucketPlan(args, rules), cache)
    if usable.skipped:
        if args.strict_data:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in usable.skipped.items())
            raise ConfigError(
                f"--strict_data: {len(usable.skipped)} of {len(records)} samples are unusable:\n{listing}"
            )
        log.warning("skipping %s:", skip_count(usable, len(records)), extra=ALIKE)
        for path, reason in list(usable.skipped.items())[:20]:
            log.warning("  %s", reason if path in reason else f"{path}: {reason}", extra=ALIKE)
        if len(usable.skipped) > 20:
            log.warning("  ... and %d more", len(usable.skipped) - 20, extra=ALIKE)
    if not usable.records:
        short = {"fewer frames than --num_frames", "too few usable frames", "image without --enable_bucket"}
        hint = ""
        if not usable.bucketed and short & set(usable.skip_reasons()):
            hint = (f"; clips shorter than --num_frames {args.num_frames} (and images) train with --enable_bucket, "
                    "each at the frame count it has, or lower --num_frames")  # fmt: skip
        raise ConfigError(f"none of the {len(records)} samples is usable (see the reasons above){hint}")
    warn_empty_captions(usable)
    return usable


def skip_count(usable: Usable, total: int) -> str:
    """"N of T samples", or with repeats "N files (M of T samples)": the skips are files, the samples entries."""
    files, samples = len(usable.skipped), usable.skipped_samples or len(usable.skipped)
    if files == samples:
        return f"{files} of {total} samples"
    return f"{files} file{'s' * (files != 1)} ({samples} of {total} samples, counting repeats)"


def empty_captions(usable: Usable) -> list[Record]:
    return [r for r in usable.records if not r.caption.strip()]


def warn_empty_captions(usable: Usable, examples: int = 3) -> None:
    """One warning line with the count and a few files. An empty prompt is a legitimate training target (it is
    what caption dropout trains), so these samples are kept; but a 0-byte caption file, an empty cell or a JSON
    null is more often a mistake, and it would otherwise train without a word said."""
    empty = empty_captions(usable)
    if not empty:
        return
    files = list(dict.fromkeys(str(r.video) for r in empty))
    more = f" and {len(files) - examples} more" if len(files) > examples else ""
    log.warning(
        "%d of %d usable samples have an empty caption (an empty caption file, table cell or null) and train on the "
        "empty prompt: %s%s", len(empty), len(usable.records), ", ".join(files[:examples]), more, extra=ALIKE,
    )  # fmt: skip


def warn_long_captions(captions, tokenizer, limit: int, examples: int = 2) -> int:
    """Count the captions the text encoder will cut to its `limit` tokens (the pipelines truncate without a word
    once diffusers' logger is quiet, and Wan's never warns), and say so in one warning with the longest and a few
    examples. Distinct captions are tokenized once, without truncation. Returns how many are cut."""
    unique = list(dict.fromkeys(c for c in captions if c))
    if not unique or tokenizer is None:
        return 0
    lengths = []
    for start in range(0, len(unique), 1024):  # in chunks: only the lengths are kept
        chunk = unique[start : start + 1024]
        lengths += map(len, tokenizer(chunk, add_special_tokens=True, truncation=False, verbose=False)["input_ids"])
    long = sorted(((n, c) for n, c in zip(lengths, unique) if n > limit), reverse=True)
    if long:
        shown = "; ".join(repr(c[:60] + ("..." if len(c) > 60 else "")) for _, c in long[:examples])
        log.warning("%d of %d distinct captions are longer than the text encoder's %d tokens and train cut to them "
                    "(the longest has %d): %s; shorten them, or raise --max_sequence_length where the model "
                    "allows it", len(long), len(unique), limit, long[0][0], shown, extra=ALIKE)  # fmt: skip
    return len(long)


def make_sampler(usable: Usable, batch_size: int, dp_rank: int, dp_size: int, grad_accum: int, seed: int):
    if usable.bucketed:
        ids = {b: k for k, b in enumerate(sorted(set(usable.buckets)))}
        return BucketBatchSampler([ids[b] for b in usable.buckets], batch_size, dp_rank, dp_size, grad_accum, seed)
    return GlobalBatchSampler(len(usable.records), batch_size, dp_rank, dp_size, grad_accum, seed)


def summary(usable: Usable, global_batch: int, tokens=None) -> list[str]:
    """Dataset summary lines for --dry_run and the log: counts, skips by reason, bucket histogram."""
    kinds = Counter(r.kind for r in usable.records)
    lines = [
        f"samples: {len(usable.records)} usable ({kinds.get('video', 0)} videos, {kinds.get('image', 0)} images), "
        f"{len(usable.skipped)} skipped" + (f" file{'s' * (len(usable.skipped) != 1)} ({usable.skipped_samples} "
                                            "samples, counting repeats)"
                                            if usable.skipped_samples > len(usable.skipped) else "")
    ]
    empty = empty_captions(usable)
    if empty:
        lines.append(f"  {len(empty)} with an empty caption (they train on the empty prompt)")
    shown = Counter()
    for info in usable.infos:
        shown["non-square pixels (stretched to their display aspect)"] += info.decoded is not None
        shown["mirrored by their display matrix"] += bool(info.flip)
        shown["variable frame rate (sampled by timestamps)"] += info.times is not None
        shown["interlaced (one field kept: no combing)"] += info.field is not None
    if +shown:
        lines.append("  videos decoded as displayed: " + ", ".join(f"{n} {what}" for what, n in (+shown).items()))
    hdr = sum(bool(info.hdr) for info in usable.infos)
    if hdr:
        lines.append(f"  WARNING: {hdr} HDR (HLG / PQ) video{'s' if hdr > 1 else ''} decoded without tone mapping: "
                     "colours come out washed out; convert them to SDR first (the README's data section has an "
                     "ffmpeg command)")  # fmt: skip
    if usable.skipped:
        lines.append("  skipped by reason: " + ", ".join(f"{k}: {n}" for k, n in usable.skip_reasons().most_common()))
    lines += [
        f"    skipped {reason if path in reason else f'{path}: {reason}'}" for path, reason in usable.skipped.items()
    ]
    if usable.plan is not None:
        lines.append(f"shapes: {usable.plan.describe()}")
    hist = histogram(usable.buckets, [r.kind for r in usable.records])
    if usable.bucketed:
        lines.append(f"buckets ({len(hist)}; one shape per step, global batch {global_batch}):")
        lines.append("    F x H x W        videos  images  tokens/sample  steps/epoch")
        for b, n in hist.items():
            total = sum(n.values())
            tok = f"{tokens(b.frames, b.height, b.width):>13,}" if tokens else f"{'-':>13}"
            pad = " (< global batch: repeats within a step)" if total < global_batch else ""
            lines.append(
                f"    {str(b):<16} {n['video']:>6}  {n['image']:>6}  {tok}  {-(-total // global_batch):>11}{pad}"
            )
    return lines


def collate(items: list[dict]) -> dict:
    """torch's default collation, but stream positions stay a list of ints: they seed per-sample generators
    on the host, and a tensor would cost a conversion per sample in the training step."""
    batch = default_collate(items)
    batch["position"] = [int(item["position"]) for item in items]
    return batch


def build_dataloader(
    usable: Usable,
    args: DataArgs,
    sampling: FrameSampling,
    dp_rank: int,
    dp_size: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    sampler_state: dict | None = None,
    dataset: Dataset | None = None,
) -> tuple[StatefulDataLoader, GlobalBatchSampler]:
    """The loader of one data-parallel rank; `sampler_state` positions it in the sample stream (resume);
    `dataset` replaces the decoding dataset (precomputed tensors)."""
    sampler = make_sampler(usable, batch_size, dp_rank, dp_size, grad_accum, seed)
    if sampler_state:
        sampler.load_state_dict(sampler_state)
    workers = args.num_workers(precomputed=dataset is not None)
    if workers:
        _end_stray_workers_at_exit()
    loader = StatefulDataLoader(
        dataset or VideoDataset(usable.records, args, sampling, seed, usable.buckets or None, usable.infos or None,
                                as_uint8=True),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        worker_init_fn=ignore_stop_signals,
    )
    return loader, sampler


@functools.cache
def _end_stray_workers_at_exit() -> None:
    """Kill, at exit, loader workers still running: a loader that failed half-started (an error while its
    iterator was built) never shuts them down, and multiprocessing's own exit handler would stop them with SIGTERM,
    which they ignore (ignore_stop_signals), and wait for them forever: the run hung after its error instead of
    exiting (a new-user trial). Registered after multiprocessing's handler, so it runs before it."""
    import atexit
    import multiprocessing

    def end() -> None:
        import signal

        stray = [p for p in multiprocessing.active_children() if p.daemon]  # (loader workers are; nothing else is)
        if not stray:
            return
        # torch's SIGCHLD handler raises when a worker dies: at exit that would stop this loop at the first one
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for p in stray:
            with contextlib.suppress(Exception):
                p.kill()
                p.join(5)

    atexit.register(end)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A loader worker ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches every process of the group, and a
    worker it ended would fail the step the training process finishes before it stops with a checkpoint (see
    ptrain.trainer.StopRequest). The workers still end with the training process (the loader shuts them down;
    torch's watchdog ends any whose parent is gone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
