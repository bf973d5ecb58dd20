"""CF stage (CKEM) benchmarks on MovieLens-100K, read by path (never copied into the repository).

rating:  biased MF on the canonical 5 folds u1..u5 (early stopping on a 5% hold-out of each u{k}.base; test on
         u{k}.test), per-fold RMSE / MAE / seconds, next to a baseline run in the same process: Surprise's SVD
         (default settings) when `scikit-surprise` is installed, else a plain single-process PyTorch MF loop.
ranking: LightGCN vs BPR-MF on the chronological leave-last-out split (prepared by ckf_dist.data.preprocess),
         all-item HR@10 / NDCG@10 with known interactions excluded, overall / warm / cold.

    python benchmarks/cf_speed.py --data ../shared/data/ml-100k                      # both parts
    python benchmarks/cf_speed.py --part rating --folds 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch

from ckf_dist.cf.folds import (
    ML100K_ALS_CONFIG,
    ML100K_ITEMS,
    ML100K_MF_CONFIG,
    ML100K_USERS,
    read_ml100k_fold,
    run_ml100k_fold,
)
from ckf_dist.config import CFConfig


def surprise_svd_fold(root: Path, fold: int) -> dict[str, float]:
    """Surprise's SVD (biased MF by SGD; n_factors=100, 20 epochs, lr 0.005, reg 0.02) on one canonical fold."""
    from surprise import SVD, Dataset, Reader, accuracy
    from surprise.model_selection import PredefinedKFold

    t0 = time.perf_counter()
    reader = Reader(line_format="user item rating timestamp", sep="\t")
    data = Dataset.load_from_folds([(str(root / f"u{fold}.base"), str(root / f"u{fold}.test"))], reader)
    (trainset, testset), = PredefinedKFold().split(data)
    algo = SVD(random_state=0)
    algo.fit(trainset)
    preds = algo.test(testset)
    return {"rmse": accuracy.rmse(preds, verbose=False), "mae": accuracy.mae(preds, verbose=False),
            "seconds": time.perf_counter() - t0}


def torch_sgd_mf_fold(root: Path, fold: int, dim: int = 100, epochs: int = 20, lr: float = 0.005,
                      reg: float = 0.02, batch_size: int = 128) -> dict[str, float]:
    """Fallback baseline: a plain single-process PyTorch biased-MF loop with Surprise SVD's settings.

    Summed (not averaged) squared errors + per-sample L2 with plain SGD, so each step applies the sum of the
    per-rating SGD updates of its mini-batch (a per-rating Python loop would take minutes per fold).
    """
    t0 = time.perf_counter()
    train, test = read_ml100k_fold(root, fold)
    g = torch.Generator().manual_seed(0)
    p = (torch.randn(ML100K_USERS, dim, generator=g) * 0.1).requires_grad_()
    q = (torch.randn(ML100K_ITEMS, dim, generator=g) * 0.1).requires_grad_()
    bu, bi = torch.zeros(ML100K_USERS, requires_grad=True), torch.zeros(ML100K_ITEMS, requires_grad=True)
    mu = float(train.rating.mean())
    opt = torch.optim.SGD([p, q, bu, bi], lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(train), generator=g)
        for s in range(0, len(train), batch_size):
            b = perm[s:s + batch_size]
            u, i = train.uid[b], train.iid[b]
            pu, qi = p[u], q[i]
            err = mu + bu[u] + bi[i] + (pu * qi).sum(-1) - train.rating[b]
            loss = 0.5 * ((err * err).sum() + reg * ((pu * pu).sum() + (qi * qi).sum() + (bu[u] ** 2).sum()
                                                     + (bi[i] ** 2).sum()))
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = (mu + bu[test.uid] + bi[test.iid] + (p[test.uid] * q[test.iid]).sum(-1)).clamp(1, 5)
    err = pred - test.rating
    return {"rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean()),
            "seconds": time.perf_counter() - t0}


def rating_part(root: Path, folds: list[int], baseline_name: str = "auto", solver: str = "sgd") -> dict[str, object]:
    MF_CFG = ML100K_ALS_CONFIG if solver == "als" else ML100K_MF_CONFIG
    try:
        import surprise  # noqa: F401

        have_surprise = True
    except ImportError:
        have_surprise = False
    if baseline_name == "surprise" and not have_surprise:
        raise SystemExit("--baseline surprise needs `pip install scikit-surprise`")
    if baseline_name == "surprise" or (baseline_name == "auto" and have_surprise):
        baseline, base_fn = "Surprise SVD", surprise_svd_fold
    else:
        baseline, base_fn = "plain PyTorch SGD MF loop (Surprise SVD settings)", torch_sgd_mf_fold
    rows = []
    t_ours = t_base = 0.0
    for f in folds:
        t0 = time.perf_counter()
        ours = run_ml100k_fold(root, f, MF_CFG)
        t_ours += time.perf_counter() - t0
        t0 = time.perf_counter()
        base = base_fn(root, f)
        t_base += time.perf_counter() - t0
        rows.append({"fold": f, "rmse": ours["rmse"], "mae": ours["mae"], "epoch": int(ours["best_epoch"]),
                     "s": ours["seconds"], "base_rmse": base["rmse"], "base_mae": base["mae"],
                     "base_s": base["seconds"]})
    print(f"\nbiased MF (solver={MF_CFG.solver}, d={MF_CFG.dim}, lr={MF_CFG.lr}, L2={MF_CFG.weight_decay}, "
          f"batch={MF_CFG.batch_size}, epochs<={MF_CFG.epochs}) vs "
          f"{baseline}, torch threads={torch.get_num_threads()}")
    print(f"{'fold':>4} {'RMSE':>7} {'MAE':>7} {'epoch':>5} {'sec':>6} | {'base RMSE':>9} {'base MAE':>8} {'sec':>6}")
    for r in rows:
        print(f"u{r['fold']:<3} {r['rmse']:7.4f} {r['mae']:7.4f} {r['epoch']:5d} {r['s']:6.1f} | "
              f"{r['base_rmse']:9.4f} {r['base_mae']:8.4f} {r['base_s']:6.1f}")
    n = len(rows)
    mean = {k: sum(r[k] for r in rows) / n for k in ("rmse", "mae", "base_rmse", "base_mae")}
    print(f"mean {mean['rmse']:7.4f} {mean['mae']:7.4f} {'':5} {t_ours:6.1f} | {mean['base_rmse']:9.4f} "
          f"{mean['base_mae']:8.4f} {t_base:6.1f}")
    print(f"wall time ours / baseline = {t_ours:.1f} s / {t_base:.1f} s = {t_ours / t_base:.2f}x "
          f"({'faster' if t_ours < t_base else 'slower'}); RMSE {mean['rmse']:.4f} vs {mean['base_rmse']:.4f}")
    if hasattr(os, "getloadavg"):  # both sides share the CPU with whatever else runs: say how busy it was
        print("load average (1/5/15 min) after the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return {"baseline": baseline, "folds": rows, "mean": mean, "seconds": t_ours, "base_seconds": t_base,
            "time_ratio": t_ours / t_base}


