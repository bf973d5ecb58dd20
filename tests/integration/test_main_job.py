"""The main job end to end under the real `deepspeed` launcher on 2 CPU ranks (tiny everything)."""

import json

import pytest

from tests.integration.run_utils import TINY, run_job


@pytest.mark.slow
@pytest.mark.distributed
def test_main_job_two_ranks_writes_every_artifact(tmp_path):
    run = tmp_path / "run"
    res = run_job([f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "train.max_steps=4",
                   "train.ckpt_every=2", *TINY], timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    out = res.stdout
    for metric in ("auc_ctr", "hr@10_topk", "rmse_rating", "bleu4_exp"):
        assert metric in out, f"{metric} missing from the printed table:\n{out[-3000:]}"
    for f in ("config.yaml", "metrics.json", "report.md", "metrics.jsonl", "cf/embeddings.safetensors",
              "base_model/config.json"):
        assert (run / f).is_file(), f
    assert list((run / "tb" / "ckf").glob("events.out.tfevents.*"))
    for task in ("ctr", "topk", "rating", "exp"):
        assert (run / "adapters" / task / "adapter_config.json").is_file()
    assert (run / "checkpoints" / "step-000004" / "COMPLETE").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert "CKF" in metrics and metrics["CKF"]["auc_ctr"] is not None
