"""--export_comfyui: the second LoRA file, keyed as ComfyUI loads each model, holds the same update.

The key naming is checked by converters ptrain does not own:
- diffusers' own readers of original / ComfyUI-style LoRA keys (`<Pipeline>.load_lora_weights`, which
  calls `_convert_non_diffusers_ltxv_lora_to_diffusers`, `_convert_non_diffusers_wan_lora_to_diffusers`,
  `_convert_hunyuan_video_lora_to_diffusers`): the ComfyUI file loaded that way must give the same
  transformer (merged weights and output) as the diffusers-format file;
- diffusers' single-file converters of original checkpoints (`convert_ltx_transformer_checkpoint_to_diffusers`,
  `convert_wan_transformer_to_diffusers`, `convert_hunyuan_video_transformer_to_diffusers`): the weight update
  each ComfyUI key applies (up @ down, comfy/weight_adapter/lora.py), renamed and split by them, must equal
  every diffusers module's update, for a LoRA on every Linear/Conv of the transformer;
- CogVideoX: diffusers has no reader of non-diffusers CogVideoX LoRAs, so its keys are checked against the
  module names of ComfyUI's own CogVideoX model (comfy/ldm/cogvideo/model.py in comfyanonymous/ComfyUI).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import MODELS, TINY_ARGS
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from ptrain.config import ConfigError, parse_config
from ptrain.export_comfyui import COMFYUI_LORA_FILE, Rule, export_comfyui_lora, read_lora_file, to_comfyui
from ptrain.models.spec import Components, get_spec
from ptrain.testing.tiny import build_tiny_pipeline

RANK, ALPHA = 4, 8.0
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"

# LoRA targets whose original names diffusers' LoRA readers convert (their other modules are checked by the
# single-file converters below). HunyuanVideo leaves out: the token refiner's fused q/k/v and the final
# norm_out (diffusers' LoRA reader chunks lora_A there as if it were a full weight: shapes no longer match),
# and the timestep/guidance MLP embedders (ComfyUI-only names, see HUNYUAN_COMFY_ONLY).
ROUNDTRIP_TARGETS = {
    "ltx_video": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "caption_projection.linear_1",
                  "proj_out"],
    "wan": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out", "time_proj", "linear_1",
            "linear_2"],
    "hunyuan_video": (
        r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
        r"|norm1\.linear|norm1_context\.linear|ff\.net\.0\.proj|ff\.net\.2|ff_context\.net\.0\.proj|ff_context\.net\.2)"
        r"|single_transformer_blocks\.\d+\.(attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp|proj_out|norm\.linear)"
        r"|context_embedder\.token_refiner\.refiner_blocks\.\d+\.(attn\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2"
        r"|norm_out\.linear)|context_embedder\.proj_in|time_text_embed\.text_embedder\.linear_[12]|proj_out"
        r"|x_embedder\.proj)"
    ),
}  # fmt: skip

# ComfyUI's HunyuanVideo MLP embedders are `in_layer` / `out_layer` (flux MLPEmbedder in
# comfy/ldm/hunyuan_video/model.py, Comfy-Org/ComfyUI); the original checkpoint (and diffusers' converter)
# call them as below. ComfyUI's LoRA key map has no alias for the original names of these.
HUNYUAN_COMFY_ONLY = {
    "time_in.in_layer": "time_in.mlp.0", "time_in.out_layer": "time_in.mlp.2",
    "guidance_in.in_layer": "guidance_in.mlp.0", "guidance_in.out_layer": "guidance_in.mlp.2",
    "txt_in.t_embedder.in_layer": "txt_in.t_embedder.mlp.0", "txt_in.t_embedder.out_layer": "txt_in.t_embedder.mlp.2",
    "txt_in.c_embedder.in_layer": "txt_in.c_embedder.linear_1",
    "txt_in.c_embedder.out_layer": "txt_in.c_embedder.linear_2",
}  # fmt: skip

# Weight names of ComfyUI's CogVideoX model (comfy/ldm/cogvideo/model.py, comfyanonymous/ComfyUI):
# CogVideoXTransformer3DModel / CogVideoXBlock / CogVideoXPatchEmbed / CogVideoXAdaLayerNorm.
COGVIDEOX_COMFY_BLOCK = {"q", "k", "v", "attn_out", "ff_proj", "ff_out", "norm1.linear", "norm2.linear"}
COGVIDEOX_COMFY_TOP = {
    "patch_embed.proj", "patch_embed.text_proj", "time_embedding_linear_1", "time_embedding_linear_2",
    "ofs_embedding_linear_1", "ofs_embedding_linear_2", "norm_out.linear", "proj_out",
}  # fmt: skip


def all_layers(transformer) -> list[str]:
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)
    return [n for n, m in transformer.named_modules() if isinstance(m, kinds)]


def lora_pipeline(model: str, targets, tmp_path, seed: int = 0):
    """A tiny pipeline whose transformer has a random (non-zero) LoRA on `targets`, saved in diffusers format
    to tmp_path/pytorch_lora_weights.safetensors as ptrain's export writes it (lora_alpha in the metadata)."""
    pipe = build_tiny_pipeline(model)
    pipe.transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=True, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    lora = get_peft_model_state_dict(pipe.transformer)
    meta = pipe.transformer.peft_config["default"].to_dict()
    pipe.save_lora_weights(tmp_path, transformer_lora_layers=lora, transformer_lora_adapter_metadata=meta)
    return pipe


