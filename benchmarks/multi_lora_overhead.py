"""Training-step overhead of CKF's Multi-LoRA + knowledge fusion (MTM + KFM) against a plain peft LoRA of the same
total rank per module, on the same random Llama and the same batch, timed in one run (interleaved, median of N steps).

Both sides train the same way: forward, answer-token cross-entropy (LM head on answer positions only, as CKFModel
does), backward, AdamW step. The plain side gets rank r_shared on the shared targets and r_task on the task targets
(what one row sees in Multi-LoRA); the CKF side computes every task's LoRA on every row (ZeRO-3-safe routing) plus the
MetaNet, projectors and slot injection. Goal: ratio <= 1.10. Reports wall and process-CPU time: on a shared machine
use --threads 1 and read the CPU ratio (wall time then also counts waiting for cores other jobs hold).

    python benchmarks/multi_lora_overhead.py                       # hidden 256, 4 layers, seq 256, batch 8
    python benchmarks/multi_lora_overhead.py --hidden 512 --steps 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ckf_dist.config import ModelConfig, MultiLoRAConfig, TinyLLMConfig
from ckf_dist.data.collate import Collator
from ckf_dist.model.ckf import build_ckf_model
from ckf_dist.model.llm import build_tiny_llm, load_llm, load_tokenizer
from ckf_dist.tasks import ITEM_SLOT, TASKS, USER_SLOT
from ckf_dist.train.task_grads import TaskGradTracker

WORDS = ["blue", "river", "red", "stone", "green", "hill", "night", "city", "dark", "light", "song", "story", "great",
         "sound", "solid", "build", "worth", "price", "movie", "book"]


def make_samples(n: int, n_slots: int, filler_words: int, num_users: int, num_items: int, seed: int) -> list[dict]:
    """Mixed-task prompts with a user slot, n_slots item slots and filler text (to reach the wanted length)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        items = torch.randint(0, num_items, (n_slots,), generator=g).tolist()
        words = [WORDS[j] for j in torch.randint(0, len(WORDS), (filler_words,), generator=g).tolist()]
        titles = [f"{WORDS[v % len(WORDS)]} {WORDS[(v * 7) % len(WORDS)]}" for v in items]
        body = " ".join(words)
        prompt_cf = f"User {USER_SLOT} {body}. Items: " + ", ".join(f"{t} {ITEM_SLOT}" for t in titles) + ". Answer:"
        prompt_text = f"User {body}. Items: " + ", ".join(titles) + ". Answer:"
        answer = {"ctr": "Yes", "rating": "4", "topk": titles[0], "exp": "great sound and solid build"}[task]
        out.append({"key": f"train/{task}/{i}/0", "task": task, "split": "train", "uid": i % num_users,
                    "history": items[:5], "slot_items": items, "prompt_cf": prompt_cf, "prompt_text": prompt_text,
                    "answer": answer, "label": 1.0, "candidates": [], "candidate_titles": [], "item": items[0],
                    "is_cold": False})
    return out


