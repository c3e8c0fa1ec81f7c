"""--compile_mode: torch.compile's mode for the blocks. The CUDA-graph modes are refused where graphs cannot
replay (FSDP2 gathers parameters to new memory each step; block swap moves weights), and a mode the backend
would ignore is refused rather than silently dropped. (The CUDA-graph path itself runs in the GPU suite's rows
`ltx-lora-ac-cudagraphs` / `cpu-ltx-lora-ac-cudagraphs`; on the CPU torch skips the graphs.)"""

from __future__ import annotations

import pytest
from conftest import TINY_ARGS

from ptrain.config import ConfigError, parse_config


def test_the_mode_needs_compile_with_inductor(tmp_path):
    base = ["--pretrained_model_name_or_path", str(tmp_path)]
    with pytest.raises(ConfigError, match="--compile_mode reduce-overhead is inductor's: it needs --compile"):
        parse_config([*base, "--compile_mode", "reduce-overhead"]).compile.validate()
    with pytest.raises(ConfigError, match="compile=True, aot_eager"):
        parse_config([*base, "--compile", "--compile_backend", "aot_eager", "--compile_mode", "max-autotune"]
                     ).compile.validate()  # fmt: skip
    parse_config([*base, "--compile", "--compile_mode", "max-autotune-no-cudagraphs"]).compile.validate()
    cfg = parse_config([*base, "--compile", "--compile_mode", "max-autotune-no-cudagraphs"])
    assert not cfg.compile.cudagraphs()
    assert parse_config([*base, "--compile", "--compile_mode", "reduce-overhead"]).compile.cudagraphs()


def test_cuda_graphs_refuse_block_swap(tmp_path):
    cfg = parse_config(["--pretrained_model_name_or_path", str(tmp_path), "--gradient_checkpointing", "--ac_mode",
                        "full", "--blocks_to_swap", "1", "--compile", "--compile_mode", "reduce-overhead"])  # fmt: skip
    with pytest.raises(ConfigError, match="--blocks_to_swap with --compile_mode reduce-overhead"):
        cfg._validate_block_swap()


def test_cuda_graphs_refuse_an_fsdp_wrapped_model(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """A one-process full fine-tune with float32 masters runs under FSDP2's mixed precision: refused at start-up,
    the error naming the layout."""
    from ptrain.trainer import Trainer, plan_run

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "1", "--training_type", "full-finetune",
                        "--compile", "--compile_mode", "reduce-overhead", *TINY_ARGS,
                        "--transformer_dtype", "bfloat16"])  # fmt: skip
    cfg.validate()
    with pytest.raises(ConfigError, match="replays CUDA graphs, which need the plain module of one process"):
        Trainer(plan_run(cfg))


def test_validation_marks_a_cuda_graph_step_before_every_transformer_call():
    """The CUDA review: one mark before a whole denoising loop made CUDA-graph trees record new graphs at every
    denoising step (a hand-marked step stops torch's own stepping). While validating, every call of the
    transformer begins a step; the hook is gone afterwards, and without CUDA graphs nothing is marked."""
    import torch
    from torch._inductor.cudagraph_trees import MarkStepBox

    from ptrain.parallel.compile import step_per_call

    model = torch.nn.Linear(2, 2)
    before = MarkStepBox.mark_step_counter
    with step_per_call(model, cudagraphs=True):
        for _ in range(3):
            model(torch.zeros(1, 2))
    assert MarkStepBox.mark_step_counter == before - 3  # torch counts hand-marked steps downwards
    model(torch.zeros(1, 2))
    with step_per_call(model, cudagraphs=False):
        model(torch.zeros(1, 2))
    assert MarkStepBox.mark_step_counter == before - 3 and not model._forward_pre_hooks
