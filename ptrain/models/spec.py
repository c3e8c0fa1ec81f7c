"""The ModelSpec contract: everything model-specific the training loop needs.

The loop never branches on the model name. A spec loads the components with
diffusers/transformers `from_pretrained`, encodes text and video (frozen
encoders, through the model's own diffusers pipeline so conditioning matches
inference exactly), builds the transformer input and training target (via its
objective), names the repeated blocks that get activation checkpointing /
compile / fully_shard, and knows the diffusers pipeline used for validation
and to export / reload LoRA weights.
"""

from __future__ import annotations

import copy
import inspect
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptrain.config import ConfigError, ModelArgs, ObjectiveArgs
from ptrain.hub import origin
from ptrain.models.registry import get_spec, register  # noqa: F401  (re-exported: the specs' entry points)
from ptrain.parallel.context import CPPlan

log = logging.getLogger("ptrain")

#: Components that hold weights in a dtype chosen by a `--<name>_dtype` flag.
DTYPE_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


@dataclass
class Components:
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any
    extra: dict[str, Any] = field(default_factory=dict)  # text_encoder_2, tokenizer_2, ...
    #: The pipeline's own settings in model_index.json (Wan 2.2: boundary_ratio, expand_timesteps).
    settings: dict[str, Any] = field(default_factory=dict)
    #: The pipeline slot the trained transformer takes: "transformer_2" for Wan 2.2's low-noise expert.
    expert_slot: str = "transformer"
    #: The frozen other expert of a two-expert checkpoint, in CPU memory, loaded for validation only.
    other_expert: nn.Module | None = None

    @classmethod
    def from_pipeline(cls, pipe) -> Components:
        """A loaded diffusers pipeline's components and settings, as load_components gives them from its folder
        (the five core ones; the others, not empty, as `extra`)."""
        parts = {k: v for k, v in pipe.components.items() if v is not None}
        core = {k: parts.pop(k, None) for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}
        return cls(**core, extra=parts, settings=pipeline_settings(pipe.config))

    def as_pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline's components: with both experts each in its slot, else the trained transformer alone."""
        kwargs = {
            "transformer": self.transformer,
            "vae": self.vae,
            "text_encoder": self.text_encoder,
            "tokenizer": self.tokenizer,
            "scheduler": self.scheduler,
            **self.extra,
        }
        if self.other_expert is not None:
            other = "transformer_2" if self.expert_slot == "transformer" else "transformer"
            kwargs.update({self.expert_slot: self.transformer, other: self.other_expert})
        return kwargs


def read_model_index(path: str | Path) -> dict[str, Any]:
    """The checkpoint's model_index.json ({} without one: a folder of components only)."""
    import json

    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    try:
        return json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{index}: cannot read it ({e})") from e


def pipeline_settings(index: dict[str, Any]) -> dict[str, Any]:
    """model_index.json's pipeline settings: its keys that are neither components ([library, class]) nor
    diffusers' own (`_class_name`, ...)."""
    return {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}


@dataclass(frozen=True)
class ExpertPlan:
    """The expert a run trains on a two-expert checkpoint (Wan 2.2 A14B)."""

    expert: str  # high_noise | low_noise
    #: Its folder, which is also its pipeline slot: transformer (high noise) or transformer_2 (low noise).
    folder: str
    #: The other expert's folder, loaded (frozen, CPU memory) when the run validates; else None.
    other: str | None
    #: The switch point on the 0-1000 timestep scale (1000 x boundary_ratio).
    boundary: float


