"""--transformer_dtype float16 trains with dynamic loss scaling (ptrain/loss_scale.py): the gradients the optimizer
and clipping see are unscaled, an overflow skips the step and halves the scale without counting against
--max_nan_steps, and the scale is checkpointed and resumed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_ARGS


def _trainer(ckpt, data, out, dtype: str, *extra: str):
    from ptrain.config import parse_config
    from ptrain.trainer import Trainer, plan_run

    args = [a if prev != "--transformer_dtype" else dtype for prev, a in zip(["", *TINY_ARGS], TINY_ARGS)]
    cfg = parse_config(["--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data), "--output_dir",
                        str(out), "--logging_steps", "1", "--seed", "3", *args, *extra])  # fmt: skip
    cfg.validate()
    return Trainer(plan_run(cfg))


def _lora(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.transformer.named_parameters() if p.requires_grad}


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_float16_gradients_are_unscaled(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """The logged (and clipped) gradient norm is the true one: float16's matches float32's, not 2^16 times it; the
    first steps run at the initial scale and are not skipped."""
    norms = {}
    for dtype in ("float32", "float16"):
        trainer = _trainer(tiny_ckpt, tiny_data, tmp_path / dtype, dtype, "--train_steps", "2",
                           "--checkpointing_steps", "0")  # fmt: skip
        assert (trainer.scaler is not None) == (dtype == "float16")
        trainer.train()
        norms[dtype] = [m["grad_norm"] for m in _metrics(tmp_path / dtype)]
        if dtype == "float16":
            rows = _metrics(tmp_path / dtype)
            assert [m["loss_scale"] for m in rows] == [2.0**16] * 2 and not any(m["skipped_step"] for m in rows)
    assert norms["float16"][0] == pytest.approx(norms["float32"][0], rel=0.05), norms


def test_overflow_skips_halves_and_resumes(tiny_ckpt, tiny_data, tmp_path, single_process_env, capfd):
    """A scale so large that the float16 backward overflows: every step is skipped (the weights stay), the scale
    halves each time, and --max_nan_steps 1 does not stop the run (an overflow is not a diverging loss). The
    checkpoint keeps the scale; a resumed run starts from it."""
    out = tmp_path / "out"
    trainer = _trainer(tiny_ckpt, tiny_data, out, "float16", "--train_steps", "3", "--checkpointing_steps", "3",
                       "--max_nan_steps", "1")  # fmt: skip
    trainer.scaler.value.fill_(2.0**100)
    before = _lora(trainer)
    capfd.readouterr()
    trainer.train()
    err = capfd.readouterr().err  # the trainer's log (its handler writes to stderr)
    rows = _metrics(out)
    assert [m["skipped_step"] for m in rows] == [True] * 3
    assert [m["loss_scale"] for m in rows] == [2.0**100, 2.0**99, 2.0**98]
    assert all(torch.equal(p, before[n]) for n, p in _lora(trainer).items())
    assert "float16 gradients overflowed at loss scale" in err and "non-finite loss" not in err
    assert trainer.state.nan_steps_total == 0

    resumed = _trainer(tiny_ckpt, tiny_data, out, "float16", "--train_steps", "4", "--checkpointing_steps", "3")
    assert float(resumed.scaler.value) == 2.0**97 and int(resumed.scaler.growth) == 0
