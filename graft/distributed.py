"""Training on several processes with PyTorch's own engine: ``torchrun ... -m graft train``.

graft reads the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``...) and joins the process group: NCCL when each process has a GPU, gloo on
CPUs. What is shared out and how:

- the frozen backbone's forward passes (the feature cache) are split by rank and gathered,
  so each image is computed once by one process; rank 0 alone reads and writes the disk
  cache and hands the stored rows to the others, so nodes need no shared cache folder;
- each global batch of both stages is split across ranks and trained under
  ``DistributedDataParallel``: with cached activations the loss is normalised by the global
  batch, so the update equals the single-process one up to floating-point summation order;
  full fine-tuning on images uses a ``DistributedSampler``;
- training metrics are summed across ranks; validation runs on every rank (identical);
- only rank 0 writes the run folder, the log and the trackers; the other ranks write into a
  scratch folder of their own that is deleted at the end, and stop after training (rank 0
  then calibrates, evaluates the test split and writes the report alone).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world == 1`` is a plain single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  #: graft started the process group (and ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled: for modest payloads and tensors)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)  # gloo and NCCL both reduce CPU/GPU float64 sums
        return t.tolist()

    def shard(self, items: list[int]) -> list[int]:
        """This rank's share of ``items`` (every world-th item, starting at its rank)."""
        return items[self.rank :: self.world]

    def gather_rows(self, items: list[int], mine: torch.Tensor | None) -> torch.Tensor | None:
        """Rows computed by each rank for ``shard(items)`` -> all rows in ``items`` order."""
        if not self.active:
            return mine
        parts = self.all_gather(mine)
        parts_ok = [p for p in parts if p is not None and len(p)]
        if not parts_ok:
            return None
        out = torch.empty((len(items), *parts_ok[0].shape[1:]), dtype=parts_ok[0].dtype)
        for r, part in enumerate(parts):
            if part is not None and len(part):
                out[r :: self.world] = part
        return out


def setup() -> Dist:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():  # the caller runs its own process group
        return Dist(rank, world, local)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    return Dist(rank, world, local, owned=True)


def backend() -> str:
    return dist.get_backend() if dist.is_initialized() else "none"


def teardown(d: Dist) -> None:
    if d.owned and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["Dist", "backend", "setup", "teardown"]
