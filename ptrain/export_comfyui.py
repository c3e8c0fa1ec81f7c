"""A second LoRA file named the way ComfyUI loads it (`--export_comfyui`).

ptrain's regular export (`pytorch_lora_weights.safetensors`) uses diffusers' module names
(`transformer.blocks.0.attn1.to_q.lora_A.weight`). ComfyUI builds each model from its own code, whose
modules are named after the original checkpoints (`blocks.0.self_attn.q` for Wan), and matches a LoRA
key `diffusion_model.<its module name>.lora_A.weight` / `.lora_B.weight` against its weights
(comfy/lora.py `model_lora_keys_unet` and comfy/weight_adapter/lora.py in Comfy-Org/ComfyUI).

Each model spec says how its diffusers module names map to ComfyUI's with `comfyui_lora_rules(config)`,
a list of `Rule`s. A rule either renames a module, or fuses several diffusers modules into one ComfyUI
module (HunyuanVideo keeps q, k and v in one `qkv` Linear, and its single-stream blocks keep q, k, v and
the MLP input in one `linear1`). A fused LoRA is exact: its down matrix stacks the parts' down matrices
and its up matrix is block-diagonal, so `up @ down` equals the parts' updates stacked in the fused
weight's row order (rows of parts that were not trained stay zero). A diffusers module no rule covers is
an error naming it, never a key ComfyUI would silently skip.

Alpha: the file has no `.alpha` keys; each module's scale (lora_alpha / rank) is multiplied into its
up matrix instead, so `up @ down` is the whole update and loaders that assume scale 1 without an alpha
(ComfyUI uses 1.0 when `.alpha` is absent; diffusers' converters for these formats drop or reject
`.alpha` keys) all apply it exactly. Rank and lora_alpha are kept in the file's metadata.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptrain.export import sort_safetensors_metadata

COMFYUI_LORA_FILE = "pytorch_lora_weights_comfyui.safetensors"
COMFYUI_PREFIX = "diffusion_model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class Rule:
    """Diffusers module names that fully match `pattern` (a regex) become `target` (a `re.Match.expand`
    template, e.g. `blocks.\\1.self_attn.q`).

    For a fused ComfyUI module, `pattern` has a group named `part` and `parts` lists its values in the
    fused weight's row order with `sizes` their output rows (the target must not depend on `part`).
    `swap_halves`: the ComfyUI weight's output rows are the diffusers module's two halves swapped
    (e.g. HunyuanVideo's final modulation: diffusers (scale, shift), original (shift, scale)).
    """

    pattern: str
    target: str
    parts: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    swap_halves: bool = False

    def __post_init__(self) -> None:
        if len(self.parts) != len(self.sizes) or (self.parts and "(?P<part>" not in self.pattern):
            raise ValueError(f"Rule {self.pattern!r}: a fused rule needs a `part` group and one size per part")


def lora_scale(adapter_config: dict[str, Any], rank: int) -> float:
    """The factor peft multiplies `lora_B @ lora_A` by for a module of this rank."""
    if adapter_config.get("alpha_pattern") or adapter_config.get("rank_pattern"):
        raise ValueError("--export_comfyui: LoRA configs with alpha_pattern / rank_pattern are not supported")
    alpha = float(adapter_config["lora_alpha"])
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def _modules(lora: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{diffusers module name: (lora_A weight, lora_B weight)} from a diffusers-format LoRA state dict."""
    strip = "transformer." if all(k.startswith("transformer.") for k in lora) else ""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        name = key[len(strip) :]
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            raise ValueError(f"--export_comfyui: unsupported LoRA tensor {key} (only lora_A/lora_B weights)")
        found.setdefault(name[: -len(suffix)], {})[suffix] = value
    out = {}
    for module, pair in found.items():
        if len(pair) != 2:
            raise ValueError(f"--export_comfyui: {module} has only one of lora_A / lora_B")
        out[module] = (pair[".lora_A.weight"], pair[".lora_B.weight"])
    return out


def to_comfyui(
    lora: dict[str, torch.Tensor], adapter_config: dict[str, Any], rules: list[Rule], model: str = "this model"
) -> dict[str, torch.Tensor]:
    """Diffusers-format LoRA state dict -> ComfyUI-format one (`diffusion_model.<name>.lora_A/B.weight`)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, tuple[Rule, dict[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module, (down, up) in sorted(_modules(lora).items()):
        up = up * lora_scale(adapter_config, down.shape[0])
        for rule in rules:
            match = re.fullmatch(rule.pattern, module)
            if match:
                break
        else:
            raise ValueError(
                f"--export_comfyui: LoRA module {module} has no counterpart in ComfyUI's {model} naming; "
                "leave it out of --target_modules or drop --export_comfyui"
            )
        target = match.expand(rule.target)
        if rule.parts:
            group = fused.setdefault(target, (rule, {}))[1]
            group[match.group("part")] = (down, up)
            continue
        if rule.swap_halves:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        out[f"{COMFYUI_PREFIX}{target}.lora_A.weight"] = down.contiguous()
        out[f"{COMFYUI_PREFIX}{target}.lora_B.weight"] = up.contiguous()
    for target, (rule, parts) in fused.items():
        down, up = _fuse(target, rule, parts)
        out[f"{COMFYUI_PREFIX}{target}.lora_A.weight"] = down
        out[f"{COMFYUI_PREFIX}{target}.lora_B.weight"] = up
    return out


def _fuse(target: str, rule: Rule, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """One LoRA for a fused module: down = parts' downs stacked, up = block diagonal over the row layout."""
    present = [p for p in rule.parts if p in parts]
    for p in present:
        down, up = parts[p]
        if down.ndim != 2 or up.ndim != 2:
            raise ValueError(f"--export_comfyui: {target} ({p}) is not a Linear LoRA and cannot be fused")
        if up.shape[0] != rule.sizes[rule.parts.index(p)]:
            raise ValueError(
                f"--export_comfyui: {target}: part {p} has {up.shape[0]} output rows, "
                f"expected {rule.sizes[rule.parts.index(p)]}"
            )
    down = torch.cat([parts[p][0] for p in present], dim=0)
    up = down.new_zeros(sum(rule.sizes), down.shape[0])
    row_start = dict(zip(rule.parts, [sum(rule.sizes[:i]) for i in range(len(rule.parts))]))
    col = 0
    for p in present:
        part_up = parts[p][1]
        rows, rank = part_up.shape
        up[row_start[p] : row_start[p] + rows, col : col + rank] = part_up
        col += rank
    return down.contiguous(), up


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, transformer adapter config) of a diffusers `save_lora_weights` file."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no __iter__)
        packed = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    config = {k[len("transformer.") :]: v for k, v in packed.items() if k.startswith("transformer.")}
    if "lora_alpha" not in config:
        raise ValueError(f"{path}: no transformer adapter metadata (lora_alpha); was it written by ptrain?")
    return tensors, config


def export_comfyui_lora(spec, lora_file: str | Path, transformer_config, output: str | Path | None = None) -> Path:
    """Convert a diffusers-format LoRA file of `spec`'s model to ComfyUI's naming; returns the new file
    (default: `pytorch_lora_weights_comfyui.safetensors` next to `lora_file`)."""
    rules_fn = getattr(spec, "comfyui_lora_rules", None)
    if rules_fn is None:
        raise ValueError(f"--export_comfyui: no ComfyUI key naming is known for {spec.name}")
    lora, adapter_config = read_lora_file(lora_file)
    converted = to_comfyui(lora, adapter_config, rules_fn(transformer_config), spec.name)
    output = Path(output) if output is not None else Path(lora_file).with_name(COMFYUI_LORA_FILE)
    info = {
        "model": spec.name,
        "rank": adapter_config.get("r"),
        "lora_alpha": adapter_config.get("lora_alpha"),
        "alpha": "lora_alpha / rank is folded into each lora_B (no .alpha keys: scale 1)",
    }
    save_file(converted, str(output), metadata={"format": "pt", "ptrain_comfyui": json.dumps(info)})
    sort_safetensors_metadata(output)
    return output
