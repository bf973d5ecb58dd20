"""cluster/slurm/train.sbatch on a real two-node Slurm cluster on this host (ckf_dist/testing/slurm.py).

Needs Debian's slurm-wlm and munge (installed by .ci/run) and root (slurmd starts the jobs' processes as the
submitting user, and the private munged runs as root). The daemons run from a temporary folder: no system file
or service is touched.
"""

import os
import re
import sys
import time
from pathlib import Path

import pytest

from ckf_dist.testing.jobs import ROOT, TINY, last_train_loss, wait_for
from ckf_dist.testing.slurm import FINAL_STATES, local_cluster, missing_tools

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 300  # about a minute of training: room for the time-limit signal (<= 30 s after the limit changes) to land


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if missing := missing_tools():
        pytest.skip(f"Slurm is not installed (missing {missing}; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("the private munged and slurmd of the local cluster need root")
    with local_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def _job_env() -> dict[str, str]:
    return {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT), "CKF_VENV": sys.prefix}


def _overrides(root: Path, run: Path) -> list[str]:
    return [f"log.run_dir={run}", f"data.prepared_dir={root / 'data'}", f"train.max_steps={STEPS}",
            "train.ckpt_every=50", *TINY]


@pytest.fixture(scope="module")
def two_node_run(slurm, tmp_path_factory):
    """The demo on 2 nodes x 1 rank, uninterrupted; its log.run_dir has a space in it (quoting must survive)."""
    root = tmp_path_factory.mktemp("two node")
    run = root / "run dir"
    out = root / "job.out"
    job = slurm.sbatch(["--nodes=2", f"--output={out}", "--time=10", "cluster/slurm/train.sbatch",
                        "configs/demo.yaml", *_overrides(root, run)], cwd=ROOT, env=_job_env())
    info = slurm.wait(job, timeout=600)
    return root, run, out, info


def test_two_node_job_completes_with_its_outputs(two_node_run):
    _, run, out, info = two_node_run
    log = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert "2 rank(s) on n[1-2]" in log and "2 rank(s) | tasks" in log, log[-4000:]
    assert (run / "metrics.json").is_file() and (run / "report.md").is_file()
    assert (run / "checkpoints" / f"step-{STEPS:06d}" / "COMPLETE").is_file()
    assert sorted(p.name for p in (run / "adapters").iterdir() if p.is_dir()) == ["ctr", "exp", "rating", "topk"]
    assert sorted(p.name for p in (run / "pids").iterdir()) == ["rank-0.pid", "rank-1.pid"]


def test_time_limit_checkpoints_requeues_and_resumes_to_the_same_loss(slurm, two_node_run, tmp_path):
    """The script's own --signal=USR1@300 at a time limit: once training runs, the job's limit is lowered so that
    less than 300 s are left; slurmctld (it checks limits every 30 s) sends SIGUSR1 to both ranks mid-training,
    they checkpoint and exit 75, and the script requeues the job. The requeued job gets its 30 minutes back (and
    is released at once: Slurm holds a requeued job about 2 minutes); it resumes from that checkpoint and finishes
    with the uninterrupted run's final loss."""
    root, ref, _, _ = two_node_run
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    shared = [f"cf.embeddings_path={ref / 'cf' / 'embeddings.safetensors'}", f"model.base_model={ref / 'base_model'}"]
    job = slurm.sbatch(["--nodes=2", f"--output={out}", "--time=30", "cluster/slurm/train.sbatch",
                        "configs/demo.yaml", *_overrides(root, run), *shared], cwd=ROOT, env=_job_env())

    def training_started() -> bool:
        return (run / "metrics.jsonl").is_file() and '"step": 3,' in (run / "metrics.jsonl").read_text()

    wait_for(training_started, 300, "training to start")
    elapsed_min = _minutes(slurm.job(job)["RunTime"])
    slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={elapsed_min + 4}")  # 3-4 minutes left
    # Requeued: pending again with one restart (or ended, which fails below).
    info = slurm.wait(job, timeout=300, until=lambda i: (i.get("JobState"), i.get("Restarts")) == ("PENDING", "1")
                      or i.get("JobState") in FINAL_STATES)
    log = out.read_text(errors="replace")
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", log[-4000:]
    # Released early, but only once the nodes have finished the first start and a second has passed: slurmd
    # refuses a launch whose credential is from the same second as the requeue's revocation ("Job credential
    # revoked"), which is what Slurm's own hold guards against.
    wait_for(slurm.nodes_idle, 120, "the nodes to be idle after the requeue")
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=30", "StartTime=now")
    info = slurm.wait(job, timeout=600)
    log = out.read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", log[-4000:]
    stopped = re.search(r"checkpoint at step (\d+) written", log)
    assert stopped and 3 <= int(stopped.group(1)) < STEPS, f"the signal did not land mid-training:\n{log[-4000:]}"
    assert "requeueing job" in log and f"at step {stopped.group(1)}" in log and "(restart 1)" in log, log[-4000:]
    # Same seed, data order and RNG state: fp32 on CPU, reproducible up to reduction order.
    assert abs(last_train_loss(run) - last_train_loss(ref)) < 1e-5


def _minutes(runtime: str) -> int:
    """Whole minutes (rounded up) of a Slurm RunTime such as 0:45, 01:02:03 or 1-00:00:00."""
    days, _, hms = runtime.rpartition("-")
    parts = [int(x) for x in hms.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    seconds = int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    return -(-seconds // 60)
