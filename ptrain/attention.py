"""Which scaled-dot-product-attention kernel runs, and the choice of it (--attention_backend).

Every model of ptrain calls `torch.nn.functional.scaled_dot_product_attention` (context parallelism intercepts
exactly that call), and torch picks a kernel per call: flash, cuDNN, memory-efficient or math, by device,
dtype, head size and mask. `report` asks torch which one it picks for the model's attention (its heads and head
size, the compute dtype, with and without a mask where the model passes one), logs it at start-up, and fails
early with a clear error when a kernel chosen by --attention_backend cannot run that attention; `kernel_context`
holds the training forward and backward (ptrain/step.py) to that kernel. diffusers' own
attention dispatch is not used: its other backends call kernels past `scaled_dot_product_attention` (context
parallelism would not see them) or need packages ptrain does not install (flash-attn, sageattention).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ptrain.errors import ConfigError

log = logging.getLogger("ptrain")

#: --attention_backend values -> torch's SDPA backends
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
NAMES = {v: k for k, v in BACKENDS.items()}
#: the kernels torch has on the CPU
CPU_BACKENDS = ("flash", "math")


def check_backend(name: str, device: torch.device) -> None:
    if device.type == "cpu" and name not in ("auto", *CPU_BACKENDS):
        raise ConfigError(f"--attention_backend {name}: the CPU has only {' and '.join(CPU_BACKENDS)} SDPA kernels")


def kernel_context(name: str):
    """A context factory holding SDPA to the kernel `name` (torch's sdpa_kernel; auto: torch's choice)."""
    if name == "auto":
        return contextlib.nullcontext
    return functools.partial(sdpa_kernel, [BACKENDS[name]])


def choice(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, mask: str = "none") -> str | None:
    """The kernel torch runs for attention of this geometry and mask kind (none, bool, additive), on a short
    sequence (the choice does not depend on its length), or None when no enabled kernel can run it."""
    q = torch.zeros(1, heads, 64, head_dim, dtype=dtype, device=device)
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.ones(1, 1, 64, 64, dtype=torch.bool, device=device)
    elif mask == "additive":
        attn_mask = torch.zeros(1, 1, 64, 64, dtype=dtype, device=device)
    try:
        picked = SDPBackend(torch._fused_sdp_choice(q, q, q, attn_mask))
    except RuntimeError:  # "No available kernel": none of the enabled ones can
        return None
    return NAMES.get(picked, picked.name.lower())


def report(spec, config, dtype: torch.dtype, device: torch.device, backend: str) -> dict[str, str]:
    """Log the SDPA kernel of each attention variant of the model ({"unmasked": "flash", "bool mask": ...}, from
    the spec's `attention_masks`); ConfigError when
    the --attention_backend kernel cannot run one of them."""
    check_backend(backend, device)
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    kernels = {}
    for mask in spec.attention_masks:
        variant = "unmasked" if mask == "none" else f"{mask} mask"
        with kernel_context(backend)():
            kernels[variant] = choice(heads, head_dim, dtype, device, mask)
        if kernels[variant] is None:
            raise ConfigError(
                f"--attention_backend {backend}: that kernel cannot run {spec.name}'s {variant} attention "
                f"({heads} heads x {head_dim}, {str(dtype).removeprefix('torch.')}, {device.type}); "
                "choose another or leave it at auto"
            )
    log.info(
        "attention: SDPA %s (%d heads x %d, %s, %s%s)", ", ".join(f"{k} {v}" for k, v in kernels.items()), heads,
        head_dim, str(dtype).removeprefix("torch."), device.type,
        "" if backend == "auto" else f", --attention_backend {backend}",
    )  # fmt: skip
    return kernels
