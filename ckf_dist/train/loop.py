"""The CKF fine-tuning loop (KFM + MTM), read top to bottom: build the CKF model around a ZeRO-3-sharded LLM,
resume if a checkpoint exists, then per step draw the task mixture's micro-batches, run forward / backward /
step, reduce the per-task statistics over the ranks, update the mixture, log and checkpoint.

Every rank runs `finetune` (the pipeline in ckf_dist/pipeline.py calls it between the CF and export stages).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckf_dist import comm
from ckf_dist.cf.export import CFEmbeddings
from ckf_dist.config import RunConfig
from ckf_dist.data.collate import Collator, chat_frame
from ckf_dist.data.schema import manifest_sha256
from ckf_dist.data.stream import task_streams
from ckf_dist.model.ckf import CKFModel
from ckf_dist.tasks import TASK_ID, TASKS
from ckf_dist.train.batches import StepBatches
from ckf_dist.train.build import build_model, hidden_size_of
from ckf_dist.train.checkpoint import (
    CheckpointError,
    choose_checkpoint,
    load_checkpoint,
    read_run_info,
    save_checkpoint,
    set_aside_checkpoints,
)
from ckf_dist.train.curriculum import curriculum_weight, variants_for
from ckf_dist.train.deepspeed_utils import make_ds_config
from ckf_dist.train.health import Heartbeat, StopRequest, is_collective_failure
from ckf_dist.train.logging import NullLogger, RunLogger
from ckf_dist.train.optim import describe_optimizer, make_optimizer
from ckf_dist.train.resume import ResumeRefused, check_resume, file_fingerprint, tensor_fingerprint
from ckf_dist.train.sampler import TaskMixture
from ckf_dist.train.task_grads import TaskGradTracker, task_gradient_stats

Validate = Callable[[CKFModel, Any], dict[str, Any]]
"""(model, tokenizer) -> validation metrics; the pipeline passes one that runs eval/ on the valid split."""
OnCheckpoint = Callable[[Path, int, dict[str, float]], None]
"""(checkpoint directory, steps done, the step's metrics), on every rank after a complete checkpoint."""


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
             validate: Validate | None = None, on_checkpoint: OnCheckpoint | None = None) -> Finetuned:
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
    from deepspeed.accelerator import get_accelerator

    optimizer = make_optimizer(groups, cfg.train.lr, cfg.train.weight_decay, cfg.train.optimizer,
                               torch.device(get_accelerator().current_device_name()))
    say(f"[ckf] optimizer: {describe_optimizer(optimizer)}")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(cfg)))
    ckf = engine.module
    check_learning_rates(scheduler.base_lrs, cfg)
    collator = Collator(tokenizer, cfg.model.max_length, cfg.data.history_len,
                        chat=chat_frame(tokenizer, cfg.model.chat_template, cfg.model.system_prompt))
    stream_kind, streams = task_streams(cfg.data, "train", rank, world)
    say(f"[ckf] data stream: {stream_kind}" + (f" (Ray Data, windows of {cfg.data.stream_window} samples per task)"
                                               if stream_kind == "ray" else " (TaskStream, shards in memory)"))
    T = cfg.train.curriculum_steps or cfg.train.max_steps
    mixture = TaskMixture(cfg.data.tasks, cfg.train.sampler, cfg.train.sampler_temperature, cfg.train.sampler_floor,
                          progress=cfg.train.sampler_progress, alpha=cfg.train.sampler_alpha,
                          warmup=cfg.train.sampler_warmup)
    text_weight_at = {"curriculum": lambda step: curriculum_weight(step, T), "cf": lambda step: 0.0,
                      "text": lambda step: 1.0}[cfg.train.prompts]
    batches = StepBatches(streams, collator, cfg.data.tasks, cfg.train.micro_batch_size, cfg.train.grad_accum,
                          cfg.train.seed, rank, lambda step: variants_for(text_weight_at(step)), cfg.train.prefetch)
    tracker = TaskGradTracker(ckf, dim=cfg.train.grad_sketch_dim, seed=cfg.train.seed, rank=rank)
    logger = RunLogger(run_dir, "ckf") if rank == 0 else NullLogger()

    inputs = input_fingerprint(cfg, base_dir, cf)
    run_info: dict[str, Any] = {"config": cfg.to_dict(), "inputs": inputs, "resumes": []}
    start = 0
    if cfg.train.resume == "never":
        if rank == 0 and (moved := set_aside_checkpoints(run_dir)) is not None:
            print(f"[ckf] train.resume=never: the existing checkpoints were moved to {moved}; starting at step 0")
        comm.barrier()
    elif (found := agree_on_checkpoint(run_dir, rank, world)) is not None:
        start, run_info["resumes"] = resume_from(found, cfg, inputs, engine, scheduler, batches, mixture, ckf, rank)
        say(f"[ckf] resumed from {found} at step {start}")
    guard = NonfiniteGuard(cfg.train.max_nonfinite_steps)

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
                tracker.watch(batch)
                out = engine(batch, text_weight=text_weight, loss_norm=cfg.train.loss_norm)
                engine.backward(out.loss)
                # DeepSpeed only steps the optimizer at the accumulation boundary. There ZeRO-3 (0.19.8) computes
                # the global gradient norm first and, when it is not finite, zeroes the gradients and skips the
                # optimizer and LR-scheduler step (optimizer.overflow); the guard below counts and logs that.
                engine.step()
                sums.add(out, batch, cfg.train.grad_accum)
                seen_samples += cfg.train.micro_batch_size
                seen_tokens += int(batch.attention_mask.sum())

            skipped = bool(getattr(engine.optimizer, "overflow", False))
            sums.bad_params = 0.0 if skipped else float(not local_params_finite(ckf))
            stats = sums.all_reduce(tracker, world)
            done = step + 1
            grad_norm = engine.get_global_grad_norm()
            failure = guard.assess(done, stats.loss, grad_norm, skipped, stats.bad_params, scheduler.get_last_lr())
            if not skipped:
                mixture.update(stats.grad_signal_sq[ids], stats.task_loss[ids], present=stats.task_tokens[ids] > 0)

            progress.update(1)
            progress.set_postfix(loss=f"{stats.loss:.3f}", w_text=f"{text_weight:.2f}")
            if done % cfg.log.every == 0 or done == cfg.train.max_steps or skipped or failure is not None:
                elapsed = time.perf_counter() - tick
                logger.log_dict({
                    "train/loss": stats.loss,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/text_weight": text_weight,
                    "train/grad_norm": grad_norm,
                    # Steps whose loss or gradient norm was not finite: skipped (no update), counted, never hidden.
                    "train/step_skipped": float(skipped),
                    "train/nonfinite_steps": guard.total,
                    "train/samples_per_s": seen_samples * world / elapsed,
                    "train/tokens_per_s": seen_tokens * world / elapsed,
                    # Share of wall time this rank was blocked waiting for its next batch (goal < 5%).
                    "train/data_wait_frac": (batches.wait_s - waited) / elapsed,
                    **stats.task_scalars(cfg.data.tasks, mixture.weights),
                }, done)
                tick, seen_samples, seen_tokens, waited = time.perf_counter(), 0, 0, batches.wait_s
            if failure is not None:  # logged above, never hidden; nothing of this state is checkpointed
                logger.close()
                raise failure
            if validate and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.max_steps:
                batches.wait()  # the tokenizer is not safe to share with the batch-building thread
                logger.log_dict({f"valid/{k}": v for k, v in validate(ckf, tokenizer).items()}, done)
            stopping = stop.requested()
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps or stopping:
                rank_state = {"data": batches.state_dict(), "mixture": mixture.state_dict(), "steps_done": done}
                # The guard above stopped the run if this step left non-finite parameters: none is saved.
                path = save_checkpoint(engine, done, run_dir, rank_state, cfg.train.ckpt_keep, run_info=run_info)
                if on_checkpoint is not None:
                    on_checkpoint(path, done, {"train/loss": stats.loss})
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


