"""GPU memory planner that needs no GPU.

One training step of the *real* ptrain code path — the Config parsed from ptrain's own flags, LoRA / full
fine-tune set-up (`make_trainable`), FP8 storage, context parallelism, activation checkpointing and FSDP2 /
HSDP / replicate (`build_parallel_transformer`), the optimizer and EMA — runs on fake tensors
(`FakeTensorMode`) in one process that plays rank 0 of a fake process group of the requested world size.
`torch.distributed._tools`' memory trackers (FSDPMemTracker, or MemTracker without FSDP) record the per-rank
peak by category. Weights are never materialised: the transformer is built from its `config.json` on the
meta device, so a 13B model costs nothing but shape propagation.

Whole models with many blocks are slow to simulate on a CPU, so `plan()` simulates 2 and 3 blocks per block
list and extrapolates linearly (every block adds the same parameters, gradients, optimizer state and saved
activations); tests/test_planner.py checks the extrapolation against a full simulation.

What it does not model: the CUDA caching allocator (reserved > allocated; fragmentation), NCCL's own buffers,
the CUDA context (~0.5-1 GB), and kernel workspaces (cuBLAS, flash attention). Fake tensors live on the CPU
device, so attention runs through the CPU SDPA kernels, whose saved tensors (output + log-sum-exp) match the
fused CUDA kernels'.

CLI: python -m ptrain.planner --model_dir DIR --world_size 8 -- [ptrain flags]   (prints JSON)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

GIB = 2**30


def _fake_world(world: int) -> None:
    """(Re)initialise the default process group as a fake one of `world` ranks (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_backend() == "fake" and dist.get_world_size() == world:
            return
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def _meta_model(cls, model_dir: Path, subfolder: str, overrides: dict | None = None, dtype=None):
    config = dict(cls.load_config(model_dir, subfolder=subfolder))
    config.update(overrides or {})
    with torch.device("meta"):
        model = cls.from_config(config)
    if dtype is not None:
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or []) if dtype != torch.float32 else set()
        model.to(dtype)
        for name, module in model.named_modules():  # as from_pretrained(torch_dtype=...) does
            if any(k in name.split(".") for k in keep):
                module.to(torch.float32)
    return model


def encoder_bytes(spec, model_dir: Path, dtypes: dict[str, torch.dtype]) -> dict[str, int]:
    """Resident weight bytes of the frozen VAE and text encoders (from their configs; 0 when absent)."""
    out = {}
    for name in ("vae", "text_encoder", "text_encoder_2"):
        cls = spec.component_classes.get(name)
        if cls is None or not (model_dir / name / "config.json").is_file():
            continue
        if name == "vae":
            model = _meta_model(cls, model_dir, name)
        else:
            config = cls.config_class.from_pretrained(model_dir / name)
            with torch.device("meta"):
                model = cls(config)
        dtype = dtypes.get(name, torch.bfloat16)
        out[name] = sum(p.numel() for p in model.parameters()) * dtype.itemsize
    return out


