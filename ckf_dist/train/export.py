"""Export stage (MTM): gather the small trainable parameters of the ZeRO-3 engine on rank 0 and write one standard
peft adapter per task (shared + task LoRA merged) plus the fusion weights (model/export.py does the writing).
"""

from __future__ import annotations

from pathlib import Path

from ckf_dist import comm
from ckf_dist.model.export import export_task_adapters
from ckf_dist.train.loop import Finetuned


def export_adapters(tuned: Finetuned, out_dir: Path, base_dir: Path, rank: int) -> None:
    """Write `out_dir/<task>/` adapters and the fusion weights on rank 0; every rank takes part in the gather."""
    import deepspeed

    params = tuned.model.trainable_parameters()
    zero3 = tuned.engine.zero_optimization_stage() == 3
    err: list[str | None] = [None]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
        if rank == 0:
            try:
                # Refuses (writes nothing) when a value is NaN / inf.
                export_task_adapters(tuned.model, out_dir, str(base_dir))
            except ValueError as e:
                err[0] = str(e)
    # Rank 0's refusal is every rank's: the others would otherwise go on to evaluate the same broken weights.
    err = comm.broadcast_object(err, src=0)
    if err[0] is not None:
        raise ValueError(err[0])
