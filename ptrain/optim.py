"""Optimizers (AdamW, Adam, CAME, 8-bit AdamW) and learning-rate schedules (diffusers.optimization)."""

from __future__ import annotations

import torch
from diffusers.optimization import get_scheduler

from ptrain.config import ConfigError, OptimArgs


def build_optimizer(params: list[torch.nn.Parameter], args: OptimArgs, device: torch.device) -> torch.optim.Optimizer:
    if not params:
        raise ConfigError("no trainable parameters (check --training_type and --target_modules)")
    betas = (args.beta1, args.beta2)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay)
    if args.optimizer == "came":
        try:
            from came_pytorch import CAME
        except ImportError as e:
            raise ConfigError("--optimizer came needs the came-pytorch package: pip install came-pytorch") from e
        return CAME(
            params,
            lr=args.lr,
            betas=(args.beta1, args.beta2, args.beta3),
            eps=(args.epsilon, 1e-16),
            weight_decay=args.weight_decay,
        )
    if args.optimizer == "adamw-8bit":
        if device.type != "cuda":
            raise ConfigError(
                "--optimizer adamw-8bit runs on CUDA only (bitsandbytes kernels); on this CPU use adamw or came"
            )
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError("--optimizer adamw-8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(
            params, lr=args.lr, betas=betas, eps=args.epsilon, weight_decay=args.weight_decay
        )
    raise ConfigError(f"--optimizer {args.optimizer!r} is not supported")


def build_scheduler(optimizer: torch.optim.Optimizer, args: OptimArgs, train_steps: int):
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=train_steps,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
