"""benchmarks/gpu_check.py --dry-run: the GPU machine's one prepared script, run on CPU with tiny shapes (gloo,
DS_ACCELERATOR=cpu), writes its JSON with every field the GPU run writes.

About 95 s on an idle 2-core machine (its default time box is 150 s); the test gives it 240 s so that a loaded CI
machine does not cut the sampler runs short (the box is what decides whether a part completes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("ctr", "topk", "rating", "exp")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str, float]:
    import time

    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.pop("OUT", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json",
                          str(out / "gpu_check.json"), "--work", str(out / "work"), "--budget-s", "240"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), res.stdout, time.monotonic() - t0


def _finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_dry_run_writes_every_field(dry_run):
    result, stdout, wall = dry_run
    assert result["schema"] == "ckf-dist/gpu_check/1" and result["dry_run"] is True
    assert wall < 260, f"the dry run took {wall:.0f} s"
    for key in ("budget_s", "wall_s", "started_at", "mfu_formula", "goal_mfu", "goal_ratio", "machine", "imports",
                "parts", "goals"):
        assert key in result, key
    assert result["imports"]["ok"] and result["imports"]["missing"] == []
    assert result["imports"]["versions"]["deepspeed"]
    assert set(result["parts"]) == {"tests", "throughput", "sampler_study"}
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("reason"), part.get("traceback", part.get("output_tail")))

    tests = result["parts"]["tests"]
    assert tests["failed"] == 0 and tests["errors"] == 0 and tests["skipped"] >= 8
    assert any("needs CUDA" in r for r in tests["skip_reasons"])

    tp = result["parts"]["throughput"]
    assert tp["precision"] == "bf16" and tp["zero_stage"] == 3 and tp["activation_checkpointing"] is True
    assert tp["backend"] == "gloo" and tp["world_size"] == 1 and tp["attn_implementation"] == "sdpa"
    assert tp["steps_timed"] >= 1 and "4 N_frozen + 6 N_lora" in tp["mfu_formula"]
    assert tp["trainable_params"]["multi_lora_fusion"] > tp["trainable_params"]["plain_peft_lora"] > 0
    for side in ("plain_peft_lora", "multi_lora_fusion"):
        s = tp["sides"][side]
        for key in ("step_s_median", "tokens_per_s", "peak_mem_gib", "model_tflops_per_s", "mfu"):
            assert _finite_pos(s[key]), (side, key, s[key])
        assert all(math.isfinite(v) for v in s["loss_first_last"])
    assert _finite_pos(tp["ratio_tokens_per_s"]) and _finite_pos(tp["peak_tflops"])

    sp = result["parts"]["sampler_study"]
    assert sp["runs_ok"] == sp["runs_total"] == 3 * len(sp["seeds"])
    assert "issue #11" in sp["model_note"]
    assert set(sp["tasks"]) == set(TASKS)
    for task, row in sp["tasks"].items():
        for arm in ("uniform", "grad_balanced", "uniform_half"):
            cell = row[arm]
            assert cell["n"] == len(sp["seeds"]) and math.isfinite(cell["mean"]) and cell["band"] >= 0, (task, arm)
            assert 0 < cell["mean_share"] <= 1
        assert row["delta_balanced_vs_uniform"] is not None and row["delta_full_vs_half"] is not None
    assert sp["worst_task"] in TASKS
    for key in ("worst_task_data_limited", "worst_task_got_bigger_share", "worst_task_improves",
                "no_task_drops_beyond_noise"):
        assert isinstance(sp[key], bool), key

    names = [g["name"] for g in result["goals"]]
    assert any("MFU" in n for n in names) and any("tokens/s" in n for n in names)
    assert all(g["pass"] in (True, False) for g in result["goals"])
    assert "goals:" in stdout and ("[PASS]" in stdout or "[FAIL]" in stdout)
