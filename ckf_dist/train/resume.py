"""Resume that checks: the configuration a checkpoint was written with, compared field by field with this run's.

Each checkpoint's run.json records the resolved configuration and a fingerprint of what training read besides it
(the prepared data's manifest sha256, the CF tables, the base model). On resume (`train.resume`):

- equal, or only SAFE fields changed: resume; the changes are applied and logged (console and
  `<run_dir>/resumes.jsonl`), and recorded in the next checkpoints' run.json.
- any other field or the fingerprint changed: refuse, listing every change (old -> new) and the ways out:
  `train.resume=never` (or another `log.run_dir`) to start fresh, or `train.resume=force`.
- `train.resume=force`: resume anyway with a warning; the new values are used from the checkpoint's step on (the
  learning rates too: the scheduler's base rates are reset to this config's). Changes of SHAPE fields (tensor
  shapes or the data streams the checkpoint holds positions of) cannot work and are refused even then.

SAFE: more (never fewer than done) `train.max_steps` -- the LR schedule's decay is stretched to the new total from
the current step on; `log.*` (`log.run_dir` too: the checkpoint was found in it, so the run directory was moved or
copied); `eval.*`; `train.ckpt_every`, `train.ckpt_keep`,
`train.eval_every`, `train.collective_timeout_s`, `train.prefetch` (exact resume either way),
`train.max_nonfinite_steps`, `train.resume`; paths that only say where the same inputs are (`data.prepared_dir`,
`cf.embeddings_path`, `model.base_model`, `train.ds_config`) -- what they point at is compared by the fingerprint.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

SAFE_FIELDS = ("train.ckpt_every", "train.ckpt_keep", "train.eval_every", "train.collective_timeout_s",
               "train.prefetch", "train.max_nonfinite_steps", "train.resume", "data.prepared_dir",
               "cf.embeddings_path", "model.base_model", "train.ds_config")
SAFE_SECTIONS = ("log.", "eval.")
SHAPE_FIELDS = ("data.tasks",)
SHAPE_SECTIONS = ("multi_lora.", "model.tiny.", "cf.dim")
SHAPE_MODEL = ("model.meta_hidden", "model.pooling")


class ResumeRefused(RuntimeError):
    """The checkpoint was written with another configuration or other inputs (the message lists them)."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_safe(key: str) -> bool:
    return key in SAFE_FIELDS or key.startswith(SAFE_SECTIONS)


def is_shape(key: str) -> bool:
    return key in SHAPE_FIELDS or key in SHAPE_MODEL or key.startswith(SHAPE_SECTIONS)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every field that differs (a key missing on one side reads as '<absent>')."""
    a, b = flatten(old), flatten(new)
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)}


def classify(changes: dict[str, tuple[Any, Any]], steps_done: int) -> tuple[dict, dict, dict]:
    """(safe, unsafe, shape) changes; train.max_steps is safe only when it does not go below the steps done."""
    safe, unsafe, shape = {}, {}, {}
    for k, v in changes.items():
        if k == "train.max_steps":
            (safe if isinstance(v[1], int) and v[1] >= steps_done and v[1] >= v[0] else unsafe)[k] = v
        elif is_safe(k):
            safe[k] = v
        elif is_shape(k):
            shape[k] = v
        else:
            unsafe[k] = v
    return safe, unsafe, shape


def _lines(changes: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  {k}: {o!r} -> {n!r}" for k, (o, n) in changes.items())


def check_resume(ckpt: str, old_cfg: dict[str, Any] | None, new_cfg: dict[str, Any],
                 old_fp: dict[str, Any] | None, new_fp: dict[str, Any], steps_done: int,
                 mode: str) -> tuple[dict, dict]:
    """Decide whether a run may resume from checkpoint `ckpt`.

    Returns:
        (safe changes applied, forced changes) -- both {key: (old, new)}.

    Raises:
        ResumeRefused: unsafe changes without train.resume=force, or shape changes (even with force), or a
            checkpoint without a recorded configuration.
    """
    fresh = ("start fresh with train.resume=never (the existing checkpoints are then moved to "
             "checkpoints.replaced-<time>/) or another log.run_dir")
    if old_cfg is None:
        raise ResumeRefused(f"{ckpt} records no configuration (written by an older version); cannot check that it "
                            f"belongs to this run: {fresh}")
    changes = config_changes(old_cfg, new_cfg)
    fp_changes = {f"inputs.{k}": (old_fp.get(k) if old_fp else None, v) for k, v in new_fp.items()
                  if (old_fp or {}).get(k) != v}
    safe, unsafe, shape = classify(changes, steps_done)
    if shape:
        raise ResumeRefused(f"cannot resume from {ckpt}: the configuration changed in field(s) that fix the "
                            f"shapes of the saved state (even train.resume=force cannot load it):\n{_lines(shape)}"
                            + (f"\nother changes:\n{_lines({**unsafe, **fp_changes})}" if unsafe or fp_changes
                               else "") + f"\n{fresh}")
    refused = {**unsafe, **fp_changes}
    if refused and mode != "force":
        raise ResumeRefused(f"cannot resume from {ckpt}: it was written with another configuration or other "
                            f"inputs:\n{_lines(refused)}\n{fresh}; or resume anyway with train.resume=force "
                            f"(these new values then apply from step {steps_done} on)"
                            + (f"\n(safe changes that would be applied: {', '.join(safe)})" if safe else ""))
    return safe, refused


def file_fingerprint(folder: str | Path, hash_below: int = 1 << 20) -> str:
    """sha256 over a model folder: names and sizes of every file, and the bytes of the small ones (configs,
    tokenizer); weights are identified by name and size only (hashing gigabytes on every resume is too slow)."""
    h = hashlib.sha256()
    root = Path(folder)
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root)}\0{size}\0".encode())
        if size <= hash_below:
            h.update(p.read_bytes())
    return h.hexdigest()


def tensor_fingerprint(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def preflight(cfg) -> None:
    """The configuration part of the resume check, before any stage runs (no collectives, no hashing; every rank
    may call it): refuses early -- before config.yaml is rewritten and data or CF tables are rebuilt for a
    configuration that finetune would refuse. finetune still makes the full check (intact checkpoint, inputs).

    Raises:
        ResumeRefused: as `check_resume`, against the newest checkpoint with a manifest.
    """
    from ckf_dist.train.checkpoint import complete_checkpoints, read_run_info

    if cfg.train.resume == "never" or not (found := complete_checkpoints(cfg.log.run_dir)):
        return
    info = read_run_info(found[-1])
    check_resume(str(found[-1]), info.get("config"), cfg.to_dict(), None, {}, int(info.get("step", -1)),
                 cfg.train.resume)
