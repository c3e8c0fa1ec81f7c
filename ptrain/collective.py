"""Agreeing on a local failure before the next collective, so no rank is left waiting on one that raised."""

from __future__ import annotations

import torch
import torch.distributed as dist


#: logging `extra` for a message every rank logs alike (the data scan's skips, the global step's counts): shown by
#: rank 0 only (ptrain.trainer.setup_logging); other warnings of other ranks are shown with their rank.
ALIKE = {"alike": True}


class PeerFailed(RuntimeError):
    """Raised on the ranks that did not fail themselves when another rank did."""


def all_max(value: int, group=None) -> int:
    """Collective over `group` (default: the world): the largest of the ranks' integers."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    nccl = dist.get_backend(group) == "nccl"
    t = torch.tensor([value], device=torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def raise_if_any_failed(err: BaseException | None, what: str) -> None:
    """Collective: every rank passes its own exception (or None); if any rank failed, all raise.

    The failing rank re-raises its own exception; the others raise PeerFailed naming `what`."""
    failed = all_max(0 if err is None else 1)
    if err is not None:
        raise err
    if failed:
        raise PeerFailed(f"{what} failed on another rank (its log has the error)")
