"""Evaluation stage: CKF and its baselines (CF alone, CKF on text prompts) on the same test samples, on every rank
(`evaluate_all`, also the end of the main job); and `evaluate_run`, which rebuilds the CKF model (KFM fusion + MTM
Multi-LoRA) of a finished run directory from its exported adapters and the frozen CF tables (CKEM) and evaluates it
(`launchers/evaluate.py`, `ckf-dist evaluate`). Reports are written on rank 0.

data.source='alpaca' (finished text prompts, no users, items or interactions) has no CF tables: the model is the
text-only LLM (MTM without KFM) and gets `placeholder_cf` instead; its one row is "read" by no prompt.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ckf_dist.config import RunConfig
from ckf_dist.model.hub import resolve_base_model


def has_cf(cfg: RunConfig) -> bool:
    """Whether the data has interactions for a CF model (every source but 'alpaca': finished text prompts)."""
    return cfg.data.source != "alpaca"


def placeholder_cf(cfg: RunConfig):
    """The CF tables of a run without CF data (data.source='alpaca'): one zero user and one zero item of cf.dim.

    CKFModel always carries its fusion modules (MetaNet, Proj_U / Proj_V need a (U, d) / (V, d) table, U, V >= 1),
    but no alpaca prompt has a CF slot (slot tokens in the records are neutralised when prepared), so these rows
    never reach the LLM: the fusion output is discarded and its parameters only get the zero anchor gradient. The
    table is rebuilt identically from the config wherever the model is (training, `evaluate_run`), so the exported
    fusion weights (d = cf.dim) load back; it is never written to disk and never scored (no CF baseline).
    """
    from ckf_dist.cf.export import CFEmbeddings

    d = cfg.cf.dim
    return CFEmbeddings(torch.zeros(1, d), torch.zeros(1, d),
                        {"d": d, "model": "none (data.source=alpaca: no interactions)", "num_users": 1, "num_items": 1})


def run_paths(cfg: RunConfig) -> dict[str, Path]:
    """Where a finished run keeps what evaluation needs: base LLM folder, exported adapters, CF tables."""
    run_dir = Path(cfg.log.run_dir)
    return {
        "run_dir": run_dir,
        "base_model": (resolve_base_model(cfg.model.base_model, convert=False) if cfg.model.base_model
                       else run_dir / "base_model"),
        "adapters": run_dir / "adapters",
        "cf": cfg.cf_embeddings_path,
        "prepared": Path(cfg.data.prepared_dir),
    }


def check_run_dir(cfg: RunConfig) -> dict[str, Path]:
    """The run paths, after checking that each exists.

    Raises:
        FileNotFoundError: listing every missing piece and the config key or step that produces it.
    """
    paths = run_paths(cfg)
    hints = {
        "base_model": "set model.base_model, or train first (the tiny model is built into <run_dir>/base_model)",
        "adapters": "train first (training exports <run_dir>/adapters), or point log.run_dir at a finished run",
        "cf": "train the CF model (ckf-dist train-cf) or set cf.embeddings_path",
        "prepared": "prepare the data (ckf-dist prepare) or set data.prepared_dir",
    }
    if not has_cf(cfg):
        del hints["cf"]  # no CF tables to load: placeholder_cf
    missing = [f"{name}: {paths[name]} not found; {hint}" for name, hint in hints.items() if not paths[name].exists()]
    if missing:
        raise FileNotFoundError("cannot evaluate this run:\n  " + "\n  ".join(missing))
    return paths


def evaluate_run(cfg: RunConfig, write: bool = True) -> dict[str, dict[str, float | None]]:
    """Evaluate CKF and its baselines for the run of `cfg`, on every rank of the current launch.

    Every rank loads the whole model (data-parallel evaluation: each scores its share of the samples, the
    results are gathered); the report (metrics.json, report.md, plots, TensorBoard) is written on rank 0.

    Returns:
        model name -> metrics (identical on every rank).
    """
    paths = check_run_dir(cfg)  # before the heavy imports: a wrong path fails in a second, naming the fix

    from ckf_dist.cf.export import load_cf_embeddings
    from ckf_dist.data.schema import manifest_sha256
    from ckf_dist.model.export import load_ckf_model
    from ckf_dist.model.llm import load_tokenizer
    from ckf_dist.train.deepspeed_utils import init_distributed

    rank, world = init_distributed(cfg)
    # Tables trained on other data would pair embeddings with the wrong users: refused, both checksums named.
    cf = (load_cf_embeddings(paths["cf"], expected_manifest_sha=manifest_sha256(paths["prepared"])) if has_cf(cfg)
          else placeholder_cf(cfg))
    tokenizer = load_tokenizer(paths["base_model"])
    model = load_ckf_model(paths["base_model"], paths["adapters"], cf.user, cf.item, cfg.model, cfg.multi_lora)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else "cpu"
    model.to(device)
    # Same model names, samples, caps and baselines as the evaluation at the end of training.
    results = evaluate_all(cfg, model, tokenizer, cf, rank, world)
    if rank == 0 and write:
        report(paths["run_dir"], results)
    return results


def report(run_dir: Path, results: dict[str, dict[str, Any]], step: int = 0) -> None:
    """Write the report files (metrics.json, report.md, plots, TensorBoard scalars under tb/report/<model>/ at
    `step`) and print the table and where the files went."""
    from ckf_dist.eval.report import format_table, write_report

    written = write_report(run_dir, results, tb_dir=str(run_dir / "tb"), step=step)
    print(format_table(results))
    print(f"[ckf] report: {', '.join(str(p) for p in written.values())}")


def run_eval(cfg: RunConfig, model, tokenizer, split: str, variant: str, rank: int, world: int,
             limit: int = 0) -> dict[str, Any]:
    """Metrics of `model` on `split` with `variant` prompts ('cf' or 'text'), on `eval_samples(cfg, split, limit)`."""
    from ckf_dist.eval.evaluate import evaluate_model

    samples = eval_samples(cfg, split, limit)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics = evaluate_model(model, tokenizer, samples, cfg, variant=variant, rank=rank, world=world)
    model.train(was_training)
    return metrics


def eval_samples(cfg: RunConfig, split: str, limit: int = 0) -> list:
    """The samples every model is evaluated on: all of `split` for data.tasks, or with `limit` > 0 the seeded user
    subset of `cap_per_task` (seed data.seed), so that CKF and each baseline see exactly the same samples.

    data.source='alpaca' has no users (every record is stored as user 0): there each record is its own unit, so the
    cap is a seeded random subset of `limit` records rather than "user 0 whole", which would be every record."""
    from ckf_dist.data.prompts import load_samples

    samples = load_samples(cfg.data.prepared_dir, split, cfg.data.tasks)
    per_task = cfg.eval.max_samples_by_task
    if not limit and not any(per_task.values()):
        return samples
    return cap_per_task(samples, limit, seed=cfg.data.seed, by_user=has_cf(cfg), per_task=per_task)


def _user_order(seed: int, uid: int | str) -> bytes:
    """A user's place in the seeded random order: a hash of (seed, uid), so that it does not depend on which other
    users or tasks are present, nor on the Python process (no `hash()`, no global RNG)."""
    return hashlib.blake2b(f"{seed}/{uid}".encode(), digest_size=8).digest()


def cap_per_task(samples: list, limit: int, seed: int, by_user: bool = True,
                 per_task: Mapping[str, int] | None = None) -> list:
    """A seeded random sample of users for each task: whole users, at most `limit` samples per task.

    For each task, users are visited in a random order fixed by `seed` (the same on every rank and every run, and the
    same order for every task, so a chosen user tends to be chosen for all of them) and each one's samples of that
    task are taken whole while the total stays <= `limit`; the first user that does not fit ends the task (skipping
    it for smaller users would favour light users), so a task may get up to one user's samples fewer than `limit`.
    Only when the first user alone has more than `limit` samples is
    the limit exceeded: that user is taken whole rather than leaving the task empty or splitting a user, so per-user
    metrics (UAUC) always see whole users. With `by_user=False` every sample is its own unit (keyed by its sample
    key): a seeded random `limit` samples per task. `per_task` replaces `limit` for the tasks it names (0: all).

    Returns:
        the chosen samples, sorted by key like the input of `load_samples`.
    """
    by_task: dict[str, dict[int | str, list]] = {}
    for s in samples:
        unit = int(s["uid"]) if by_user else str(s["key"])
        by_task.setdefault(s["task"], {}).setdefault(unit, []).append(s)
    out = []
    for task, users in by_task.items():
        cap = (per_task or {}).get(task, limit)
        if not cap:
            out += [x for u in users.values() for x in u]
            continue
        taken: list = []
        for uid in sorted(users, key=lambda u: (_user_order(seed, u), u)):
            if taken and len(taken) + len(users[uid]) > cap:
                break
            taken += users[uid]
        out += taken
    return sorted(out, key=lambda s: s["key"])


def trained_variant(cfg: RunConfig) -> str:
    """The prompt variant the model is trained towards: 'text' for train.prompts='text', else 'cf'."""
    return "text" if cfg.train.prompts == "text" else "cf"


def evaluate_all(cfg: RunConfig, model, tokenizer, cf, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """CKF (CF-slot prompts) and the configured baselines on the same test samples; NaN metrics become None.

    With train.prompts='text' the trained model is the text-only LLM, reported as "LLM (text-only)" (no CKF row).
    Without CF data (data.source='alpaca') there are no users either: the per-user metrics (UAUC) and the warm /
    cold groups (every record would count as one warm user) are left out, so the report shows overall metrics only.
    """
    from ckf_dist.eval.baselines import evaluate_cf_baseline

    limit = cfg.eval.max_samples_per_task
    main_variant = trained_variant(cfg)
    name = "LLM (text-only)" if main_variant == "text" else "CKF"
    results = {name: run_eval(cfg, model, tokenizer, cfg.eval.split, main_variant, rank, world, limit)}
    if "text" in cfg.eval.baselines and main_variant == "cf":
        results["CKF, text prompts"] = run_eval(cfg, model, tokenizer, cfg.eval.split, "text", rank, world, limit)
    if "cf" in cfg.eval.baselines:
        results[f"CF ({cfg.cf.model})"] = evaluate_cf_baseline(cf, eval_samples(cfg, cfg.eval.split, limit), cfg)
    if not has_cf(cfg):
        results = {k: {m: v for m, v in r.items() if not (m.startswith("uauc_") or m.endswith(("/warm", "/cold")))}
                   for k, r in results.items()}
    return {k: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()}
            for k, r in results.items()}
