"""Every flag is passed by some test (or exempted with a reason), and the flags no other test used do what they
say: data sampling and bucket flags on real clips, schedule and optimizer flags on the real objects, and one
in-process training run that exercises the rest (component overrides, VAE tiling/slicing, EMA timing, validation
from a file, checkpoints per epoch with the full model, logging cadence and level, FP8 skip patterns)."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, full
from safetensors.torch import load_file

from ptrain.config import Config, ConfigError, parse_config

TESTS = Path(__file__).resolve().parent

#: Flags no test passes, each with the reason. Keep it short: the goal is >= 95% of flags used in tests.
EXEMPT = {
    "offload_encoders": "moves the encoders between GPU and host memory; a no-op on CPU, exercised only on CUDA",
    "text_encoder_2_id": "HunyuanVideo's second text encoder: same code path as --text_encoder_id (tested)",
    "tokenizer_2_id": "HunyuanVideo's second tokenizer: same code path as --tokenizer_id (tested)",
}


def all_flags() -> list[str]:
    cfg = Config()
    names = ["config"]
    for group in dataclasses.fields(Config):
        if group.name in ("config", "compat_notes", "argv"):
            continue
        names += [f.name for f in dataclasses.fields(getattr(cfg, group.name))]
    return names


def test_every_flag_is_exercised_by_a_test():
    text = "\n".join(p.read_text() for p in sorted(TESTS.glob("*.py")) if p.name != Path(__file__).name)
    text += "\n" + Path(__file__).read_text().split("# ---- tests that pass flags ----")[-1]
    flags = all_flags()
    unused = [f for f in flags if not re.search(rf"--{f}\b", text)]
    assert sorted(set(unused) - set(EXEMPT)) == [], "flags no test passes (test them, or exempt them with a reason)"
    assert not set(EXEMPT) - set(flags), "exempted flags that do not exist"
    used = len(flags) - len(unused)
    assert used / len(flags) >= 0.95, f"{used}/{len(flags)} flags used in tests"


# ---- tests that pass flags ----


def _cfg(*argv: str) -> Config:
    return parse_config(["--pretrained_model_name_or_path", ".", *argv])


def test_frame_sampling_flags():
    from ptrain.data.video import FrameSampling

    s = FrameSampling.from_args(_cfg("--num_frames", "5", "--video_sample_stride", "3", "--skip_frames_start", "2",
                                     "--skip_frames_end", "4").data)  # fmt: skip
    assert s.indices(40) == [2, 5, 8, 11, 14]
    assert s.available(40) == len(range(2, 36, 3))
    with pytest.raises(ValueError, match="fewer than --num_frames 5"):
        s.indices(15)  # frames 2..10, every 3rd: 3 usable
    crop = FrameSampling.from_args(_cfg("--num_frames", "4", "--random_frame_crop", "--skip_frames_end", "10").data)
    starts = set()
    for seed in range(20):
        idx = crop.indices(40, rng=np.random.default_rng(seed))
        assert idx == list(range(idx[0], idx[0] + 4)) and idx[-1] < 30  # consecutive, inside the window
        assert idx == crop.indices(40, rng=np.random.default_rng(seed))  # seeded
        starts.add(idx[0])
    assert len(starts) > 5
    assert "from a random start" in crop.describe()


def test_frame_sampling_flags_on_a_decoded_clip(tiny_data):
    import decord

    from ptrain.data.video import FrameSampling, load_clip

    path = sorted((tiny_data / "videos").glob("*.mp4"))[0]
    vr = decord.VideoReader(str(path))
    h, w = vr[0].shape[:2]
    s = FrameSampling.from_args(
        _cfg("--num_frames", "3", "--video_sample_stride", "2", "--skip_frames_start", "1").data
    )
    clip = load_clip(path, s, h, w)
    want = torch.from_numpy(vr.get_batch([1, 3, 5]).asnumpy()).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(clip, want)


def test_bucket_size_flags(tiny_ckpt):
    from ptrain.data.buckets import BucketPlan
    from ptrain.models.spec import get_spec

    rules = get_spec("ltx_video").shape_rules(str(tiny_ckpt), {})
    base = ["--enable_bucket", "--num_frames", "25", "--video_sample_size", "128", "--image_sample_size", "64"]
    plan = BucketPlan(_cfg(*base).data, rules)
    v, i = plan.assign("video", 480, 640, 100), plan.assign("image", 480, 640, 1)
    assert abs(v.height * v.width - 128 * 128) / 128**2 < 0.15 and v.frames == 25
    assert abs(i.height * i.width - 64 * 64) / 64**2 < 0.15 and i.frames == 1
    # VideoX-Fun's token budget: frames shrink to about token_sample_size^2 x num_frames pixels.
    budget = BucketPlan(_cfg(*base, "--training_with_video_token_length", "--token_sample_size", "96").data, rules)
    b = budget.assign("video", 480, 640, 100)
    assert (b.height, b.width) == (v.height, v.width)
    assert b.frames <= 96 * 96 * 25 / (b.height * b.width) and 1 < b.frames < 25 and rules.frame_ok(b.frames)
    assert "frames within 96^2 x 25 pixels" in budget.describe()


def test_image_column_gives_the_first_frame(tiny_data, tmp_path):
    from ptrain.data.sources import load_records

    videos = sorted((tiny_data / "videos").glob("*.mp4"))[:2]
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["caption", "clip", "still"])
        out.writerow(["a", str(videos[0]), str(tmp_path / "first.png")])
        out.writerow(["b", str(videos[1]), ""])
    (tmp_path / "first.png").write_bytes(b"")
    cfg = _cfg("--dataset_file", str(table), "--video_column", "clip", "--image_column", "still")
    records = load_records(cfg.data)
    assert [r.first_frame for r in records] == [tmp_path / "first.png", None]
    assert [r.kind for r in records] == ["video", "video"]


def test_lr_power_shapes_the_polynomial_schedule():
    from ptrain.optim import build_scheduler

    lrs = {}
    for power in ("1", "2"):
        cfg = _cfg("--lr", "1e-3", "--lr_scheduler", "polynomial", "--lr_power", power, "--lr_warmup_steps", "0")
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
        sched = build_scheduler(opt, cfg.optim, 10)
        got = []
        for _ in range(5):
            opt.step()
            sched.step()
            got.append(sched.get_last_lr()[0])
        lrs[power] = got
    end = 1e-7  # diffusers' polynomial default lr_end
    for power, got in lrs.items():
        want = [(1e-3 - end) * (1 - s / 10) ** int(power) + end for s in range(1, 6)]
        assert got == pytest.approx(want, rel=1e-9), power


def test_beta3_reaches_came():
    from ptrain.optim import build_optimizer

    cfg = _cfg("--optimizer", "came", "--beta1", "0.8", "--beta2", "0.95", "--beta3", "0.97")
    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(4, 4))]}], cfg.optim, torch.device("cpu"))
    assert tuple(opt.param_groups[0]["betas"]) == (0.8, 0.95, 0.97)


@pytest.fixture(scope="module")
def tour(tiny_ckpt, tiny_data, tmp_path_factory):
    """One in-process LoRA run passing the flags that need training (world of one, gloo)."""
    import os

    import torch.distributed as dist

    from ptrain.testing.tiny import write_tiny_checkpoint
    from ptrain.trainer import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    tmp = tmp_path_factory.mktemp("tour")
    other = write_tiny_checkpoint(tmp / "other", "ltx_video", seed=1)  # other weights for the overrides
    val = tmp / "validation.csv"
    val.write_text("prompt,height,width\na red ball,32,64\na blue cube,,\n")
    out = tmp / "out"
    argv = [
        "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--output_dir", str(out),
        "--train_steps", "4", "--batch_size", "4", "--lr", "1e-2", "--lr_scheduler", "constant", "--seed", "2",
        "--transformer_id", str(other), "--vae_id", str(other / "vae"), "--text_encoder_id", str(other),
        "--tokenizer_id", str(other / "tokenizer"), "--max_sequence_length", "16",
        "--enable_tiling", "--enable_slicing",
        "--ema_decay", "0.9", "--ema_start_step", "2", "--ema_update_every", "2", "--export_ema",
        "--validate_with_ema", "--validation_dataset_file", str(val), "--validation_height", "64",
        "--validation_steps", "4", "--validation_num_inference_steps", "2", "--validation_guidance_scale", "1.0",
        "--checkpointing_epochs", "1", "--checkpoint_full_model", "--export_every_checkpoint",
        "--logging_steps", "3", "--log_level", "WARNING",
        "--layerwise_upcasting_modules", "transformer", "--layerwise_upcasting_skip_modules_pattern", "proj_in",
        *TINY_ARGS,
    ]  # fmt: skip
    from ptrain.models.spec import get_spec

    spec_cls = type(get_spec("ltx_video"))
    calls, texts = [], []
    pipe_cls = spec_cls.pipeline_cls
    original_call, original_encode = pipe_cls.__call__, spec_cls.encode_text

    def call_spy(self, *args, **kwargs):  # what validation asks the real pipeline for, and the weights it samples with
        lora = {
            n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in self.transformer.named_parameters()
            if "lora_A" in n
        }
        calls.append({"kwargs": kwargs, "lora": lora})
        return original_call(self, *args, **kwargs)

    def encode_spy(self, components, captions, max_sequence_length, **kw):
        cond = original_encode(self, components, captions, max_sequence_length, **kw)
        texts.append((max_sequence_length, cond.tensors["encoder_hidden_states"].shape[1]))
        return cond

    pipe_cls.__call__, spec_cls.encode_text = call_spy, encode_spy
    handler = _Capture()
    logging.getLogger("ptrain").addHandler(handler)
    try:
        result = train(parse_config(argv))
        root_level = logging.getLogger().level
    finally:
        pipe_cls.__call__, spec_cls.encode_text = original_call, original_encode
        logging.getLogger("ptrain").removeHandler(handler)
        if dist.is_initialized():
            dist.destroy_process_group()
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by init_distributed: a
            os.environ.pop(k, None)  # later subprocess (a dry run) must not inherit this world's rendezvous port
    return Tour(result, out, other, calls, texts, handler.records, root_level)


@dataclasses.dataclass
class Tour:
    result: object
    out: Path
    other: Path
    calls: list
    texts: list
    records: list
    root_level: int


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_tour_component_overrides_and_vae_flags(tour):
    from diffusers import AutoencoderKLLTXVideo, LTXVideoTransformer3DModel
    from transformers import T5EncoderModel

    comps = tour.result.components
    theirs = AutoencoderKLLTXVideo.from_pretrained(tour.other, subfolder="vae").state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in comps.vae.state_dict().items())
    theirs = T5EncoderModel.from_pretrained(tour.other, subfolder="text_encoder").state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in comps.text_encoder.state_dict().items())
    base = LTXVideoTransformer3DModel.from_pretrained(tour.other, subfolder="transformer").state_dict()
    ours = {k.replace("base_layer.", ""): v for k, v in tour.result.transformer.state_dict().items()}
    assert torch.equal(full(ours["proj_in.weight"]), base["proj_in.weight"])  # frozen, kept in float32
    assert comps.vae.use_tiling and comps.vae.use_slicing
    assert tour.texts and all(t == (16, 16) for t in tour.texts)  # --max_sequence_length: 16 text tokens


def test_tour_fp8_skip_pattern(tour):
    dtypes = {n.replace("base_layer.", ""): p.dtype for n, p in tour.result.transformer.named_parameters()}
    assert dtypes["proj_in.weight"] == torch.float32  # skipped by the pattern
    assert dtypes["transformer_blocks.0.attn1.to_q.weight"] == torch.float8_e4m3fn
    assert dtypes["proj_out.weight"] == torch.float8_e4m3fn  # the default patterns were replaced by "proj_in"


def _lora_files(out: Path) -> tuple[dict, dict, dict]:
    w2 = load_file(out / "checkpoints" / "step-2" / "export" / "pytorch_lora_weights.safetensors")
    w4 = load_file(out / "pytorch_lora_weights.safetensors")
    ema = load_file(out / "ema" / "pytorch_lora_weights.safetensors")
    return w2, w4, ema


def test_tour_ema_timing(tour):
    # EMA updates at steps 2 and 4 (--ema_update_every 2); up to --ema_start_step 2 it copies the weights: so the
    # EMA export is 0.9 * w2 + 0.1 * w4 (w2 from the step-2 checkpoint's export, w4 the final weights).
    w2, w4, ema = _lora_files(tour.out)
    assert any(not torch.equal(w2[k], w4[k]) for k in w2)
    for k in w2:
        torch.testing.assert_close(ema[k], 0.9 * w2[k] + 0.1 * w4[k], rtol=1e-5, atol=1e-7)


def test_tour_validation_flags(tour):
    import decord

    assert [c["kwargs"]["guidance_scale"] for c in tour.calls] == [1.0, 1.0]
    videos = sorted((tour.out / "validation" / "step-4").glob("*.mp4"))
    shapes = [decord.VideoReader(str(v))[0].shape for v in videos]
    assert shapes == [(32, 64, 3), (64, 32, 3)]  # from the file; then --validation_height with the training width
    # --validate_with_ema: the pipeline sampled with the EMA weights, not the trained ones.
    _, w4, ema = _lora_files(tour.out)
    sampled = tour.calls[0]["lora"]
    assert sampled
    for name, value in sampled.items():
        key = re.sub(r"^(?:.*?)(transformer_blocks\..*lora_A)\.default\.weight$", r"transformer.\1.weight", name)
        assert torch.equal(value, ema[key]) and not torch.equal(value, w4[key]), key


def test_tour_checkpoint_and_logging_flags(tour):
    from ptrain.checkpoint import complete_checkpoints
    from ptrain.safe_load import load_dcp_metadata

    out = tour.out
    assert [s for s, _ in complete_checkpoints(out)] == [2, 4]  # 8 samples / batch 4: an epoch is 2 steps
    keys = load_dcp_metadata(out / "checkpoints" / "step-2" / ".metadata").state_dict_metadata
    assert any(k.startswith("model.") and "base_layer" in k for k in keys)  # frozen weights too
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]  # every 3 steps, and the last
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert tour.root_level == logging.WARNING  # --log_level WARNING
    assert all(r.levelno >= logging.WARNING for r in tour.records)


def test_attention_backend_is_reported_held_and_checked(caplog):
    """--attention_backend: the start-up report names the SDPA kernel torch runs for the model's attention
    variants; a named kernel holds the training forward / backward; one the device lacks is a clear error."""
    import logging

    import torch
    from torch.nn.attention import SDPBackend

    from ptrain import attention
    from ptrain.models.spec import get_spec

    ltx = get_spec("ltx_video")
    config = {"num_attention_heads": 2, "attention_head_dim": 16}
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="ptrain"):
        kernels = attention.report(ltx, config, torch.float32, cpu, "auto")
    assert kernels == {"unmasked": "flash", "additive mask": "flash"}  # torch's CPU choice
    assert "attention: SDPA unmasked flash, additive mask flash (2 heads x 16, float32, cpu)" in caplog.text
    assert attention.report(ltx, config, torch.float32, cpu, "math") == {"unmasked": "math", "additive mask": "math"}
    with pytest.raises(ConfigError, match="--attention_backend efficient: the CPU has only flash and math"):
        attention.report(ltx, config, torch.float32, cpu, "efficient")
    seen = []
    with attention.kernel_context("math")():
        q = torch.zeros(1, 2, 8, 16)
        seen.append(SDPBackend(torch._fused_sdp_choice(q, q, q)))
    seen.append(SDPBackend(torch._fused_sdp_choice(q, q, q)))  # outside: torch's choice again
    assert seen == [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]


def test_block_swap_trains_exactly_as_without_and_keeps_weights_on_the_host(
    tiny_ckpt, tiny_data, tmp_path, single_process_env
):
    """--blocks_to_swap 1 (full AC, LoRA): the same losses as the run without it, bit for bit; between its forward
    passes the swapped block's frozen weights are the host copies, inside them a fresh device copy."""
    from ptrain.config import parse_config
    from ptrain.trainer import Trainer, plan_run

    def run(extra, out):
        cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                            "--output_dir", str(out), "--train_steps", "3", "--checkpointing_steps", "0",
                            "--gradient_checkpointing", "--ac_mode", "full", "--seed", "4", "--lr", "1e-2",
                            *extra, *TINY_ARGS])  # fmt: skip
        cfg.validate()
        trainer = Trainer(plan_run(cfg))
        seen = []
        swap = getattr(trainer.transformer, "_ptrain_block_swap", None)
        if swap is not None:
            block = swap.blocks[0]
            weight = next(p for p in block.parameters() if not p.requires_grad)
            host = dict((id(p), h) for p, h in swap.host[0])[id(weight)]
            block.register_forward_pre_hook(lambda m, a: seen.append(weight.data_ptr() != host.data_ptr()))
            assert weight.data_ptr() == host.data_ptr()
        result = trainer.train()
        if swap is not None:
            assert weight.data_ptr() == host.data_ptr()  # back on the host after the step
            assert len(seen) == 6 and all(seen)  # in each forward and recompute (3 steps): a device copy
        return result.losses

    with pytest.raises(ConfigError, match="--blocks_to_swap needs --gradient_checkpointing --ac_mode full"):
        parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                      "--blocks_to_swap", "1"]).validate()  # fmt: skip
    assert run(["--blocks_to_swap", "1"], tmp_path / "swap") == run([], tmp_path / "plain")


def test_float32_transformer_takes_a_bfloat16_text_encoders_states(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """One process trains the plain module (no FSDP2, which would cast its inputs): with --transformer_dtype float32
    and a bfloat16 text encoder encoding on the fly, the text states are cast to float32 as FSDP2 casts them (they
    used to reach the float32 caption projection as bfloat16 and stop the run)."""
    from ptrain.trainer import Trainer, plan_run

    args = [a if a != "float32" or prev != "--text_encoder_dtype" else "bfloat16"
            for prev, a in zip(["", *TINY_ARGS], TINY_ARGS)]  # fmt: skip
    assert "bfloat16" in args
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "2", "--checkpointing_steps", "0",
                        "--enable_precomputation", "off", *args])  # fmt: skip
    cfg.validate()
    trainer = Trainer(plan_run(cfg))
    assert trainer.comps.text_encoder.dtype == torch.bfloat16
    result = trainer.train()
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
