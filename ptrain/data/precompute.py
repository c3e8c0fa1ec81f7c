"""Precomputed conditioning (--enable_precomputation): VAE latent distributions and text embeddings computed
once, sharded over ranks, stored as safetensors, then read by the data loader instead of decoding videos.

What is stored per distinct sample (file, caption, bucket): the VAE's latent *distribution* (its mean and
log-variance, `latent_dist.parameters`, in --vae_dtype), not a sample, so every step still draws a fresh latent
from it with the sample's seeded generator, exactly as on-the-fly training does; and the text encoder outputs
for the caption (with --id_token), plus one entry for the empty caption (--caption_dropout_p).

The cache lives in `<precomputation_dir>/<key>/` where key hashes a manifest of everything the tensors depend
on: the sample list (paths, sizes, modification times, captions, buckets), the preprocessing flags, the model
family, the VAE / text encoder folders (their weight files' sizes and times) and dtypes. A changed setting
gives another key, so a cache is never silently reused for other data; --precomputation_reuse reuses a
complete cache with the same key (otherwise it is computed again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from ptrain.config import Config
from ptrain.data import Usable, VideoDataset
from ptrain.safe_load import UnsafeFileError, load_safetensors

log = logging.getLogger("ptrain")

VERSION = 1
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
    return json.dumps([str(r.video), r.kind, r.caption, str(usable.buckets[i])])


def manifest(cfg: Config, usable: Usable, max_sequence_length: int, vae_tiling: bool = False) -> dict:
    """What the cache's key covers: the samples, the model's files, the preprocessing; `vae_tiling`: whether the VAE
    encodes tiled (--enable_tiling as decided at start-up: tiled latents differ slightly)."""
    m, d = cfg.model, cfg.data
    samples = []
    for key in dict.fromkeys(sample_key(usable, i) for i in range(len(usable.records))):
        path = Path(json.loads(key)[0])
        st = path.stat()
        samples.append([key, st.st_size, st.st_mtime_ns])
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
    }


def cache_dir(cfg: Config, man: dict) -> Path:
    key = hashlib.sha256(json.dumps(man, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.data.precomputation_dir or Path(cfg.train.output_dir) / "precomputed")
    return root / key


def precompute(cfg: Config, usable: Usable, spec, comps, dataset: VideoDataset, max_seq: int, device) -> Path:
    """Fill (or reuse) the cache for `usable`; every rank takes part; returns the cache folder."""
    rank, world = dist.get_rank(), dist.get_world_size()
    man = manifest(cfg, usable, max_seq, bool(getattr(comps.vae, "use_tiling", False)))
    target = cache_dir(cfg, man)
    if (target / COMPLETE).is_file() and cfg.data.precomputation_reuse:
        log.info("precomputation: reusing %s (same data, model and settings)", target)
        return target
    if rank == 0:
        if target.exists():
            log.info("precomputation: %s exists; computing it again (--precomputation_reuse reuses it)", target)
            shutil.rmtree(target)
        target.mkdir(parents=True)
        others = [p for p in target.parent.iterdir() if p.is_dir() and p != target]
        if others:
            log.info("precomputation: %d other cache(s) in %s were made with other data or settings (not used)",
                     len(others), target.parent)  # fmt: skip
    dist.barrier()
    first: dict[str, int] = {}
    for i in range(len(usable.records)):
        first.setdefault(sample_key(usable, i), i)
    todo = list(first.items())[rank::world]
    t0 = time.perf_counter()
    bar = tqdm(total=len(first), disable=rank != 0, desc="precompute", dynamic_ncols=True)
    ids = {key: n for n, key in enumerate(first)}
    for key, i in todo:
        video = dataset._load(i, np.random.default_rng(0))[None].to(device)  # fixed crop: no draws are made
        params = spec.encode_latent_dist(comps, video)
        caption = dataset.caption_of(i)
        cond = spec.encode_text(comps, [caption], max_seq)
        tensors = {"latent_dist": params[0].contiguous().cpu()}
        tensors.update({f"text.{k}": v[0].contiguous().cpu() for k, v in cond.tensors.items()})
        save_file(tensors, target / f"{ids[key]:08d}.safetensors")
        bar.update(world)
    bar.close()
    if rank == 0:
        cond = spec.encode_text(comps, [""], max_seq)
        save_file({f"text.{k}": v[0].contiguous().cpu() for k, v in cond.tensors.items()}, target / EMPTY)
    dist.barrier()
    if rank == 0:
        man["files"] = {key: f"{n:08d}.safetensors" for key, n in ids.items()}
        (target / "manifest.json").write_text(json.dumps(man, indent=1))
        (target / COMPLETE).write_text("ok\n")
        log.info("precomputation: %d samples in %.1f s -> %s", len(first), time.perf_counter() - t0, target)
    dist.barrier()
    return target


class PrecomputedDataset(Dataset):
    """(index, position) -> the cached latent distribution and text embeddings of record `index`.

    Caption dropout draws from the same (seed, position) generator as VideoDataset, so a cached run drops the
    same captions as an on-the-fly one.
    """

    def __init__(self, usable: Usable, folder: Path, caption_dropout_p: float, seed: int):
        self.folder, self.p, self.seed = Path(folder), caption_dropout_p, seed
        files = json.loads((self.folder / "manifest.json").read_text())["files"]
        self.files = [files[sample_key(usable, i)] for i in range(len(usable.records))]
        for name in self.files:  # file names inside the cache folder, nothing elsewhere
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise UnsafeFileError(f"{self.folder / 'manifest.json'}: invalid cache file name {name!r}")
        self._empty: dict | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key[0], key[1]
        rng = np.random.default_rng([self.seed, position, 0xDA7A])
        item = load_safetensors(self.folder / self.files[index])
        if self.p and rng.random() < self.p:
            if self._empty is None:
                self._empty = load_safetensors(self.folder / EMPTY)
            item.update(self._empty)
        return {**item, "position": position, "index": index, "replaced": 0}
