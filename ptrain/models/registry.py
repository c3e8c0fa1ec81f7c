"""The supported model families: `--model_name` -> the module whose ModelSpec registers that name.

Light on purpose (no torch / diffusers imports): ptrain.config takes the `--model_name` choices from here.
`get_spec(name)` imports the module named here (which registers its spec with `@register`) and returns a new,
unbound spec. The model modules import ModelSpec from ptrain.models.spec; nothing here imports them but by
name, so the registry and the specs form no import cycle.
"""

from __future__ import annotations

import importlib

from ptrain.errors import ConfigError

#: --model_name -> module defining its ModelSpec (the first is the default).
MODELS = {
    "ltx_video": "ptrain.models.ltx_video",
    "cogvideox": "ptrain.models.cogvideox",
    "hunyuan_video": "ptrain.models.hunyuan_video",
    "wan": "ptrain.models.wan",
}

MODEL_NAMES = tuple(MODELS)

_REGISTRY: dict[str, type] = {}  # name -> ModelSpec subclass


def register(cls: type) -> type:
    """Class decorator of each model module: makes its spec available to get_spec under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def get_spec(name: str):
    """A new, unbound ModelSpec of the family `name` (ConfigError naming the choices for an unknown one)."""
    if name not in MODELS:
        raise ConfigError(f"--model_name {name!r} is not supported; choose one of {sorted(MODELS)}")
    importlib.import_module(MODELS[name])  # the module registers its spec
    return _REGISTRY[name]()
