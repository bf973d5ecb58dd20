"""Small generated interaction files of the shapes users bring (0/1 click tables, predefined train/valid/test files),
shared by the data-shape tests."""

from __future__ import annotations

import csv
from pathlib import Path

HEADER = ["user_id", "item_id", "clicked", "timestamp", "title"]


def binary_rows(n_users: int = 12, n_items: int = 30, per_user: int = 12, seed: int = 0) -> list[list[object]]:
    """Rows of a 0/1 click table: per user `per_user` distinct items at increasing times, every third a 0."""
    import random

    rng = random.Random(seed)
    rows: list[list[object]] = []
    for u in range(n_users):
        for k, i in enumerate(rng.sample(range(n_items), per_user)):
            rows.append([f"u{u}", f"i{i}", 0 if k % 3 == 2 else 1, 1000 + 10 * k + u, f"Film {i}"])
    return rows


def write_csv(path: Path, rows: list[list[object]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def split_by_position(rows: list[list[object]], valid_from: int = 8, test_from: int = 10) -> tuple[list, list, list]:
    """Predefined files: each user's rows at positions < valid_from train, < test_from valid, the rest test."""
    parts: tuple[list, list, list] = ([], [], [])
    for r in rows:
        k = (int(r[3]) - 1000) // 10
        parts[0 if k < valid_from else 1 if k < test_from else 2].append(r)
    return parts
