"""Entry point: `torchrun --nproc_per_node N -m ptrain FLAGS` (or `python -m ptrain FLAGS` for one process)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import torch.distributed as dist

from ptrain.checkpoint import CheckpointSaveError
from ptrain.config import ConfigError, parse_config
from ptrain.errors import OutputWriteError, RunStopped
from ptrain.interrupts import install as install_sigterm
from ptrain.interrupts import message as interrupt_message
from ptrain.parallel.dims import ParallelConfigError


def _say(text: str, alike: bool = True) -> None:
    """Print a stopping message once per run: on rank 0, and (a rank-local cause, e.g. a node that lacks a file or
    sees another --output_dir) also on the first rank of every other node, with its rank and host, since such an
    error is often not rank 0's; an `alike` message (every rank decides it the same way) only on rank 0. Under
    torchrun every failed rank's message is also in torchrun's failure summary, with its rank and host (`_record`)."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))  # before init: torchrun's
    if rank == 0:
        print(text, file=sys.stderr)
    elif not alike and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[rank {rank} on {socket.gethostname()}] {text}", file=sys.stderr)
    _record(text)


def _record(text: str) -> None:
    """Under torchrun, write the stopping message to this worker's error file (TORCHELASTIC_ERROR_FILE, the format
    of torch.distributed.elastic's `record`): torchrun's failure summary then shows, for every failed rank, its host
    and ptrain's message, not a link to the docs. That is where an error raised on one rank only (a node-local
    cause) is seen when that rank is not the first of its node, which `_say` keeps quiet."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": text, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": text, "extraInfo": info}}, f)
    except OSError:
        pass  # the summary then says "<N/A>", as before; the message itself was printed or is on rank 0


def main(argv: list[str] | None = None) -> int:
    install_sigterm()  # SIGTERM outside the loop: an orderly stop, as Ctrl-C's (ptrain/interrupts.py)
    try:
        cfg = parse_config(argv)
        from ptrain.trainer import train

        train(cfg)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Leave together: a rank that tears its process group down while a peer is still finishing the last
            # collective can abort at exit (seen rarely with gloo).
            dist.barrier()
    except (ConfigError, ParallelConfigError) as e:
        _say(f"ptrain: error: {e}", alike=False)  # usually the same on every rank; not when one node lacks a file
        return 2
    except (CheckpointSaveError, OutputWriteError) as e:  # every rank; the cause may be one node's (checkpoints kept)
        _say(f"ptrain: error: {e}", alike=False)
        return 4
    except RunStopped as e:  # SIGINT / SIGTERM: stopped after a step, with a checkpoint (every rank alike)
        _say(f"ptrain: {e}")
        return e.code
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM outside the loop, or a second Ctrl-C in it: where, and what now
        text, code = interrupt_message(e)
        _say(f"ptrain: {text}")
        return code
    except FloatingPointError as e:  # the NaN guard stopped the run (every rank decides alike)
        _say(f"ptrain: stopped: {e}")
        return 3
    except Exception as e:  # anything else: its traceback goes to torchrun's failure summary too (as `record` does)
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(e)  # writes nothing outside torchrun
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
