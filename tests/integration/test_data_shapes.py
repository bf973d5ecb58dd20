"""A 0/1 click table given as train/valid/test files, end to end: the prepare launcher with its checks, Ray Data
against the in-process engine, and (slow) the real main job on it with tiny settings."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from ckf_dist.testing.data_files import binary_rows, split_by_position, write_csv
from ckf_dist.testing.jobs import ROOT, env


def _files(tmp_path: Path, n_users: int = 40) -> list[str]:
    parts = split_by_position(binary_rows(n_users=n_users, n_items=30, per_user=12))
    return [str(write_csv(tmp_path / f"{n}.csv", p)) for n, p in zip(("train", "valid", "test"), parts)]


def _overrides(tmp_path: Path, files: list[str], prepared: Path) -> list[str]:
    return ["data.source=table", f"data.path={files[0]}", f"data.valid_path={files[1]}", f"data.test_path={files[2]}",
            "data.columns.label=clicked", "data.columns.title=title", "data.tasks=['ctr','topk']",
            "data.num_candidates=6", f"data.prepared_dir={prepared}", "cf.model=bpr"]


def _digest(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*"))
            if f.is_file()}


def test_prepare_launcher_checks_a_binary_table_with_given_splits(tmp_path):
    files = _files(tmp_path)
    outs = {}
    for engine in ("local", "ray"):
        cmd = [sys.executable, str(ROOT / "launchers" / "prepare_data.py"), "--check",
               *(["--local"] if engine == "local" else []), *_overrides(tmp_path, files, tmp_path / engine)]
        res = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300, check=False)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert "checks passed" in res.stdout
        outs[engine] = _digest(tmp_path / engine)
    assert outs["local"] == outs["ray"]
    m = json.loads((tmp_path / "local" / "manifest.json").read_text())
    assert m["split"] == "predefined files" and all(m["explicit_negatives"].values())
