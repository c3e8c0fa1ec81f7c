"""benchmarks/gpu.py (issue 15 item 1): the plan on the CPU (--dry_run, --list, --only), and the whole suite
end to end in its CPU mode on tiny checkpoints (precompute pass, timed ptrain run, bare loop, planner, results)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import gpu
from benchmarks.memory import RES


def suite(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/gpu.py", *args],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dry_run_lists_every_row_with_its_budget_within_8_minutes():
    t0 = time.perf_counter()
    run = suite("--dry_run")
    assert run.returncode == 0, run.stderr
    assert time.perf_counter() - t0 < 30  # no model is built
    for row in gpu.ROWS:
        line = next(x for x in run.stdout.splitlines() if f"] {row.name}:" in x)
        assert f"budget {gpu.budget_s(row)} s" in line and f"estimated {row.est_s} s" in line
        assert ("[run ]" in line) == row.default
    total = int(re.search(r"estimated total: (\d+) s", run.stdout)[1])
    assert total == gpu.estimate_s([r for r in gpu.ROWS if r.default]) <= 8 * 60
    assert "within the 8-minute limit" in run.stdout
    assert "--model_name cogvideox" in run.stdout and "--layerwise_upcasting_modules transformer" in run.stdout
    # the rows outside the default run are packed into further calls that each fit the limit
    calls = [int(m) for m in re.findall(r"^  (\d+) s: python benchmarks/gpu.py", run.stdout, re.MULTILINE)]
    assert calls and all(c <= 8 * 60 for c in calls)
    assert sum(len(c) for c in gpu.split_calls([r for r in gpu.ROWS if not r.default])) == sum(
        not r.default for r in gpu.ROWS
    )


def test_rows_cover_the_issue():
    names = {r.name for r in gpu.ROWS}
    assert {"cogvideox5b-lora-ac", "ltx-lora-ac", "wan1.3b-lora-ac", "cogvideox5b-full-ac"} <= names
    assert {"ltx-lora-noac", "wan1.3b-lora-noac", "cogvideox5b-lora-noac"} <= names
    hunyuan = [r for r in gpu.ROWS if r.variant == "hunyuan-video"]
    assert any(r.cap_gib == 24 and "--layerwise_upcasting_modules" in r.extra for r in hunyuan)
    assert any(r.cap_gib == 24 and "--blocks_to_swap" in r.extra for r in hunyuan)
    for r in gpu.ROWS:
        assert (gpu.CONFIGS / r.variant / "transformer" / "config.json").is_file(), r.name
        assert r.frames_hw == RES[r.variant], r.name  # the resolutions of benchmarks/memory.py


def test_list_and_only():
    run = suite("--list")
    assert run.returncode == 0, run.stderr
    assert [line.split()[0] for line in run.stdout.splitlines()] == [r.name for r in gpu.ROWS]
    run = suite("--dry_run", "--only", "wan1.3b-lora-noac", "--only", "ltx-lora-ac")
    assert run.returncode == 0, run.stderr
    ran = re.findall(r"\[run \] (\S+):", run.stdout)
    assert ran == ["wan1.3b-lora-noac", "ltx-lora-ac"]  # in the order given
    assert f"for {len(ran)} rows" in run.stdout
    run = suite("--dry_run", "--only", "no-such-row")
    assert run.returncode != 0 and "no such row" in run.stderr and "ltx-lora-ac" in run.stderr
    run = suite("--dry_run", "--set", "all")
    assert len(re.findall(r"\[run \]", run.stdout)) == len(gpu.ROWS)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine")
def test_without_a_gpu_it_says_so(tmp_path):
    run = suite("--out", str(tmp_path / "out"), "--only", "ltx-lora-ac")
    assert run.returncode != 0 and "no NVIDIA GPU" in run.stderr
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.heavy  # about a minute: CI runs it
def test_cpu_mode_end_to_end(tmp_path):
    """The suite's whole path on the tiny LTX-Video checkpoint: results files with every recorded field."""
    out, work = tmp_path / "out", tmp_path / "work"
    t0 = time.perf_counter()
    run = suite("--cpu", "--out", str(out), "--work", str(work), "--peak_tflops", "0.05", timeout=300)
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    assert data["mode"].startswith("cpu") and data["window_steps"] == gpu.WINDOW["cpu"]
    (row,) = data["rows"]
    assert row["row"] == "cpu-ltx-lora-ac" and row["status"] == "ok", row["status"]
    t, b = row["trainer"], row["bare"]
    assert t["cache_reused"], "the timed run must reuse the precompute pass's cache"
    for k in ("step_s", "first_window_step_s", "peak_allocated_gib", "peak_reserved_gib", "forward_s", "optimizer_s"):
        assert isinstance(t[k], float), k
    assert t["compile_s"] is None and b["compile_s"] is None  # not compiled
    # ptrain's own `mfu` counts the model's FLOPs (no AC recompute): the bare loop's model FLOPs; `hfu` adds it
    assert t["mfu_logged"] > 0 and t["tflops_per_step_logged"] == pytest.approx(row["model_tflop_per_step"])
    assert t["hfu_logged"] > t["mfu_logged"]
    assert t["steps_timed"] == b["steps_timed"] == gpu.WINDOW["cpu"] * gpu.WINDOWS["cpu"]
    for k in ("step_s", "forward_s", "backward_s", "optimizer_s", "peak_allocated_gib", "first_window_step_s"):
        assert isinstance(b[k], float), k
    assert b["model_flops"] > 0 and b["recompute_flops"] > 0  # full AC: the backward recomputes the blocks
    assert b["hw_flops"] == b["model_flops"] + b["recompute_flops"]
    assert row["device"].startswith("CPU") and row["torch"]
    assert row["trainer_over_bare"] > 0 and 0 < row["mfu_trainer"] < row["hfu_trainer"]
    assert row["planner"]["peak_gib"] > 0 and row["planner"]["layout"].startswith("single process")
    assert row["planner_error_pct"] is None  # on the CPU ptrain's peak is the resident set: not comparable
    md = (out / "gpu.md").read_text()
    assert "| cpu-ltx-lora-ac | yes | no |" in md and "ok |" in md
    (check,) = data["checks"]  # the ring attention check ran first, at its tiny CPU shape
    assert check["check"] == "ring-attention" and check["status"] == "ok", check["status"]
    assert "| ring-attention |" in md
    # ptrain's warnings come back with the row (a fallback changes what it measured) and are said in gpu.md
    assert isinstance(t["warnings"], list) and "warnings in" not in md
    t["warnings"] = ["--full_bf16: compiling the optimizer update failed (X: y); it runs eager from now on"]
    assert "ptrain's warnings in `cpu-ltx-lora-ac`:\n\n- --full_bf16: compiling" in gpu.markdown(data)
    assert wall < 240, f"CPU mode took {wall:.0f} s"


