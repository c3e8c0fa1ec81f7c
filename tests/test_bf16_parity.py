"""Parity at the default precision: bfloat16 transformer, VAE and text encoders (the defaults), with the modules
diffusers keeps in float32 as their own float32 FSDP units (Wan's norms and time embedder), LoRA weights and
optimizer in float32. One process vs HSDP 2x2 and dp_shards 2 x cp 2 (ring) for every model, and FSDP2
(batch 1 x accumulation 2, compiled blocks) for LTX-Video.

Tolerance: bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); the layouts differ in reduction order
(gradient reduce-scatter across ranks, attention split over cp ranks), so per-step losses agree within 2% and
the exported LoRA weights within 1% (relative norm of the difference; seen on this CPU: 4e-4 to 4.1e-3, the
largest for Wan with cp ring), where the same runs in float32 agree within 1e-4 (losses) and 1e-3 (weights)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODELS, STEPS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

BF16 = ("--transformer_dtype", "bfloat16", "--vae_dtype", "bfloat16", "--text_encoder_dtype", "bfloat16",
        "--text_encoder_2_dtype", "bfloat16")  # fmt: skip
LOSS_RTOL = 2e-2
WEIGHT_RTOL = 1e-2


CASES = [
    ("ltx_video", "lora-hsdp2x2"),
    pytest.param("ltx_video", "lora-fsdp2", marks=pytest.mark.heavy),  # FSDP2 with accumulation and compile
    *(pytest.param(m, "lora-hsdp2x2", marks=pytest.mark.heavy) for m in MODELS if m != "ltx_video"),
    *(pytest.param(m, "lora-cp2-ring", marks=pytest.mark.heavy) for m in MODELS),
]


@pytest.mark.parametrize("model, layout", CASES)
def test_bf16_layouts_match_single_process(launches, model, layout):
    ref, run = launches("lora-single", model, *BF16).run, launches(layout, model, *BF16).run
    for r in (ref, run):
        assert len(r.losses) == STEPS and all(math.isfinite(v) for v in r.losses), r.losses
    assert run.losses == pytest.approx(ref.losses, rel=LOSS_RTOL), (run.losses, ref.losses)
    a = load_file(run.output_dir / "pytorch_lora_weights.safetensors")
    b = load_file(ref.output_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == torch.float32  # LoRA weights train (and export) in float32
    # Adam normalises each update, so a weight whose gradient is near zero can move either way by about lr per
    # step under bf16 rounding: compare the whole adapter (relative Frobenius norm), not element by element.
    diff = torch.cat([(a[k] - b[k]).flatten() for k in sorted(a)]).norm()
    rel = (diff / torch.cat([b[k].flatten() for k in sorted(b)]).norm()).item()
    print(f"{model} {layout}: LoRA relative difference {rel:.2e}")
    assert rel <= WEIGHT_RTOL, rel
    # It really ran in bf16: the losses are not the float32 run's.
    fp32 = launches("lora-single", model).run
    assert run.losses != pytest.approx(fp32.losses, rel=1e-6)