def lora_deltas(pipe) -> dict[str, torch.Tensor]:
    """{diffusers module: scale * lora_B @ lora_A, in the module weight's shape}."""
    out = {}
    for name, module in pipe.transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            delta = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
            out[name] = delta.detach() * module.scaling["default"]
    return out


def comfy_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{ComfyUI module: the update ComfyUI adds}: alpha / rank * up @ down (scale 1 without a `.alpha` key,
    comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight), in the weight's shape."""
    assert not any(k.endswith(".alpha") for k in sd)
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            down, up = sd[key], sd[f"{module}.lora_B.weight"]
            assert module.startswith("diffusion_model.")
            delta = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
            out[module[len("diffusion_model.") :]] = delta
    return out


def patched_hidden_size(fn, hidden_size: int):
    """diffusers' HunyuanVideo converters split single-block `linear1` assuming the released model's width
    (`hidden_size = 3072`, a literal); the same function with the tiny model's width instead."""
    src = textwrap.dedent(inspect.getsource(fn))
    assert src.count("hidden_size = 3072") == 1
    namespace = dict(fn.__globals__)
    exec(compile(src.replace("hidden_size = 3072", f"hidden_size = {hidden_size}"), fn.__code__.co_filename, "exec"),
         namespace)  # fmt: skip
    return namespace[fn.__name__]


def bind_spec(model: str, pipe):
    spec = get_spec(model)
    return spec.bind(Components.from_pipeline(pipe))


def transformer_output(model: str, pipe) -> torch.Tensor:
    """The transformer's output on fixed random latents and conditioning, through ptrain's ModelSpec.forward."""
    spec = bind_spec(model, pipe)
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    cond = spec.simulated_conditioning(cfg, 1, 16, torch.device("cpu"), torch.float32)
    latents = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=gen)
    with torch.no_grad():
        return spec.forward(pipe.transformer.eval(), latents, torch.tensor([400.0]), cond)


def merged_weights(pipe) -> dict[str, torch.Tensor]:
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


