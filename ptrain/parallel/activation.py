"""Activation checkpointing per transformer block (none | full | selective every n-th block)."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper


def apply_ac(block_lists: list[nn.ModuleList], mode: str, every_n_blocks: int = 1) -> int:
    """Wrap blocks in non-reentrant checkpoint wrappers in place; returns how many were wrapped.

    `full` wraps every block; `selective` wraps one block in `every_n_blocks`
    (memory saved scales with 1/n of the blocks, recompute cost likewise).
    """
    if mode not in ("full", "selective"):
        raise ValueError(f"--ac_mode {mode!r}: choose full or selective")
    n = 1 if mode == "full" else every_n_blocks
    wrapped = 0
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            if i % n == 0:
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)
                wrapped += 1
    return wrapped