def ranking_part(root: Path, prepared_dir: Path, cold_threshold: int, epochs: int, dim: int) -> dict[str, object]:
    from ckf_dist.cf.data import read_id_space, read_split
    from ckf_dist.cf.train_cf import evaluate_fit, fit
    from ckf_dist.config import load_config
    from ckf_dist.data.preprocess import prepare_data

    cfg = load_config(None, ["data.source=ml-100k", f"data.path={root}", "data.tasks=[ctr,topk,rating]",
                             f"data.prepared_dir={prepared_dir}"])
    prepare_data(cfg.data)  # idempotent: reuses a complete preparation of the same config
    ids = read_id_space(prepared_dir)
    train, valid, test = (read_split(prepared_dir, s, ids) for s in ("train", "valid", "test"))
    out: dict[str, object] = {}
    common = {"dim": dim, "lr": 0.005, "weight_decay": 1e-4, "batch_size": 2048, "epochs": epochs, "patience": 5,
              "seed": 0}
    for kind, extra in (("bpr", {}), ("lightgcn", {"num_layers": 3})):
        t0 = time.perf_counter()
        res = fit(CFConfig(model=kind, **common, **extra), train, valid, ids.num_users, ids.num_items,
                  device=torch.device("cpu"), progress=True)
        m = evaluate_fit(res, kind, train, valid, test, ids.num_items, cold_threshold, [10], torch.device("cpu"))
        m["best_epoch"], m["seconds"] = res.best_epoch, time.perf_counter() - t0
        out[kind] = m
    print(f"\nML-100K leave-last-out ({ids.num_users} users, {ids.num_items} items, {len(train)} train), all-item "
          f"ranking, train+valid items excluded, d={dim}; cold = <= {cold_threshold} training interactions")
    print(f"{'model':>9} {'HR@10':>7} {'NDCG@10':>8} {'AUC':>6} {'UAUC':>6} {'HR@10 warm/cold':>16} {'epoch':>5} "
          f"{'sec':>6}")
    for kind, m in out.items():
        cold = m.get("test/hr@10/cold")
        print(f"{kind:>9} {m['test/hr@10']:7.4f} {m['test/ndcg@10']:8.4f} {m['test/auc']:6.4f} {m['test/uauc']:6.4f} "
              f"{m['test/hr@10/warm']:7.4f}/{cold if cold is None else round(cold, 4)!s:>8} {m['best_epoch']:5d} "
              f"{m['seconds']:6.1f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ml-100k"),
                   help="the GroupLens ml-100k folder")
    p.add_argument("--part", choices=["rating", "ranking", "all"], default="all")
    p.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--baseline", choices=["auto", "surprise", "torch"], default="auto",
                   help="auto: Surprise's SVD when scikit-surprise is installed, else the plain PyTorch loop")
    p.add_argument("--solver", choices=["sgd", "als"], default="sgd",
                   help="biased MF solver: sgd (mini-batch Adam, ML100K_MF_CONFIG: mean RMSE ~0.912) or als "
                        "(ML100K_ALS_CONFIG: mean RMSE ~0.92)")
    p.add_argument("--prepared-dir", default="runs/bench/ml100k_prepared")
    p.add_argument("--cold-threshold", type=int, default=20,
                   help="ML-100K users have >= 20 ratings; 20 makes the sparsest users the 'cold' group")
    p.add_argument("--rank-epochs", type=int, default=60)
    p.add_argument("--rank-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: like single-threaded Surprise)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    root = Path(args.data)
    if not (root / "u1.base").is_file():
        raise SystemExit(f"ML-100K not found at {root} (expected u1.base ...); pass --data")
    torch.set_num_threads(args.threads)
    results: dict[str, object] = {}
    if args.part in ("rating", "all"):
        results["rating"] = rating_part(root, args.folds, args.baseline, args.solver)
    if args.part in ("ranking", "all"):
        results["ranking"] = ranking_part(root, Path(args.prepared_dir), args.cold_threshold, args.rank_epochs,
                                          args.rank_dim)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()
