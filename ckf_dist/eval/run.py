"""Evaluate a finished run directory: rebuild the CKF model (KFM fusion + MTM Multi-LoRA) from its exported
adapters and the frozen CF tables (CKEM), evaluate it and the configured baselines on the same test samples on
every rank, and write the report on rank 0. `launchers/evaluate.py` and `ckf-dist evaluate` call `evaluate_run`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
import torch

from ckf_dist.config import RunConfig


def run_paths(cfg: RunConfig) -> dict[str, Path]:
    """Where a finished run keeps what evaluation needs: base LLM folder, exported adapters, CF tables."""
    run_dir = Path(cfg.log.run_dir)
    return {
        "run_dir": run_dir,
        "base_model": Path(cfg.model.base_model) if cfg.model.base_model else run_dir / "base_model",
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
    from ckf_dist.eval.report import format_table, write_report
    from ckf_dist.model.export import load_ckf_model
    from ckf_dist.model.llm import load_tokenizer
    from ckf_dist.train.deepspeed_utils import init_distributed
    from ckf_dist.train.loop import evaluate_all

    rank, world = init_distributed(cfg)
    # Tables trained on other data would pair embeddings with the wrong users: refused, both checksums named.
    cf = load_cf_embeddings(paths["cf"], expected_manifest_sha=manifest_sha256(paths["prepared"]))
    tokenizer = load_tokenizer(paths["base_model"])
    model = load_ckf_model(paths["base_model"], paths["adapters"], cf.user, cf.item, cfg.model, cfg.multi_lora)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    model.to(device)
    # Same model names, samples, caps and baselines as the evaluation at the end of training.
    results = evaluate_all(cfg, model, tokenizer, cf, rank, world)
    results = {m: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
               for m, r in results.items()}
    if rank == 0 and write:
        written = write_report(paths["run_dir"], results, tb_dir=str(paths["run_dir"] / "tb"))
        print(format_table(results))
        print(f"[ckf] report: {', '.join(str(p) for p in written.values())}")
    return results

