"""Tensor-parallel ranks as processes: rank 0's WorkerGroup that starts ranks 1..N-1 and sends each plan.

Rank 0 lives in the engine (in the Triton model): it schedules, and broadcasts each iteration's plan to the
worker processes (`flover_backend.execution.worker_main`); every rank then runs the same forward on its share of the
weights and of the KV arena. torch.distributed does the communication: gloo on CPU (tested here), NCCL on GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from flover_backend.config import EngineConfig
from flover_backend.errors import EngineDeadError
from flover_backend.ports import find_free_port

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a silent peer fails the step instead of hanging it


def rank_device(device: str, rank: int) -> torch.device:
    """Where `rank` runs: consecutive GPUs from the configured one (always with an index); the CPU is shared."""
    base = torch.device(device)
    return torch.device("cuda", (base.index or 0) + rank) if base.type == "cuda" else base


def check_gpus(device: torch.device, world: int) -> None:
    """Fail before loading anything, naming the settings, when the GPUs the ranks would take are not there."""
    if device.type != "cuda":
        return
    available = torch.cuda.device_count()
    if device.index + world > available:
        raise ValueError(f"device {device} with tensor_parallel_size {world} needs GPUs {device.index}.."
                         f"{device.index + world - 1}; this machine has {available}")


def join_ranks(config: EngineConfig, init_method: str, rank: int) -> dist.ProcessGroup:
    """Join the ranks (NCCL for the all-reduces on GPU) and return the gloo group that carries the plans.

    Plans are Python objects: over NCCL each broadcast would go through the GPU and synchronise it, so
    they travel through a gloo group on the host instead, on GPU and CPU alike.
    """
    dist.init_process_group(_backend(config), init_method=init_method, rank=rank,
                            world_size=config.tensor_parallel_size, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)


class WorkerGroup:
    """Rank 0's side: starts ranks 1..N-1 as processes, sends them each plan, notices when one dies."""

    def __init__(self, config: EngineConfig):
        world = config.tensor_parallel_size
        init_method = f"tcp://127.0.0.1:{find_free_port()}"
        settings = json.dumps(dataclasses.asdict(config))
        self.workers = [
            subprocess.Popen([sys.executable, "-m", "flover_backend.execution.worker_main", "--rank", str(rank),
                              "--init-method", init_method, "--config", settings], env=dict(os.environ))
            for rank in range(1, world)
        ]
        self.plans = join_ranks(config, init_method, rank=0)

    def broadcast(self, plan: object) -> None:
        """Send one iteration's plan to every worker."""
        self.check()
        dist.broadcast_object_list([plan], src=0, group=self.plans)

    def check(self, grace_s: float = 0.0) -> None:
        """Raise EngineDeadError if a worker has exited (within `grace_s`): the shards it held are gone."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, worker in enumerate(self.workers, start=1):
                if worker.poll() is not None:
                    raise EngineDeadError(f"tensor-parallel worker rank {rank} exited with code {worker.returncode}")
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def close(self) -> None:
        """Tell the workers to exit and wait for them."""
        try:
            if all(worker.poll() is None for worker in self.workers):
                dist.broadcast_object_list([None], src=0, group=self.plans)
        except RuntimeError:  # a worker died meanwhile: nothing left to tell it
            pass
        finally:
            for worker in self.workers:
                try:
                    worker.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            dist.destroy_process_group()


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.device.startswith("cuda") else "gloo"
