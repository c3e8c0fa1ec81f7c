"""Command lines from other trainers: their flag names mapped onto ptrain's, before parsing.

finetrainers, VideoX-Fun (scripts/*/train.py) and the CogVideoX diffusers scripts
name the same settings differently. A pure rename (`--train_batch_size` for
`--batch_size`) is a tyro alias on the field in ptrain.config, which parses it
(and `--help` lists it); here it only gets its log note. What an alias cannot
do is done here: value translation where the vocabularies differ (e.g.
`--mixed_precision bf16` -> `--transformer_dtype bfloat16`), switches that
select a value, and flags that have no meaning here, rejected with what
replaces them — never silently ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from ptrain.errors import ConfigError

log = logging.getLogger("ptrain")

#: A value-less switch that selects a ptrain flag value.
SWITCHES = {
    "--use_8bit_adam": ("--optimizer", "adamw-8bit"),
    "--use_came": ("--optimizer", "came"),
    "--precompute_conditions": ("--enable_precomputation", "on"),  # finetrainers
}

#: Values other trainers use for ptrain flags, per ptrain flag.
VALUE_MAPS = {
    "--transformer_dtype": {"no": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"},
    "--optimizer": {"adamw": "adamw", "adam": "adam", "came": "came", "adamw8bit": "adamw-8bit"},
}

#: Flags from accelerate / DeepSpeed launch setups and hub uploads: what ptrain does instead.
REJECTED = {
    "--use_deepspeed": "ptrain shards with FSDP2 instead of DeepSpeed: use --dp_shards N (ZeRO-3-like) or -1 for all ranks",
    "--deepspeed": "ptrain shards with FSDP2 instead of DeepSpeed: use --dp_shards N (ZeRO-3-like) or -1 for all ranks",
    "--deepspeed_config": "ptrain shards with FSDP2 instead of DeepSpeed: use --dp_shards N (ZeRO-3-like) or -1",
    "--config_file": "accelerate config files are not used: launch with torchrun and set --dp_degree/--dp_shards",
    "--use_fsdp": "FSDP2 is always used when sharding: set --dp_shards (and --dp_degree for HSDP)",
    "--multi_gpu": "launch with `torchrun --nproc_per_node N -m ptrain ...`",
    "--num_processes": "launch with `torchrun --nproc_per_node N -m ptrain ...`",
    "--push_to_hub": "ptrain does not upload; outputs are in --output_dir",
    "--hub_token": "ptrain does not upload; outputs are in --output_dir",
    "--hub_model_id": "ptrain does not upload; outputs are in --output_dir",
    "--cache_dir": "ptrain uses the standard Hugging Face cache: set HF_HUB_CACHE (or HF_HOME) to move it",
    "--scale_lr": "give the learning rate you want with --lr (ptrain does not rescale it by batch size)",
    "--logging_dir": "tensorboard logs go to --output_dir/logs",
    "--tracker_name": "tensorboard logs go to --output_dir/logs",
    # finetrainers' parallel setup
    "--parallel_backend": "ptrain runs on torch.distributed itself (launch with torchrun): remove it",
    "--pp_degree": "ptrain has no pipeline parallelism: shard with --dp_shards (FSDP2) and split sequences with "
    "--cp_degree",
    "--tp_degree": "ptrain has no tensor parallelism: shard with --dp_shards (FSDP2) and split sequences with "
    "--cp_degree",
    "--nccl_timeout": "use --dist_timeout_s (seconds, for every collective)",
    "--init_timeout": "use --dist_timeout_s (seconds, for every collective)",
}

#: Renamed here rather than a tyro alias of --transformer_dtype: its values (no, fp16, bf16) go through
#: VALUE_MAPS first, which tyro's choices would reject; it also gets a note on what it does not set.
_MIXED_PRECISION = "--mixed_precision"


def _split(arg: str) -> tuple[str, str | None]:
    if arg.startswith("--") and "=" in arg:
        name, value = arg.split("=", 1)
        return name, value
    return arg, None


def translate_argv(argv: list[str], aliases: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """-> (argv for tyro, notes on what was translated). Raises ConfigError for rejected flags.

    `aliases` (ptrain.config.alias_targets: other trainer's name -> ptrain flag) are left for tyro to parse; each
    use gets a note."""
    out: list[str] = []
    notes: list[str] = []
    spelled: dict[str, str] = {}  # ptrain flag -> the name it was first given by
    i = 0
    while i < len(argv):
        name, inline = _split(argv[i])
        canonical = "--transformer_dtype" if name == _MIXED_PRECISION else aliases.get(name, name)
        if name.startswith("--") and spelled.setdefault(canonical, name) != name:
            # the same setting under two names (e.g. --lr and --learning_rate): one would silently win
            raise ConfigError(f"{spelled[canonical]} and {name} are the same setting ({canonical}): give it once")
        if name in REJECTED:
            raise ConfigError(f"{name} is not a ptrain flag: {REJECTED[name]}")
        if name in SWITCHES:
            flag, value = SWITCHES[name]
            out += [flag, value]
            notes.append(f"{name} -> {flag} {value}")
            i += 1
            continue
        if name in aliases:
            notes.append(f"{name} -> {aliases[name]}")
        target = "--transformer_dtype" if name == _MIXED_PRECISION else name
        if target != name:
            notes.append(f"{name} -> {target}")
        out.append(target if inline is None else f"{target}={inline}")
        i += 1
        if target in VALUE_MAPS and i <= len(argv):
            # translate the value (inline or next argument) when it is another trainer's spelling
            if inline is not None:
                out[-1] = f"{target}={VALUE_MAPS[target].get(inline.lower(), inline)}"
            elif i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                mapped = VALUE_MAPS[target].get(value.lower(), value)
                if value.lower() == "prodigy":
                    raise ConfigError("--optimizer prodigy is not supported: use adamw, adam, came or adamw-8bit")
                if mapped != value:
                    notes.append(f"{target} {value} -> {mapped}")
                out.append(mapped)
                i += 1
    if _MIXED_PRECISION in argv or any(a.startswith(_MIXED_PRECISION + "=") for a in argv):
        notes.append(
            "--mixed_precision sets the transformer's compute dtype (--transformer_dtype); the VAE and text "
            "encoders have their own --vae_dtype / --text_encoder_dtype"
        )
    return out, notes
