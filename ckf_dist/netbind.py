"""Network binding of process groups, shared by every stage that starts one (train/ for DeepSpeed, cf/ for the CF
Ray runner, launchers for Ray Train): a single-node job listens on 127.0.0.1 only; several nodes bind as the
operator set them up (MASTER_ADDR, GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME). A foundation module: it imports
nothing of the package, and neither DeepSpeed nor Ray at import time.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) resolves to a loopback address (127.0.0.0/8, ::1)."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0]).is_loopback
    except (OSError, ValueError, IndexError):
        return False


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), or None when there is none to name."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return "lo" if "lo" in names else next((n for n in names if n.startswith("lo")), None)


def bind_single_node(backend: str, timeout: datetime.timedelta) -> None:
    """Create the process group of a one-node job with every listening socket on 127.0.0.1.

    - torch's rendezvous store (TCPStore, rank 0): its server listens on all interfaces (the wildcard address)
      whatever MASTER_ADDR says; torch has no bind-address option, so rank 0 binds the socket to
      127.0.0.1:MASTER_PORT itself and hands it over (`master_listen_fd`); the others connect to 127.0.0.1.
    - gloo: each rank's listening socket is on the address of the interface gloo uses: GLOO_SOCKET_IFNAME's, else
      the address the hostname resolves to (on most cluster nodes the network address); set to the loopback
      interface here. NCCL's bootstrap socket likewise (NCCL_SOCKET_IFNAME; data moves over NVLink/PCIe/shm).
    An interface variable the operator set is kept. Under torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE)
    the store is torchrun's own (`torchrun --standalone` / `--rdzv-endpoint=localhost:PORT`); only gloo/NCCL
    are bound here.
    """
    import socket

    import torch.distributed as dist

    if (lo := loopback_interface()) is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    rank, world, port = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"])
    if rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError as e:
            sock.close()
            raise OSError(f"rank 0 cannot listen on {LOOPBACK}:{port} (MASTER_PORT) for the rendezvous: {e}") from e
        sock.listen(128)
        # The store owns the descriptor from here (detach: Python's socket object would close it when collected).
        store = dist.TCPStore(LOOPBACK, port, world, True, timeout=timeout, master_listen_fd=sock.detach())
    else:
        store = dist.TCPStore(LOOPBACK, port, world, False, timeout=timeout)
    # NCCL: bind the group to this rank's current CUDA device (set by the caller), so barriers never guess one.
    device_id = None
    if backend == "nccl":
        import torch

        device_id = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, device_id=device_id)


def ray_train_torch_config(backend: str, timeout_s: int, single_node: bool) -> Any:
    """Ray Train's TorchConfig; for a single-node (local) Ray, one whose process group binds to 127.0.0.1.

    Ray Train's own set-up (`ray.train.torch.config._TorchBackend.on_start`) creates the group with
    init_method env:// on the first worker's node IP, and torch's store then listens on every interface. The
    single-node variant instead has worker 0 pick a free port on 127.0.0.1 and every worker join through
    `bind_single_node` (store on 127.0.0.1, gloo/NCCL on the loopback interface). On a cluster (single_node=False)
    Ray Train's default is used unchanged: the workers of other nodes must reach the store.
    """
    from dataclasses import dataclass

    import ray
    from ray.train.torch import TorchConfig

    if not single_node:
        return TorchConfig(backend=backend, timeout_s=timeout_s)
    from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
    from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

    class _LoopbackTorchBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config) -> None:
            port = worker_group.execute_single(0, free_port)
            if not isinstance(worker_group, V1WorkerGroup):  # as Ray Train does: LOCAL_RANK, NODE_RANK...
                worker_group.execute(_set_torch_distributed_env_vars)
            n = len(worker_group)
            ray.get([worker_group.execute_single_async(i, _join_loopback_group, world_rank=i, world=n, port=port,
                                                       backend=backend_config.backend,
                                                       timeout_s=backend_config.timeout_s) for i in range(n)])

    @dataclass
    class _LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return _LoopbackTorchBackend

    return _LoopbackTorchConfig(backend=backend, timeout_s=timeout_s)


def _join_loopback_group(world_rank: int, world: int, port: int, backend: str, timeout_s: int) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port), RANK=str(world_rank), WORLD_SIZE=str(world))
    bind_single_node(backend, datetime.timedelta(seconds=timeout_s))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the one helper for launchers and tests; other jobs may hold 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_ray(num_cpus: int, object_store_mb: int, address: str | None = None, worker_logs: bool = True) -> bool:
    """Join the Ray cluster named by `address` or RAY_ADDRESS (which `ray job submit` sets for the driver), or start
    a small local Ray on 127.0.0.1; True if this call started Ray (the caller shuts it down).

    An existing cluster is joined with no resource arguments: `ray.init(num_cpus=...)` is refused there ("When
    connecting to an existing cluster, num_cpus and num_gpus must not be provided"); its size is the cluster's.
    `worker_logs`: forward the Ray workers' output to this process (Ray Train workers print the training log).
    Ray Data's progress bars are turned off unless stdout is a terminal (in a job log one bar was re-printed 202 times
    for a 20-step job).
    """
    import sys

    import ray

    if ray.is_initialized():
        return False
    # Ray's workers must import ckf_dist even when it runs from a checkout rather than installed; a local Ray's
    # workers inherit this environment (a cluster ships it through the job's runtime_env / working_dir).
    root = str(Path(__file__).resolve().parents[1])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *[p for p in paths if p]])
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=worker_logs, configure_logging=False)
    else:
        # Loopback only: Ray binds GCS, raylet, agents and workers to the node IP, which is 127.0.0.1 only in its
        # single-machine mode (read at `import ray`, hence the constant too); the workers' gloo sockets likewise.
        from ray._private import ray_constants

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        if (lo := loopback_interface()) is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_mb * 2**20, include_dashboard=False,
                 log_to_driver=worker_logs, configure_logging=False)
    quiet_ray_data(sys.stdout.isatty())
    return True


def quiet_ray_data(interactive: bool) -> None:
    """Ray Data progress bars only on a terminal (drivers and Ray Train workers alike); off a terminal also no
    per-dataset INFO lines (a data.stream=ray rank starts one Ray Data read per task and epoch)."""
    import logging

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = interactive
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = interactive
    if not interactive:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
