"""Data path: sources -> probe/filter -> decode -> global-batch sampler -> StatefulDataLoader."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ptrain.config import ConfigError, DataArgs
from ptrain.data.sampler import GlobalBatchSampler
from ptrain.data.sources import Record, load_records
from ptrain.data.video import FrameSampling, load_clip, probe

log = logging.getLogger("ptrain")


@dataclass
class Usable:
    records: list[Record]
    skipped: dict[str, str]  # path -> reason


def filter_usable(records: list[Record], sampling: FrameSampling | int) -> Usable:
    """Probe every video (split over ranks when distributed); drop and count the unusable ones."""
    if isinstance(sampling, int):
        sampling = FrameSampling(sampling)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {}
    for i in range(rank, len(records), world):
        try:
            info = probe(records[i].video)
            have = sampling.available(info.num_frames, info.fps)
            if have < sampling.num_frames:
                how = "" if have == info.num_frames else f" usable of {info.num_frames} ({sampling.describe()})"
                mine[i] = f"{have} frames{how} < --num_frames {sampling.num_frames}"
        except (OSError, ValueError) as e:
            mine[i] = str(e)
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        bad = {k: v for part in gathered for k, v in part.items()}
    else:
        bad = mine
    usable = [r for i, r in enumerate(records) if i not in bad]
    return Usable(usable, {str(records[i].video): reason for i, reason in sorted(bad.items())})


class VideoDataset(Dataset):
    def __init__(self, records: list[Record], args: DataArgs, sampling: FrameSampling, seed: int = 0):
        self.records, self.args, self.sampling, self.seed = records, args, sampling, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, position = key
        rec = self.records[index]
        a = self.args
        # Per-sample randomness (crop offset, caption dropout) from (seed, position): same in every layout.
        rng = np.random.default_rng([self.seed, position, 0xDA7A])
        caption = f"{a.id_token} {rec.caption}" if a.id_token else rec.caption
        if a.caption_dropout_p and rng.random() < a.caption_dropout_p:
            caption = ""
        return {
            "video": load_clip(rec.video, self.sampling, a.height, a.width, reshape_mode=a.reshape_mode, rng=rng),
            "caption": caption,
            "position": position,
            "index": index,
        }


def scan_dataset(args: DataArgs, sampling: FrameSampling) -> Usable:
    """Read the dataset description and probe every video; log and count what is skipped."""
    records = load_records(args)
    usable = filter_usable(records, sampling)
    if usable.skipped:
        log.warning("skipping %d of %d videos:", len(usable.skipped), len(records))
        for path, reason in list(usable.skipped.items())[:20]:
            log.warning("  %s: %s", path, reason)
        if len(usable.skipped) > 20:
            log.warning("  ... and %d more", len(usable.skipped) - 20)
    if not usable.records:
        raise ConfigError(f"none of the {len(records)} videos is usable (see the reasons above)")
    return usable


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
) -> tuple[StatefulDataLoader, GlobalBatchSampler]:
    """The loader of one data-parallel rank; `sampler_state` positions it in the sample stream (resume)."""
    sampler = GlobalBatchSampler(len(usable.records), batch_size, dp_rank, dp_size, grad_accum, seed)
    if sampler_state:
        sampler.load_state_dict(sampler_state)
    loader = StatefulDataLoader(
        VideoDataset(usable.records, args, sampling, seed),
        batch_sampler=sampler,
        num_workers=args.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,
    )
    return loader, sampler
