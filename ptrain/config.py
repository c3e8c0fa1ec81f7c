"""The single source of every flag and default.

Flags are grouped in dataclasses for `--help` readability but are flat on the
command line (`--dp_degree 2`, not `--parallel.dp_degree 2`). A TOML preset
given with `--config FILE` supplies defaults; explicit flags override it.
Validation that needs no process group happens here, once, in `validate()`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import tyro

from ptrain.compat import REJECTED, RENAMES, translate_argv
from ptrain.errors import ConfigError  # re-exported: `from ptrain.config import ConfigError` keeps working
from ptrain.hub import is_hub_id, split_id
from ptrain.models.registry import MODEL_NAMES, resolve_model_name

DTYPES = Literal["float32", "bfloat16", "float16"]
#: --model_name choices: auto (read from the checkpoint) and the model registry's names.
MODEL_NAME = Literal[("auto", *MODEL_NAMES)]


#: --inpaint_mask_probs keys (ptrain.models.conditioning draws them).
MASK_TYPES = ("block", "frames", "first_frame", "full")


def _alias(*names: str) -> Any:
    """Other trainers' names for a flag (same meaning, same values): tyro accepts them and `--help` lists them;
    ptrain.compat notes each use (see alias_targets)."""
    return tyro.conf.arg(aliases=names)


def _check_min(minimum: int, *flags: tuple[str, float | None]) -> None:
    """ConfigError for the first (flag, value) below minimum; None means not set."""
    for flag, value in flags:
        if value is not None and value < minimum:
            raise ConfigError(f"{flag} must be >= {minimum}, got {value}")


@dataclass
class ModelArgs:
    model_name: MODEL_NAME = "auto"
    """Model family to train; auto: the one the checkpoint's transformer class names (LTXVideoTransformer3DModel ->
    ltx_video, CogVideoXTransformer3DModel -> cogvideox, HunyuanVideoTransformer3DModel -> hunyuan_video,
    WanTransformer3DModel -> wan). A family that contradicts the checkpoint is an error."""
    pretrained_model_name_or_path: Annotated[str | None, _alias("--model_path")] = None
    """Diffusers-format checkpoint: a local folder (model_index.json, transformer/, vae/, ...) or a hub id
    (org/name, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers) fetched into the Hugging Face cache (HF_HOME / HF_HUB_CACHE;
    HF_HUB_OFFLINE=1 reads the cache only)."""
    revision: str | None = None
    """Branch, tag or commit of the --pretrained_model_name_or_path hub id (default: main); an --*_id hub id takes
    its own as org/name@REVISION."""
    variant: str | None = None
    """Load the weight files of this variant (e.g. fp16, bf16: diffusion_pytorch_model.fp16.safetensors) of every
    component with weights, from a hub id or a local folder; hub downloads fetch only those files."""
    transformer_id: str | None = None
    """Load the transformer from this folder or hub id instead (its transformer/ subfolder if it has one)."""
    vae_id: str | None = None
    """Load the VAE from this folder or hub id instead (its vae/ subfolder if it has one)."""
    text_encoder_id: str | None = None
    """Load the text encoder from this folder or hub id instead (its text_encoder/ subfolder if it has one)."""
    tokenizer_id: str | None = None
    """Load the tokenizer from this folder or hub id instead (its tokenizer/ subfolder if it has one)."""
    text_encoder_2_id: str | None = None
    """Load the second text encoder (HunyuanVideo's CLIP) from this folder or hub id instead."""
    tokenizer_2_id: str | None = None
    """Load the second tokenizer (HunyuanVideo's CLIP) from this folder or hub id instead."""
    transformer_dtype: DTYPES = "bfloat16"
    """dtype of the trainable transformer's compute (FSDP2 param dtype); master weights stay float32."""
    text_encoder_dtype: DTYPES = "bfloat16"
    """dtype of the frozen text encoder."""
    text_encoder_2_dtype: DTYPES = "bfloat16"
    """dtype of the frozen second text encoder (HunyuanVideo's CLIP)."""
    vae_dtype: DTYPES = "bfloat16"
    """dtype of the frozen VAE."""
    layerwise_upcasting_modules: list[Literal["transformer"]] | None = None
    """Store these components' frozen Linear/Conv weights in --layerwise_upcasting_storage_dtype (LoRA only);
    FSDP2 upcasts them to --transformer_dtype when it gathers them for compute."""
    layerwise_upcasting_storage_dtype: Literal["float8_e4m3fn", "float8_e5m2"] = "float8_e4m3fn"
    """FP8 storage dtype for --layerwise_upcasting_modules."""
    layerwise_upcasting_skip_modules_pattern: list[str] = field(
        default_factory=lambda: ["pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"]
    )
    """Regexes of module names kept in their dtype (diffusers' defaults: embeddings, norms, in/out projections)."""
    train_mode: Literal["normal", "i2v", "inpaint"] = "normal"
    """normal: text-to-video. i2v: image-to-video, conditioned on the clip's first frame as the model's diffusers
    image-to-video pipeline conditions it. inpaint: conditioned on the clip with a random part masked out
    (VideoX-Fun InP style: mask and masked-video latents on the input channels; LTX-Video: clean given tokens).
    A text-to-video checkpoint gets zero-initialised extra input channels where the mode needs them."""
    inpaint_mask_probs: str = "block=0.3,frames=0.2,first_frame=0.4,full=0.1"
    """--train_mode inpaint: relative probabilities of the mask types, as type=weight pairs: block (a rectangle
    generated in every frame), frames (a range of frames generated), first_frame (only the first frame given),
    full (nothing given). Types left out are not drawn."""
    training_type: Literal["lora", "full-finetune"] = "lora"
    """LoRA adapters on a frozen base, or full fine-tuning of the transformer."""
    expert: Literal["high_noise", "low_noise"] | None = None
    """A two-expert checkpoint (Wan 2.2 A14B: transformer/ denoises the high-noise steps, transformer_2/ the
    low-noise ones, switched at model_index.json's boundary_ratio): the expert this run trains. Its timesteps
    default to its side of the boundary (--min_timestep / --max_timestep narrow or widen them); validation
    samples with both experts. Train the other expert in a second run. Required for such a checkpoint."""
    rank: Annotated[int, _alias("--network_dim")] = 64
    """LoRA rank."""
    lora_alpha: Annotated[float, _alias("--network_alpha")] = 64.0
    """LoRA alpha (scaling = alpha / rank); saved with the exported weights."""

    trainable_modules: list[str] | None = None
    """Full fine-tune only the parameters whose names contain one of these strings ('.' = all; VideoX-Fun)."""
    trainable_modules_low_learning_rate: list[str] | None = None
    """Of the trainable parameters, those whose names contain one of these strings train at half --lr."""
    target_modules: list[str] | None = None
    """Module name suffixes that get LoRA adapters, or one regex (e.g. 'transformer_blocks.*attn1.to_(q|k)').
    Default: the model's attention projections."""
    offload_encoders: bool = False
    """Keep the VAE and text encoders in CPU memory between uses, moving them to the GPU only to encode."""
    enable_tiling: Literal["auto", "on", "off"] = "auto"
    """Encode / decode videos with the VAE in spatial tiles (less memory for large frames). auto: on a GPU, on
    when the memory planner puts the VAE encode's untiled peak above the training step's (decided at start-up,
    logged with both figures; on a CPU, off); validation decodes tiled unless off. `--enable_tiling` alone means
    on, `--no_enable_tiling` off."""
    enable_slicing: Literal["auto", "on", "off"] = "auto"
    """Run the VAE one sample of a batch at a time (less memory). auto: on with --enable_tiling auto's tiling when
    a step encodes a batch above 1. `--enable_slicing` alone means on, `--no_enable_slicing` off."""

    def mask_probs(self) -> dict[str, float]:
        """--inpaint_mask_probs as {mask type: weight}."""
        out = {}
        for part in filter(None, (p.strip() for p in self.inpaint_mask_probs.split(","))):
            key, _, value = part.partition("=")
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = -1.0
        bad = sorted(set(out) - set(MASK_TYPES))
        if bad or any(v < 0 for v in out.values()) or sum(out.values()) <= 0:
            raise ConfigError(
                f"--inpaint_mask_probs {self.inpaint_mask_probs!r}: give type=weight pairs with non-negative "
                f"weights, not all zero, for {', '.join(MASK_TYPES)} (e.g. block=0.5,first_frame=0.5)"
                + (f"; unknown: {', '.join(bad)}" if bad else "")
            )
        return out

    def _check_sources(self) -> None:
        """Local folders exist and hold a checkpoint; hub ids (org/name) are left to ptrain.hub, which resolves them."""
        ckpt = self.pretrained_model_name_or_path
        if is_hub_id(ckpt):
            if self.revision and split_id(ckpt)[1]:
                raise ConfigError(f"--pretrained_model_name_or_path {ckpt} names a revision; leave out --revision")
        elif not Path(ckpt).is_dir():
            raise ConfigError(
                f"--pretrained_model_name_or_path {ckpt}: no such folder, and not a hub id (org/name). Download one "
                "(`hf download org/name`), name the hub id, or write a tiny one with `python -m ptrain.testing.tiny`."
            )
        elif not (Path(ckpt) / "model_index.json").is_file() and not (Path(ckpt) / "transformer").is_dir():
            raise ConfigError(
                f"--pretrained_model_name_or_path {ckpt}: not a diffusers checkpoint (no model_index.json)"
            )
        elif self.revision:
            raise ConfigError(f"--revision {self.revision}: applies to a hub id; {ckpt} is a local folder")
        else:  # a hub id's family is read once its snapshot's configs are fetched (ptrain.trainer.plan_run)
            self.resolve_model_name()
        for flag, value in (
            ("--transformer_id", self.transformer_id), ("--vae_id", self.vae_id),
            ("--text_encoder_id", self.text_encoder_id), ("--tokenizer_id", self.tokenizer_id),
            ("--text_encoder_2_id", self.text_encoder_2_id), ("--tokenizer_2_id", self.tokenizer_2_id),
        ):  # fmt: skip
            if value is not None and not Path(value).is_dir() and not is_hub_id(value):
                raise ConfigError(f"{flag} {value}: no such folder, and not a hub id (org/name or org/name@REVISION)")

    def resolve_model_name(self, folder: str | None = None) -> None:
        """--model_name auto -> the family of the local checkpoint `folder` (default --pretrained_model_name_or_path,
        with a local --transformer_id's class first); a named family is checked against it."""
        tf = self.transformer_id if self.transformer_id and Path(self.transformer_id).is_dir() else None
        self.model_name = resolve_model_name(self.model_name, folder or self.pretrained_model_name_or_path, tf)

    def validate(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise ConfigError("--pretrained_model_name_or_path is required (a diffusers checkpoint folder or hub id)")
        self._check_sources()
        self.mask_probs()  # raises on a malformed --inpaint_mask_probs
        _check_min(1, ("--rank", self.rank))
        trainable = self.trainable_modules or self.trainable_modules_low_learning_rate
        if trainable and self.training_type != "full-finetune":
            raise ConfigError(
                "--trainable_modules / --trainable_modules_low_learning_rate need --training_type full-finetune"
            )
        if self.layerwise_upcasting_modules and self.training_type != "lora":
            raise ConfigError(
                "--layerwise_upcasting_modules stores frozen weights in FP8: it needs --training_type lora "
                "(full fine-tuning trains every weight)"
            )


@dataclass
class DataArgs:
    data_root: Annotated[Path | None, _alias("--instance_data_root", "--train_data_dir")] = None
    """Dataset folder: CogVideoX layout (prompts.txt + videos.txt), a metadata.{csv,json,jsonl,parquet}, or
    video/image files with .txt captions beside them (searched recursively)."""
    dataset_file: Annotated[Path | None, _alias("--train_data_meta")] = None
    """CSV/JSON/JSONL/parquet table with caption and video and/or image path columns (VideoX-Fun's `file_path`,
    `text`, `type` read as they are); paths relative to --data_root if given, else to the file's folder."""
    dataset_config: Path | None = None
    """JSON/TOML with a `datasets` list (data_root or dataset_file, optional columns, `repeats`): several
    datasets at once, each repeated (fractional repeats take a fixed seeded subset)."""
    caption_column: str | None = None
    """Caption column of the table (default: the first of caption, text, prompt, ...), or (CogVideoX scripts) a
    caption line file in --data_root (default: prompts.txt, or finetrainers' prompt.txt / caption(s).txt)."""
    video_column: str | None = None
    """Video path column of the table (default: the first of video, file_path, path, ...), or (CogVideoX
    scripts) a video line file in --data_root (default: videos.txt or video.txt)."""
    image_column: str | None = None
    """Image path column of the table (default: image or image_path if present; a row with a video too: its
    first frame for i2v / inpaint, else an image trained as a 1-frame video, which needs --enable_bucket or
    --num_frames 1), or (CogVideo I2V) a line file of first-frame images in --data_root (images.txt)."""
    caption_extension: str = ".txt"
    """The caption file's extension beside each video or image in a folder of caption files (musubi-tuner's
    `caption_extension`, e.g. .caption)."""
    video_repeat: int = 1
    """Count every video this many times per epoch (images once; VideoX-Fun)."""
    strict_data: bool = False
    """Stop with an error listing every unusable file instead of skipping them."""
    height: int = 480
    """Training height in pixels (videos are resized then center-cropped, never stretched)."""
    width: int = 720
    """Training width in pixels."""
    num_frames: Annotated[int, _alias("--max_num_frames", "--video_sample_n_frames")] = 49
    """Frames per sample, taken evenly over the clip; must suit the VAE (LTX: 8k+1)."""
    fps: float | None = None
    """Resample each video to this frame rate first and take --num_frames consecutive frames from its start
    (motion plays at the same speed in every sample); default: --num_frames spread evenly over the clip."""
    max_sequence_length: int | None = None
    """Text tokens per prompt. Default: the model's own (LTX 128)."""
    video_sample_stride: int | None = None
    """Take every N-th frame, --num_frames consecutive ones from the window start (instead of spreading them)."""
    skip_frames_start: int = 0
    """Ignore this many frames at the start of every clip."""
    skip_frames_end: int = 0
    """Ignore this many frames at the end of every clip."""
    reshape_mode: Literal["center_crop", "random_crop", "resize"] = "center_crop"
    """How frames reach --height x --width: scale to cover then crop (centre / random, seeded per sample), or
    stretch (resize)."""
    id_token: str | None = None
    """Prepended to every caption (e.g. a trigger word: 'BW_STYLE')."""
    caption_dropout_p: float = 0.0
    """Probability of training a sample with an empty caption (seeded per sample, layout-independent)."""
    random_frame_crop: bool = False
    """Take the frames from a random start (seeded per sample) instead of the clip's start: with --fps /
    --video_sample_stride that window moves; otherwise --num_frames consecutive frames replace the even spread."""
    enable_bucket: bool = False
    """Aspect-ratio and frame-count buckets: each sample keeps its aspect ratio (a bucket of about --height x
    --width pixels, sides a multiple of the model's factor) and as many frames as it has (largest valid count
    <= --num_frames); images are 1-frame samples. Every batch holds one bucket shape."""
    video_resolution_buckets: list[str] | None = None
    """Explicit buckets FxHxW (e.g. 49x480x720 1x512x512): each sample goes to the one with the nearest aspect
    ratio among those it has frames for (implies --enable_bucket)."""
    video_sample_size: int | None = None
    """VideoX-Fun: bucket pixel area of videos = this squared (default: --height x --width)."""
    image_sample_size: int | None = None
    """VideoX-Fun: bucket pixel area of images = this squared (default: the video area)."""
    random_hw_adapt: bool = False
    """VideoX-Fun: each sample draws its bucket area from (1, 0.75, 0.5)^2 x the sample size (at least 256^2;
    seeded per sample, fixed across epochs)."""
    training_with_video_token_length: bool = False
    """VideoX-Fun: a bucket's frame budget shrinks as its resolution grows, to about --token_sample_size^2 x
    --num_frames pixels per sample (512^2 x 49 ~ 768^2 x 21)."""
    token_sample_size: int = 512
    """Side of the reference square for --training_with_video_token_length."""
    enable_precomputation: Literal["auto", "on", "off"] = "auto"
    """Compute the VAE latent distributions and text embeddings once before training (sharded over ranks,
    stored as safetensors), then train from them; the VAE and text encoders leave the GPU afterwards. auto: on
    when the run makes more than one pass over its samples (--train_steps x global batch > usable samples), no
    flag draws a new crop or frame window per pass, the train mode conditions on latents only, and the cache's
    estimated size fits in half the free disk space; it then reuses a complete cache of the same data, model
    and settings. The decision and its reason are logged and shown by --dry_run. `--enable_precomputation`
    alone means on."""
    precomputation_dir: Path | None = None
    """Where precomputed tensors go (default: output_dir/precomputed); a folder per data/model/settings key."""
    precomputation_reuse: bool = False
    """Reuse a complete precomputation made with the same data, model and settings (else compute it again;
    --enable_precomputation auto always reuses one)."""
    dataloader_num_workers: Annotated[int | None, _alias("--max_data_loader_n_workers", "--num_workers")] = None
    """Data loader worker processes per rank (0 = load in the training process). Default: 2 when samples are
    decoded every step, 0 when they come from the precomputation cache (loading a few cached tensors is faster
    in the training process than through worker processes)."""

    def __post_init__(self) -> None:
        # --enable_precomputation was a switch: True / False (a TOML preset, Python callers) mean on / off.
        if isinstance(self.enable_precomputation, bool):
            self.enable_precomputation = "on" if self.enable_precomputation else "off"

    def num_workers(self, precomputed: bool) -> int:
        """--dataloader_num_workers, or its default for the run's data path."""
        if self.dataloader_num_workers is not None:
            return self.dataloader_num_workers
        return 0 if precomputed else 2

    def validate(self) -> None:
        if self.data_root is None and self.dataset_file is None and self.dataset_config is None:
            raise ConfigError("give --data_root, --dataset_file or --dataset_config")
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(f"--caption_extension {self.caption_extension!r}: give it with its dot, e.g. .txt")
        if self.enable_precomputation not in ("auto", "on", "off"):
            raise ConfigError(f"--enable_precomputation {self.enable_precomputation!r}: give auto, on or off")
        if self.enable_precomputation == "on" and (self.reshape_mode == "random_crop" or self.random_frame_crop):
            raise ConfigError(
                "--enable_precomputation stores one crop and frame window per sample; --reshape_mode random_crop "
                "and --random_frame_crop draw new ones every step: use center_crop / resize without "
                "--random_frame_crop, or train without precomputation"
            )
        if self.dataset_config is not None and not Path(self.dataset_config).is_file():
            raise ConfigError(f"--dataset_config {self.dataset_config}: no such file")
        if self.video_repeat < 1 or self.token_sample_size < 16:
            raise ConfigError(
                f"--video_repeat must be >= 1 and --token_sample_size >= 16, got {self.video_repeat}, "
                f"{self.token_sample_size}"
            )
        _check_min(16, ("--video_sample_size", self.video_sample_size), ("--image_sample_size", self.image_sample_size))
        for b in self.video_resolution_buckets or []:
            parts = b.lower().split("x")
            if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
                raise ConfigError(f"--video_resolution_buckets {b!r}: write each bucket as FxHxW, e.g. 49x480x720")
        if self.data_root is not None and not Path(self.data_root).is_dir():
            raise ConfigError(f"--data_root {self.data_root}: no such folder")
        if self.dataset_file is not None and not Path(self.dataset_file).is_file():
            raise ConfigError(f"--dataset_file {self.dataset_file}: no such file")
        _check_min(1, ("--height", self.height), ("--width", self.width), ("--num_frames", self.num_frames))
        self._validate_frames()
        if not 0.0 <= self.caption_dropout_p <= 1.0:
            raise ConfigError(f"--caption_dropout_p must be in [0, 1], got {self.caption_dropout_p}")
        _check_min(0, ("--dataloader_num_workers", self.dataloader_num_workers))

    def _validate_frames(self) -> None:
        _check_min(1, ("--video_sample_stride", self.video_sample_stride))
        if self.video_sample_stride and self.fps:
            raise ConfigError("use either --fps or --video_sample_stride, not both")
        if self.skip_frames_start < 0 or self.skip_frames_end < 0:
            raise ConfigError(
                f"--skip_frames_start/--skip_frames_end must be >= 0, got {self.skip_frames_start}, "
                f"{self.skip_frames_end}"
            )
        if self.fps is not None and self.fps <= 0:
            raise ConfigError(f"--fps must be > 0, got {self.fps}")


@dataclass
class TrainArgs:
    output_dir: Path = Path("ptrain-output")
    """Where metrics, logs and the exported weights go."""
    train_steps: Annotated[int, _alias("--max_train_steps")] = 1000
    """Number of optimizer steps."""
    num_train_epochs: Annotated[int | None, _alias("--max_train_epochs", "--train_epochs")] = None
    """Train for this many passes over the usable samples instead (sets --train_steps = epochs x steps per epoch)."""
    batch_size: Annotated[int, _alias("--train_batch_size")] = 1
    """Samples per data-parallel rank per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (gradient sync happens on the last one only)."""
    seed: Annotated[int, _alias("--seed_everything")] = 42
    """Seed for data order, noise and timesteps (same samples whatever the parallel layout)."""
    gc_every_n_steps: int = 50
    """Python's automatic garbage collector is off during training (its pauses land on random steps as step-time
    jitter); a young-generation collection runs every N steps instead (as torchtitan does). 0: leave it on."""

    def validate(self) -> None:
        _check_min(0, ("--gc_every_n_steps", self.gc_every_n_steps), ("--seed", self.seed))
        if self.seed >= 2**63:
            raise ConfigError(f"--seed {self.seed}: give a seed below 2**63")
        _check_min(
            1,
            ("--train_steps", self.train_steps),
            ("--batch_size", self.batch_size),
            ("--gradient_accumulation_steps", self.gradient_accumulation_steps),
            ("--num_train_epochs", self.num_train_epochs),
        )


@dataclass
class ActivationCheckpointArgs:
    gradient_checkpointing: bool = False
    """Recompute block activations in backward (see --ac_mode)."""
    ac_mode: Literal["full", "selective", "ops", "keep_attention", "auto"] = "full"
    """full: checkpoint every block; selective: every --ac_every_n_blocks-th block; ops: keep matmul and attention
    outputs, recompute the cheap ops (norms, activations, elementwise) in every block; keep_attention: as full, but
    keep the fused attention kernels' outputs (about full's memory plus one hidden state per block; the backward
    recomputes all but attention, about half a forward for long videos); auto: the memory planner picks the least
    recompute that fits --gpu_memory_gb (none, ops, every 4th / 2nd block, keep_attention, full), logged at
    start-up (with or without --gradient_checkpointing)."""
    ac_every_n_blocks: int | None = None
    """With --ac_mode selective, checkpoint one block in this many (default 2); another mode refuses it."""
    gpu_memory_gb: float | None = None
    """The memory --ac_mode auto plans to fit, in GB (10^9 bytes) per GPU. Default: the GPU's total memory
    (required on a machine without a GPU)."""
    activation_offload: bool = False
    """Instead of recomputing: what each transformer block saves for the backward waits in pinned host memory,
    copied out in the forward and back (prefetched a block ahead) in the backward on a side stream. Costs host
    memory and two host-link transfers of every saved byte per step (ptrain/parallel/offload.py). Not with
    --gradient_checkpointing, --compile or --blocks_to_swap."""

    def period(self) -> int:
        """How many blocks the checkpointing pattern repeats over: --ac_every_n_blocks with --ac_mode selective,
        else 1 (every block alike). The planner and the FLOP count extrapolate by whole periods."""
        return self.every_n() if self.gradient_checkpointing and self.ac_mode == "selective" else 1

    def every_n(self) -> int:
        """--ac_every_n_blocks, or its default (2)."""
        return self.ac_every_n_blocks or 2

    def validate(self) -> None:
        _check_min(1, ("--ac_every_n_blocks", self.ac_every_n_blocks))
        if self.ac_every_n_blocks is not None and self.ac_mode != "selective":
            # it was ignored: a full-AC run (more recompute) while the log read as the flag asked
            raise ConfigError(f"--ac_every_n_blocks {self.ac_every_n_blocks} applies to --ac_mode selective only "
                              f"(got --ac_mode {self.ac_mode}"
                              + ("; auto chooses it)" if self.ac_mode == "auto" else "): add --ac_mode selective"))  # fmt: skip
        if self.ac_mode in ("selective", "ops", "keep_attention") and not self.gradient_checkpointing:
            raise ConfigError(
                f"--ac_mode {self.ac_mode} says how blocks are checkpointed, and without --gradient_checkpointing "
                "none is: add --gradient_checkpointing (or use --ac_mode auto, which decides both)"
            )
        if self.activation_offload and (self.gradient_checkpointing or self.ac_mode == "auto"):
            raise ConfigError(
                "--activation_offload is the alternative to recompute: choose it or --gradient_checkpointing / "
                "--ac_mode auto, not both (a checkpointed block saves only its inputs)"
            )
        if self.gpu_memory_gb is not None and self.gpu_memory_gb <= 0:
            raise ConfigError(f"--gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")


@dataclass
class CompileArgs:
    compile: bool = False
    """torch.compile each transformer block (regional compilation)."""
    compile_backend: str = "inductor"
    """torch.compile backend (inductor; aot_eager or eager for cheap checks)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile's mode for the blocks (inductor; musubi-tuner's flag). reduce-overhead replays each block's
    forward and backward as CUDA graphs: the host launches one graph instead of every kernel, for steps bound by
    kernel launches (models with few tokens per step). max-autotune also tries kernel variants at the first step
    (slow to compile) and uses CUDA graphs; max-autotune-no-cudagraphs does not. CUDA graphs need the plain module
    of a one-process run (LoRA, --full_bf16 or float32; FSDP2 moves its parameters every step) and no
    --blocks_to_swap; on the CPU torch skips them."""
    attention_backend: Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"
    """The SDPA kernel of the transformer's attention in training (auto: torch's choice, logged at start-up);
    a named one runs alone and fails at start-up if it cannot run the model's attention (CPU: flash, math)."""

    def validate(self) -> None:
        """The mode needs --compile and inductor (other backends ignore it); the backend is torch.compile's check."""
        if self.compile_mode != "default" and not (self.compile and self.compile_backend == "inductor"):
            raise ConfigError(f"--compile_mode {self.compile_mode} is inductor's: it needs --compile with "
                              f"--compile_backend inductor (got compile={self.compile}, {self.compile_backend})")  # fmt: skip

    def cudagraphs(self) -> bool:
        """Whether the blocks' compiled graphs replay as CUDA graphs (on a CUDA device)."""
        return self.compile and self.compile_mode in ("reduce-overhead", "max-autotune")


@dataclass
class EMAArgs:
    ema_decay: float | None = None
    """Keep an exponential moving average of the trainable weights with this decay (e.g. 0.999); off by default."""
    ema_start_step: int = 0
    """Until this step the EMA just follows the weights."""
    ema_update_every: int = 1
    """Update the EMA every N optimizer steps."""
    export_ema: bool = False
    """At the end also export the EMA weights (output_dir/ema/, same format as the regular export)."""
    validate_with_ema: bool = False
    """Sample validation videos with the EMA weights swapped in."""

    def validate(self) -> None:
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"--ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.ema_update_every < 1 or self.ema_start_step < 0:
            raise ConfigError(
                f"--ema_update_every must be >= 1 and --ema_start_step >= 0, got {self.ema_update_every}, "
                f"{self.ema_start_step}"
            )
        if (self.export_ema or self.validate_with_ema) and self.ema_decay is None:
            raise ConfigError("--export_ema / --validate_with_ema need --ema_decay")


@dataclass
class ObjectiveArgs:
    uniform_sampling: bool = False
    """Stratify timesteps over the global batch (sample j of G draws from the j-th of G equal slices of the
    noise range), so every step covers all noise levels whatever the parallel layout (VideoX-Fun)."""
    flow_weighting_scheme: Annotated[
        Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"], _alias("--weighting_scheme")
    ] = "none"
    """Timestep density (logit_normal, mode; otherwise uniform) and loss weighting (sigma_sqrt, cosmap)."""
    flow_logit_mean: float = 0.0
    """Mean of the logit-normal timestep density."""
    flow_logit_std: float = 1.0
    """Std of the logit-normal timestep density."""
    flow_mode_scale: float = 1.29
    """Scale of the mode timestep density."""
    flow_shift: Annotated[float | None, _alias("--discrete_flow_shift")] = None
    """Shift applied to sampled sigmas: s*t / (1 + (s-1)*t); > 1 favours high noise. Default: the
    checkpoint scheduler's static `shift` (e.g. HunyuanVideo 7, Wan 3), else 1."""
    min_timestep: float | None = None
    """Train only timesteps >= this, on the 0-1000 scale the transformer sees (flow matching: 1000 x the shifted
    sigma; CogVideoX: the integer timestep). The timestep density keeps its shape (it is truncated, not squeezed).
    Default: 0, or the --expert's range on a Wan 2.2 two-expert checkpoint."""
    max_timestep: float | None = None
    """Train only timesteps <= this (0-1000 scale, as --min_timestep). Default: 1000, or the --expert's range."""

    def validate(self) -> None:
        if self.flow_shift is not None and self.flow_shift <= 0:
            raise ConfigError(f"--flow_shift must be > 0, got {self.flow_shift}")
        lo, hi = self.timestep_range()
        if not 0.0 <= lo < hi <= 1000.0:
            raise ConfigError(
                f"--min_timestep {lo:g} / --max_timestep {hi:g}: need 0 <= --min_timestep < --max_timestep <= 1000"
            )

    def timestep_range(self) -> tuple[float, float]:
        """(--min_timestep, --max_timestep) with their defaults 0 and 1000."""
        return (0.0 if self.min_timestep is None else float(self.min_timestep),
                1000.0 if self.max_timestep is None else float(self.max_timestep))  # fmt: skip

    def restricted(self) -> bool:
        return self.timestep_range() != (0.0, 1000.0)


@dataclass
class OptimArgs:
    optimizer: Annotated[Literal["adamw", "adam", "came", "adamw-8bit"], _alias("--optimizer_type")] = "adamw"
    """Optimizer (came needs came-pytorch; adamw-8bit needs bitsandbytes and CUDA)."""
    lr: Annotated[float, _alias("--learning_rate")] = 1e-4
    """Peak learning rate."""
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    """Learning-rate schedule (diffusers.optimization)."""
    lr_warmup_steps: int = 0
    """Linear warmup steps."""
    lr_num_cycles: Annotated[int, _alias("--lr_scheduler_num_cycles")] = 1
    """Cycles for cosine_with_restarts."""
    lr_power: Annotated[float, _alias("--lr_scheduler_power")] = 1.0
    """Power for the polynomial schedule."""
    beta1: Annotated[float, _alias("--adam_beta1")] = 0.9
    """First Adam beta."""
    beta2: Annotated[float, _alias("--adam_beta2")] = 0.95
    """Second Adam beta."""
    beta3: float = 0.999
    """Third beta, used by CAME only."""
    weight_decay: Annotated[float, _alias("--adam_weight_decay")] = 1e-4
    """Decoupled weight decay (AdamW/CAME) or L2 penalty (Adam)."""
    epsilon: Annotated[float, _alias("--adam_epsilon")] = 1e-8
    """Optimizer epsilon (CAME uses it as its first epsilon)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    full_bf16: bool = False
    """Full fine-tune with bfloat16 weights, gradients and optimizer moments, no float32 master copy: 8 bytes per
    parameter instead of 16 (sd-scripts / musubi-tuner's name). Updates are rounded per --bf16_rounding
    (see ptrain/bf16_optim.py and benchmarks/results/bf16_drift.md for the drift against float32 masters)."""
    fused_backward_pass: bool = False
    """Step the optimizer block by block inside the backward and free each block's gradients at once, so no step
    holds the whole model's gradients (a full fine-tune's memory: minus the model's size in gradients). Trade-offs:
    --max_grad_norm clips each block by its own norm; a block whose gradient is not finite is not updated (the
    others are); no gradient accumulation; CAME and 8-bit AdamW decide that skip on the host, a sync per block
    (AdamW / Adam on the device). sd-scripts / musubi-tuner's name; see ptrain/fused_backward.py."""
    bf16_rounding: Literal["stochastic", "nearest"] = "stochastic"
    """With --full_bf16: stochastic rounding keeps updates smaller than bfloat16's precision on average; nearest
    loses them (adamw / adam round stochastically; 8-bit AdamW and CAME round to nearest: give nearest)."""

    def validate(self) -> None:
        if self.full_bf16 and self.bf16_rounding == "stochastic" and self.optimizer not in ("adamw", "adam"):
            raise ConfigError(
                f"--full_bf16 rounds stochastically with --optimizer adamw or adam; --optimizer {self.optimizer} "
                "rounds to nearest: add --bf16_rounding nearest, or use adamw"
            )
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}")


@dataclass
class ParallelArgs:
    dp_degree: int = 1
    """Data-parallel replicas (DDP/HSDP replicate dimension)."""
    dp_shards: int = -1
    """FSDP2 shards per replica; -1 fills the rest of the world size."""
    cp_degree: int = 1
    """Context-parallel degree: each sample's video token sequence is split over this many ranks (activation
    memory per rank shrinks accordingly); parameters are sharded over dp_shards x cp_degree."""
    cp_mode: Literal["ulysses", "ring"] = "ulysses"
    """Context-parallel attention: `ulysses` (all-to-all between sequence and heads, then the device's fused
    attention; heads are padded to a multiple of cp_degree) or `ring` (key/value blocks passed around the cp
    ranks, partial results merged by log-sum-exp; no constraint on heads)."""
    fsdp_cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy); the
    optimizer step runs on the CPU. For full fine-tuning of models that do not fit on the GPUs otherwise."""
    blocks_to_swap: int = 0
    """One GPU: keep the frozen weights of this many transformer blocks in pinned host memory and copy each block's
    in just before it runs (prefetched on a side stream), out right after (musubi-tuner / diffusion-pipe's block
    swap). Needs --gradient_checkpointing with --ac_mode full and frozen weights (LoRA); costs the transfer time."""
    dist_timeout_s: int = 1800
    """Seconds the ranks wait for one another (rendezvous and every collective) before the run fails with a
    timeout; raise it when one rank does long work alone (e.g. precomputation, a large checkpoint load)."""

    def validate(self) -> None:
        """Also the degree check of ptrain.parallel.ParallelDims.build (the one place it is written)."""
        if self.dp_degree < 1 or self.cp_degree < 1 or (self.dp_shards < 1 and self.dp_shards != -1):
            raise ConfigError(
                f"parallel degrees must be >= 1 (dp_shards may be -1): "
                f"dp_degree={self.dp_degree} dp_shards={self.dp_shards} cp_degree={self.cp_degree}"
            )
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"--dist_timeout_s must be > 0 (seconds), got {self.dist_timeout_s}")


@dataclass
class ValidationArgs:
    validation_prompts: Annotated[str | None, _alias("--validation_prompt")] = None
    """Prompts to sample during training, separated by --validation_prompt_separator."""
    validation_prompt_separator: str = ":::"
    """Separator between --validation_prompts."""
    validation_images: str | None = None
    """With --train_mode i2v / inpaint: first-frame images for the validation prompts, separated like them (one image for
    all prompts, or one per prompt)."""
    validation_dataset_file: Path | None = None
    """CSV/JSON/JSONL with a `prompt` column and optional image, height, width, num_frames, num_inference_steps;
    or a .txt with one prompt per line (CogVideo's finetune scripts' prompts file)."""
    validation_steps: Annotated[int, _alias("--sample_every_n_steps")] = 0
    """Sample the validation prompts every N optimizer steps and at the end; 0 = at the end only (no prompts: no
    validation)."""
    validation_epochs: Annotated[int | None, _alias("--sample_every_n_epochs")] = None
    """Or every N epochs (overrides --validation_steps)."""
    num_validation_videos: int = 1
    """Videos per validation prompt."""
    validation_height: int | None = None
    """Validation height (default: --height)."""
    validation_width: int | None = None
    """Validation width (default: --width)."""
    validation_num_frames: int | None = None
    """Validation frames (default: --num_frames)."""
    validation_num_inference_steps: int = 30
    """Denoising steps per validation video."""
    validation_guidance_scale: float | None = None
    """Guidance scale (default: the pipeline's). HunyuanVideo: the embedded (distilled) guidance; ptrain trains with
    1.0, as finetrainers and musubi-tuner do, while the pipeline's default is 6.0."""

    def validate(self) -> None:
        if self.validation_steps < 0 or self.num_validation_videos < 1:
            raise ConfigError(f"--validation_steps {self.validation_steps} must be >= 0 and --num_validation_videos "
                              f"{self.num_validation_videos} >= 1")  # fmt: skip
        if self.validation_num_inference_steps < 2:  # diffusers' LTX-Video pipeline fails on 1 (an empty schedule)
            raise ConfigError(f"--validation_num_inference_steps {self.validation_num_inference_steps}: sample with "
                              "at least 2 denoising steps")  # fmt: skip
        if self.validation_dataset_file is not None and not Path(self.validation_dataset_file).is_file():
            raise ConfigError(f"--validation_dataset_file {self.validation_dataset_file}: no such file")
        for prompt in (self.validation_prompts or "").split(self.validation_prompt_separator):
            prompt = prompt.strip()
            if prompt and not any(c.isspace() for c in prompt) and Path(prompt).suffix.lower() in _TABLE_SUFFIXES:
                # CogVideo's finetune scripts take a file name here: it would be sampled as the prompt "prompts.txt"
                raise ConfigError(f"--validation_prompts {prompt!r} is a file name; this flag takes the prompt text "
                                  f"(several joined with {self.validation_prompt_separator!r}); for prompts in a file "
                                  f"use --validation_dataset_file {prompt} (one prompt per line in a .txt, or a "
                                  "table with a prompt column)")  # fmt: skip
        _check_min(1, ("--validation_epochs", self.validation_epochs))
        if self.validation_prompts is not None and not any(
            p.strip() for p in self.validation_prompts.split(self.validation_prompt_separator)
        ):
            raise ConfigError(f"--validation_prompts {self.validation_prompts!r}: no prompt in it (an unset shell "
                              "variable?); give the prompt text, or leave the flag out for no validation")  # fmt: skip
        if (self.validation_steps or self.validation_epochs) and not self.enabled():
            raise ConfigError("--validation_steps needs --validation_prompts or --validation_dataset_file")

    def enabled(self) -> bool:
        """Whether the run validates: prompts given (every --validation_steps / --validation_epochs, and at the
        end; only at the end without them)."""
        return bool(self.validation_prompts or self.validation_dataset_file)


#: Extensions of prompt / dataset files (a validation prompt that is one of these is a file name given by mistake)
_TABLE_SUFFIXES = (".txt", ".csv", ".json", ".jsonl", ".parquet")


@dataclass
class CheckpointArgs:
    checkpointing_steps: int = 500
    """Save a resumable DCP checkpoint every N optimizer steps under output_dir/checkpoints/step-N (and at the end); 0 = no checkpoints."""
    checkpointing_epochs: int | None = None
    """Or every N epochs (overrides --checkpointing_steps)."""
    checkpointing_limit: Annotated[int | None, _alias("--checkpoints_total_limit")] = None
    """Keep only the newest K complete checkpoints (default: keep all)."""
    resume_from_checkpoint: str = "auto"
    """auto: resume from the newest complete checkpoint in output_dir if there is one; latest: the same, but say so
    if none; none: start over; N: the checkpoint of step N; or a checkpoint folder."""
    checkpoint_full_model: bool = False
    """With LoRA, also checkpoint the frozen base weights (default: only the trainable ones)."""
    async_checkpoint: bool = False
    """Write checkpoints in the background (DCP async_save) while training goes on; the final one is synchronous."""
    allow_reshard: bool = False
    """Allow resuming with another parallel layout: DCP reshards model and optimizer; data continues at the same sample."""
    max_nan_steps: int = 5
    """A non-finite loss or grad norm skips the optimizer step; this many in a row stop the run (0 = never stop)."""
    export_every_checkpoint: bool = False
    """Also export the LoRA / transformer in diffusers format into each checkpoint folder (export/)."""
    export_comfyui: bool = False
    """LoRA only: next to each LoRA export also write pytorch_lora_weights_comfyui.safetensors with the key
    names ComfyUI loads for the model (original-model module names, `diffusion_model.` prefix)."""

    def validate(self) -> None:
        _check_min(1, ("--checkpointing_limit", self.checkpointing_limit or 1))  # 0 = None: keep all
        _check_min(0, ("--checkpointing_steps", self.checkpointing_steps), ("--max_nan_steps", self.max_nan_steps))
        _check_min(1, ("--checkpointing_epochs", self.checkpointing_epochs))
        r = self.resume_from_checkpoint
        if r not in ("auto", "latest", "none") and not r.isdigit() and not Path(r).is_dir():
            raise ConfigError(
                f"--resume_from_checkpoint {r}: no such folder (use auto, latest, none, a step number or a checkpoint "
                "folder)"
            )


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@dataclass
class LogArgs:
    logging_steps: int = 1
    """Write metrics every N optimizer steps."""
    report_to: Annotated[Literal["tensorboard", "wandb", "all", "none"], _alias("--log_with")] = "tensorboard"
    """Also log the metrics and validation frame strips to tensorboard (output_dir/logs), Weights & Biases
    (`pip install ptrain[wandb]`; project from WANDB_PROJECT, default ptrain; WANDB_MODE=offline writes
    output_dir/wandb only), or both (all)."""
    log_level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Log level of ptrain's own messages (rank 0 logs; other ranks only warnings)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, for the `mfu` / `hfu` metrics (default: known for H100/H200 989, A100 312
    bf16; none on CPU). FLOPs are counted once per training shape at start-up on fake tensors (ptrain/flops.py):
    `mfu` from the model's FLOPs, `hfu` with activation-checkpoint recompute; both hold under --compile."""
    log_step_breakdown: bool = False
    """Also log the forward / backward / optimizer seconds of each logging step (that step waits for the device
    after each phase; the steps between logging steps never wait)."""
    profile_from_step: int = 0
    """Profile the training from this step on with torch.profiler (0: off): a Chrome / Perfetto trace and an
    operator table per rank in output_dir/profile/ (ptrain/profiling.py). Profiled steps run slower."""
    profile_num_steps: int = 3
    """How many steps --profile_from_step profiles."""

    def validate(self) -> None:
        _check_min(1, ("--logging_steps", self.logging_steps), ("--profile_num_steps", self.profile_num_steps))
        _check_min(0, ("--profile_from_step", self.profile_from_step))
        if self.report_to in ("wandb", "all") and not _importable("wandb"):
            raise ConfigError(
                f"--report_to {self.report_to}: wandb is not installed: pip install 'ptrain[wandb]' (or pip install "
                "wandb), or use --report_to tensorboard"
            )


@dataclass
class PlanArgs:
    dry_run: bool = False
    """Validate the config, parallel degrees and data, print a dataset summary, and exit without training."""
    plan_gpu_memory_gb: float | None = None
    """With --dry_run: simulate the per-GPU peak memory of this run (ptrain.planner, no GPU needed) and, if it
    exceeds this many GB, suggest the cheapest layout / activation checkpointing that fits."""
    plan_world_size: int | None = None
    """With --plan_gpu_memory_gb: the number of GPUs to plan for (default: this run's world size)."""

    def validate(self) -> None:
        """Counts are positive (the planner reports what does not fit)."""
        if self.plan_world_size is not None and self.plan_world_size < 1:
            raise ConfigError(f"--plan_world_size {self.plan_world_size}: the number of GPUs to plan for must be >= 1")
        if self.plan_gpu_memory_gb is not None and self.plan_gpu_memory_gb <= 0:
            raise ConfigError(f"--plan_gpu_memory_gb {self.plan_gpu_memory_gb:g}: the GPU's memory must be > 0 GB")


@dataclass
class Config:
    """ptrain: fine-tune video diffusion transformers with torchrun on raw torch.distributed."""

    config: Path | None = None
    """TOML preset (see configs/); explicit flags override its values."""
    model: Annotated[ModelArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=ModelArgs)
    data: Annotated[DataArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=DataArgs)
    train: Annotated[TrainArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=TrainArgs)
    activation_checkpoint: Annotated[ActivationCheckpointArgs, tyro.conf.OmitArgPrefixes] = field(
        default_factory=ActivationCheckpointArgs
    )
    compile: Annotated[CompileArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=CompileArgs)
    ema: Annotated[EMAArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=EMAArgs)
    objective: Annotated[ObjectiveArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=ObjectiveArgs)
    optim: Annotated[OptimArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=OptimArgs)
    parallel: Annotated[ParallelArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=ParallelArgs)
    checkpoint: Annotated[CheckpointArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=CheckpointArgs)
    validation: Annotated[ValidationArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=ValidationArgs)
    log: Annotated[LogArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=LogArgs)
    plan: Annotated[PlanArgs, tyro.conf.OmitArgPrefixes] = field(default_factory=PlanArgs)

    #: What ptrain.compat translated from other trainers' flag names (logged at start).
    compat_notes: Annotated[list[str], tyro.conf.Suppress] = field(default_factory=list)
    #: The command line parsed (before translation): what the trainer hands the memory planner it runs.
    argv: Annotated[list[str], tyro.conf.Suppress] = field(default_factory=list)

    def validate(self) -> Config:
        """Each group's own checks (in the order of the groups), then the checks that span groups."""
        for group in _GROUPS:
            getattr(self, group).validate()
        if self.checkpoint.export_comfyui and self.model.training_type != "lora":
            raise ConfigError("--export_comfyui writes a LoRA file: it needs --training_type lora")
        if self.activation_checkpoint.activation_offload:
            self._validate_activation_offload()
        if self.parallel.blocks_to_swap:
            self._validate_block_swap()
        if self.optim.full_bf16:
            self._validate_full_bf16()
        if self.optim.fused_backward_pass:
            self._validate_fused_backward()
        return self

    def _validate_fused_backward(self) -> None:
        accum = self.train.gradient_accumulation_steps
        if accum > 1:
            raise ConfigError(f"--fused_backward_pass with --gradient_accumulation_steps {accum}: the gradients are "
                              "stepped and freed during each backward, none are left to accumulate; use 1 (or a "
                              "larger --batch_size)")  # fmt: skip
        if self.model.transformer_dtype == "float16":
            raise ConfigError("--fused_backward_pass with --transformer_dtype float16: the loss scale's overflow "
                              "check needs every gradient before any step; use bfloat16")  # fmt: skip

    def _validate_activation_offload(self) -> None:
        if self.compile.compile:
            raise ConfigError("--activation_offload with --compile: compiled blocks save their tensors inside their "
                              "own graph, out of reach of the offload hooks; drop one of the two")  # fmt: skip
        if self.parallel.blocks_to_swap:
            raise ConfigError("--activation_offload with --blocks_to_swap: block swap needs activation "
                              "checkpointing, which offload replaces; choose one")  # fmt: skip

    def _validate_block_swap(self) -> None:
        a, m, n = self.activation_checkpoint, self.model, self.parallel.blocks_to_swap
        if n < 0:
            raise ConfigError(f"--blocks_to_swap must be >= 0, got {n}")
        if not (a.gradient_checkpointing and a.ac_mode == "full"):
            raise ConfigError(
                "--blocks_to_swap needs --gradient_checkpointing --ac_mode full: without recompute, autograd keeps "
                "every block's weights on the GPU until the backward, and nothing is saved"
            )
        if m.training_type != "lora" and not m.trainable_modules:
            raise ConfigError("--blocks_to_swap moves frozen weights: a full fine-tune has none (use LoRA, or "
                              "--fsdp_cpu_offload for a full fine-tune)")  # fmt: skip
        if m.layerwise_upcasting_modules or self.parallel.fsdp_cpu_offload:
            raise ConfigError("--blocks_to_swap does not combine with --layerwise_upcasting_modules or "
                              "--fsdp_cpu_offload (both keep the weights in FSDP2's hands, in one process too)")  # fmt: skip
        if self.compile.cudagraphs():
            raise ConfigError(f"--blocks_to_swap with --compile_mode {self.compile.compile_mode}: CUDA graphs replay "
                              "fixed weight addresses, block swap moves the weights every step; use "
                              "--compile_mode default")  # fmt: skip

    def _validate_full_bf16(self) -> None:
        m = self.model
        if m.training_type == "lora" or m.transformer_dtype != "bfloat16":
            raise ConfigError(
                f"--full_bf16 is a full fine-tune in bfloat16: it needs --training_type full-finetune and "
                f"--transformer_dtype bfloat16 (got {m.training_type}, {m.transformer_dtype}); LoRA adapters train "
                "in float32 anyway"
            )
        if self.ema.ema_decay is not None:
            raise ConfigError("--ema_decay with --full_bf16: a bfloat16 EMA would round its small updates away; "
                              "train with float32 masters (no --full_bf16) to keep an EMA")  # fmt: skip


def _load_toml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # an editor's byte-order mark is not TOML's
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 ({e})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: invalid TOML: {e}") from e
    # Accept flat keys (`dp_degree = 2`) and [group] tables (`[parallel] dp_degree = 2`).
    flat: dict = {}
    for key, value in raw.items():
        if isinstance(value, dict) and key in _GROUPS:
            flat.update(value)
        else:
            flat[key] = value
    return flat


_GROUPS = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in ("config", "compat_notes", "argv")}


