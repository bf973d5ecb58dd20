"""Data-parallel training of the CF model (CKEM: biased MF, BPR-MF or LightGCN) and export of its tables.

One code path for 1 process, N gloo ranks on CPU and N NCCL ranks on GPUs (torchrun, deepspeed, Ray Train): every
rank draws the same global batch order from the seed, computes the loss of its contiguous shard of each global
batch divided by the global batch size, and the gradients are summed with one all-reduce per step -- so N workers
take exactly the steps 1 worker takes on the same global batches (up to float summation order).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.adam import adam

from ckf_dist.cf.data import Interactions, check_ids, read_id_space, read_split
from ckf_dist.cf.evaluate import ranking_metrics, rating_metrics, user_groups
from ckf_dist.cf.lightgcn import LightGCN, normalized_adjacency
from ckf_dist.cf.mf import BPRMF, BiasedMF
from ckf_dist.config import CFConfig, RunConfig
from ckf_dist.data.schema import manifest_sha256


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (diverged); raised on every rank at the same step."""


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


def dist_info() -> tuple[int, int]:
    """(rank, world) of the running process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def default_device() -> torch.device:
    """cuda:LOCAL_RANK under an NCCL group (or a single process with CUDA), else cpu (gloo all-reduces CPU tensors)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if dist.is_available() and dist.is_initialized() and dist.get_backend() != "nccl":
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


