"""`python -m flover_backend.execution.worker_main`: one tensor-parallel worker rank, started by rank 0's WorkerGroup."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch
import torch.distributed as dist

from flover_backend.config import EngineConfig
from flover_backend.execution.model_runner import ModelRunner
from flover_backend.execution.models.loader import resolve_model_path
from flover_backend.execution.workers import join_ranks, rank_device


def _exit_with_parent() -> None:
    """End this worker when rank 0's process goes, however it goes: a rank alone only holds memory."""
    parent = os.getppid()

    def watch() -> None:
        """Exit this worker as soon as rank 0's process is gone."""
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_main(argv: list[str] | None = None) -> int:
    """A worker rank: join the group, load its shard, then run every plan rank 0 broadcasts until told to stop."""
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
    plans = join_ranks(config, args.init_method, args.rank)
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
