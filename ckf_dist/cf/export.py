"""Export and load of the frozen CF tables (CKEM -> KFM hand-off) as safetensors, with the metadata CKF checks.

The metadata records d, the model type, the prepared data's manifest sha256 and id-map checksum, so the CKF stage
refuses tables built from other data instead of silently pairing embeddings with the wrong users/items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META_KEY = "ckf_cf_meta"
REQUIRED_META = ("d", "model", "manifest_sha256", "num_users", "num_items", "idmap_sha256")


@dataclass
class CFEmbeddings:
    """Frozen CF tables of one trained model.

    Args:
        user: (U, d) user table.
        item: (V, d) item table.
        meta: d, model ('mf' | 'bpr' | 'lightgcn'), manifest_sha256, num_users, num_items, idmap_sha256, and for
            MF rating_min / rating_max.
        user_bias / item_bias: (U,) / (V,) MF biases, else None.
        global_bias: (1,) MF global bias, else None.

    Example:
        >>> e = CFEmbeddings(torch.ones(2, 8), torch.ones(3, 8), {"model": "bpr"})
        >>> e.score(torch.tensor([0]), torch.tensor([2]))
        tensor([8.])
    """

    user: torch.Tensor
    item: torch.Tensor
    meta: dict[str, Any]
    user_bias: torch.Tensor | None = None
    item_bias: torch.Tensor | None = None
    global_bias: torch.Tensor | None = None

    def _check(self, uids: torch.Tensor, iids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uids, iids = torch.as_tensor(uids).long(), torch.as_tensor(iids).long()
        if uids.shape != iids.shape:
            raise ValueError(f"uids has shape {tuple(uids.shape)} but iids has {tuple(iids.shape)}")
        for name, ids, n in (("uid", uids, self.user.shape[0]), ("iid", iids, self.item.shape[0])):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
                bad = ids[(ids < 0) | (ids >= n)][0]
                raise ValueError(f"{name} {int(bad)} is outside the CF id map 0..{n - 1}; cold-start ids need a "
                                 f"fallback before scoring")
        return uids, iids

    def predict_rating(self, uids: torch.Tensor, iids: torch.Tensor) -> torch.Tensor:
        """(N,) predicted ratings mu + b_u + b_i + <p_u, q_i>, clamped to the training rating range (MF only).

        Raises:
            ValueError: the model has no rating scale (BPR, LightGCN), or an id outside the id map.
        """
        if self.meta.get("model") != "mf" or self.user_bias is None or self.item_bias is None \
                or self.global_bias is None:
            raise ValueError(f"predict_rating needs a biased MF export (cf.model=mf); these tables come from "
                             f"cf.model={self.meta.get('model')!r}, which only ranks -- use score()")
        uids, iids = self._check(uids, iids)
        raw = self.score(uids, iids)
        return raw.clamp(float(self.meta.get("rating_min", 1.0)), float(self.meta.get("rating_max", 5.0)))

    def score(self, uids: torch.Tensor, iids: torch.Tensor) -> torch.Tensor:
        """(N,) preference scores for ranking / CTR: the unclamped MF rating, or the dot product (BPR, LightGCN)."""
        uids, iids = self._check(uids, iids)
        s = (self.user[uids].float() * self.item[iids].float()).sum(-1)
        if self.user_bias is not None and self.item_bias is not None:
            s = s + self.user_bias[uids] + self.item_bias[iids]
        if self.global_bias is not None:
            s = s + self.global_bias.reshape(())
        return s


def save_cf_embeddings(path: str | Path, user_emb: torch.Tensor, item_emb: torch.Tensor, meta: dict[str, Any],
                       user_bias: torch.Tensor | None = None, item_bias: torch.Tensor | None = None,
                       global_bias: torch.Tensor | None = None) -> Path:
    """Write the tables and metadata to one safetensors file (no pickle), atomically (tmp file + rename).

    Raises:
        ValueError: a required meta key is missing, or shapes disagree with each other or with meta.
    """
    if missing := [k for k in REQUIRED_META if k not in meta]:
        raise ValueError(f"save_cf_embeddings: meta lacks {missing}; required: {list(REQUIRED_META)}")
    if user_emb.ndim != 2 or item_emb.ndim != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(f"user/item tables must be (U, d) and (V, d), got {tuple(user_emb.shape)} and "
                         f"{tuple(item_emb.shape)}")
    expect = (int(meta["num_users"]), int(meta["num_items"]), int(meta["d"]))
    if (user_emb.shape[0], item_emb.shape[0], user_emb.shape[1]) != expect:
        raise ValueError(f"tables are {tuple(user_emb.shape)} / {tuple(item_emb.shape)} but meta says num_users, "
                         f"num_items, d = {expect}")
    tensors = {"user": user_emb, "item": item_emb}
    for name, t, n in (("user_bias", user_bias, expect[0]), ("item_bias", item_bias, expect[1]),
                       ("global_bias", global_bias, 1)):
        if t is not None:
            if t.numel() != n:
                raise ValueError(f"{name} has {t.numel()} values, expected {n}")
            tensors[name] = t.reshape(n)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.replace(path)
    return path


def load_cf_embeddings(path: str | Path, expected_manifest_sha: str | None = None) -> CFEmbeddings:
    """Load tables written by `save_cf_embeddings`.

    Args:
        path: the safetensors file.
        expected_manifest_sha: sha256 of the prepared data's manifest.json the caller works with; tables built from
            another manifest are refused.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a CF export (no metadata), inconsistent shapes, or a different data manifest (both
            checksums named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CF embeddings not found: {path}; run train_cf (ckf-dist train-cf) first")
    with safe_open(str(path), framework="pt") as f:
        raw_meta = (f.metadata() or {}).get(META_KEY)
        if raw_meta is None:
            raise ValueError(f"{path}: no '{META_KEY}' metadata; not a file written by save_cf_embeddings")
        meta = json.loads(raw_meta)
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    got = meta.get("manifest_sha256")
    if expected_manifest_sha is not None and got != expected_manifest_sha:
        raise ValueError(f"{path}: CF embeddings were built from data manifest sha256 {got}, but the prepared data "
                         f"has manifest sha256 {expected_manifest_sha}; retrain the CF model on this data "
                         f"(train_cf) or point cf.embeddings_path at a matching export")
    for k in ("user", "item"):
        if k not in tensors:
            raise ValueError(f"{path}: missing tensor {k!r}")
    if (tensors["user"].shape[0], tensors["item"].shape[0], tensors["user"].shape[1]) != \
            (meta["num_users"], meta["num_items"], meta["d"]):
        raise ValueError(f"{path}: tables {tuple(tensors['user'].shape)} / {tuple(tensors['item'].shape)} disagree "
                         f"with meta num_users={meta['num_users']} num_items={meta['num_items']} d={meta['d']}")
    return CFEmbeddings(user=tensors["user"], item=tensors["item"], meta=meta, user_bias=tensors.get("user_bias"),
                        item_bias=tensors.get("item_bias"), global_bias=tensors.get("global_bias"))
