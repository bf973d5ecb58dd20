"""A single-node run listens on loopback only: torch's rendezvous store, gloo's sockets and the local Ray instance
(GCS, raylet, agents, workers) of the prepare stage. Listening TCP sockets are read from /proc/net/tcp{,6} and
mapped to the run's processes (the test's descendants) through /proc/<pid>/fd."""

from __future__ import annotations

import ipaddress
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path

import pytest

from ckf_dist.train.deepspeed_utils import free_port

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc/net/tcp")]


def _address(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    # The kernel prints the address as 32-bit words in host byte order (little-endian here).
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """inode -> (address, port) of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            out[int(f[9])] = (str(_address(addr)), int(port, 16))
    return out


def descendants(root: int) -> dict[int, str]:
    """pid -> command name of `root` and every process below it."""
    children: dict[int, list[int]] = {}
    names = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(stat.parent.name)
        names[pid] = text[text.index("(") + 1:text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        found[pid] = names.get(pid, "?")
        todo += children.get(pid, [])
    return found


def sockets_of(pids: dict[int, str]) -> list[tuple[int, str, str, int]]:
    """(pid, name, address, port) of every listening TCP socket the processes hold."""
    listening = listening_sockets()
    out = []
    for pid, name in pids.items():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and (inode := int(target[8:-1])) in listening:
                out.append((pid, name, *listening[inode]))
    return sorted(set(out))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _rank(rank: int, world: int, port: int, with_ray: bool, queue, done) -> None:
    # As under the `deepspeed` launcher on one node (MASTER_ADDR=127.0.0.1); rank 0 also starts the prepare stage's
    # local Ray, as the pipeline does while the group is up.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), LOCAL_SIZE=str(world), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from ckf_dist.config import RunConfig
    from ckf_dist.train.deepspeed_utils import init_distributed

    init_distributed(RunConfig())
    t = torch.ones(4)
    dist.all_reduce(t)  # the gloo pairs are connected
    if with_ray and rank == 0:
        from ckf_dist.data.preprocess import init_local_ray

        init_local_ray(2, 100)
    queue.put((rank, os.getpid(), float(t[0])))
    done.wait(120)  # the parent lists the sockets meanwhile
    if with_ray and rank == 0:
        import ray

        ray.shutdown()
    dist.destroy_process_group()


def _run_and_list(world: int, with_ray: bool) -> tuple[int, list[tuple[int, str, str, int]]]:
    ctx = mp.get_context("spawn")
    queue, done, port = ctx.Queue(), ctx.Event(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, with_ray, queue, done), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=180) for _ in procs]
        assert all(g[2] == world for g in got)
        socks = sockets_of(descendants(os.getpid()))
    finally:
        done.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    return port, socks


def test_single_node_run_listens_on_loopback_only():
    port, socks = _run_and_list(world=2, with_ray=True)
    exposed = [s for s in socks if not is_loopback(s[2])]
    assert not exposed, f"listening on a non-loopback address: {exposed}\nall: {socks}"
    # Not vacuous: the store, both ranks' gloo listeners and Ray's servers were among the sockets looked at.
    assert ("127.0.0.1", port) in {(s[2], s[3]) for s in socks}, socks
    names = {s[1] for s in socks}
    assert {"gcs_server", "raylet"} <= names, names
    assert len({s[0] for s in socks if s[1].startswith("python")}) >= 2, socks


def _outbound_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route's source address
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if ipaddress.ip_address(addr).is_loopback else addr


def _explicit_rank(addr: str, port: int, queue, done) -> None:
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from ckf_dist.config import RunConfig
    from ckf_dist.train.deepspeed_utils import init_distributed

    init_distributed(RunConfig())
    queue.put(os.environ.get("GLOO_SOCKET_IFNAME"))
    done.wait(60)


@pytest.mark.skipif(_outbound_address() is None, reason="no non-loopback address on this machine")
def test_a_routable_master_addr_is_left_as_the_launcher_set_it():
    # Multi-node binding is explicit: MASTER_ADDR naming a reachable address keeps torch's own rendezvous (store on
    # every interface, so that other nodes can join) and sets no interface for gloo.
    ctx = mp.get_context("spawn")
    queue, done, port = ctx.Queue(), ctx.Event(), free_port()
    p = ctx.Process(target=_explicit_rank, args=(_outbound_address(), port, queue, done), daemon=True)
    p.start()
    try:
        ifname = queue.get(timeout=120)
        socks = sockets_of(descendants(p.pid))
    finally:
        done.set()
        p.join(30)
    assert ifname == os.environ.get("GLOO_SOCKET_IFNAME")
    store = [s for s in socks if s[3] == port]
    assert store and not is_loopback(store[0][2]), socks


@pytest.mark.slow
def test_a_second_job_on_a_locked_run_dir_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    from ckf_dist.testing.jobs import TINY, kill_group, run_job, start_job, wait_for

    run, pid_file = tmp_path / "run", tmp_path / "run" / "pids" / "rank-0.pid"
    common = [f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "train.ckpt_every=1000", *TINY]
    holder = start_job(["train.max_steps=200", *common], nproc=1, log=tmp_path / "holder.log")
    try:
        wait_for(pid_file.is_file, 120, "the holder's rank 0 to start", holder)
        holder_pid = int(pid_file.read_text())
        config = (run / "config.yaml").read_text()
        # Two ranks: rank 1 learns of rank 0's refusal (broadcast) instead of waiting on it.
        second = run_job(["train.max_steps=3", *common], nproc=2, timeout=180)
        out = second.stdout + second.stderr
        assert second.returncode != 0, out[-3000:]
        assert f"log.run_dir={run} is in use by another job (pid {holder_pid} on host {socket.gethostname()}, " \
               f"started 20" in out, out[-3000:]
        assert "rank 0 failed: RunDirLocked" in out, out[-3000:]  # rank 1's error
        assert (run / "config.yaml").read_text() == config  # the refused job wrote nothing
        assert holder.poll() is None
    finally:
        kill_group(holder)  # SIGKILL: no clean-up ran; the kernel dropped the flock
    third = start_job(["train.max_steps=3", *common], nproc=1, log=tmp_path / "third.log")
    try:
        wait_for(lambda: pid_file.is_file() and int(pid_file.read_text()) != holder_pid, 120,
                 "the next job to take the run dir", third)
        assert f'"pid": {int(pid_file.read_text())}' in (run / ".run.lock").read_text()
    finally:
        kill_group(third)


def _ray_train_loop(config: dict) -> None:
    import time

    import torch
    import torch.distributed as dist

    t = torch.ones(2)
    dist.all_reduce(t)
    assert float(t[0]) == dist.get_world_size()
    time.sleep(config["hold_s"])  # the driver lists the sockets meanwhile


@pytest.mark.slow
def test_ray_train_on_a_local_ray_listens_on_loopback_only(tmp_path):
    # launchers/ray_job.py without --address: a local Ray, and the workers' process group from
    # ray_train_torch_config (Ray Train's default puts torch's store on every interface).
    import threading

    ray = pytest.importorskip("ray")
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from ckf_dist.data.preprocess import init_local_ray
    from ckf_dist.netbind import ray_train_torch_config

    seen: set[tuple[int, str, str, int]] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(sockets_of(descendants(os.getpid())))
            time.sleep(0.5)

    started = init_local_ray(4, 100)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        trainer = TorchTrainer(_ray_train_loop, train_loop_config={"hold_s": 5},
                               scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                               torch_config=ray_train_torch_config("gloo", 60, single_node=True),
                               run_config=RayRunConfig(name="exposure", storage_path=str(tmp_path / "ray")))
        result = trainer.fit()
        assert result.error is None, result.error
    finally:
        stop.set()
        sampler.join(10)
        if started:
            ray.shutdown()
    exposed = sorted(s for s in seen if not is_loopback(s[2]))
    assert not exposed, f"listening on a non-loopback address: {exposed}"
    assert any(s[1].startswith("ray::RayTrainWo") for s in seen), sorted({s[1] for s in seen})