def plan_experts(m: ModelArgs, o: ObjectiveArgs, index: dict[str, Any], validates: bool) -> ExpertPlan | None:
    """--expert against the checkpoint's model_index.json; sets --min_timestep / --max_timestep to the expert's
    side of the boundary where not given (logged). None for a one-transformer checkpoint."""
    second = index.get("transformer_2")
    two = isinstance(second, list) and second and second[0] is not None and index.get("boundary_ratio") is not None
    if not two:
        if m.expert is not None:
            raise ConfigError(
                f"--expert {m.expert}: this checkpoint has one transformer; --expert is for a two-expert checkpoint "
                "(Wan 2.2 A14B: transformer/ and transformer_2/, and a boundary_ratio in model_index.json)"
            )
        return None
    boundary = 1000.0 * float(index["boundary_ratio"])
    if m.expert is None:
        raise ConfigError(
            f"this checkpoint has two experts (Wan 2.2 A14B): transformer/ denoises timesteps >= {boundary:g}, "
            f"transformer_2/ those below (boundary_ratio {index['boundary_ratio']} in model_index.json). Train one "
            "per run: --expert high_noise or --expert low_noise"
        )
    high = m.expert == "high_noise"
    folder, other = ("transformer", "transformer_2") if high else ("transformer_2", "transformer")
    side = (boundary, 1000.0) if high else (0.0, boundary)
    given = (o.min_timestep, o.max_timestep)
    if o.min_timestep is None:
        o.min_timestep = side[0]
    if o.max_timestep is None:
        o.max_timestep = side[1]
    o.validate()
    lo, hi = o.timestep_range()
    if given == (None, None):
        log.info("--expert %s: %s/, timesteps %g to %g (the pipeline's boundary: %g)", m.expert, folder, lo, hi, boundary)
    elif lo < side[0] or hi > side[1]:
        log.warning(
            "--expert %s trains timesteps %g to %g, beyond its side of the boundary (%g to %g): the pipeline samples "
            "those with the other expert", m.expert, lo, hi, *side,
        )  # fmt: skip
    return ExpertPlan(m.expert, folder, other if validates else None, boundary)


@dataclass
class Conditioning:
    """Text conditioning for one micro-batch, already on the training device, and (i2v) the first frame's
    conditioning tensors (ModelSpec.image_condition)."""

    tensors: dict[str, torch.Tensor]

    def without(self, *names: str) -> Conditioning:
        """A copy without the tensors `names` (the ones condition() has used up, which forward does not take)."""
        return Conditioning({k: v for k, v in self.tensors.items() if k not in names})


def frozen_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a frozen diffusers model (the VAE), read once: diffusers' `ModelMixin.dtype` walks every
    submodule looking for casting hooks (about 2 ms for the tiny CogVideoX VAE, on every step of a precomputed
    run otherwise); ptrain never changes a frozen model's dtype after loading it."""
    dtype = module.__dict__.get("_ptrain_frozen_dtype")
    if dtype is None:
        dtype = module.__dict__["_ptrain_frozen_dtype"] = module.dtype
    return dtype


def component_source(path: str, override: str | None, name: str) -> tuple[str, str | None]:
    """(folder, subfolder) to load component `name` from: the override folder (its `name/` subfolder if it has
    one) or the checkpoint's `name/` subfolder."""
    if override is None:
        return str(path), name
    if (Path(override) / name).is_dir():
        return str(override), name
    return str(override), None


