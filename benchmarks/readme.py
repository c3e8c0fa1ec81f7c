"""README.md's figures, generated from benchmarks/results/ (issue 20).

Every figure in README.md sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, where NAME is one of
BLOCKS below; each block is rendered from files under benchmarks/results/ only and says where and when its
figures were measured, from the results file's "provenance" (fields in benchmarks/README.md).

    python benchmarks/readme.py            # rewrite those sections of README.md
    python benchmarks/readme.py --check    # exit 1 and print a diff when README.md differs from the results
    python benchmarks/readme.py --stamp benchmarks/results/memory.json --kind simulated \
        --command "python benchmarks/memory.py"    # after re-running a benchmark: record this machine, today, HEAD
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
MARKER = re.compile(r"<!-- results:([\w-]+) -->(.*?)<!-- /results:\1 -->", re.DOTALL)
KINDS = {"measured": "Measured", "simulated": "Simulated (no GPU)", "estimate": "Estimated"}
GIB = 2**30


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def where_when(name: str, data: dict | None = None, inline: bool = False) -> str:
    """'Measured 2026-11-22 on <machine>, <conditions>; commit abc1234; torch X; `benchmarks/results/<name>`'."""
    data = load(name) if data is None else data
    p = data.get("provenance")
    if not p or not all(p.get(k) for k in ("kind", "date", "machine")):
        sys.exit(
            f"benchmarks/results/{name} has no provenance (kind, date, machine): after re-running its "
            f"benchmark, run `python benchmarks/readme.py --stamp benchmarks/results/{name} --kind ...`"
        )
    kind = KINDS[p["kind"]].lower() if inline else KINDS[p["kind"]]
    parts = [f"{kind} {p['date']} on {p['machine']}" + (f", {p['conditions']}" if p.get("conditions") else "")]
    parts += [f"commit {p['commit']}"] if p.get("commit") else []
    parts += [f"torch {p['torch']}"] if p.get("torch") else []
    return "; ".join(parts + [f"`benchmarks/results/{name}`"])


def duration(s: float) -> str:
    s = round(s)
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def with_md(name: str) -> str:
    """A benchmark's own markdown (benchmarks/results/NAME.md), under the where/when line of NAME.json."""
    md = (RESULTS / f"{name}.md").read_text().strip()
    return f"*{where_when(f'{name}.json')}.*\n\n{md}"


def memory_effects() -> str:
    mem = load("memory.json")
    effect = {e["effect"].split(" (")[0]: e for e in mem["effects"]}
    ema, off = effect["EMA"], effect["FSDP CPU offload"]

    def params(e: dict) -> int:
        return next(
            r["params_trainable"]
            for r in mem["results"]
            if r["variant"] == e["variant"] and r["training_type"] == e["training_type"]
        )

    world = int(ema["layout"].split()[-1])
    text = (
        f"EMA adds one fp32 copy of the trainable weights' local shards "
        f"({(ema['with_bytes'] - ema['without_bytes']) / GIB:.2f} GiB = {params(ema) / 1e9:.2f}B x 4 bytes / "
        f"{world} ranks). With CPU offload the sharded parameters, gradients and optimizer state live in host "
        f"memory (about {params(off) * 16 / GIB:.0f} GiB of it here: 16 bytes per parameter), so the GPU keeps "
        f"the gathered block, activations and buffers; the step's optimizer then runs on the CPU. "
    )
    bf16, swap = effect.get("bf16 weights and moments"), effect.get("block swap, 40 blocks")
    if bf16:
        text += (
            f"`--full_bf16` keeps 8 bytes per parameter instead of 16 (bfloat16 weights, gradients and moments; "
            f"{bf16['without_bytes'] / GIB:.1f} -> {bf16['with_bytes'] / GIB:.1f} GiB for CogVideoX-5B on one GPU), "
            f"with stochastic rounding (drift: `benchmarks/results/bf16_drift.md`); 8-bit AdamW's state is planned "
            f"as bitsandbytes lays it out (the planner cannot run its CUDA kernels). "
        )
    if swap:
        text += (
            "Block swap keeps the swapped blocks' frozen weights in pinned host memory and one or two blocks on the "
            "GPU at a time (the cost is their host-to-device copy, twice per step). "
        )
    return text + f"({where_when('memory.json', mem)}.)"


