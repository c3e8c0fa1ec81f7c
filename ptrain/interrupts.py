"""Ctrl-C (SIGINT) and SIGTERM outside the training loop: at set-up, during precomputation, at the export.

The loop has its own handler (ptrain.trainer.StopRequest: stop after the step, with a checkpoint). Before and after
it, a signal stops the run at once; this module makes that an orderly stop: SIGTERM raises `Terminated` (a
KeyboardInterrupt, as Ctrl-C's, so clean-ups run; SIGTERM's default ended the process without them), each phase
records where the run is and what a rerun does (`phase`), and the entry point prints that one line instead of a
traceback (`message`) and exits 128 + the signal's number, as a shell reports a process the signal ended."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop."""

    signum = signal.SIGTERM


#: an interrupt before any phase: the model or data was loading
_START = ("while starting (loading the model and data)", "no step of this run was trained; rerun the same command to "
          "start it")


@contextmanager
def phase(what: str, rerun: str) -> Iterator[None]:
    """Within the block, an interrupt is reported as `ptrain: interrupted by SIG... <what>: <rerun>` (the
    innermost phase it passes through names it)."""
    try:
        yield
    except KeyboardInterrupt as e:
        if not hasattr(e, "ptrain_phase"):
            e.ptrain_phase = (what, rerun)
        raise


def _terminate(signum, frame) -> None:
    raise Terminated


def install() -> None:
    """SIGTERM raises Terminated from now on (main thread only: Python runs handlers there)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)


def message(exc: KeyboardInterrupt) -> tuple[str, int]:
    """-> (the line to print, the exit status) for an interrupt that reached the entry point."""
    signum = getattr(exc, "signum", signal.SIGINT)
    what, rerun = getattr(exc, "ptrain_phase", _START)
    return f"interrupted by {signal.Signals(signum).name} {what}: {rerun}", 128 + int(signum)
