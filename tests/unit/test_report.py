"""Report: metrics.json, report.md and PNGs from a fake results dict; absent metrics shown as '—', never 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckf_dist.eval.report import format_table, parse_key, read_tb_runs, read_tb_scalars, write_report


def fake_results() -> dict[str, dict]:
    ckf = {"n_ctr": 40.0, "n_ctr/warm": 30.0, "n_ctr/cold": 10.0, "auc_ctr": 0.7512, "auc_ctr/warm": 0.74,
           "auc_ctr/cold": 0.78, "uauc_ctr": 0.66, "uauc_ctr/warm": 0.65, "uauc_ctr/cold": None,
           "n_rating": 40.0, "n_rating/warm": 40.0, "n_rating/cold": 0.0, "rmse_rating": 1.02, "rmse_rating/warm": 0.98, "rmse_rating/cold": 1.10,
           "n_exp": 12.0, "bleu4_exp": 3.21, "bleu4_exp/warm": 3.0, "bleu4_exp/cold": None}
    text = {k: (v - 0.1 if isinstance(v, float) and "auc" in k else v) for k, v in ckf.items()}
    cf = {"n_ctr": 40.0, "auc_ctr": 0.70, "auc_ctr/warm": 0.71, "auc_ctr/cold": 0.66, "uauc_ctr": 0.6,
          "uauc_ctr/warm": 0.6, "uauc_ctr/cold": None, "n_rating": 40.0, "rmse_rating": None,
          "rmse_rating/warm": None, "rmse_rating/cold": None}
    return {"CKF": ckf, "LLM (text-only)": text, "CF (BPR)": cf}


def test_parse_key() -> None:
    assert parse_key("auc_ctr/cold") == ("auc", "ctr", "/cold")
    assert parse_key("ndcg@10_topk") == ("ndcg@10", "topk", "")
    assert parse_key("rmse_gen_rating/warm") == ("rmse_gen", "rating", "/warm")
    assert parse_key("train/loss") is None


def test_write_report_files_and_tables(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb"
    w = SummaryWriter(str(tb / "ckf"))
    for step in range(1, 6):
        w.add_scalar("train/loss", 2.0 / step, step)
        w.add_scalar("train/loss_ctr", 1.5 / step, step)
        w.add_scalar("train/text_weight", 1.0 - step / 5, step)
    w.add_scalar("valid/auc_ctr", 0.6, 5)
    w.close()
    w = SummaryWriter(str(tb / "cf"))  # the CF stage logs the same tag names: a separate run, not one curve
    for epoch in range(3):
        w.add_scalar("train/loss", 0.9 - 0.1 * epoch, epoch)
    w.close()

    results = fake_results()
    paths = write_report(tmp_path, results, tb_dir=str(tb), step=5)
    for name in ("metrics_json", "report_md", "plot_ctr", "plot_rating", "plot_exp", "training_curves"):
        assert paths[name].is_file() and paths[name].stat().st_size > 0, name
    assert paths["plot_ctr"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    saved = json.loads(paths["metrics_json"].read_text())
    assert saved["CF (BPR)"]["rmse_rating"] is None and saved["CKF"]["auc_ctr"] == 0.7512

    md = paths["report_md"].read_text()
    assert "| auc | CKF | 0.7512 | 0.7400 | 0.7800 |" in md
    assert "| rmse ↓ | CF (BPR) | — | — | — |" in md  # a ranking CF model has no ratings: absent, not 0
    assert "| bleu4 | CF (BPR) | — | — | — |" in md  # key not reported at all: absent too
    assert "| uauc | CKF | 0.6600 | 0.6500 | — |" in md
    assert "| n | CKF | 40 | 30 | 10 |" in md
    assert "| n | CKF | 40 | 40 | 0 |" in md and "| n | CF (BPR) | 40 | — | — |" in md
    assert md.index("## CTR") < md.index("## Rating") < md.index("## Explanation")

    text = format_table(results)
    row = next(line for line in text.splitlines() if line.startswith("ctr") and "auc " in line and "CKF" in line)
    assert row.split()[-3:] == ["0.7512", "0.7400", "0.7800"]
    assert " 0.0000" not in text  # nothing absent was turned into 0

    # The report's own test scalars are written, and the curve reader picks only the requested prefixes.
    assert read_tb_scalars(tb / "report" / "CKF", ("test/",))["test/auc_ctr"] == [(5, pytest.approx(0.7512))]
    assert read_tb_scalars(tb / "report" / "CF_BPR", ("test/",))["test/auc_ctr"] == [(5, pytest.approx(0.70))]
    assert "test/rmse_rating" not in read_tb_scalars(tb / "report" / "CF_BPR", ("test/",))
    assert set(read_tb_scalars(tb, ("train/",))) == {"train/loss", "train/loss_ctr", "train/text_weight"}
    runs = read_tb_runs(tb, ("train/", "valid/"))
    assert set(runs) == {"ckf", "cf"}  # the report's own tb/report/* scalars are not training curves
    assert runs["cf"]["train/loss"] == {0: pytest.approx(0.9), 1: pytest.approx(0.8), 2: pytest.approx(0.7)}
    assert runs["ckf"]["train/loss"][1] == pytest.approx(2.0)


def test_write_report_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a number nor None"):
        write_report(tmp_path, {"CKF": {"auc_ctr": "0.7"}})
    with pytest.raises(ValueError, match="empty"):
        write_report(tmp_path, {})
