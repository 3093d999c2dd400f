"""Tensor parallelism: a Llama split by heads and MLP columns over ranks, and the worker ranks' loop.

Rank 0 lives in the engine (in the Triton model): it schedules, and broadcasts each iteration's plan to
worker processes it starts; every rank then runs the same forward on its shard of the weights and of
the KV arena, with one all-reduce after attention and one after the MLP. torch.distributed does the
communication: gloo on CPU (tested here), NCCL on GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from flover_backend.config import EngineConfig
from flover_backend.errors import EngineDeadError

COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a silent peer fails the step instead of hanging it


class RowParallelLinear(nn.Linear):
    """This rank's block of a projection's input features; the ranks' partial products are summed.

    The bias is whole on every rank (so checkpoints load the same way everywhere) and added by rank 0 only.
    """

    def __init__(self, linear: nn.Linear, rank: int, world: int):
        super().__init__(linear.in_features // world, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The full projection, on every rank."""
        y = F.linear(x, self.weight, self.bias if self.rank == 0 else None)
        dist.all_reduce(y)
        return y


def _column_part(linear: nn.Linear, world: int) -> nn.Linear:
    """Column parallel: room for this rank's block of output features (whole heads: heads are contiguous)."""
    return nn.Linear(linear.in_features, linear.out_features // world, bias=linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)


def shard_llama(model: nn.Module, rank: int, world: int) -> None:
    """Shrink a Llama built on the meta device to this rank's heads and MLP columns, before it is loaded.

    The loader then reads only this rank's slice of each split weight, so no rank ever holds the whole
    model; embeddings, norms and the LM head stay whole.
    """
    config = model.config
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % world:
            raise ValueError(f"tensor_parallel_size {world} does not divide {name}={getattr(config, name)}")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (_column_part(p, world) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, world)
        attn.num_heads //= world
        attn.num_kv_heads //= world
        mlp.gate_proj, mlp.up_proj = (_column_part(p, world) for p in (mlp.gate_proj, mlp.up_proj))
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, world)
    model.config = dataclasses.replace(config, num_heads=config.num_heads // world,
                                       num_kv_heads=config.num_kv_heads // world,
                                       intermediate_size=config.intermediate_size // world)


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


def _join(config: EngineConfig, init_method: str, rank: int) -> dist.ProcessGroup:
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
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        settings = json.dumps(dataclasses.asdict(config))
        self.workers = [
            subprocess.Popen([sys.executable, "-m", "flover_backend.tensor_parallel", "--rank", str(rank),
                              "--init-method", init_method, "--config", settings], env=dict(os.environ))
            for rank in range(1, world)
        ]
        self.plans = _join(config, init_method, rank=0)

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


def _free_port() -> int:
    """A loopback port nothing listens on now, for the ranks' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _backend(config: EngineConfig) -> str:
    return "nccl" if config.device.startswith("cuda") else "gloo"


def _exit_with_parent() -> None:
    """End this worker when rank 0's process goes, however it goes: a rank alone only holds memory."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(argv: list[str] | None = None) -> int:
    """A worker rank: join the group, load its shard, then run every plan rank 0 broadcasts until told to stop."""
    from flover_backend.model_runner import ModelRunner  # here: the runner imports this module
    from flover_backend.models.loader import resolve_model_path

    parser = argparse.ArgumentParser(description=worker_main.__doc__)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--init-method", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    _exit_with_parent()
    config = EngineConfig(**json.loads(args.config))
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = rank_device(config.device, args.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before joining: NCCL binds each rank to the current GPU
    plans = _join(config, args.init_method, args.rank)
    runner = ModelRunner(config, resolve_model_path(config.model), rank=args.rank)
    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0, group=plans)
        if message[0] is None:
            break
        runner.run(message[0])
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
