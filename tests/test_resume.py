"""Resume in the users' conditions (issue 17): data-loader workers on (the default 2, and 0, 1, 4), a
warmup + cosine schedule, EMA, a dataset that the global batch does not divide, --num_train_epochs; a
checkpoint at every step, each resumed to a byte-identical export. Finished runs re-run as a no-op; damaged
checkpoints are skipped or renamed with a fallback; a failing save (a real EFBIG write error) stops with a
named error and leaves older checkpoints usable. Real torchrun processes on gloo."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_ARGS, first_error, resume_run, run_ptrain

from ptrain.checkpoint import MARKER, checkpoint_problem, complete_checkpoints, resolve_resume
from ptrain.config import ConfigError
from ptrain.export import EXPORT_MARKER

pytestmark = pytest.mark.slow

EXPORTS = ("pytorch_lora_weights.safetensors", "ema/pytorch_lora_weights.safetensors")


def _args(ckpt: Path, data: Path, workers: int) -> list[str]:
    # 8 videos, global batch 3: epochs end mid-batch; 2 epochs = 6 steps; a checkpoint after every step.
    base = [a for a in TINY_ARGS]
    base[base.index("--dataloader_num_workers") + 1] = str(workers)
    return [
        "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data), "--num_train_epochs", "2",
        "--batch_size", "3", "--seed", "3", "--lr", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
        "--ema_decay", "0.9", "--export_ema", "--checkpointing_steps", "1", *base,
    ]  # fmt: skip


def _hashes(out: Path) -> dict[str, str]:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in EXPORTS}


def _restart_copy(src: Path, dest: Path, keep_step: int) -> Path:
    """src's output as if the run had been killed right after checkpoint `keep_step` committed."""
    shutil.copytree(src, dest)
    for step, path in complete_checkpoints(dest):
        if step > keep_step:
            shutil.rmtree(path)
    for name in (*EXPORTS, EXPORT_MARKER):
        (dest / name).unlink()
    return dest


@pytest.fixture(scope="module")
def reference(tiny_ckpt, tiny_data, tmp_path_factory):
    """One uninterrupted run with the default 2 loader workers."""
    out = tmp_path_factory.mktemp("resume-ref")
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers=2), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "--num_train_epochs 2: 6 steps (3 per epoch of 8 samples, global batch 3)" in run.stderr
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2, 3, 4, 5, 6]
    lrs = [m["lr"] for m in run.metrics]
    assert len(set(lrs)) == 5 and lrs[1] == 1e-3, (
        lrs
    )  # warmup then cosine: a resume that lost the scheduler's state would show
    return run


