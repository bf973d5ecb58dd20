"""The main job as stages, run in order on every rank (launched by `deepspeed`, torchrun, Slurm or Ray Train).
Each stage takes and returns explicit artifacts and is skipped when its output is already there and current:

  stage      writes (under log.run_dir)                 code                                   skipped when
  prepare    data/: manifest.json, Parquet, shards       data/preprocess.py (rank 0, Ray Data)  manifest matches config
  cf         cf/embeddings.safetensors, tb/cf            cf/train_cf.py (all ranks)             tables match the data,
                                                                                                or no CF data (alpaca)
  base       base_model/ (tiny Llama + tokenizer)        model/llm.py, model/hub.py (rank 0)    model.base_model, or built
  finetune   checkpoints/, tb/ckf, metrics.jsonl         train/loop.py (ZeRO-3)                 resumes from a checkpoint
  export     adapters/<task>/ (peft LoRA), fusion        train/export.py                        (always; seconds)
  evaluate   metrics.json, report.md, plots/*.png        eval/run.py                            (always)

Before any stage, rank 0 locks the run dir (train/runlock.py, <log.run_dir>/.run.lock, held until the job ends):
a second job on the same log.run_dir is refused on every rank, with the holder's pid, host and start time.

SIGTERM / SIGUSR1 (a Slurm time limit, a pre-emption) stop the job at the next safe point: the next stage boundary
before fine-tuning, or the end of the current step (with a checkpoint) during it. `run_pipeline` then raises
RunStopped; the launchers exit with STOPPED_EXIT (75), which cluster/slurm/train.sbatch turns into a requeue.

data.source='alpaca' (finished instruction prompts: no users, items or interactions) has no CF stage: the model is
fine-tuned on the text prompts only (train.prompts='text', required by the config) around a placeholder CF table
that no prompt reads (eval/run.py::placeholder_cf), and the report has one row, "LLM (text-only)".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckf_dist import comm
from ckf_dist.cf.export import CFEmbeddings, load_cf_embeddings
from ckf_dist.config import RunConfig, save_config
from ckf_dist.data.preprocess import prepare_data
from ckf_dist.data.schema import manifest_sha256
from ckf_dist.eval.run import evaluate_all, has_cf, placeholder_cf, report, run_eval, trained_variant
from ckf_dist.model.hub import is_packaged, resolve_base_model
from ckf_dist.train.deepspeed_utils import init_distributed
from ckf_dist.train.export import export_adapters
from ckf_dist.train.health import StopRequest
from ckf_dist.train.loop import OnCheckpoint, finetune, seed_everything
from ckf_dist.train.resume import preflight
from ckf_dist.train.runlock import RunDirLock

STOPPED_EXIT = 75
"""Exit status of a job stopped by SIGTERM / SIGUSR1 at a safe point (EX_TEMPFAIL, "try again"): rerunning the same
command resumes it. Not 0, so schedulers and wrappers can tell it from a finished run."""


class RunStopped(Exception):
    """A stop signal ended the job at a safe point (a stage boundary, or a step with its checkpoint written)."""


@dataclass(frozen=True)
class PreparedData:
    """The prepare stage's artifact: the prepared folder, its manifest and the manifest's sha256 (what the CF
    tables and exported adapters are bound to)."""

    dir: Path
    manifest: dict[str, Any]
    sha256: str


def run_pipeline(cfg: RunConfig, on_checkpoint: OnCheckpoint | None = None) -> dict[str, dict[str, Any]]:
    """Run every stage; returns the final metrics (identical on every rank).

    Args:
        on_checkpoint: called on every rank after each complete fine-tuning checkpoint (the Ray job reports it to
            Ray Train); the deepspeed, torchrun and Slurm entry points pass none.

    Raises:
        RunStopped: a SIGTERM / SIGUSR1 stopped the job at a safe point; rerun to resume.
    """
    stop = StopRequest()  # from here on the stop signals are caught (they would kill the rank during a stage)
    rank, world = init_distributed(cfg)
    run_dir = Path(cfg.log.run_dir)
    # One job per run dir: rank 0 locks it before anything is written there; a refusal reaches every rank.
    lock = RunDirLock(run_dir)
    on_rank0_then_all(rank, lock.acquire)
    try:
        return _run_stages(cfg, rank, world, run_dir, stop, on_checkpoint)
    finally:
        lock.release()


def _run_stages(cfg: RunConfig, rank: int, world: int, run_dir: Path, stop: StopRequest,
                on_checkpoint: OnCheckpoint | None) -> dict[str, dict[str, Any]]:
    def stop_point(where: str) -> None:  # collective: every rank stops at the same boundary
        if stop.requested():
            say(f"[ckf] stop requested (SIGTERM/SIGUSR1) {where}: rerun to continue")
            raise RunStopped(f"stopped by a signal {where}")

    # A resume that finetune would refuse (changed lr, tasks...) is refused here, before config.yaml is rewritten
    # and data or CF tables are rebuilt for it (finetune still checks the checkpoint itself and the inputs).
    on_rank0_then_all(rank, lambda: preflight(cfg))
    seed_everything(cfg.train.seed)
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
    # Each rank's pid, so an operator (or a test) can find and signal a given rank.
    (run_dir / "pids").mkdir(parents=True, exist_ok=True)
    (run_dir / "pids" / f"rank-{rank}.pid").write_text(f"{os.getpid()}\n")
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"[ckf] run dir {run_dir} | {world} rank(s) | tasks {cfg.data.tasks}")

    data = prepare_stage(cfg, rank)
    stop_point("after the prepare stage")
    m = data.manifest
    say(f"[ckf] data: {m['num_users']} users, {m['num_items']} items, prompts {m['counts']}")
    if has_cf(cfg):
        cf = cf_stage(cfg, data)
        say(f"[ckf] CF tables: users {tuple(cf.user.shape)}, items {tuple(cf.item.shape)}")
    else:
        cf = placeholder_cf(cfg)
        say(f"[ckf] CF stage skipped: data.source={cfg.data.source!r} has no users, items or interactions; "
            f"fine-tuning the text-only LLM (train.prompts='text', no CF vectors reach it)")
    stop_point("after the CF stage")
    base_dir = base_model_stage(cfg, data, rank)
    stop_point("after the base-model stage")

    limit = cfg.eval.max_samples_per_task or 64
    # Validate on the prompts the model is trained towards: text-only prompts for train.prompts='text'.
    variant = trained_variant(cfg)
    tuned = finetune(cfg, base_dir, cf, rank, world,
                     validate=lambda model, tok: run_eval(cfg, model, tok, "valid", variant, rank, world, limit),
                     on_checkpoint=on_checkpoint)
    if tuned.stopped:  # the loop printed the step and wrote its checkpoint
        raise RunStopped("stopped by a signal during fine-tuning, at a checkpoint")
    export_adapters(tuned, run_dir / "adapters", base_dir, rank)
    # CKF (or the text-only LLM) and the baselines on the same test samples.
    results = evaluate_all(cfg, tuned.model, tuned.tokenizer, cf, rank, world)
    if rank == 0:
        report(run_dir, results, step=cfg.train.max_steps)
    comm.barrier()
    return results


def prepare_stage(cfg: RunConfig, rank: int) -> PreparedData:
    """Rank 0 prepares the data (Ray Data; a no-op when an up-to-date prepared folder exists); every rank then
    reads the same manifest."""
    prepared = Path(cfg.data.prepared_dir)
    on_rank0_then_all(rank, lambda: prepare_data(cfg.data))
    manifest = json.loads((prepared / "manifest.json").read_text())
    return PreparedData(prepared, manifest, manifest_sha256(prepared))


def cf_stage(cfg: RunConfig, data: PreparedData) -> CFEmbeddings:
    """The CF tables for this data, trained first (data-parallel over all ranks) when absent or stale."""
    from ckf_dist.cf.train_cf import train_cf

    path = cfg.cf_embeddings_path
    fresh = [path.is_file()]
    if fresh[0] and cfg.cf.embeddings_path is None:
        # Our own export from an earlier run of this run dir: retrain if the data changed since.
        try:
            load_cf_embeddings(path, expected_manifest_sha=data.sha256)
        except ValueError:
            fresh[0] = False
    fresh = comm.broadcast_object(fresh, src=0)
    if not fresh[0]:
        if cfg.cf.embeddings_path is not None:
            raise FileNotFoundError(f"cf.embeddings_path={path} does not exist; unset it to train the CF model here")
        train_cf(cfg)
        comm.barrier()
    # A user-provided table from other data is refused here with both checksums named.
    return load_cf_embeddings(path, expected_manifest_sha=data.sha256)


def base_model_stage(cfg: RunConfig, data: PreparedData, rank: int) -> Path:
    """The folder the LLM loads from: model.base_model, or a tiny Llama + tokenizer built once on rank 0 from the
    prepared data's own text into <run_dir>/base_model."""
    if cfg.model.base_model is not None:
        if is_packaged(cfg.model.base_model):
            # A packaged model (e.g. smollm2-135m) is converted once into its cache folder, on rank 0; the others
            # wait and read the same folder (on several nodes the cache must be shared: CKF_DIST_CACHE).
            on_rank0_then_all(rank, lambda: resolve_base_model(cfg.model.base_model))
        path = resolve_base_model(cfg.model.base_model, convert=False)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.base_model={path}: no config.json there; point it at a Hugging Face "
                                    f"model folder (e.g. a downloaded Llama-2-7b-hf)")
        return path
    out = Path(cfg.log.run_dir) / "base_model"
    if rank == 0 and not (out / "config.json").is_file():
        from ckf_dist.data.prompts import corpus_texts
        from ckf_dist.model.llm import build_tiny_llm

        tmp = out.with_name(".tmp-base_model")
        build_tiny_llm(cfg.model.tiny, corpus_texts(data.dir), tmp, seed=cfg.train.seed)
        tmp.rename(out)  # atomic: a crash mid-build never leaves a folder that looks complete
    comm.barrier()
    return out


def on_rank0_then_all(rank: int, work: Callable[[], object]) -> None:
    """Run `work` on rank 0 only, then release every rank (rank 0's failure is re-raised on every rank instead of
    leaving them waiting)."""
    err: list[str | None] = [None]
    failure: Exception | None = None
    if rank == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - broadcast, then re-raise below
            failure, err[0] = e, f"{type(e).__name__}: {e}"
    err = comm.broadcast_object(err, src=0)
    if failure is not None:
        raise failure
    if err[0] is not None:
        raise RuntimeError(f"rank 0 failed: {err[0]}")
