"""The supported model families: `--model_name` -> the module whose ModelSpec registers that name.

Light on purpose (no torch / diffusers imports): ptrain.config takes the `--model_name` choices from here.
`get_spec(name)` imports the module named here (which registers its spec with `@register`) and returns a new,
unbound spec. The model modules import ModelSpec from ptrain.models.spec; nothing here imports them but by
name, so the registry and the specs form no import cycle.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ptrain.errors import ConfigError

#: --model_name -> module defining its ModelSpec (the default, auto, reads the family from the checkpoint).
MODELS = {
    "ltx_video": "ptrain.models.ltx_video",
    "cogvideox": "ptrain.models.cogvideox",
    "hunyuan_video": "ptrain.models.hunyuan_video",
    "wan": "ptrain.models.wan",
}

MODEL_NAMES = tuple(MODELS)

#: The transformer class a diffusers checkpoint names (transformer/config.json `_class_name`, or model_index.json's
#: "transformer" entry) -> --model_name. Read by `resolve_model_name` for --model_name auto (the default).
TRANSFORMER_CLASSES = {
    "LTXVideoTransformer3DModel": "ltx_video",
    "CogVideoXTransformer3DModel": "cogvideox",
    "HunyuanVideoTransformer3DModel": "hunyuan_video",
    "WanTransformer3DModel": "wan",
}


def transformer_class(folder: str | Path, transformer_folder: str | Path | None = None) -> str | None:
    """The transformer class name a local diffusers checkpoint declares: `transformer_folder` (an
    --transformer_id folder, its config.json or its transformer/config.json) first, then the checkpoint's
    transformer/config.json, then its model_index.json; None when none says."""
    candidates = []
    if transformer_folder is not None:
        candidates += [Path(transformer_folder) / "transformer" / "config.json", Path(transformer_folder) / "config.json"]
    candidates.append(Path(folder) / "transformer" / "config.json")
    for path in candidates:
        name = _read_json(path).get("_class_name")
        if isinstance(name, str):
            return name
    entry = _read_json(Path(folder) / "model_index.json").get("transformer")
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolve_model_name(given: str, folder: str | Path, transformer_folder: str | Path | None = None) -> str:
    """--model_name for a local checkpoint: `given` ("auto": the family its transformer class names). A family
    that contradicts the checkpoint's transformer class is a ConfigError naming both."""
    cls = transformer_class(folder, transformer_folder)
    if cls and cls.startswith("FSDP") and cls[4:] in TRANSFORMER_CLASSES:  # a full export of ptrain before 0.x: it
        cls = cls[4:]  # named the class fully_shard had made of the diffusers one
    detected = TRANSFORMER_CLASSES.get(cls) if cls else None
    where = f"{folder}" + (f" (transformer {transformer_folder})" if transformer_folder else "")
    if given == "auto":
        if detected is None:
            what = f"its transformer is {cls}, which ptrain does not train" if cls else "it names no transformer class"
            raise ConfigError(f"--model_name auto: cannot tell the model family of {where}: {what}; pass --model_name "
                              f"(one of {', '.join(MODEL_NAMES)}) if it is one of them")  # fmt: skip
        return detected
    if detected is not None and detected != given:
        raise ConfigError(f"--model_name {given}, but {where} holds a {cls} ({detected}): pass --model_name "
                          f"{detected}, or leave the flag out (ptrain reads it from the checkpoint)")  # fmt: skip
    return given

_REGISTRY: dict[str, type] = {}  # name -> ModelSpec subclass


def register(cls: type) -> type:
    """Class decorator of each model module: makes its spec available to get_spec under `cls.name`."""
    _REGISTRY[cls.name] = cls
    return cls


def get_spec(name: str):
    """A new, unbound ModelSpec of the family `name` (ConfigError naming the choices for an unknown one)."""
    if name == "auto":
        raise ConfigError("--model_name auto was not resolved: pass --model_name (one of " + ", ".join(MODELS) + ")")
    if name not in MODELS:
        raise ConfigError(f"--model_name {name!r} is not supported; choose one of {sorted(MODELS)}")
    importlib.import_module(MODELS[name])  # the module registers its spec
    return _REGISTRY[name]()
