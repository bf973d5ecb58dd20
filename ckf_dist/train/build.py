"""Assemble what fine-tuning needs: the tokenizer and the CKF model around a ZeRO-3-sharded LLM loaded from the base
model folder (ckf_dist/pipeline.py provides the folder). The only place that touches HfDeepSpeedConfig.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckf_dist.config import RunConfig
from ckf_dist.tasks import TASKS


def hidden_size_of(base_dir: Path) -> int:
    conf = json.loads((base_dir / "config.json").read_text())
    return int(conf.get("hidden_size") or conf.get("n_embd") or conf["d_model"])


def measure_token_norm(llm) -> float:
    """Mean token-embedding norm, gathered first when ZeRO-3 has partitioned the table while loading."""
    import deepspeed

    from ckf_dist.model.ckf import mean_token_norm

    weight = llm.get_input_embeddings().weight
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=None, enabled=hasattr(weight, "ds_id")):
        return mean_token_norm(llm)


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
    llm = load_llm(base_dir, cfg.model.dtype, tokenizer, attn_implementation=cfg.model.attn_implementation)
    # Every task gets its adapter whatever data.tasks holds: tensor task ids are global (TASK_ID).
    model = build_ckf_model(llm, tokenizer, user_emb, item_emb, cfg.model, cfg.multi_lora, tasks=TASKS,
                            token_norm=measure_token_norm(llm) if cfg.model.fusion_init == "match_tokens" else None)
    if cfg.model.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model, tokenizer, keepalive
