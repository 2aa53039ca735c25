"""Data-parallel plumbing (torchrun): device choice per rank, process group set-up and the few
collectives the trainer uses (sum all_reduce, broadcast from rank 0, barrier). gloo on CPU,
nccl on GPU; everything is a no-op in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .config import TrainConfig

class _Dist:
    def __init__(self, cfg: TrainConfig):
        self.owner = False
        world_env = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        initialised = dist.is_available() and dist.is_initialized()
        want_cuda = cfg.device == "auto" and torch.cuda.is_available() or cfg.device.startswith("cuda")
        if cfg.device == "auto":
            self.device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
        else:
            self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and (initialised or world_env > 1) and self.device.index is None:
            self.device = torch.device(f"cuda:{local_rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not initialised and world_env > 1:
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is unavailable in this torch build")
            backend = cfg.dist_backend or ("nccl" if self.device.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend)
            self.owner = True
        self.on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.world = dist.get_world_size() if self.on else 1
        self.rank = dist.get_rank() if self.on else 0
        self.main = self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_(self, t: torch.Tensor) -> None:
        if self.on:
            dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.on:
            dist.barrier()

    def close(self) -> None:
        if self.owner and dist.is_initialized():
            dist.destroy_process_group()