def gpu_h200() -> str:
    gpu, mem = load("gpu_h200.json"), load("memory.json")
    planned = {(r["variant"], r["training_type"], r["world_size"]): r["peak_bytes"] / GIB for r in mem["results"]}
    head = (f"*{where_when('gpu_h200.json', gpu)}; planned then: the planner for the code that ran there; planned "
            f"now: `benchmarks/results/memory.json`.*")  # fmt: skip
    cols = ("model | type | GPUs | compile | planned then GiB | measured allocated GiB | measured / planned then "
            "| planned now GiB | reserved GiB | step s")  # fmt: skip
    lines = [f"{head} Settings: {gpu['settings']}.", "", f"| {cols} |", "|---" * (cols.count("|") + 1) + "|"]
    for r in gpu["rows"]:
        now, then = planned[(r["variant"], r["training_type"], r["world"])], r["planned_then_gib"]
        lines.append(
            f"| {r['variant']} | {r['training_type']} | {r['world']} | {'yes' if r['compile'] else 'no'} "
            f"| {then:.2f} | {r['peak_allocated_gib']} | {r['peak_allocated_gib'] / then - 1:+.0%} | {now:.2f} "
            f"| {r['peak_reserved_gib']} | {r['step_s']} |"
        )
    note = gpu["planned_then_note"]
    replay = ("Today's planner replays the code that ran there (FSDP2 in one process, foreach AdamW: "
              "`ptrain.planner.CodePath`) within 5% of each measured peak: a heavy test pins these three values "
              "(`tests/test_planner.py::test_planner_replays_the_h200_measurements_within_5_percent`).")
    return "\n".join(lines + ["", f"Where measured and planned differ: {gpu['finding']}. ({note}.) {replay}"])


def gpu_suite() -> str:
    """benchmarks/gpu.py's table (gpu.md under gpu.json's where/when) once measured; until then, says so."""
    if (RESULTS / "gpu.json").is_file() and (RESULTS / "gpu.md").is_file():
        return with_md("gpu")
    h200 = load("gpu_h200.json")["provenance"]["date"]
    return (
        "Not measured yet: no GPU has run `python benchmarks/gpu.py` (one GPU, the default rows in about 8 "
        "minutes; it writes `benchmarks/results/gpu.json` and `gpu.md`). Until then the only GPU figures are the "
        f"hand-measured ones above ({h200}, `benchmarks/results/gpu_h200.json`)."
    )


def _chaos_summary(name: str) -> str:
    """'DATE, MACHINE, commit C; from `benchmarks/results/NAME`): lora 20/20 identical (...); full ...' of a report."""
    text = (RESULTS / name).read_text()
    head = re.search(r"\(seed \d+\) on (.+?), (\d{4}-\d\d-\d\d)", text)
    trials = re.search(r"--trials (\d+)", text)
    commit = re.search(r"ptrain at commit (\w+)", text)
    runs = []
    for m in re.finditer(r"\*\*(\w+): (\d+)/(\d+) identical\*\* \((.*?)\)", text):
        so_far = f", {m[3]} of {trials[1]} trials so far" if trials and int(m[3]) < int(trials[1]) else ""
        runs.append(f"{m[1]} {m[2]}/{m[3]} identical ({m[4].split('; 0 with failures')[0]}{so_far})")
    if not head or not runs:
        sys.exit(f"benchmarks/results/{name}: no header line or no '**MODE: N/M identical**' summary line")
    at = f", commit {commit[1]}" if commit else ""
    return f"{head[2]}, {head[1]}{at}; from `benchmarks/results/{name}`): " + "; ".join(runs)


