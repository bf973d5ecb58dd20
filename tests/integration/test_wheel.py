"""A wheel built from the source tree works without it: installed into a fresh venv, `ckf-dist --help` and a short
`ckf-dist train` run from a folder outside the tree, on the configs and DeepSpeed JSONs shipped in the package.

The fresh venv gets only the wheel; the dependencies (torch, deepspeed, ...) come from this interpreter's
site-packages through a .pth line appended after the venv's own, which adds the folder without running its .pth
files, so the source tree's editable install is not visible."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from ckf_dist.testing.jobs import ROOT, TINY

pytestmark = pytest.mark.slow

SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__", ".ruff_cache")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _build_env() -> dict[str, str]:
    """This environment without PYTHONPATH and PIP_*: a PYTHONPATH holding the source tree (data/preprocess.py puts
    it there for Ray workers, in the test process too) makes the venv's pip see ckf-dist as installed already and
    skip the wheel."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in the tree would leave build/ there
    shutil.copytree(ROOT, src, symlinks=True, ignore=SKIP)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w",
          str(tmp / "dist")], cwd=tmp, env=_build_env())
    wheel = next((tmp / "dist").glob("ckf_dist-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=_build_env())
    _run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)], cwd=tmp, env=_build_env())
    venv_site = next(venv.glob("lib/python*/site-packages"))
    (venv_site / "zz_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    outside = tmp / "outside"
    outside.mkdir()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return venv, outside, env


def test_the_installed_package_is_not_the_source_tree(installed):
    venv, outside, env = installed
    res = _run([str(venv / "bin" / "python"), "-c", "import ckf_dist; print(ckf_dist.__file__)"], outside, env)
    assert res.stdout.strip().startswith(str(venv)), res.stdout


def test_help_lists_every_subcommand(installed):
    venv, outside, env = installed
    res = _run([str(venv / "bin" / "ckf-dist"), "--help"], outside, env)
    for cmd in ("train", "prepare", "train-cf", "evaluate", "fetch-model"):
        assert f"  {cmd} " in res.stdout, res.stdout


def test_a_short_train_runs_from_another_folder(installed):
    venv, outside, env = installed
    run = outside / "run"
    res = _run([str(venv / "bin" / "ckf-dist"), "train", "--config", "configs/demo.yaml", f"log.run_dir={run}",
                f"data.prepared_dir={outside / 'data'}", *TINY, "train.max_steps=2", "cf.epochs=1",
                "eval.max_samples_per_task=2"], outside, env, timeout=600)
    assert (run / "metrics.json").is_file() and (run / "report.md").is_file(), res.stdout[-3000:]
    assert not (outside / "configs").exists()  # the config and its ds_config came from the package
