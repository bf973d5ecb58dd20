"""Checkpoints without pickle and with checksums (train/checkpoint.py), on files the tests make: the project's state
round-trips through JSON + safetensors, a planted pickle is refused without running (its payload would create a
marker file), the manifest names a bit-flipped, truncated or missing file and the previous complete checkpoint is
chosen, files are private, and DeepSpeed's own files are read with weights_only=True."""

from __future__ import annotations

import json
import os
import pickle
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ckf_dist.train import checkpoint as ck
from ckf_dist.train.deepspeed_utils import free_port
from ckf_dist.train.sampler import TaskMixture


class _Payload:
    """Unpickling this creates `marker` (what a planted `os.system` would do, without a shell)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _state() -> dict:
    mix = TaskMixture(["ctr", "topk"], "grad_balanced", warmup=0)
    mix.update(torch.tensor([1.0, 0.5]), torch.tensor([0.7, 0.9]))
    return {"data": {"streams": {"ctr": {"epoch": 0, "position": 3, "task": "ctr"}}, "draw_step": 5,
                     "draw_weights": torch.tensor([0.25, 0.75], dtype=torch.float64)},
            "mixture": mix.state_dict(), "steps_done": 4, "rng": ck.rng_state(), "step": 4}


def _fake_ckpt(root: Path, step: int, world: int = 2) -> Path:
    folder = root / "checkpoints" / f"step-{step:06d}"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    for r in range(world):
        ck.write_rank_state(folder, r, {**_state(), "steps_done": step})
    (folder / ck.RUN_FILE).write_text(json.dumps({"step": step}))
    ck.write_manifest(folder, step, world)
    return folder


def test_state_round_trips_without_pickle_and_restores_rng(tmp_path):
    state = _state()
    ck.write_rank_state(tmp_path, 0, state)
    expected = [random.random(), float(np.random.rand()), float(torch.rand(()))]
    back = ck.read_rank_state(tmp_path, 0)
    assert back["data"]["streams"] == state["data"]["streams"] and back["steps_done"] == 4
    torch.testing.assert_close(back["data"]["draw_weights"], state["data"]["draw_weights"])
    for k, v in state["mixture"].items():
        assert torch.equal(back["mixture"][k], v), k
    ck.set_rng_state(back["rng"])
    assert [random.random(), float(np.random.rand()), float(torch.rand(()))] == expected
    assert b"\x80" not in (tmp_path / "rank-0.json").read_bytes()  # no pickle opcode stream anywhere


def test_state_of_an_unknown_type_is_refused_rather_than_pickled():
    with pytest.raises(TypeError, match="without pickle"):
        ck.encode_state({"x": object()})


def test_planted_pickle_in_the_state_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    folder = _fake_ckpt(tmp_path, 4, world=1)
    # An attacker who can write the run dir replaces the state file AND fixes the manifest: only the format stops it.
    (folder / "rank-0.safetensors").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    (folder / "rank-0.json").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / ck.MANIFEST).unlink()
    ck.write_manifest(folder, 4, 1)
    assert ck.choose_checkpoint(tmp_path, 1) == folder  # the checksums match the planted files
    with pytest.raises(ck.CheckpointError, match="rank-0.json is not valid JSON"):
        ck.read_rank_state(folder, 0)
    (folder / "rank-0.json").write_text(json.dumps({"format": ck.FORMAT, "state": {}}))
    with pytest.raises(ck.CheckpointError, match="rank-0.safetensors is not a valid safetensors file"):
        ck.read_rank_state(folder, 0)
    assert not marker.exists()


def test_old_pickle_checkpoint_is_not_opened(tmp_path):
    marker = tmp_path / "PWNED"
    folder = tmp_path / "checkpoints" / "step-000004"
    folder.mkdir(parents=True)
    torch.save({"rng": _Payload(marker)}, folder / "rank-0.pt")  # the format before: rank-<r>.pt + COMPLETE
    (folder / "COMPLETE").write_text("4\n")
    with pytest.raises(ck.CheckpointError, match="old checkpoint format .*unpickling can run code"):
        ck.choose_checkpoint(tmp_path, 1)
    assert not marker.exists()


def test_deepspeed_files_are_loaded_with_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    marker = tmp_path / "PWNED"
    good = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                         "fp32_flat_groups": [torch.ones(3)]}, "ds_version": "0.19.8"}, good)
    back = ck.safe_torch_load(good)
    assert back["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.weights
    assert isinstance(back["optimizer_state_dict"]["loss_scaler"], LossScaler)
    bad = tmp_path / "model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "evil": _Payload(marker)}, bad)
    with pytest.raises(ck.CheckpointError, match="weights_only=True"):
        ck.safe_torch_load(bad)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "missing_rank_1"])
def test_damaged_newest_checkpoint_is_named_and_the_previous_one_chosen(tmp_path, damage):
    prev, newest = _fake_ckpt(tmp_path, 2), _fake_ckpt(tmp_path, 4)
    target = newest / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if damage == "bit_flip":
        data = bytearray(target.read_bytes())
        data[1000] ^= 0x01
        target.write_bytes(bytes(data))
        expect = "step-000004/state/zero_pp_rank_0_mp_rank_00_model_states.pt: sha256 differs"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:2048])
        expect = "step-000004/state/zero_pp_rank_0_mp_rank_00_model_states.pt has 2048 bytes, the manifest says 4096"
    else:
        (newest / "rank-1.json").unlink()
        expect = "step-000004/rank-1.json is missing"
    warned = []
    assert ck.choose_checkpoint(tmp_path, 2, warn=warned.append) == prev
    assert len(warned) == 1 and expect in warned[0] and "previous complete one step-000002" in warned[0]
    assert "fewer ranks" not in warned[0]


def test_no_intact_checkpoint_is_an_error_listing_each(tmp_path):
    for step in (2, 4):
        folder = _fake_ckpt(tmp_path, step)
        (folder / "rank-0.safetensors").write_bytes(b"")
    with pytest.raises(ck.CheckpointError) as err:
        ck.choose_checkpoint(tmp_path, 2)
    msg = str(err.value)
    assert "step-000004/rank-0.safetensors has 0 bytes" in msg and "step-000002/rank-0.safetensors" in msg
    assert "train.resume=never" in msg


def test_other_world_size_is_named(tmp_path):
    _fake_ckpt(tmp_path, 2, world=2)
    with pytest.raises(ck.CheckpointError, match="written by 2 rank\\(s\\), this run has 1"):
        ck.choose_checkpoint(tmp_path, 1)


def test_incomplete_and_tmp_directories_are_ignored(tmp_path):
    prev = _fake_ckpt(tmp_path, 2)
    newest = _fake_ckpt(tmp_path, 4)
    (newest / ck.MANIFEST).unlink()  # crashed before the manifest (the last file) was written
    (tmp_path / "checkpoints" / ".tmp-step-000006").mkdir()
    warned = []
    assert ck.choose_checkpoint(tmp_path, 2, warn=warned.append) == prev
    assert "step-000004: no MANIFEST.json (incomplete checkpoint)" in warned[0]


class _FakeEngine:
    """Writes what DeepSpeed writes (a state/ folder, world-readable by default) without DeepSpeed."""

    def save_checkpoint(self, folder, tag, save_latest):
        (Path(folder) / tag).mkdir(exist_ok=True)
        path = Path(folder) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
        torch.save({"module": {"w": torch.ones(3)}}, path)
        os.chmod(path, 0o644)


def test_save_writes_private_files_and_the_manifest_last(tmp_path):
    old = os.umask(0o022)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        final = ck.save_checkpoint(_FakeEngine(), 6, tmp_path, {"data": {}, "mixture": {}, "steps_done": 6},
                                   keep=2, run_info={"config": {"train": {"lr": 0.1}}})
    finally:
        os.umask(old)
    assert final == tmp_path / "checkpoints" / "step-000006" and not list((tmp_path / "checkpoints").glob(".tmp*"))
    manifest = json.loads((final / ck.MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file() and p.name != ck.MANIFEST)
    assert sorted(manifest["files"]) == on_disk and "COMPLETE" in on_disk and "run.json" in on_disk
    for p in [tmp_path / "checkpoints", *final.rglob("*"), final]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode == (0o700 if p.is_dir() else 0o600), (p, oct(mode))
    assert ck.verify_checkpoint(final) == []
    assert ck.read_run_info(final)["config"] == {"train": {"lr": 0.1}}


def test_resume_never_sets_the_old_checkpoints_aside(tmp_path):
    _fake_ckpt(tmp_path, 2)
    moved = ck.set_aside_checkpoints(tmp_path)
    assert moved is not None and moved.name.startswith("checkpoints.replaced-") and (moved / "step-000002").is_dir()
    assert ck.choose_checkpoint(tmp_path, 2) is None
    assert ck.set_aside_checkpoints(tmp_path) is None  # nothing left to move