def simulate(
    flags: list[str], world: int, model_dir: str | Path, num_blocks: tuple[int, ...] | None = None, steps: int = 2
) -> dict:
    """Peak memory of rank 0 in one training step of `ptrain FLAGS` on `world` ranks (fake), in bytes by category.

    `num_blocks` overrides the transformer's block counts (one per block list of the model).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.fsdp import FSDPModule

    from ptrain.config import parse_config
    from ptrain.ema import EMA
    from ptrain.models.spec import Components, get_spec
    from ptrain.optim import build_optimizer
    from ptrain.parallel import ParallelDims
    from ptrain.trainer import DTYPES, build_parallel_transformer, make_trainable, param_groups, store_frozen_in_fp8

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    cfg = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)])
    cfg.train.compile = False  # compile changes no memory the tracker sees; it would only cost time here
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    spec = get_spec(m.model_name)
    _fake_world(world)
    dims = ParallelDims.build(p.dp_degree, p.dp_shards, p.cp_degree, world)
    mesh = dims.build_mesh()  # outside FakeTensorMode (inside it fails)
    device = torch.device("cpu")
    param_dtype = DTYPES[m.transformer_dtype]
    overrides = dict(zip(spec.block_count_keys, num_blocks)) if num_blocks else {}
    transformer = _meta_model(
        spec.transformer_cls, model_dir, "transformer", overrides,
        param_dtype if m.training_type == "lora" else torch.float32,
    )  # fmt: skip
    blocks_used = tuple(int(transformer.config[k]) for k in spec.block_count_keys)
    vae = _meta_model(spec.component_classes["vae"], model_dir, "vae", dtype=DTYPES[m.vae_dtype])
    sched_cls = spec.component_classes["scheduler"]
    scheduler = (
        sched_cls.from_config(sched_cls.load_config(model_dir, subfolder="scheduler"))
        if (model_dir / "scheduler").is_dir()
        else sched_cls()
    )
    n_total = sum(q.numel() for q in transformer.parameters())
    # LoRA and FP8 storage on the meta model (fake tensors cannot be swapped in place by Module.to, which
    # peft uses); materialised as fake tensors afterwards.
    make_trainable(transformer, cfg, spec)
    if "transformer" in (m.layerwise_upcasting_modules or []):
        fp8 = getattr(torch, m.layerwise_upcasting_storage_dtype)
        store_frozen_in_fp8(transformer, fp8, m.layerwise_upcasting_skip_modules_pattern)
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer = transformer.to_empty(device=device)
        vae = vae.to_empty(device=device)
        comps = Components(transformer=transformer, vae=vae, text_encoder=None, tokenizer=None, scheduler=scheduler)
        spec.bind(comps)
        build_parallel_transformer(transformer, cfg, spec, mesh, dims, device)
        groups = param_groups(transformer, cfg)
        params = [q for g in groups for q in g["params"]]
        n_train = sum(q.numel() for q in params)
        optimizer = build_optimizer(groups, cfg.optim, device)
        ema = EMA(transformer, t.ema_decay, 0, 1) if t.ema_decay else None

        b = t.batch_size
        video = torch.zeros(b, 3, d.num_frames, d.height, d.width, device=device, dtype=DTYPES[m.vae_dtype])
        with torch.no_grad():
            latent_shape = vae.encode(video).latent_dist.mean.shape
        latents = torch.randn(latent_shape, device=device, dtype=torch.float32)
        seq = d.max_sequence_length or spec.default_max_sequence_length
        cond = spec.simulated_conditioning(transformer.config, b, seq, device, DTYPES[m.text_encoder_dtype])
        timesteps = torch.full((b,), 500.0, device=device)
        tracker = FSDPMemTracker(transformer, optimizer) if isinstance(transformer, FSDPModule) else MemTracker()
        if isinstance(tracker, MemTracker) and not isinstance(tracker, FSDPMemTracker):
            tracker.track_external(transformer, optimizer)
        with tracker:
            for step in range(steps):
                pred = spec.forward(transformer, latents, timesteps, cond)
                loss = (pred.float() - latents).pow(2).mean()
                (loss * dims.cp if dims.cp > 1 else loss).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(step + 1)
                if step == 0:
                    tracker.reset_mod_stats()
        snap = tracker.get_tracker_snapshot("peak")
    per_dev = next(iter(snap.values()))
    categories = {str(getattr(k, "value", k)): int(v) for k, v in per_dev.items() if str(k) != "Total"}
    categories.pop("Total", None)
    tokens = spec.tokens_per_sample(tuple(latent_shape), comps) * b
    return {
        "model": m.model_name,
        "training_type": m.training_type,
        "world_size": world,
        "layout": dims.describe(),
        "cp": dims.cp,
        "frames_hw": [d.num_frames, d.height, d.width],
        "batch_size": b,
        "tokens": tokens,
        "tokens_per_rank": math.ceil(tokens / dims.cp),
        "latent_shape": list(latent_shape),
        "blocks": list(blocks_used),
        "params_total": n_total,
        "params_trainable": n_train,
        "peak_bytes": int(per_dev["Total"]),
        "categories": categories,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _extrapolate(base: dict, bumps: list[dict], targets: tuple[int, ...]) -> dict:
    """Linear in each block count: value(n) = base + sum_i (n_i - base_i) * (bump_i - base)."""
    out = dict(base)

    def lin(get):
        v = get(base)
        for i, bump in enumerate(bumps):
            v += (targets[i] - base["blocks"][i]) * (get(bump) - get(base))
        return v

    out["peak_bytes"] = int(lin(lambda r: r["peak_bytes"]))
    out["params_total"] = int(lin(lambda r: r["params_total"]))
    out["params_trainable"] = int(lin(lambda r: r["params_trainable"]))
    out["categories"] = {k: int(lin(lambda r, k=k: r["categories"].get(k, 0))) for k in base["categories"]}
    out["blocks"] = list(targets)
    out["simulated_blocks"] = [base["blocks"], *[b["blocks"] for b in bumps]]
    out["seconds"] = round(base["seconds"] + sum(b["seconds"] for b in bumps), 1)
    return out


def plan(flags: list[str], world: int, model_dir: str | Path, full: bool = False) -> dict:
    """simulate() for the whole model: directly when `full` or the model is small, else 2 and 3 blocks per block
    list, extrapolated to the real block counts."""
    from ptrain.config import parse_config
    from ptrain.models.spec import get_spec

    model_dir = Path(model_dir)
    name = parse_config([*flags, "--pretrained_model_name_or_path", str(model_dir)]).model.model_name
    spec = get_spec(name)
    config = spec.transformer_cls.load_config(model_dir, subfolder="transformer")
    targets = tuple(int(config[k]) for k in spec.block_count_keys)
    if full or all(n <= 3 for n in targets):
        res = simulate(flags, world, model_dir)
        res["simulated_blocks"] = [res["blocks"]]
        return res
    base_blocks = tuple(2 for _ in targets)
    base = simulate(flags, world, model_dir, base_blocks)
    bumps = []
    for i in range(len(targets)):
        blocks = tuple(3 if j == i else 2 for j in range(len(targets)))
        bumps.append(simulate(flags, world, model_dir, blocks))
    return _extrapolate(base, bumps, targets)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m ptrain.planner", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", required=True, help="diffusers checkpoint folder, or one with only config files")
    ap.add_argument("--world_size", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="simulate every block (no extrapolation)")
    args = ap.parse_args(own)
    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON
        res = plan(flags, args.world_size, args.model_dir, args.full)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