@pytest.mark.slow
@pytest.mark.heavy  # about 90 s: CI runs it
def test_cpu_mode_in_bfloat16_runs_the_gpus_dtype_path(tmp_path):
    """--cpu_dtype bfloat16: bf16 components for ptrain, a bf16 model under autocast for the bare loop, as on a GPU
    (the first GPU call's bare loop fed float32 inputs to the bf16 model; the float32 CPU mode could not show it)."""
    out = tmp_path / "out"
    rows = ["cpu-ltx-lora-ac", "cpu-ltx-full-bf16-ac", "cpu-ltx-lora-ac-fp8"]  # + --full_bf16's and FP8's paths
    run = suite("--cpu", "--cpu_dtype", "bfloat16", "--no_checks", "--out", str(out), "--work", str(tmp_path / "w"),
                "--peak_tflops", "0.05", *[a for r in rows for a in ("--only", r)], timeout=400)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    assert data["dtype"] == "bfloat16"
    assert [r["row"] for r in data["rows"]] == rows
    for row in data["rows"]:
        assert row["status"] == "ok", (row["row"], row["status"])
        assert row["trainer"]["step_s"] > 0 and row["bare"]["step_s"] > 0 and row["bare"]["model_flops"] > 0
        assert "--transformer_dtype bfloat16" in " ".join(row["flags"])
    assert "bfloat16, batch 1" in (out / "gpu.md").read_text()


def test_cpu_dtype_is_for_the_cpu_mode():
    run = suite("--cpu_dtype", "bfloat16", "--dry_run")
    assert run.returncode != 0 and "--cpu_dtype is for --cpu" in run.stderr