class ModelSpec(ABC):
    name: str
    pipeline_cls: type
    transformer_cls: type
    #: component name -> class whose from_pretrained loads it (tokenizers: AutoTokenizer).
    component_classes: dict[str, type]
    #: Components loaded when the checkpoint has their subfolder (e.g. Wan 2.1 I2V's CLIP image encoder).
    optional_components: dict[str, type] = {}
    #: LoRA targets when --target_modules is not given.
    default_target_modules: list[str]
    #: Attribute names of the nn.ModuleLists holding the repeated transformer blocks.
    block_attrs: tuple[str, ...]
    #: Where context parallelism splits and gathers the video tokens (ptrain.parallel.context).
    cp_plan: CPPlan | None = None
    default_max_sequence_length: int = 128
    #: Transformer config key holding the text embedding width (simulated conditioning for the memory planner).
    text_dim_key: str = "text_embed_dim"
    #: Transformer config keys holding the number of blocks in each of `block_attrs`.
    block_count_keys: tuple[str, ...] = ("num_layers",)
    #: The attention masks the transformer passes to SDPA: none, bool or additive (ptrain/attention.py).
    attention_masks: tuple[str, ...] = ("none",)
    #: Frame rate of exported validation videos.
    fps: int = 16
    #: --train_mode values this family trains (see condition()).
    train_modes: tuple[str, ...] = ("normal",)
    #: The diffusers pipeline that samples image-to-video (validation with --train_mode i2v).
    i2v_pipeline_cls: type | None = None
    #: The pipeline that samples from the inpaint layout given a first frame (validation with --train_mode
    #: inpaint); None where diffusers has none for this family's inpaint layout.
    inpaint_pipeline_cls: type | None = None
    #: --train_mode i2v needs the decoded first frame (not only the latents).
    i2v_needs_pixels: bool = False
    #: --train_mode i2v conditions on a function of the first frame alone, with no random draws
    #: (image_condition), so --enable_precomputation stores it per sample; False where the step noises the image
    #: (CogVideoX).
    i2v_precomputable: bool = True
    #: Module path of the transformer's input (patch embedding) layer: expanded when a mode needs more channels.
    input_layer: str = ""

    # A spec from get_spec() is stateless; bind() returns a bound copy that holds the run's pipeline, mode and
    # mask settings (these class defaults are what an unbound spec reads).
    pipe = None
    sampling_pipe = None
    mode: str = "normal"
    #: The input layer bind() widened for the mode on a text-to-video checkpoint (LoRA trains it too), or None.
    expanded_input: str | None = None
    #: --inpaint_mask_probs of the run (bind() sets it; the flag's default otherwise).
    inpaint_mask_probs: dict[str, float] = ModelArgs().mask_probs()

    # --- loading -------------------------------------------------------------------------------
    def checkpoint_classes(self, path: str | Path) -> dict[str, type]:
        """The component classes of the checkpoint at `path`: component_classes, unless a family's checkpoints
        differ in one (HunyuanVideo-I2V's Llava text encoder). The trainer loads them; the memory planner sizes
        them."""
        return self.component_classes

    def load_components(
        self,
        path: str,
        dtypes: dict[str, torch.dtype],
        device: torch.device,
        overrides: dict[str, str | None],
        variant: str | None = None,
    ) -> Components:
        """Every component from the checkpoint (or its override folder); `variant` (--variant) picks the weight
        files (`*.fp16.safetensors`); the classes are checkpoint_classes'."""
        loaded = {}
        present = {n: c for n, c in self.optional_components.items() if (Path(path) / n).is_dir()}
        for name, cls in {**self.checkpoint_classes(path), **present}.items():
            src, sub = component_source(path, overrides.get(name), name)
            kwargs: dict[str, Any] = {"subfolder": sub} if sub else {}
            if name in DTYPE_COMPONENTS:
                kwargs["dtype"] = dtypes[name]
            elif name == "image_encoder":
                kwargs["dtype"] = dtypes["text_encoder"]
            if issubclass(cls, nn.Module):  # weights from safetensors only, never a pickled .bin (README)
                kwargs["use_safetensors"] = True
                if variant:
                    kwargs["variant"] = variant
            if cls.__module__.startswith("transformers.models.auto"):  # AutoTokenizer: never a checkpoint's code
                kwargs["trust_remote_code"] = False
            try:
                loaded[name] = cls.from_pretrained(src, **kwargs)
            except (OSError, ValueError) as e:
                where = f"{src}/{sub}" if sub else src
                hint = ""
                if any(Path(where).glob("*.bin")):
                    hint = " (ptrain loads weights from .safetensors only: a .bin file is a pickle; convert it)"
                raise ConfigError(f"cannot load {name} ({cls.__name__}) from {where}{origin(src)}: {e}{hint}") from e
        for name, module in loaded.items():
            if name != "transformer" and isinstance(module, nn.Module):
                module.requires_grad_(False).eval().to(device)
        core = {k: loaded.pop(k) for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}
        return Components(**core, extra=loaded, settings=pipeline_settings(read_model_index(path)))

    def shape_rules(self, path: str, overrides: dict[str, str | None]):
        """The frame counts and sizes this checkpoint accepts (ptrain.data.buckets.ShapeRules), from its
        transformer and VAE configs built on the meta device: no weights are read, so the data scan and
        --dry_run know them before (or without) loading the model."""
        from ptrain.data.buckets import ShapeRules

        meta = {}
        for name in ("transformer", "vae"):
            cls = self.component_classes[name]
            src, sub = component_source(path, overrides.get(name), name)
            try:
                config = cls.load_config(src, subfolder=sub) if sub else cls.load_config(src)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read the {name} config ({cls.__name__}) from {src}/{sub or ''}: {e}") from e
            with torch.device("meta"):
                meta[name] = cls.from_config(config)
        comps = Components(meta["transformer"], meta["vae"], None, None, None)
        rules = ShapeRules(lambda f, h, w: self.check_shape(f, h, w, comps), lambda f, h, w: 0)
        cfg = comps.transformer.config
        p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[-1]
        t, s = rules.shortest_video() - 1, rules.multiple // p  # VAE compression: time, space

        def tokens(f: int, h: int, w: int) -> int:
            return self.tokens_per_sample((1, (f - 1) // t + 1, h // s, w // s), comps)

        rules.tokens = tokens
        channels = self.latent_channels(comps)
        rules.latent_shape = lambda f, h, w: (channels, (f - 1) // t + 1, h // s, w // s)
        rules.text_sequence_length = self.max_sequence_length(comps)
        return rules

    def bind(
        self, components: Components, mode: str = "normal", mask_probs: dict[str, float] | None = None,
        training_type: str | None = None,
    ) -> ModelSpec:  # fmt: skip
        """A copy of this spec bound to loaded components: the model's diffusers pipeline around them (used to
        encode text and to validate; with --train_mode i2v / inpaint the image-to-video one samples validation
        videos), the mode and its inpaint mask probabilities. With `training_type` the transformer is also made
        ready for the mode (check_mode; may widen its input layer, recorded as `expanded_input`).
        This spec is left as it was."""
        bound = copy.copy(self)
        bound.mode = mode
        if mask_probs is not None:
            bound.inpaint_mask_probs = dict(mask_probs)
        bound.pipe = self.make_pipeline(self.pipeline_cls, components)
        bound.sampling_pipe = bound.pipe
        sampler = {"i2v": self.i2v_pipeline_cls, "inpaint": self.inpaint_pipeline_cls}.get(mode)
        if sampler is not None:
            bound.sampling_pipe = self.make_pipeline(sampler, components)
        bound.on_bind(components)
        if training_type is not None:
            bound.expanded_input = bound.check_mode(mode, components, training_type)
        return bound

    def on_bind(self, components: Components) -> None:
        """Hook for a spec to keep facts of the bound components (called on the bound copy)."""

    @staticmethod
    def make_pipeline(cls: type, components: Components):
        """`cls` built from the components and settings it takes (e.g. WanPipeline leaves out the I2V image
        encoder). A two-expert checkpoint's boundary_ratio only goes with both experts (validation): without it
        the pipeline runs its one transformer (the trained one) at every step."""
        accepted = set(inspect.signature(cls.__init__).parameters)
        kwargs = components.as_pipeline_kwargs()
        settings = dict(components.settings)
        if components.other_expert is None:
            settings.pop("boundary_ratio", None)
        pipe = cls(**{k: v for k, v in {**kwargs, **settings}.items() if k in accepted})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --- training modes (--train_mode) --------------------------------------------------------------
    def latent_channels(self, components: Components) -> int:
        cfg = components.vae.config
        return int(cfg.get("latent_channels") or cfg["z_dim"])

    def temporal_ratio(self, components: Components) -> int:
        """Pixel frames per latent frame (after the first) of the causal video VAE."""
        vae = components.vae
        return int(vae.config.get("temporal_compression_ratio") or vae.temporal_compression_ratio)

    def mode_in_channels(self, mode: str, components: Components) -> int:
        """Transformer input channels `mode` needs (noise latents plus what condition() concatenates)."""
        return self.latent_channels(components)

    def text_needs_image(self, mode: str) -> bool:
        """Whether `mode` encodes the prompt with the first frame (encode_text gets `images`; HunyuanVideo-I2V)."""
        return False

    def prompt_image_tokens(self, mode: str) -> int:
        """Tokens the image adds to the text sequence where the prompt reads it (text_needs_image)."""
        return 0

    def needs_pixels(self, mode: str) -> bool:
        """Whether `mode` conditions on decoded frames (every step, unless precomputes_condition)."""
        return mode == "inpaint" or (mode == "i2v" and self.i2v_needs_pixels)

    def precomputes_condition(self, mode: str) -> bool:
        """Whether `mode`'s conditioning comes from image_condition (the first frame alone, no random draws): the
        step computes it from the decoded clip, or --enable_precomputation once per sample."""
        return mode == "i2v" and self.i2v_precomputable

    def image_condition(self, components: Components, first: torch.Tensor, latent_shape: tuple[int, ...]):
        """i2v's conditioning tensors from the first frames `first` (B, 3, H, W) in [-1, 1], for latents of
        `latent_shape` (B, C, F', h, w): a dict that joins the text conditioning, where condition() reads it.
        Deterministic, so precomputation stores it per sample (precomputes_condition). Latent-space conditioning
        (LTX-Video) by default: the first frame encoded alone, the causal VAE's first latent frame."""
        return {"first_latents": self.condition_latents(components, first[:, :, None].float())}

    def check_mode(self, mode: str, components: Components, training_type: str) -> str | None:
        """Prepare the transformer for `mode` or raise ConfigError saying why the checkpoint cannot train it.
        Returns the input layer it widened (None if the checkpoint already had the mode's channels).

        A text-to-video checkpoint whose input is narrower than the mode needs gets the extra input channels
        with zero weights (step 0 equals the text-to-video model) and the new `in_channels` in its config; with
        LoRA the widened input layer trains fully beside the adapters and is exported with them. A checkpoint
        already built for another layout is refused with the mode it suits."""
        if mode not in self.train_modes:
            raise ConfigError(
                f"--train_mode {mode}: not implemented for {self.name} yet (it trains {', '.join(self.train_modes)})"
            )
        tr = components.transformer
        c, have = self.latent_channels(components), int(tr.config.in_channels)
        need = self.mode_in_channels(mode, components)
        if have == need:
            return None
        suits = [m for m in self.train_modes if self.mode_in_channels(m, components) == have]
        if have != c or need < have:
            hint = f"train it with --train_mode {' or '.join(suits)}" if suits else "no --train_mode uses that layout"
            raise ConfigError(
                f"this {self.name} transformer takes {have} input channels (latents {c} + conditioning "
                f"{have - c}); --train_mode {mode} needs {need}: {hint}"
            )
        if tr.config.get("out_channels", 0) is None:  # the output width followed in_channels: pin it
            tr.register_to_config(out_channels=have)
        expand_input_channels(tr.get_submodule(self.input_layer), have, need)
        tr.register_to_config(in_channels=need)
        log.info(
            "--train_mode %s: %s expanded from %d to %d input channels (new ones zero; step 0 = the text-to-video "
            "model)%s", mode, self.input_layer, have, need,
            "; LoRA trains this layer fully beside the adapters" if training_type == "lora" else "",
        )  # fmt: skip
        return self.input_layer

    def condition(
        self, mode: str, components: Components, video: torch.Tensor | None, latents: torch.Tensor, prepared,
        cond: Conditioning, generators: list[torch.Generator],
    ):  # fmt: skip
        """Add the mode's conditioning to one micro-batch: returns (prepared, cond), e.g. with a clean first frame,
        per-token timesteps and a loss mask, or conditioning latents in `cond` for forward to concatenate."""
        return prepared, cond

    @staticmethod
    def first_frame_keep(latents: torch.Tensor) -> torch.Tensor:
        """The keep mask (B, 1, F, H, W) of i2v by clean tokens: the first latent frame, whole."""
        b, _, f, h, w = latents.shape
        keep = torch.zeros(b, 1, f, h, w, device=latents.device, dtype=latents.dtype)
        keep[:, :, 0] = 1.0
        return keep

    @staticmethod
    def clean_given(prepared, keep: torch.Tensor, given: torch.Tensor, token_keep: torch.Tensor):
        """Conditioning by clean tokens (LTX-Video, Wan 2.2 TI2V): the latent cells `keep` marks (B, 1, F, H, W)
        take `given`'s values, their tokens (`token_keep`, (B, N)) get timestep 0 (per-token timesteps
        t * (1 - keep)), and the loss leaves them out."""
        from dataclasses import replace

        noisy = prepared.noisy * (1 - keep) + given * keep
        timesteps = prepared.timesteps.view(-1, 1).to(token_keep) * (1 - token_keep)
        return replace(prepared, noisy=noisy, timesteps=timesteps, loss_mask=1 - keep)

    @staticmethod
    def model_input(noisy_latents: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's input: the noisy latents, then (i2v / inpaint) condition()'s `concat_latents` on
        channels."""
        extra = cond.tensors.get("concat_latents")
        return noisy_latents if extra is None else torch.cat([noisy_latents, extra.to(noisy_latents.dtype)], dim=1)

    def condition_latents(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised latents of conditioning pixels (e.g. the video with its generated part zeroed): the mode of
        the VAE posterior, as the diffusers image-to-video pipelines encode their conditions."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        params = self.encode_latent_dist(components, pixels)
        return self.normalize_latents(components, DiagonalGaussianDistribution(params).mode().float())

    def keep_masks(self, mode: str, components: Components, video: torch.Tensor, latents: torch.Tensor,
                   generators: list[torch.Generator], packed: bool = False):  # fmt: skip
        """(pixel keep mask (B, 1, F, H, W), latent keep mask (B, 1 or temporal ratio, F', h, w)) for one batch."""
        from ptrain.models.conditioning import latent_keep_mask, sample_keep_mask
        from ptrain.objectives import to_device

        keep, _ = sample_keep_mask(mode, self.inpaint_mask_probs, tuple(video.shape), generators)
        keep = to_device(keep, video.device)
        t = self.temporal_ratio(components)
        return keep, latent_keep_mask(keep, tuple(latents.shape), t, packed).to(latents)

    # --- what the loop calls ------------------------------------------------------------------
    @abstractmethod
    def check_shape(self, num_frames: int, height: int, width: int, components: Components) -> None:
        """Raise ConfigError naming the flag when the video shape does not suit the model."""

    @abstractmethod
    def encode_text(
        self, components: Components, captions: list[str], max_sequence_length: int, images: torch.Tensor | None = None
    ) -> Conditioning:
        """Text conditioning on the training device; `images` (B, C, H, W) in [-1, 1]: the first frames, for modes
        whose prompt encoding reads the image (text_needs_image, e.g. HunyuanVideo-I2V)."""

    @abstractmethod
    def normalize_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (float32) -> the normalised latents the transformer is trained on (as the pipeline
        undoes it before decoding)."""

    def encode_video(
        self, components: Components, video: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """video: (B, C, F, H, W) in [-1, 1] -> normalised latents (B, C', F', H', W') in float32."""
        return self.latents_from_dist(components, self.encode_latent_dist(components, video), generators)

    def latents_from_dist(
        self, components: Components, params: torch.Tensor, generators: list[torch.Generator]
    ) -> torch.Tensor:
        """A latent drawn (one generator per sample) from the VAE's latent distribution parameters (mean and
        log-variance on channels, as encode_latent_dist returns or the precomputation cache stores), normalised."""
        from ptrain.objectives import sample_posterior

        params = params.to(dtype=frozen_dtype(components.vae))
        return self.normalize_latents(components, sample_posterior(params, generators).float())

    @abstractmethod
    def forward(
        self, transformer: nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """Run the transformer on (B, C', F', H', W') latents; returns the raw model output in that shape."""

    # --- helpers shared by the specs ------------------------------------------------------------
    @staticmethod
    def encode_latent_dist(components: Components, video: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's parameters (B, 2C', F', H', W') in the VAE's dtype (what precomputation stores)."""
        vae = components.vae
        with torch.no_grad():
            return vae.encode(video.to(vae.device, frozen_dtype(vae))).latent_dist.parameters

    def prompt_embeds(self, components: Components, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        """Text states from pipelines whose encode_prompt returns (embeds, negative embeds): CogVideoX, Wan."""
        embeds, _ = self.pipe.encode_prompt(
            captions, do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
            device=components.text_encoder.device,
        )  # fmt: skip
        return embeds

    def simulated_conditioning(
        self, config, batch: int, seq_len: int, device: torch.device, dtype: torch.dtype
    ) -> Conditioning:
        """Text conditioning of the shapes encode_text returns, with random values (memory planner, fake tensors)."""
        return Conditioning(
            {
                "encoder_hidden_states": torch.randn(
                    batch, seq_len, config[self.text_dim_key], device=device, dtype=dtype
                )
            }
        )

    def make_objective(self, args: ObjectiveArgs, components: Components):
        """Flow matching by default, with the scheduler's static shift unless --flow_shift is given."""
        from ptrain.objectives import FlowMatching

        shift = args.flow_shift
        if shift is None:
            cfg = components.scheduler.config
            shift = 1.0 if cfg.get("use_dynamic_shifting") else float(cfg.get("shift", 1.0))
        return FlowMatching(args, shift)

    def max_sequence_length(self, components: Components) -> int:
        return self.default_max_sequence_length

    def validation_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments the pipeline needs for validation sampling."""
        return {}

    def tokens_per_sample(self, latent_shape: tuple[int, ...], components: Components) -> int:
        """Transformer sequence length of one sample (for tokens/s and MFU)."""
        c, f, h, w = latent_shape[-4:]
        cfg = components.transformer.config
        p = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[-1]
        pt = cfg.get("patch_size_t") or (cfg.patch_size[0] if not isinstance(cfg.patch_size, int) else 1)
        return (f // pt) * (h // p) * (w // p)

    def blocks(self, transformer: nn.Module) -> list[nn.ModuleList]:
        return [getattr(transformer, a) for a in self.block_attrs]

    def fp32_module_names(self, transformer: nn.Module) -> list[str]:
        """Module name patterns diffusers keeps in float32 (`_keep_in_fp32_modules`)."""
        return list(getattr(transformer, "_keep_in_fp32_modules", None) or [])


def expand_input_channels(layer: nn.Module, old: int, new: int) -> None:
    """Give a patch-embedding layer `new - old` more input channels with zero weights (step 0 then equals the
    model without them). Works for Conv (weight (out, C, *k)) and for a Linear over flattened patches whose
    columns are channel-major (weight (out, C * k), as CogVideoX 1.5's patch embedding)."""
    w = layer.weight
    if isinstance(layer, nn.Linear):
        if w.shape[1] % old:
            raise ValueError(f"cannot expand {tuple(w.shape)} from {old} channels")
        grouped = w.data.view(w.shape[0], old, w.shape[1] // old)
        wider = torch.cat([grouped, grouped.new_zeros(w.shape[0], new - old, grouped.shape[2])], dim=1)
        layer.weight = nn.Parameter(wider.reshape(w.shape[0], -1), requires_grad=w.requires_grad)
        layer.in_features = layer.weight.shape[1]
    else:
        wider = torch.cat([w.data, w.data.new_zeros(w.shape[0], new - old, *w.shape[2:])], dim=1)
        layer.weight = nn.Parameter(wider, requires_grad=w.requires_grad)
        layer.in_channels = new
