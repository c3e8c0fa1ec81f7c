"""Activation checkpointing per transformer block: full, every n-th block (selective) or op-level (ops).

- full: every block keeps only its input and recomputes everything in backward (about one more forward);
- selective: one block in `every_n_blocks` is checkpointed as in full (memory and recompute scale by 1/n);
- ops: every block keeps the outputs of its matmuls and attention kernels and of collectives, and recomputes the
  rest (norms, activations, elementwise ops, RoPE) in backward: almost no recomputed FLOPs, a part of the
  activation memory saved (torch's selective checkpointing; torchtitan's "selective op" mode);
- keep_attention: every block is checkpointed as in full, but the fused attention kernels' outputs (the output and
  its log-sum-exp) are kept, so the backward recomputes everything except attention. For video transformers the
  attention kernels are a large part of a block's FLOPs at long sequences (about half for CogVideoX-5B at
  49x480x720: 17.8k tokens) while their outputs are one hidden state per block: full AC's memory plus that, and a
  recompute of only the projections, MLP and cheap ops. With --attention_backend math there is no fused kernel to
  keep (its attention is plain matmuls), and the mode recomputes as full does.
--ac_mode auto picks among these with the memory planner (ptrain/planner.py: `choose_ac`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

MODES = ("full", "selective", "ops", "keep_attention")
_aten = torch.ops.aten
#: the fused SDPA kernels (forward), whose outputs --ac_mode keep_attention keeps
_ATTENTION = {
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default, _aten._scaled_dot_product_flash_attention_for_cpu.default,
}  # fmt: skip
#: --ac_mode ops keeps the outputs of these ops (the FLOP-heavy and the communicating ones)
_SAVE = {
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.convolution.default,
    *_ATTENTION,
}  # fmt: skip


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVE or getattr(op, "namespace", "") == "_c10d_functional":
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Collectives (Ulysses' all-to-all, the ring's exchanges) are recomputed as under full AC: keeping them would
    # keep the gathered keys and values.
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(block_lists: list[nn.ModuleList], mode: str, every_n_blocks: int = 1, early_stop: bool = True) -> int:
    """Wrap blocks in non-reentrant checkpoint wrappers in place (see the module docstring); returns how many were
    wrapped. `early_stop=False` makes the recompute run each block's forward to its end (torch stops it once the
    saved tensors are back), so forward hooks fire there too (block swap releases weights in one)."""
    if mode not in MODES:
        raise ValueError(f"--ac_mode {mode!r}: choose {', '.join(MODES)} (or auto, resolved before this)")
    n = every_n_blocks if mode == "selective" else 1
    policy = {"ops": _policy, "keep_attention": _attention_policy}.get(mode)
    kwargs = {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)} if policy else {}
    if not early_stop:
        kwargs["early_stop"] = False
    wrapped = 0
    for blocks in block_lists:
        for i, block in enumerate(blocks):
            if i % n == 0:
                blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
                wrapped += 1
    return wrapped
