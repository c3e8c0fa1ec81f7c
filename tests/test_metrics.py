"""Training metrics: MFU from FLOPs counted on the first step, and the per-phase step breakdown on request."""

from __future__ import annotations

import json

import pytest
from conftest import first_error, train_args


@pytest.mark.slow
def test_mfu_and_step_breakdown_are_logged(ptrain_run, tiny_ckpt, tiny_data, tmp_path):
    args = train_args(tiny_ckpt, tiny_data, "--train_steps", "2", "--checkpointing_steps", "0", "--batch_size", "1",
                      "--gradient_accumulation_steps", "2", "--peak_tflops", "0.5", "--log_step_breakdown")  # fmt: skip
    run = ptrain_run(1, args, tmp_path / "out")
    assert run.returncode == 0, first_error(run.stderr)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["tflops_per_step"] > 0 and 0 < r["mfu"] < 1
        assert r["mfu"] == pytest.approx(r["tflops_per_step"] / r["step_time_s"] / 0.5, rel=1e-6)
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] >= 0
        assert r["forward_s"] + r["backward_s"] + r["optimizer_s"] <= r["step_time_s"]
    assert rows[0]["tflops_per_step"] == rows[1]["tflops_per_step"]  # counted once (2 micro-batches each)


def test_no_mfu_without_a_known_peak(tmp_path):
    import torch

    from ptrain.metrics import device_peak_tflops

    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 1.5) == 1.5