@pytest.mark.heavy  # suite time (3 starts, ~45 s); CI runs it
def test_finished_run_with_other_settings_is_refused_and_a_rollback_supersedes_later_checkpoints(
    reference, tiny_ckpt, tiny_data, tmp_path
):
    """The second new-user audit. (1) A finished run's output_dir rerun with other settings (two runs sharing the
    default --output_dir) said "nothing to do", exit 0, and kept the old weights: now an error naming the changed
    flags. (2) A rollback (--resume_from_checkpoint N) left the old run's later checkpoints, so the next `auto`
    start resumed those, called the run complete and kept the old export: they are now moved aside, and `auto`
    continues the branch."""
    out = tmp_path / "o"
    shutil.copytree(reference.output_dir, out)
    args = [*_args(tiny_ckpt, tiny_data, workers=2), "--lr", "2e-3"]
    run = run_ptrain(1, args, out)
    assert run.returncode != 0 and "holds a finished run" in run.stderr and "--lr 0.001 -> 0.002" in run.stderr
    assert _hashes(out) == _hashes(reference.output_dir)

    run = run_ptrain(1, [*args, "--resume_from_checkpoint", "4"], out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "at step 4" in run.stderr and "the checkpoints after step 4 belong to the run" in run.stderr
    (moved,) = (out / "checkpoints").glob("superseded-*")
    assert sorted(p.name for p in moved.iterdir()) == ["step-5", "step-6"]
    assert [s for s, _ in complete_checkpoints(out)] == [1, 2, 3, 4, 5, 6]  # 5 and 6 of the branch
    branch = _hashes(out)
    assert branch != _hashes(reference.output_dir)
    # the new --lr applies (the checkpoint's optimizer and scheduler states had kept the old one, silently)
    assert "learning rate at the resumed step 4: 0.001 under this run's" in run.stderr
    assert [m["lr"] for m in run.metrics][4:] == [2 * m["lr"] for m in reference.metrics][4:]

    run = run_ptrain(1, args, out)  # `auto`: the branch is the run now, and it is complete
    assert run.returncode == 0, first_error(run.stderr)
    assert "run is complete: checkpoint" in run.stderr and _hashes(out) == branch


@pytest.mark.parametrize("keep_step, workers", [(1, 0), (2, 1), (3, 4), (4, 2), (5, 0)])
def test_resume_from_every_step_is_byte_identical(reference, tiny_ckpt, tiny_data, tmp_path, keep_step, workers):
    out = _restart_copy(reference.output_dir, tmp_path / "o", keep_step)
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert f"resuming from {out / 'checkpoints' / f'step-{keep_step}'} at step {keep_step}" in run.stderr
    assert _hashes(out) == _hashes(reference.output_dir)  # LoRA and EMA files, byte for byte
    keys = ("step", "loss", "lr", "grad_norm", "samples_seen")
    assert [{k: m[k] for k in keys} for m in run.metrics] == [{k: m[k] for k in keys} for m in reference.metrics]
    # the output_dir or its checkpoints/ folder given as the checkpoint: the error names the one to give instead
    for given in (out, out / "checkpoints"):
        with pytest.raises(ConfigError, match=f"the newest checkpoint in it is {out / 'checkpoints' / 'step-6'}"):
            resolve_resume(str(given), out)


@pytest.mark.heavy  # suite time (41 s); CI runs it
def test_rerunning_a_finished_run_is_a_no_op(reference, tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(reference.output_dir, out)
    before = {name: (out / name).stat().st_mtime_ns for name in EXPORTS}
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers=2), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "run is complete: checkpoint" in run.stderr and "nothing to do" in run.stderr
    assert {name: (out / name).stat().st_mtime_ns for name in EXPORTS} == before  # not written again
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4, 5, 6]

    # The export lost (e.g. a kill during it): the re-run exports again, the same bytes.
    (out / EXPORTS[0]).unlink()
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers=2), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "its export is missing or partial: exporting again" in run.stderr
    assert _hashes(out) == _hashes(reference.output_dir)

    # More steps: training continues from step 6.
    args = _args(tiny_ckpt, tiny_data, workers=2)
    i = args.index("--num_train_epochs")
    args[i : i + 2] = ["--train_steps", "8"]
    run = run_ptrain(1, args, out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "at step 6" in run.stderr
    assert [m["step"] for m in run.metrics] == list(range(1, 9))
    assert [s for s, _ in complete_checkpoints(out)][-1] == 8

    # Fewer steps than the newest checkpoint: a named error (exit 2), nothing touched.
    args[i + 1] = "4"
    p = _direct(args, out)
    assert p.returncode == 2, first_error(p.stderr)
    assert "is at step 8, past --train_steps 4" in p.stderr and "Traceback" not in p.stderr


def _damage(out: Path, step: int, how: str) -> None:
    path = out / "checkpoints" / f"step-{step}"
    shard = next(path.glob("*.distcp"))
    if how == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif how == "missing shard":
        shard.unlink()
    elif how == "missing rank state":
        (path / "rank-0.pt").unlink()
    elif how == "missing marker":
        (path / MARKER).unlink()
    elif how == "unreadable marker":
        (path / MARKER).write_text('{"step": 6, "train_st')
    elif how == "corrupt metadata":  # same size, garbage: only loading finds it
        meta = path / ".metadata"
        meta.write_bytes(b"\x80" + os.urandom(meta.stat().st_size - 1))


@pytest.mark.parametrize(
    "how", ["truncated shard", "missing shard", "missing rank state", "missing marker", "unreadable marker"]
)
def test_damaged_checkpoint_is_skipped_with_a_warning(reference, tmp_path, how, caplog):
    out = tmp_path / "o"
    shutil.copytree(reference.output_dir, out)
    _damage(out, 6, how)
    with caplog.at_level("WARNING", logger="ptrain"):
        assert resolve_resume("auto", out) == out / "checkpoints" / "step-5"
    assert "step-6" in caplog.text and "skipping" in caplog.text
    if how != "missing marker":
        assert checkpoint_problem(out / "checkpoints" / "step-6")
    with pytest.raises(ConfigError, match="step-6 is damaged|no complete checkpoint for step 6"):
        resolve_resume("6", out)
    # None intact: a clear error, not a silent fresh start.
    for step in range(1, 6):
        _damage(out, step, "truncated shard")
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*damaged: .*step-1: .*truncated"):
        resolve_resume("auto", out)


def test_checkpoint_that_fails_to_load_is_set_aside_and_the_previous_one_used(
    reference, tiny_ckpt, tiny_data, tmp_path
):
    out = _restart_copy(reference.output_dir, tmp_path / "o", keep_step=4)
    _damage(out, 4, "corrupt metadata")
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers=2), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "could not be loaded" in run.stderr and "renamed to damaged-step-4" in run.stderr
    assert "at step 3" in run.stderr  # fell back
    assert (out / "checkpoints" / "damaged-step-4").is_dir()  # kept for inspection, never picked again
    assert _hashes(out) == _hashes(reference.output_dir)


