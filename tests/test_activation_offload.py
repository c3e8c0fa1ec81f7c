"""--activation_offload (ptrain/parallel/offload.py): the blocks' saved tensors round-trip through host memory
without changing a value; the planner sees them leave the device; it refuses the combinations it cannot serve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_ARGS

from ptrain.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "model_configs"


def _train(tiny_ckpt, tiny_data, out, *extra) -> tuple[list[float], object]:
    from ptrain.config import parse_config
    from ptrain.trainer import Trainer, plan_run

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(out), "--train_steps", "3", "--checkpointing_steps", "0", "--seed", "5",
                        "--enable_precomputation", "off", *TINY_ARGS, *extra])  # fmt: skip
    cfg.validate()
    trainer = Trainer(plan_run(cfg))
    return trainer.train().losses, trainer


def test_offload_trains_exactly_as_without(tiny_ckpt, tiny_data, tmp_path, single_process_env, monkeypatch):
    """Tiny LTX-Video LoRA, float32, 3 steps: the same losses bit for bit with every saved activation of the blocks
    offloaded (the size threshold lowered: the tiny model's tensors are all below 1 MiB)."""
    from ptrain.parallel import offload

    plain, _ = _train(tiny_ckpt, tiny_data, tmp_path / "plain")
    monkeypatch.setattr(offload, "MIN_BYTES", 0)
    offloaded, trainer = _train(tiny_ckpt, tiny_data, tmp_path / "offload", "--activation_offload")
    assert offloaded == plain
    assert trainer.transformer._ptrain_offload.host_bytes > 0  # something did leave


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gradient_checkpointing"], "alternative to recompute"),
        (["--ac_mode", "auto", "--gpu_memory_gb", "80"], "alternative to recompute"),
        (["--compile"], "--activation_offload with --compile"),
        (["--gradient_checkpointing", "--blocks_to_swap", "1"], "alternative to recompute"),
    ],
)
def test_offload_refuses_what_it_cannot_combine(tiny_ckpt, tiny_data, tmp_path, flags, message):
    from ptrain.config import parse_config

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--activation_offload", *TINY_ARGS, *flags])  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.slow
@pytest.mark.heavy  # four full-size simulations, about 20 s: CI runs it
def test_planner_sees_activations_leave_the_device():
    """Full-size LTX-Video LoRA r128 at 49x512x768, 2 and 3 blocks, fake tensors: without AC every block adds its
    saved activations to the step's peak; offloaded, a block adds little to it and its activations to host memory
    instead."""
    from ptrain.config import parse_config
    from ptrain.planner import simulate_config

    variant = CONFIGS / "ltx-video"
    model = json.loads((variant / "ptrain_variant.json").read_text())["model_name"]

    def peaks(*extra):
        cfg = parse_config(["--model_name", model, "--pretrained_model_name_or_path", str(variant),
                            "--num_frames", "49", "--height", "512", "--width", "768", "--rank", "128",
                            "--lora_alpha", "128", "--transformer_dtype", "bfloat16", "--enable_precomputation", "on",
                            *extra])  # fmt: skip
        return [simulate_config(cfg, 1, variant, (n,)) for n in (2, 3)]

    kept_2, kept_3 = peaks("--no_gradient_checkpointing")
    off_2, off_3 = peaks("--activation_offload")

    def growth(a, b, *keys):  # what one more block adds to the step's peak (in `keys` only, if given)
        return sum(b["categories"][k] - a["categories"][k] for k in keys) if keys else b["peak_bytes"] - a["peak_bytes"]

    weights = growth(kept_2, kept_3, "Parameter", "Optstate")  # a block's frozen weights, LoRA states
    kept, offloaded = growth(kept_2, kept_3) - weights, growth(off_2, off_3) - weights
    host = off_3["offload_host_bytes"] - off_2["offload_host_bytes"]
    assert kept_2["offload_host_bytes"] == 0 and weights == growth(off_2, off_3, "Parameter", "Optstate")
    assert off_3["peak_bytes"] < kept_3["peak_bytes"]
    assert offloaded < 0.3 * kept  # most of a block's saved activations leave the device ...
    assert 0.6 * kept < host <= kept  # ... for host memory