def answer_ce(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE on the answer tokens, LM head on those positions only (the same computation CKFModel does)."""
    lab = labels[:, 1:]
    b, l = (lab != -100).nonzero(as_tuple=True)
    return F.cross_entropy(lm_head(hidden[:, :-1][b, l]).float(), lab[b, l])


def timed(step, n: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of n calls. On a shared machine CPU time (with --threads 1) measures the work
    done; wall time also measures waiting for cores other jobs hold."""
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="tokens per row (prompt padded up with filler text)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--slots", type=int, default=10, help="item slots per prompt")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--task-rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--json", type=str, default=None, help="also write the result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    num_users, num_items, cf_dim = 100, 200, 32
    with tempfile.TemporaryDirectory() as tmp:
        tiny = TinyLLMConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
                             num_layers=args.layers, num_heads=args.heads, num_kv_heads=max(1, args.heads // 2),
                             vocab_size=2000, max_position_embeddings=max(1024, 2 * args.seq))
        texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(12)) + " Answer: Yes" for i in range(400)]
        build_tiny_llm(tiny, texts, tmp, seed=0)
        tok = load_tokenizer(tmp)
        probe = make_samples(1, args.slots, 0, num_users, num_items, 0)[0]
        base_len = len(tok(probe["prompt_cf"])["input_ids"])
        per_word = len(tok(" " + " ".join(WORDS * 5))["input_ids"]) / (len(WORDS) * 5)
        filler = max(0, int((args.seq - base_len - 12) / per_word))
        samples = make_samples(args.batch, args.slots, filler, num_users, num_items, 1)
        batch = Collator(tok, max_length=args.seq, history_len=10)(samples, ("cf",))
        n_tok = int(batch.attention_mask.sum())

        lora = MultiLoRAConfig(rank=args.rank, task_rank=args.task_rank)
        g = torch.Generator().manual_seed(0)
        ckf = build_ckf_model(load_llm(tmp, "float32", tok), tok, torch.randn(num_users, cf_dim, generator=g),
                              torch.randn(num_items, cf_dim, generator=g), ModelConfig(meta_hidden=64), lora).train()
        ckf_opt = torch.optim.AdamW(ckf.trainable_parameters(), lr=1e-4)

        from peft import LoraConfig, get_peft_model

        # Same total rank per module as one Multi-LoRA row sees: r_shared on shared targets, r_task on task targets.
        peft_cfg = LoraConfig(r=args.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                              target_modules=[*lora.shared_targets, *lora.task_targets],
                              rank_pattern={t: args.task_rank for t in lora.task_targets},
                              alpha_pattern={t: lora.task_alpha for t in lora.task_targets})
        plain = get_peft_model(load_llm(tmp, "float32", tok), peft_cfg).train()
        plain_params = [p for p in plain.parameters() if p.requires_grad]
        plain_opt = torch.optim.AdamW(plain_params, lr=1e-4)
        decoder, lm_head = plain.base_model.model.get_decoder(), plain.base_model.model.get_output_embeddings()
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)

        def step_plain() -> None:
            plain_opt.zero_grad(set_to_none=True)
            h = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state
            answer_ce(h, lm_head, batch.labels).backward()
            plain_opt.step()

        def step_ckf() -> None:
            ckf_opt.zero_grad(set_to_none=True)
            ckf(batch).loss.backward()
            ckf_opt.step()

        # The taps stay attached; `enabled` decides whether they record. k as the training default.
        tracker = TaskGradTracker(ckf, dim=1024)
        tracker.enabled = False

        def step_ckf_tracked() -> None:
            tracker.enabled = True
            tracker.reset()
            tracker.watch(batch)
            step_ckf()
            tracker.enabled = False

        variants = {"plain_peft_lora": step_plain, "multi_lora_fusion": step_ckf,
                    "multi_lora_fusion_task_grads": step_ckf_tracked}
        for fn in variants.values():
            timed(fn, 2)  # warm-up (allocator, first-call overheads)
        times: dict[str, list[float]] = {k: [] for k in variants}
        cpu_times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.steps):  # interleaved, so machine-load drift hits all variants alike
            for k, fn in variants.items():
                w, c = timed(fn, 1)
                times[k] += w
                cpu_times[k] += c

    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    cpu_min = {k: min(v) for k, v in cpu_times.items()}  # the least-disturbed step on a shared machine
    n_lora_plain = sum(p.numel() for p in plain_params)
    n_ckf = sum(p.numel() for p in ckf.trainable_parameters())
    result = {
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "vocab": len(tok)},
        "batch": {"rows": args.batch, "seq": int(batch.input_ids.shape[1]), "real_tokens": n_tok,
                  "item_slots_per_row": args.slots},
        "ranks": {"shared": args.rank, "task": args.task_rank, "tasks": len(TASKS)},
        "trainable_params": {"plain_peft_lora": n_lora_plain, "ckf": n_ckf},
        "threads": torch.get_num_threads(),
        "step_s_median": med,
        "step_s_all": times,
        "cpu_s_median": cpu_med,
        "cpu_s_all": cpu_times,
        "ratio": med["multi_lora_fusion"] / med["plain_peft_lora"],
        "ratio_with_task_grads": med["multi_lora_fusion_task_grads"] / med["plain_peft_lora"],
        "cpu_ratio": cpu_med["multi_lora_fusion"] / cpu_med["plain_peft_lora"],
        "cpu_ratio_with_task_grads": cpu_med["multi_lora_fusion_task_grads"] / cpu_med["plain_peft_lora"],
        "cpu_min_ratio": cpu_min["multi_lora_fusion"] / cpu_min["plain_peft_lora"],
        "cpu_min_ratio_with_task_grads": cpu_min["multi_lora_fusion_task_grads"] / cpu_min["plain_peft_lora"],
        "load_average": list(os.getloadavg()),
        "goal_ratio": 1.10,
    }
    print(f"model hidden={args.hidden} layers={args.layers} | batch {args.batch} x {batch.input_ids.shape[1]} tokens "
          f"| ranks shared={args.rank} task={args.task_rank} x {len(TASKS)} tasks | {torch.get_num_threads()} threads")
    for k, v in med.items():
        print(f"  {k:<30s} wall {v * 1e3:8.1f} | cpu {cpu_med[k] * 1e3:8.1f} | cpu min {cpu_min[k] * 1e3:8.1f} "
              f"ms/step (medians / min of {args.steps})")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for kind, key in (("wall", "ratio"), ("cpu", "cpu_ratio"), ("cpu min", "cpu_min_ratio")):
        print(f"ratio ({kind}) multi_lora_fusion / plain_peft_lora = {result[key]:.3f} (goal <= 1.10: "
              f"{'met' if result[key] <= 1.10 else 'MISSED'}); with per-task gradient tracking "
              f"{result[key.replace('ratio', 'ratio_with_task_grads')]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
