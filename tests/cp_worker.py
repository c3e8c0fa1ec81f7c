"""Context-parallel exactness at the model level (run under torchrun by tests/test_context_parallel.py).

For every model, variant and cp mode: the tiny transformer's output and parameter gradients with the
sequence split over all ranks (cp = world size) equal those of the unsplit model on one rank. Token
counts are odd (padding), HunyuanVideo gets text masks of different lengths per sample, LTX-Video gets
per-token timesteps, and one case runs under activation checkpointing (recompute in backward). Prints
one JSON line per case on rank 0.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh

from ptrain.models.spec import Components, get_spec
from ptrain.parallel.context import apply_context_parallel
from ptrain.testing.tiny import build_tiny_pipeline

# (model, variant, latent (C-free) shape F x H x W, per-token timesteps, activation checkpointing)
CASES = [
    ("ltx_video", None, (1, 3, 5), False, False),
    ("ltx_video", None, (2, 3, 3), True, True),
    ("cogvideox", "2b", (2, 6, 6), False, False),  # sincos positions, 2 x 9 = 18 tokens over patch 2
    ("cogvideox", "5b", (1, 6, 10), False, True),  # rotary, 15 tokens
    ("cogvideox", "1.5", (2, 6, 6), False, False),  # patch_size_t 2
    ("hunyuan_video", None, (1, 6, 10), False, False),  # 15 tokens, padded text masks
    ("wan", None, (2, 6, 2), False, False),  # 2 x 3 x 1 = 3 tokens: with cp 4 a rank holds only padding
    ("wan", "2.2-ti2v", (1, 6, 10), True, False),  # Wan 2.2 TI2V: a timestep per token, 15 tokens
]
DTYPE = getattr(torch, os.environ.get("CP_WORKER_DTYPE", "float32"))
CAPTIONS = ["a red ball bounces", "a dog"]


def run_case(model, variant, fhw, per_token, ac, mode, cp_mesh, device) -> dict:
    pipe = build_tiny_pipeline(model, seed=0, variant=variant)
    spec = get_spec(model)
    comps = Components.from_pipeline(pipe)
    spec = spec.bind(comps)
    base = comps.transformer.to(DTYPE).train()
    with torch.no_grad():
        cond = spec.encode_text(comps, CAPTIONS, spec.max_sequence_length(comps))
    cond.tensors = {k: v.to(DTYPE) if v.is_floating_point() else v for k, v in cond.tensors.items()}
    c = base.config.in_channels
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(CAPTIONS), c, *fhw, generator=g, dtype=DTYPE)
    if per_token:
        n = spec.tokens_per_sample(latents.shape, comps)
        timesteps = torch.rand(len(CAPTIONS), n, generator=g) * 1000
    else:
        timesteps = torch.tensor([300.0, 800.0])

    def grads(transformer):
        transformer.zero_grad(set_to_none=True)
        out = spec.forward(transformer, latents, timesteps, cond)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        (out * w).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in transformer.named_parameters() if p.grad is not None}

    ref_out, ref_grads = grads(copy.deepcopy(base))
    cp_model = copy.deepcopy(base)
    apply_context_parallel(cp_model, spec.cp_plan, cp_mesh, mode)
    if ac:
        for blocks in spec.blocks(cp_model):
            for i, block in enumerate(blocks):
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    out, cp_grads = grads(cp_model)
    for t in cp_grads.values():  # cp ranks hold partial gradients that sum to the full one
        dist.all_reduce(t, group=cp_mesh.get_group())
    cp_grads = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in cp_grads.items()}
    # Relative to each parameter's gradient scale, floored at 1e-2 of the largest one: gradients that are
    # zero or nearly so in exact arithmetic (key biases, which softmax ignores; Wan's cross-attention key
    # norms over 3 tokens) are sums that cancel, float noise on both sides (seen: 3e-7 of the largest).
    floor = 1e-2 * max(g.abs().max().item() for g in ref_grads.values())
    rel = {k: (ref_grads[k] - cp_grads[k]).abs().max().item() / max(ref_grads[k].abs().max().item(), floor)
           for k in ref_grads}  # fmt: skip
    worst = max(rel.values())
    return {
        "model": model, "variant": variant, "mode": mode, "per_token": per_token, "ac": ac,
        "tokens": spec.tokens_per_sample(latents.shape, comps), "shape_ok": out.shape == ref_out.shape,
        "out_max_abs": (out - ref_out).abs().max().item(), "out_scale": ref_out.abs().max().item(),
        "grad_keys_equal": sorted(ref_grads) == sorted(cp_grads), "grad_max_rel": worst,
        "n_grads": len(ref_grads), "worst_params": {k: rel[k] for k in sorted(rel, key=rel.get)[-4:]},
    }  # fmt: skip


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    cp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    only = sys.argv[1:]
    for case in CASES:
        if only and case[0] not in only:
            continue
        for mode in ("ulysses", "ring"):
            res = run_case(*case, mode, cp_mesh["cp"], torch.device("cpu"))
            res["world"] = world
            if dist.get_rank() == 0:
                print("CPRESULT " + json.dumps(res), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
