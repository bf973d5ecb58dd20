"""Synthetic recommendation data with a known latent structure (like torchrec's RandomRecDataset).

Users and items get hidden factors; which items a user picks, the ratings, the item titles and the review
words are all derived from those factors (plus noise), so the four CKF tasks have a learnable signal and a
CF model (CKEM) that recovers the factors helps. Written in the raw table format `readers.read_table` reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.config import SyntheticConfig

INTERACTIONS_FILE = "interactions.parquet"
"""user_id:str, item_id:str, rating:float64 (1..5), timestamp:int64, review:str."""
ITEMS_FILE = "items.parquet"
"""item_id:str, title:str."""
FACTORS_FILES = ("user_factors.npy", "item_factors.npy")
"""The hidden truth (user / item factors), for tests and sanity checks; no reader uses them (.npy, not .npz:
a zip records the time of writing, which would break byte-identical output)."""

# One theme per latent dimension: words for a positive and a negative factor value. Titles take the words of
# the item's strongest dimensions, reviews those of the item's and the user's, so text carries the factors.
_THEMES: list[tuple[str, str, str, str]] = [
    # (title word +, title word -, aspect +, aspect -)
    ("Galactic", "Quiet", "space battles", "slow pacing"),
    ("Crimson", "Gentle", "action scenes", "soft dialogue"),
    ("Haunted", "Sunny", "suspense", "warm humour"),
    ("Iron", "Velvet", "heavy drums", "smooth vocals"),
    ("Ancient", "Neon", "history", "modern style"),
    ("Wild", "Urban", "nature shots", "city life"),
    ("Frozen", "Burning", "cold mystery", "fiery drama"),
    ("Silent", "Loud", "subtle acting", "big sound"),
]
_NOUNS = ["Odyssey", "Harbor", "Empire", "Garden", "Machine", "Letters", "Signal", "Voyage", "Kingdom", "Echo",
          "Circuit", "River", "Canyon", "Lantern", "Frontier", "Chorus"]
_SENTIMENT = {
    5: ["absolutely loved it", "a masterpiece", "brilliant from start to finish"],
    4: ["really enjoyed it", "very good overall", "well worth it"],
    3: ["it was okay", "mixed feelings", "average at best"],
    2: ["rather disappointing", "not my thing", "weaker than expected"],
    1: ["a waste of time", "truly awful", "hated every minute"],
}
_QUALITY = {5: "superb", 4: "strong", 3: "fine", 2: "weak", 1: "poor"}


def _theme_word(dim: int, value: float, col: int) -> str:
    theme = _THEMES[dim % len(_THEMES)]
    word = theme[col if value >= 0 else col + 1]
    return word if dim < len(_THEMES) else f"{word}{dim // len(_THEMES) + 1}"


def generate_synthetic(cfg: SyntheticConfig, out_dir: str | Path, seed: int) -> Path:
    """Write a synthetic raw dataset into `out_dir`; the same cfg and seed give byte-identical files.

    Args:
        cfg: sizes and noise (data.synthetic).
        out_dir: folder to write INTERACTIONS_FILE, ITEMS_FILE and FACTORS_FILES into (created).
        seed: seed of every random draw.

    Returns:
        `out_dir` as a Path.

    Raises:
        ValueError: the config is inconsistent (see SyntheticConfig.problems).
    """
    if probs := cfg.problems("data.synthetic"):
        raise ValueError("invalid synthetic config: " + "; ".join(probs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 20241028])
    U, V, d = cfg.num_users, cfg.num_items, cfg.latent_dim
    P = rng.normal(size=(U, d))  # user factors
    Q = rng.normal(size=(V, d))  # item factors
    b_user = rng.normal(scale=0.3, size=U)
    b_item = rng.normal(scale=0.5, size=V)
    affinity = P @ Q.T / np.sqrt(d) + b_item[None, :]  # (U, V)

    # Interaction counts skewed towards few, so part of the users stay cold.
    span = cfg.max_interactions - cfg.min_interactions
    counts = cfg.min_interactions + np.floor(span * rng.beta(0.7, 2.0, size=U) + 0.5).astype(int)

    # Titles: the item's two strongest dimensions pick its words; the index keeps titles unique.
    titles = []
    for i in range(V):
        top = np.argsort(-np.abs(Q[i]))[:2]
        w1 = _theme_word(int(top[0]), Q[i, top[0]], 0)
        w2 = _theme_word(int(top[1]), Q[i, top[1]], 0) if d > 1 else ""
        noun = _NOUNS[int(rng.integers(len(_NOUNS)))]
        titles.append(" ".join(w for w in (w1, w2, noun, str(i + 1)) if w))

    users, items, ratings, stamps, reviews = [], [], [], [], []
    for u in range(U):
        # Users pick items they are drawn to (Gumbel top-k = sampling without replacement ~ softmax(affinity)).
        g = rng.gumbel(size=V)
        chosen = np.argsort(-(1.5 * affinity[u] + g), kind="stable")[: counts[u]]
        chosen = rng.permutation(chosen)  # time order independent of preference
        t = 1_500_000_000 + int(rng.integers(0, 10_000_000))
        for i in chosen:
            t += int(rng.integers(600, 7 * 86_400))
            score = 2.4 + 1.2 * (affinity[u, i] + b_user[u]) + cfg.noise * rng.normal()
            r = int(np.clip(np.rint(score), 1, 5))
            it_dim = int(np.argmax(np.abs(Q[i])))
            us_dim = int(np.argmax(np.abs(P[u])))
            aspect_i = _theme_word(it_dim, Q[i, it_dim], 2)
            aspect_u = _theme_word(us_dim, P[u, us_dim], 2)
            sent = _SENTIMENT[r][int(rng.integers(3))]
            review = f"{sent}. the {aspect_i} is {_QUALITY[r]}, and as a fan of {aspect_u} " \
                     f"{'i recommend it' if r >= 4 else 'i would skip it'}."
            users.append(f"u{u + 1:05d}")
            items.append(f"i{i + 1:05d}")
            ratings.append(float(r))
            stamps.append(t)
            reviews.append(review)

    inter = pa.table({"user_id": pa.array(users, pa.string()), "item_id": pa.array(items, pa.string()),
                      "rating": pa.array(ratings, pa.float64()), "timestamp": pa.array(stamps, pa.int64()),
                      "review": pa.array(reviews, pa.string())})
    item_tab = pa.table({"item_id": pa.array([f"i{i + 1:05d}" for i in range(V)], pa.string()),
                         "title": pa.array(titles, pa.string())})
    pq.write_table(inter, out / INTERACTIONS_FILE)
    pq.write_table(item_tab, out / ITEMS_FILE)
    np.save(out / FACTORS_FILES[0], P)
    np.save(out / FACTORS_FILES[1], Q)
    return out
