"""Activation checkpointing modes change what the backward recomputes, never the gradients.

Each mode is applied to the real transformer of every model (tiny checkpoint, LoRA, float32, one process) and one
training micro-batch of ptrain's own step runs forward and backward; the gradients must equal those without AC.
The SDPA forward kernel is counted in the backward: full AC runs it again for every attention call of the
blocks, --ac_mode keep_attention never (it kept the kernels' outputs), and ops keeps them too.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import MODELS
from torch.utils._python_dispatch import TorchDispatchMode

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class CountAttention(TorchDispatchMode):
    """Calls of the CPU flash SDPA forward kernel (the one CPU float32 attention runs)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is FLASH
        return func(*args, **(kwargs or {}))


def _setup(ckpt, model: str):
    from ptrain.config import parse_config
    from ptrain.models.spec import get_spec
    from ptrain.parallelize import make_trainable_model
    from ptrain.step import SimulatedInputs

    cfg = parse_config(["--model_name", model, "--pretrained_model_name_or_path", str(ckpt), "--rank", "4",
                        "--num_frames", "9", "--height", "32", "--width", "32"])  # fmt: skip
    spec = get_spec(model)
    dtypes = {k: torch.float32 for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    comps = spec.load_components(str(ckpt), dtypes, torch.device("cpu"), {})
    spec = spec.bind(comps, "normal", training_type="lora")
    torch.manual_seed(0)
    make_trainable_model(comps.transformer, cfg, spec)
    for name, p in comps.transformer.named_parameters():  # LoRA's B starts at zero: give A's gradient a signal
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    seq = spec.max_sequence_length(comps)
    inputs = SimulatedInputs(spec, comps, "cpu", (1, 3, 9, 32, 32), min(seq, 16), torch.float32)
    return cfg, spec, comps, inputs


def _gradients(cfg, spec, comps, inputs, mode: str | None, compile_backend: str | None = None):
    """LoRA gradients of one micro-batch with `mode` (None: no AC), and the SDPA forward calls of its backward."""
    from ptrain.objectives import sample_generators
    from ptrain.parallel import apply_ac, apply_compile
    from ptrain.step import TrainStep

    transformer = copy.deepcopy(comps.transformer)
    blocks = spec.blocks(transformer)
    if mode is not None:
        apply_ac(blocks, mode, every_n_blocks=2)
    if compile_backend:
        apply_compile(blocks, compile_backend)
    step = TrainStep(spec, comps, transformer, spec.make_objective(cfg.objective, comps), inputs, attention="auto")
    prepared = step.prepare({"position": [0]}, sample_generators(0, [0]))
    # torch.compile does not trace under a dispatch mode (it would run the blocks eagerly): count only without it
    count = contextlib.nullcontext if compile_backend else CountAttention
    with count() as forward:
        loss = step.loss(prepared)
    with count() as backward:
        step.backward(loss)
    if compile_backend:
        return grads_of(transformer), None, None
    return grads_of(transformer), forward.calls, backward.calls


def grads_of(transformer) -> dict[str, torch.Tensor]:
    return {n.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", ""): p.grad.clone()
            for n, p in transformer.named_parameters() if p.requires_grad}  # fmt: skip


@pytest.mark.parametrize("model", MODELS)
def test_ac_modes_keep_the_gradients_and_recompute_what_they_say(tiny_ckpts, model):
    setup = _setup(tiny_ckpts(model), model)
    reference, attention_calls, none_again = _gradients(*setup, None)
    assert attention_calls > 0 and none_again == 0
    recomputed = {}
    for mode in ("full", "selective", "ops", "keep_attention"):
        grads, calls, recomputed[mode] = _gradients(*setup, mode)
        assert calls == attention_calls
        assert grads.keys() == reference.keys() and len(grads) > 0
        for name, g in grads.items():
            torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-7, msg=f"{mode}: {name}")
    # full AC runs every attention kernel of the blocks again in backward (HunyuanVideo's token refiner attends
    # outside them); every 2nd block some of them; the kept ones never
    assert 0 < recomputed["selective"] < recomputed["full"] <= attention_calls, recomputed
    if model != "hunyuan_video":
        assert recomputed["full"] == attention_calls, recomputed
    assert recomputed["ops"] == recomputed["keep_attention"] == 0, recomputed


@pytest.mark.parametrize("model", MODELS)
def test_keep_attention_under_compile(tiny_ckpts, model):
    """The policy holds through torch.compile's tracing of the checkpointed block (aot_eager: the graphs inductor
    gets, without its code generation; torch warns that a policy under compile needs a region without in-place ops,
    and the gradients say these blocks are such). Checked once with inductor on CPU for CogVideoX: the same."""
    setup = _setup(tiny_ckpts(model), model)
    reference, _, _ = _gradients(*setup, None)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    grads, _, _ = _gradients(*setup, "keep_attention", compile_backend="aot_eager")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[name], rtol=1e-5, atol=1e-7, msg=name)


def test_keep_attention_recomputes_less_than_full(tiny_ckpt):
    """Hardware FLOPs (hfu) of keep_attention lie between no AC and full AC: the backward recomputes all the forward
    but attention, whose FLOPs are exactly what it saves against full AC."""
    from ptrain.config import parse_config
    from ptrain.flops import step_flops
    from ptrain.models.spec import get_spec

    spec = get_spec("ltx_video")
    base = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", ".", "--gradient_checkpointing"]
    counted = {mode: step_flops(parse_config([*base, "--ac_mode", mode]), spec, tiny_ckpt, 9, 32, 32)
               for mode in ("full", "keep_attention")}  # fmt: skip
    (_, model, full), (_, model_kept, kept) = counted["full"], counted["keep_attention"]
    assert model == model_kept < kept < full
