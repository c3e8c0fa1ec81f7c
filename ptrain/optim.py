"""Optimizers (AdamW, Adam, CAME, 8-bit AdamW) and learning-rate schedules (diffusers.optimization)."""

from __future__ import annotations

import logging

import torch
from diffusers.optimization import get_scheduler
from torch.distributed.tensor import DTensor, Replicate

from ptrain.bf16_optim import BF16AdamW
from ptrain.config import ConfigError, OptimArgs

log = logging.getLogger("ptrain")


def check_adamw_8bit(device: torch.device, dry_run: bool = False) -> None:
    """--optimizer adamw-8bit needs CUDA and bitsandbytes: a ConfigError otherwise. A dry run (which plans a GPU
    run on any machine) only warns that bitsandbytes is missing here."""
    import importlib.util

    missing = importlib.util.find_spec("bitsandbytes") is None
    if device.type == "cuda" and missing:
        raise ConfigError("--optimizer adamw-8bit needs bitsandbytes: pip install bitsandbytes")
    if device.type != "cuda" and not dry_run:
        raise ConfigError("--optimizer adamw-8bit runs on CUDA only (bitsandbytes kernels); on this CPU use adamw or "
                          "came")  # fmt: skip
    if missing:
        log.warning("--optimizer adamw-8bit: bitsandbytes is not installed here; the GPU machine needs it "
                    "(pip install bitsandbytes)")  # fmt: skip


def build_optimizer(params: list, args: OptimArgs, device: torch.device, fused: bool = True,
                    seed: int = 0, planning: bool = False) -> torch.optim.Optimizer:  # fmt: skip
    """`params`: parameters or param-group dicts (groups may set their own lr). `fused` (the default, on CUDA and
    CPU) runs AdamW / Adam as one fused kernel per step instead of torch's multi-tensor (foreach) path: faster,
    without foreach's temporary copy of the second moments (4 more bytes per parameter at the step's peak), and
    able to skip a non-finite step on the device (`found_inf`). `fused=False`: torch's multi-tensor (foreach)
    path, which torch picks on CUDA when not told otherwise (the planner replays measurements of it).
    --full_bf16's BF16AdamW runs its update compiled on CUDA (and plans it so) when `fused`, eager on the CPU."""
    if not params or (isinstance(params[0], dict) and not any(g["params"] for g in params)):
        raise ConfigError("no trainable parameters (check --training_type and --target_modules)")
    betas = (args.beta1, args.beta2)
    if args.full_bf16 and args.bf16_rounding == "stochastic":  # adamw / adam (validated)
        return BF16AdamW(params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay,
                         decoupled=args.optimizer == "adamw", seed=seed,
                         fused=fused and (device.type == "cuda" or planning), planning=planning)  # fmt: skip
    if args.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay, fused=fused or None,
            foreach=not fused or None,
        )
    if args.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay, fused=fused or None,
            foreach=not fused or None,
        )
    if args.optimizer == "came":
        return _came_class()(
            params,
            lr=args.lr,
            betas=(args.beta1, args.beta2, args.beta3),
            eps=(args.epsilon, 1e-16),
            weight_decay=args.weight_decay,
        )
    if args.optimizer == "adamw-8bit":
        if planning:  # the memory planner runs on the CPU, where bitsandbytes has no kernels
            return PlannedAdamW8bit(params, lr=args.lr)
        check_adamw_8bit(device)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay)
    raise ConfigError(f"--optimizer {args.optimizer!r} is not supported")


def _came_class():
    try:
        from came_pytorch import CAME
    except ImportError as e:
        raise ConfigError("--optimizer came needs the came-pytorch package: pip install came-pytorch") from e

    class ShardedCAME(CAME):
        """came-pytorch's CAME with its state created as DTensors when the parameters are DTensors (FSDP2).

        came-pytorch allocates its factored row/column moments as plain tensors, which cannot mix with
        sharded gradients. Creating them from the gradient's own reductions gives them the right
        placement: row moments stay sharded like the rows, column moments (a reduction over the
        sharded dim) are replicated. The update rule itself is came-pytorch's, unchanged.
        """

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not self.state[p] and isinstance(p.grad, DTensor):
                        self.state[p].update(_dtensor_came_state(p.grad))
            return super().step(closure)

    return ShardedCAME


def _dtensor_came_state(grad: DTensor) -> dict:
    grad = grad.float()

    def zeros_of(t: DTensor) -> DTensor:
        if any(pl.is_partial() for pl in t.placements):
            t = t.redistribute(placements=[Replicate()] * t.device_mesh.ndim)
        return torch.zeros_like(t)

    state = {"step": 0, "RMS": 0, "exp_avg": torch.zeros_like(grad)}
    if grad.dim() >= 2:
        row, col = grad.mean(dim=-1), grad.mean(dim=-2)
        state.update(
            exp_avg_sq_row=zeros_of(row), exp_avg_sq_col=zeros_of(col),
            exp_avg_res_row=zeros_of(row), exp_avg_res_col=zeros_of(col),
        )  # fmt: skip
    else:
        state["exp_avg_sq"] = torch.zeros_like(grad)
    return state


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimArgs, train_steps: int):
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer takes `found_inf` (a device float; 1 skips the step) instead of a host decision:
    torch's fused AdamW / Adam and ptrain's BF16AdamW."""
    return bool(optimizer.defaults.get("fused")) or isinstance(optimizer, BF16AdamW)


def found_inf_for(params: list[torch.nn.Parameter], finite: torch.Tensor) -> torch.Tensor:
    """`found_inf` for an optimizer that skips on the device, on its parameters' device. With --fsdp_cpu_offload
    the parameters are on the CPU while `finite` (from the loss) is on the GPU: the copy is a blocking one, since
    torch's fused AdamW would copy it with non_blocking=True into pinned memory that its CPU kernel reads at once,
    before the copy has landed (a NaN step applied, or a good one skipped)."""
    found_inf = (~finite).float()
    p = params[0] if params else None
    local = p.to_local() if isinstance(p, DTensor) else p
    if local is not None and local.device != found_inf.device:
        found_inf = found_inf.to(local.device)  # one device sync per step, on the CPU-offload path only
    return found_inf


class PlannedAdamW8bit(torch.optim.Optimizer):
    """The memory planner's stand-in for bitsandbytes' AdamW8bit (CUDA only): the same optimizer state (two uint8
    moments per value and a float32 scale per 256-value block for tensors of at least 4096 values, two float32
    moments for smaller ones, as bitsandbytes' blockwise 8-bit optimizers keep them), without an update. Its
    kernel updates in registers, so the step allocates nothing else."""

    BLOCK, MIN_8BIT = 256, 4096

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self.state[p]:
                    continue
                local = p.to_local() if isinstance(p, DTensor) else p
                n, dev = local.numel(), local.device
                if n < self.MIN_8BIT:
                    self.state[p] = {"state1": torch.zeros(n, device=dev), "state2": torch.zeros(n, device=dev)}
                    continue
                blocks = -(-n // self.BLOCK)
                self.state[p] = {
                    "state1": torch.zeros(n, dtype=torch.uint8, device=dev),
                    "state2": torch.zeros(n, dtype=torch.uint8, device=dev),
                    "absmax1": torch.zeros(blocks, device=dev),
                    "absmax2": torch.zeros(blocks, device=dev),
                }
        return None
