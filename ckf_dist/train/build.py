"""Assemble what training needs: the base LLM folder (tiny one built on rank 0 if none is configured), the
tokenizer, and the CKF model around a ZeRO-3-sharded LLM. The only place that touches HfDeepSpeedConfig.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ckf_dist.config import RunConfig
from ckf_dist.tasks import TASKS


def ensure_base_model(cfg: RunConfig, rank: int) -> Path:
    """The folder the LLM loads from: model.base_model, or a tiny Llama + tokenizer built once on rank 0
    from the prepared data's own text into <run_dir>/base_model."""
    if cfg.model.base_model is not None:
        path = Path(cfg.model.base_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.base_model={path}: no config.json there; point it at a Hugging Face "
                                    f"model folder (e.g. a downloaded Llama-2-7b-hf)")
        return path
    out = Path(cfg.log.run_dir) / "base_model"
    if rank == 0 and not (out / "config.json").is_file():
        from ckf_dist.data.prompts import corpus_texts
        from ckf_dist.model.llm import build_tiny_llm

        tmp = out.with_name(".tmp-base_model")
        build_tiny_llm(cfg.model.tiny, corpus_texts(cfg.data.prepared_dir), tmp, seed=cfg.train.seed)
        tmp.rename(out)  # atomic: a crash mid-build never leaves a folder that looks complete
    if dist.is_initialized():
        dist.barrier()
    return out


def hidden_size_of(base_dir: Path) -> int:
    conf = json.loads((base_dir / "config.json").read_text())
    return int(conf.get("hidden_size") or conf.get("n_embd") or conf["d_model"])


def build_model(cfg: RunConfig, base_dir: Path, user_emb, item_emb, ds_config: dict[str, Any] | None):
    """Tokenizer + CKFModel. Under ZeRO-3 the LLM is partitioned while it loads, so a model larger than one
    device's memory loads; the small new modules (LoRA, MetaNet, projectors) are partitioned by
    deepspeed.initialize. Returns (model, tokenizer, keepalive); keep `keepalive` referenced until
    deepspeed.initialize has run (HfDeepSpeedConfig works through a weak global reference).
    """
    from ckf_dist.model.ckf import build_ckf_model
    from ckf_dist.model.llm import load_llm, load_tokenizer

    keepalive = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keepalive = HfDeepSpeedConfig(ds_config)
    tokenizer = load_tokenizer(base_dir)
    llm = load_llm(base_dir, cfg.model.dtype, tokenizer)
    if cfg.model.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Every task gets its adapter whatever data.tasks holds: tensor task ids are global (TASK_ID).
    model = build_ckf_model(llm, tokenizer, user_emb, item_emb, cfg.model, cfg.multi_lora, tasks=TASKS)
    return model, tokenizer, keepalive
