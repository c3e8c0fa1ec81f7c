"""Entry point: `torchrun --nproc_per_node N -m ptrain FLAGS` (or `python -m ptrain FLAGS` for one process)."""

from __future__ import annotations

import os
import socket
import sys

import torch.distributed as dist

from ptrain.checkpoint import CheckpointSaveError
from ptrain.config import ConfigError, parse_config
from ptrain.errors import RunStopped
from ptrain.interrupts import install as install_sigterm
from ptrain.interrupts import message as interrupt_message
from ptrain.parallel.dims import ParallelConfigError


def _say(text: str, alike: bool = True) -> None:
    """Print a stopping message once per run: on rank 0, and (a rank-local cause, e.g. a node that lacks a file or
    sees another --output_dir) also on the first rank of every other node, with its rank and host, since such an
    error is often not rank 0's; an `alike` message (every rank decides it the same way) only on rank 0."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, file=sys.stderr)
    elif not alike and os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"[rank {dist.get_rank()} on {socket.gethostname()}] {text}", file=sys.stderr)


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
    except CheckpointSaveError as e:  # raised on every rank; the cause may be one node's (older checkpoints intact)
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
