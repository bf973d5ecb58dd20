"""Tiny low-rank interaction data in the prepared layout of `ckf_dist.data.schema`, for CF (CKEM) tests.

Ratings come from hidden user/item factors, so a CF model has real structure to learn; splits are chronological
leave-last-out per user (last = test, second last = valid), the project's protocol.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.data.schema import ITEMS, MANIFEST, SCHEMA_VERSION, USERS, interactions_path


def write_lowrank_prepared(out_dir: str | Path, num_users: int = 30, num_items: int = 40, rank: int = 3,
                           per_user: int = 10, noise: float = 0.3, seed: int = 0,
                           empty_train: bool = False) -> Path:
    """Write users/items/manifest and interactions/{train,valid,test}.parquet under out_dir; return out_dir.

    Args:
        per_user: interactions per user (>= 3: train, valid and test each get at least one).
        empty_train: write a training split with no rows (to test the error path).
    """
    if per_user < 3 or per_user > num_items:
        raise ValueError(f"per_user must be within [3, num_items={num_items}], got {per_user}")
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(size=(num_users, rank)), rng.normal(size=(num_items, rank))
    rows: dict[str, list] = {s: [] for s in ("train", "valid", "test")}
    for u in range(num_users):
        items = rng.choice(num_items, size=per_user, replace=False)
        ts = np.sort(rng.integers(10**9, 10**9 + 10**6, size=per_user))
        affinity = pu[u] @ qi[items].T / np.sqrt(rank) + noise * rng.normal(size=per_user)
        ratings = np.clip(np.round(3 + 1.2 * affinity), 1, 5)
        for n, (i, r, t) in enumerate(zip(items, ratings, ts)):
            split = "test" if n == per_user - 1 else "valid" if n == per_user - 2 else "train"
            rows[split].append((u, int(i), float(r), int(t)))
    out = Path(out_dir)
    (out / "interactions").mkdir(parents=True, exist_ok=True)
    for split, r in rows.items():
        if split == "train" and empty_train:
            r = []
        a = np.array(r, dtype=np.float64).reshape(-1, 4)
        table = pa.table({"uid": pa.array(a[:, 0].astype(np.int32)), "iid": pa.array(a[:, 1].astype(np.int32)),
                          "rating": pa.array(a[:, 2].astype(np.float32)), "ts": pa.array(a[:, 3].astype(np.int64)),
                          "review": pa.array([""] * len(a), pa.string())})
        pq.write_table(table, interactions_path(out, split))
    n_train = np.bincount(np.array([x[0] for x in rows["train"]], dtype=np.int64), minlength=num_users)
    pq.write_table(pa.table({"uid": pa.array(np.arange(num_users, dtype=np.int32)),
                             "raw_id": pa.array([f"u{u}" for u in range(num_users)]),
                             "n_train": pa.array(n_train.astype(np.int32)),
                             "is_cold": pa.array(n_train <= 5)}), out / USERS)
    pq.write_table(pa.table({"iid": pa.array(np.arange(num_items, dtype=np.int32)),
                             "raw_id": pa.array([f"i{i}" for i in range(num_items)]),
                             "title": pa.array([f"Item {i}" for i in range(num_items)])}), out / ITEMS)
    manifest = {"schema_version": SCHEMA_VERSION, "source": "cf-lowrank", "seed": seed, "num_users": num_users,
                "num_items": num_items, "counts": {k: len(v) for k, v in rows.items()}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out
