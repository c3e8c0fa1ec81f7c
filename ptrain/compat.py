"""Command lines from other trainers: their flag names mapped onto ptrain's, before parsing.

finetrainers, VideoX-Fun (scripts/*/train.py), the CogVideoX diffusers and finetune scripts and musubi-tuner
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

_DTYPES = {"no": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_COGVIDEO_NAMES = ("cogvideox-2b", "cogvideox-5b", "cogvideox-5b-i2v", "cogvideox1.5-5b", "cogvideox1.5-5b-i2v")

#: Values other trainers use for ptrain flags, per ptrain flag (an alias's values too: keyed by ptrain's name).
VALUE_MAPS = {
    "--transformer_dtype": _DTYPES,
    "--vae_dtype": _DTYPES,
    "--text_encoder_dtype": _DTYPES,
    "--text_encoder_2_dtype": _DTYPES,
    "--optimizer": {"adamw": "adamw", "adam": "adam", "came": "came", "adamw8bit": "adamw-8bit"},
    "--training_type": {"sft": "full-finetune"},  # CogVideo's finetune scripts
    "--train_mode": {"t2v": "normal"},  # CogVideo's --model_type t2v | i2v
    "--model_name": dict.fromkeys(_COGVIDEO_NAMES, "cogvideox"),  # CogVideo's --model_name (the size is the folder's)
}

#: Other trainers' flags renamed here rather than by a tyro alias, because their values go through VALUE_MAPS
#: first (tyro's choices would reject them).
RENAMES = {"--mixed_precision": "--transformer_dtype", "--model_type": "--train_mode"}

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
    "--tracker_name": "the W&B project is set with the WANDB_PROJECT environment variable (with --report_to wandb); "
    "tensorboard logs go to --output_dir/logs",
    # CogVideo's finetune scripts (train.py)
    "--validation_dir": "give validation prompts as text (--validation_prompts 'a cat:::a dog') or as a file "
    "(--validation_dataset_file prompts.txt, one per line; or a table), images with --validation_images",
    "--do_validation": "validation runs when --validation_prompts or --validation_dataset_file is given, every "
    "--validation_steps",
    "--gen_fps": "validation videos are written at the model's own frame rate",
    "--pin_memory": "ptrain pins the loader's memory by itself on CUDA",
    # musubi-tuner
    "--dit": "the transformer comes from --pretrained_model_name_or_path (a diffusers folder or hub id); a "
    "fine-tuned transformer in diffusers format: --transformer_id",
    "--output_name": "the LoRA is written as --output_dir/pytorch_lora_weights.safetensors (diffusers' name; "
    "--export_comfyui adds a ComfyUI file)",
    "--sdpa": "ptrain uses PyTorch's SDPA already; --attention_backend picks its kernel",
    "--fp8_base": "FP8 storage of the frozen transformer: --layerwise_upcasting_modules transformer",
    "--timestep_sampling": "timesteps are drawn by --flow_weighting_scheme (none: uniform; logit_normal: a "
    "logit-normal density, --flow_logit_mean / --flow_logit_std) and shifted by --flow_shift",
    "--dit_high_noise": "a Wan 2.2 A14B diffusers folder holds both experts (transformer/: high noise, "
    "transformer_2/: low noise): train one per run with --expert high_noise or --expert low_noise",
    "--timestep_boundary": "the experts' boundary is the checkpoint's boundary_ratio (model_index.json): --expert "
    "trains one side of it; --min_timestep / --max_timestep set another range",
    "--offload_inactive_dit": "ptrain trains one Wan 2.2 expert per run (--expert); the other is loaded only to "
    "validate, in CPU memory, a layer at a time on the GPU",
    "--preserve_distribution_shape": "--min_timestep / --max_timestep always keep the timestep density's shape "
    "(it is truncated to the range): remove it",
    "--save_every_n_epochs": "--checkpointing_epochs N saves resumable checkpoints; --export_every_checkpoint also "
    "writes the weights each time",
    "--save_every_n_steps": "--checkpointing_steps N saves resumable checkpoints; --export_every_checkpoint also "
    "writes the weights each time",
    "--save_state": "ptrain's checkpoints always hold the whole training state (weights, optimizer, schedule, data "
    "position, random state): --checkpointing_steps N",
    "--save_last_n_steps": "--checkpointing_limit N keeps the newest N checkpoints (a count, not a step distance)",
    "--save_last_n_epochs": "--checkpointing_limit N keeps the newest N checkpoints (a count, not an epoch distance)",
    "--network_module": "LoRA is ptrain's default training type (--training_type lora): remove it",
    "--network_weights": "ptrain starts new LoRA adapters; it continues its own runs from their checkpoints "
    "(--resume_from_checkpoint latest), not from a LoRA file",
    "--network_args": "LoRA's options are flags here: --target_modules, --rank, --lora_alpha",
    "--network_dropout": "ptrain's LoRA adapters have no dropout: remove it",
    "--sample_prompts": "the prompt file's per-line options (--w, --h, --f, --d, ...) are not read: give prompts "
    "with --validation_prompts 'a cat:::a dog' or --validation_dataset_file prompts.txt (one per line), the size "
    "with --validation_height / --validation_width / --validation_num_frames",
    "--persistent_data_loader_workers": "ptrain's loader workers always persist between epochs: remove it",
    "--xformers": "ptrain uses PyTorch's SDPA: --attention_backend picks its kernel (flash, efficient, cudnn, math)",
    "--flash_attn": "ptrain uses PyTorch's SDPA: --attention_backend flash picks its flash kernel",
    "--flash3": "ptrain uses PyTorch's SDPA: --attention_backend picks its kernel (flash, efficient, cudnn, math)",
    "--sage_attn": "ptrain uses PyTorch's SDPA: --attention_backend picks its kernel (flash, efficient, cudnn, math)",
    "--task": "the model is read from its diffusers folder or hub id (--pretrained_model_name_or_path; --model_name "
    "auto names the family, the folder's configs its size): remove it",
    # VideoX-Fun
    "--config_path": "the model's config is read from its diffusers folder (--pretrained_model_name_or_path); "
    "ptrain's own presets: --config FILE.toml",
    "--vae_mini_batch": "the VAE encodes one sample at a time; --enable_slicing / --enable_tiling bound its memory",
    "--low_vram": "--offload_encoders keeps the VAE and text encoders in CPU memory between uses (precomputation, "
    "on by default for runs of more than one pass, also moves them off the GPU); for the transformer: "
    "--blocks_to_swap, --fsdp_cpu_offload, --ac_mode auto (the dry run plans them)",
    "--motion_sub_loss": "ptrain has no motion sub-loss (its loss is the model's flow-matching or diffusion loss)",
    # diffusers example scripts
    "--random_flip": "ptrain does not flip samples",
    "--allow_tf32": "ptrain leaves PyTorch's float32 matmul precision as it is; it trains in --transformer_dtype",
    "--dataset_name": "there is no dataset download: give a local folder (--data_root) or table (--dataset_file)",
    "--use_dynamic_cfg": "validation samples with the pipeline's defaults and --validation_guidance_scale",
    # finetrainers
    "--caption_dropout_technique": "--caption_dropout_p trains the dropped samples with the empty caption's "
    "embedding (finetrainers' 'empty')",
    "--precomputation_items": "--enable_precomputation auto|on|off encodes every sample once before training",
    "--precomputation_once": "--enable_precomputation auto|on|off encodes every sample once before training",
    "--dataset_shuffle_buffer_size": "ptrain shuffles the whole dataset with a seeded sampler: there is no buffer",
    "--enable_model_cpu_offload": "--offload_encoders keeps the VAE and text encoders in CPU memory between uses "
    "(precomputation, on by default for runs of more than one pass, also moves them off the GPU)",
    "--remove_common_llm_caption_prefixes": "ptrain trains the captions as written: edit them first",
    # finetrainers' parallel setup
    "--parallel_backend": "ptrain runs on torch.distributed itself (launch with torchrun): remove it",
    "--pp_degree": "ptrain has no pipeline parallelism: shard with --dp_shards (FSDP2) and split sequences with "
    "--cp_degree",
    "--tp_degree": "ptrain has no tensor parallelism: shard with --dp_shards (FSDP2) and split sequences with "
    "--cp_degree",
    "--nccl_timeout": "use --dist_timeout_s (seconds, for every collective)",
    "--init_timeout": "use --dist_timeout_s (seconds, for every collective)",
}

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
        canonical = RENAMES.get(name) or aliases.get(name, name)
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
        if name == "--train_resolution":  # CogVideo's finetune scripts: FxHxW
            value = inline if inline is not None else (argv[i + 1] if i + 1 < len(argv) else "")
            parts = value.lower().split("x")
            if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
                raise ConfigError(f"--train_resolution {value!r}: give frames x height x width, e.g. 49x480x720 "
                                  "(ptrain's --num_frames, --height, --width)")  # fmt: skip
            f, h, w = (p.strip() for p in parts)
            out += ["--num_frames", f, "--height", h, "--width", w]
            notes.append(f"--train_resolution {value} -> --num_frames {f} --height {h} --width {w}")
            i += 1 if inline is not None else 2
            continue
        if name in aliases:
            notes.append(f"{name} -> {aliases[name]}")
        target = RENAMES.get(name, name)
        if target != name:
            notes.append(f"{name} -> {target}")
        out.append(target if inline is None else f"{target}={inline}")
        i += 1
        values = VALUE_MAPS.get(canonical)
        if name == _MIXED_PRECISION:  # its values, named with it (tyro's error would name --transformer_dtype's)
            raw = inline if inline is not None else argv[i] if i < len(argv) else ""
            if values.get(raw.lower(), raw) not in _DTYPES.values():
                raise ConfigError(f"--mixed_precision {raw!r}: give no, fp16 or bf16 (it sets --transformer_dtype "
                                  "float32, float16 or bfloat16); FP8 storage of the frozen weights is "
                                  "--layerwise_upcasting_modules transformer")  # fmt: skip
        if values is not None:
            # translate the value (inline or next argument) when it is another trainer's spelling
            if inline is not None:
                out[-1] = f"{target}={values.get(inline.lower(), inline)}"
            elif i < len(argv) and not argv[i].startswith("--"):
                value = argv[i]
                mapped = values.get(value.lower(), value)
                if canonical == "--optimizer" and value.lower() == "prodigy":
                    raise ConfigError("--optimizer prodigy is not supported: use adamw, adam, came or adamw-8bit")
                if mapped != value:
                    notes.append(f"{name} {value} -> {canonical} {mapped}")
                out.append(mapped)
                i += 1
    given = {_split(a)[0] for a in argv}
    if "--fps" in given and "--max_num_frames" in given:  # the CogVideoX diffusers script's command line
        notes.append("--fps resamples every clip to that frame rate and takes --num_frames consecutive frames from "
                     "its start (clips shorter than num_frames / fps are skipped); the CogVideoX diffusers script "
                     "used its --fps only for its exported videos and spread the frames over the whole clip, as "
                     "ptrain does without --fps")  # fmt: skip
    if _MIXED_PRECISION in argv or any(a.startswith(_MIXED_PRECISION + "=") for a in argv):
        notes.append(
            "--mixed_precision sets the transformer's compute dtype (--transformer_dtype); the VAE and text "
            "encoders have their own --vae_dtype / --text_encoder_dtype"
        )
    return out, notes
