"""Export stage (MTM): gather the small trainable parameters of the ZeRO-3 engine on rank 0 and write one standard
peft adapter per task (shared + task LoRA merged) plus the fusion weights (model/export.py does the writing).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from ckf_dist.model.export import export_task_adapters
from ckf_dist.train.loop import Finetuned


def export_adapters(tuned: Finetuned, out_dir: Path, base_dir: Path, rank: int) -> None:
    """Write `out_dir/<task>/` adapters and the fusion weights on rank 0; every rank takes part in the gather."""
    import deepspeed

    params = tuned.model.trainable_parameters()
    zero3 = tuned.engine.zero_optimization_stage() == 3
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if rank == 0:
            export_task_adapters(tuned.model, out_dir, str(base_dir))
    dist.barrier()
