"""The on-disk contract of a prepared dataset: the seam between data/, cf/, train/ and eval/.

Every stage reads prepared data through these names only, so a reader for a new format needs to
produce nothing more than this layout.

    <prepared_dir>/
      manifest.json                 counts, schema version, seed, skipped lines, sha256 of every file
      users.parquet                 uid:int32 (0..U-1), raw_id:str, n_train:int32, is_cold:bool
      items.parquet                 iid:int32 (0..V-1), raw_id:str, title:str
      interactions/{train,valid,test}.parquet
                                    uid:int32, iid:int32, rating:float32, ts:int64, review:str
      interactions/negatives.parquet  (data.columns.label only) the explicit negatives, never read by the CF
                                    stage: uid:int32, iid:int32, ts:int64, split:int8 (0/1/2)
      prompts/{train,valid,test}/<task>-shard-000000.tar ...
                                    WebDataset shards, one task per file; each sample has one "json" member
                                    (PromptSample)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TypedDict

SCHEMA_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "valid", "test")

MANIFEST = "manifest.json"
USERS = "users.parquet"
ITEMS = "items.parquet"
NEGATIVES = "negatives"
"""interactions_path(dir, NEGATIVES): the 0-labelled rows of a data.columns.label table (CTR "No" samples)."""


def interactions_path(prepared_dir: str | Path, split: str) -> Path:
    return Path(prepared_dir) / "interactions" / f"{split}.parquet"


def prompts_dir(prepared_dir: str | Path, split: str) -> Path:
    return Path(prepared_dir) / "prompts" / split


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, read in 4 MB blocks (prepared shards, input files and checkpoint files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def manifest_sha256(prepared_dir: str | Path) -> str:
    """sha256 of manifest.json's bytes: identifies one prepared dataset (CF exports record it).

    Raises:
        FileNotFoundError: no manifest (the data is not prepared).
    """
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {prepared_dir}; run prepare_data first")
    return hashlib.sha256(path.read_bytes()).hexdigest()


class PromptSample(TypedDict):
    """One task sample, as stored in the prompt shards (JSON) and read by collate / evaluate.

    `prompt_cf` holds one USER_SLOT token right after the user's mention and one ITEM_SLOT token after
    each item mention whose CF vector is fused, in the order of `slot_items`. `prompt_text` is the same
    prompt without any slot token (the curriculum's text-only variant).
    """

    key: str
    """Unique, stable id: f"{split}/{task}/{uid}/{n}"; sorted keys give a canonical order."""
    task: str
    split: str
    uid: int
    history: list[int]
    """Training items before the target, chronological, most recent last (<= data.history_len)."""
    slot_items: list[int]
    prompt_cf: str
    prompt_text: str
    answer: str
    """Target text after the prompt ("Yes"/"No", "4", a title, an explanation)."""
    label: float
    """CTR: 1.0/0.0; rating: the rating; top-K: index of the target in `candidates`; exp: rating of the review."""
    candidates: list[int]
    """Top-K only: candidate item ids (target included), else []."""
    candidate_titles: list[str]
    """Top-K only: titles of `candidates`, each scored as an answer at evaluation."""
    item: int
    """The item the sample is about (CTR/rating/exp candidate, top-K target)."""
    is_cold: bool
