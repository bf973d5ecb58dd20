"""A real two-node Slurm cluster on one host, for the tests of cluster/slurm/ (tests/integration/test_slurm.py).

Debian's `slurm-wlm` and `munge` packages provide the daemons (`.ci/run` installs them); this module touches no
system file and starts no system service: munged, slurmctld and two slurmd ("n1", "n2") run from a private folder
with their own key, socket, ports, spool and state directories, and client commands find the cluster through
SLURM_CONF. Both nodes are 127.0.0.1 with distinct slurmd ports (Debian builds slurmd with multiple-slurmd
support). Everything is killed and the folder can be deleted when the context exits.

    with local_cluster(tmp_path) as slurm:
        job = slurm.sbatch(["--nodes=2", "cluster/slurm/train.sbatch", "configs/demo.yaml"], cwd=repo)
        slurm.wait(job)        # -> "COMPLETED"
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ckf_dist.netbind import free_port
from ckf_dist.testing.jobs import wait_for

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def missing_tools() -> list[str]:
    """The daemons and commands this module needs that are not on PATH (also searched: /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [t for t in DAEMONS if shutil.which(t, path=path) is None]


@dataclass
class LocalSlurm:
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
        """A client command against this cluster (SLURM_CONF set; `env` adds to the environment); its stdout."""
        res = subprocess.run(list(args), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                             timeout=60, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
        return res.stdout

    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        return int(self.run("sbatch", "--parsable", *args, cwd=cwd, env=env).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float,
             until: Callable[[dict[str, str]], bool] = lambda info: info.get("JobState") in FINAL_STATES,
             ) -> dict[str, str]:
        """Poll until `until(record)` (default: the job has ended); returns its last `scontrol show job` record."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: "
                                   f"{self.logs_tail()}")
            time.sleep(2)

    def nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return bool(states) and all(s == "idle" for s in states.values())

    def logs_tail(self, n: int = 15) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _conf(root: Path, ctld_port: int, node_ports: dict[str, int]) -> str:
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 RealMemory=4000 "
                      "State=UNKNOWN" for n, p in node_ports.items())
    return f"""\
ClusterName=ckftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes={','.join(node_ports)} Default=YES MaxTime=INFINITE State=UP
"""


@contextlib.contextmanager
def local_cluster(root: Path, nodes: tuple[str, ...] = ("n1", "n2"), timeout: float = 60) -> Iterator[LocalSlurm]:
    """Start munged, slurmctld and one slurmd per node under `root`; yield once every node is idle."""
    root = Path(root).resolve()
    (root / "munge").mkdir(parents=True, mode=0o700)
    (root / "state").mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ports = {n: free_port() for n in nodes}
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, free_port(), ports))
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": path}
    slurm = LocalSlurm(root, env)

    def start(*cmd: str, log: str) -> None:
        with open(root / log, "ab") as out:  # the daemon keeps its own copy of the descriptor
            slurm.procs.append(subprocess.Popen(list(cmd), env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True))

    try:
        # munged refuses to run as root without --force; -F keeps it a child that stop() can signal.
        start("munged", "-F", "--force", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
              f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/seed",
              f"--log-file={root}/munged.log", log="munged.out.log")
        _until(lambda: (root / "munge" / "munge.socket").exists(), 10, "munged's socket", slurm)
        start("slurmctld", "-D", "-i", "-f", str(conf), log="slurmctld.out.log")
        for n in nodes:
            start("slurmd", "-D", "-N", n, "-f", str(conf), log=f"slurmd-{n}.out.log")

        _until(slurm.nodes_idle, timeout, "every node idle", slurm)
        yield slurm
    finally:
        slurm.stop()


def _until(ok, timeout: float, what: str, slurm: LocalSlurm) -> None:
    try:
        wait_for(ok, timeout, what)
    except TimeoutError as e:  # the daemons' logs say why
        raise RuntimeError(f"local Slurm cluster: {e}\n{slurm.logs_tail()}") from None
