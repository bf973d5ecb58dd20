"""Atomic, verified, pickle-free resumable checkpoints: DeepSpeed ZeRO state + per-rank data position, sampler and
RNG states + the run's resolved configuration.

Layout (format 2)::

    <run_dir>/checkpoints/step-000050/
        state/                  DeepSpeed's engine.save_checkpoint (weights, optimizer, scheduler), torch.save files
        rank-<r>.json           this project's state of rank r: JSON, tensors referenced by key ...
        rank-<r>.safetensors    ... and stored here (mixture statistics, draw weights, torch RNG state)
        run.json                rank 0: step, world size, resolved config, data/model fingerprint, resume history
        COMPLETE                the step (kept for tools and tests that look for it)
        MANIFEST.json           sha256 + size of every file above; written LAST (tmp + rename)

A checkpoint is written into `.tmp-step-000050` and renamed only after every rank has finished writing and the
manifest is in place, so a crash mid-save never leaves a directory that a resume would pick; the newest K complete
ones are kept (train.resume=never first moves existing ones to checkpoints.replaced-<time>/). Directories are
created 0700 and files 0600 (private: run directories often live on shared storage); DeepSpeed's own files are
chmod-ed after it wrote them. Rank 0 hashes every file (the run directory is shared by all ranks, as the rename
already requires): seconds for LoRA-sized states, longer when DeepSpeed's model_states hold frozen base-weight
fragments of a large model.

Loading never runs pickle code from this project's files: the JSON is parsed with `json` and the tensors with
`safetensors` (no code paths at all). A checkpoint of the old format (`rank-<r>.pt`, a pickle) is refused, not
opened. Before anything is loaded, rank 0 checks the newest checkpoint's files against its manifest (missing,
wrong size, wrong sha256: each named); a damaged one is reported by name and the previous complete one is used
(with a warning); if none is valid the error lists every checkpoint and what is wrong with it.

What still goes through pickle: DeepSpeed 0.19.8 stores its state (`state/*_model_states.pt`,
`state/*_optim_states.pt`) with torch.save, and its TorchCheckpointEngine.load calls
`torch.load(..., weights_only=False)`. `use_safe_deepspeed_loader` replaces the engine's checkpoint engine with one
that loads the same files with `torch.load(weights_only=True)` and an allowlist of exactly the two non-tensor
classes those files hold (deepspeed.runtime.fp16.loss_scaler.LossScaler and
deepspeed.runtime.zero.config.ZeroStageEnum): torch's restricted unpickler builds only tensors, containers,
primitive types and these two classes, and refuses any other global (os.system, builtins.eval, ...). What remains
trusted: the two allowlisted DeepSpeed classes are instantiated (their __dict__ / __setstate__ from the file); the
files' content (the numbers) is only as trustworthy as whoever can write the run directory -- the manifest detects
damage, not a deliberate rewrite of file and manifest together. DeepSpeed's other loaders (universal checkpoints,
zero_to_fp32.py copied into each checkpoint, ds_to_universal) still use weights_only=False; this project never
calls them.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ckf_dist import comm
from ckf_dist.data.schema import file_sha256

FORMAT = 2
MANIFEST = "MANIFEST.json"
RUN_FILE = "run.json"
DIR_MODE, FILE_MODE = 0o700, 0o600
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (damaged, incomplete, old pickle format, written for another job shape)."""


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# --------------------------------------------------------------------------------------------------
# RNG state as plain data
# --------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Plain state <-> JSON + tensors (no pickle)
# --------------------------------------------------------------------------------------------------


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested state into a JSON-able tree and {key: tensor}.

    Takes dicts with str keys, lists, tuples, str, int, float (also non-finite), bool, None, torch tensors and numpy
    arrays; anything else is a TypeError (so a new kind of state cannot silently fall back to pickle).
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if bad := [k for k in x if not isinstance(k, str)]:
                raise TypeError(f"checkpoint state {path}: keys must be str, got {bad[:3]}")
            if any(k.startswith("__") and k.endswith("__") for k in x):
                raise TypeError(f"checkpoint state {path}: dunder keys are reserved")
            return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
        raise TypeError(f"checkpoint state {path}: cannot store {type(x).__name__} without pickle")

    return enc(obj, "state"), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return np.asarray(x["__ndarray__"], dtype=np.dtype(x["dtype"]))
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            if "__float__" in x:
                return float(x["__float__"])
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(tree)


