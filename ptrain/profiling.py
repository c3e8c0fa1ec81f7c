"""--profile_from_step N: torch.profiler over K training steps (--profile_num_steps), written where a user looks.

Every rank writes, under output_dir/profile/:
  - `trace_rank{R}.json`: the Chrome / Perfetto trace of those steps (chrome://tracing, https://ui.perfetto.dev),
  - `ops_rank{R}.txt`: torch's operator table, sorted by self device time on a GPU (self CPU time on a CPU).
The profiled steps run as any others (the same host syncs: none between logging steps); the profiler's own
overhead makes them slower, so the step times logged for them are not the run's. A run that ends inside the
window still writes what was recorded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger("ptrain")

#: Rows of the operator table.
OPS_ROWS = 40


class StepProfiler:
    """Starts torch.profiler before step `start` and stops after step `start + count - 1` (start 0: off)."""

    def __init__(self, start: int, count: int, out_dir: Path, rank: int, device: torch.device):
        self.start, self.end = start, start + count - 1
        self.out, self.rank, self.device = Path(out_dir) / "profile", rank, device
        self.prof: torch.profiler.profile | None = None
        self.started = False

    def step_begin(self, step: int) -> None:
        if not self.start or step != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self.prof.__enter__()
        self.started = True
        log.info("profiling steps %d-%d (torch.profiler; these steps run slower)", self.start, self.end)

    def step_end(self, step: int) -> None:
        if self.prof is not None and step >= self.end:
            self.close()

    def close(self, last_step: int | None = None) -> None:
        """Stop (if running) and write the trace and the operator table; at the run's end (`last_step`), say so if
        the window was never reached (a resumed run past it, or fewer steps)."""
        if self.prof is None:
            if last_step is not None and self.start and not self.started:
                log.warning("--profile_from_step %d: the run ran steps up to %d only (or resumed past it): nothing "
                            "profiled", self.start, last_step)  # fmt: skip
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the window's kernels finish inside it
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.out.mkdir(parents=True, exist_ok=True)
        trace, ops = self.out / f"trace_rank{self.rank}.json", self.out / f"ops_rank{self.rank}.txt"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        ops.write_text(prof.key_averages().table(sort_by=key, row_limit=OPS_ROWS) + "\n")
        log.info("profile of steps %d-%d: %s (trace), %s (operators by %s)", self.start, self.end, trace, ops, key)
