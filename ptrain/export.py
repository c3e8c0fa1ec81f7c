"""Export trained weights in diffusers format from a sharded (FSDP2 / replicate) transformer.

The full state dict comes from torch.distributed.checkpoint's `get_model_state_dict` (full_state_dict with
cpu_offload): a collective that gathers the tensors one at a time, and only rank 0 keeps CPU copies, so no rank
other than 0 ever holds the full model. The LoRA file's keys are peft's (`get_peft_model_state_dict`), the format
diffusers' `save_lora_weights` takes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict
from safetensors import SafetensorError
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ptrain.collective import raise_if_any_failed
from ptrain.parallel.names import clean_name

log = logging.getLogger(__name__)


def sort_safetensors_metadata(path: str | Path) -> None:
    """Rewrite a safetensors file's header with its metadata keys sorted.

    safetensors writes the metadata map in hash order, which changes from process to process; sorted, the same
    weights give the same bytes, so a file hash can prove two trainings (e.g. an uninterrupted and a resumed one)
    equal. The tensors and their offsets are untouched."""
    path = Path(path)
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n), object_pairs_hook=dict)
        meta = header.pop("__metadata__", None)
        if not meta:
            return
        new = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"))
        raw = new.encode()
        if len(raw) <= n:  # same content, so normally the same length: pad with spaces as safetensors does
            f.seek(8)
            f.write(raw + b" " * (n - len(raw)))
            return
        data = f.read()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    os.replace(tmp, path)


ADAPTER = "default"  # the adapter name diffusers' add_adapter uses


def _full_state_dict(transformer: torch.nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """Collective: the transformer's full state dict (only its trainable parameters with `trainable_only`), keys
    as in a diffusers checkpoint, every tensor float32, contiguous and with its own storage (as safetensors needs)
    on rank 0; {} on the other ranks."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(transformer, options=options)
    for name, t in state.items():  # in place, one at a time: at most one extra copy while converting
        t = t.detach().to(torch.float32).contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger (e.g. padded) buffer
        state[name] = t
    return state


