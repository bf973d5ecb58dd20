"""Small generated data files of the shapes users bring (0/1 click tables, predefined train/valid/test files,
instruction-format prompt files), shared by the data-shape and real-data end-to-end tests."""

from __future__ import annotations

import csv
import json
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


ALPACA_INSTRUCTION = ('Given the user\'s preference and unpreference, identify whether the user will like the target '
                      'movie by answering "Yes." or "No.".')


def alpaca_records(n: int, start: int = 0) -> list[dict[str, str]]:
    """TALLRec-style {instruction, input, output} records: a fixed instruction, a per-record input, "Yes."/"No."
    outputs alternating (record i says Yes when i is odd)."""
    return [{"instruction": ALPACA_INSTRUCTION,
             "input": f'User Preference: "Film {i}"\nUser Unpreference: "Film {i + 1}"\n'
                      f'Whether the user will like the target movie "Film {i + 2}"?',
             "output": "Yes." if i % 2 else "No."} for i in range(start, start + n)]


def write_alpaca_files(folder: Path, n_train: int = 24, n_valid: int = 6, n_test: int = 10) -> list[Path]:
    """train.json (a JSON list), valid.jsonl (JSON lines) and test.json of disjoint `alpaca_records`."""
    recs = alpaca_records(n_train + n_valid + n_test)
    parts = (recs[:n_train], recs[n_train:n_train + n_valid], recs[n_train + n_valid:])
    paths = [folder / "train.json", folder / "valid.jsonl", folder / "test.json"]
    paths[0].write_text(json.dumps(parts[0], indent=1))
    paths[1].write_text("".join(json.dumps(r) + "\n" for r in parts[1]))
    paths[2].write_text(json.dumps(parts[2]))
    return paths
