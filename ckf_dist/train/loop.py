"""The main job, read top to bottom: prepare data -> train CF (CKEM) -> fine-tune the CKF model (KFM + MTM)
under DeepSpeed ZeRO-3 on every rank -> export per-task adapters -> evaluate CKF and its baselines -> report.

Every rank runs this same function (launched by `deepspeed`, `torchrun`, Slurm or Ray Train).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ckf_dist.config import RunConfig, save_config
from ckf_dist.data.collate import Collator
from ckf_dist.tasks import TASK_ID, TASKS
from ckf_dist.train.batches import StepBatches
from ckf_dist.train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from ckf_dist.train.curriculum import curriculum_weight, variants_for
from ckf_dist.train.deepspeed_utils import init_distributed, make_ds_config
from ckf_dist.train.health import Heartbeat, StopRequest, is_collective_failure
from ckf_dist.train.logging import NullLogger, RunLogger
from ckf_dist.train.sampler import TaskMixture, task_gradient_stats


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run the whole pipeline; returns the final metrics (identical on every rank)."""
    import deepspeed

    from ckf_dist.data.stream import TaskStream
    from ckf_dist.train.build import build_model, ensure_base_model, hidden_size_of

    rank, world = init_distributed(cfg)
    run_dir = Path(cfg.log.run_dir)
    seed_everything(cfg.train.seed)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    # Each rank's pid, so an operator (or a test) can find and signal a given rank.
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank-{rank}.pid").write_text(f"{os.getpid()}\n")
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"[ckf] run dir {run_dir} | {world} rank(s) | tasks {cfg.data.tasks}")

    # 1. Data: rank 0 prepares (Ray Data); the others wait and then read the same manifest.
    manifest = on_rank0_then_all(rank, lambda: prepare(cfg), lambda: read_manifest(cfg))
    say(f"[ckf] data: {manifest['num_users']} users, {manifest['num_items']} items, prompts {manifest['counts']}")

    # 2. CKEM: CF embeddings (data-parallel over the same ranks), refused if built from other data.
    cf = ensure_cf_embeddings(cfg, rank)
    say(f"[ckf] CF tables: users {tuple(cf.user.shape)}, items {tuple(cf.item.shape)}")

    # 3. The CKF model around a ZeRO-3-sharded LLM. Re-seed first: whether the stages above ran (or were found
    # done) must not change the initial LoRA / MetaNet weights, or a rerun would not reproduce a run.
    base_dir = ensure_base_model(cfg, rank)
    seed_everything(cfg.train.seed)
    ds_config = make_ds_config(cfg, world, hidden_size_of(base_dir))
    model, tokenizer, _keepalive = build_model(cfg, base_dir, cf.user, cf.item, ds_config)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear_decay(cfg)))
    ckf = engine.module
    collator = Collator(tokenizer, cfg.model.max_length, cfg.data.history_len)
    streams = {t: TaskStream(cfg.data.prepared_dir, "train", t, rank, world, cfg.data.seed) for t in cfg.data.tasks}
    T = cfg.train.curriculum_steps or cfg.train.max_steps
    mixture = TaskMixture(cfg.data.tasks, cfg.train.sampler, cfg.train.sampler_temperature, cfg.train.sampler_floor,
                          progress=cfg.train.sampler_progress, alpha=cfg.train.sampler_alpha,
                          warmup=cfg.train.sampler_warmup)
    text_weight_at = {"curriculum": lambda step: curriculum_weight(step, T), "cf": lambda step: 0.0,
                      "text": lambda step: 1.0}[cfg.train.prompts]
    batches = StepBatches(streams, collator, cfg.data.tasks, cfg.train.micro_batch_size, cfg.train.grad_accum,
                          cfg.train.seed, rank, lambda step: variants_for(text_weight_at(step)), cfg.train.prefetch)
    ckf.enable_task_grad_tracking(True)
    logger = RunLogger(run_dir, "ckf") if rank == 0 else NullLogger()

    start = 0
    if cfg.train.resume == "auto" and (found := complete_checkpoints(run_dir)):
        state = load_checkpoint(engine, found[-1])
        batches.load_state_dict(state["data"])
        mixture.load_state_dict(state["mixture"])
        start = state["steps_done"]
        say(f"[ckf] resumed from {found[-1]} at step {start}")

    # 4. The loop.
    progress = make_progress(cfg, rank, start)
    tick, seen_samples, seen_tokens, waited = time.perf_counter(), 0, 0, batches.wait_s
    heartbeat, stop = Heartbeat(rank, world), StopRequest()
    try:
        for step in range(start, cfg.train.max_steps):
            heartbeat.beat(step)
            text_weight = text_weight_at(step)
            ckf.reset_task_grads()
            loss_sum = torch.zeros(len(TASKS), dtype=torch.float64)
            tok_sum = torch.zeros(len(TASKS), dtype=torch.float64)
            row_sum = torch.zeros(len(TASKS), dtype=torch.float64)
            total_loss = 0.0
            # Every rank draws with the same mixture. With train.prefetch these were built during the previous
            # step, so they were drawn with the mixture one update older (lag one).
            for batch in batches.take(step, mixture.weights, last_step=cfg.train.max_steps - 1):
                batch = batch.to(engine.device)
                out = engine(batch, text_weight=text_weight)
                engine.backward(out.loss)
                engine.step()  # DeepSpeed only steps the optimizer at the accumulation boundary
                loss_sum += (out.task_loss.double() * out.task_tokens.double()).cpu()
                tok_sum += out.task_tokens.double().cpu()
                row_sum += torch.bincount(batch.task_ids.cpu(), minlength=len(TASKS)).double()
                total_loss += float(out.loss.detach()) / cfg.train.grad_accum
                seen_samples += cfg.train.micro_batch_size
                seen_tokens += int(batch.attention_mask.sum())

            # Per-task statistics over all ranks: losses, answer tokens and shared-LoRA gradients.
            stats = torch.cat([loss_sum, tok_sum, row_sum, torch.tensor([total_loss], dtype=torch.float64)])
            dist.all_reduce(stats)
            task_grads = ckf.task_grads().double().cpu()
            dist.all_reduce(task_grads)
            n = len(TASKS)
            task_tokens = stats[n:2 * n]
            task_loss = stats[:n] / task_tokens.clamp_min(1)
            grad_norms, cos = task_gradient_stats(task_grads, task_samples=stats[2 * n:3 * n])
            ids = [TASK_ID[t] for t in cfg.data.tasks]
            mixture.update(grad_norms[ids], task_loss[ids], present=task_tokens[ids] > 0)

            done = step + 1
            progress.update(1)
            progress.set_postfix(loss=f"{float(stats[-1]) / world:.3f}", w_text=f"{text_weight:.2f}")
            if done % cfg.log.every == 0 or done == cfg.train.max_steps:
                elapsed = time.perf_counter() - tick
                scalars = {
                    "train/loss": float(stats[-1]) / world,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/text_weight": text_weight,
                    "train/grad_norm": engine.get_global_grad_norm(),
                    "train/samples_per_s": seen_samples * world / elapsed,
                    "train/tokens_per_s": seen_tokens * world / elapsed,
                    # Share of wall time this rank was blocked waiting for its next batch (goal < 5%).
                    "train/data_wait_frac": (batches.wait_s - waited) / elapsed,
                }
                for i, t in zip(ids, cfg.data.tasks):
                    scalars[f"train/loss_{t}"] = float(task_loss[i]) if task_tokens[i] > 0 else None
                    scalars[f"train/grad_norm_{t}"] = float(grad_norms[i])
                    scalars[f"train/mixture_{t}"] = float(mixture.weights[cfg.data.tasks.index(t)])
                    for j, u in zip(ids, cfg.data.tasks):
                        if i < j:
                            scalars[f"train/grad_cos_{t}_{u}"] = float(cos[i, j])
                logger.log_dict(scalars, done)
                tick, seen_samples, seen_tokens, waited = time.perf_counter(), 0, 0, batches.wait_s
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < cfg.train.max_steps:
                batches.wait()  # the tokenizer is not safe to share with the batch-building thread
                val = run_eval(cfg, ckf, tokenizer, "valid", "cf", rank, world, limit=cfg.eval.max_samples_per_task or 64)
                logger.log_dict({f"valid/{k}": v for k, v in val.items()}, done)
            stopping = stop.requested()
            if done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps or stopping:
                rank_state = {"data": batches.state_dict(),
                              "mixture": mixture.state_dict(), "steps_done": done}
                save_checkpoint(engine, done, run_dir, rank_state, cfg.train.ckpt_keep)
            if stopping:
                say(f"[ckf] stop requested (SIGTERM/SIGUSR1): checkpoint at step {done} written; rerun to resume")
                logger.close()
                return {}
    except Exception as err:
        # A dead or hung peer surfaces here as a failed or timed-out collective: name it and stop.
        if is_collective_failure(err):
            raise heartbeat.explain(err) from err
        raise
    finally:
        batches.close()
    progress.close()
    logger.flush()

    # 5. Export per-task peft adapters (LoRA + fusion modules only; no copy of the base model).
    export_adapters(engine, ckf, cfg, base_dir, rank)

    # 6. Evaluate CKF and the baselines on the same test samples; report.
    results = evaluate_all(cfg, ckf, tokenizer, cf, rank, world)
    if rank == 0:
        from ckf_dist.eval.report import format_table, write_report

        # Also writes the test metrics as TensorBoard scalars under tb/report/<model>/.
        paths = write_report(run_dir, results, tb_dir=str(run_dir / "tb"), step=cfg.train.max_steps)
        print(format_table(results))
        print(f"[ckf] report: {', '.join(str(p) for p in paths.values())}")
    logger.close()
    dist.barrier()
    return results


