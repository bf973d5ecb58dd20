"""The CKF fine-tuning loop (KFM + MTM), read top to bottom: build the CKF model around a ZeRO-3-sharded LLM,
resume if a checkpoint exists, then per step draw the task mixture's micro-batches, run forward / backward /
step, reduce the per-task statistics over the ranks, update the mixture, log and checkpoint.

Every rank runs `finetune` (the pipeline in ckf_dist/pipeline.py calls it between the CF and export stages).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ckf_dist.cf.export import CFEmbeddings
from ckf_dist.config import RunConfig
from ckf_dist.data.collate import Collator, chat_frame
from ckf_dist.data.stream import TaskStream
from ckf_dist.model.ckf import CKFModel
from ckf_dist.tasks import TASK_ID, TASKS
from ckf_dist.train.batches import StepBatches
from ckf_dist.train.build import build_model, hidden_size_of
from ckf_dist.train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from ckf_dist.train.curriculum import curriculum_weight, variants_for
from ckf_dist.train.deepspeed_utils import make_ds_config
from ckf_dist.train.health import Heartbeat, StopRequest, is_collective_failure
from ckf_dist.train.logging import NullLogger, RunLogger
from ckf_dist.train.sampler import TaskMixture, task_gradient_stats
from ckf_dist.train.task_grads import TaskGradTracker

Validate = Callable[[CKFModel, Any], dict[str, Any]]
"""(model, tokenizer) -> validation metrics; the pipeline passes one that runs eval/ on the valid split."""


@dataclass
class Finetuned:
    """What the fine-tuning stage hands on: the engine (for ZeRO-3 gathers), its CKF model and the tokenizer.

    Attributes:
        stopped: a stop was requested (SIGTERM / SIGUSR1); a checkpoint was written and the run ends here.
    """

    engine: Any
    model: CKFModel
    tokenizer: Any
    stopped: bool


def finetune(cfg: RunConfig, base_dir: Path, cf: CFEmbeddings, rank: int, world: int,
             validate: Validate | None = None) -> Finetuned:
    """Fine-tune the CKF model on every rank of the current process group (data-parallel under ZeRO-3)."""
    import deepspeed

    run_dir = Path(cfg.log.run_dir)
    say = print if rank == 0 else (lambda *a, **k: None)
    # Re-seed first: whether the stages before ran (or were found done) must not change the initial LoRA / MetaNet
    # weights, or a rerun would not reproduce a run.
    seed_everything(cfg.train.seed)
    ds_config = make_ds_config(cfg, world, hidden_size_of(base_dir))
    model, tokenizer, _keepalive = build_model(cfg, base_dir, cf.user, cf.item, ds_config)
    groups = model.parameter_groups(cfg.train.lr, cfg.train.lr * cfg.train.fusion_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(cfg)))
    ckf = engine.module
    collator = Collator(tokenizer, cfg.model.max_length, cfg.data.history_len,
                        chat=chat_frame(tokenizer, cfg.model.chat_template, cfg.model.system_prompt))
    streams = {t: TaskStream(cfg.data.prepared_dir, "train", t, rank, world, cfg.data.seed) for t in cfg.data.tasks}
    T = cfg.train.curriculum_steps or cfg.train.max_steps
    mixture = TaskMixture(cfg.data.tasks, cfg.train.sampler, cfg.train.sampler_temperature, cfg.train.sampler_floor,
                          progress=cfg.train.sampler_progress, alpha=cfg.train.sampler_alpha,
                          warmup=cfg.train.sampler_warmup)
    text_weight_at = {"curriculum": lambda step: curriculum_weight(step, T), "cf": lambda step: 0.0,
                      "text": lambda step: 1.0}[cfg.train.prompts]
    batches = StepBatches(streams, collator, cfg.data.tasks, cfg.train.micro_batch_size, cfg.train.grad_accum,
                          cfg.train.seed, rank, lambda step: variants_for(text_weight_at(step)), cfg.train.prefetch)
    tracker = TaskGradTracker(ckf)
    logger = RunLogger(run_dir, "ckf") if rank == 0 else NullLogger()

    start = 0
    if cfg.train.resume == "auto" and (found := complete_checkpoints(run_dir)):
        state = load_checkpoint(engine, found[-1])
        batches.load_state_dict(state["data"])
        mixture.load_state_dict(state["mixture"])
        start = state["steps_done"]
        say(f"[ckf] resumed from {found[-1]} at step {start}")

    progress = make_progress(cfg, rank, start)
    tick, seen_samples, seen_tokens, waited = time.perf_counter(), 0, 0, batches.wait_s
    heartbeat, stop = Heartbeat(rank, world), StopRequest()
    ids = [TASK_ID[t] for t in cfg.data.tasks]
    try:
        for step in range(start, cfg.train.max_steps):
            heartbeat.beat(step)
            text_weight = text_weight_at(step)
            tracker.reset()
            sums = StepSums.zeros()
            # Every rank draws with the same mixture. With train.prefetch these were built during the previous
            # step, so they were drawn with the mixture one update older (lag one).
            for batch in batches.take(step, mixture.weights, last_step=cfg.train.max_steps - 1):
                batch = batch.to(engine.device)
                out = engine(batch, text_weight=text_weight, loss_norm=cfg.train.loss_norm)
                engine.backward(out.loss)
                engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
                sums.add(out, batch, cfg.train.grad_accum)
                seen_samples += cfg.train.micro_batch_size
                seen_tokens += int(batch.attention_mask.sum())

            stats = sums.all_reduce(tracker.get(), world)
            mixture.update(stats.grad_norms[ids], stats.task_loss[ids], present=stats.task_tokens[ids] > 0)

            done = step + 1
            progress.update(1)
            progress.set_postfix(loss=f"{stats.loss:.3f}", w_text=f"{text_weight:.2f}")
            if done % cfg.log.every == 0 or done == cfg.train.max_steps:
                elapsed = time.perf_counter() - tick
                logger.log_dict({
                    "train/loss": stats.loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/text_weight": text_weight,
                    "train/grad_norm": engine.get_global_grad_norm(),
                    "train/samples_per_s": seen_samples * world / elapsed,
                    "train/tokens_per_s": seen_tokens * world / elapsed,
                    # Share of wall time this rank was blocked waiting for its next batch (goal < 5%).
                    "train/data_wait_frac": (batches.wait_s - waited) / elapsed,
                    **stats.task_scalars(cfg.data.tasks, mixture.weights),
                }, done)
                tick, seen_samples, seen_tokens, waited = time.perf_counter(), 0, 0, batches.wait_s
            if validate and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.max_steps:
                batches.wait()  # the tokenizer is not safe to share with the batch-building thread
                logger.log_dict({f"valid/{k}": v for k, v in validate(ckf, tokenizer).items()}, done)
            stopping = stop.requested()
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps or stopping:
                rank_state = {"data": batches.state_dict(), "mixture": mixture.state_dict(), "steps_done": done}
                save_checkpoint(engine, done, run_dir, rank_state, cfg.train.ckpt_keep)
            if stopping:
                say(f"[ckf] stop requested (SIGTERM/SIGUSR1): checkpoint at step {done} written; rerun to resume")
                logger.close()
                return Finetuned(engine, ckf, tokenizer, stopped=True)
    except Exception as err:
        # A dead or hung peer surfaces here as a failed or timed-out collective: name it and stop.
        if is_collective_failure(err):
            raise heartbeat.explain(err) from err
        raise
    finally:
        batches.close()
    progress.close()
    logger.close()
    return Finetuned(engine, ckf, tokenizer, stopped=False)


# --------------------------------------------------------------------------------------------------
# Small helpers (pure or collective), in the order the loop uses them
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_linear_decay(cfg: RunConfig) -> Callable[[int], float]:
    """LR factor: linear warm-up over warmup_ratio * max_steps, then linear decay to 0.

    Not transformers' get_linear_schedule_with_warmup: that one starts at factor 0 (the first step trains at lr 0);
    this one reaches 1 / warm at step 0.
    """
    total = cfg.train.max_steps
    warm = max(1, round(cfg.train.warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def make_progress(cfg: RunConfig, rank: int, start: int):
    from tqdm import tqdm

    return tqdm(total=cfg.train.max_steps, initial=start, desc="ckf train", unit="step", dynamic_ncols=True,
                disable=rank != 0 or not cfg.log.progress, file=sys.stdout)


@dataclass
class StepStats:
    """One optimizer step's statistics, reduced over all ranks (global TASK_ID order along T)."""

    loss: float
    """Mean over ranks of the accumulated micro-batch losses."""
    task_loss: torch.Tensor
    """(T,) mean answer-token loss per task."""
    task_tokens: torch.Tensor
    """(T,) answer tokens per task."""
    grad_norms: torch.Tensor
    """(T,) per-sample shared-LoRA gradient norm per task (NaN for absent tasks)."""
    cos: torch.Tensor
    """(T, T) cosines between the task gradients."""

    def task_scalars(self, tasks: list[str], weights: torch.Tensor) -> dict[str, float | None]:
        """train/loss_<t>, train/grad_norm_<t>, train/mixture_<t>, train/grad_cos_<t>_<u> for the configured tasks."""
        ids = [TASK_ID[t] for t in tasks]
        out: dict[str, float | None] = {}
        for i, t in zip(ids, tasks):
            out[f"train/loss_{t}"] = float(self.task_loss[i]) if self.task_tokens[i] > 0 else None
            out[f"train/grad_norm_{t}"] = float(self.grad_norms[i])
            out[f"train/mixture_{t}"] = float(weights[tasks.index(t)])
            for j, u in zip(ids, tasks):
                if i < j:
                    out[f"train/grad_cos_{t}_{u}"] = float(self.cos[i, j])
        return out