class NegativeSampler:
    """Uniform negatives: items the user has no training interaction with (rejection sampling, seeded).

    Args:
        train: the training interactions (the positives).
        num_items: V.
    """

    def __init__(self, train: Interactions, num_items: int) -> None:
        self.num_items = num_items
        self.keys = torch.unique(train.uid * num_items + train.iid)  # sorted
        distinct = torch.bincount(self.keys // num_items)  # distinct training items per user
        if (full := (distinct >= num_items).nonzero().flatten()).numel():
            raise ValueError(f"{train.source}: user {int(full[0])} has interacted with all {num_items} items; "
                             f"no negative can be sampled for BPR (drop such users or use cf.model=mf)")

    def sample(self, uid: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        neg = torch.randint(self.num_items, uid.shape, generator=g)
        for _ in range(1000):
            hit = torch.isin(uid * self.num_items + neg, self.keys)
            if not hit.any():
                return neg
            neg[hit] = torch.randint(self.num_items, (int(hit.sum()),), generator=g)
        raise RuntimeError("negative sampling did not converge in 1000 rounds (users with almost every item)")


def _allreduce_grads(params: list[nn.Parameter], loss: torch.Tensor, world: int) -> float:
    """Sum every (dense, in-place) gradient and the loss over ranks with one flat all-reduce; return the global
    loss. The .grad tensors keep their identity (the optimizer holds them)."""
    if world == 1:
        return float(loss.detach())
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    off = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[off:off + n].view_as(p.grad))
        off += n
    return float(flat[-1])


class _Adam:
    """torch.optim.Adam (default betas and eps, no weight decay) through its functional form `torch.optim.adam.adam`.

    The same update (fused kernel), at about half the per-step Python cost of `Optimizer.step` (hooks, profiler
    records, parameter-group walk), which is a large share of a CF step on small tables.

    Args:
        params: the parameters, each with a dense `.grad` that stays in place (zeroed by `zero_grad`).
        lr: the learning rate.
    """

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        self.params, self.grads, self.lr = params, [p.grad for p in params], lr
        assert all(g is not None for g in self.grads), "give every parameter a dense .grad first"
        self.exp_avgs = [torch.zeros_like(p) for p in params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        self.steps = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        self.fused = all(p.device.type in ("cpu", "cuda") for p in params)

    def zero_grad(self) -> None:
        torch._foreach_zero_(self.grads)

    @torch.no_grad()
    def step(self) -> None:
        assert all(p.grad is g for p, g in zip(self.params, self.grads)), "a .grad was replaced, not accumulated"
        adam(self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, [], self.steps, fused=self.fused,
             amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)


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
        cfg: the cf section (model, dim, lr, weight_decay = per-sample L2, batch_size = global batch, epochs,
            patience: epochs without improvement before stopping, 0 = never stop early).
        train / valid: interactions with ids inside the id map; valid may be None or empty (no early stopping).
        num_users / num_items: the id map sizes.
        device: default `default_device()`.
        writer: a TensorBoard SummaryWriter (rank 0) or None.
        progress: show a tqdm bar (rank 0).

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
    params = [p for p in model.parameters()]
    if world > 1:  # same seed gives the same init; broadcasting makes it a guarantee (e.g. different BLAS paths)
        for p in params:
            dist.broadcast(p.data, src=0)
    if cfg.model == "mf" and cfg.solver == "als":
        return _fit_als(cfg, model, train, valid, rating_range, device, writer)
    for p in params:  # dense gradients from the first step on (add_mse_grads and backward accumulate into them)
        p.grad = torch.zeros_like(p)
    opt = _Adam(params, cfg.lr)
    sampler = NegativeSampler(train, num_items) if cfg.model != "mf" else None
    lower_is_better = cfg.model == "mf"
    n, bs = len(train), cfg.batch_size
    steps_per_epoch = math.ceil(n / bs)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, float]] = []
    bad_epochs = 0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, desc=f"cf/{cfg.model}", unit="epoch")
    g = torch.Generator()
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        g.manual_seed(cfg.seed * 100_003 + epoch)  # the same global order on every rank, whatever the world size
        perm = torch.randperm(n, generator=g)
        # the epoch's rows in batch order, gathered once: each step below slices views (steps are ~0.3 ms each)
        e_uid, e_iid, e_rating = train.uid[perm], train.iid[perm], train.rating[perm]
        d_uid, d_iid, d_rating = e_uid.to(device), e_iid.to(device), e_rating.to(device)
        epoch_loss = 0.0
        for s in range(0, n, bs):
            nb = min(bs, n - s)  # this step's global batch is rows s:s+nb of the epoch order
            gneg = sampler.sample(e_uid[s:s + nb], g) if sampler is not None else None  # drawn on all ranks alike
            u, i = d_uid[s:s + nb].tensor_split(world)[rank], d_iid[s:s + nb].tensor_split(world)[rank]  # my shard
            opt.zero_grad()
            if cfg.model == "mf":  # hand-derived gradient of the same loss (autograd's embedding backward is slow)
                r = d_rating[s:s + nb].tensor_split(world)[rank]
                loss = model.add_mse_grads(u, i, r, cfg.weight_decay, nb, cfg.bias_weight_decay)
            else:
                neg = gneg.tensor_split(world)[rank].to(device)
                sp, sn, l2 = model.bpr_terms(u, i, neg)
                loss = (-nn.functional.logsigmoid(sp - sn).sum() + cfg.weight_decay * l2.sum()) / nb
                loss.backward()
            global_loss = _allreduce_grads(params, loss, world)
            if not math.isfinite(global_loss):
                raise NonFiniteLossError(
                    f"cf.{cfg.model}: the training loss became {global_loss} at epoch {epoch}, step {step} "
                    f"(lr={cfg.lr}, weight_decay={cfg.weight_decay}); lower cf.lr or check the ratings for "
                    f"extreme values")
            opt.step()
            epoch_loss += global_loss
            step += 1
        rec = {"epoch": float(epoch), "train/loss": epoch_loss / steps_per_epoch, "seconds": time.perf_counter() - t0}
        if valid is not None:
            v = validation_metric(model, cfg.model, train, valid, num_items, rating_range, device)
            rec["valid/rmse" if lower_is_better else "valid/ndcg@10"] = v
            best, bad_epochs = _track_best(v, lower_is_better, best, bad_epochs, model, epoch)
        _record_epoch(rec, epoch, history, writer)
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


