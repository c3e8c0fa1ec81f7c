"""Regional compilation: torch.compile each repeated block (fast compile, same graph reused)."""

from __future__ import annotations

from torch import nn


def apply_compile(block_lists: list[nn.ModuleList], backend: str = "inductor") -> int:
    count = 0
    for blocks in block_lists:
        for block in blocks:
            block.compile(backend=backend, fullgraph=False)
            count += 1
    return count