@dataclass
class StepSums:
    """This rank's per-task sums over one step's micro-batches (float64 on the CPU)."""

    loss_sum: torch.Tensor
    tok_sum: torch.Tensor
    row_sum: torch.Tensor
    total_loss: float

    @classmethod
    def zeros(cls) -> StepSums:
        n = len(TASKS)
        return cls(*(torch.zeros(n, dtype=torch.float64) for _ in range(3)), total_loss=0.0)

    def add(self, out, batch, grad_accum: int) -> None:
        self.loss_sum += (out.task_loss.double() * out.task_tokens.double()).cpu()
        self.tok_sum += out.task_tokens.double().cpu()
        self.row_sum += torch.bincount(batch.task_ids.cpu(), minlength=len(TASKS)).double()
        self.total_loss += float(out.loss.detach()) / grad_accum

    def all_reduce(self, task_grads: torch.Tensor, world: int) -> StepStats:
        """Sum losses, answer tokens, rows and the per-task shared-LoRA gradients over all ranks."""
        n = len(TASKS)
        stats = torch.cat([self.loss_sum, self.tok_sum, self.row_sum,
                           torch.tensor([self.total_loss], dtype=torch.float64)])
        dist.all_reduce(stats)
        task_grads = task_grads.double().cpu()
        dist.all_reduce(task_grads)
        task_tokens = stats[n:2 * n]
        grad_norms, cos = task_gradient_stats(task_grads, task_samples=stats[2 * n:3 * n])
        return StepStats(loss=float(stats[-1]) / world, task_loss=stats[:n] / task_tokens.clamp_min(1),
                         task_tokens=task_tokens, grad_norms=grad_norms, cos=cos)
