"""Regional compilation: torch.compile each repeated block (fast compile, same graph reused)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def apply_compile(block_lists: list[nn.ModuleList], backend: str = "inductor", skip=(), mode: str = "default") -> int:
    """Compile every block except those in `skip` (block-swapped ones: their hooks swap weights in eager code);
    `mode`: torch.compile's (--compile_mode; inductor)."""
    count = 0
    for blocks in block_lists:
        for block in blocks:
            if block in skip or getattr(block, "_checkpoint_wrapped_module", None) in skip:
                continue
            block.compile(backend=backend, fullgraph=False, mode=None if mode == "default" else mode)
            count += 1
    return count


def mark_step_begin(cudagraphs: bool) -> None:
    """Before each forward of the training step under CUDA-graph modes: tells torch's CUDA-graph trees that the
    outputs of the previous step's replays are no longer needed (they are overwritten by this step's)."""
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()


@contextlib.contextmanager
def step_per_call(module: nn.Module, cudagraphs: bool):
    """While validating under CUDA-graph modes: a new CUDA-graph step before every call of `module` (each denoising
    step's transformer forward). Once a step has been marked by hand, torch no longer starts one on its own, so
    without this every denoising step would record new graphs instead of replaying them, its pool growing with
    each. Safe because the blocks' graph outputs are consumed within the transformer's forward (its output comes
    from eager code), before the next call overwrites them."""
    if not cudagraphs:
        yield
        return
    handle = module.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
    try:
        yield
    finally:
        handle.remove()
