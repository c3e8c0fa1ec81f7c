"""Exponential moving average of the trainable parameters, sharded exactly like them.

Under FSDP2 the trainable parameters are DTensors; the EMA copies are DTensors
with the same placements, so no rank ever holds a full copy. Updates work on
the local shards with one fused `_foreach_lerp_`. The EMA is part of the DCP
checkpoint and can be swapped into the model to export or validate with it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor

from ptrain.parallel.names import clean_name


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float, start_step: int = 0, update_every: int = 1):
        self.decay, self.start_step, self.update_every = decay, start_step, update_every
        named = [(clean_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int, finite: torch.Tensor | None = None) -> None:
        """Call after the optimizer step of `step`. Until start_step the EMA just follows the weights. `finite`: a
        device bool of whether the step updated the weights; a skipped step leaves the EMA as it was (decided on
        the device: no host sync)."""
        if step % self.update_every:
            return
        shadow, params = [_local(s) for s in self.shadow], [_local(p.detach()) for p in self.params]
        if not shadow:
            return
        weight = 1.0 if step <= self.start_step else 1.0 - self.decay  # shadow += weight * (param - shadow)
        if finite is None:
            if weight == 1.0:
                torch._foreach_copy_(shadow, params)
            else:
                torch._foreach_lerp_(shadow, params, weight)
            return
        w = torch.where(finite, weight, 0.0).to(device=shadow[0].device, dtype=shadow[0].dtype)
        torch._foreach_lerp_(shadow, params, [w] * len(shadow))

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average from the current weights (e.g. resuming from a checkpoint without EMA)."""
        torch._foreach_copy_([_local(s) for s in self.shadow], [_local(p.detach()) for p in self.params])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the averages of `state` (DCP loads into state_dict()'s own tensors, so usually nothing moves)."""
        for name, shadow in zip(self.names, self.shadow):
            if state[name] is not shadow:
                _local(shadow).copy_(_local(state[name]))

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """Temporarily put the EMA weights into the model (for export or validation)."""
        params = [_local(p.detach()) for p in self.params]
        backup = [p.clone() for p in params]
        torch._foreach_copy_(params, [_local(s) for s in self.shadow])
        try:
            yield
        finally:
            torch._foreach_copy_(params, backup)
