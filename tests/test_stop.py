"""Stopping a run with Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption, torchrun stopping its workers): the run
finishes its step, saves a checkpoint there, says so and exits 128 + the signal; the same command resumes from
that step. Before, Ctrl-C printed a 90-line traceback and lost every step since the last checkpoint (the second
new-user audit). Real processes and real signals, with the default 2 loader workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_ARGS, first_error, run_ptrain

from ptrain.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow


def _args(ckpt: Path, data: Path, steps: int) -> list[str]:
    base = list(TINY_ARGS)
    base[base.index("--dataloader_num_workers") + 1] = "2"  # the default
    return ["--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data), "--train_steps", str(steps),
            "--checkpointing_steps", "1000", "--enable_precomputation", "off", *base]  # fmt: skip


def _signal_after(cmd: list[str], sig: int, after_step: int, whole_group: bool) -> tuple[int, str]:
    """Start `cmd` in a session of its own, send `sig` once its progress bar passes `after_step` (to every process
    of the session, as a terminal's Ctrl-C does, or to the first process only, as a scheduler does); -> (exit
    status, stderr)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen, sent, deadline = [], False, time.time() + 300
    for chunk in iter(lambda: p.stderr.read(256), ""):
        seen.append(chunk)
        if not sent and (m := re.findall(r"train:.*?\| *(\d+)/\d+", "".join(seen[-8:]))) and int(m[-1]) >= after_step:
            os.killpg(p.pid, sig) if whole_group else os.kill(p.pid, sig)
            sent = True
        if time.time() > deadline:
            p.kill()
            break
    p.wait(timeout=60)
    assert sent, "".join(seen)[-3000:]
    return p.returncode, "".join(seen)


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_command_resumes(tiny_ckpt, tiny_data, tmp_path):
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "ptrain", *_args(tiny_ckpt, tiny_data, 400), "--output_dir", str(out)]
    code, err = _signal_after(cmd, signal.SIGINT, 3, whole_group=True)
    assert code == 128 + signal.SIGINT, err[-3000:]
    m = re.search(r"ptrain: stopped by SIGINT after step (\d+) of 400: checkpoint step-\1 saved in", err)
    assert m, err[-3000:]
    step = int(m.group(1))
    assert [s for s, _ in complete_checkpoints(out)] == [step]
    assert "Traceback" not in err
    # log lines start lines of their own (they were appended to the progress bar: "...it/s]12:46:06 [rank0] ...")
    assert "stopping after this step" in err and not re.search(r"\]\d\d:\d\d:\d\d \[rank0\]", err)

    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, step + 2), out)  # the same command, fewer steps to go
    assert run.returncode == 0, first_error(run.stderr)
    assert f"at step {step}" in run.stderr and [m["step"] for m in run.metrics][-1] == step + 2