def _als_half(sel: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, resid: torch.Tensor,
              other: torch.Tensor, lam: float, world: int) -> torch.Tensor:
    """Ridge solution x_r = (sum_c o_c o_c^T + lam n_r I)^-1 sum_c resid o_c for every row r (batched).

    `sel` is the sparse (R, C) rating pattern of this rank's rows, `other` the (C, k) fixed side. The normal
    equations are all-reduced over ranks before solving, so the result does not depend on the world size.
    """
    k = other.shape[1]
    A = torch.sparse.mm(sel, (other[:, :, None] * other[:, None, :]).reshape(-1, k * k))  # (R, k*k)
    b = torch.zeros(sel.shape[0], k, dtype=other.dtype, device=other.device)
    b.index_add_(0, rows, other[cols] * resid[:, None])
    n = torch.bincount(rows, minlength=sel.shape[0]).to(other.dtype)
    if world > 1:
        flat = torch.cat([A.reshape(-1), b.reshape(-1), n])
        dist.all_reduce(flat)
        A, b, n = flat[:A.numel()].view_as(A), flat[A.numel():A.numel() + b.numel()].view_as(b), flat[-len(n):]
    A = A.view(-1, k, k) + (lam * n.clamp(min=1))[:, None, None] * torch.eye(k, dtype=other.dtype, device=other.device)
    return torch.linalg.solve(A, b)  # rows without ratings: A = lam I, b = 0 -> x = 0


def _track_best(v: float, lower_is_better: bool, best, bad_epochs: int, model: torch.nn.Module, epoch: int):
    """Early-stopping bookkeeping shared by both solvers: keep the best weights, count epochs without improvement."""
    if best is None or (v < best[0] if lower_is_better else v > best[0]):
        return (v, epoch, copy.deepcopy(model.state_dict())), 0
    return best, bad_epochs + 1


def _record_epoch(rec: dict[str, float], epoch: int, history: list[dict[str, float]], writer) -> None:
    history.append(rec)
    if writer is not None:
        for k, val in rec.items():
            if k != "epoch":
                writer.add_scalar(k, val, epoch)


