"""Atomic, resumable checkpoints: DeepSpeed ZeRO state + per-rank data position, sampler and RNG states.

Layout: <run_dir>/checkpoints/step-000050/{state/ (DeepSpeed), rank-0.pt, rank-1.pt, COMPLETE}
A checkpoint is written into `.tmp-step-000050` and renamed only after every rank has finished writing, so a
crash mid-save never leaves a directory that `resume=auto` would pick; the newest K complete ones are kept.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, step: int, run_dir: str | Path, rank_state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. `rank_state` is this rank's data position/sampler (RNG is added here).

    Returns:
        The final checkpoint directory.
    """
    rank = dist.get_rank()
    root = ckpt_root(run_dir)
    name = f"step-{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag="state", save_latest=False)
    torch.save({**rank_state, "rng": rng_state(), "step": step}, tmp / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "COMPLETE").write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and RNG; return this rank's saved state.

    Raises:
        FileNotFoundError: the rank file is missing (e.g. resuming with a different number of ranks).
    """
    rank = dist.get_rank()
    rank_file = path / f"rank-{rank}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(f"{rank_file} missing: the checkpoint was written by fewer ranks than this run has "
                                f"({dist.get_world_size()}); resume with the same world size")
    load_path, _ = engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / 'state'}")
    state = torch.load(rank_file, weights_only=False)
    set_rng_state(state["rng"])
    return state
