"""--fused_backward_pass: the optimizer steps each block during the backward, as soon as the block's gradients are
complete, and frees them; no step holds the whole model's gradients.

A normal step keeps every gradient until the backward has finished, then clips by the global norm and steps:
for a full fine-tune that is the model's size in gradients on top of the weights and optimizer states (CogVideoX-5B
with --full_bf16: 10.4 GiB of its 44 GiB planned peak). Here a post-accumulate-grad hook on every trainable
parameter notes its gradient; when the last parameter of a block (a unit of `spec.blocks`; the parameters outside
the blocks are one more unit) has its gradient, the optimizer steps that unit's parameters and their gradients are
freed. Under FSDP2 the hook runs on the sharded gradient, after the reduce-scatter (and HSDP's all-reduce), so
every layout steps reduced gradients. The optimizer is the run's own (its state, checkpoint and learning-rate
schedule are unchanged); it is stepped with its parameter groups narrowed to the unit.

What changes (sd-scripts / musubi-tuner / OneTrainer users know the trade-off):
- --max_grad_norm clips each unit's gradient by that unit's norm, not by the global norm, which is known only after
  the backward. The logged grad_norm is still the global norm (of the unclipped gradients).
- A unit whose gradient norm is not finite is not updated; the others are. The step counts against
  --max_nan_steps as usual. torch's fused AdamW / Adam and --full_bf16's BF16AdamW skip on the device
  (`found_inf`): no host sync is added, norms and clipping stay on the device too. CAME and 8-bit AdamW take no
  `found_inf`: the host reads each unit's norm to decide, a sync per unit (the device idles while the host
  queues the next unit's backward).
- No gradient accumulation: the gradients are gone after each backward.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from ptrain.optim import found_inf_for


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of a unit's gradients as a plain float32 tensor (a DTensor norm is reduced over its mesh)."""
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).float()


class FusedBackward:
    """Steps `optimizer` unit by unit inside the backward. `units`: lists of trainable parameters (each parameter
    in at most one; those in none form one more unit). Call `finish()` after the backward: it steps what is left
    (parameters of a unit that did not get every gradient) and returns the global gradient norm."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                 units: list[list[torch.nn.Parameter]], max_grad_norm: float, on_device: bool):  # fmt: skip
        """`on_device`: the optimizer takes `found_inf` (ptrain.optim.skips_on_device); else the host decides."""
        self.optimizer, self.max_norm, self.on_device = optimizer, max_grad_norm, on_device
        trainable = {id(p) for p in params}
        seen: set[int] = set()
        self.units: list[list[torch.nn.Parameter]] = []
        for unit in units:
            unit = [p for p in unit if id(p) in trainable and id(p) not in seen]
            seen.update(id(p) for p in unit)
            if unit:
                self.units.append(unit)
        rest = [p for p in params if id(p) not in seen]
        if rest:
            self.units.append(rest)
        self.unit_of = {id(p): i for i, unit in enumerate(self.units) for p in unit}
        #: each parameter's optimizer group (a unit's step narrows every group to its members: O(unit) per step)
        self.group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        self.pending: dict[int, int] = {}  # unit -> gradients still to come this backward
        self.sumsq: torch.Tensor | None = None
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: torch.Tensor) -> None:
        i = self.unit_of[id(p)]
        left = self.pending.get(i, len(self.units[i])) - 1
        if left < 0:  # the unit was stepped already: this gradient would be lost (or half a sum stepped)
            raise RuntimeError(
                "--fused_backward_pass: a parameter received its gradient twice in one backward (a second backward "
                "before the step finished, or a parameter used by two units); the fused pass needs one gradient "
                "per parameter and step"
            )
        self.pending[i] = left
        if left == 0:
            self._step([q for q in self.units[i] if q.grad is not None])

    def _step(self, unit: list[torch.nn.Parameter]) -> None:
        if not unit:
            return
        opt = self.optimizer
        grads = [p.grad for p in unit]
        if grads[0].device.type == "cpu" and torch.cuda.is_initialized():
            # --fsdp_cpu_offload: FSDP2 copies the reduced gradients to the CPU with non_blocking=True and (before
            # torch 2.12, pytorch PR #180666) calls this hook before the copy has landed: wait for it, or the norm
            # and the step would read stale gradients
            torch.cuda.synchronize()
        norm = _norm(grads)
        self.sumsq = norm.square() if self.sumsq is None else self.sumsq + norm.square()
        if self.max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(unit, self.max_norm, norm, foreach=True)
        finite = torch.isfinite(norm)
        if self.on_device:
            opt.found_inf = found_inf_for(unit, finite)
        elif not bool(finite):  # host sync: this optimizer cannot skip on the device
            self._free(unit)
            return
        saved = opt.param_groups
        members: list[list[torch.nn.Parameter]] = [[] for _ in saved]
        for p in unit:
            members[self.group_of[id(p)]].append(p)
        # the same groups (their hyperparameters, the schedule's current lr), each holding only this unit's members
        narrowed = [dict(g, params=ps) for g, ps in zip(saved, members)]
        opt.param_groups = narrowed
        try:
            with implicit_replication():  # found_inf is a plain tensor beside DTensor parameters
                opt.step()
        finally:
            opt.param_groups = saved
            for real, part in zip(saved, narrowed):  # what the step counts in its groups (BF16AdamW's draws)
                real.update({k: v for k, v in part.items() if k != "params"})
        self._free(unit)

    @staticmethod
    def _free(unit: list[torch.nn.Parameter]) -> None:
        for p in unit:
            p.grad = None

    def finish(self, device: torch.device) -> torch.Tensor:
        """After the backward: step the parameters still holding gradients (units that missed one), reset for the
        next step, and return the global norm of this step's (unclipped) gradients."""
        for i, left in list(self.pending.items()):
            if left > 0:
                self._step([p for p in self.units[i] if p.grad is not None])
        self.pending = {}
        norm = torch.zeros((), device=device) if self.sumsq is None else self.sumsq.sqrt()
        self.sumsq = None
        return norm