def _fit_als(cfg: CFConfig, model: BiasedMF, train: Interactions, valid: Interactions | None,
             rating_range: tuple[float, float], device: torch.device, writer: Any) -> FitResult:
    """Biased MF by alternating least squares (cf.solver=als): [p_u, b_u] then [q_i, b_i] in closed form per epoch.

    The user step regresses r - mu - b_i on [q_i, 1], the item step r - mu - b_u on [p_u, 1], each with ridge
    lambda * (rating count) (weighted-lambda regularisation, Zhou et al. 2008); mu stays the training mean.
    Data-parallel: each rank builds the normal equations of its contiguous shard of the ratings, one all-reduce
    per half-sweep sums them, and every rank solves the same system (N ranks == 1 rank up to summation order).
    Early stopping on valid RMSE as in the SGD path.
    """
    rank, world = dist_info()
    mine = torch.arange(len(train)).tensor_split(world)[rank]
    uid, iid = train.uid[mine].to(device), train.iid[mine].to(device)
    r = train.rating[mine].to(device).float()
    U, V = model.user.weight.shape[0], model.item.weight.shape[0]
    ones = torch.ones(len(uid), device=device)
    by_user = torch.sparse_coo_tensor(torch.stack([uid, iid]), ones, (U, V)).coalesce().to_sparse_csr()
    by_item = torch.sparse_coo_tensor(torch.stack([iid, uid]), ones, (V, U)).coalesce().to_sparse_csr()
    lam = cfg.weight_decay
    with torch.no_grad():
        # from the SGD path's 0.01 init, heavy ridge shrinks the factors to the all-zero fixed point in one sweep
        model.item.weight.normal_(0.0, 1.0 / math.sqrt(cfg.dim), generator=torch.Generator().manual_seed(cfg.seed))
        mu = model.global_bias
        P, Q = model.user.weight, model.item.weight
        bu, bi = model.user_bias.weight[:, 0], model.item_bias.weight[:, 0]
        col = torch.ones(max(U, V), 1, device=device)
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        history: list[dict[str, float]] = []
        bad_epochs = 0
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            x = _als_half(by_user, uid, iid, r - mu - bi[iid], torch.cat([Q, col[:V]], 1), lam, world)
            P.copy_(x[:, :-1])
            bu.copy_(x[:, -1])
            x = _als_half(by_item, iid, uid, r - mu - bu[uid], torch.cat([P, col[:U]], 1), lam, world)
            Q.copy_(x[:, :-1])
            bi.copy_(x[:, -1])
            err = mu + bu[uid] + bi[iid] + (P[uid] * Q[iid]).sum(-1) - r
            loss = torch.stack([(err * err).sum(), torch.tensor(float(len(err)), device=device)])
            if world > 1:
                dist.all_reduce(loss)
            train_mse = float(loss[0] / loss[1])
            if not math.isfinite(train_mse):
                raise NonFiniteLossError(f"cf.mf (als): the training loss became {train_mse} at epoch {epoch} "
                                         f"(weight_decay={cfg.weight_decay}); raise cf.weight_decay")
            rec = {"epoch": float(epoch), "train/loss": train_mse, "seconds": time.perf_counter() - t0}
            if valid is not None:
                v = validation_metric(model, "mf", train, valid, 0, rating_range, device)
                rec["valid/rmse"] = v
                best, bad_epochs = _track_best(v, True, best, bad_epochs, model, epoch)
            _record_epoch(rec, epoch, history, writer)
            if cfg.patience > 0 and bad_epochs >= cfg.patience:
                break
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
        dist.barrier()  # the file exists for every rank once train_cf returns
    return metrics


def run_ray_train(cfg: RunConfig, num_workers: int) -> dict[str, float | None]:
    """Run `train_cf(cfg)` as a Ray Train TorchTrainer job with `num_workers` data-parallel workers.

    Connects to the cluster named by RAY_ADDRESS, else starts a small local Ray. Returns rank 0's metrics (read
    back from <log.run_dir>/cf/metrics.json, which must be on storage the driver sees).

    Raises:
        ValueError: num_workers < 1.
        RuntimeError: the Ray job failed (its error is chained).
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            ray.init(num_cpus=max(8, num_workers + 2), object_store_memory=512 * 2**20, include_dashboard=False)
    use_gpu = torch.cuda.is_available()
    cfg_dict = cfg.to_dict()
    # Ray workers may run in another working directory: hand them absolute paths.
    cfg_dict["data"]["prepared_dir"] = str(Path(cfg.data.prepared_dir).resolve())
    cfg_dict["log"]["run_dir"] = str(Path(cfg.log.run_dir).resolve())
    cfg_dict["cf"]["embeddings_path"] = str(cfg.cf_embeddings_path.resolve())
    cfg_dict["log"]["progress"] = False  # worker stdout is forwarded line by line; a bar would flood it
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg_dict},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RayRunConfig(name="cf", storage_path=str(Path(cfg.log.run_dir, "ray").resolve())),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors; keep the chain, name the job
        raise RuntimeError(f"Ray Train CF job ({num_workers} workers) failed: {e}") from e
    if getattr(result, "error", None):
        raise RuntimeError(f"Ray Train CF job ({num_workers} workers) failed: {result.error}")
    # Ray Train v2 keeps reported metrics only alongside checkpoints; rank 0's metrics.json is the record.
    import json

    return json.loads((Path(cfg_dict["log"]["run_dir"]) / "cf" / "metrics.json").read_text())


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train

    from ckf_dist.config import config_from_dict

    metrics = train_cf(config_from_dict(config["cfg"]))
    ray.train.report({k: v for k, v in metrics.items() if v is not None})
