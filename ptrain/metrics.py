"""Training metrics: output_dir/metrics.jsonl (one object per logged step) and tensorboard under output_dir/logs."""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import sys
from pathlib import Path

import torch

#: Dense bf16 TFLOP/s per device (published specs; see ../shared/reference/published_numbers.md).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    """--peak_tflops, or the known peak of this GPU model, or None (no MFU)."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


def peak_memory_gb(device: torch.device) -> tuple[float, float]:
    """(peak allocated, peak reserved) in GiB. On CPU both are the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    gb = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    return gb, gb


class MetricsWriter:
    """Only the process that owns it writes (rank 0); every call is a no-op elsewhere."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None = None,
                 wandb_config: dict | None = None):  # fmt: skip
        """resume_step: keep the rows (and tensorboard events) up to this step and continue after it.
        wandb_config: the run's flags; given, the metrics also go to a Weights & Biases run (--report_to wandb)."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if wandb_config is not None:
            self._wandb = _start_wandb(output_dir, wandb_config, resume_step is not None)
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and path.exists():  # drop rows of steps that the resumed run redoes
            for row in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(row)["step"] <= resume_step:
                        kept.append(row)
                except (ValueError, KeyError, TypeError):  # a row cut off by a kill mid-write
                    continue
        # Replaced whole (a kill here leaves the old file or the new one, never a truncated one), then appended to.
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(row + "\n" for row in kept), encoding="utf-8")
        os.replace(tmp, path)
        self._file = open(path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self._tb = SummaryWriter(log_dir=str(output_dir / "logs"), purge_step=purge)

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"train/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def log_image(self, tag: str, image_hwc, step: int) -> None:
        """An (H, W, 3) float image in [0, 1] (e.g. a validation frame) to tensorboard."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(tag, image_hwc, step, dataformats="HWC")
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image_hwc)}, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


WANDB_RUN_ID = "wandb_run_id"


def _start_wandb(output_dir: Path, config: dict, resumed: bool):
    """A wandb run in output_dir/wandb (project WANDB_PROJECT or ptrain; WANDB_MODE=offline is wandb's own). A
    resumed training run continues its wandb run (the id kept in output_dir/wandb_run_id), not a new one per
    restart; wandb drops the rows of steps it already has (a resume from an earlier checkpoint redoes them)."""
    try:
        import wandb
    except ImportError as e:
        from ptrain.errors import ConfigError

        raise ConfigError("--report_to wandb: wandb is not installed: pip install 'ptrain[wandb]'") from e
    id_file = output_dir / WANDB_RUN_ID
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    if not run_id:
        run_id = secrets.token_hex(4)  # wandb's ids: lowercase letters and digits
        output_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "ptrain"), dir=str(output_dir), config=config,
                      name=output_dir.name, id=run_id, resume="allow")  # fmt: skip


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan"/"inf" stay visible instead of producing invalid JSON
    return v