def _direct(args: list[str], out: Path, preexec_fn=None) -> subprocess.CompletedProcess:
    """`python -m ptrain ARGS` without torchrun (whose exit code is 1 for any failure): ptrain's own exit code."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "ptrain", *args, "--output_dir", str(out)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=preexec_fn)


def _limit_file_size(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.heavy  # suite time; CI runs it
def test_failing_save_names_the_path_and_keeps_older_checkpoints(reference, tiny_ckpt, tiny_data, tmp_path):
    out = _restart_copy(reference.output_dir, tmp_path / "o", keep_step=2)
    older = {p.name: sorted((f.name, f.stat().st_size) for f in p.iterdir()) for _, p in complete_checkpoints(out)}
    shard = next((out / "checkpoints" / "step-2").glob("*.distcp")).stat().st_size
    lora = (reference.output_dir / EXPORTS[0]).stat().st_size
    assert shard > lora + 4096  # a limit between them fails the checkpoint shard only
    p = _direct(_args(tiny_ckpt, tiny_data, workers=0), out, preexec_fn=_limit_file_size((shard + lora) // 2))
    assert p.returncode == 4, first_error(p.stderr)
    assert f"saving checkpoint step-3 to {out / 'checkpoints'} failed: File too large" in p.stderr
    assert "It needs about" in p.stderr and "older checkpoints are intact (step-1, step-2)" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (out / "checkpoints" / ".tmp-step-3").exists() and not (out / "checkpoints" / "step-3").exists()
    now = {p.name: sorted((f.name, f.stat().st_size) for f in p.iterdir()) for _, p in complete_checkpoints(out)}
    assert now == older
    # With room again the same command resumes from step 2 and ends as the uninterrupted run.
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers=0), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "at step 2" in run.stderr
    assert _hashes(out) == _hashes(reference.output_dir)
    # The fifth audit: a failing export (safetensors' own I/O error, not an OSError) was a raw traceback. Now it
    # names the cause and the checkpoint a rerun exports from; the rerun writes the same files.
    (out / EXPORT_MARKER).unlink()
    for name in EXPORTS:
        (out / name).unlink()
    p = _direct(_args(tiny_ckpt, tiny_data, workers=0), out, preexec_fn=_limit_file_size(lora // 2))
    assert p.returncode == 4, first_error(p.stderr)
    assert f"ptrain: error: writing the export to {out} failed at step 6: " in p.stderr and "File too large" in p.stderr
    assert "The latest checkpoint, step-6, is intact" in p.stderr and "Traceback" not in p.stderr
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, workers=0), out)
    assert run.returncode == 0, first_error(run.stderr)
    assert _hashes(out) == _hashes(reference.output_dir)


@pytest.mark.heavy  # suite time (14 s); CI runs it
def test_unwritable_validation_folder_stops_with_a_named_error(tiny_ckpt, tiny_data, tmp_path):
    """The fifth audit: a validation video that could not be written (disk full, unwritable folder; here a file
    where the folder goes) ended the run with a traceback, unlike a failing checkpoint. Now: exit 4, the cause and
    the checkpoint a rerun resumes from."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "validation").write_text("not a folder")
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "2",
            "--checkpointing_steps", "1", "--validation_prompts", "a cat", "--validation_steps", "1",
            "--validation_num_inference_steps", "2", *TINY_ARGS]  # fmt: skip
    p = _direct(args, out)
    assert p.returncode == 4, first_error(p.stderr)
    assert "ptrain: error: writing the validation videos of step 1 failed at step 1: Not a directory" in p.stderr
    assert "The latest checkpoint, step-1, is intact" in p.stderr and "Traceback" not in p.stderr
    # The rerun resumes from step-1, saved before that step's validation: it samples the missed validation first.
    (out / "validation").unlink()
    p = _direct(args, out)
    assert p.returncode == 0, first_error(p.stderr)
    assert "validation at step 1 did not finish before the run stopped" in p.stderr
    for step in (1, 2):
        index = json.loads((out / "validation" / f"step-{step}" / "prompts.json").read_text())
        assert [v["prompt"] for v in index.values()] == ["a cat"]