def alias_targets() -> dict[str, str]:
    """Other trainers' flag names -> ptrain's (`--train_batch_size` -> `--batch_size`): the fields' tyro aliases."""
    out = {}
    defaults = Config()
    for group in _GROUPS:
        for name, hint in get_type_hints(type(getattr(defaults, group)), include_extras=True).items():
            for meta in getattr(hint, "__metadata__", ()):
                for alias in getattr(meta, "aliases", None) or ():
                    out[alias] = f"--{name}"
    return out


def _field_owner() -> dict[str, str]:
    owner = {}
    defaults = Config()
    for group in _GROUPS:
        for f in dataclasses.fields(getattr(defaults, group)):
            owner[f.name] = group
    return owner


def _preset_argv(values: dict, source: Path) -> list[str]:
    """A preset's keys and values as command-line tokens, so that tyro checks them as it checks flags (types,
    choices) and no value reaches the run unchecked: a quoted "false" for a switch had turned it on, a mistyped
    choice had trained on diffusers' fallback, 10.5 steps had been taken. TOML's own types are held to the
    setting's: a switch takes true / false, a single setting no list; a list of validation prompts is joined with
    the separator, as the flag takes them."""
    owner, aliases = _field_owner(), alias_targets()
    defaults = Config()
    types = {f.name: str(f.type).replace(" ", "") for g in _GROUPS for f in dataclasses.fields(getattr(defaults, g))}
    tokens: list[str] = []
    for key, value in values.items():
        if key not in owner:
            target = aliases.get(f"--{key}") or RENAMES.get(f"--{key}")
            if target:  # presets are written in ptrain's names (and values: bfloat16, not bf16)
                raise ConfigError(f"--config {source}: {key!r} is another trainer's name: write {target[2:]!r}")
            if f"--{key}" in REJECTED:
                raise ConfigError(f"--config {source}: {key!r} is not a ptrain setting: {REJECTED[f'--{key}']}")
            raise ConfigError(f"--config {source}: unknown key {key!r} (not a ptrain flag)")
        where, typ = f"--config {source}: {key} = {value!r}", types[key]
        if key in TRI_STATE and isinstance(value, bool):
            value = "on" if value else "off"
        if typ in ("bool", "bool|None"):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: write true or false (a TOML boolean, unquoted)")
            tokens.append(f"--{key}" if value else f"--no_{key}")
            continue
        if isinstance(value, bool):
            raise ConfigError(f"{where}: this setting takes a value, not true / false")
        if isinstance(value, dict):
            raise ConfigError(f"{where}: a table is not a value of this setting")
        if key == "validation_prompts" and isinstance(value, list):
            sep = values.get("validation_prompt_separator", defaults.validation.validation_prompt_separator)
            value = sep.join(str(v) for v in value)
        if isinstance(value, list):
            if not typ.startswith(("list", "tuple")):
                raise ConfigError(f"{where}: one value expected, not a list")
            tokens += [f"--{key}", *(str(v) for v in value)]
        else:
            tokens += [f"--{key}", str(value)]
    return tokens


