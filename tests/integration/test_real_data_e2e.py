"""The two real-data shapes through the whole main job (`deepspeed launchers/train.py`, 1 CPU rank, tiny model):
an instruction-format (alpaca) prompt file set, which has no CF stage and trains the text-only LLM, and a 0/1 click
table given as train/valid/test files, with its CF baseline. Every input file is generated here, small."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from ckf_dist.testing.data_files import binary_rows, split_by_position, write_alpaca_files, write_csv
from ckf_dist.testing.jobs import ROOT, TINY_FILES, env, run_job


def _metric_keys(row: dict) -> set[str]:
    return {k for k, v in row.items() if v is not None}


def _percentiles(cf, prep) -> tuple[float, float]:
    """Mean percentile of the CF score of (a) the training clicks and (b) the valid/test clicks, each among the
    item itself and the items the user has no training click on (1 = above all of them, 0.5 = like a random item)."""
    import statistics

    def pairs(split: str) -> list[tuple[int, int]]:
        t = pq.read_table(prep / "interactions" / f"{split}.parquet", columns=["uid", "iid"])
        return list(zip(t["uid"].to_pylist(), t["iid"].to_pylist()))

    scores = (cf.user @ cf.item.T).float()
    seen: dict[int, set[int]] = {}
    for u, i in pairs("train"):
        seen.setdefault(u, set()).add(i)

    def pct(u: int, i: int) -> float:
        others = [j for j in range(scores.shape[1]) if j == i or j not in seen[u]]
        return float((scores[u, others] < scores[u, i]).float().mean())

    held = pairs("valid") + pairs("test")
    assert held
    return (statistics.mean(pct(u, i) for u, i in pairs("train")), statistics.mean(pct(u, i) for u, i in held))


@pytest.mark.slow
@pytest.mark.distributed
def test_alpaca_prompt_files_run_end_to_end_without_cf(tmp_path):
    n_test, cap = 10, 6
    files = write_alpaca_files(tmp_path, n_train=24, n_valid=6, n_test=n_test)
    run = tmp_path / "run"
    overrides = [f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "data.source=alpaca",
                 f"data.path={files[0]}", f"data.valid_path={files[1]}", f"data.test_path={files[2]}",
                 "data.tasks=['ctr']", "train.prompts=text", "eval.baselines=[]", "train.max_steps=3",
                 "train.eval_every=2", *TINY_FILES, f"eval.max_samples_per_task={cap}"]
    res = run_job(overrides, nproc=1, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "CF stage skipped: data.source='alpaca'" in res.stdout
    assert not (run / "cf").exists() and not (run / "tb" / "cf").exists()  # no CF model was trained

    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == ["LLM (text-only)"], metrics.keys()  # no CKF, CF or "CKF, text prompts" row
    row = metrics["LLM (text-only)"]
    # A seeded subset of `cap` records (each record its own unit: there are no users to keep whole).
    assert row["n_ctr"] == min(cap, n_test)
    assert row["auc_ctr"] is not None
    # No users: no per-user metric and no warm / cold groups.
    assert not [k for k in row if k.startswith("uauc") or k.endswith(("/warm", "/cold"))], row
    report = (run / "report.md").read_text()
    assert "LLM (text-only)" in report and "CKF" not in report and "CF (" not in report
    assert (run / "adapters" / "ctr" / "adapter_config.json").is_file()
    # Validation ran on the valid prompts during training (train.eval_every=2).
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("valid/auc_ctr" in r for r in logged)

    # The finished run re-evaluates from its exported adapters alone (no CF tables on disk to load).
    cmd = [sys.executable, str(ROOT / "launchers" / "evaluate.py"), "--config", str(run / "config.yaml")]
    ev = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
    assert ev.returncode == 0, ev.stdout[-3000:] + ev.stderr[-3000:]
    again = json.loads((run / "metrics.json").read_text())
    assert list(again) == ["LLM (text-only)"]
    assert again["LLM (text-only)"]["n_ctr"] == row["n_ctr"]
    assert again["LLM (text-only)"]["auc_ctr"] == pytest.approx(row["auc_ctr"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_binary_table_with_given_files_runs_end_to_end_with_cf_baseline(tmp_path):
    tr, va, te = split_by_position(binary_rows(n_users=16, n_items=30, per_user=12), valid_from=8, test_from=10)
    # Items that only the held-out files have: no trained CF vector, so they are dropped (and counted), and a CF
    # model trained on more than the train file would have them in its id map.
    va.append(["u1", "i901", 1, 4000, "Valid only"])
    te += [["u2", "i902", 1, 5000, "Test only"], ["u3", "i903", 0, 5000, "Test only, not clicked"]]
    paths = [write_csv(tmp_path / f"{n}.csv", p) for n, p in zip(("train", "valid", "test"), (tr, va, te))]
    run, prep = tmp_path / "run", tmp_path / "data"
    overrides = [f"log.run_dir={run}", f"data.prepared_dir={prep}", "data.source=table", f"data.path={paths[0]}",
                 f"data.valid_path={paths[1]}", f"data.test_path={paths[2]}", "data.columns.label=clicked",
                 "data.columns.title=title", "data.tasks=['ctr','topk']", "data.num_candidates=6", "cf.model=bpr",
                 "eval.ks=[1,3]", "eval.baselines=[cf]", "train.max_steps=3", *TINY_FILES,
                 # All test samples, so that the counts can be read off the files; a CF model that fits its
                 # training pairs (20 epochs, no early stop), so that trained pairs can be told from unseen ones.
                 "eval.max_samples_per_task=0", "cf.epochs=20", "cf.patience=20", "cf.lr=0.03"]
    # 2 ranks: the distributed path on given files (a separate 2-rank binary-table job duplicated this one).
    res = run_job(overrides, nproc=2, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]

    # The CF model was trained here, on the train file's positives only.
    from ckf_dist.cf.export import load_cf_embeddings
    from ckf_dist.data.schema import manifest_sha256

    cf = load_cf_embeddings(run / "cf" / "embeddings.safetensors", expected_manifest_sha=manifest_sha256(prep))
    train_pos = [r for r in tr if r[2] == 1]
    assert cf.meta["model"] == "bpr"
    assert (cf.meta["num_users"], cf.meta["num_items"]) == (len({r[0] for r in train_pos}),
                                                             len({r[1] for r in train_pos}))
    assert cf.user.shape[0] == cf.meta["num_users"] and cf.item.shape[0] == cf.meta["num_items"]
    cf_items = set(pq.read_table(prep / "items.parquet")["raw_id"].to_pylist())
    assert cf_items == {r[1] for r in train_pos} and not cf_items & {"i901", "i902", "i903"}
    assert pq.read_metadata(prep / "interactions" / "train.parquet").num_rows == len(train_pos)
    assert (run / "cf" / "metrics.json").is_file()
    # ... and on nothing else: the clicks of the train file rank high among the user's items, the held-out clicks
    # (random items in this data) no higher than unseen items; a CF model that also trained on them ranks them high.
    fit, held = _percentiles(cf, prep)
    assert fit > 0.75, f"the CF model did not fit its training pairs (mean percentile {fit:.3f})"
    assert held < 0.65, f"held-out clicks rank like trained ones ({held:.3f} vs {fit:.3f}): CF saw valid/test rows"

    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == ["CKF", "CF (bpr)"], metrics.keys()
    # Every test row of a known item is one CTR sample (1 = Yes, 0 = an explicit No); each clicked one a top-K target.
    known = [r for r in te if r[1] in cf_items]
    assert len(te) - len(known) >= 2
    for name in ("CKF", "CF (bpr)"):
        assert metrics[name]["n_ctr"] == len(known), name
        assert metrics[name]["n_topk"] == sum(1 for r in known if r[2] == 1), name
        assert {"auc_ctr", "hr@1_topk", "ndcg@3_topk"} <= _metric_keys(metrics[name]), name
    assert metrics["CF (bpr)"].get("rmse_rating") is None  # no rating task, and BPR has no rating scale
    m = json.loads((prep / "manifest.json").read_text())
    assert m["split"] == "predefined files"
    # Held-out clicks of items without a training click are dropped as cold; so are 0 rows of such items (in any file).
    assert m["skips"]["counts"]["cold_item_not_in_train"] == sum(1 for r in va + te if r[2] == 1 and r[1] not in cf_items)
    assert m["skips"]["counts"]["negative_item_not_in_train"] == sum(1 for r in tr + va + te
                                                                     if r[2] == 0 and r[1] not in cf_items)
    assert m["explicit_negatives"]["test"] == sum(1 for r in known if r[2] == 0)
    report = (run / "report.md").read_text()
    assert "CF (bpr)" in report and "CKF" in report
    for task in ("ctr", "topk"):
        assert (run / "adapters" / task / "adapter_config.json").is_file()


def test_alpaca_eval_cap_is_a_random_subset_of_records(tmp_path):
    """Alpaca records have no users (all are stored as user 0): the evaluation cap takes `limit` records, not
    "user 0 whole" (which would be every record), and the same ones on every call."""
    from ckf_dist.config import load_config
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.eval.run import cap_per_task, eval_samples

    files = write_alpaca_files(tmp_path, n_train=8, n_valid=4, n_test=12)
    cfg = load_config(None, ["data.source=alpaca", f"data.path={files[0]}", f"data.valid_path={files[1]}",
                             f"data.test_path={files[2]}", "data.tasks=['ctr']", "train.prompts=text",
                             "eval.baselines=[]", f"data.prepared_dir={tmp_path / 'prep'}"])
    prepare_data(cfg.data, engine="local")
    everything = eval_samples(cfg, "test")
    assert len(everything) == 12 and {s["uid"] for s in everything} == {0}
    assert len(cap_per_task(everything, 5, seed=0)) == 12  # by user: user 0 is taken whole
    got = eval_samples(cfg, "test", 5)
    assert len(got) == 5 and [s["key"] for s in got] == [s["key"] for s in eval_samples(cfg, "test", 5)]
    assert {s["key"] for s in got} != {s["key"] for s in everything[:5]}  # seeded random, not the first five


@pytest.mark.distributed
def test_a_file_over_the_input_loss_budget_stops_the_main_job_with_the_summary(tmp_path):
    """The whole job (2 ranks), not only the prepare stage: rank 0 names the file, the reason and the lines; the other
    rank says it stops because rank 0 failed; no traceback, no run artifacts past the prepare stage."""
    rows = binary_rows(n_users=16, n_items=30, per_user=12)
    path = write_csv(tmp_path / "clicks.csv", rows)
    lines = path.read_text().splitlines()
    # Every 4th data row loses its label column: 25% of the file unreadable, far above data.max_skip_frac.
    path.write_text("\n".join(ln if i % 4 or i == 0 else ln.rsplit(",", 3)[0] for i, ln in enumerate(lines)) + "\n")
    run = tmp_path / "run"
    res = run_job([f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "data.source=table",
                   f"data.path={path}", "data.columns.label=clicked", "data.columns.title=title",
                   "data.tasks=['ctr','topk']", "data.num_candidates=6", "cf.model=bpr", "eval.ks=[1,3]",
                   *TINY_FILES], nproc=2, timeout=300)
    assert res.returncode != 0
    err = res.stderr
    assert "error: " in err and "clicks.csv:5 expected 5 fields" in err and "max_skip_frac" in err, err[-3000:]
    assert "[rank 1] stopping: rank 0 failed: InputLossError" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not (run / "cf").exists() and not (run / "checkpoints").exists()
