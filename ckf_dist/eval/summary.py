"""Per-task metric summaries, overall and for warm / cold users, from per-sample predictions.

Shared by the CKF evaluation and the CF-only baseline, so that every model is measured by the same code on
the same samples. Keys follow `<metric>_<task>` and `<metric>_<task>/warm`, `<metric>_<task>/cold`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ckf_dist import metrics as M
from ckf_dist.data.schema import PromptSample

GROUPS: tuple[str, ...] = ("", "/warm", "/cold")
"""Key suffixes: all samples, warm users only, cold users only."""


def metric_names(task: str, ks: Sequence[int]) -> list[str]:
    """The metric names (without task suffix) that `task_metrics` reports for `task`, in report order."""
    if task == "ctr":
        return ["auc", "uauc"]
    if task == "rating":
        return ["rmse", "mae", "rmse_gen", "mae_gen", "unparsed_gen"]
    if task == "topk":
        return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    if task == "exp":
        return ["bleu1", "bleu4", "rouge1", "rouge2", "rougeL", "usr"]
    raise ValueError(f"unknown task {task!r}")


def _group_masks(samples: Sequence[PromptSample]) -> dict[str, np.ndarray]:
    cold = np.array([bool(s["is_cold"]) for s in samples], dtype=bool)
    return {"": np.ones(len(samples), dtype=bool), "/warm": ~cold, "/cold": cold}


def task_metrics(task: str, samples: Sequence[PromptSample], preds: dict[str, Sequence[Any]] | None,
                 ks: Sequence[int]) -> dict[str, float | None]:
    """Metrics of one task for all, warm and cold users.

    Args:
        task: "ctr", "rating", "topk" or "exp".
        samples: the task's samples (labels, user ids and the warm/cold flag are read from them).
        preds: per-sample predictions aligned with `samples`:
            ctr: {"score"} (higher = more likely a like); rating: {"rating"} and optionally {"gen_rating",
            "gen_parsed"}; topk: {"rank"} (1-based, pessimistic ties); exp: {"text"}.
            None: the model cannot do this task (e.g. a BPR model's ratings): every key is reported as absent.
        ks: HR/NDCG cut-offs.

    Returns:
        "<metric>_<task><group>" -> value or None (absent), plus "n_<task><group>" sample counts.
    """
    out: dict[str, float | None] = {}
    names = metric_names(task, ks)
    for g, mask in _group_masks(samples).items():
        idx = np.flatnonzero(mask)
        out[f"n_{task}{g}"] = float(len(idx))
        if preds is None:
            out.update({f"{m}_{task}{g}": None for m in names})
            continue
        for key, values in preds.items():
            if len(values) != len(samples):
                raise ValueError(f"{task}: prediction {key!r} has {len(values)} entries for {len(samples)} samples")
        sub = [samples[i] for i in idx]
        vals: dict[str, float | None] = {}
        if task == "ctr":
            labels = [s["label"] for s in sub]
            scores = np.asarray(preds["score"], dtype=np.float64)[idx]
            vals["auc"] = M.auc(labels, scores)
            vals["uauc"] = M.uauc([s["uid"] for s in sub], labels, scores)
        elif task == "rating":
            targets = [s["label"] for s in sub]
            vals["rmse"] = M.rmse(targets, np.asarray(preds["rating"], dtype=np.float64)[idx])
            vals["mae"] = M.mae(targets, np.asarray(preds["rating"], dtype=np.float64)[idx])
            if "gen_rating" in preds:
                gen = np.asarray(preds["gen_rating"], dtype=np.float64)[idx]
                vals["rmse_gen"] = M.rmse(targets, gen)
                vals["mae_gen"] = M.mae(targets, gen)
                parsed = np.asarray(preds["gen_parsed"], dtype=bool)[idx]
                vals["unparsed_gen"] = float((~parsed).mean()) if len(parsed) else None
            else:
                vals.update(rmse_gen=None, mae_gen=None, unparsed_gen=None)
        elif task == "topk":
            ranks = np.asarray(preds["rank"], dtype=np.float64)[idx]
            for k in ks:
                vals[f"hr@{k}"] = M.hit_rate_at_k(ranks, k)
                vals[f"ndcg@{k}"] = M.ndcg_at_k(ranks, k)
        elif task == "exp":
            refs = [s["answer"] for s in sub]
            hyps = [preds["text"][i] for i in idx]
            vals["bleu1"] = M.bleu(refs, hyps, 1)
            vals["bleu4"] = M.bleu(refs, hyps, 4)
            vals.update(M.rouge(refs, hyps))
            vals["usr"] = M.unique_sentence_ratio(hyps)
        else:
            raise ValueError(f"unknown task {task!r}")
        out.update({f"{m}_{task}{g}": vals[m] for m in names})
    return out


def check_topk_sample(s: PromptSample) -> int:
    """The target index of a top-K sample, after checking its candidate lists.

    Raises:
        ValueError: naming the sample key, when candidates and titles disagree or the label is out of range.
    """
    n, t = len(s["candidates"]), len(s["candidate_titles"])
    if n < 2 or n != t:
        raise ValueError(f"top-K sample {s['key']}: needs >= 2 candidates with one title each, got {n} candidates "
                         f"and {t} titles; re-run data preparation")
    target = int(s["label"])
    if target != s["label"] or not 0 <= target < n:
        raise ValueError(f"top-K sample {s['key']}: label {s['label']} is not a candidate index in [0, {n})")
    return target
