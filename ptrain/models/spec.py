"""The ModelSpec contract: everything model-specific the training loop needs.

The loop never branches on the model name. A spec loads the components with
diffusers/transformers `from_pretrained`, encodes text and video (frozen
encoders), builds the transformer input and training target, names the
repeated blocks that get activation checkpointing / compile / fully_shard, and
knows the diffusers pipeline used to export and reload LoRA weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Components:
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Conditioning:
    """Text conditioning for one micro-batch, already on the training device."""

    tensors: dict[str, torch.Tensor]


class ModelSpec(ABC):
    name: str
    pipeline_cls: type
    transformer_cls: type
    #: LoRA targets when --target_modules is not given.
    default_target_modules: list[str]
    #: Attribute names of the nn.ModuleLists holding the repeated transformer blocks.
    block_attrs: tuple[str, ...]
    default_max_sequence_length: int = 128
    #: What the transformer is trained to predict: "flow" (noise - data) for flow matching.
    objective: str = "flow"

    @abstractmethod
    def load_components(self, path: str, dtypes: dict[str, torch.dtype], device: torch.device) -> Components: ...

    @abstractmethod
    def check_shape(self, num_frames: int, height: int, width: int, components: Components) -> None:
        """Raise ConfigError naming the flag when the video shape does not suit the model."""

    @abstractmethod
    def encode_text(self, components: Components, captions: list[str], max_sequence_length: int) -> Conditioning: ...

    @abstractmethod
    def encode_video(
        self, components: Components, video: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """video: (B, C, F, H, W) in [-1, 1] -> normalised latents (B, C', F', H', W') in float32."""

    @abstractmethod
    def forward(
        self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """Run the transformer; returns the prediction with the latents' shape."""

    def bind(self, components: Components) -> None:
        """Remember what forward() needs from the frozen components (called once after loading)."""

    def tokens_per_sample(self, latent_shape: tuple[int, ...], components: Components) -> int:
        """Transformer sequence length of one sample (for tokens/s and MFU)."""
        c, f, h, w = latent_shape[-4:]
        cfg = components.transformer.config
        return (f // cfg.get("patch_size_t", 1)) * (h // cfg.patch_size) * (w // cfg.patch_size)

    def blocks(self, transformer: nn.Module) -> list[nn.ModuleList]:
        return [getattr(transformer, a) for a in self.block_attrs]


_REGISTRY: dict[str, type[ModelSpec]] = {}


def register(cls: type[ModelSpec]) -> type[ModelSpec]:
    _REGISTRY[cls.name] = cls
    return cls


def get_spec(name: str) -> ModelSpec:
    from ptrain.models import ltx_video  # noqa: F401  (registers itself)

    if name not in _REGISTRY:
        raise ValueError(f"--model_name {name!r} is not supported; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]()