def _parse_preset(tokens: list[str], source: Path) -> Config:
    """The preset's tokens parsed by tyro over the defaults; a value tyro refuses is a ConfigError naming the
    preset, with tyro's reason."""
    import contextlib
    import io

    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
            return tyro.cli(Config, args=tokens, default=Config(), use_underscores=True, prog="--config")
    except SystemExit:
        text = re.sub(r"[\u2500-\u257f]", " ", buf.getvalue())  # rich's box drawing
        kept = []
        for line in (" ".join(line.split()) for line in text.splitlines()):
            if line.startswith("Argument helptext"):
                break
            if line.strip("-") and not line.startswith(("usage", "For full helptext")):
                kept.append(line)
        reason = " ".join(kept[1:] if len(kept) > 1 else kept)  # the first line is tyro's heading
        raise ConfigError(f"--config {source}: {reason or 'a value is not valid'}") from None


def _config_path_from_argv(argv: list[str]) -> Path | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1])
    return None


#: Flags with the values auto / on / off that were on-off switches: alone they mean on, --no_FLAG off, and true /
#: false (a preset's booleans too) on / off.
TRI_STATE = ("enable_tiling", "enable_slicing", "enable_precomputation")
_SPELLINGS = {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}


def _bool_flags() -> set[str]:
    """The names of the on/off switches (bool settings)."""
    defaults = Config()
    return {f.name for group in _GROUPS for f in dataclasses.fields(getattr(defaults, group))
            if isinstance(getattr(getattr(defaults, group), f.name), bool)}  # fmt: skip


