"""Per-GPU peak memory of one ptrain training step, per model / training type / layout — simulated, no GPU needed.

Every row runs ptrain's own set-up and step (ptrain.planner: fake tensors, a fake process group of the row's
world size, torch.distributed._tools memory trackers) on the full-size configs in benchmarks/model_configs/,
3 and 4 blocks per block list extrapolated to the real depth (tests/test_planner.py checks the extrapolation).
Beside each row: published figures of other trainers for the same settings, where there are any
(../shared/reference/published_numbers.md, sources named), and issue 8's lower-bound estimate (sharded
parameters + gradients + optimizer state + one gathered block + the saved block inputs; the simulated peak can
fall below it when the optimizer phase peaks, since activations are gone then).

    python benchmarks/memory.py                    # default matrix: every model, ~5-10 min on a 2-core CPU
    python benchmarks/memory.py --only ltx-video   # rows of one variant
    python benchmarks/memory.py --json out.json --markdown out.md

The table is the step's peak (`peak_bytes`); the planner's other phases (start-up, precompute / VAE encode,
validation) and its reserved estimate are in `python -m ptrain.planner`'s output (left out here: vae_phases=False).
Not modelled: CUDA context, caching-allocator slack (reserved > allocated), NCCL buffers, kernel workspaces.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptrain.planner import GIB, encoder_bytes, plan  # noqa: E402

CONFIGS = REPO / "benchmarks" / "model_configs"
RESULTS = REPO / "benchmarks" / "results"

RES = {
    "cogvideox-2b": (49, 480, 720),
    "cogvideox-5b": (49, 480, 720),
    # 85 frames = 22 latent frames: CogVideoX 1.5 needs an even count; CogVideo's scripts pad 81 frames (21) to 22.
    "cogvideox1.5-5b": (85, 768, 1360),
    "ltx-video": (49, 512, 768),
    "hunyuan-video": (49, 512, 768),
    "wan2.1-1.3b": (81, 480, 832),
    "wan2.1-14b": (81, 720, 1280),
    # TI2V-5B's native size (720P only: 704x1280, 121 frames at 24 fps; the Wan 2.2 README and DiffSynth-Studio's
    # recipes train it at 704x1280 too).
    "wan2.2-ti2v-5b": (121, 704, 1280),
}


@dataclass
class Row:
    variant: str
    training_type: str  # lora | full-finetune
    world: int
    flags: list[str]
    #: (source, GB, what) of other trainers for the same model / type / resolution / batch 1.
    others: list[tuple[str, float, str]] = field(default_factory=list)
    #: Goal from issue 8 for this row, in GB (None: report only).
    goal_gb: float | None = None

    def all_flags(self) -> list[str]:
        f, h, w = RES[self.variant]
        model = json.loads((CONFIGS / self.variant / "ptrain_variant.json").read_text())["model_name"]
        base = ["--model_name", model, "--num_frames", str(f), "--height", str(h), "--width", str(w),
                "--batch_size", "1", "--training_type", self.training_type, "--gradient_checkpointing",
                "--ac_mode", "full"]  # fmt: skip
        if self.training_type == "lora":
            base += ["--rank", "128", "--lora_alpha", "128"]
        return base + self.flags


FT = "finetrainers v0.0.1 docs, A100, alloc"
COGVIDEO = "CogVideo finetune README, reserved"
FSDP8 = ["--dp_shards", "8"]

DEFAULT_ROWS = [
    Row("cogvideox-2b", "lora", 1, [], [(COGVIDEO, 16.0, "DDP fp16")]),
    Row("cogvideox-2b", "full-finetune", 8, FSDP8, [(COGVIDEO, 36.0, "DDP fp16")]),
    Row("cogvideox-5b", "lora", 1, [], [(FT, 11.145, "precomputed"), (COGVIDEO, 24.0, "DDP bf16")], 0.7 * 11.145),
    Row("cogvideox-5b", "full-finetune", 1, [], [(FT, 31.160, "precomputed")], 0.7 * 31.160),
    Row("cogvideox-5b", "full-finetune", 8, FSDP8, [(COGVIDEO, 42.0, "8-GPU ZeRO-2")], 15.0),
    Row("cogvideox-5b", "full-finetune", 8, ["--dp_shards", "4", "--cp_degree", "2"]),
    Row("cogvideox1.5-5b", "lora", 1, [], [(COGVIDEO, 35.0, "DDP bf16")]),
    Row("cogvideox1.5-5b", "full-finetune", 8, FSDP8, [(COGVIDEO, 55.0, "8-GPU ZeRO-2")]),
    Row("ltx-video", "lora", 1, [], [(FT, 4.26, "precomputed")], 0.7 * 4.26),
    Row("ltx-video", "full-finetune", 1, [], [(FT, 10.769, "precomputed")], 0.7 * 10.769),
    Row("hunyuan-video", "lora", 1, [], [(FT, 24.83, "precomputed")], 0.7 * 24.83),
    Row("hunyuan-video", "full-finetune", 8, FSDP8, [("finetrainers README", math.inf, "OOM on 80 GB")], 40.0),
    Row("hunyuan-video", "full-finetune", 8, ["--dp_shards", "4", "--cp_degree", "2"]),
    Row("wan2.1-1.3b", "lora", 1, []),
    Row("wan2.1-14b", "lora", 1, []),
    Row("wan2.1-14b", "full-finetune", 8, FSDP8),
    Row("wan2.2-ti2v-5b", "lora", 1, []),
]


# Issue 9's memory options, each against the same row without it: (label, base row, extra flags).
EFFECTS = [
    ("EMA (--ema_decay 0.999)", Row("cogvideox-5b", "full-finetune", 8, FSDP8), ["--ema_decay", "0.999"]),
    ("FP8 storage of frozen weights", Row("hunyuan-video", "lora", 1, []),
     ["--layerwise_upcasting_modules", "transformer"]),
    ("FSDP CPU offload (--fsdp_cpu_offload)", Row("cogvideox-5b", "full-finetune", 1, []), ["--fsdp_cpu_offload"]),
    ("bf16 weights and moments (--full_bf16)", Row("cogvideox-5b", "full-finetune", 1, []), ["--full_bf16"]),
    ("--full_bf16 + 8-bit AdamW (bitsandbytes, CUDA)", Row("cogvideox-5b", "full-finetune", 1, []),
     ["--full_bf16", "--optimizer", "adamw-8bit", "--bf16_rounding", "nearest"]),
    ("--full_bf16 + fused backward pass (--fused_backward_pass)", Row("cogvideox-5b", "full-finetune", 1, []),
     ["--full_bf16", "--fused_backward_pass"]),
    ("--full_bf16 + 8-bit AdamW + --fused_backward_pass", Row("cogvideox-5b", "full-finetune", 1, []),
     ["--full_bf16", "--optimizer", "adamw-8bit", "--bf16_rounding", "nearest", "--fused_backward_pass"]),
    ("CAME (--optimizer came)", Row("cogvideox-5b", "full-finetune", 1, []), ["--optimizer", "came"]),
    ("block swap, 40 blocks (--blocks_to_swap 40)", Row("hunyuan-video", "lora", 1, []), ["--blocks_to_swap", "40"]),
    ("block swap, 40 blocks (--blocks_to_swap 40)", Row("cogvideox-5b", "lora", 1, []), ["--blocks_to_swap", "40"]),
    ("activation offload instead of AC (--activation_offload)", Row("ltx-video", "lora", 1, []),
     ["--no_gradient_checkpointing", "--activation_offload"]),
    ("full AC keeping the attention outputs (--ac_mode keep_attention)", Row("cogvideox-5b", "lora", 1, []),
     ["--ac_mode", "keep_attention"]),
]  # fmt: skip

#: With CPU offload the sharded parameters, gradients and optimizer state stay in host memory: the GPU peak is
#: the simulated peak without them (fake tensors all live on one device, so the tracker cannot tell them apart).
HOST_WITH_OFFLOAD = ("Sharded Param", "Sharded Grad", "OptState")


def gpu_peak(res: dict) -> int:
    if "--fsdp_cpu_offload" in res["flags"]:
        return res["peak_bytes"] - sum(res["categories"].get(k, 0) for k in HOST_WITH_OFFLOAD)
    return res["peak_bytes"]


def effects() -> list[dict]:
    out = []
    for label, row, extra in EFFECTS:
        base = plan(row.all_flags(), row.world, CONFIGS / row.variant, vae_phases=False)
        base["flags"] = row.all_flags()
        flags = [*row.all_flags(), *extra]
        res = plan(flags, row.world, CONFIGS / row.variant, vae_phases=False)
        res["flags"] = flags
        out.append({"effect": label, "variant": row.variant, "training_type": row.training_type,
                    "layout": f"{base['layout'].split(':')[0]} {row.world}", "without_bytes": gpu_peak(base),
                    "with_bytes": gpu_peak(res)})  # fmt: skip
        print(f"  effect of {label}: {gpu_peak(base) / GIB:.2f} -> {gpu_peak(res) / GIB:.2f} GiB", file=sys.stderr)
    return out


def effects_markdown(rows: list[dict], measured: dict | None = None) -> str:
    measured = measured or {}
    lines = [
        "| option | model | type | layout | GPU peak without GiB | with GiB | change | measured on GPU with GiB "
        "(alloc / reserved) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    extras = {label: extra for label, _, extra in EFFECTS}
    for r in rows:
        a, b = r["without_bytes"] / GIB, r["with_bytes"] / GIB
        key = (r["variant"], r["training_type"], tuple(extras.get(r["effect"], ("?",))))
        single = r["layout"].endswith(" 1")
        lines.append(f"| {r['effect']} | {r['variant']} | {r['training_type']} | {r['layout']} | {a:.2f} | {b:.2f} "
                     f"| {b - a:+.2f} | {measured.get(key, '-') if single else '-'} |")  # fmt: skip
    return "\n".join(lines)


def measured_on_gpu(path: Path = RESULTS / "gpu.json") -> dict:
    """The GPU suite's measured peaks (benchmarks/gpu.py -> gpu.json), keyed like this file's rows: (variant,
    training type, the flags beyond full AC at the row's size on one GPU) -> "alloc / reserved" GiB. Rows with an
    SDPA kernel forced or another size are left out; --compile (the suite's rows use it) is ignored by the planner,
    and the memory cap of a capped row only limits what may be allocated."""
    if not path.is_file():
        return {}
    from benchmarks.gpu import ROWS

    extra = {r.name: r.extra for r in ROWS}
    out = {}
    for g in json.loads(path.read_text())["rows"]:
        t, flags = g.get("trainer"), extra.get(g["row"])
        if not t or flags is None or "--attention_backend" in flags or tuple(g["frames_hw"]) != RES[g["variant"]]:
            continue
        key = tuple(flags) if g["ac"] else ("--no_gradient_checkpointing", *flags)
        out[(g["variant"], g["training_type"], key)] = f"{t['peak_allocated_gib']:.2f} / {t['peak_reserved_gib']:.2f}"
    return out


def measured_note(path: Path = RESULTS / "gpu.json") -> str:
    if not path.is_file():
        return "Measured on GPU: no GPU suite results yet (`python benchmarks/gpu.py` writes benchmarks/results/gpu.json)."
    data = json.loads(path.read_text())
    dev = next((r["device"] for r in data["rows"] if r.get("device")), "a GPU")
    return (f"Measured on GPU: `benchmarks/gpu.py`'s row of the same model, type, size and options ({dev}, "
            f"{data['date']}; `benchmarks/results/gpu.json`), peak allocated / reserved over its training steps; "
            "some of its rows also use --compile, which changes no memory the planner sees.")


def lower_bound(res: dict, variant: str, training_type: str) -> int:
    """Sharded states + one gathered block (compute dtype) + every block's saved input (full AC)."""
    from ptrain.models.spec import get_spec

    spec = get_spec(res["model"])
    cls = spec.transformer_cls
    config = cls.load_config(CONFIGS / variant, subfolder="transformer")
    with torch.device("meta"):
        small = cls.from_config({**config, **{k: 1 for k in spec.block_count_keys}})
    block = max(sum(p.numel() for p in blocks[0].parameters()) for blocks in spec.blocks(small))
    c = res["categories"]
    states = c.get("Sharded Param", 0) + c.get("Sharded Grad", 0) + c.get("OptState", 0)
    hidden = config.get("num_attention_heads", 1) * config.get("attention_head_dim", 1)
    saved = sum(res["blocks"]) * res["tokens_per_rank"] * res["batch_size"] * hidden * 2
    return int(states + block * 2 + saved)


def run(rows: list[Row]) -> list[dict]:
    out = []
    for row in rows:
        t0 = time.perf_counter()
        res = plan(row.all_flags(), row.world, CONFIGS / row.variant, vae_phases=False)
        res["variant"] = row.variant
        res["lower_bound_bytes"] = lower_bound(res, row.variant, row.training_type)
        spec_dtypes = {"vae": torch.bfloat16, "text_encoder": torch.bfloat16, "text_encoder_2": torch.bfloat16}
        from ptrain.models.spec import get_spec

        res["encoder_bytes"] = encoder_bytes(get_spec(res["model"]), CONFIGS / row.variant, spec_dtypes)
        res["others"] = row.others
        res["goal_gb"] = row.goal_gb
        res["flags"] = row.all_flags()
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        out.append(res)
        print(f"  {row.variant} {row.training_type} world {row.world} {' '.join(row.flags)}: "
              f"{res['peak_bytes'] / GIB:.2f} GiB ({res['wall_s']} s)", file=sys.stderr, flush=True)  # fmt: skip
    return out


def markdown(results: list[dict], measured: dict | None = None) -> str:
    measured = measured or {}
    lines = [
        "| model | type | F x H x W | layout | tokens/rank | ptrain step peak GiB | measured on GPU GiB (alloc / "
        "reserved) | + resident encoders GiB | states + 1 block + saved inputs GiB (peak / it) | others (same "
        "settings) | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = r["peak_bytes"] / GIB
        enc = sum(r["encoder_bytes"].values()) / GIB
        lb = r["lower_bound_bytes"] / GIB
        others = "; ".join(f"{f'{v} GB' if v != math.inf else 'OOM'} ({src}, {what})" for src, v, what in r["others"])
        gb = r["peak_bytes"] / 1e9  # goals are in GB (10^9), as the published figures
        goal = (
            ""
            if r["goal_gb"] is None
            else f"<= {r['goal_gb']:.1f} GB: {'met' if gb <= r['goal_gb'] else f'NOT met ({gb:.1f} GB)'}"
        )
        layout = r["layout"].split(":")[0] + f" {r['world_size']}" + (f", cp {r['cp']}" if r["cp"] > 1 else "")
        f, h, w = r["frames_hw"]
        single = r["world_size"] == 1 and (f, h, w) == RES[r["variant"]]
        gpu = measured.get((r["variant"], r["training_type"], ()), "-") if single else "-"
        lines.append(
            f"| {r['variant']} | {r['training_type']} | {f}x{h}x{w} | {layout} | {r['tokens_per_rank']:,} "
            f"| {peak:.2f} | {gpu} | {peak + enc:.2f} | {lb:.2f} ({peak / lb:.2f}x) | {others or '-'} | {goal} |"
        )
    return "\n".join(lines)


# Sweeps for the plot: peak vs frames (LTX-Video LoRA, 1 GPU) and vs world size (CogVideoX-5B full, FSDP).
FRAME_SWEEP = ("ltx-video", "lora", (25, 49, 97, 121))
WORLD_SWEEP = ("cogvideox-5b", "full-finetune", (2, 4, 8, 16))


def sweeps() -> dict:
    out = {"frames": [], "world": []}
    variant, kind, frames = FRAME_SWEEP
    for f in frames:
        flags = [*Row(variant, kind, 1, []).all_flags(), "--num_frames", str(f)]
        out["frames"].append((f, plan(flags, 1, CONFIGS / variant, vae_phases=False)["peak_bytes"]))
    variant, kind, worlds = WORLD_SWEEP
    for w in worlds:
        flags = [*Row(variant, kind, w, []).all_flags(), "--dp_shards", str(w)]
        out["world"].append((w, plan(flags, w, CONFIGS / variant, vae_phases=False)["peak_bytes"]))
    return out


def plot(sw: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    f, peaks = zip(*sw["frames"])
    a.plot(f, [p / GIB for p in peaks], "o-")
    a.set(xlabel="frames (512x768)", ylabel="simulated peak per GPU (GiB)", title="LTX-Video LoRA r128, 1 GPU, full AC")
    w, peaks = zip(*sw["world"])
    b.plot(w, [p / GIB for p in peaks], "o-")
    b.set(xlabel="GPUs (FSDP)", xscale="log", title="CogVideoX-5B full fine-tune, 49x480x720, full AC")
    b.set_xticks(w, [str(x) for x in w])
    fig.suptitle("ptrain memory, simulated on CPU (python benchmarks/memory.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def render(data: dict) -> str:
    """The tables of memory.json's results and options, with the GPU suite's measured peaks beside them."""
    measured = measured_on_gpu()
    table = markdown(data["results"], measured)
    if data.get("effects"):
        table += "\n\nMemory options (issue 9), each against the same configuration without it:\n\n" + effects_markdown(
            data["effects"], measured
        )
    return f"{table}\n\n{measured_note()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="variants to run (default: all rows)")
    ap.add_argument("--json", default=str(RESULTS / "memory.json"))
    ap.add_argument("--markdown", default=str(RESULTS / "memory.md"))
    ap.add_argument("--png", default=str(RESULTS / "memory.png"))
    ap.add_argument("--no_sweeps", action="store_true", help="skip the sweeps, the plot and the options table")
    ap.add_argument("--render", action="store_true",
                    help="simulate nothing: rewrite --markdown from --json and the GPU suite's gpu.json (after a GPU run)")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        md = Path(args.markdown)
        head = md.read_text().split("\n\n", 1)[0] if md.is_file() else "Simulated by `python benchmarks/memory.py`."
        md.write_text(f"{head}\n\n{render(json.loads(Path(args.json).read_text()))}\n")
        print(f"wrote {md} from {args.json} and {RESULTS / 'gpu.json'}", file=sys.stderr)
        return
    rows = [r for r in DEFAULT_ROWS if not args.only or r.variant in args.only]
    t0 = time.perf_counter()
    print(f"simulating {len(rows)} configurations (fake tensors, fake process group; bf16, batch 1, full AC)",
          file=sys.stderr)  # fmt: skip
    results = run(rows)
    sw = {} if args.no_sweeps else sweeps()
    eff = [] if args.no_sweeps else effects()
    data = {"rows": [asdict(r) for r in rows], "results": results, "sweeps": sw, "effects": eff}
    table = render(json.loads(json.dumps(data, default=str)))
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    if sw and plot(sw, Path(args.png)):
        print(f"wrote {args.png}", file=sys.stderr)
    Path(args.markdown).write_text(
        f"Simulated on {torch.__version__} CPU (no GPU) by `python benchmarks/memory.py`; "
        f"{time.perf_counter() - t0:.0f} s.\n\n{table}\n"
    )
    print(f"\nwrote {args.json} and {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
