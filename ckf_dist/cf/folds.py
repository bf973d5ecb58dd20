"""Reader for the canonical MovieLens-100K 5-fold splits (`u{1..5}.base/.test`) used by the CKEM rating benchmark.

The files are tab separated `user item rating timestamp` lines with 1-based raw ids; this module maps them to the
0-based contiguous ids of the full `u.data` id space (943 users, 1,682 items), so every fold shares one id map.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ckf_dist.cf.data import Interactions
from ckf_dist.config import CFConfig

ML100K_USERS = 943
ML100K_ITEMS = 1682

ML100K_MF_CONFIG = CFConfig(model="mf", dim=32, lr=0.006, weight_decay=0.1, bias_weight_decay=0.0, batch_size=1024,
                            epochs=40, patience=2, seed=0)
"""Biased MF settings for the canonical folds (the benchmark's default): chosen on the 5% validation hold-outs of all
five u{k}.base files, 3 hold-out seeds each (never on a test file). Smaller batches reach a lower validation RMSE but
take more steps (512: same RMSE, 1.5x the time); bias L2 0 beats 0.1 by ~0.002."""

ML100K_ALS_CONFIG = CFConfig(model="mf", solver="als", dim=16, weight_decay=0.15, epochs=15, patience=2, seed=0)
"""Biased MF by ALS for the canonical folds (`cf_speed.py --solver als`): d and lambda chosen on fold 1's 5% validation
hold-out (d 8..64, lambda 0.05..0.3; never on a test file). Its validation RMSE stays ~0.006 above the SGD recipe's
(d 16..32, bias lambda 0.05..0.3, 3 hold-out seeds x 5 folds), so SGD is the default."""


def read_ml100k_file(path: str | Path) -> Interactions:
    """Read one ML-100K ratings file (`u.data`, `u1.base`, ...) into 0-based `Interactions`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line does not have 4 integer fields, or an id/rating is out of the ML-100K range
            (the message names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ML-100K ratings file not found: {path} (expected the GroupLens ml-100k folder)")
    try:  # fast path: the C parser; any malformed line falls back to the checking reader below
        a = np.loadtxt(path, dtype=np.int64, delimiter="\t", ndmin=2, encoding="latin-1")
        ok = a.shape[1] == 4 and len(a) > 0
    except ValueError:
        ok = False
    if ok:
        u, i, r = a[:, 0], a[:, 1], a[:, 2]
        ok = bool(((u >= 1) & (u <= ML100K_USERS) & (i >= 1) & (i <= ML100K_ITEMS) & (r >= 1) & (r <= 5)).all())
    if not ok:
        a = _read_checked(path)
    a = a.copy()
    a[:, :2] -= 1  # 1-based raw ids -> 0-based
    return Interactions(uid=torch.from_numpy(a[:, 0].copy()), iid=torch.from_numpy(a[:, 1].copy()),
                        rating=torch.from_numpy(a[:, 2].astype(np.float32)), ts=torch.from_numpy(a[:, 3].copy()),
                        source=str(path))


def _read_checked(path: Path) -> np.ndarray:
    """Line-by-line reader that names the first bad line (file:line and what is wrong)."""
    rows: list[tuple[int, int, int, int]] = []
    with open(path, encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 4:
                raise ValueError(f"{path}:{n}: expected 4 tab-separated fields (user item rating ts), got {line!r}")
            try:
                u, i, r, t = (int(p) for p in parts)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: non-integer field in {line!r}") from e
            if not (1 <= u <= ML100K_USERS and 1 <= i <= ML100K_ITEMS and 1 <= r <= 5):
                raise ValueError(f"{path}:{n}: user {u} / item {i} / rating {r} outside ML-100K's ranges "
                                 f"(users 1..{ML100K_USERS}, items 1..{ML100K_ITEMS}, ratings 1..5)")
            rows.append((u, i, r, t))
    if not rows:
        raise ValueError(f"{path}: no ratings in the file")
    return np.asarray(rows, dtype=np.int64)


def read_ml100k_fold(root: str | Path, fold: int) -> tuple[Interactions, Interactions]:
    """Return (train, test) of canonical fold `fold` in 1..5 from `<root>/u{fold}.base` and `u{fold}.test`."""
    if fold not in range(1, 6):
        raise ValueError(f"ML-100K canonical folds are 1..5, got {fold}")
    root = Path(root)
    return read_ml100k_file(root / f"u{fold}.base"), read_ml100k_file(root / f"u{fold}.test")


def holdout(rows: Interactions, frac: float, seed: int) -> tuple[Interactions, Interactions]:
    """Split off a seeded random `frac` of the rows as a validation set (for early stopping inside a fold)."""
    if not 0.0 < frac < 1.0:
        raise ValueError(f"validation fraction must be within (0, 1), got {frac}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(frac * len(rows)))
    return rows.subset(perm[n_val:]), rows.subset(perm[:n_val])


def run_ml100k_fold(root: str | Path, fold: int, cfg: CFConfig, valid_frac: float = 0.05) -> dict[str, float]:
    """Train biased MF on u{fold}.base (minus a validation hold-out for early stopping), test on u{fold}.test.

    Returns test RMSE / MAE of clamped predictions, the chosen epoch and the wall time (seconds, reading included).
    """
    from ckf_dist.cf.train_cf import fit

    t0 = time.perf_counter()
    base, test = read_ml100k_fold(root, fold)
    train, valid = holdout(base, valid_frac, seed=cfg.seed + fold)
    res = fit(cfg, train, valid, ML100K_USERS, ML100K_ITEMS, device=torch.device("cpu"))
    with torch.no_grad():
        pred = res.model(test.uid, test.iid).clamp(*res.rating_range)
    err = pred - test.rating
    return {"fold": float(fold), "rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean()),
            "best_epoch": float(res.best_epoch), "valid_rmse": float(res.best_valid or float("nan")),
            "seconds": time.perf_counter() - t0}
