"""`ckf-dist`, the front door: the listing and its exit codes, every subcommand's --help with its flags (the same
parser as the launcher's), the deepspeed launcher's --local_rank before the subcommand, and the lookup of a relative
config file / train.ds_config in the working directory, then in the installed package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckf_dist import cli
from ckf_dist.config import PACKAGE_DIR, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

FLAGS = {
    "prepare": ["--config", "--force", "--local", "--check", "--dry-run", "KEY=VALUE"],
    "train": ["--config", "KEY=VALUE"],
    "train-cf": ["--config", "--ray-workers", "KEY=VALUE"],
    "evaluate": ["--config", "KEY=VALUE"],
    "fetch-model": ["--out", "--force", "smollm2-135m"],
    "ray-job": ["--config", "--num-workers", "--gpu", "--address", "--storage", "--max-failures", "KEY=VALUE"],
}
LAUNCHERS = {"prepare": "prepare_data.py", "train": "train.py", "train-cf": "train_cf.py", "evaluate": "evaluate.py",
             "ray-job": "ray_job.py"}
TINY_DATA = ["data.synthetic.num_users=40", "data.synthetic.num_items=30", "data.synthetic.max_interactions=12",
             "data.history_len=4"]


def _exit(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_subcommand_on_stdout_and_exits_0(flag, capsys):
    cli.main([flag])  # returns: exit status 0
    out = capsys.readouterr().out
    for name in FLAGS:
        line = next((x for x in out.splitlines() if x.strip().startswith(name + " ")), None)
        assert line is not None and len(line.split()) > 2, f"{name} has no one-line summary in:\n{out}"


def test_no_arguments_lists_on_stderr_and_exits_2(capsys):
    assert _exit([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "commands:" in captured.err and "fetch-model" in captured.err


def test_an_unknown_subcommand_is_named_with_the_list(capsys):
    assert _exit(["trian", "--config", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train-cf" in err


def test_an_option_before_any_subcommand_says_the_command_comes_first(capsys):
    assert _exit(["--config", "configs/demo.yaml"]) == 2
    assert "a command must come first, got the option '--config'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(FLAGS))
def test_every_subcommand_help_describes_it_and_lists_its_flags(name, capsys):
    assert _exit([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: ckf-dist {name} ")
    assert cli.summary(name) in out, "no description"
    missing = [f for f in FLAGS[name] if f not in out]
    assert missing == [], f"ckf-dist {name} --help lacks {missing}:\n{out}"
    assert "--local_rank" not in out  # the launcher's business, hidden


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launchers_take_the_same_flags_as_their_subcommand(name):
    # One subprocess per launcher: what a user runs, the sys.path insert of the launcher included.
    res = subprocess.run([sys.executable, str(ROOT / "launchers" / LAUNCHERS[name]), "--help"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: launchers/{LAUNCHERS[name]} ")
    assert [f for f in FLAGS[name] if f not in res.stdout] == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_local_rank_is_accepted_before_or_after_the_subcommand(where, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["prepare", "--dry-run", "--config", "configs/demo.yaml"]
    cli.main(["--local_rank=1", *args] if where == "before" else [*args, "--local_rank", "1"])
    assert os.environ["LOCAL_RANK"] == "1"
    assert "would build" in capsys.readouterr().out


def test_local_rank_must_be_an_integer(capsys):
    assert _exit(["--local_rank", "train"]) == 2
    assert "--local_rank expects an integer, got 'train'" in capsys.readouterr().err


def test_a_relative_config_falls_back_to_the_packaged_copy_and_the_cwd_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ or ds_configs/ here
    assert (PACKAGE_DIR / "configs" / "demo.yaml").is_file() and (PACKAGE_DIR / "ds_configs").is_dir()
    cfg = cli.parse_run_args(["--config", "configs/demo.yaml"])
    assert cfg.log.run_dir == "runs/demo"
    # Only in the package: the absolute path of the packaged JSON, which train/deepspeed_utils then reads as is.
    assert cfg.train.ds_config == str(PACKAGE_DIR / "ds_configs" / "zero3_cpu.json")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("log:\n  run_dir: runs/mine\n")
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero3_cpu.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    cfg = cli.parse_run_args(["--config", "configs/demo.yaml"])
    assert cfg.log.run_dir == "runs/mine" and cfg.train.ds_config == "ds_configs/zero3_cpu.json"


def test_a_missing_config_file_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_config("configs/demo_typo.yaml")
    msg = str(e.value)
    assert str(tmp_path / "configs" / "demo_typo.yaml") in msg
    assert str(PACKAGE_DIR / "configs" / "demo_typo.yaml") in msg and "demo.yaml" in msg


def test_a_missing_ds_config_names_both_places_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.ds_config=ds_configs/zero9.json"], known_models=[])
    (msg,) = e.value.problems
    assert str(tmp_path / "ds_configs" / "zero9.json") in msg and str(PACKAGE_DIR / "ds_configs" / "zero9.json") in msg
    assert "zero3_cpu.json" in msg  # what is there
    assert _exit(["train", "train.ds_config=ds_configs/zero9.json"]) == 2
    assert "train.ds_config='ds_configs/zero9.json' not found" in capsys.readouterr().err


def test_prepare_dry_run_writes_nothing_and_says_whether_it_would_rebuild(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = [*TINY_DATA, f"data.prepared_dir={tmp_path / 'p'}"]
    cli.main(["prepare", "--dry-run", *data])
    assert "would build (no manifest.json yet)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
    cli.main(["prepare", "--local", *data])
    capsys.readouterr()
    cli.main(["prepare", "--dry-run", *data])
    assert "up to date: would be reused" in capsys.readouterr().out
    cli.main(["prepare", "--dry-run", *data, "data.seed=3"])
    assert "would rebuild (config fields changed: data.seed)" in capsys.readouterr().out
    cli.main(["prepare", "--dry-run", "--force", *data])
    assert "would rebuild (--force)" in capsys.readouterr().out


def test_prepare_dry_run_names_a_missing_input_file(tmp_path, capsys):
    assert _exit(["prepare", "--dry-run", "data.source=table", f"data.path={tmp_path / 'nope.csv'}"]) == 2
    assert f"data.path='{tmp_path / 'nope.csv'}' does not exist" in capsys.readouterr().err


def test_the_wheel_ships_the_configs_and_the_entry_point():
    # What setuptools packs: the package-data globs must match the files behind ckf_dist/configs and ds_configs.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["ckf-dist"] == "ckf_dist.cli:main"
    globs = meta["tool"]["setuptools"]["package-data"]["ckf_dist"]
    shipped = {p.relative_to(PACKAGE_DIR).as_posix() for g in globs for p in PACKAGE_DIR.glob(g)}
    top = {p.relative_to(ROOT).as_posix() for d in ("configs", "ds_configs") for p in (ROOT / d).iterdir()
           if p.suffix in (".yaml", ".json")}
    assert shipped == top and "ds_configs/zero3_cpu.json" in shipped


def test_ray_job_resolves_outputs_under_the_storage_root_and_refuses_relative_paths_on_a_cluster(tmp_path):
    from ckf_dist.cli import ray_job

    cfg = cli.parse_run_args(["--config", "configs/demo.yaml", "log.run_dir=runs/x", f"data.prepared_dir={tmp_path}"])
    with pytest.raises(SystemExit, match=r"relative output paths \(log.run_dir=runs/x.*--storage"):
        ray_job.storage_root(None, on_cluster=True, cfg=cfg)
    with pytest.raises(SystemExit, match="must be an absolute path"):
        ray_job.storage_root("rel/dir", on_cluster=True, cfg=cfg)
    root = ray_job.storage_root(str(tmp_path / "shared"), on_cluster=True, cfg=cfg)
    d = ray_job.resolve_outputs(cfg, root)
    assert d["log"]["run_dir"] == str(tmp_path / "shared" / "runs" / "x")
    assert d["data"]["prepared_dir"] == str(tmp_path), "an absolute path stays as given"
    assert d["cf"]["embeddings_path"] is None or Path(d["cf"]["embeddings_path"]).is_absolute()
    assert d["log"]["progress"] is False
    assert ray_job.storage_root(None, on_cluster=False, cfg=cfg) == Path.cwd()  # a local Ray: this machine's files
