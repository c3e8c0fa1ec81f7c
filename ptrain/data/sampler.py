"""Deterministic, layout-independent global batch order.

The samples form one endless stream: epoch e is a permutation of the dataset
seeded by (seed, e), epochs concatenated. Optimizer step s consumes stream
positions [s*G, (s+1)*G) with G = batch_size x dp x gradient_accumulation_steps.
Within a step, micro-batch m of data-parallel rank r takes positions
s*G + m*(batch_size*dp) + r*batch_size + [0, batch_size).

So for a seed and a global batch size the samples of every step are the same
whatever dp_degree x dp_shards is, and each sample's position (which seeds its
noise and timestep) is too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> list[int]:
    state = np.random.SeedSequence([seed, 0x5A3D, epoch]).generate_state(1, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]))
    return torch.randperm(num_samples, generator=g).tolist()


class GlobalBatchSampler:
    """Batch sampler for one data-parallel rank: yields [(dataset index, stream position), ...]."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        grad_accum: int,
        seed: int,
        base_position: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError("no usable samples")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.dp_rank, self.dp_size, self.grad_accum = dp_rank, dp_size, grad_accum
        self.base_position = base_position  # stream position of micro-batch 0 (non-zero after a resharded resume)
        self.micro_batches_done = 0
        self._perm_epoch, self._perm = -1, []

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.dp_size * self.grad_accum

    def positions(self, micro_batch: int) -> range:
        step, m = divmod(micro_batch, self.grad_accum)
        start = (
            self.base_position
            + step * self.global_batch_size
            + m * self.batch_size * self.dp_size
            + self.dp_rank * self.batch_size
        )
        return range(start, start + self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch_size)

    def index_at(self, position: int) -> int:
        epoch, i = divmod(position, self.num_samples)
        if epoch != self._perm_epoch:
            self._perm_epoch, self._perm = epoch, epoch_permutation(self.num_samples, self.seed, epoch)
        return self._perm[i]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            batch = [(self.index_at(p), p) for p in self.positions(self.micro_batches_done)]
            self.micro_batches_done += 1
            yield batch

    def state_dict(self) -> dict:
        return {"micro_batches_done": self.micro_batches_done, "base_position": self.base_position}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batches_done = int(state["micro_batches_done"])
        self.base_position = int(state.get("base_position", 0))


class BucketBatchSampler(GlobalBatchSampler):
    """The bucketed variant: every global batch holds samples of one bucket shape.

    Epoch e: the dataset permutation of (seed, e) is split by bucket (order kept), each bucket's list is cut
    into global batches of G samples (the last one filled up by cycling that bucket's list from its start, so
    no sample is dropped), and the batches are shuffled with (seed, e). Step s takes batch s mod S of epoch
    s // S (S batches per epoch, fixed); its slot j has stream position s*G + j and is dealt to micro-batches
    and ranks as in GlobalBatchSampler. So every rank of a step gets the same bucket, and the samples of
    every step are the same whatever the layout for a seed and global batch size.
    """

    def __init__(self, bucket_ids: list[int], batch_size, dp_rank, dp_size, grad_accum, seed, base_position=0):
        super().__init__(len(bucket_ids), batch_size, dp_rank, dp_size, grad_accum, seed, base_position)
        self.bucket_ids = list(bucket_ids)
        counts: dict[int, int] = {}
        for b in self.bucket_ids:
            counts[b] = counts.get(b, 0) + 1
        g = self.global_batch_size
        self._steps_per_epoch = sum(-(-n // g) for n in counts.values())
        self._epoch_batches: tuple[int, list[list[int]]] = (-1, [])

    @property
    def steps_per_epoch(self) -> int:
        return self._steps_per_epoch

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch_batches[0] != epoch:
            g = self.global_batch_size
            by_bucket: dict[int, list[int]] = {}
            for i in epoch_permutation(self.num_samples, self.seed, epoch):
                by_bucket.setdefault(self.bucket_ids[i], []).append(i)
            batches = []
            for b in sorted(by_bucket):
                items = by_bucket[b]
                for start in range(0, len(items), g):
                    chunk = items[start : start + g]
                    chunk += [items[k % len(items)] for k in range(g - len(chunk))]
                    batches.append(chunk)
            state = np.random.SeedSequence([self.seed, 0xB0C7, epoch]).generate_state(1, dtype=np.uint32)
            order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(int(state[0]))).tolist()
            self._epoch_batches = (epoch, [batches[k] for k in order])
        return self._epoch_batches[1]

    def index_at(self, position: int) -> int:
        step, slot = divmod(position, self.global_batch_size)
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._batches(epoch)[k][slot]