def chaos() -> str:
    """The summary lines of benchmarks/chaos.py's reports: the whole-run window, and the training window if run."""
    out = "Last run (" + _chaos_summary("chaos.md")
    if (RESULTS / "chaos_training.md").is_file():
        out += ". With the kill drawn between step 1 and the end (`--window training`; " + _chaos_summary(
            "chaos_training.md"
        ).replace("; from", "; from", 1)
    return out


def ci() -> str:
    c = load("ci.json")
    return (
        f"`{c['command']}` ran {c['tests']} tests in {duration(c['tests_s'])} and took {duration(c['total_s'])} "
        f"including creating the venv and installing ({where_when('ci.json', c, inline=True)})"
    )


def suite_time() -> str:
    c = load("suite.json")
    return (
        f"`{c['command']}` ran {c['tests']} tests ({c['skipped']} heavy ones skipped) in {duration(c['tests_s'])} "
        f"({where_when('suite.json', c, inline=True)})"
    )


def setup_time() -> str:
    c = load("ci.json")
    return (
        f"in the last CI run ({c['provenance']['date']}, `benchmarks/results/ci.json`) everything but the tests, "
        f"mostly this set-up, took {duration(c['total_s'] - c['tests_s'])}"
    )


def demo_time() -> str:
    t = load("timings.json")["demo"]
    return (
        f"The demo then took {duration(t['wall_s'])} (`{t['command']}`; {where_when('timings.json', t, inline=True)})"
    )


BLOCKS = {
    "memory": lambda: with_md("memory"),
    "memory-effects": memory_effects,
    "gpu-h200": gpu_h200,
    "gpu": gpu_suite,
    "throughput": lambda: with_md("throughput"),
    "data-throughput": lambda: with_md("data_throughput"),
    "chaos": chaos,
    "ci": ci,
    "suite-time": suite_time,
    "setup-time": setup_time,
    "demo-time": demo_time,
}


def regenerate(text: str) -> str:
    """README text with every marked section replaced by its block; unknown or missing names are errors."""
    found = [m[1] for m in MARKER.finditer(text)]
    unknown, missing = set(found) - set(BLOCKS), set(BLOCKS) - set(found)
    if unknown or missing:
        sys.exit(f"README.md markers: unknown {sorted(unknown)}, missing {sorted(missing)}")

    def render(m: re.Match) -> str:
        body = BLOCKS[m[1]]()
        body = f"\n{body}\n" if "\n" in body else body  # tables on their own lines, sentences inline
        return f"<!-- results:{m[1]} -->{body}<!-- /results:{m[1]} -->"

    return MARKER.sub(render, text)


def stamp(path: Path, kind: str, command: str) -> None:
    """Add this machine, today's date and HEAD as the "provenance" of a results JSON file."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    machine = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if torch.cuda.is_available():
        machine = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}; {machine}"

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    commit = git("rev-parse", "--short", "HEAD") + dirty
    data = json.loads(path.read_text())
    data["provenance"] = {
        "kind": kind,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "machine": machine,
        "torch": torch.__version__,
        "command": command,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{path}: provenance {data['provenance']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff if README.md is out of date")
    ap.add_argument("--stamp", type=Path, help="a results JSON file to record this machine, date and commit in")
    ap.add_argument("--kind", choices=sorted(KINDS), default="measured")
    ap.add_argument("--command", default="", help="the command that produced the --stamp file")
    args = ap.parse_args()
    if args.stamp:
        return stamp(args.stamp, args.kind, args.command)
    old = README.read_text()
    new = regenerate(old)
    if args.check:
        if new != old:
            sys.stdout.writelines(
                difflib.unified_diff(
                    old.splitlines(True), new.splitlines(True), "README.md", "README.md (from benchmarks/results)"
                )
            )
            sys.exit("README.md differs from benchmarks/results/: run `python benchmarks/readme.py`")
        print("README.md matches benchmarks/results/")
    elif new != old:
        README.write_text(new)
        print("README.md regenerated from benchmarks/results/")
    else:
        print("README.md already matches benchmarks/results/")


if __name__ == "__main__":
    main()