# diffusers' LoRA config names HunyuanVideo's `time_text_embed.text_embedder.linear_1` by suffix, which the
# context embedder's module of that name matches too (without weights in either file): peft warns.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("model", ["ltx_video", "wan", "hunyuan_video"])
def test_diffusers_reads_comfyui_file_as_the_same_lora(model, tmp_path, monkeypatch):
    src = lora_pipeline(model, ROUNDTRIP_TARGETS[model], tmp_path)
    comfy = export_comfyui_lora(get_spec(model), tmp_path / DIFFUSERS_FILE, src.transformer.config)
    assert comfy == tmp_path / COMFYUI_LORA_FILE
    keys = list(load_file(comfy))
    assert keys and all(re.fullmatch(r"diffusion_model\..+\.lora_[AB]\.weight", k) for k in keys)
    if model == "hunyuan_video":
        import diffusers.loaders.lora_conversion_utils as conv
        import diffusers.loaders.lora_pipeline as lp

        cfg = src.transformer.config
        width = cfg.num_attention_heads * cfg.attention_head_dim
        fn = patched_hidden_size(conv._convert_hunyuan_video_lora_to_diffusers, width)
        monkeypatch.setattr(lp, "_convert_hunyuan_video_lora_to_diffusers", fn)
        assert any(".img_attn_qkv." in k for k in keys) and any(".linear1." in k for k in keys)

    ref, ours = build_tiny_pipeline(model), build_tiny_pipeline(model)
    ref.load_lora_weights(tmp_path)  # the diffusers-format file
    ours.load_lora_weights(tmp_path, weight_name=COMFYUI_LORA_FILE)  # converted back by diffusers itself
    loaded = lambda p: {n for n, m in p.transformer.named_modules() if hasattr(m, "lora_A") and m.lora_A}  # noqa: E731
    assert loaded(ours) == loaded(ref) == set(lora_deltas(src))

    out_ref, out_ours = transformer_output(model, ref), transformer_output(model, ours)
    torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
    plain = transformer_output(model, build_tiny_pipeline(model))
    assert (out_ref - plain).abs().max() > 1e-3, "the LoRA had no effect on the output"
    w_ref, w_ours = merged_weights(ref), merged_weights(ours)
    for k, v in w_ref.items():
        torch.testing.assert_close(w_ours[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("model", ["ltx_video", "wan", "hunyuan_video"])
def test_every_layer_maps_as_diffusers_single_file_converter_says(model, tmp_path):
    from diffusers.loaders import single_file_utils as sf

    pipe = build_tiny_pipeline(model)
    src = lora_pipeline(model, all_layers(pipe.transformer), tmp_path)
    expected = {f"{k}.weight": v for k, v in lora_deltas(src).items()}
    comfy = load_file(export_comfyui_lora(get_spec(model), tmp_path / DIFFUSERS_FILE, src.transformer.config))
    deltas = comfy_deltas(comfy)
    cfg = src.transformer.config
    if model == "hunyuan_video":
        assert set(HUNYUAN_COMFY_ONLY) <= set(deltas)
        deltas = {HUNYUAN_COMFY_ONLY.get(k, k): v for k, v in deltas.items()}
        convert = patched_hidden_size(sf.convert_hunyuan_video_transformer_to_diffusers,
                                      cfg.num_attention_heads * cfg.attention_head_dim)  # fmt: skip
    else:
        convert = {"ltx_video": sf.convert_ltx_transformer_checkpoint_to_diffusers,
                   "wan": sf.convert_wan_transformer_to_diffusers}[model]  # fmt: skip
    converted = convert({f"{k}.weight": v for k, v in deltas.items()})  # original checkpoint names
    assert set(converted) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(converted[k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_cogvideox_keys_are_comfyui_module_names(tmp_path):
    """No diffusers reader exists for non-diffusers CogVideoX LoRAs: the keys must name weights of ComfyUI's
    own CogVideoX model, and each carries its diffusers module's update unchanged (a pure rename)."""
    pipe = build_tiny_pipeline("cogvideox")
    layers = all_layers(pipe.transformer)
    src = lora_pipeline("cogvideox", layers, tmp_path)
    comfy = load_file(
        export_comfyui_lora(get_spec("cogvideox"), tmp_path / DIFFUSERS_FILE, src.transformer.config)
    )
    deltas = comfy_deltas(comfy)
    n = pipe.transformer.config.num_layers
    comfy_names = COGVIDEOX_COMFY_TOP | {f"blocks.{i}.{name}" for i in range(n) for name in COGVIDEOX_COMFY_BLOCK}
    assert set(deltas) <= comfy_names and len(deltas) == len(layers)
    ours = lora_deltas(src)
    rename = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
              "ff.net.0.proj": "ff_proj", "ff.net.2": "ff_out", "norm1.linear": "norm1.linear",
              "norm2.linear": "norm2.linear"}  # fmt: skip
    for name, delta in ours.items():
        m = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
        comfy_name = f"blocks.{m[1]}.{rename[m[2]]}" if m else name.replace("time_embedding.", "time_embedding_")
        torch.testing.assert_close(deltas[comfy_name], delta, rtol=1e-5, atol=1e-6)


def test_fused_lora_of_some_parts_is_exact():
    """Fusing only q and v of a q/k/v Linear: the k rows of the update stay zero, the others are exact."""
    gen = torch.Generator().manual_seed(0)
    lora = {f"transformer.blk.to_{p}.lora_{ab}.weight": torch.randn(shape, generator=gen)
            for p in "qv" for ab, shape in (("A", (2, 5)), ("B", (3, 2)))}  # fmt: skip
    rules = [Rule(r"blk\.(?P<part>to_q|to_k|to_v)", "blk.qkv", ("to_q", "to_k", "to_v"), (3, 3, 3))]
    sd = to_comfyui(lora, {"lora_alpha": 4, "r": 2}, rules)
    delta = comfy_deltas(sd)["blk.qkv"]
    for i, p in enumerate("qkv"):
        a, b = (lora.get(f"transformer.blk.to_{p}.lora_{ab}.weight") for ab in "AB")
        want = torch.zeros(3, 5) if p == "k" else 2 * b @ a  # scale lora_alpha / r = 4 / 2
        torch.testing.assert_close(delta[3 * i : 3 * i + 3], want)


def test_unmapped_module_is_an_error_naming_it():
    lora = {"transformer.blocks.0.norm_q.lora_A.weight": torch.zeros(2, 4),
            "transformer.blocks.0.norm_q.lora_B.weight": torch.zeros(4, 2)}  # fmt: skip
    rules = get_spec("wan").comfyui_lora_rules(build_tiny_pipeline("wan").transformer.config)
    with pytest.raises(ValueError, match=r"blocks\.0\.norm_q has no counterpart in ComfyUI's wan naming"):
        to_comfyui(lora, {"lora_alpha": 2}, rules, "wan")


def test_export_comfyui_is_lora_only(tiny_ckpt, tiny_data, tmp_path):
    base = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
            "--output_dir", str(tmp_path), "--export_comfyui", *TINY_ARGS]  # fmt: skip
    assert parse_config(base).validate().checkpoint.export_comfyui
    with pytest.raises(ConfigError, match="--export_comfyui"):
        parse_config([*base, "--training_type", "full-finetune"]).validate()


@pytest.mark.parametrize("model", MODELS)
def test_training_writes_comfyui_file(model, tiny_ckpts, tiny_data, tmp_path, single_process_env):
    """One trained step per model with the default targets: the trainer writes the ComfyUI file next to the
    diffusers one, converted from it, and every trained module's update is in it (alpha / rank folded in)."""
    from ptrain.trainer import train

    cfg = parse_config(
        ["--model_name", model, "--pretrained_model_name_or_path", str(tiny_ckpts(model)), "--data_root",
         str(tiny_data), "--output_dir", str(tmp_path), "--train_steps", "1", "--lr", "5e-3", "--rank", "4",
         "--lora_alpha", "8", "--checkpointing_steps", "0", "--export_comfyui", *TINY_ARGS]
    )  # fmt: skip
    result = train(cfg)
    diffusers_file, comfy_file = tmp_path / DIFFUSERS_FILE, tmp_path / COMFYUI_LORA_FILE
    assert result.exported == diffusers_file and comfy_file.is_file()
    written = load_file(comfy_file)
    lora, adapter = read_lora_file(diffusers_file)
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    want = to_comfyui(lora, adapter, result.spec.comfyui_lora_rules(result.transformer.config))
    assert written.keys() == want.keys()
    for k, v in want.items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=0)
    # A rename or an exact fusion moves each module's update and never drops one: the total is the same.
    total = sum(float((2.0 * lora[k.replace("lora_A", "lora_B")] @ a).square().sum()) for k, a in lora.items()
                if "lora_A" in k)  # fmt: skip
    moved = sum(float(d.square().sum()) for d in comfy_deltas(written).values())
    assert total > 0 and math.isclose(moved, total, rel_tol=1e-5)


COMFYUI_REFERENCE = Path(__file__).parent / "data" / "comfyui_lora_keys.json"


@pytest.mark.parametrize("family", ["wan", "wan_i2v_1280", "ltx_video", "hunyuan_video_r2"])
def test_every_key_is_one_comfyui_loads_onto_the_right_rows(family):
    """Pinned against ComfyUI itself (session 18 ran ComfyUI 618b803d's loader and LoRA code on ptrain's exports:
    every key loaded, weight updates equal to diffusers' fused ones, forward outputs within 1.4e-6). The data file
    records, for tiny configs of each family, the LoRA keys ComfyUI's `model_lora_keys_unet` accepts (with the
    module each patches) and where each diffusers weight lives in ComfyUI's layout (module, output rows). A LoRA on
    every Linear/Conv is converted by ptrain's real converter; every key it writes must be accepted, and each
    diffusers module's update must sit in exactly its rows (fused q/k/v and linear1 parts, swapped halves)."""
    import diffusers

    ref = json.loads(COMFYUI_REFERENCE.read_text())["families"][family]
    config = dict(ref["tiny_config"])
    transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    modules = dict(transformer.named_modules())
    assert set(ref["rows"]) <= set(modules), "reference modules missing from the diffusers model"
    gen = torch.Generator().manual_seed(0)
    lora, expected = {}, {}
    for name in ref["rows"]:
        weight = modules[name].weight
        down = torch.randn(RANK, *weight.shape[1:], generator=gen)
        up = torch.randn(weight.shape[0], RANK, *([1] * (weight.dim() - 2)), generator=gen)
        lora[f"transformer.{name}.lora_A.weight"], lora[f"transformer.{name}.lora_B.weight"] = down, up
        expected[name] = (up.flatten(1) @ down.flatten(1)) * (ALPHA / RANK)
    rules = get_spec(ref["model"]).comfyui_lora_rules(transformer.config)
    comfy = to_comfyui(lora, {"lora_alpha": ALPHA}, rules)
    deltas = comfy_deltas(comfy)
    accepted = ref["accepted"]
    refused = sorted(k for k in deltas if f"diffusion_model.{k}" not in accepted)
    assert not refused, f"ComfyUI would log 'lora key not loaded' for {refused}"
    patched = {accepted[f"diffusion_model.{k}"]: v.flatten(1) for k, v in deltas.items()}  # ComfyUI module -> update
    assert len(patched) == len(deltas), "two keys patch the same ComfyUI weight"
    covered: dict[str, int] = {}
    for name, segments in ref["rows"].items():
        missing = sorted({module for module, _, _ in segments} - set(patched))
        assert not missing, f"{name}'s update reaches no key ComfyUI applies to {missing}"
        got = torch.cat([patched[module][start:end] for module, start, end in segments])
        torch.testing.assert_close(got, expected[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
        for module, start, end in segments:
            covered[module] = covered.get(module, 0) + end - start
    assert covered == {k: v.shape[0] for k, v in patched.items()}, "rows of a ComfyUI weight left unexplained"


def test_an_export_removes_what_the_previous_export_wrote_and_it_does_not(tmp_path):
    """A new-user trial: a run re-exported at an earlier checkpoint without --export_comfyui (or branched from one)
    left the later export's ComfyUI file beside the new LoRA, unlisted and stale. publish_export removes the files
    the previous export's marker lists that this export does not write; nothing else in output_dir is touched."""
    import torch.distributed as dist

    from ptrain.export import EXPORT_MARKER, publish_export

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("the user's")
        for step, names in ((6, [DIFFUSERS_FILE, COMFYUI_LORA_FILE, "ema"]), (3, [DIFFUSERS_FILE])):
            staging = out / ".export-staging"
            staging.mkdir()
            for name in names:
                if name == "ema":
                    (staging / name).mkdir()
                    (staging / name / "weights.safetensors").write_bytes(b"ema")
                else:
                    (staging / name).write_bytes(f"step {step}".encode())
            publish_export(staging, out, step)
        assert sorted(p.name for p in out.iterdir()) == sorted([DIFFUSERS_FILE, EXPORT_MARKER, "notes.txt"])
        assert (out / DIFFUSERS_FILE).read_bytes() == b"step 3"
        assert list(json.loads((out / EXPORT_MARKER).read_text())["files"]) == [DIFFUSERS_FILE]
    finally:
        if started:
            dist.destroy_process_group()