def _private_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, FILE_MODE)


def write_rank_state(folder: Path, rank: int, state: dict[str, Any]) -> None:
    from safetensors.torch import save

    tree, tensors = encode_state(state)
    _private_write(folder / f"rank-{rank}.safetensors", save(tensors))
    _private_write(folder / f"rank-{rank}.json", json.dumps({"format": FORMAT, "state": tree}).encode())


def read_rank_state(folder: Path, rank: int) -> dict[str, Any]:
    """This rank's project state, from JSON + safetensors only.

    Raises:
        CheckpointError: missing, unreadable or not of this format (e.g. an old pickle `rank-<r>.pt`).
    """
    from safetensors.torch import load

    js, st = folder / f"rank-{rank}.json", folder / f"rank-{rank}.safetensors"
    for p in (js, st):
        if not p.is_file():
            raise CheckpointError(f"{p} is missing")
    try:
        doc = json.loads(js.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{js} is not valid JSON ({e}); refusing it") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{js}: not a format-{FORMAT} state file")
    try:
        tensors = load(st.read_bytes())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise CheckpointError(f"{st} is not a valid safetensors file ({e}); refusing it") from None
    return decode_state(doc["state"], tensors)


# --------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int, world: int) -> None:
    """sha256 and size of every file in `folder`; written last (tmp + rename), it marks the checkpoint complete."""
    files = {str(p.relative_to(folder)): {"sha256": file_sha256(p), "size": p.stat().st_size} for p in _files(folder)}
    doc = {"format": FORMAT, "step": step, "world_size": world, "files": files}
    tmp = folder / f".{MANIFEST}.tmp"
    _private_write(tmp, json.dumps(doc, indent=1).encode())
    tmp.rename(folder / MANIFEST)


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems of one checkpoint directory, each naming the file ([] = complete and intact)."""
    man = folder / MANIFEST
    if not man.is_file():
        if any(folder.glob("rank-*.pt")):
            old = f"{folder.name}: old checkpoint format (pickled rank-*.pt, no {MANIFEST}); it is not loaded "
            return [old + "because unpickling can run code"]
        return [f"{folder.name}: no {MANIFEST} (incomplete checkpoint)"]
    try:
        doc = json.loads(man.read_text())
        files = doc["files"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        return [f"{folder.name}/{MANIFEST} is unreadable ({e})"]
    problems = []
    for rel, want in files.items():
        p = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{folder.name}/{MANIFEST} lists a path outside the checkpoint: {rel!r}")
        elif not p.is_file():
            problems.append(f"{folder.name}/{rel} is missing")
        elif p.stat().st_size != want["size"]:
            problems.append(f"{folder.name}/{rel} has {p.stat().st_size} bytes, the manifest says {want['size']} "
                            f"(truncated or overwritten)")
        elif file_sha256(p) != want["sha256"]:
            problems.append(f"{folder.name}/{rel}: sha256 differs from the manifest (damaged)")
    return problems


def manifest_world_size(folder: Path) -> int:
    return int(json.loads((folder / MANIFEST).read_text())["world_size"])


# --------------------------------------------------------------------------------------------------
# DeepSpeed's files: loaded with weights_only=True
# --------------------------------------------------------------------------------------------------


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


def safe_torch_load(path: str | Path, map_location=None) -> Any:
    """torch.load with weights_only=True and the allowlist of DeepSpeed's two checkpoint classes."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError...
        raise CheckpointError(f"{path}: refused by the restricted loader (weights_only=True): {e}") from None


