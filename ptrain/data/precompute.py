"""Precomputed conditioning (--enable_precomputation): VAE latent distributions and text embeddings computed
once, sharded over ranks, stored as safetensors, then read by the data loader instead of decoding videos.

What is stored per distinct sample (file, caption, bucket, first-frame image): the VAE's latent *distribution*
(its mean and log-variance, `latent_dist.parameters`, in --vae_dtype), not a sample, so every step still draws a
fresh latent from it with the sample's seeded generator, exactly as on-the-fly training does; the text encoder
outputs for the caption (with --id_token), plus one entry for the empty caption (--caption_dropout_p); and with
--train_mode i2v the first frame's conditioning (`ModelSpec.image_condition`: e.g. Wan's conditioning latents and
CLIP embeddings), computed from the clip's first frame or the dataset's first-frame image as the step would.
Where the prompt encoding reads the image (HunyuanVideo-I2V) each sample also stores its empty-caption entry.

The cache lives in `<precomputation_dir>/<key>/` where key hashes a manifest of everything the tensors depend
on: the sample list (paths, sizes, modification times, captions, buckets, first-frame images), the preprocessing
flags, the model family, the VAE / text encoder folders (their weight files' sizes and times) and dtypes, and for
i2v what the first-frame conditioning depends on (`stored_condition`). A changed setting
gives another key, so a cache is never silently reused for other data; --precomputation_reuse reuses a
complete cache with the same key (otherwise it is computed again). Each file is written whole (a temporary name,
then renamed), so an interrupted precomputation (Ctrl-C, preemption, a crash) is continued by the next run of the
same key: only the samples without a file are encoded. A new key with the settings of an earlier complete cache
(the dataset grew, or a caption changed) takes the files of the samples the two share from it (hard links where
the file system allows) when reuse is allowed (auto, or --precomputation_reuse): only what is new is encoded.

`decide` makes --enable_precomputation auto's choice before any weights load (`plan_run`): on when the run draws
more samples than there are distinct ones (so each would be decoded and encoded more than once), the settings
allow it and the estimated cache fits the disk; a complete cache of the same key is reused. A sample that fails
to decode while the cache is filled is left out and, in training, replaced by another of its bucket (as the
decoding dataset does); if none of its bucket was cached, a sample of another bucket is encoded cropped to its
shape and stands in for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from ptrain.config import Config, ConfigError
from ptrain.data import Usable, VideoDataset
from ptrain.interrupts import phase
from ptrain.safe_load import UnsafeFileError, load_safetensors

log = logging.getLogger("ptrain")

#: The cache format and decoding rules; a change makes a new cache. 2: videos decoded as displayed (mirroring,
#: non-square pixels) and variable-frame-rate videos sampled by time; 3: by time with --video_sample_stride too.
VERSION = 3
COMPLETE = "complete"
EMPTY = "empty_caption.safetensors"


def _folder_stats(path: str | None) -> list:
    """(name, size, mtime_ns) of the weight/config files in a component folder (cheap change detection)."""
    if not path or not Path(path).is_dir():
        return []
    out = []
    for p in sorted(Path(path).rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".model", ".txt"):
            st = p.stat()
            out.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return out


def sample_key(usable: Usable, i: int) -> str:
    r = usable.records[i]
    key = [str(r.video), r.kind, r.caption, str(usable.buckets[i])]
    return json.dumps(key + [str(r.first_frame)] if r.first_frame is not None else key)


def stored_condition(cfg: Config, spec) -> dict | None:
    """What the cache stores for the mode's first-frame conditioning (None: nothing), as the key sees it: the mode
    and what it depends on beyond the VAE (the transformer's files, which say e.g. whether Wan takes CLIP
    embeddings; the image encoder's and image processor's; model_index.json's settings, e.g. expand_timesteps)."""
    from ptrain.models.spec import pipeline_settings, read_model_index

    m = cfg.model
    if not spec.precomputes_condition(m.train_mode):
        return None
    root = Path(m.pretrained_model_name_or_path)
    folder = m.transformer_id or str(root / "transformer")
    return {"train_mode": m.train_mode, "transformer": _folder_stats(folder),
            "image_encoder": _folder_stats(str(root / "image_encoder")),
            "image_processor": _folder_stats(str(root / "image_processor")),
            "settings": pipeline_settings(read_model_index(root))}  # e.g. Wan 2.2's expand_timesteps  # fmt: skip


def manifest(cfg: Config, usable: Usable, max_sequence_length: int, vae_tiling: bool = False,
             condition: dict | None = None) -> dict:  # fmt: skip
    """What the cache's key covers: the samples, the model's files, the preprocessing; `vae_tiling`: whether the VAE
    encodes tiled (--enable_tiling as decided at start-up: tiled latents differ slightly); `condition`: the
    first-frame conditioning stored (stored_condition; a cache without it keeps its key)."""
    m, d = cfg.model, cfg.data
    samples = []
    for key in dict.fromkeys(sample_key(usable, i) for i in range(len(usable.records))):
        files = [Path(f) for f in json.loads(key)[::4]]  # the video, and a first-frame image
        samples.append([key, *[n for f in files for n in (f.stat().st_size, f.stat().st_mtime_ns)]])
    root = m.pretrained_model_name_or_path
    components = {
        name: _folder_stats(override or str(Path(root) / name))
        for name, override in (("vae", m.vae_id), ("text_encoder", m.text_encoder_id), ("tokenizer", m.tokenizer_id),
                               ("text_encoder_2", m.text_encoder_2_id), ("tokenizer_2", m.tokenizer_2_id))
    }  # fmt: skip
    return {
        "version": VERSION,
        "model_name": m.model_name,
        "pretrained_model_name_or_path": str(Path(root).resolve()),
        "components": components,
        "dtypes": {"vae": m.vae_dtype, "text_encoder": m.text_encoder_dtype, "text_encoder_2": m.text_encoder_2_dtype},
        "preprocessing": {
            "num_frames": d.num_frames,
            "height": d.height,
            "width": d.width,
            "fps": d.fps,
            "video_sample_stride": d.video_sample_stride,
            "skip_frames_start": d.skip_frames_start,
            "skip_frames_end": d.skip_frames_end,
            "reshape_mode": d.reshape_mode,
            "id_token": d.id_token,
            "max_sequence_length": max_sequence_length,
            "enable_tiling": vae_tiling,
        },  # fmt: skip
        "samples": samples,
        **({"condition": condition} if condition else {}),
    }


#: Manifest entries that are not settings: the samples, and what precompute adds when it completes.
_PER_SAMPLE = ("samples", "files", "failed", "stand_ins")


def settings_key(man: dict) -> str:
    """The hash of a manifest's settings (everything but its samples): caches with the same one hold
    interchangeable files for the samples they share."""
    rest = {k: v for k, v in man.items() if k not in _PER_SAMPLE}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def reusable_files(target: Path, man: dict) -> dict[str, Path]:
    """Sample key -> an encoded file of it in another complete cache beside `target` made with the same settings,
    where the sample's files are unchanged (the same size and modification time): a dataset grown by a few
    videos, or with a caption edited, encodes only what is new."""
    want = settings_key(man)
    stats = {entry[0]: entry[1:] for entry in man["samples"]}
    found: dict[str, Path] = {}
    others = sorted(p for p in target.parent.iterdir() if p.is_dir() and p != target) if target.parent.is_dir() else []
    for other in others:
        try:
            if not (other / COMPLETE).is_file():
                continue
            old = json.loads((other / "manifest.json").read_text())
            if settings_key(old) != want:
                continue
            for entry in old["samples"]:
                key, name = entry[0], old["files"].get(entry[0])
                if name is not None and stats.get(key) == entry[1:] and key not in found:
                    found[key] = other / name
        except (OSError, ValueError, KeyError, TypeError, IndexError):  # another version's or a damaged manifest
            continue
    return found


def _link_or_copy(src: Path, dest: Path) -> bool:
    """Put `src`'s content at `dest` (a hard link where the file system allows it, else a copy written whole);
    False if `src` is no longer readable."""
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        if not _readable(src):
            return False
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return True
    except OSError:  # the earlier cache deleted meanwhile, the disk full: encode the sample instead
        tmp.unlink(missing_ok=True)
        return False


def cache_dir(cfg: Config, man: dict) -> Path:
    key = hashlib.sha256(json.dumps(man, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.data.precomputation_dir or Path(cfg.train.output_dir) / "precomputed")
    return root / key


@dataclass
class Decision:
    """What --enable_precomputation comes to for a run (decided once, before weights load; the same on every rank)."""

    enabled: bool
    reason: str
    #: reuse a complete cache of the same key (auto always; on with --precomputation_reuse)
    reuse: bool = False
    #: estimated cache size in bytes (0: not estimated)
    estimate_bytes: int = 0

    def describe(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Bytes a cache file costs beyond its tensors (safetensors header, a file system block), a rounded guess.
FILE_OVERHEAD = 4096


def not_precomputable(cfg: Config, spec) -> str | None:
    """Why the run's samples cannot be computed once (None if they can)."""
    d, mode = cfg.data, cfg.model.train_mode
    if d.reshape_mode == "random_crop" or d.random_frame_crop:
        return "--reshape_mode random_crop / --random_frame_crop draw a new crop or frame window every pass"
    if spec.needs_pixels(mode) and not spec.precomputes_condition(mode):  # (i2v: stored per sample)
        return f"--train_mode {mode} for {spec.name} encodes conditioning frames (masked or noised) every step"
    return None


def distinct_samples(usable: Usable) -> dict[str, int]:
    """sample key -> the first record with it (a repeated file with the same caption and shape is cached once)."""
    first: dict[str, int] = {}
    for i in range(len(usable.records)):
        first.setdefault(sample_key(usable, i), i)
    return first


def _text_widths(cfg: Config, spec) -> list[tuple[int, str]]:
    """(hidden width, dtype flag) of each text encoder, from its config.json (4096, a large width, if unreadable)."""
    from ptrain.models.spec import component_source

    m, out = cfg.model, []
    for name, dtype in (("text_encoder", m.text_encoder_dtype), ("text_encoder_2", m.text_encoder_2_dtype)):
        if name not in spec.component_classes:
            continue
        src, sub = component_source(m.pretrained_model_name_or_path, getattr(m, f"{name}_id"), name)
        try:
            c = json.loads((Path(src) / (sub or "") / "config.json").read_text())
            c = c.get("text_config", c) if "d_model" not in c and "hidden_size" not in c else c
            out.append((int(c.get("d_model") or c["hidden_size"]), dtype))
        except (OSError, ValueError, KeyError, TypeError):
            out.append((4096, dtype))
    return out


def estimate_bytes(cfg: Config, usable: Usable, spec, rules, distinct: dict[str, int]) -> int:
    """The cache's size: per distinct sample its latent distribution (mean and log-variance: twice the latent
    channels, in --vae_dtype, at its bucket's latent shape) and text embeddings (sequence length x each text
    encoder's width, in its dtype), plus the empty caption's. i2v's first-frame conditioning is counted as two
    float32 latents (HunyuanVideo-I2V's latents and mask are about that, Wan 2.1's 1.25 and its CLIP embeddings,
    LTX-Video's first latent frame less), and where the prompt reads the image (HunyuanVideo-I2V), a second text
    entry per sample, each with the image's prompt tokens."""
    from collections import Counter

    mode = cfg.model.train_mode
    vae = DTYPE_BYTES[cfg.model.vae_dtype] + (4 if spec.precomputes_condition(mode) else 0)
    latent = 0
    for b, n in Counter(usable.buckets[i] for i in distinct.values()).items() if rules.latent_shape else ():
        c, f, h, w = rules.latent_shape(b.frames, b.height, b.width)
        latent += n * 2 * c * f * h * w * vae
    seq = (cfg.data.max_sequence_length or rules.text_sequence_length or 512) + spec.prompt_image_tokens(mode)
    text = sum(seq * width * DTYPE_BYTES[dtype] for width, dtype in _text_widths(cfg, spec))
    entries = len(distinct) * (2 if spec.precomputes_condition(mode) and spec.text_needs_image(mode) else 1) + 1
    return latent + entries * (text + FILE_OVERHEAD)


def _free_bytes(folder: Path) -> int:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def decide(cfg: Config, usable: Usable, spec, rules, global_batch: int) -> Decision:
    """--enable_precomputation on / off as given (on errors if it cannot work); auto: see the module docstring.
    auto never errors: it falls back to decoding every step and says why."""
    d, t = cfg.data, cfg.train
    if d.enable_precomputation == "off":
        return Decision(False, "--enable_precomputation off")
    why = not_precomputable(cfg, spec)
    if d.enable_precomputation == "on":
        if why:
            raise ConfigError(f"{why}: it cannot use --enable_precomputation")
        return Decision(True, "--enable_precomputation on", reuse=d.precomputation_reuse)
    if why:
        return Decision(False, f"auto: {why}")
    distinct = distinct_samples(usable)
    est = estimate_bytes(cfg, usable, spec, rules, distinct)
    max_seq = d.max_sequence_length or rules.text_sequence_length
    target = cache_dir(cfg, manifest(cfg, usable, max_seq, condition=stored_condition(cfg, spec)))
    if (target / COMPLETE).is_file():
        return Decision(True, f"auto: reusing the complete cache of the same data, model and settings in {target}",
                        reuse=True, estimate_bytes=est)  # fmt: skip
    drawn = t.train_steps * global_batch
    if drawn <= len(distinct):
        return Decision(False, f"auto: one pass or less ({t.train_steps} steps x global batch {global_batch} = "
                               f"{drawn} samples of {len(distinct)}): each sample is encoded once anyway")  # fmt: skip
    free = _free_bytes(target.parent)
    if 2 * est > free:
        return Decision(False, f"auto: the cache (about {_gib(est)}) would fill more than half of the {_gib(free)} "
                               f"free under {target.parent}", estimate_bytes=est)  # fmt: skip
    reason = (f"auto: {drawn / len(distinct):.1f} passes over {len(distinct)} samples; cache about {_gib(est)} in "
              f"{target.parent} ({_gib(free)} free)")  # fmt: skip
    return Decision(True, reason, reuse=True, estimate_bytes=est)


def precompute(
    cfg: Config, usable: Usable, spec, comps, dataset: VideoDataset, max_seq: int, device, reuse: bool = False
) -> Path:
    """Fill (or, with `reuse`, reuse) the cache for `usable`; every rank takes part; returns the cache folder."""
    rank, world = dist.get_rank(), dist.get_world_size()
    man = manifest(cfg, usable, max_seq, bool(getattr(comps.vae, "use_tiling", False)), stored_condition(cfg, spec))
    target = cache_dir(cfg, man)
    if (target / COMPLETE).is_file() and reuse:
        log.info("precomputation: reusing %s (same data, model and settings)", target)
        return target
    if rank == 0:
        if (target / COMPLETE).is_file():
            log.info("precomputation: %s exists; computing it again (--precomputation_reuse reuses it)", target)
            shutil.rmtree(target)
        elif target.exists():  # an interrupted precomputation of the same key: its finished files are kept
            log.info("precomputation: continuing the interrupted precomputation in %s", target)
            for tmp in target.glob("*.tmp"):
                tmp.unlink()
        target.mkdir(parents=True, exist_ok=True)
        others = [p for p in target.parent.iterdir() if p.is_dir() and p != target]
        if others:
            log.info("precomputation: %d other cache(s) in %s were made with other data or settings (delete "
                     "those you no longer need)", len(others), target.parent)  # fmt: skip
    dist.barrier()
    donors = reusable_files(target, man) if reuse else {}  # (no reuse: every sample encoded again)
    first = distinct_samples(usable)
    todo = list(first.items())[rank::world]
    t0 = time.perf_counter()
    bar = tqdm(total=len(first), disable=rank != 0, desc="precompute", dynamic_ncols=True)
    ids = {key: n for n, key in enumerate(first)}
    failed: dict[str, str] = {}
    kept = linked = 0
    with phase("while precomputing latents and text embeddings",
               f"the samples encoded so far are kept in {target}; rerun the same command to continue from them"):
        for key, i in todo:
            path = target / f"{ids[key]:08d}.safetensors"
            if _readable(path):  # encoded before an interruption
                kept += 1
                bar.update(world)
                continue
            if key in donors and _link_or_copy(donors[key], path):  # encoded by an earlier cache of these settings
                linked += 1
                bar.update(world)
                continue
            try:
                video, frame = _decode(dataset, i, usable.buckets[i], device)
            except Exception as e:  # noqa: BLE001 - decord / PIL raise their own types; the file is named
                failed[key] = f"{usable.records[i].video}: {type(e).__name__}: {e}"
                log.warning("precomputation: %s failed to decode (%s); training replaces it", usable.records[i].video,
                            e)  # fmt: skip
                bar.update(world)
                continue
            _save_encoded(spec, comps, video, frame, dataset.caption_of(i), max_seq, path)
            bar.update(world)
    bar.close()
    if rank == 0 and not spec.text_needs_image(spec.mode):  # (else each sample stores its own, with its image)
        cond = spec.encode_text(comps, [""], max_seq)
        save_file({f"text.{k}": v[0].contiguous().cpu() for k, v in cond.tensors.items()}, target / EMPTY)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (failed, kept, linked))
    failed = {k: v for part, _, _ in gathered for k, v in part.items()}
    kept, linked = sum(g[1] for g in gathered), sum(g[2] for g in gathered)
    if rank == 0:
        man["files"] = {key: f"{n:08d}.safetensors" for key, n in ids.items() if key not in failed}
        man["failed"] = failed
        man["stand_ins"] = _encode_stand_ins(usable, spec, comps, dataset, max_seq, device, target, failed, ids)
        (target / "manifest.json").write_text(json.dumps(man, indent=1))
        (target / COMPLETE).write_text("ok\n")
        log.info("precomputation: %d samples in %.1f s -> %s%s%s%s", len(first) - len(failed),
                 time.perf_counter() - t0, target, f" ({kept} encoded before an interruption)" if kept else "",
                 f" ({linked} taken from an earlier cache of the same settings)" if linked else "",
                 f" ({len(failed)} failed to decode)" if failed else "")  # fmt: skip
    dist.barrier()
    return target


def _decode(dataset: VideoDataset, i: int, bucket, device):
    """Sample `i` at `bucket`'s shape on the device: the clip (1, 3, F, H, W) and its first frame (1, 3, H, W), the
    dataset's first-frame image where the row gives one. Fixed crop: no draws are made."""
    video, first = dataset._load_item(i, bucket, np.random.default_rng(0))
    return video[None].to(device), (video[:, 0] if first is None else first)[None].to(device)


def _save_encoded(spec, comps, video, first, caption: str, max_seq: int, path: Path) -> None:
    """Encode one sample into a cache file: latent distribution, caption embeddings and (i2v) the first frame's
    conditioning, with the empty caption's embeddings where the prompt reads the image."""
    params = spec.encode_latent_dist(comps, video)
    images = {"images": first} if spec.text_needs_image(spec.mode) else {}
    cond = spec.encode_text(comps, [caption], max_seq, **images)
    tensors = {"latent_dist": params[0].contiguous().cpu()}
    tensors.update({f"text.{k}": v[0].contiguous().cpu() for k, v in cond.tensors.items()})
    if spec.precomputes_condition(spec.mode):
        shape = (1, params.shape[1] // 2, *params.shape[2:])
        with torch.no_grad():
            image = spec.image_condition(comps, first, shape)
        tensors.update({f"image.{k}": v[0].contiguous().cpu() for k, v in image.items()})
    if images:  # caption dropout's empty prompt reads the image too
        empty = spec.encode_text(comps, [""], max_seq, **images)
        tensors.update({f"empty.text.{k}": v[0].contiguous().cpu() for k, v in empty.tensors.items()})
    tmp = path.with_name(path.name + ".tmp")  # whole or absent: an interrupted precomputation continues from it
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _readable(path: Path) -> bool:
    """Whether a cache file is there whole (its header parses and covers the file: safetensors checks)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except Exception:  # noqa: BLE001 - safetensors raises its own error types for a truncated file
        return False


def _encode_stand_ins(usable: Usable, spec, comps, dataset: VideoDataset, max_seq: int, device, target: Path,
                      failed: dict[str, str], ids: dict[str, int]) -> dict[str, list[str]]:  # fmt: skip
    """For each sample that failed to decode and has no cached sample of its shape to replace it in training (e.g.
    the only image of its aspect ratio), encode another sample cropped to that shape (VideoDataset.replacement:
    one of another bucket with enough frames); -> {failed key: [cache file, the stand-in's sample key]}. Rare, so
    rank 0 does it alone. None found: PrecomputedDataset stops with the reason."""
    keys = [sample_key(usable, i) for i in range(len(usable.records))]
    cached = {usable.buckets[i] for i, k in enumerate(keys) if k not in failed}
    bad = {i for i, k in enumerate(keys) if k in failed}
    out: dict[str, list[str]] = {}
    for key, i in distinct_samples(usable).items():
        if key not in failed or usable.buckets[i] in cached:
            continue
        tried = set(bad)
        while (j := dataset.replacement(i, 0, tried)) is not None:
            try:
                video, frame = _decode(dataset, j, usable.buckets[i], device)
            except Exception as e:  # noqa: BLE001 - as above: decord / PIL types; the file is named
                log.warning("precomputation: %s failed to decode (%s)", usable.records[j].video, e)
                tried.add(j)
                continue
            name = f"{ids[key]:08d}.safetensors"
            _save_encoded(spec, comps, video, frame, dataset.caption_of(j), max_seq, target / name)
            out[key] = [name, keys[j]]
            log.warning("precomputation: no other sample of shape %s could replace %s; %s stands in, cropped to it",
                        usable.buckets[i], usable.records[i].video, usable.records[j].video)  # fmt: skip
            break
    return out


class PrecomputedDataset(Dataset):
    """(index, position) -> the cached latent distribution, text embeddings and (i2v) first-frame conditioning
    (`image.*`) of record `index`. A dropped caption takes the sample's own empty-caption entry where it has one
    (`empty.text.*`: the prompt reads the image), else the shared one.

    Caption dropout draws from the same (seed, position) generator as VideoDataset, so a cached run drops the
    same captions as an on-the-fly one. A sample that failed to decode while the cache was filled is replaced by
    a cached sample of the same bucket chosen by (seed, position): deterministic, counted in `replaced`; if its
    bucket has none, by the stand-in precompute encoded at its shape from another bucket (manifest `stand_ins`).
    """

    def __init__(self, usable: Usable, folder: Path, caption_dropout_p: float, seed: int):
        self.folder, self.p, self.seed = Path(folder), caption_dropout_p, seed
        man = json.loads((self.folder / "manifest.json").read_text())
        files, failed = man["files"], man.get("failed", {})
        keys = [sample_key(usable, i) for i in range(len(usable.records))]
        missing = [k for k in keys if k not in files and k not in failed]
        if missing:
            raise UnsafeFileError(f"{self.folder / 'manifest.json'}: no entry for sample {missing[0]}")
        self.files = [files.get(k) for k in keys]
        for name in self.files:
            self._check_name(name)
        buckets = list(usable.buckets) or [None] * len(keys)
        pools: dict = {}
        for i, b in enumerate(buckets):
            if self.files[i] is not None:
                pools.setdefault(b, []).append(i)
        self._pool = [pools.get(b, []) for b in buckets]
        self._stand_in: dict[int, tuple[str, int]] = {}  # failed sample -> (cache file, the sample standing in)
        stand_ins = man.get("stand_ins", {})
        for i, name in enumerate(self.files):
            if name is not None or self._pool[i]:
                continue
            if keys[i] not in stand_ins:
                raise RuntimeError(
                    f"{usable.records[i].video} failed to decode while precomputing ({failed[keys[i]]}), and no "
                    f"other sample, of its shape {buckets[i]} or one that could be cropped to it, could replace "
                    "it; the data has gone bad"
                )
            file, of = stand_ins[keys[i]]
            self._check_name(file)
            if of not in keys:
                raise UnsafeFileError(f"{self.folder / 'manifest.json'}: stand-in for an unknown sample {of}")
            self._stand_in[i] = (file, keys.index(of))
        self._empty: dict | None = None

    def _check_name(self, name) -> None:
        """Cache file names must be plain names inside the cache folder, nothing elsewhere."""
        if name is not None and (
            not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors")
        ):
            raise UnsafeFileError(f"{self.folder / 'manifest.json'}: invalid cache file name {name!r}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key[0], key[1]
        rng = np.random.default_rng([self.seed, position, 0xDA7A])
        replaced, file = 0, self.files[index]
        if file is None and self._pool[index]:  # failed to decode: another of its bucket, chosen by (seed, position)
            pool = self._pool[index]
            index = pool[int(np.random.default_rng([self.seed, position, 0xBAD, 1]).integers(0, len(pool)))]
            replaced, file = 1, self.files[index]
        elif file is None:  # none of its bucket was cached: the stand-in encoded at its shape
            (file, index), replaced = self._stand_in[index], 1
        try:
            item = load_safetensors(self.folder / file)
        except UnsafeFileError as e:  # a damaged cache file: --enable_precomputation auto would reuse it every start
            raise UnsafeFileError(
                f"{e}. The precomputed cache {self.folder} is damaged: delete that folder (the next start encodes "
                "it again) or pass another --precomputation_dir"
            ) from None
        own_empty = {k[6:]: item.pop(k) for k in [k for k in item if k.startswith("empty.")]}  # reads the image
        if self.p and rng.random() < self.p:
            if not own_empty and self._empty is None:
                self._empty = load_safetensors(self.folder / EMPTY)
            item.update(own_empty or self._empty)
        return {**item, "position": position, "index": index, "replaced": replaced}
