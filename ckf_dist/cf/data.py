"""Interaction tables for the CF stage (CKEM): read the prepared Parquet splits, check every id against the id map.

The prepared layout is `ckf_dist.data.schema`'s; users.parquet / items.parquet define the id space (uid 0..U-1,
iid 0..V-1) and their checksum travels with the exported embeddings, so tables trained on one id map are never
read against another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ckf_dist.data.schema import ITEMS, USERS, interactions_path


@dataclass
class Interactions:
    """(user, item, rating, time) rows with 0-based ids.

    Args:
        uid: (N,) int64 user ids.
        iid: (N,) int64 item ids.
        rating: (N,) float32 ratings.
        ts: (N,) int64 unix times.
        source: where the rows came from (named in error messages).
    """

    uid: torch.Tensor
    iid: torch.Tensor
    rating: torch.Tensor
    ts: torch.Tensor
    source: str = "<memory>"

    def __len__(self) -> int:
        return int(self.uid.numel())

    def subset(self, idx: torch.Tensor) -> Interactions:
        return Interactions(self.uid[idx], self.iid[idx], self.rating[idx], self.ts[idx], self.source)


@dataclass
class IdSpace:
    """The id map of a prepared dataset: how many users/items and a checksum of their raw ids.

    Args:
        num_users: U; valid user ids are 0..U-1.
        num_items: V; valid item ids are 0..V-1.
        checksum: sha256 over the (id, raw_id) rows of users.parquet then items.parquet.
    """

    num_users: int
    num_items: int
    checksum: str


def check_ids(rows: Interactions, num_users: int, num_items: int) -> None:
    """Raise ValueError naming the source, row and value of the first user/item id outside the id map."""
    for name, ids, n in (("uid", rows.uid, num_users), ("iid", rows.iid, num_items)):
        bad = ((ids < 0) | (ids >= n)).nonzero().flatten()
        if bad.numel():
            r = int(bad[0])
            raise ValueError(f"{rows.source}: row {r} has {name}={int(ids[r])} outside the id map 0..{n - 1} "
                             f"({bad.numel()} such rows); the split and users/items.parquet come from different "
                             f"preparations -- rerun prepare_data")
    if not torch.isfinite(rows.rating).all():
        r = int((~torch.isfinite(rows.rating)).nonzero()[0])
        raise ValueError(f"{rows.source}: row {r} has a non-finite rating {float(rows.rating[r])}")


def read_id_space(prepared_dir: str | Path) -> IdSpace:
    """Read users.parquet and items.parquet; ids must be exactly 0..N-1 in order.

    Raises:
        FileNotFoundError: a table is missing (data not prepared).
        ValueError: ids are not contiguous from 0 (names the file and first bad row).
    """
    root = Path(prepared_dir)
    h = hashlib.sha256()
    counts = []
    for fname, col in ((USERS, "uid"), (ITEMS, "iid")):
        path = root / fname
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; run prepare_data for {root} first")
        t = pq.read_table(path, columns=[col, "raw_id"])
        ids = t.column(col).to_numpy()
        if bad := np.flatnonzero(ids != np.arange(len(ids))).tolist():
            raise ValueError(f"{path}: row {bad[0]} has {col}={ids[bad[0]]}, expected {bad[0]} (ids must be 0..N-1 "
                             f"in order)")
        h.update(fname.encode())
        for i, raw in zip(ids.tolist(), t.column("raw_id").to_pylist()):
            h.update(f"{i}\t{raw}\n".encode())
        counts.append(len(ids))
    return IdSpace(num_users=counts[0], num_items=counts[1], checksum=h.hexdigest())


def read_split(prepared_dir: str | Path, split: str, ids: IdSpace, allow_empty: bool = False) -> Interactions:
    """Read `interactions/<split>.parquet` and check every id against the id map.

    Raises:
        FileNotFoundError: the split file is missing.
        ValueError: an id outside the id map, a non-finite rating, or an empty split (unless allow_empty).
    """
    path = interactions_path(prepared_dir, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run prepare_data for {prepared_dir} first")
    t = pq.read_table(path, columns=["uid", "iid", "rating", "ts"])
    rows = Interactions(uid=torch.from_numpy(t.column("uid").to_numpy().astype(np.int64)),
                        iid=torch.from_numpy(t.column("iid").to_numpy().astype(np.int64)),
                        rating=torch.from_numpy(t.column("rating").to_numpy().astype(np.float32)),
                        ts=torch.from_numpy(t.column("ts").to_numpy().astype(np.int64)), source=str(path))
    if len(rows) == 0 and not allow_empty:
        raise ValueError(f"{path}: the {split} split has no interactions; the CF model needs at least one "
                         f"(check the data source and data.k_core)")
    check_ids(rows, ids.num_users, ids.num_items)
    return rows

