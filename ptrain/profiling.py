"""--profile_from_step N: torch.profiler over K training steps (--profile_num_steps), written where a user looks.

Every rank writes, under output_dir/profile/:
  - `trace_rank{R}.json`: the Chrome / Perfetto trace of those steps (chrome://tracing, https://ui.perfetto.dev),
  - `ops_rank{R}.txt`: torch's operator table, sorted by self device time on a GPU (self CPU time on a CPU),
  - `summary_rank{R}.json`: per step of the window: its wall time, the time the device was busy (the union of
    its kernels', copies' and memsets' intervals) and its share of the wall time, kernel launches and aten
    operators. A device
    much less busy than the wall time says the host (Python, dispatch, launches) bounds the step, not the kernels;
    the profiler's own host overhead lowers that ratio somewhat.
The profiled steps run as any others (the same host syncs: none between logging steps); the profiler's own
overhead makes them slower, so the step times logged for them are not the run's. A run that ends inside the
window still writes what was recorded.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("ptrain")

#: Rows of the operator table.
OPS_ROWS = 40
#: The CUDA runtime / driver calls that launch a kernel, as torch.profiler names them.
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")


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
        self._sync()  # the window's wall time starts with an idle device
        self.t0 = time.perf_counter()
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
        self._sync()  # the window's kernels finish inside it
        wall = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        steps = (last_step if last_step is not None else self.end) - self.start + 1
        self.out.mkdir(parents=True, exist_ok=True)
        trace, ops = self.out / f"trace_rank{self.rank}.json", self.out / f"ops_rank{self.rank}.txt"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        ops.write_text(averages.table(sort_by=key, row_limit=OPS_ROWS) + "\n")
        device_us = None
        if self.device.type == "cuda":  # the device's own events (kernels, copies, memsets) as intervals
            from torch.autograd import DeviceType

            spans = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
            device_us = busy_us(spans) if spans else None  # none recorded (CUPTI unavailable): unknown, not idle
        summary = self.summary(averages, wall, max(1, min(steps, self.end - self.start + 1)), device_us)
        (self.out / f"summary_rank{self.rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        log.info("profile of steps %d-%d: %s (trace), %s (operators by %s)", self.start, self.end, trace, ops, key)
        busy = summary["device_busy"]
        log.info("profiled window: %.1f ms per step%s; %d kernel launches and %d aten operators per step",
                 1000 * summary["wall_s_per_step"],
                 f", the device busy {100 * busy:.0f}% of it ({1000 * summary['device_s_per_step']:.1f} ms)"
                 if busy is not None else "", summary["kernel_launches_per_step"], summary["aten_ops_per_step"])  # fmt: skip

    @staticmethod
    def summary(averages, wall: float, steps: int, device_us: float | None) -> dict:
        """Per step of the window: wall time, the time the device was busy (`device_us` over the window; None on a
        CPU) and its share of the wall time, kernel launches, aten operators (every level: inner ops count too)."""
        kernel_s = None if device_us is None else device_us / 1e6
        launches = sum(e.count for e in averages if e.key in LAUNCHES)
        aten = sum(e.count for e in averages if e.key.startswith("aten::"))
        return {"steps": steps, "wall_s_per_step": wall / steps,
                "device_s_per_step": None if kernel_s is None else kernel_s / steps,
                "device_busy": None if kernel_s is None else kernel_s / wall,
                "kernel_launches_per_step": round(launches / steps), "aten_ops_per_step": round(aten / steps)}  # fmt: skip

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) intervals: the time the device ran anything, counting overlapping
    kernels (several streams) or an event listed twice once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total
