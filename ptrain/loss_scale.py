"""Dynamic loss scaling for float16 compute (--transformer_dtype float16; accelerate's --mixed_precision fp16).

float16 has five exponent bits: its smallest normal value is 6.1e-5. The loss of a video transformer is a mean over
about a million latent values, so the gradients reaching its activations in the backward are around 1e-6 and
smaller: in float16 they lose their precision or vanish, and the training silently learns less. bfloat16 has
float32's exponent range and needs nothing of this.

The rule is torch.amp.GradScaler's, with its defaults, run on the device so that a step never waits for it: the
loss is multiplied by the scale (2^16 at first) before the backward; the gradients are divided by it before
clipping and the optimizer; a step whose gradients overflowed is skipped (the trainer's device-side guard of
non-finite steps) and halves the scale; `growth_interval` finite steps in a row double it
(`torch._amp_update_scale_`). An overflow skip is the scaler's normal working, not a diverging run: the trainer
does not count it against --max_nan_steps. The scale and its growth count are checkpointed, so a resumed run
continues with the same scale.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


class LossScaler:
    def __init__(self, device: torch.device, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):  # fmt: skip
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.value = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth = torch.zeros((), dtype=torch.int32, device=device)  # finite steps since the last change

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        """Divide the gradients by the scale, in place (DTensor gradients: each rank its local shard)."""
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        if grads:
            # to the gradients' device: CPU gradients (--fsdp_cpu_offload) cannot be multiplied by a CUDA scalar
            torch._foreach_mul_(grads, self.value.reciprocal().to(grads[0].device))

    def update(self, finite: torch.Tensor) -> None:
        """After the step: back off if the gradients were not finite, else count towards growth."""
        found_inf = (~finite).to(torch.float32)
        torch._amp_update_scale_(self.value, self.growth, found_inf, self.growth_factor, self.backoff_factor,
                                 self.growth_interval)  # fmt: skip

    def state_dict(self) -> dict:
        return {"scale": float(self.value), "growth": int(self.growth)}

    def load_state_dict(self, state: dict) -> None:
        self.value.fill_(state["scale"])
        self.growth.fill_(state["growth"])