def test_ring_attention_check_in_cpu_mode(tmp_path):
    """The suite's one-process ring check (a subprocess, as on the GPU) at its tiny CPU shape: recorded in gpu.json
    with both cases, rendered in gpu.md."""
    args = argparse.Namespace(cpu=True, out=str(tmp_path / "out"), work=str(tmp_path / "w"), deadline_s=120,
                              no_checks=False, peak_tflops=None)  # fmt: skip
    gpu.Suite(args, []).run_ring_check()
    data = json.loads((tmp_path / "out" / "gpu.json").read_text())
    (check,) = data["checks"]
    assert check["status"] == "ok" and check["device"] == "CPU", check["status"]
    assert [c["shape"]["text_mask"] for c in check["cases"]] == [False, True]
    assert all(c["ok"] and c["kernels"] for c in check["cases"])
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "| ring-attention | 2 heads x 16, 6 text + 37 video, cp 2, float32; CPU |" in md
    assert "| ring-attention | 2 heads x 16, 6 text + 37 video, cp 2, float32, text mask; CPU |" in md


def test_a_run_past_its_deadline_still_writes_results(tmp_path):
    """Rows that no longer fit the deadline are recorded as not run; gpu.json and gpu.md are written anyway."""
    out = tmp_path / "out"
    run = suite("--cpu", "--set", "all", "--deadline_s", "1", "--out", str(out), "--work", str(tmp_path / "w"),
                timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads((out / "gpu.json").read_text())["rows"]
    assert [r["row"] for r in rows] == [r.name for r in gpu.CPU_ROWS]
    assert all(r["status"].startswith("not run:") and "trainer" not in r for r in rows)
    (check,) = json.loads((out / "gpu.json").read_text())["checks"]
    assert check["status"].startswith("not run:")
    md = (out / "gpu.md").read_text()
    assert all(f"| {r.name} |" in md for r in gpu.CPU_ROWS) and "not run" in md


def test_measured_results_render_ptrain_figures_without_a_bare_loop():
    """benchmarks/results/gpu.json (measured on an H200): a row whose bare loop failed keeps ptrain's step time,
    peaks, planner error and logged mfu / hfu, with '-' where the bare loop's figures would be."""
    data = json.loads((gpu.RESULTS / "gpu.json").read_text())
    assert data["provenance"]["kind"] == "measured" and "H200" in data["provenance"]["machine"]
    md = gpu.markdown(data)
    for r in data["rows"]:
        line = next(line for line in md.splitlines() if line.startswith(f"| {r['row']} |"))
        t = r["trainer"]
        assert f"{t['step_s']:.3f} (" in line and f"{t['peak_allocated_gib']:.2f} / " in line, line
        if "bare" in r:
            assert f"| {r['trainer_over_bare']:.2f} |" in line, line
        else:
            assert "| - | - |" in line and "(logged)" in line, line
    assert md == (gpu.RESULTS / "gpu.md").read_text(), "gpu.md is gpu.json rendered: regenerate it"


@pytest.mark.slow
@pytest.mark.heavy  # a tiny ptrain run (~20 s)
def test_a_failed_bare_loop_keeps_ptrains_figures(tmp_path, monkeypatch):
    """If the bare loop fails (as it did on the first GPU call: a dtype bug), the row keeps ptrain's measured run
    and says why there is no ratio. The same run checks --profile."""

    def broken_bare(self, row, ckpt, cache, limit):
        raise RuntimeError("bare loop failed (rc 1, 1 s):\nRuntimeError: planted")

    monkeypatch.setattr(gpu.Suite, "bare", broken_bare)
    args = argparse.Namespace(cpu=True, out=str(tmp_path / "out"), work=str(tmp_path / "w"), deadline_s=200,
                              no_checks=True, peak_tflops=None, repeat=1, profile=True)  # fmt: skip
    gpu.Suite(args, [gpu.CPU_ROWS[0]]).run()
    (row,) = json.loads((tmp_path / "out" / "gpu.json").read_text())["rows"]
    assert row["status"].startswith("failed: bare loop failed") and "ptrain's figures are kept" in row["status"]
    t = row["trainer"]
    assert t["step_s"] > 0 and "bare" not in row and "trainer_over_bare" not in row
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "(logged)" in md
    # --profile (the same run): one more window under torch.profiler, not timed; its top operators recorded
    assert t["steps_timed"] == gpu.WINDOW["cpu"] * gpu.WINDOWS["cpu"]
    assert any("aten::" in line for line in t["profile_ops"]) and "Top operators of `cpu-ltx-lora-ac`" in md
    prof = t["profile_summary"]  # per profiled step: wall time, launches, operators; no device timeline on a CPU
    assert prof["steps"] == 3 and prof["wall_s_per_step"] > 0 and prof["aten_ops_per_step"] > 100
    assert prof["device_busy"] is None and prof["device_busy_vs_timed_step"] is None
    assert "aten operators." in md


def test_memory_table_shows_the_gpu_measurements_beside_the_plan():
    """benchmarks/memory.py's tables take the GPU suite's measured peaks (gpu.json) for the rows of the same model,
    type, size and options (issue 16 item 8), and memory.md is that rendering."""
    from benchmarks import memory

    measured = memory.measured_on_gpu()
    data = json.loads((gpu.RESULTS / "gpu.json").read_text())
    rows = {r.name: r for r in gpu.ROWS}
    for g in data["rows"]:
        if "trainer" not in g:
            continue
        extra = tuple(rows[g["row"]].extra)
        key = (g["variant"], g["training_type"], extra if g["ac"] else ("--no_gradient_checkpointing", *extra))
        t = g["trainer"]
        assert measured[key] == f"{t['peak_allocated_gib']:.2f} / {t['peak_reserved_gib']:.2f}", g["row"]
    rendered = memory.render(json.loads((gpu.RESULTS / "memory.json").read_text()))
    cog = next(line for line in rendered.splitlines() if line.startswith("| cogvideox-5b | lora | 49x480x720 | single"))
    assert f"| {measured[('cogvideox-5b', 'lora', ())]} |" in cog
    assert "Measured on GPU:" in rendered and "H200" in rendered
    assert rendered in (gpu.RESULTS / "memory.md").read_text(), "memory.md is stale: python benchmarks/memory.py --render"


def test_gpu_children_get_ptrains_allocator_default(monkeypatch):
    """The CUDA review: a capped row's worker starts CUDA (the cap) before ptrain could set expandable segments,
    and the bare loop never had them. Every GPU child now starts with ptrain's default, unless the user set one."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert gpu.child_env(cpu=False, cap_gib=24)["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "PYTORCH_ALLOC_CONF" not in gpu.child_env(cpu=True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    env = gpu.child_env(cpu=False)
    assert "PYTORCH_ALLOC_CONF" not in env and env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"


@pytest.mark.heavy  # about 25 s: CI runs it
def test_a_sigterm_writes_the_results_and_kills_the_runs(tmp_path):
    """The device call's `timeout` sends SIGTERM: the suite kills its running children (no run keeps the GPU),
    writes gpu.json / gpu.md with what it has, and exits 124 as `timeout` would."""
    import os
    import signal

    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "benchmarks/gpu.py", "--cpu", "--only", "cpu-ltx-lora-ac", "--no_checks",
                             "--out", str(out), "--work", str(work)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip

    def children() -> list[str]:
        ps = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()
        return [line for line in ps if str(work) in line and "gpu.py --cpu --only" not in line]

    try:
        deadline = time.perf_counter() + 180
        while not children() and time.perf_counter() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert children(), "no child started"
        os.kill(proc.pid, signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 124, text[-2000:]
    assert "terminated (signal 15)" in text and json.loads((out / "gpu.json").read_text())["mode"].startswith("cpu")
    assert (out / "gpu.md").is_file()
    time.sleep(1)
    assert children() == []


def test_a_sigterm_while_a_child_starts_waits_until_it_is_known(tmp_path):
    """A SIGTERM handled between Popen returning and the child entering CHILDREN would leave that run on the GPU
    (from a review): Suite.terminated defers itself while spawn() is starting a child, and spawn() runs it once the
    child is known."""
    import os
    import types

    seen = []
    owner = types.SimpleNamespace(terminated=lambda signum, frame: seen.append((signum, set(gpu.CHILDREN))))
    gpu.SPAWNING.busy = True
    try:
        gpu.Suite.terminated(owner, 15, None)  # as if it arrived while spawn() was busy: held back, no exit
    finally:
        gpu.SPAWNING.busy = False
    assert seen == [] and gpu.SPAWNING.pending is not None
    p = gpu.spawn(["true"], dict(os.environ), tmp_path / "child.log")
    try:
        # handled once spawn() knew the child (CHILDREN may also hold an earlier test's finished planner child)
        assert [signum for signum, _ in seen] == [15] and p in seen[0][1] and gpu.SPAWNING.pending is None
    finally:
        p.wait()
        gpu.CHILDREN.discard(p)
