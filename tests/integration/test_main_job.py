"""The main job end to end under the real `deepspeed` launcher on 2 CPU ranks (tiny everything)."""

import json
import re

import pytest

from ckf_dist.testing.jobs import TINY, run_job


def read_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.distributed
def test_main_job_two_ranks_writes_every_artifact_and_per_task_curves(tmp_path):
    # One run for both checks (each costs a minute): the artifacts and table, and the TensorBoard curves of the
    # gradient-balanced sampler.
    run = tmp_path / "run"
    res = run_job([f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "train.max_steps=4",
                   "train.ckpt_every=2", "train.sampler=grad_balanced", *TINY], timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout
    for task, metric in (("ctr", "auc"), ("topk", "hr@5"), ("rating", "rmse"), ("exp", "bleu4"), ("exp", "rougeL")):
        assert re.search(rf"^{task}\s+{re.escape(metric)}\s+CKF\s+\d", out, re.MULTILINE), \
            f"{task} {metric} missing from the printed table:\n{out[-3000:]}"
    for f in ("config.yaml", "metrics.json", "report.md", "metrics.jsonl", "cf/embeddings.safetensors",
              "base_model/config.json"):
        assert (run / f).is_file(), f
    assert list((run / "tb" / "ckf").glob("events.out.tfevents.*"))
    for task in ("ctr", "topk", "rating", "exp"):
        assert (run / "adapters" / task / "adapter_config.json").is_file()
    assert (run / "checkpoints" / "step-000004" / "COMPLETE").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "CKF" in metrics and metrics["CKF"]["auc_ctr"] is not None

    scalars = read_scalars(run / "tb" / "ckf")
    expected = ["train/loss", "train/lr", "train/samples_per_s", "train/tokens_per_s", "train/text_weight",
                "train/grad_norm", "train/grad_cos_ctr_topk", "train/grad_cos_rating_exp", "train/data_wait_frac"]
    for t in ("ctr", "topk", "rating", "exp"):
        expected += [f"train/loss_{t}", f"train/grad_norm_{t}", f"train/grad_signal_{t}", f"train/mixture_{t}"]
    missing = [k for k in expected if k not in scalars]
    assert not missing, f"missing scalars {missing}; have {sorted(scalars)}"
    assert len(scalars["train/loss"]) == 4
    mix = [scalars[f"train/mixture_{t}"][-1] for t in ("ctr", "topk", "rating", "exp")]
    assert abs(sum(mix) - 1) < 1e-6