def use_safe_deepspeed_loader(engine) -> None:
    """Make engine.load_checkpoint read DeepSpeed's files with weights_only=True (see the module docstring)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine and not getattr(current, "_ckf_safe", False):
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(current).__name__} is not the torch one this "
                              f"project knows how to load safely; remove checkpoint_engine settings from the "
                              f"ds_config")

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        _ckf_safe = True

        def load(self, path: str, map_location=None):
            return safe_torch_load(path, map_location=map_location)

    safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    engine.checkpoint_engine = safe


# --------------------------------------------------------------------------------------------------
# Save / find / load
# --------------------------------------------------------------------------------------------------


def _make_private(folder: Path) -> None:
    for p in [folder, *folder.rglob("*")]:
        if p.is_dir():
            os.chmod(p, DIR_MODE)
        elif p.is_file():
            os.chmod(p, FILE_MODE)


def save_checkpoint(engine, step: int, run_dir: str | Path, rank_state: dict[str, Any], keep: int,
                    run_info: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. `rank_state` is this rank's data position/sampler (RNG is added here);
    `run_info` (rank 0's) goes to run.json.

    Returns:
        The final checkpoint directory.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    root = ckpt_root(run_dir)
    name = f"step-{step:06d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(root, DIR_MODE)
        tmp.mkdir(mode=DIR_MODE)
    comm.barrier()
    engine.save_checkpoint(str(tmp), tag="state", save_latest=False)
    write_rank_state(tmp, rank, {**rank_state, "rng": rng_state(), "step": step})
    comm.barrier()
    if rank == 0:
        info = {"format": FORMAT, "step": step, "world_size": world, **(run_info or {})}
        _private_write(tmp / RUN_FILE, json.dumps(info, indent=1, default=str).encode())
        _private_write(tmp / "COMPLETE", f"{step}\n".encode())
        _make_private(tmp)
        write_manifest(tmp, step, world)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories with a manifest (complete), oldest first. Not verified: see `choose_checkpoint`."""
    return [p for p in step_dirs(run_dir) if (p / MANIFEST).is_file()]


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every step-* directory (complete or not, any format), oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def choose_checkpoint(run_dir: str | Path, world: int, warn=None) -> Path | None:
    """The newest intact checkpoint (rank 0 only: reads and hashes files). None when there is no checkpoint.

    Damaged or incomplete newer ones are skipped with a warning naming their problems.

    Raises:
        CheckpointError: checkpoints exist but none is intact (every one listed with its problems), or the intact
            one was written by another number of ranks.
    """
    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    candidates = step_dirs(run_dir)
    if not candidates:
        return None
    report = []
    for folder in reversed(candidates):
        problems = verify_checkpoint(folder)
        if not problems:
            written = manifest_world_size(folder)
            if written != world:
                raise CheckpointError(f"{folder} was written by {written} rank(s), this run has {world}: resume with "
                                      f"{written} rank(s), or start fresh (train.resume=never or another "
                                      f"log.run_dir)")
            if report:
                warn(f"[ckf] WARNING: skipped damaged checkpoint(s), resuming from the previous complete one "
                     f"{folder.name}:\n  " + "\n  ".join(report))
            return folder
        report += problems
    raise CheckpointError(f"no intact checkpoint in {ckpt_root(run_dir)}:\n  " + "\n  ".join(report) +
                          "\nstart fresh with train.resume=never (or another log.run_dir), or restore the files")


def set_aside_checkpoints(run_dir: str | Path) -> Path | None:
    """train.resume=never with checkpoints present: move them to checkpoints.replaced-<UTC time>/ (rank 0), so the
    new run's checkpoints are never mixed with (or pruned in favour of) the old run's and a later resume finds only
    its own. Returns the new place, or None when there was nothing to move."""
    import time

    root = ckpt_root(run_dir)
    if not step_dirs(run_dir):
        return None
    dest = root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 0
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('+')[0]}+{n}")
    root.rename(dest)
    return dest


def read_run_info(folder: Path) -> dict[str, Any]:
    p = folder / RUN_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def load_checkpoint(engine, path: Path) -> dict[str, Any]:
    """Restore engine (weights, optimizer, scheduler) and RNG; return this rank's saved state.

    `path` must have been chosen (verified) by `choose_checkpoint`.

    Raises:
        CheckpointError: this rank's files are missing or not of this format.
        RuntimeError: DeepSpeed could not load its state.
    """
    rank = dist.get_rank()
    state = read_rank_state(path, rank)  # before DeepSpeed: a bad state file fails fast
    use_safe_deepspeed_loader(engine)
    load_path, _ = engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / 'state'}")
    set_rng_state(state["rng"])
    return state
