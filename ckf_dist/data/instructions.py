"""Instruction-format prompt files (alpaca: {instruction, input, output}, as TALLRec / LLaMA-Factory) -> prompt shards.

data.source='alpaca' gives train / valid / test files of finished prompts for the text-only path (MTM without the
KFM: no users, items or CF vectors). Each record becomes one sample of the single task in data.tasks: 'ctr' (the
output must say Yes or No) or 'exp' (free text). Malformed records are skipped and counted like any reader's;
outputs that cannot be a CTR label, or one class only, are an error naming the file and the counts.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ckf_dist.config import DataConfig
from ckf_dist.data.schema import ITEMS, SPLITS, USERS, interactions_path
from ckf_dist.data.shards import dumps_sample, write_task_shards
from ckf_dist.data.skips import SkipReport
from ckf_dist.tasks import ITEM_SLOT, USER_SLOT


def yes_no(output: str) -> str | None:
    """'Yes' / 'No' from a TALLRec-style output ('Yes.', ' no', 'YES!'); None for anything else."""
    t = output.strip().rstrip(".!").strip().lower()
    return {"yes": "Yes", "no": "No"}.get(t)


def render_instruction(instruction: str, input_text: str) -> str:
    """The prompt of one record: instruction, the input (if any), then "Answer:" like every CKF prompt; slot tokens
    in the text are neutralised (the text-only path has no CF vectors to put there)."""
    lines = [" ".join(line.split()) for x in (instruction, input_text)
             for line in x.replace(USER_SLOT, " ").replace(ITEM_SLOT, " ").splitlines()]
    return "\n".join(line for line in lines if line) + "\nAnswer:"


def read_instruction_records(path: Path, skips: SkipReport) -> list[tuple[int, dict[str, Any]]]:
    """(record number or line, record) of a JSON list or JSON-lines file; bad records are skipped and counted.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: a JSON list file that does not parse.
    """
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (check data.path / data.valid_path / data.test_path)")
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    if text.lstrip().startswith("["):
        try:
            records = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON list of records ({e}); use a JSON list or JSON lines") from None
        skips.seen(path.name, len(records))
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            skips.seen(path.name)
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                skips.add("bad_json", path.name, lineno, str(e), line)
    out = []
    for n, rec in records:
        snippet = json.dumps(rec, ensure_ascii=False)[:120] if not isinstance(rec, str) else rec
        if not isinstance(rec, dict):
            skips.add("bad_json", path.name, n, f"expected a JSON object, got {type(rec).__name__}", snippet)
            continue
        inst, inp, outp = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        if not isinstance(inst, str) or not inst.strip() or not isinstance(outp, str) or not outp.strip():
            skips.add("missing_field", path.name, n, "needs a non-empty string instruction and output", snippet)
            continue
        if inp is not None and not isinstance(inp, str):
            skips.add("bad_input_type", path.name, n, f"input is {type(inp).__name__}", snippet)
            continue
        out.append((n, {"instruction": inst, "input": inp or "", "output": outp}))
    return out


def build_instruction_samples(cfg: DataConfig, skips: SkipReport) -> dict[str, list[dict[str, Any]]]:
    """split -> the samples of its file, in file order.

    Raises:
        ValueError: with tasks=['ctr'], outputs other than Yes/No (naming the file and the counts), or one class
            over all files; a file with no usable record.
    """
    task = cfg.tasks[0]
    files = dict(zip(SPLITS, (cfg.path, cfg.valid_path, cfg.test_path)))
    out: dict[str, list[dict[str, Any]]] = {}
    classes: Counter[str] = Counter()
    for sp, f in files.items():
        path = Path(str(f))
        records = read_instruction_records(path, skips)
        if not records:
            raise ValueError(f"{path}: no usable {sp} record ({skips.summary()})")
        samples = []
        bad: Counter[str] = Counter()
        bad_example = ""
        for n, rec in records:
            answer: str | None = rec["output"].strip()
            if task == "ctr":
                answer = yes_no(rec["output"])
                if answer is None:
                    bad[rec["output"].strip()[:20]] += 1
                    bad_example = bad_example or f"record {n}: {rec['output'][:40]!r}"
                    continue
                classes[answer] += 1
            prompt = render_instruction(rec["instruction"], rec["input"])
            label = (1.0 if answer == "Yes" else 0.0) if task == "ctr" else 0.0
            samples.append({"key": f"{sp}/{task}/0/{len(samples)}", "task": task, "split": sp, "uid": 0,
                            "history": [], "candidates": [], "candidate_titles": [], "slot_items": [],
                            "prompt_cf": prompt, "prompt_text": prompt, "answer": answer, "label": label, "item": 0,
                            "is_cold": False})
        if bad:
            raise ValueError(f"{path}: data.tasks=['ctr'] needs every output to be Yes or No; {sum(bad.values())} "
                             f"records say something else ({bad_example}; counts {dict(bad.most_common(5))}), "
                             f"{classes['Yes']} Yes and {classes['No']} No so far. Use data.tasks=['exp'] for "
                             f"free-text outputs")
        out[sp] = samples
    if task == "ctr" and (classes["Yes"] == 0 or classes["No"] == 0):
        raise ValueError(f"{', '.join(str(f) for f in files.values())}: the outputs hold one class only "
                         f"({classes['Yes']} Yes, {classes['No']} No); a CTR task needs both")
    return out


def prepare_instructions_into(cfg: DataConfig, root: Path, skips: SkipReport) -> dict[str, Any]:
    """Write the prepared layout of an alpaca dataset under `root`: the prompt shards, and empty id maps and
    interaction tables (there are no users or items). Returns the manifest fields this source sets."""
    samples = build_instruction_samples(cfg, skips)
    task = cfg.tasks[0]
    pq.write_table(pa.table({"uid": pa.array([], pa.int32()), "raw_id": pa.array([], pa.string()),
                             "n_train": pa.array([], pa.int32()), "is_cold": pa.array([], pa.bool_())}), root / USERS)
    pq.write_table(pa.table({"iid": pa.array([], pa.int32()), "raw_id": pa.array([], pa.string()),
                             "title": pa.array([], pa.string())}), root / ITEMS)
    empty = pa.table({"uid": pa.array([], pa.int32()), "iid": pa.array([], pa.int32()),
                      "rating": pa.array([], pa.float32()), "ts": pa.array([], pa.int64()),
                      "review": pa.array([], pa.string())})
    counts: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, list[str]]] = {}
    for sp in SPLITS:
        path = interactions_path(root, sp)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(empty, path)
        payloads = [(s["key"], dumps_sample(s)) for s in samples[sp]]  # type: ignore[arg-type]
        files = write_task_shards(root, sp, task, payloads, cfg.shard_size)
        counts[sp] = {task: len(payloads)}
        shards[sp] = {task: [str(f.relative_to(root)) for f in files]}
    return {"num_users": 0, "num_items": 0, "warm_users": 0, "cold_users": 0,
            "interactions": dict.fromkeys(SPLITS, 0), "raw_rows_read": sum(len(v) for v in samples.values()),
            "counts": counts, "shards": shards, "split": "predefined files"}
