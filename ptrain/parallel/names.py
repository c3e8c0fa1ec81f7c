"""Parameter names as the unwrapped model has them."""

from __future__ import annotations

# Modules the parallel plan may insert around a block: activation checkpointing, torch.compile (when it wraps
# instead of compiling in place) and FSDP1. `named_parameters()` names run through them.
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(name: str) -> str:
    """`name` without the wrapper modules' path components (e.g. `blocks.0._checkpoint_wrapped_module.attn1.to_q`
    -> `blocks.0.attn1.to_q`): the name in the model's state dict and in a diffusers checkpoint."""
    for p in _WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name
