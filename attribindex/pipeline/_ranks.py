"""This process's place in a `torchrun` launch, and the few collectives that builds and captures need (gloo: CPU
works). Without torchrun (no WORLD_SIZE) it is rank 0 of 1 and every collective is the identity."""

from __future__ import annotations

import datetime as dt
import os

import torch

# Ranks that finish their shards early wait for the slowest one; at pretraining scale that can be hours.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=72)


class Ranks:
    """This process's place in a torchrun launch (joining its process group, or starting a gloo one), and the
    collectives that let every rank leave the same way."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._owns_group = False
        if self.size > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
                self._owns_group = True
            if torch.cuda.is_available():
                torch.cuda.set_device(self.local_rank % torch.cuda.device_count())

    def broadcast_from_first(self, value):
        if self.size == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def gather_to_first(self, value) -> list | None:
        """Every rank's `value`, in rank order, on rank 0 (None elsewhere): for values too large to copy to all."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values = [None] * self.size if self.rank == 0 else None
        dist.gather_object(value, values, dst=0)
        return values

    def close(self) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
