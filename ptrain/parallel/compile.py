"""Regional compilation: torch.compile each repeated block (fast compile, same graph reused)."""

from __future__ import annotations

from torch import nn


def apply_compile(block_lists: list[nn.ModuleList], backend: str = "inductor", skip=()) -> int:
    """Compile every block except those in `skip` (block-swapped ones: their hooks swap weights in eager code)."""
    count = 0
    for blocks in block_lists:
        for block in blocks:
            if block in skip or getattr(block, "_checkpoint_wrapped_module", None) in skip:
                continue
            block.compile(backend=backend, fullgraph=False)
            count += 1
    return count
