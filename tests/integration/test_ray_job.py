"""The main job through Ray job submission, as a user runs it on a cluster: a Ray head on 127.0.0.1 (its own ports,
temp dir and auth token, stopped at the end), `ray job submit --working-dir . -- python launchers/ray_job.py` of
the demo with 2 workers, the run directory under a storage root. Then the same job with one Ray Train worker killed
mid-run: Ray Train restarts the workers, the pipeline resumes from the newest complete checkpoint, and the final
loss equals the uninterrupted run's. Last, the `deepspeed` launcher on a node of that cluster (RAY_ADDRESS set):
its ranks stream through the same Ray Data reads and train to the Ray Train run's loss.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ckf_dist.netbind import free_port
from ckf_dist.testing.jobs import ROOT, TINY, env, last_train_loss, launcher_cmd, wait_for

BIN = Path(sys.executable).parent
JOB = [*TINY, "train.max_steps=8", "train.ckpt_every=2", "eval.baselines=[]", "train.collective_timeout_s=60"]
EXCLUDES = '{"excludes": [".venv", "runs", ".git", "*.egg-info", ".whl", "__pycache__"]}'


class RayHead:
    def __init__(self, tmp: Path) -> None:
        self.dashboard = free_port()
        self.env = dict(env(), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", RAY_AUTH_MODE="token",
                        RAY_AUTH_TOKEN=uuid.uuid4().hex, RAY_ADDRESS=f"http://127.0.0.1:{self.dashboard}")
        self.env.pop("CKF_STORAGE", None)
        # ray start reads RAY_ADDRESS as the cluster to join: not for the head itself.
        start_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        self.temp = Path("/tmp") / f"ray-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a length limit
        self.gcs = free_port()
        cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}", "--include-dashboard=true",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               "--num-cpus=8", f"--object-store-memory={400 * 2**20}", f"--temp-dir={self.temp}", "--disable-usage-stats"]
        res = subprocess.run(cmd, env=start_env, capture_output=True, text=True, timeout=180, check=False)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    def ray(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        res = subprocess.run([str(BIN / "ray"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                             timeout=timeout, check=False)
        if check:
            assert res.returncode == 0, f"ray {' '.join(args[:3])}: " + res.stdout[-4000:] + res.stderr[-4000:]
        return res

    def submit(self, storage: Path, run: str, wait: bool = True) -> subprocess.CompletedProcess:
        return self.ray("job", "submit", f"--submission-id={run}-{uuid.uuid4().hex[:6]}", "--working-dir", ".",
                        "--runtime-env-json", EXCLUDES, *([] if wait else ["--no-wait"]), "--",
                        "python", "launchers/ray_job.py", "--num-workers", "2", "--storage", str(storage),
                        "--config", "configs/demo.yaml", f"log.run_dir={run}", f"data.prepared_dir={run}-data",
                        *JOB, timeout=900)

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120,
                       check=False)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    h = RayHead(tmp_path_factory.mktemp("ray"))
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.mark.slow
@pytest.mark.distributed
def test_ray_job_submit_runs_the_demo_into_the_storage_root(head, storage):
    res = head.submit(storage, "plain")
    run = storage / "plain"
    out = res.stdout + res.stderr
    assert "succeeded" in out.lower(), out[-3000:]
    for f in ("metrics.json", "report.md", "metrics.jsonl", "config.yaml"):
        assert (run / f).is_file(), f"{f} missing from {run}:\n{out[-2000:]}"
    for task in ("ctr", "topk", "rating", "exp"):
        assert (run / "adapters" / task / "adapter_config.json").is_file()
    assert (storage / "plain-data" / "manifest.json").is_file(), "data.prepared_dir resolved under the storage root"
    assert list((storage / "ray").glob("*/checkpoint_*")), "checkpoints were reported to Ray Train"
    assert out.count("Running Dataset") < 20, "Ray Data progress bars must stay out of a job log"
    assert "[ckf] data stream: ray" in out, "data.stream=auto streams through Ray Data under Ray Train"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_ray_train_worker_restarts_from_the_newest_checkpoint_to_the_same_loss(head, storage):
    if not (storage / "plain" / "metrics.jsonl").is_file():
        pytest.skip("needs the uninterrupted run of the test above")
    run = storage / "killed"
    head.submit(storage, "killed", wait=False)
    pid_file = run / "pids" / "rank-1.pid"
    wait_for(lambda: (run / "checkpoints" / "step-000002" / "COMPLETE").is_file() and pid_file.is_file(), 600,
             "the first checkpoint")
    victim = int(pid_file.read_text())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 900
    status = ""
    while time.monotonic() < deadline:
        status = head.ray("job", "list", check=False).stdout
        entry = [line for line in status.split("JobDetails(") if "killed" in line and "submission_id" in line]
        if entry and any(s in entry[-1] for s in ("status=<JobStatus.SUCCEEDED", "status=<JobStatus.FAILED",
                                                  "status=<JobStatus.STOPPED")):
            break
        time.sleep(3)
    assert entry and "JobStatus.SUCCEEDED" in entry[-1], entry[-1][-2000:] if entry else status[-2000:]
    assert int(pid_file.read_text()) != victim, "rank 1 was restarted (a new process)"
    # Within float noise, as the deepspeed launcher's resume tests (tests/integration/test_resume_failure.py).
    assert abs(last_train_loss(run) - last_train_loss(storage / "plain")) < 1e-5, "resumed to the uninterrupted result"


@pytest.mark.slow
@pytest.mark.distributed
def test_the_deepspeed_launcher_streams_through_ray_to_the_ray_train_result(head, storage):
    if not (storage / "plain" / "metrics.jsonl").is_file():
        pytest.skip("needs the Ray Train run of the first test")
    run = storage / "deepspeed"
    # The same job as the Ray Train one (same data, CF and seeds; 2 ranks), from the deepspeed launcher. RAY_ADDRESS
    # names the cluster's GCS, as on a node where `ray start` ran: data.stream=auto then reads through Ray Data.
    e = dict(head.env, RAY_ADDRESS=f"127.0.0.1:{head.gcs}")
    res = subprocess.run(launcher_cmd(2, ["--config", "configs/demo.yaml", f"log.run_dir={run}",
                                          f"data.prepared_dir={storage / 'plain-data'}", *JOB]),
                         cwd=ROOT, env=e, capture_output=True, text=True, timeout=900, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "[ckf] data stream: ray" in out
    assert out.count("Running Dataset") < 20, "Ray Data progress bars must stay out of a job log"
    # Both launchers read the same samples (the split is a function of rank and world, not of who schedules).
    assert abs(last_train_loss(run) - last_train_loss(storage / "plain")) < 1e-5