def _switch_values(argv: list[str]) -> list[str]:
    """`--enable_tiling` alone (followed by another flag or nothing) -> `--enable_tiling on`, `--no_enable_tiling`
    -> `--enable_tiling off`, `--enable_precomputation=true` -> `--enable_precomputation on` (every TRI_STATE flag).
    A switch given a true / false value (`--gradient_checkpointing True`, as CogVideo's finetune scripts write
    them) -> `--gradient_checkpointing` / `--no_gradient_checkpointing`: tyro read the value as a stray argument."""
    out: list[str] = []
    switches = _bool_flags()
    i = 0
    while i < len(argv):
        name, eq, inline = argv[i].partition("=")
        flag = name[2:] if name.startswith("--") else ""
        if flag in switches:
            value = inline if eq else argv[i + 1] if i + 1 < len(argv) else ""
            if value.lower() in _SPELLINGS:
                out.append(f"--{flag}" if _SPELLINGS[value.lower()] == "on" else f"--no_{flag}")
                i += 1 if eq else 2
                continue
        if flag.startswith("no_") and flag[3:] in TRI_STATE and not eq:
            out += [f"--{flag[3:]}", "off"]
            i += 1
            continue
        if flag not in TRI_STATE:
            out.append(argv[i])
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 2
        else:
            value, i = "on", i + 1
        out += [name, _SPELLINGS.get(value.lower(), value)]
    return out