def _lora_state_dict(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of `state` (a full state dict) in diffusers' LoRA key format: peft's
    `get_peft_model_state_dict`, which drops the adapter name (`...lora_A.default.weight` -> `...lora_A.weight`).

    peft finds the adapter weights by the module names the model has; activation checkpointing puts a wrapper
    module into those names (`blocks.0._checkpoint_wrapped_module.attn1...`) that state dict keys do not have, so
    peft gets the trainable parameters under their module names and the wrappers are dropped afterwards."""
    from peft import get_peft_model_state_dict

    by_module_name = {n: state[clean_name(n)] for n, p in transformer.named_parameters() if p.requires_grad}
    lora = get_peft_model_state_dict(
        transformer, state_dict=by_module_name, adapter_name=ADAPTER, save_embedding_layers=False
    )
    return {clean_name(k): v for k, v in lora.items()}


INPUT_LAYER_FILE = "input_layer.safetensors"

#: What a failed write raises: OSError, and safetensors' own error for an I/O failure while serialising (disk
#: full, file too large), which is not an OSError.
WRITE_ERRORS = (OSError, SafetensorError)


def export_lora(
    transformer: torch.nn.Module, pipeline_cls, output_dir: Path, expanded_input: str | None = None
) -> Path | None:
    """Trainable (LoRA) weights -> output_dir/pytorch_lora_weights.safetensors with lora_alpha metadata.

    When --train_mode widened the input layer (`expanded_input`, trained fully beside the adapters), that layer
    goes to output_dir/input_layer.safetensors with the module name and the new in_channels in its metadata:
    `load_expanded_transformer` puts it into the base transformer before diffusers loads the LoRA."""
    rank0 = dist.get_rank() == 0
    gathered = _full_state_dict(transformer, trainable_only=True)
    if rank0:
        lora = _lora_state_dict(transformer, gathered)
        # Sets (target_modules) sorted: the same training writes the same bytes in every process.
        meta = {
            k: sorted(v) if isinstance(v, set) else v for k, v in transformer.peft_config[ADAPTER].to_dict().items()
        }
        err = None
        try:
            pipeline_cls.save_lora_weights(
                output_dir, transformer_lora_layers=lora, transformer_lora_adapter_metadata=meta
            )
            if expanded_input:
                from safetensors.torch import save_file

                layer = {k: v for k, v in gathered.items() if k.startswith(expanded_input + ".")}
                info = {"module": expanded_input, "in_channels": str(transformer.config.in_channels)}
                save_file(layer, str(output_dir / INPUT_LAYER_FILE), metadata={"format": "pt", **info})
                sort_safetensors_metadata(output_dir / INPUT_LAYER_FILE)
            sort_safetensors_metadata(output_dir / "pytorch_lora_weights.safetensors")
        except WRITE_ERRORS as e:
            err = e
    raise_if_any_failed(err if rank0 else None, f"writing the LoRA export to {output_dir}")
    return output_dir / "pytorch_lora_weights.safetensors" if rank0 else None


def load_expanded_transformer(transformer_cls, pretrained: str | Path, lora_dir: str | Path, **kwargs):
    """The base (text-to-video) transformer with the widened input layer a LoRA run saved beside its adapters
    (input_layer.safetensors), ready for a diffusers image-to-video pipeline's `transformer=` and then
    `load_lora_weights(lora_dir)`. `kwargs` go to from_pretrained (e.g. torch_dtype)."""
    from safetensors import safe_open

    from ptrain.models.spec import expand_input_channels

    path = Path(lora_dir) / INPUT_LAYER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no widened input layer here (the run did not expand the transformer)")
    transformer = transformer_cls.from_pretrained(pretrained, subfolder="transformer", **kwargs)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    module, new = meta["module"], int(meta["in_channels"])
    old = int(transformer.config.in_channels)
    if transformer.config.get("out_channels", 0) is None:
        transformer.register_to_config(out_channels=old)
    layer = transformer.get_submodule(module)
    expand_input_channels(layer, old, new)
    transformer.register_to_config(in_channels=new)
    for name, value in tensors.items():
        param = layer.get_parameter(name[len(module) + 1 :])
        if param.shape != value.shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the transformer {tuple(param.shape)}")
        param.data.copy_(value.to(param.dtype))
    return transformer


def export_full(transformer: torch.nn.Module, output_dir: Path, max_shard_size: str = "10GB") -> Path | None:
    """Full transformer -> output_dir/transformer/ (config.json + safetensors shards, diffusers layout).

    Weights are written in float32 (the master copy) so small fine-tuning updates are not rounded away.
    """
    rank0 = dist.get_rank() == 0
    target = output_dir / "transformer"
    gathered = _full_state_dict(transformer)
    err = None
    if rank0:
        try:
            target.mkdir(parents=True, exist_ok=True)
            transformer.save_config(target)
            _name_the_model_class(transformer, target / "config.json")
            # quiet: its "saved to <staging folder>" names .export-tmp/, a folder the publish step empties (the
            # module's logger is named by its file path, not "huggingface_hub...")
            hub_log = getattr(sys.modules.get(save_torch_state_dict.__module__), "logger", None)
            hub_log = hub_log if isinstance(hub_log, logging.Logger) else logging.getLogger("huggingface_hub")
            level = hub_log.level
            hub_log.setLevel(max(hub_log.getEffectiveLevel(), logging.WARNING))
            try:
                save_torch_state_dict(
                    gathered,
                    target,
                    filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                    max_shard_size=max_shard_size,
                    metadata={"format": "pt"},
                )
            finally:
                hub_log.setLevel(level)
        except WRITE_ERRORS as e:
            err = e
    raise_if_any_failed(err, f"writing the transformer export to {target}")
    return target if rank0 else None


def _name_the_model_class(transformer: torch.nn.Module, config: Path) -> None:
    """config.json's `_class_name` is the diffusers class, not the class fully_shard made of it (`FSDP<Class>`,
    which diffusers' save_config writes): AutoModel and ptrain's --model_name auto resolve the class from it."""
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(transformer).__mro__ if not issubclass(c, FSDPModule))
    data = json.loads(config.read_text())
    if data.get("_class_name") != cls.__name__:
        data["_class_name"] = cls.__name__
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


EXPORT_MARKER = "ptrain_export.json"


def begin_export(output_dir: Path) -> Path:
    """Collective: a fresh staging folder output_dir/.export-tmp for `publish_export`."""
    staging = Path(output_dir) / ".export-tmp"
    err = None
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            err = e
    raise_if_any_failed(err, f"creating the export's staging folder {staging}")
    return staging


def publish_export(staging: Path, output_dir: Path, step: int) -> None:
    """Collective: move what was exported into `staging` to output_dir (each file or folder replaced whole), then
    write EXPORT_MARKER listing the files and sizes. The old marker goes first, so an export cut off half-way is
    never taken for complete (`export_complete`), and a re-run exports again."""
    err = None
    if dist.get_rank() == 0:
        try:
            before = _exported_names(output_dir)
            (output_dir / EXPORT_MARKER).unlink(missing_ok=True)
            files = {}
            entries = sorted(staging.iterdir())
            for name in sorted(before - {e.name for e in entries}):  # the previous export's, not written again
                old = output_dir / name
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)
                log.info("removed %s: the previous export wrote it, this one (step %d) does not", old, step)
            for entry in entries:
                dest = output_dir / entry.name
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
                found = [dest] if dest.is_file() else sorted(f for f in dest.rglob("*") if f.is_file())
                files.update({str(f.relative_to(output_dir)): f.stat().st_size for f in found})
            tmp = output_dir / (EXPORT_MARKER + ".tmp")
            tmp.write_text(json.dumps({"step": step, "files": files}, indent=2))
            os.replace(tmp, output_dir / EXPORT_MARKER)
            staging.rmdir()
        except OSError as e:
            err = e
    raise_if_any_failed(err, f"publishing the export in {output_dir}")


def _exported_names(output_dir: Path) -> set[str]:
    """The files and folders directly in output_dir that its last export (EXPORT_MARKER) wrote; none if unknown."""
    try:
        listed = json.loads((output_dir / EXPORT_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    names = {Path(f).parts[0] for f in listed if isinstance(f, str) and Path(f).parts}
    kept = ("", ".", "..", EXPORT_MARKER, "checkpoints", "precomputed", "logs", "validation")  # never an export's
    return {n for n in names if n not in kept and "/" not in n}


def export_complete(output_dir: Path, step: int) -> bool:
    """Whether output_dir holds a complete export of `step` (its marker and every file it lists, same sizes)."""
    try:
        marker = json.loads((Path(output_dir) / EXPORT_MARKER).read_text())
        files = marker["files"]
        return (
            marker["step"] == step
            and bool(files)
            and all(
                (Path(output_dir) / f).is_file() and (Path(output_dir) / f).stat().st_size == n
                for f, n in files.items()
            )
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False
