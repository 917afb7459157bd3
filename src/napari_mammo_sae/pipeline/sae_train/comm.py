"""The collectives of a multi-process (``torchrun``) SAE run, and the process group's set-up."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)


class Comm:
    """The collectives a run uses (``torch.distributed`` under another name), made safe to exit.

    Gloo finishes a collective on its own worker thread and drops its record of the work (which
    holds the tensors) a moment after ``wait()`` has returned. If Python has let go of such a
    tensor, that last drop needs the GIL; when it comes after the interpreter began to shut down,
    the worker thread is killed inside a destructor and the process aborts (SIGABRT, "terminate
    called without an active exception") although the run had finished and saved. So every tensor
    handed to a collective is kept here until gloo has released it, and :meth:`close` waits for
    that (GIL released while it waits) before destroying the process group.
    """

    def __init__(self, dist: Any, owned: bool, world: int = 1) -> None:
        self.dist = dist
        self.owned = owned  # this run created the process group and closes it
        self.world = int(world)
        self.ReduceOp = dist.ReduceOp
        self._held: list[Any] = []

    def _hold(self, tensor: Any) -> None:
        self._prune()
        self._held.append(tensor)

    def _prune(self) -> None:
        """Forget the tensors gloo has let go of (only our reference is left)."""
        self._held = [t for t in self._held if getattr(t, "_use_count", lambda: 2)() > 1]

    def all_reduce(self, tensor: Any, op: Any = None) -> None:
        self._hold(tensor)
        if op is None:
            self.dist.all_reduce(tensor)
        else:
            self.dist.all_reduce(tensor, op=op)

    def all_reduce_sum(self, tensor: Any) -> Any:
        """The element-wise sum over processes of ``tensor`` (a new tensor; the input is kept)."""
        out = tensor.detach().clone()
        self.all_reduce(out)
        return out

    def all_gather_cat(self, tensor: Any) -> Any:
        """Every process's ``tensor`` (same shape on each), concatenated along dim 0 by rank."""
        import torch

        src = tensor.detach().contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world)]
        for t in (src, *parts):
            self._hold(t)
        self.dist.all_gather(parts, src)
        return torch.cat(parts)

    def broadcast(self, tensor: Any, src: int) -> None:
        self._hold(tensor)
        self.dist.broadcast(tensor, src=src)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until gloo holds none of our tensors; True when it let go of all of them."""
        deadline = time.monotonic() + timeout
        while True:
            self._prune()
            if not self._held or time.monotonic() > deadline:
                return not self._held
            time.sleep(0.001)  # releases the GIL: gloo's threads may need it to let go

    def close(self, clean: bool) -> None:
        """Close a process group this run created.

        After a clean run every rank first meets at a barrier (rank 0 may still be writing the
        weights) and waits until gloo has let go of every tensor; after a failure there is no
        barrier, since a dead peer would never arrive.
        """
        if not self.owned:
            return
        try:
            if clean:
                self.dist.barrier()
                if not self.settle():
                    log.warning("the process group still held tensors after 10 s; closing anyway")
        finally:
            self.dist.destroy_process_group()
            self._held.clear()


def dist_setup(rank: int | None, world: int | None, device: str) -> tuple[int, int, Comm | None]:
    """(rank, world, collectives or None); initialises the process group under torchrun.

    A process group the caller made is used and left open; one made here is closed at the end.
    """
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    if world <= 1:
        return 0, 1, None
    if dist.is_initialized():
        return rank, world, Comm(dist, owned=False, world=world)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    return rank, world, Comm(dist, owned=True, world=world)


def resolve_device(device: str, world: int) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if world > 1 else "cuda"
        return "cpu"
    return device