def parse_config(argv: list[str] | None = None) -> Config:
    """Defaults < TOML preset (--config) < command-line flags (other trainers' names translated first)."""
    original = list(sys.argv[1:] if argv is None else argv)
    argv, notes = translate_argv(original, alias_targets())
    argv = _switch_values(argv)
    default = Config()
    preset = _config_path_from_argv(argv)
    if preset is not None:  # the preset's values, parsed and checked as flags would be; flags override them
        tokens, preset_notes = translate_argv(_preset_argv(_load_toml(preset), preset), alias_targets())
        default = _parse_preset(_switch_values(tokens), preset)
        default.config = preset
        notes = preset_notes + notes
    cfg = tyro.cli(Config, args=argv, default=default, use_underscores=True, prog="torchrun ... -m ptrain")
    cfg.compat_notes = notes
    cfg.argv = original
    return cfg


def field_values(flags: list[str]) -> dict[str, dict]:
    """The values of the flags named in `flags` (ptrain's own names), by config group: {group: {field: value}}."""
    parsed, owner = parse_config(flags), _field_owner()
    out: dict[str, dict] = {}
    for token in flags:
        if not token.startswith("--"):
            continue
        name = token[2:].split("=", 1)[0]
        if name not in owner and name.startswith("no_") and name[3:] in owner:
            name = name[3:]
        if name not in owner:
            raise ValueError(f"{token}: not one of ptrain's flags")
        out.setdefault(owner[name], {})[name] = getattr(getattr(parsed, owner[name]), name)
    return out


def to_dict(cfg: Config) -> dict:
    """Flat JSON-friendly dict of every flag (what the run was configured with)."""
    out = {}
    for group in _GROUPS:
        for k, v in dataclasses.asdict(getattr(cfg, group)).items():
            out[k] = str(v) if isinstance(v, Path) else v
    out["config"] = str(cfg.config) if cfg.config else None
    return out