@pytest.mark.heavy
@pytest.mark.parametrize("extra", [[], ["--fused_backward_pass"]], ids=["step", "fused-backward"])
def test_full_bf16_resumes_exactly_on_fsdp(tiny_ckpt, tiny_data, tmp_path, extra):
    """--full_bf16 (bfloat16 weights and moments, stochastic rounding) on 2 FSDP2 ranks: the rounding bits follow
    the checkpointed step count, so a run resumed from step 2 exports the same weights as the uninterrupted one;
    also when the optimizer steps block by block in the backward (--fused_backward_pass: its draws are counted in
    the same checkpointed parameter groups)."""
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "4",
            "--training_type", "full-finetune", "--full_bf16", "--dp_shards", "2", "--checkpointing_steps", "2",
            "--seed", "5", "--lr", "1e-4", *TINY_ARGS, *extra]  # fmt: skip
    args[args.index("--transformer_dtype") + 1] = "bfloat16"
    ref = run_ptrain(2, args, tmp_path / "ref")
    assert ref.returncode == 0, first_error(ref.stderr)
    files = sorted(p.name for p in (ref.output_dir / "transformer").glob("*.safetensors"))
    assert files
    run = resume_run(ref, 2, args, tmp_path / "resumed", from_step=2, last_step=4)

    def digest(folder: Path) -> list[str]:
        return [hashlib.sha256((folder / "transformer" / f).read_bytes()).hexdigest() for f in files]

    assert digest(run.output_dir) == digest(ref.output_dir)
    assert [(m["step"], m["loss"]) for m in run.metrics] == [(m["step"], m["loss"]) for m in ref.metrics]