def input_fingerprint(cfg: RunConfig, base_dir: Path, cf: CFEmbeddings) -> dict[str, str]:
    """What training reads besides the config: the prepared data (manifest sha256), the CF tables, the base model."""
    return {"data_manifest_sha256": manifest_sha256(cfg.data.prepared_dir),
            "cf_tables_sha256": tensor_fingerprint(cf.user, cf.item),
            "base_model": file_fingerprint(base_dir)}


def agree_on_checkpoint(run_dir: Path, rank: int, world: int) -> Path | None:
    """Collective: rank 0 picks the newest intact checkpoint (verifying its manifest, falling back past damaged
    ones with a warning); every rank gets the same answer, or the same error."""
    say = print if rank == 0 else (lambda *a, **k: None)
    box: list[Any] = [None, None]
    if rank == 0:
        try:
            found = choose_checkpoint(run_dir, world, warn=lambda msg: print(msg, file=sys.stderr, flush=True))
            box[0] = None if found is None else str(found)
        except CheckpointError as err:
            box[1] = str(err)
    box = comm.broadcast_object(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    if box[0] is None:
        say(f"[ckf] no checkpoint in {run_dir / 'checkpoints'}: starting at step 0")
    return None if box[0] is None else Path(box[0])


def resume_from(path: Path, cfg: RunConfig, inputs: dict[str, str], engine, scheduler, batches: StepBatches,
                mixture: TaskMixture, ckf: CKFModel, rank: int) -> tuple[int, list[dict[str, Any]]]:
    """Check the checkpoint's configuration against this run's (train/resume.py), then load it.

    Returns:
        (steps done, the resume history to record in the next checkpoints).
    """
    info = read_run_info(path)
    steps_done = int(info.get("step", -1))
    run_dir = Path(cfg.log.run_dir)
    try:
        safe, forced = check_resume(str(path), info.get("config"), cfg.to_dict(), info.get("inputs"), inputs,
                                    steps_done, cfg.train.resume)
    except ResumeRefused:
        # config.yaml was rewritten with the refused configuration before this stage: put back the one that
        # produced what is in the run directory, so it keeps telling the truth.
        if rank == 0 and info.get("config") is not None:
            import yaml

            (run_dir / "config.yaml").write_text(yaml.safe_dump(info["config"], sort_keys=False))
        raise
    new_base = list(scheduler.base_lrs)
    state = load_checkpoint(engine, path)
    if state["steps_done"] != steps_done:
        raise CheckpointError(f"{path}: run.json says step {steps_done}, the rank state {state['steps_done']}")
    batches.load_state_dict(state["data"])
    mixture.load_state_dict(state["mixture"])
    # The new configuration's learning rates and schedule (more max_steps stretch the decay; a forced lr change
    # takes effect) from the current step on, instead of the rates saved in the optimizer / scheduler state.
    factor = warmup_linear_decay(cfg)(scheduler.last_epoch)
    scheduler.base_lrs = new_base
    for group, base in zip(scheduler.optimizer.param_groups, new_base):
        group["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
    bad = torch.tensor([float(not local_params_finite(ckf))])
    bad = comm.all_reduce(bad)
    if bad.item():
        raise CheckpointError(f"{path}: the loaded parameters are not finite; start fresh (train.resume=never)")
    record = {"time": time.time(), "checkpoint": str(path), "step": steps_done,
              "applied": {k: list(v) for k, v in safe.items()}, "forced": {k: list(v) for k, v in forced.items()}}
    if rank == 0:
        for k, (old, new) in safe.items():
            print(f"[ckf] resume: applying {k}: {old!r} -> {new!r}")
        if forced:
            print(f"[ckf] WARNING: train.resume=force: resuming from {path} despite changes (the new values apply "
                  f"from step {steps_done} on):\n" + "\n".join(f"  {k}: {o!r} -> {n!r}" for k, (o, n) in
                                                            forced.items()), file=sys.stderr, flush=True)
        with open(run_dir / "resumes.jsonl", "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
    return steps_done, [*info.get("resumes", []), record]


def check_learning_rates(lrs: list[float], cfg: RunConfig) -> None:
    """Every group's peak learning rate (and lr x weight decay) must be a finite float32: the optimizer applies it
    to float32 master weights, and a larger one fails inside the step without naming the cause or overflows them."""
    top = torch.finfo(torch.float32).max
    for i, lr in enumerate(lrs):
        if not (math.isfinite(lr) and lr * max(1.0, cfg.train.weight_decay) < top):
            raise NonfiniteError(f"learning rate {lr} of parameter group {i} (train.lr={cfg.train.lr}, "
                                 f"train.fusion_lr_scale={cfg.train.fusion_lr_scale}) does not fit a float32 (max "
                                 f"{top:.3g}): the optimizer update would overflow; use a learning rate like 1e-4")


class NonfiniteError(FloatingPointError):
    """Training produced non-finite values it cannot skip (or too many skipped steps in a row)."""


class NonfiniteGuard:
    """Counts optimizer steps skipped for a non-finite loss or gradient norm and stops the run when
    `limit` come in a row, or at once when a step cannot be undone (its update made the parameters non-finite, or
    the loss was non-finite while DeepSpeed applied the step)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row, self.total, self.first_in_row = limit, 0, 0, None

    def check(self, step: int, loss: float, grad_norm: float | None, skipped: bool, bad_params: float,
              lrs: list[float]) -> None:
        """Count this step; raise NonfiniteError when the run must stop."""
        if (err := self.assess(step, loss, grad_norm, skipped, bad_params, lrs)) is not None:
            raise err

    def assess(self, step: int, loss: float, grad_norm: float | None, skipped: bool, bad_params: float,
               lrs: list[float]) -> NonfiniteError | None:
        """As `check`, but returns the error (the loop logs the step first, then raises it)."""
        loss_ok = math.isfinite(loss)
        if not skipped and bad_params:
            return NonfiniteError(
                f"step {step}: the optimizer update made trainable parameters non-finite (loss {loss}, gradient "
                f"norm {grad_norm}, learning rates {lrs}); the run has diverged and stops here: no checkpoint or "
                f"adapter is written from this state. Lower train.lr (or train.fusion_lr_scale), or check the data")
        if not skipped and not loss_ok:
            return NonfiniteError(f"step {step}: non-finite loss {loss} but a finite gradient norm ({grad_norm}), so "
                                 f"DeepSpeed applied the update; stopping before it reaches a checkpoint")
        if not skipped:
            self.in_a_row, self.first_in_row = 0, None
            return None
        self.total += 1
        self.in_a_row += 1
        self.first_in_row = self.first_in_row or step
        print(f"[ckf] WARNING: step {step} skipped (no parameter update): loss {loss}, gradient norm {grad_norm} "
              f"({self.in_a_row} in a row, {self.total} in total, limit train.max_nonfinite_steps={self.limit})",
              file=sys.stderr, flush=True)
        if self.in_a_row >= self.limit:
            return NonfiniteError(
                f"step {step}: {self.in_a_row} steps in a row (from step {self.first_in_row}) had a non-finite loss "
                f"or gradient norm (last: loss {loss}, gradient norm {grad_norm}; train.max_nonfinite_steps="
                f"{self.limit}); the run stops. Lower train.lr, check the data, or resume from the last checkpoint")
        return None


@torch.no_grad()
def local_params_finite(model: CKFModel) -> bool:
    """This rank's part of the trainable parameters is finite (ZeRO-3: the local partitions, ds_tensor)."""
    for p in model.trainable_parameters():
        t = getattr(p, "ds_tensor", None)
        t = p.data if t is None else t
        if t.numel() and not bool(torch.isfinite(t).all()):
            return False
    return True


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
    """(T,) per-sample shared-LoRA gradient norm per task, noise included (NaN for absent tasks)."""
    grad_signal_sq: torch.Tensor
    """(T,) unbiased estimate of its square without the noise term (NaN where a half of the task's samples was empty);
    what the sampler reads."""
    cos: torch.Tensor
    """(T, T) cosines between the task gradients."""
    bad_params: float = 0.0
    """Ranks whose trainable parameters were not finite after the step."""

    def task_scalars(self, tasks: list[str], weights: torch.Tensor) -> dict[str, float | None]:
        """train/loss_<t>, train/grad_norm_<t>, train/grad_signal_<t>, train/mixture_<t>, train/grad_cos_<t>_<u> for the
        configured tasks (grad_signal: the root of the unbiased squared norm, 0 where it came out negative)."""
        ids = [TASK_ID[t] for t in tasks]
        out: dict[str, float | None] = {}
        for i, t in zip(ids, tasks):
            out[f"train/loss_{t}"] = float(self.task_loss[i]) if self.task_tokens[i] > 0 else None
            out[f"train/grad_norm_{t}"] = float(self.grad_norms[i])
            out[f"train/grad_signal_{t}"] = float(self.grad_signal_sq[i].clamp_min(0).sqrt())
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
    total_loss: float
    bad_params: float = 0.0
    """1.0 when this rank's trainable parameters were not finite after the step (summed over ranks)."""

    @classmethod
    def zeros(cls) -> StepSums:
        n = len(TASKS)
        return cls(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64), total_loss=0.0)

    def add(self, out, batch, grad_accum: int) -> None:
        self.loss_sum += (out.task_loss.double() * out.task_tokens.double()).cpu()
        self.tok_sum += out.task_tokens.double().cpu()
        self.total_loss += float(out.loss.detach()) / grad_accum

    def all_reduce(self, tracker: TaskGradTracker, world: int) -> StepStats:
        """Sum losses, answer tokens, and the tracker's (2T, k) gradient sketches and sample counts over all ranks:
        one all-reduce of 2T (k + 1) + 2T + 2 floats, whatever the model size (ckf_dist/comm.py puts it on the
        backend's device)."""
        n = len(TASKS)
        sketch, samples = tracker.sketch, tracker.samples
        flat = torch.cat([self.loss_sum, self.tok_sum, torch.tensor([self.total_loss, self.bad_params],
                                                                     dtype=torch.float64),
                          samples.double().cpu(), sketch.double().flatten().cpu()])
        flat = comm.all_reduce(flat)
        task_tokens = flat[n:2 * n]
        g = 2 * n + 2
        grads = task_gradient_stats(flat[g + samples.numel():].view_as(sketch), flat[g:g + samples.numel()])
        return StepStats(loss=float(flat[2 * n]) / world, task_loss=flat[:n] / task_tokens.clamp_min(1),
                         task_tokens=task_tokens, grad_norms=grads["norm"], grad_signal_sq=grads["signal_sq"],
                         cos=grads["cos"], bad_params=float(flat[2 * n + 1]))
