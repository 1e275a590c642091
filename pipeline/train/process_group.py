"""The training job's torch process group, its rendezvous store bound to the node's address.

Ray Train's ``TorchConfig`` has rank 0 call ``dist.init_process_group("env://")`` with
``MASTER_ADDR`` the node's address (127.0.0.1 for the private local Ray of
``driver.start_ray``), but torch's ``TCPStore`` server binds every interface (``[::]`` or
``0.0.0.0``) whatever that address is: the store of a run on loopback was reachable from the
network. ``NodeBoundTorchConfig`` sets the group up the same way except for the store: rank 0
binds a listening socket to the node's address and hands it to ``TCPStore`` (its
``master_listen_fd``, Linux), and every rank passes that store to ``init_process_group``.

Ray API used: ``TorchConfig`` (public, subclassed: same backend choice, timeout, CUDA device
context), and, as Ray's own ``on_start`` does, the private ``_TorchBackend`` (subclassed for its
shutdown), ``_set_torch_distributed_env_vars`` (``RANK``, ``LOCAL_RANK``... on Ray Train v2
workers) and ``WorkerGroup`` of Ray Train v1 (which sets those variables later itself), all of
the pinned Ray 2.60.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_LISTENING: dict[int, int] = {}  # port -> fd of the store socket bound here (rank 0's process)


def bind_store_socket() -> tuple[str, int]:
    """On rank 0's worker: a listening TCP socket on this node's Ray address, free port;
    returns ``(address, port)`` and keeps the descriptor for ``join_group``."""
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(socket.SOMAXCONN)
    port = sock.getsockname()[1]
    _LISTENING[port] = sock.detach()  # the store's server owns (and closes) it from now on
    return address, port


def join_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
               timeout_s: int) -> None:
    """On each worker: the rendezvous store (rank 0 serves it on the socket of
    ``bind_store_socket``, the others connect to it) and the default process group on it."""
    rank, timeout = world_rank, timedelta(seconds=timeout_s)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    if backend == "nccl" and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # as Ray does
    listen_fd = _LISTENING.pop(port) if rank == 0 else None
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False, master_listen_fd=listen_fd)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


def backend_name(worker_group: Any, config: TorchConfig) -> str:
    """``config.backend``, or as Ray chooses it: nccl with GPUs, else gloo."""
    if config.backend is not None:
        return config.backend
    return "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"


class _NodeBoundBackend(_TorchBackend):
    """Ray's torch backend with ``on_start`` replaced: the store on the node's address."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup

        backend = backend_name(worker_group, backend_config)
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"NodeBoundTorchConfig supports gloo and nccl, not {backend!r}")
        address, port = worker_group.execute_single(0, bind_store_socket)
        if not isinstance(worker_group, V1WorkerGroup):  # v1 sets them in on_training_start
            worker_group.execute(_set_torch_distributed_env_vars)
        n = len(worker_group)
        ray.get([worker_group.execute_single_async(
            i, join_group, backend=backend, world_rank=i, world_size=n, address=address, port=port,
            timeout_s=backend_config.timeout_s) for i in range(n)])


@dataclass
class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on the node's address only."""

    @property
    def backend_cls(self):
        return _NodeBoundBackend
