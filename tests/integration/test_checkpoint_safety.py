"""Checkpoint safety through the real launcher (1 CPU rank, a few steps): a damaged newest checkpoint falls back to
the previous one, a changed config is checked on resume (refused / forced / safe), a planted pickle in DeepSpeed's
files never runs, and a diverging run stops with a clear error before writing a checkpoint or an adapter.

One base run (4 steps, checkpoints at 2 and 4) is copied for each resume case; the non-finite runs reuse its data,
CF tables and base model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ckf_dist.testing.jobs import TINY, run_job
from ckf_dist.train.checkpoint import MANIFEST, write_manifest

pytestmark = [pytest.mark.slow]

BASE = [*TINY, "train.ckpt_every=2", "train.ckpt_keep=5", "eval.baselines=[]", "eval.max_new_tokens=2"]


class _Payload:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _ok(res):
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _fails(res):
    assert res.returncode != 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout + res.stderr


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_safety")
    run = root / "run"
    _ok(run_job([f"log.run_dir={run}", f"data.prepared_dir={root / 'data'}", "train.max_steps=4", *BASE], nproc=1,
                timeout=600))
    assert (run / "checkpoints" / "step-000004" / MANIFEST).is_file()
    return root, run


def _copy(base, tmp_path):
    root, run = base
    dst = tmp_path / "run"
    shutil.copytree(run, dst, symlinks=True)
    return [f"log.run_dir={dst}", f"data.prepared_dir={root / 'data'}", *BASE], dst


def test_bit_flipped_newest_checkpoint_is_named_and_the_previous_one_resumed(base, tmp_path):
    args, run = _copy(base, tmp_path)
    target = run / "checkpoints" / "step-000004" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x10
    target.write_bytes(bytes(data))
    out = _ok(run_job([*args, "train.max_steps=6"], nproc=1))
    assert "step-000004/state/zero_pp_rank_0_mp_rank_00_optim_states.pt: sha256 differs" in out
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in out
    assert "applying train.max_steps: 4 -> 6" in out  # more steps: a safe change, applied
    resumed = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert resumed[-1]["step"] == 2 and resumed[-1]["applied"]["train.max_steps"] == [4, 6]
    steps = [r["step"] for r in _rows(run) if "train/loss" in r]
    assert steps[-4:] == [3, 4, 5, 6]  # steps 3 and 4 trained again from step 2


def test_changed_lr_refuses_naming_it_and_config_yaml_keeps_the_truth(base, tmp_path):
    args, run = _copy(base, tmp_path)
    res = run_job([*args, "train.max_steps=4", "train.lr=0.05"], nproc=1)
    out = _fails(res)
    assert "train.lr: 0.005 -> 0.05" in out and "train.resume=force" in out and "train.resume=never" in out
    # Refused up front (pipeline preflight) like a config error: exit 2, the message, no traceback.
    assert res.returncode == 2 and "error: " in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "lr: 0.005" in (run / "config.yaml").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_changed_tasks_refuse_with_the_field_not_an_index_error(base, tmp_path):
    args, _ = _copy(base, tmp_path)
    args = [a for a in args if not a.startswith("data.prepared_dir=")]
    out = _fails(run_job([*args, f"data.prepared_dir={tmp_path / 'data2'}", "train.max_steps=4",
                          "data.tasks=[ctr,topk]"], nproc=1))
    assert "data.tasks: ['ctr', 'topk', 'rating', 'exp'] -> ['ctr', 'topk']" in out
    assert "IndexError" not in out
    assert not (tmp_path / "data2").exists()  # refused before the data were prepared for the new tasks


def test_force_resumes_with_a_warning_and_the_new_lr(base, tmp_path):
    args, run = _copy(base, tmp_path)
    out = _ok(run_job([*args, "train.max_steps=8", "train.lr=0.05", "train.resume=force"], nproc=1))
    assert "WARNING: train.resume=force" in out and "train.lr: 0.005 -> 0.05" in out
    lr5 = next(r["train/lr"] for r in _rows(run) if r["step"] == 5 and "train/lr" in r)
    assert lr5 == pytest.approx(0.05 * 3 / 7)  # the forced lr, on the 8-step schedule (0.005 * 3 / 7 before)
    info = json.loads((run / "checkpoints" / "step-000008" / "run.json").read_text())
    assert info["config"]["train"]["lr"] == 0.05 and info["resumes"][-1]["forced"] == {"train.lr": [0.005, 0.05]}


def test_planted_pickle_in_deepspeed_state_never_runs(base, tmp_path):
    args, run = _copy(base, tmp_path)
    marker = tmp_path / "PWNED"
    ckpt = run / "checkpoints" / "step-000004"
    target = ckpt / "state" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": _Payload(marker)}, target)
    (ckpt / MANIFEST).unlink()
    write_manifest(ckpt, 4, 1)  # whoever can write the files can rewrite the manifest: the loader must hold
    out = _fails(run_job([*args, "train.max_steps=4"], nproc=1))
    assert "refused by the restricted loader (weights_only=True)" in out
    assert not marker.exists()


def _fresh_run(base, tmp_path, *overrides: str) -> tuple[str, object]:
    """A new run dir (no checkpoint) on the base run's data, CF tables and base model: only `overrides` differ."""
    root, ref = base
    run = tmp_path / "run"
    out = _fails(run_job([f"log.run_dir={run}", f"data.prepared_dir={root / 'data'}", *BASE,
                          f"cf.embeddings_path={ref / 'cf' / 'embeddings.safetensors'}",
                          f"model.base_model={ref / 'base_model'}", *overrides], nproc=1))
    return out, run


def test_diverging_loss_is_skipped_counted_and_stops_without_a_checkpoint(base, tmp_path):
    # lr 1e30: step 1 leaves finite but huge LoRA weights, every later loss overflows to NaN.
    out, run = _fresh_run(base, tmp_path, "train.max_steps=6", "train.ckpt_every=3", "train.lr=1e30",
                          "train.max_nonfinite_steps=2")
    assert "step 2 skipped (no parameter update)" in out
    assert "step 3: 2 steps in a row (from step 2) had a non-finite loss or gradient norm" in out
    skipped = [r for r in _rows(run) if r.get("train/step_skipped") == 1.0]
    assert [r["step"] for r in skipped] == [2, 3] and skipped[0]["train/loss"] == "nan"
    assert skipped[-1]["train/nonfinite_steps"] == 2 and "train/loss" in skipped[0]["nonfinite"]
    assert not list((run / "checkpoints").glob("step-*")) and not (run / "adapters").exists()


def test_learning_rate_beyond_float32_stops_before_any_step(base, tmp_path):
    out, run = _fresh_run(base, tmp_path, "train.max_steps=4", "train.ckpt_every=1", "train.lr=1e300")
    # A finite lr (the config takes it) that float32 weights cannot take: named before the first step (it used to
    # fail inside AdamW with "value cannot be converted to type float without overflow"). Updates that overflow the
    # weights at a smaller lr stop at once after the step (test_checkpoint_guards.py).
    assert "learning rate 1e+300 of parameter group 0 (train.lr=1e+300" in out and "does not fit a float32" in out
    assert not list((run / "checkpoints").glob("step-*")) and not (run / "adapters").exists()
