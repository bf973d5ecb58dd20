"""Every collective of ckf-dist's own code goes through ckf_dist/comm.py, which puts its tensors on the device the
active backend needs (NCCL: the GPU; a CPU statistics tensor handed straight to NCCL broke every GPU launch at
step 0). CPU machines cannot show the NCCL failure, so the check is structural: with CKF_CHECK_COLLECTIVES=1 (set for
every job the tests launch, ckf_dist/testing/jobs.py: the main job, resume, kill and checkpoint tests run the whole
training path on 2 ranks that way) a direct torch.distributed call from ckf_dist code raises, and the policy refuses
tensors that are not on its device. These tests check the check itself.
"""

import subprocess
import sys

import pytest
import torch

from ckf_dist import comm
from ckf_dist.testing.jobs import ROOT, env

_PROBE = r"""
import os, torch, torch.distributed as dist
from ckf_dist import comm
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
assert float(comm.all_reduce(torch.ones(2))[0]) == 1.0 and comm.broadcast_object("x") == "x"
comm.barrier()
import ckf_dist.train.loop as loop
try:  # the mutation: statistics all-reduced straight through torch.distributed, as code of ckf_dist.train.loop
    exec(compile("import torch.distributed\ntorch.distributed.all_reduce(torch.zeros(2))", loop.__file__, "exec"),
         dict(loop.__dict__))
except RuntimeError as e:
    print("REFUSED:", e)
dist.all_reduce(torch.zeros(1))  # code outside ckf_dist (here: this script, or DeepSpeed) is not checked
print("DONE")
"""


@pytest.mark.distributed
def test_direct_collective_from_ckf_dist_code_is_refused_in_checked_jobs():
    from ckf_dist.netbind import free_port

    res = subprocess.run([sys.executable, "-c", _PROBE.replace("{port}", str(free_port()))], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("REFUSED: ckf_dist.train.loop called torch.distributed.all_reduce directly; use ckf_dist.comm"
            in res.stdout), res.stdout + res.stderr
    assert res.stdout.rstrip().endswith("DONE")


class _Accelerator(comm.Policy):
    """A stand-in for an NCCL node: collective tensors belong on `meta`, and collectives are not run."""

    def device(self) -> torch.device:
        return torch.device("meta")


def test_policy_decides_the_device_and_refuses_tensors_elsewhere(monkeypatch):
    monkeypatch.setattr(comm, "_checks_installed", True)
    seen = []
    with comm.use_policy(_Accelerator()) as policy:
        assert comm.device() == torch.device("meta")
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append(t.device))
        monkeypatch.setattr(torch.distributed, "broadcast", lambda t, src=0: seen.append(t.device))
        out = comm.all_reduce(torch.ones(3, device="meta"))  # already there: reduced in place, returned as is
        assert out.device == torch.device("meta")
        comm.broadcast_(torch.ones(2, device="meta"))
        assert seen == [torch.device("meta")] * 2, "the collectives received tensors on the policy's device"
        with pytest.raises(RuntimeError, match=r"on \['cpu'\], the backend needs meta"):
            policy.issue(lambda: None, torch.ones(1))
    assert comm.device() == torch.device("cpu")  # gloo / no group: the CPU