# --------------------------------------------------------------------------------------------------
# Small helpers (pure or collective), in the order the loop uses them
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def on_rank0_then_all(rank: int, work, read):
    """Run `work` on rank 0 only, then `read` on every rank after a barrier (rank 0's failure is re-raised
    on every rank instead of leaving them waiting)."""
    err: list[str | None] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - broadcast, then re-raise below
            failure, err[0] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(err, src=0)
    if failure is not None:
        raise failure
    if err[0] is not None:
        raise RuntimeError(f"rank 0 failed: {err[0]}")
    return read()


def prepare(cfg: RunConfig) -> None:
    from ckf_dist.data.preprocess import prepare_data

    prepare_data(cfg.data)


def read_manifest(cfg: RunConfig) -> dict[str, Any]:
    return json.loads((Path(cfg.data.prepared_dir) / "manifest.json").read_text())


def ensure_cf_embeddings(cfg: RunConfig, rank: int):
    """Load the CF tables for this data, training them first (on all ranks) when absent or stale."""
    from ckf_dist.cf.export import load_cf_embeddings
    from ckf_dist.cf.train_cf import train_cf
    from ckf_dist.data.schema import manifest_sha256

    sha = manifest_sha256(cfg.data.prepared_dir)
    path = cfg.cf_embeddings_path
    fresh = [path.is_file()]
    if fresh[0] and cfg.cf.embeddings_path is None:
        # Our own export from an earlier run of this run dir: retrain if the data changed since.
        try:
            load_cf_embeddings(path, expected_manifest_sha=sha)
        except ValueError:
            fresh[0] = False
    dist.broadcast_object_list(fresh, src=0)
    if not fresh[0]:
        if cfg.cf.embeddings_path is not None:
            raise FileNotFoundError(f"cf.embeddings_path={path} does not exist; unset it to train the CF model here")
        train_cf(cfg)
        dist.barrier()
    # A user-provided table from other data is refused here with both checksums named.
    return load_cf_embeddings(path, expected_manifest_sha=sha)


