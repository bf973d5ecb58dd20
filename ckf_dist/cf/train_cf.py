"""Training of the CF model (CKEM: biased MF, BPR-MF or LightGCN), top to bottom: read the prepared splits, fit
with the chosen solver (sgd.py: mini-batch Adam; als.py: ALS for MF) and early stopping on validation, evaluate on
test, export the tables. One code path for 1 process, N gloo ranks on CPU and N NCCL ranks on GPUs (torchrun,
deepspeed, Ray Train: ray_runner.py); the solvers make N ranks take the steps 1 rank takes.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ckf_dist import comm
from ckf_dist.cf.als import ALSSolver
from ckf_dist.cf.data import Interactions, check_ids, read_id_space, read_split
from ckf_dist.cf.evaluate import ranking_metrics, rating_metrics, user_groups
from ckf_dist.cf.lightgcn import LightGCN, normalized_adjacency
from ckf_dist.cf.mf import BPRMF, BiasedMF
from ckf_dist.cf.sgd import SGDSolver
from ckf_dist.cf.solver import Solver, dist_info
from ckf_dist.config import CFConfig, RunConfig
from ckf_dist.data.schema import manifest_sha256


@dataclass
class FitResult:
    """A trained CF model and its training record.

    Args:
        model: the model with the best validation weights restored.
        best_epoch: 1-based epoch of the best validation metric (the last epoch when there is no validation).
        best_valid: that metric (RMSE for MF, NDCG@10 for the ranking models), None without validation.
        history: one dict per epoch (loss, valid metric, seconds).
        rating_range: (min, max) training rating; MF predictions are clamped to it.
    """

    model: nn.Module
    best_epoch: int
    best_valid: float | None
    history: list[dict[str, float]] = field(default_factory=list)
    rating_range: tuple[float, float] = (1.0, 5.0)


def default_device() -> torch.device:
    """The collective device under a process group (cuda under NCCL, cpu under gloo: ckf_dist/comm.py), so the
    gradient all-reduces need no copies; without one, cuda:LOCAL_RANK when CUDA is present, else cpu."""
    if dist.is_available() and dist.is_initialized():
        return comm.device()
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def build_model(cfg: CFConfig, train: Interactions, num_users: int, num_items: int) -> nn.Module:
    """The model named by cfg.model, initialised from cfg.seed (identically on every rank)."""
    torch.manual_seed(cfg.seed)
    if cfg.model == "mf":
        return BiasedMF(num_users, num_items, cfg.dim, global_mean=float(train.rating.mean()))
    if cfg.model == "bpr":
        return BPRMF(num_users, num_items, cfg.dim)
    if cfg.model == "lightgcn":
        adj = normalized_adjacency(train.uid, train.iid, num_users, num_items)
        return LightGCN(num_users, num_items, cfg.dim, adj, num_layers=cfg.num_layers)
    raise ValueError(f"cf.model must be 'mf', 'bpr' or 'lightgcn', got {cfg.model!r}")


def validation_metric(model: nn.Module, kind: str, train: Interactions, valid: Interactions, num_items: int,
                      rating_range: tuple[float, float], device: torch.device) -> float:
    """MF: RMSE of clamped predictions (lower is better); BPR/LightGCN: all-item NDCG@10 (higher is better)."""
    model.eval()
    with torch.no_grad():
        if kind == "mf":
            pred = model(valid.uid.to(device), valid.iid.to(device)).clamp(*rating_range).cpu()
            out = float(((pred - valid.rating) ** 2).mean().sqrt())
        else:
            groups = {"": np.ones(len(valid), dtype=bool)}
            out = ranking_metrics(lambda u: model.full_scores(u.to(device)), valid, [train], num_items, groups,
                                  ks=(10,), prefix="")["ndcg@10"]
    model.train()
    return out


def fit(cfg: CFConfig, train: Interactions, valid: Interactions | None, num_users: int, num_items: int,
        device: torch.device | None = None, writer: Any = None, progress: bool = False) -> FitResult:
    """Train cfg.model on `train` (data-parallel when a process group is running), early-stopping on `valid`.

    Args:
        cfg: the cf section (model, solver, dim, lr, weight_decay = per-sample L2, batch_size = global batch,
            epochs, patience: epochs without improvement before stopping, 0 = never stop early).
        train / valid: interactions with ids inside the id map; valid may be None or empty (no early stopping).
        num_users / num_items: the id map sizes.
        device: default `default_device()`.
        writer: a TensorBoard SummaryWriter (rank 0) or None.
        progress: show a tqdm bar (rank 0).

    Returns:
        The model with its best validation weights restored, and the per-epoch record.

    Raises:
        ValueError: empty training split, ids outside the id map.
        NonFiniteLossError: the loss became NaN/inf (on every rank at the same step).
    """
    rank, world = dist_info()
    if len(train) == 0:
        raise ValueError(f"{train.source}: the training split is empty; the CF model needs interactions")
    check_ids(train, num_users, num_items)
    if valid is not None:
        check_ids(valid, num_users, num_items)
        if len(valid) == 0:
            valid = None
    device = device or default_device()
    rating_range = (float(train.rating.min()), float(train.rating.max()))
    model = build_model(cfg, train, num_users, num_items).to(device)
    if world > 1:  # same seed gives the same init; broadcasting makes it a guarantee (e.g. different BLAS paths)
        for p in model.parameters():
            comm.broadcast_(p.data, src=0)
    solver: Solver = (ALSSolver(cfg, model, train, device) if cfg.model == "mf" and cfg.solver == "als"
                      else SGDSolver(cfg, model, train, num_items, device))
    lower_is_better = cfg.model == "mf"
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (metric, epoch, weights)
    history: list[dict[str, float]] = []
    bad_epochs = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, desc=f"cf/{cfg.model}", unit="epoch")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        loss = solver.run_epoch(epoch)
        rec = {"epoch": float(epoch), "train/loss": loss, "seconds": time.perf_counter() - t0}
        if valid is not None:
            v = validation_metric(model, cfg.model, train, valid, num_items, rating_range, device)
            rec["valid/rmse" if lower_is_better else "valid/ndcg@10"] = v
            if best is None or (v < best[0] if lower_is_better else v > best[0]):
                best, bad_epochs = (v, epoch, copy.deepcopy(model.state_dict())), 0
            else:
                bad_epochs += 1
        history.append(rec)
        if writer is not None:
            for k, val in rec.items():
                if k != "epoch":
                    writer.add_scalar(k, val, epoch)
        if bar is not None:
            bar.set_postfix({k: f"{v:.4f}" for k, v in rec.items() if "/" in k})
            bar.update(1)
        if cfg.patience > 0 and bad_epochs >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    if best is not None:
        model.load_state_dict(best[2])
        return FitResult(model, best[1], best[0], history, rating_range)
    return FitResult(model, len(history), None, history, rating_range)


def evaluate_fit(res: FitResult, kind: str, train: Interactions, valid: Interactions | None, test: Interactions,
                 num_items: int, cold_threshold: int, ks: list[int], device: torch.device,
                 seed: int = 0) -> dict[str, float | None]:
    """Test metrics of a trained model, overall / warm / cold: RMSE/MAE (MF) and all-item HR@K, NDCG@K, AUC, UAUC.

    Known interactions (training and validation) are excluded from the ranking candidates.
    """
    if len(test) == 0:
        return {}
    model = res.model.eval()
    counts = torch.bincount(train.uid, minlength=int(max(train.uid.max(), test.uid.max())) + 1)
    groups = user_groups(test.uid, counts, cold_threshold)
    out: dict[str, float | None] = {}
    with torch.no_grad():
        if kind == "mf":
            pred = model(test.uid.to(device), test.iid.to(device)).clamp(*res.rating_range).cpu()
            out.update(rating_metrics(pred, test, groups))

            def scores(u: torch.Tensor) -> torch.Tensor:
                u = u.to(device)
                return model.user(u) @ model.item.weight.T + model.item_bias.weight.T + \
                    model.user_bias(u) + model.global_bias
        else:
            def scores(u: torch.Tensor) -> torch.Tensor:
                return model.full_scores(u.to(device))
        known = [train] + ([valid] if valid is not None and len(valid) else [])
        out.update(ranking_metrics(scores, test, known, num_items, groups, ks=ks, seed=seed))
    return out


def train_cf(cfg: RunConfig) -> dict[str, float | None]:
    """Train cfg.cf.model on <data.prepared_dir>/interactions/train.parquet and export it to cfg.cf_embeddings_path.

    Data-parallel over the running process group (torchrun / deepspeed / Ray Train; every rank must call this),
    single-process otherwise. Rank 0 writes TensorBoard curves to <log.run_dir>/tb/cf, the tables and
    <log.run_dir>/cf/metrics.json. Returns the final metrics (valid and test), the same on every rank.

    Raises:
        FileNotFoundError: the data is not prepared.
        ValueError: empty training split, ids outside the id map, diverged training (NonFiniteLossError).
    """
    from ckf_dist.cf.export import save_cf_embeddings

    rank, world = dist_info()
    prepared = Path(cfg.data.prepared_dir)
    ids = read_id_space(prepared)
    train = read_split(prepared, "train", ids)
    valid = read_split(prepared, "valid", ids, allow_empty=True)
    test = read_split(prepared, "test", ids, allow_empty=True)
    sha = manifest_sha256(prepared)
    device = default_device()
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(Path(cfg.log.run_dir) / "tb" / "cf"))
    try:
        res = fit(cfg.cf, train, valid, ids.num_users, ids.num_items, device=device, writer=writer,
                  progress=cfg.log.progress)
        metrics: dict[str, float | None] = {"best_epoch": float(res.best_epoch), "epochs_run": float(len(res.history))}
        metrics["valid/rmse" if cfg.cf.model == "mf" else "valid/ndcg@10"] = res.best_valid
        metrics.update(evaluate_fit(res, cfg.cf.model, train, valid, test, ids.num_items, cfg.data.cold_threshold,
                                    cfg.eval.ks, device, seed=cfg.data.seed))
        if writer is not None:
            for k, v in metrics.items():
                if v is not None and "/" in k:
                    writer.add_scalar(f"final/{k}", v, res.best_epoch)
    finally:
        if writer is not None:
            writer.close()
    if rank == 0:
        import json

        tables = res.model.tables()
        meta = {"d": cfg.cf.dim, "model": cfg.cf.model, "manifest_sha256": sha, "num_users": ids.num_users,
                "num_items": ids.num_items, "idmap_sha256": ids.checksum, "rating_min": res.rating_range[0],
                "rating_max": res.rating_range[1], "best_epoch": res.best_epoch, "seed": cfg.cf.seed,
                "world_size": world}
        save_cf_embeddings(cfg.cf_embeddings_path, tables["user"], tables["item"], meta,
                           user_bias=tables.get("user_bias"), item_bias=tables.get("item_bias"),
                           global_bias=tables.get("global_bias"))
        out_dir = Path(cfg.log.run_dir) / "cf"
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if world > 1:
        comm.barrier()  # the file exists for every rank once train_cf returns
    return metrics

