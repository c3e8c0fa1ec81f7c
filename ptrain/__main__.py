"""Entry point: `torchrun --nproc_per_node N -m ptrain FLAGS` (or `python -m ptrain FLAGS` for one process)."""

from __future__ import annotations

import sys

import torch.distributed as dist

from ptrain.checkpoint import CheckpointSaveError
from ptrain.config import ConfigError, parse_config
from ptrain.errors import RunStopped
from ptrain.interrupts import install as install_sigterm
from ptrain.interrupts import message as interrupt_message
from ptrain.parallel.dims import ParallelConfigError


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
        if not dist.is_initialized() or dist.get_rank() == 0:  # the same message on every rank: print it once
            print(f"ptrain: error: {e}", file=sys.stderr)
        return 2
    except CheckpointSaveError as e:  # raised on every rank alike; older checkpoints are intact
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"ptrain: error: {e}", file=sys.stderr)
        return 4
    except RunStopped as e:  # SIGINT / SIGTERM: stopped after a step, with a checkpoint (every rank alike)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"ptrain: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM outside the loop, or a second Ctrl-C in it: where, and what now
        text, code = interrupt_message(e)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"ptrain: {text}", file=sys.stderr)
        return code
    except FloatingPointError as e:  # the NaN guard stopped the run (every rank decides alike)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"ptrain: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