def warmup_linear_decay(cfg: RunConfig):
    total = cfg.train.max_steps
    warm = max(1, int(round(cfg.train.warmup_ratio * total)))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def make_progress(cfg: RunConfig, rank: int, start: int):
    from tqdm import tqdm

    return tqdm(total=cfg.train.max_steps, initial=start, desc="ckf train", unit="step", dynamic_ncols=True,
                disable=rank != 0 or not cfg.log.progress, file=sys.stdout)


def export_adapters(engine, ckf, cfg: RunConfig, base_dir: Path, rank: int) -> None:
    """Gather the (small) trainable parameters on rank 0 and write per-task peft adapters + fusion weights."""
    import deepspeed

    from ckf_dist.model.export import export_task_adapters

    params = ckf.trainable_parameters()
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=_is_zero3(engine)):
        if rank == 0:
            export_task_adapters(ckf, Path(cfg.log.run_dir) / "adapters", str(base_dir))
    dist.barrier()


def _is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def run_eval(cfg: RunConfig, ckf, tokenizer, split: str, variant: str, rank: int, world: int,
             limit: int = 0) -> dict[str, Any]:
    from ckf_dist.data.prompts import load_samples
    from ckf_dist.eval.evaluate import evaluate_model

    samples = load_samples(cfg.data.prepared_dir, split, cfg.data.tasks)
    if limit:
        samples = cap_per_task(samples, limit)
    was_training = ckf.training
    ckf.eval()
    with torch.no_grad():
        metrics = evaluate_model(ckf, tokenizer, samples, cfg, variant=variant, rank=rank, world=world)
    ckf.train(was_training)
    return metrics


def cap_per_task(samples: list, limit: int) -> list:
    """The first `limit` samples of each task (samples are sorted by key, so this is deterministic)."""
    counts: dict[str, int] = {}
    out = []
    for s in samples:
        if counts.get(s["task"], 0) < limit:
            counts[s["task"]] = counts.get(s["task"], 0) + 1
            out.append(s)
    return out


def evaluate_all(cfg: RunConfig, ckf, tokenizer, cf, rank: int, world: int) -> dict[str, dict[str, Any]]:
    """CKF (CF-slot prompts) and the configured baselines on the same test samples."""
    from ckf_dist.data.prompts import load_samples
    from ckf_dist.eval.evaluate import evaluate_cf_baseline

    limit = cfg.eval.max_samples_per_task
    main_variant = "text" if cfg.train.prompts == "text" else "cf"
    name = "LLM (text-only)" if main_variant == "text" else "CKF"
    results = {name: run_eval(cfg, ckf, tokenizer, cfg.eval.split, main_variant, rank, world, limit)}
    if "text" in cfg.eval.baselines and main_variant == "cf":
        results["CKF, text prompts"] = run_eval(cfg, ckf, tokenizer, cfg.eval.split, "text", rank, world, limit)
    if "cf" in cfg.eval.baselines:
        samples = load_samples(cfg.data.prepared_dir, cfg.eval.split, cfg.data.tasks)
        if limit:
            samples = cap_per_task(samples, limit)
        results[f"CF ({cfg.cf.model})"] = evaluate_cf_baseline(cf, samples, cfg)
    return {k: {m: (None if isinstance(v, float) and math.isnan(v) else v) for m, v in r.items()}
            for k, r in results.items()}
