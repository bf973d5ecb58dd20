"""`ckf-dist`: the front door. One subcommand per stage; each lives in ckf_dist/cli/<name>.py, and the files in
launchers/ are thin wrappers over the same functions (so the flags are the same by construction).

Also the shared argument parsing (`run_parser`, `config_from_args`, `parse_run_args`) of every run subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ckf_dist.config import ConfigError, RunConfig, find_file, load_config

PROG = "ckf-dist"

COMMANDS = {
    "prepare": "ckf_dist.cli.prepare",
    "train": "ckf_dist.cli.train",
    "train-cf": "ckf_dist.cli.train_cf",
    "ray-job": "ckf_dist.cli.ray_job",
    "evaluate": "ckf_dist.cli.evaluate",
    "fetch-model": "ckf_dist.cli.fetch_model",
}
"""Subcommand -> module with `main(argv, prog)`; the first line of the module docstring is its one-line summary."""


def listing() -> str:
    """The top-level help: every subcommand with its one-line summary."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary(name)}" for name in COMMANDS]
    return "\n".join([
        f"usage: {PROG} [--local_rank N] <command> [--help] [args ...]",
        "",
        "Distributed CKF training (CF embeddings fused into an LLM, Multi-LoRA multi-task recommendation).",
        "",
        "commands:",
        *lines,
        "",
        f"`{PROG} <command> --help` lists the command's flags. Without a command this listing goes to stderr and the",
        "exit status is 2; with -h / --help it goes to stdout, status 0. The --local_rank=N that the deepspeed",
        "launcher injects may come anywhere (it sets LOCAL_RANK).",
    ])


def summary(name: str) -> str:
    doc = importlib.import_module(COMMANDS[name]).__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def take_local_rank(argv: list[str]) -> list[str]:
    """Remove the launcher's `--local_rank=N` / `--local-rank N` wherever it is and export it as LOCAL_RANK.

    The deepspeed launcher puts it first, before the subcommand (`ckf-dist --local_rank=0 train ...`), where no
    subcommand parser would see it.
    """
    out: list[str] = []
    it = iter(argv)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag not in ("--local_rank", "--local-rank"):
            out.append(a)
            continue
        if not eq:
            value = next(it, "")
        if not value.isdigit():
            _fail(f"{flag} expects an integer, got {value!r}")
        os.environ.setdefault("LOCAL_RANK", value)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    argv = take_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv:
        print(listing(), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help"):
        print(listing())
        return
    name = argv[0]
    if name not in COMMANDS:
        what = f"a command must come first, got the option {name!r}" if name.startswith("-") else \
            f"unknown command {name!r}"
        _fail(f"{what}; expected one of {', '.join(COMMANDS)}\n\n{listing()}")
    importlib.import_module(COMMANDS[name]).main(argv[1:], prog=f"{PROG} {name}")


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_parser(prog: str | None, description: str | None) -> argparse.ArgumentParser:
    """--config FILE plus dotted overrides (and the hidden --local_rank): what every run subcommand takes."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", metavar="FILE",
                   help="experiment YAML, e.g. configs/demo.yaml: looked up in the working directory, then in the "
                        "installed package; the built-in defaults apply when omitted")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. train.lr=2e-4 data.tasks=[ctr,rating]")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Load and validate the config of parsed `run_parser` arguments; exit 2 with every problem listed.

    The paths a run needs (model.base_model unless a packaged name, train.ds_config) must exist. A relative
    train.ds_config found only in the installed package is replaced by that file's absolute path, which every later
    reader of the config (the ZeRO JSON loader, Ray workers, the run's config.yaml) then uses as is.
    """
    from ckf_dist.model.hub import PACKAGED

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        cfg = load_config(args.config, args.overrides, known_models=PACKAGED)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    ds = Path(cfg.train.ds_config)
    if not ds.is_file() and (found := find_file(ds)) is not None:
        cfg.train.ds_config = str(found)
    return cfg


def parse_run_args(argv: Sequence[str] | None = None, prog: str | None = None,
                   description: str = "") -> RunConfig:
    """`run_parser` + `config_from_args` in one call (launchers/ray_job.py, tests)."""
    return config_from_args(run_parser(prog, description).parse_intermixed_args(argv))