@pytest.mark.heavy  # four runs and four dry runs, about 60 s (CI runs it)
def test_resuming_with_other_settings_says_what_changed(tiny_ckpt, tiny_data, tmp_path):
    """A restart in the same --output_dir with other LoRA adapters (rank, alpha, target modules) than the
    checkpoint's: an error before loading that says why (it was DCP's bare size-mismatch ValueError, and fewer
    target modules dropped trained adapters silently); without the previous start's config.json, the load's error
    says what to do; a changed --lr alone resumes, with a warning naming every flag changed since."""
    base = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--checkpointing_steps",
            "1", "--seed", "3", *TINY_ARGS]  # fmt: skip
    first = run_ptrain(1, [*base, "--train_steps", "2", "--rank", "4", "--lr", "1e-4"], tmp_path)
    assert first.returncode == 0, first_error(first.stderr)
    finished = shutil.copytree(tmp_path, tmp_path.with_name(tmp_path.name + "-finished"))
    # The fifth audit: another --lora_alpha rescaled what the checkpoint's adapters learned, with a warning only;
    # a new-user trial: fewer --target_modules dropped trained adapters the same way. All refused before loading.
    refused = "ptrain: error: resume from {} with other LoRA adapters: ".format(tmp_path / "checkpoints" / "step-2")
    alpha = _direct([*base, "--train_steps", "3", "--rank", "4", "--lr", "1e-4", "--lora_alpha", "8", "--dry_run"],
                    tmp_path)  # fmt: skip
    assert alpha.returncode == 2 and refused + "--lora_alpha 64.0 -> 8.0: the adapters were trained" in alpha.stderr
    rank = _direct([*base, "--train_steps", "3", "--rank", "8", "--lr", "1e-4", "--dry_run"], tmp_path)
    assert rank.returncode == 2 and "--rank 4 -> 8: the checkpoint's adapter matrices have rank 4" in rank.stderr
    fewer = _direct([*base, "--train_steps", "3", "--rank", "4", "--lr", "1e-4", "--target_modules", "to_q", "to_k",
                     "--dry_run"], tmp_path)  # fmt: skip
    assert fewer.returncode == 2 and "the trained adapters of to_out.0, to_v would be dropped" in fewer.stderr
    dry = _direct([*base, "--train_steps", "3", "--rank", "4", "--lr", "2e-4", "--dry_run"], tmp_path)
    assert dry.returncode == 0, first_error(dry.stderr)  # the dry run lists them too (the second audit)
    assert "flags changed since that run's previous start: --lr 0.0001 -> 0.0002" in dry.stdout
    # Without the previous start's record (a checkpoint copied alone) the load itself says what to do.
    (tmp_path / "config.json").rename(tmp_path / "config.json.kept")
    again = run_ptrain(1, [*base, "--train_steps", "3", "--rank", "8", "--lr", "2e-4"], tmp_path)
    (tmp_path / "config.json.kept").rename(tmp_path / "config.json")
    assert again.returncode != 0
    assert "the checkpoint was written with other settings" in again.stderr
    assert "--resume_from_checkpoint none" in again.stderr
    lr = run_ptrain(1, [*base, "--train_steps", "3", "--rank", "4", "--lr", "2e-4"], tmp_path)  # resumes, warned
    assert lr.returncode == 0, first_error(lr.stderr)
    assert "with flags changed since the previous start (" in lr.stderr and "): --lr 0.0001 -> 0.0002;" in lr.stderr
    # the refused start left the previous start's record: a restart with the first flags reports no change
    assert json.loads((tmp_path / "config.json").read_text())["rank"] == 4
    # A finished run with an export-only flag added (the fifth audit: refused as "other settings") exports again.
    lora = (finished / "pytorch_lora_weights.safetensors").read_bytes()
    comfy = run_ptrain(1, [*base, "--train_steps", "2", "--rank", "4", "--lr", "1e-4", "--export_comfyui"], finished)
    assert comfy.returncode == 0, first_error(comfy.stderr)
    assert "--export_comfyui False -> True: exporting again" in comfy.stderr and "at step 2" in comfy.stderr
    assert (finished / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert (finished / "pytorch_lora_weights_comfyui.safetensors").is_file() and len(comfy.losses) == 2  # none new


def test_a_second_run_in_the_same_output_dir_stops_at_start(tmp_path):
    """output_dir/.ptrain.lock (flock, held by rank 0 while training): a second run there is a ConfigError that
    names the holder; once released (or the holder's process ended) the folder is free again."""
    from ptrain.trainer import lock_output_dir

    held = lock_output_dir(tmp_path / "out", 0)
    with pytest.raises(ConfigError, match=f"is in use by another ptrain run \\(pid {os.getpid()} on "):
        lock_output_dir(tmp_path / "out", 0)
    held.release()
    lock_output_dir(tmp_path / "out", 0).release()


@pytest.mark.heavy  # three starts (~45 s); CI runs it
def test_ranks_that_see_different_output_dirs_stop_with_one_error(tiny_ckpt, tiny_data, tmp_path):
    """The sixth audit: a --output_dir that is not shared by every node (here: a relative path, rank 1 started in
    another folder). Ranks that found different checkpoints waited in the load for 30 minutes (--dist_timeout_s)
    before an unrelated timeout; a fresh run failed at its first save with another rank's "Connection closed by
    peer". Both now stop at start with an error that names the cause."""
    worker = (str(REPO / "tests" / "rank_fault_worker.py"),)
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "1",
            "--checkpointing_steps", "1", *TINY_ARGS]  # fmt: skip
    first = run_ptrain(1, args, Path("out"), cwd=tmp_path)
    assert first.returncode == 0, first_error(first.stderr)
    elsewhere = {"PTRAIN_FAULT_RANK": "1", "PTRAIN_RANK_CWD": str(tmp_path / "node-b")}
    run = run_ptrain(2, [*args, "--train_steps", "2"], Path("out"), entry=worker, env_extra=elsewhere, cwd=tmp_path)
    assert run.returncode != 0
    assert "the ranks see different checkpoints in out: checkpoint step 1 on some, no checkpoint on others" in run.stderr
    assert "Traceback" not in run.stderr.split("ptrain: error:")[0][-2000:]
    fresh = run_ptrain(2, args, Path("fresh"), entry=worker, env_extra=elsewhere, cwd=tmp_path)
    assert fresh.returncode != 0
    assert "--output_dir fresh is not one folder seen by every rank: rank 1 on" in fresh.stderr
    assert not (tmp_path / "node-b" / "fresh" / "checkpoints").exists()
