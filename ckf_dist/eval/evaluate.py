"""Evaluate a CKF model (KFM + MTM) on the four tasks, split across ranks, overall and for warm / cold users.

CTR reads P(Yes) vs P(No) at the answer position; rating takes the expectation over the five digit tokens
(and parses a greedy generation as a second estimate); top-K scores every candidate title as the answer by
its length-normalised log-likelihood; explanation generates text. Each sample is scored exactly once across
ranks, every rank makes the same model calls (ZeRO-3 gathers are collective), and the gathered per-sample
results are checked for completeness before the metrics are computed -- identically on every rank.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ckf_dist import comm
from ckf_dist.config import RunConfig
from ckf_dist.data.batch import Batch
from ckf_dist.data.collate import Collator, chat_frame
from ckf_dist.data.schema import PromptSample
from ckf_dist.eval.summary import check_topk_sample, task_metrics
from ckf_dist.tasks import CTR_ANSWERS, RATING_ANSWERS, TASKS

RATING_GEN_TOKENS = 4
"""New tokens generated for the parsed-rating estimate ("4", "4.5", " 4</s>")."""
RATING_FALLBACK = 3.0
"""Prediction used when a generated rating holds no number (the scale's midpoint); counted as unparsed_gen."""
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def evaluate_model(model: Any, tokenizer: Any, samples: list[PromptSample], cfg: RunConfig, variant: str = "cf",
                   rank: int = 0, world: int = 1) -> dict[str, float | None]:
    """Metrics of `model` on `samples`, every task overall and for warm / cold users.

    Rank r scores samples[r::world] of each task; each rank's share is padded with dummy rows (results dropped)
    to the same number of model calls, so that collective ZeRO-3 parameter gathers line up. The per-sample
    results are all-gathered and checked (every sample exactly once) before the metrics are computed.

    Args:
        model: a CKFModel (or anything with `logits(batch, at=(rows, cols)) -> (N, V)` and
            `generate(batch, max_new_tokens, num_beams, synced_gpus) -> (B, new)`), e.g. `engine.module`.
        tokenizer: the model's tokenizer (holds the slot tokens; "Yes"/"No" and "1".."5" are single tokens).
        samples: the same list on every rank (e.g. `load_samples(prepared_dir, "test", tasks)`), already capped
            by the caller (eval.max_samples_per_task: eval.run.cap_per_task) so that baselines see the same set.
        cfg: the run configuration (eval.batch_size, eval.ks, eval.max_new_tokens, eval.num_beams,
            model.max_length, data.history_len).
        variant: "cf" (prompts with CF slots: CKF) or "text" (text-only prompts: the text-only LLM baseline).
        rank: this process's rank; world: the number of ranks (a torch.distributed group must exist if > 1).

    Returns:
        e.g. {"auc_ctr": 0.71, "auc_ctr/warm": 0.70, "auc_ctr/cold": None, "ndcg@10_topk": ..., "n_ctr": 400.0};
        None marks a metric that is absent (no samples in the group, or one class only). Same on every rank.

    Raises:
        ValueError: bad variant / world / task, or a malformed top-K sample.
        RuntimeError: the ranks hold different sample lists, or gathered results miss or repeat a sample.
    """
    if variant not in ("cf", "text"):
        raise ValueError(f"variant must be 'cf' or 'text', got {variant!r}")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    if world > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError(f"world={world} but no torch.distributed process group is initialised")
    if bad := sorted({s["task"] for s in samples} - set(TASKS)):
        raise ValueError(f"samples hold unknown task(s) {bad}; expected {list(TASKS)}")
    _check_same_samples(samples, world)

    scorer = _Scorer(model, tokenizer, cfg, variant, world)
    by_task = {task: [s for s in samples if s["task"] == task] for task in TASKS}
    # Scoring a real LLM on a CPU takes minutes per task: show rank 0's model calls with an ETA.
    bar = _progress(cfg, rank, total=sum(scorer.num_batches(t, ss) for t, ss in by_task.items() if ss),
                    desc=f"eval {variant}")
    out: dict[str, float | None] = {}
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            for task in TASKS:  # fixed order: every rank runs the same calls in the same sequence
                task_samples = by_task[task]
                if not task_samples:
                    continue
                bar.set_postfix(task=task)
                local = scorer.score_task(task, task_samples, rank, on_batch=lambda: bar.update(1))
                preds = _gather_predictions(local, len(task_samples), world, task)
                out.update(task_metrics(task, task_samples, preds, cfg.eval.ks))
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train(True)
    return out


def _progress(cfg: RunConfig, rank: int, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, file=sys.stdout, leave=False,
                disable=rank != 0 or not cfg.log.progress)


class _Scorer:
    """Batches one rank's share of a task, calls the model and returns {sample index: prediction}."""

    def __init__(self, model: Any, tokenizer: Any, cfg: RunConfig, variant: str, world: int) -> None:
        self.model, self.tok, self.cfg, self.variant, self.world = model, tokenizer, cfg, variant, world
        self.device = _model_device(model)
        common = {"max_length": cfg.model.max_length, "history_len": cfg.data.history_len,
                  "chat": chat_frame(tokenizer, cfg.model.chat_template, cfg.model.system_prompt)}
        # Scoring reads positions inside each row, so right padding keeps every row's positions 0..len-1;
        # generation continues after the last column, so its prompts are left-padded.
        self.score_rows = Collator(tokenizer, padding_side="right", with_answer=False, **common)
        self.answer_rows = Collator(tokenizer, padding_side="right", with_answer=True, **common)
        self.gen_rows = Collator(tokenizer, padding_side="left", with_answer=False, **common)
        self.eos = tokenizer.eos_token_id

    def batch_size(self, task: str, samples: list[PromptSample]) -> int:
        """Samples per model call: eval.batch_size, or for top-K (C rows per sample) about eval.batch_size rows."""
        if task != "topk":
            return self.cfg.eval.batch_size
        for s in samples:
            check_topk_sample(s)  # fail before any model call, naming the bad sample
        return max(1, self.cfg.eval.batch_size // max(len(s["candidates"]) for s in samples))

    def num_batches(self, task: str, samples: list[PromptSample]) -> int:
        """Model calls per rank for `task` (the same on every rank)."""
        return math.ceil(math.ceil(len(samples) / self.world) / self.batch_size(task, samples))

    def score_task(self, task: str, samples: list[PromptSample], rank: int,
                   on_batch: Callable[[], Any] = lambda: None) -> dict[int, Any]:
        bs = self.batch_size(task, samples)
        mine = list(range(rank, len(samples), self.world))
        out: dict[int, Any] = {}
        for b in range(self.num_batches(task, samples)):
            idx = mine[b * bs:(b + 1) * bs]
            # Dummy rows (copies of sample 0, results dropped) keep this rank's call count equal to the others'.
            chunk = [samples[i] for i in idx] or [samples[0]]
            preds = getattr(self, f"_{task}")(chunk)
            for i, p in zip(idx, preds):
                out[i] = p
            on_batch()
        return out

    # --- one method per task: a list of samples -> one prediction per sample -------------------------------

    def _ctr(self, chunk: list[PromptSample]) -> list[float]:
        no_id, yes_id = self.score_rows.option_ids(CTR_ANSWERS)
        logits = self._answer_logits(chunk)  # (B, V)
        p_yes = torch.softmax(logits[:, [no_id, yes_id]].float(), dim=-1)[:, 1]
        return p_yes.tolist()

    def _rating(self, chunk: list[PromptSample]) -> list[tuple[float, float, bool]]:
        ids = self.score_rows.option_ids(RATING_ANSWERS)
        values = torch.tensor([float(a) for a in RATING_ANSWERS])
        logits = self._answer_logits(chunk)
        expected = torch.softmax(logits[:, ids].float(), dim=-1).cpu() @ values  # (B,)
        texts = self._generate(chunk, RATING_GEN_TOKENS, num_beams=1)
        parsed = [parse_rating(t) for t in texts]
        return [(e, RATING_FALLBACK if p is None else p, p is not None) for e, p in zip(expected.tolist(), parsed)]

    def _topk(self, chunk: list[PromptSample]) -> list[int]:
        rows = [s for s in chunk for _ in s["candidates"]]
        answers = [t for s in chunk for t in s["candidate_titles"]]
        batch = self.answer_rows(rows, variants=(self.variant,), answers=answers).to(self.device)
        # The LM head runs only where an answer token is predicted (N of the R x L positions).
        scores = answer_loglik(self.model.logits(batch, at=scored_positions(batch.labels)), batch.labels).cpu()
        out, start = [], 0
        for s in chunk:
            n = len(s["candidates"])
            out.append(rank_of(scores[start:start + n], check_topk_sample(s)))
            start += n
        return out

    def _exp(self, chunk: list[PromptSample]) -> list[str]:
        return self._generate(chunk, self.cfg.eval.max_new_tokens, num_beams=self.cfg.eval.num_beams)

    # --- model calls ----------------------------------------------------------------------------------------

    def _answer_logits(self, chunk: list[PromptSample]) -> torch.Tensor:
        batch = self.score_rows(chunk, variants=(self.variant,)).to(self.device)
        return self.model.logits(batch, at=answer_position(batch, padding_side="right"))  # (B, V)

    def _generate(self, chunk: list[PromptSample], max_new_tokens: int, num_beams: int) -> list[str]:
        batch = self.gen_rows(chunk, variants=(self.variant,)).to(self.device)
        new = self.model.generate(batch, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  synced_gpus=self.world > 1)  # (B, new)
        return [decode_new_tokens(self.tok, row, self.eos) for row in new.cpu().tolist()]


# --------------------------------------------------------------------------------------------------------------
# Small pure helpers (unit-tested)
# --------------------------------------------------------------------------------------------------------------


def answer_position(batch: Batch, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the position whose logits predict each row's first answer token: prompt_lengths - 1,
    shifted by the row's padding when the batch is left-padded. For `model.logits(batch, at=...)` -> (B, V)."""
    B, L = batch.input_ids.shape
    pos = batch.prompt_lengths - 1
    if padding_side == "left":
        pos = pos + (L - batch.attention_mask.sum(dim=1))
    elif padding_side != "right":
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return torch.arange(B, device=pos.device), pos


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every position whose logits predict an answer token (labels[:, col + 1] != -100, eos
    included), row-major; for `model.logits(batch, at=...)` -> (N, V) and `answer_loglik`.

    Raises:
        ValueError: a row has no answer tokens.
    """
    mask = labels[:, 1:] != -100  # (B, L-1): position l predicts token l+1
    if not mask.any(dim=1).all():
        raise ValueError("a row has no answer tokens (was the batch built with with_answer=True?)")
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


def answer_loglik(tok_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean log-probability of each row's answer tokens (labels != -100, eos included).

    Length normalisation keeps long titles from losing merely for having more tokens.

    Args:
        tok_logits: (N, V) logits at `scored_positions(labels)`, in that order.
        labels: (B, L) answer-only labels.

    Returns:
        (B,) float tensor.
    """
    rows, cols = scored_positions(labels)
    if tok_logits.shape[0] != rows.numel():
        raise ValueError(f"answer_loglik: {tok_logits.shape[0]} logit rows for {rows.numel()} answer positions")
    targets = labels[rows, cols + 1].to(tok_logits.device)
    tok_lp = torch.log_softmax(tok_logits.float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    rows = rows.to(tok_logits.device)
    total = torch.zeros(labels.shape[0], device=tok_logits.device).index_add_(0, rows, tok_lp)
    return total / torch.bincount(rows, minlength=labels.shape[0])


def rank_of(scores: torch.Tensor, target: int) -> int:
    """1-based rank of the target candidate; ties count against the target (see metrics.rank_of_target)."""
    from ckf_dist.metrics import rank_of_target

    return rank_of_target(scores, target)


def decode_new_tokens(tokenizer: Any, ids: Sequence[int], eos_id: int | None) -> str:
    """Text of generated ids up to (not including) the first eos, special tokens dropped."""
    ids = list(ids)
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def parse_rating(text: str) -> float | None:
    """The first number in a generated rating, clipped to [1, 5]; None when there is none."""
    m = _NUMBER.search(text)
    return None if m is None else min(5.0, max(1.0, float(m.group())))


def _model_device(model: Any) -> torch.device:
    if isinstance(getattr(model, "device", None), torch.device):
        return model.device
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _check_same_samples(samples: list[PromptSample], world: int) -> None:
    """Every rank must shard the same list, or samples would be scored twice or never."""
    if world == 1:
        return
    import hashlib

    digest = hashlib.sha256("\n".join(s["key"] for s in samples).encode()).hexdigest()
    seen = comm.all_gather_object((len(samples), digest))
    if len(set(seen)) != 1:
        raise RuntimeError(f"ranks hold different sample lists (count, sha256 of keys) per rank: {seen}; "
                           f"load the same split with the same caps on every rank")


def _gather_predictions(local: dict[int, Any], n: int, world: int, task: str) -> dict[str, list[Any]]:
    """All-gather {index: prediction} from every rank, check that each of the n samples came exactly once,
    and return per-field lists in sample order."""
    parts = [local]
    if world > 1:
        parts = comm.all_gather_object(local)
    merged: dict[int, Any] = {}
    repeated = []
    for part in parts:
        for i, p in part.items():
            if i in merged:
                repeated.append(i)
            merged[i] = p
    missing = sorted(set(range(n)) - set(merged))
    if repeated or missing or len(merged) != n:
        raise RuntimeError(f"{task}: gathered {len(merged)} of {n} samples from {world} rank(s); "
                           f"missing {missing[:10]}, repeated {repeated[:10]}")
    ordered = [merged[i] for i in range(n)]
    if task == "ctr":
        return {"score": ordered}
    if task == "rating":
        return {"rating": [p[0] for p in ordered], "gen_rating": [p[1] for p in ordered],
                "gen_parsed": [p[2] for p in ordered]}
    if task == "topk":
        return {"rank": ordered}
    return {"text": ordered}


__all__ = ["answer_loglik", "answer_position", "decode_new_tokens", "evaluate_model", "parse_rating",
           "scored_positions"]
