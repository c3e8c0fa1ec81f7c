"""Training metrics: output_dir/metrics.jsonl (one object per logged step) and tensorboard under output_dir/logs."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) in GiB. On CPU both are the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    gb = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    return gb, gb


class MetricsWriter:
    """Only the process that owns it writes (rank 0); every call is a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, append: bool = False):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(output_dir / "metrics.jsonl", "a" if append else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "logs"))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf" stay visible instead of producing invalid JSON
    return v