@pytest.mark.heavy  # suite time (~30 s); CI runs it
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(tiny_ckpt, tiny_data, tmp_path):
    """A scheduler's SIGTERM to torchrun: the agent passes it to its workers, which agree on the step (an
    all-reduce on a CPU group each step), save there and exit; the agent's own report follows."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ptrain",
           *_args(tiny_ckpt, tiny_data, 400), "--dp_shards", "2", "--output_dir", str(out)]  # fmt: skip
    code, err = _signal_after(cmd, signal.SIGTERM, 3, whole_group=False)
    assert code != 0
    m = re.search(r"ptrain: stopped by SIGTERM after step (\d+) of 400: checkpoint step-\1 saved", err)
    assert m, err[-3000:]
    assert [s for s, _ in complete_checkpoints(out)] == [int(m.group(1))]


def test_sigterm_outside_the_loop_is_an_orderly_stop():
    """Outside the loop SIGTERM raises Terminated (a KeyboardInterrupt, so clean-ups run; its default ended the
    process without them) and the message names where the run was."""
    from ptrain.interrupts import Terminated, install, message, phase

    previous = signal.getsignal(signal.SIGTERM)
    try:
        install()
        with pytest.raises(Terminated) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once; never reached
        assert message(info.value) == ("interrupted by SIGTERM while starting (loading the model and data): no step "
                                       "of this run was trained; rerun the same command to start it", 143)  # fmt: skip
        with pytest.raises(KeyboardInterrupt) as info:
            with phase("outer", "o"), phase("inner", "rerun it"):
                raise KeyboardInterrupt
        assert message(info.value) == ("interrupted by SIGINT inner: rerun it", 130)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interrupts_at_start_up_and_export_say_what_a_rerun_does(tiny_ckpt, tiny_data, tmp_path, monkeypatch,
                                                                   single_process_env, capsys):  # fmt: skip
    """The entry point, in-process: a real SIGTERM while the model is built, and a Ctrl-C during the export, end
    with one line (no traceback) and 128 + the signal; the output folder's lock is released; the rerun after the
    export's interrupt exports without training again."""
    from ptrain.__main__ import main as entry
    from ptrain.export import EXPORT_MARKER
    from ptrain.trainer import Trainer

    out = tmp_path / "o"
    args = [*_args(tiny_ckpt, tiny_data, 2), "--dataloader_num_workers", "0", "--checkpointing_steps", "1",
            "--output_dir", str(out)]  # fmt: skip

    def main(argv):  # a fresh world each time: init_distributed sets the rendezvous variables
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        return entry(argv)

    previous = signal.getsignal(signal.SIGTERM)
    try:
        with monkeypatch.context() as m:
            m.setattr(Trainer, "build_model", lambda self: os.kill(os.getpid(), signal.SIGTERM))
            assert main(args) == 143
        err = capsys.readouterr().err
        assert "ptrain: interrupted by SIGTERM while starting (loading the model and data): no step of this run was " \
               "trained; rerun the same command to start it" in err and "Traceback" not in err

        def interrupted(self):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(Trainer, "export_final", interrupted)
            assert main(args) == 130  # the lock of the first start was released: no "another run holds" error
        err = capsys.readouterr().err
        assert "ptrain: interrupted by SIGINT while exporting the trained weights: training is complete and " \
               "checkpointed at step 2; rerun the same command to export again" in err, err[-2000:]
        assert not (out / EXPORT_MARKER).exists()
        assert main(args) == 0
        err = capsys.readouterr().err
        assert (out / EXPORT_MARKER).is_file() and "at step 2" in err  # resumed at the last step: nothing to train
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_failing_step_with_loader_workers_exits_instead_of_hanging(tiny_ckpt, tiny_data, tmp_path):
    """An exception in the loop with the default 2 loader workers: the workers ignore SIGTERM (so that Ctrl-C and a
    scheduler's SIGTERM reach only the training process, which stops with a checkpoint), and Python's exit, which
    terminates and then joins child processes, waited for them forever: the failed process hung (seen with a
    CogVideoX-5B-I2V size error). It now exits at once with the error."""
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "4",
            "--checkpointing_steps", "0", "--height", "32", "--width", "32", "--num_frames", "9", "--report_to",
            "none"]  # fmt: skip
    t0 = time.time()
    run = run_ptrain(1, args, tmp_path / "out", timeout=180, entry=(str(REPO / "tests" / "rank_fault_worker.py"),),
                     env_extra={"PTRAIN_FAULT_RANK": "0", "PTRAIN_FAULT_STEP": "2", "PYTHONPATH": str(REPO)})  # fmt: skip
    assert run.returncode != 0 and "injected failure in the training step" in run.stderr, run.stderr[-3000:]
    assert "2 loader workers" in run.stderr and time.time() - t0 < 150


def test_what_every_rank_logs_alike_is_shown_by_rank_0_only(capsys):
    """The sixth audit: the data scan's skip list (up to 21 lines) and the global step's replaced-sample count were
    printed by every rank. Marked `ALIKE`, they are shown by rank 0; other ranks' own warnings still show."""
    import logging

    from ptrain.collective import ALIKE
    from ptrain.trainer import setup_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    log = logging.getLogger("ptrain")
    try:
        for rank in (0, 1):
            setup_logging(rank, "INFO")
            log.warning("skipping 4 of 13 samples (rank %d)", rank, extra=ALIKE)
            log.warning("sample x.mp4 failed to decode on rank %d", rank)
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert "skipping 4 of 13 samples (rank 0)" in err and "(rank 1)" not in err
    assert "failed to decode on rank 0" in err and "[rank1] WARNING sample x.mp4 failed to decode on rank 1" in err


def test_a_loader_that_fails_while_starting_its_workers_exits_instead_of_hanging(tmp_path):
    """A new-user trial: an error raised while the loader's iterator was built (its sampler failed on the first
    indices, with the workers already started) hung the process after the traceback: the half-built loader never
    shut its workers down, and Python's exit stops them with SIGTERM, which they ignore, then waits forever.
    build_dataloader registers an exit handler that kills such workers first."""
    script = tmp_path / "half_started.py"
    script.write_text(
        "import torch.utils.data as tud\n"
        "from torchdata.stateful_dataloader import StatefulDataLoader\n"
        "from ptrain.data import _end_stray_workers_at_exit, ignore_stop_signals\n"
        "class Failing(tud.Sampler):\n"
        "    def __iter__(self):  # a generator, as GlobalBatchSampler's: it fails once the workers have started\n"
        "        raise ValueError('sampler failed at the first indices')\n"
        "        yield 0\n"
        "    def __len__(self):\n"
        "        return 4\n"
        "_end_stray_workers_at_exit()\n"
        "loader = StatefulDataLoader(list(range(4)), sampler=Failing(), num_workers=2,"
        " worker_init_fn=ignore_stop_signals, persistent_workers=True)\n"
        "iter(loader)\n"
    )
    t0 = time.time()
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 1 and "sampler failed at the first indices" in run.stderr, run.stderr[-2000:]
    assert time.time() - t0 < 60
