r"""Quality benchmark: CF alone, a text-only LLM, CKF and CKF single-task on the same data, test samples and seeds,
in one table (overall / warm / cold users, mean ± std over seeds) plus quality.json and quality.md.

What is run, per seed (each variant is one run of the main job through the `deepspeed` launcher, in its own run
directory `<out>/quality/seed-<s>/<variant>`; the seed sets train.seed and cf.seed, while data.seed, and with it the
split, the negatives, the candidates and the evaluation subset, stays as configured, so every seed scores the same
test samples):

  ckf          the config as given (eval.baselines=[cf, text] so that its metrics.json also holds the two rows
               below). Rows: "CKF"; "CF alone" (the CF model trained in this run, the 'CF (...)' baseline row);
               "CKF, text prompts" (this CKF model fed text-only prompts: the fusion cut at test time, not a
               separately trained model).
  text         the text-only LLM (TALLRec recipe): same LLM, LoRA, steps and data, train.prompts=text, trained on
               text prompts from the start; it reuses the ckf run's CF tables and base model, so only the prompts
               differ.
  single-<t>   CKF trained on task t alone, one run per task in data.tasks, scored on t's test samples.

Why the single-task runs get their own prepared data: the task list is part of the prepare fingerprint, so
data.tasks=[t] on the shared data.prepared_dir would rebuild (and replace) the multi-task data under the other
runs. Samples are drawn per (data.seed, user, task), so a prepared folder of task t alone holds the same bytes for
t as the multi-task one; the benchmark prepares `<out>/quality/data-<t>` once and checks that every file in it
(id maps, interactions, t's train / valid / test shards) has the same sha256 as in the shared folder, and that the
evaluation subsets have the same sample keys, and stops if not. The CF tables are bound to the manifest's sha256,
which differs only because the task list does; the ckf run's tables are copied, rebound to the single-task
manifest, and passed as cf.embeddings_path, so the single-task model sees the same CF vectors and base model as
the multi-task one and only the task mixture differs.

A finished run (metrics.json present) is reused, so an interrupted benchmark resumes where it stopped (an
unfinished run resumes from its newest checkpoint); a run directory made with a different configuration is an
error rather than a silent reuse. The prepared data lives in `<out>/quality/data` unless data.prepared_dir is
given as an override (the benchmark's own overrides could otherwise rebuild a folder another run uses).

Goals (means over seeds; a metric the config does not produce is 'n/a', never a pass; the exit code stays 0):
  --goals paper  CKF CTR AUC >= CF alone and >= text-only + 0.03, overall and for cold users;
                 CKF rating RMSE < text-only; CKF top-K HR@1 > text-only.
  --goals demo   CKF CTR AUC >= CF alone - 0.03 and >= text-only + 0.05 (overall).

MovieLens-100K + SmolLM2-135M-Instruct, 3 seeds (2 CPU ranks; 5 runs per seed):

    python benchmarks/quality.py --config configs/ml100k_smollm2.yaml --seeds 0 1 2

The synthetic demo (tiny Llama, 4 tasks; 6 runs per seed, the multi-task ones about as long as the demo itself,
6 minutes on 2 cores; single-task runs on long prompts, e.g. top-K, take longer per step):

    python benchmarks/quality.py --config configs/demo.yaml --seeds 0 1 2 --goals demo

A smoke check of the wiring (its numbers are noise: 16 test samples per task, 3 of them CTR positives; 5 runs of
75-195 s per seed on 2 cores, about 7 minutes per seed):

    python benchmarks/quality.py --config configs/demo.yaml --seeds 0 1 --goals demo --out /tmp/qcheck \
        "data.tasks=[ctr,rating,topk]" train.max_steps=20 eval.max_samples_per_task=16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckf_dist.config import ConfigError, RunConfig, load_config, parse_override
from ckf_dist.testing.jobs import env, launcher_cmd

# One headline metric per task (the paper's): CTR AUC, rating RMSE, top-K HR@1 (1-of-N accuracy), explanation
# ROUGE-L. Only the tasks in data.tasks appear.
HEADLINE = {"ctr": ("auc", "CTR AUC"), "rating": ("rmse", "rating RMSE"), "topk": ("hr@1", "top-K HR@1"),
            "exp": ("rougeL", "exp ROUGE-L")}
GROUPS = (("", "all"), ("/warm", "warm"), ("/cold", "cold"))
ROWS = ("CF alone", "text-only LLM", "CKF", "CKF, text prompts", "CKF single-task")
TAIL_LINES = 80


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """One finished run of the main job."""

    name: str
    run_dir: Path
    overrides: list[str]
    cmd: list[str]
    wall_s: float
    reused: bool
    metrics: dict[str, dict[str, Any]] = field(repr=False)


def _normalise(tree: Any) -> Any:
    """A config dict as YAML gives it back (tuples as lists), for comparing a saved config with a fresh one."""
    return json.loads(json.dumps(tree))


def check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to reuse or resume a run directory that was made with another configuration (e.g. other overrides):
    its metrics would be reported under this benchmark's settings."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _normalise(yaml.safe_load(saved_path.read_text()))
    fresh = _normalise(cfg.to_dict())
    diffs = [f"{sec}.{k}: {saved.get(sec, {}).get(k)!r} there, {v!r} now"
             for sec, sub in fresh.items() for k, v in sub.items() if saved.get(sec, {}).get(k) != v]
    if diffs:
        raise SystemExit(f"{run_dir} was made with a different configuration; delete it or pick another --out:\n  "
                         + "\n  ".join(diffs[:12]))


def run_variant(name: str, config: str, run_dir: Path, nproc: int, overrides: list[str]) -> RunRecord:
    """Run the main job once in `run_dir` (or reuse it when it already has metrics.json)."""
    # log.run_dir goes last so that it wins over one among the user's overrides.
    overrides = [*overrides, f"log.run_dir={run_dir}"]
    cfg = load_config(config, overrides)  # a bad override fails here, in a second, not after a launcher start
    check_same_config(run_dir, cfg)
    info_path = run_dir / "quality_run.json"
    if (run_dir / "metrics.json").is_file():
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        wall = float(info.get("wall_s", math.nan))
        print(f"  {name:<16} reused {run_dir} (took {wall:.0f}s when run)", flush=True)
        return RunRecord(name, run_dir, overrides, info.get("cmd", []), wall, True,
                         json.loads((run_dir / "metrics.json").read_text()))
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "quality_run.log"
    cmd = launcher_cmd(nproc, ["--config", config, *overrides])
    print(f"  {name:<16} running (log: {log}) ...", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:  # a file, not a pipe: a long run's output can be followed with tail -f
        res = subprocess.run(cmd, cwd=ROOT, env=env(threads=max(1, (os.cpu_count() or 1) // nproc)), stdout=out, stderr=subprocess.STDOUT, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode != 0 or not (run_dir / "metrics.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-TAIL_LINES:])
        raise SystemExit(f"{name} failed (exit code {res.returncode}, {wall:.0f}s) in {run_dir}; last "
                         f"{TAIL_LINES} lines of {log}:\n{tail}\n\ncommand: {' '.join(cmd)}")
    info_path.write_text(json.dumps({"cmd": cmd, "wall_s": round(wall, 1)}, indent=1))
    print(f"  {name:<16} done in {wall:.0f}s", flush=True)
    return RunRecord(name, run_dir, overrides, cmd, wall, False, json.loads((run_dir / "metrics.json").read_text()))


# ---------------------------------------------------------------------------------------------------------------
# Single-task data: same samples as the multi-task data, or stop
# ---------------------------------------------------------------------------------------------------------------


def prepare_single_task(config: str, overrides: list[str], task: str, prepared: Path, shared: Path) -> None:
    """Prepare task `task` alone into `prepared` (idempotent) and check it is the shared data restricted to it.

    Raises:
        SystemExit: a file of the single-task folder is missing from, or differs from, the shared folder.
    """
    from ckf_dist.data.preprocess import prepare_data

    cfg = load_config(config, [*overrides, f"data.prepared_dir={prepared}", f"data.tasks=[{task}]"])
    # 'local' runs the same builder as Ray Data in this process (byte-identical output, no Ray start-up); the file
    # check below would catch it if the two ever disagreed.
    prepare_data(cfg.data, engine="local")
    single = json.loads((prepared / "manifest.json").read_text())["files"]
    multi = json.loads((shared / "manifest.json").read_text())["files"]
    bad = [f"{rel}: {'missing in ' + str(shared) if rel not in multi else 'different sha256'}"
           for rel, meta in single.items() if multi.get(rel, {}).get("sha256") != meta["sha256"]]
    if bad:
        raise SystemExit(f"the single-task data for {task!r} ({prepared}) is not the multi-task data ({shared}) "
                         f"restricted to {task!r}, so single-task and multi-task runs would not see the same "
                         f"samples:\n  " + "\n  ".join(bad[:12]))


def check_same_eval_samples(config: str, multi_overrides: list[str], single_overrides: list[str],
                            task: str) -> int:
    """The evaluation subset of the single-task run must be exactly the multi-task runs' samples of `task`
    (eval.max_samples_per_task picks whole users per task, so this holds when the files are identical; checked
    anyway, by sample key). Returns the number of samples."""
    from ckf_dist.eval.run import eval_samples

    multi_cfg, single_cfg = load_config(config, multi_overrides), load_config(config, single_overrides)
    limit = multi_cfg.eval.max_samples_per_task
    a = [s["key"] for s in eval_samples(multi_cfg, multi_cfg.eval.split, limit) if s["task"] == task]
    b = [s["key"] for s in eval_samples(single_cfg, single_cfg.eval.split, limit)]
    if a != b:
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise SystemExit(f"single-task {task!r}: evaluation samples differ from the multi-task runs' "
                         f"({len(a)} vs {len(b)}; only multi-task: {only_a[:5]}, only single-task: {only_b[:5]})")
    return len(a)


def rebind_cf_tables(src: Path, dst: Path, prepared: Path) -> Path:
    """A copy of the CF tables `src` bound to the manifest of `prepared` (whose id maps and interactions were
    checked to be byte-identical to the data the tables were trained on: only the task list differs)."""
    from ckf_dist.cf.export import load_cf_embeddings, save_cf_embeddings
    from ckf_dist.data.schema import manifest_sha256

    emb = load_cf_embeddings(src)
    meta = {**emb.meta, "manifest_sha256": manifest_sha256(prepared), "rebound_from": str(src)}
    return save_cf_embeddings(dst, emb.user, emb.item, meta, emb.user_bias, emb.item_bias, emb.global_bias)


# ---------------------------------------------------------------------------------------------------------------
# Table, goals, files
# ---------------------------------------------------------------------------------------------------------------


def seed_rows(ckf: RunRecord, text: RunRecord, singles: dict[str, RunRecord]) -> dict[str, dict[str, Any]]:
    """Variant row -> metrics of one seed. The single-task row takes each task's keys from that task's own run."""
    cf_name = next((k for k in ckf.metrics if k.startswith("CF (")), None)
    rows: dict[str, dict[str, Any]] = {
        "CF alone": ckf.metrics.get(cf_name, {}) if cf_name else {},
        "text-only LLM": text.metrics.get("LLM (text-only)", {}),
        "CKF": ckf.metrics.get("CKF", {}),
        "CKF, text prompts": ckf.metrics.get("CKF, text prompts", {}),
        "CKF single-task": {},
    }
    for task, rec in singles.items():
        rows["CKF single-task"].update({k: v for k, v in rec.metrics.get("CKF", {}).items()
                                        if k.split("/")[0].endswith(f"_{task}")})
    return rows


def columns(tasks: Sequence[str], ks: Sequence[int]) -> list[tuple[str, str]]:
    """(metric key, column title) for each task's headline metric x group, in data.tasks order; keys no model
    reports in any seed (e.g. a group with no users) are still shown, as n/a."""
    cols = []
    for task in tasks:
        metric, title = HEADLINE[task]
        if task == "topk" and 1 not in ks:  # HR@1 needs K=1 among eval.ks; fall back to the smallest K
            metric, title = f"hr@{min(ks)}", f"top-K HR@{min(ks)}"
        cols += [(f"{metric}_{task}{g}", f"{title} {gname}") for g, gname in GROUPS]
    return cols


def aggregate(values: Sequence[Any]) -> dict[str, Any]:
    """Mean and sample std (None with one value) over seeds; None when any seed lacks the value (a mean over a
    subset of seeds would not be comparable with the other rows)."""
    if not values or any(v is None or (isinstance(v, float) and not math.isfinite(v)) for v in values):
        return {"mean": None, "std": None, "n": len(values)}
    vals = [float(v) for v in values]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals)}


def fmt_cell(agg: dict[str, Any]) -> str:
    if agg["mean"] is None:
        return "n/a"
    return f"{agg['mean']:.4f}" if agg["std"] is None else f"{agg['mean']:.4f} ± {agg['std']:.4f}"


def render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in body]])


@dataclass
class Goal:
    text: str
    status: str  # PASS / FAIL / n/a
    detail: str


def check_goals(kind: str, means: dict[str, dict[str, Any]]) -> list[Goal]:
    """The goals of `kind` on the means over seeds; a missing side makes a goal 'n/a'."""

    def m(row: str, key: str) -> float | None:
        return means.get(row, {}).get(key, {}).get("mean")

    def goal(text: str, a_row: str, key: str, b_row: str, margin: float,
             op: Callable[[float, float], bool], sym: str) -> Goal:
        a, b = m(a_row, key), m(b_row, key)
        if a is None or b is None:
            return Goal(text, "n/a", f"{a_row} {a if a is None else f'{a:.4f}'} vs {b_row} "
                                     f"{b if b is None else f'{b:.4f}'} ({key} absent)")
        target = b + margin
        return Goal(text, "PASS" if op(a, target) else "FAIL",
                    f"{a_row} {a:.4f}, needs {sym} {target:.4f} ({b_row} {b:.4f}{f' {margin:+.2f}' if margin else ''})")

    ge, gt, lt = (lambda a, b: a >= b), (lambda a, b: a > b), (lambda a, b: a < b)
    if kind == "demo":
        return [goal("CKF CTR AUC within 0.03 of CF alone", "CKF", "auc_ctr", "CF alone", -0.03, ge, ">="),
                goal("CKF CTR AUC >= text-only + 0.05", "CKF", "auc_ctr", "text-only LLM", 0.05, ge, ">=")]
    out = []
    for g, gname in (("", "overall"), ("/cold", "cold users")):
        out += [goal(f"CKF CTR AUC >= CF alone ({gname})", "CKF", f"auc_ctr{g}", "CF alone", 0.0, ge, ">="),
                goal(f"CKF CTR AUC >= text-only + 0.03 ({gname})", "CKF", f"auc_ctr{g}", "text-only LLM", 0.03, ge,
                     ">=")]
    out += [goal("CKF rating RMSE < text-only", "CKF", "rmse_rating", "text-only LLM", 0.0, lt, "<"),
            goal("CKF top-K HR@1 > text-only", "CKF", "hr@1_topk", "text-only LLM", 0.0, gt, ">")]
    return out


def sample_counts(metrics: dict[str, Any], tasks: Sequence[str]) -> str:
    def n(key: str) -> str:
        v = metrics.get(key)
        return "?" if v is None else str(int(v))

    return ", ".join(f"{t} {n(f'n_{t}')} ({n(f'n_{t}/warm')} warm / {n(f'n_{t}/cold')} cold)" for t in tasks)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/ml100k_smollm2.yaml")
    p.add_argument("--seeds", nargs="+", default=["0", "1", "2"], help="train.seed and cf.seed of each repeat")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (deepspeed --num_gpus)")
    p.add_argument("--goals", choices=("paper", "demo"), default="paper")
    p.add_argument("--out", default=None, help="output folder (default: log.run_dir); runs go to <out>/quality/")
    p.add_argument("--skip-single", action="store_true",
                   help="leave out the single-task runs (one per task: on a CPU they cost as much as the rest); "
                        "their row is then n/a")
    p.add_argument("overrides", nargs="*", help="section.key=value, passed to every run")
    args = p.parse_args()
    # nargs='+' also swallows overrides written right after the seeds (--seeds 0 1 train.max_steps=20): hand them back.
    args.overrides = [x for x in args.seeds if "=" in x] + args.overrides
    try:
        args.seeds = [int(x) for x in args.seeds if "=" not in x]
    except ValueError:
        p.error(f"--seeds takes integers, got {args.seeds}")
    if not args.seeds:
        p.error("--seeds needs at least one integer")
    try:
        main_checked(args)
    except ConfigError as e:  # one clean message listing every problem, not a traceback
        raise SystemExit(f"error: {e}") from None


def main_checked(args: argparse.Namespace) -> None:
    for ov in args.overrides:
        key, _ = parse_override(ov)
        if key in ("train.seed", "cf.seed", "log.run_dir"):  # set per run by the benchmark
            raise SystemExit(f"override {ov!r}: {key} is set by the benchmark (use --seeds / --out)")
    cfg = load_config(args.config, args.overrides)
    tasks = list(cfg.data.tasks)
    qdir = Path(args.out or cfg.log.run_dir) / "quality"
    explicit_data = any(parse_override(ov)[0] == "data.prepared_dir" for ov in args.overrides)
    shared = Path(cfg.data.prepared_dir) if explicit_data else qdir / "data"
    common = [*args.overrides, f"data.prepared_dir={shared}"]
    print(f"[quality] {args.config} {' '.join(args.overrides)} | seeds {args.seeds} | tasks {tasks} | "
          f"{args.nproc} rank(s) | out {qdir}", flush=True)

    t_start = time.perf_counter()
    records: dict[int, dict[str, RunRecord]] = {}
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    eval_n: dict[str, int] = {}
    for seed in args.seeds:
        sdir = qdir / f"seed-{seed}"
        seeded = [*common, f"train.seed={seed}", f"cf.seed={seed}"]
        print(f"[quality] seed {seed}", flush=True)
        # eval.baselines: the CF-alone and CKF-on-text-prompts rows come from this run's evaluation.
        ckf = run_variant("CKF", args.config, sdir / "ckf", args.nproc, [*seeded, "eval.baselines=[cf,text]"])
        cf_tables = sdir / "ckf" / "cf" / "embeddings.safetensors"
        base = cfg.model.base_model or str(sdir / "ckf" / "base_model")
        # Same CF tables and base model as the ckf run: only what the variant changes differs.
        reuse = [f"model.base_model={base}", "eval.baselines=[]"]
        text = run_variant("text-only LLM", args.config, sdir / "text", args.nproc,
                           [*seeded, f"cf.embeddings_path={cf_tables}", *reuse, "train.prompts=text"])
        singles: dict[str, RunRecord] = {}
        for task in [] if args.skip_single else tasks:
            prepared = qdir / f"data-{task}"
            run_dir = sdir / f"single-{task}"
            single_ov = [*seeded, f"data.prepared_dir={prepared}", f"data.tasks=[{task}]"]
            if len(tasks) == 1:  # the config is single-task already: the ckf run is its own single-task run
                singles[task] = ckf
                continue
            if task not in eval_n:  # once per task: the data (data.seed) is the same for every seed
                prepare_single_task(args.config, args.overrides, task, prepared, shared)
                eval_n[task] = check_same_eval_samples(args.config, [*common, f"log.run_dir={sdir / 'ckf'}"],
                                                       [*single_ov, f"log.run_dir={run_dir}"], task)
            tables = rebind_cf_tables(cf_tables, run_dir / "cf_from_ckf" / "embeddings.safetensors", prepared)
            singles[task] = run_variant(f"single-{task}", args.config, run_dir, args.nproc,
                                        [*single_ov, f"cf.embeddings_path={tables}", *reuse])
        records[seed] = {"ckf": ckf, "text": text, **{f"single-{t}": r for t, r in singles.items()}}
        per_seed[seed] = seed_rows(ckf, text, singles)

    # --- table ------------------------------------------------------------------------------------------------
    cols = columns(tasks, cfg.eval.ks)
    cf_label = next((k for k in records[args.seeds[0]]["ckf"].metrics if k.startswith("CF (")), "CF")
    labels = {"CF alone": f"CF alone ({cf_label[4:-1] if cf_label.startswith('CF (') else '?'})"}
    means: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        means[row] = {key: aggregate([per_seed[s][row].get(key) for s in args.seeds]) for key, _ in cols}
    header = ["model", *[title for _, title in cols]]
    body = [[labels.get(row, row), *[fmt_cell(means[row][key]) for key, _ in cols]] for row in ROWS]
    spread = "mean ± sample std over" if len(args.seeds) > 1 else "one seed,"
    counts = sample_counts(records[args.seeds[0]]["ckf"].metrics.get("CKF", {}), tasks)
    note = (f"{spread} seeds {args.seeds}; test samples per task: {counts}; rating RMSE lower is better; "
            f"'CKF, text prompts' = the CKF model fed text-only prompts; 'text-only LLM' = trained on text prompts")
    goals = check_goals(args.goals, means)
    failed = sum(g.status == "FAIL" for g in goals)
    na = sum(g.status == "n/a" for g in goals)
    goal_lines = [f"{g.status:<4} {g.text}: {g.detail}" for g in goals]
    summary = (f"goals ({args.goals}): {len(goals) - failed - na} passed, {failed} failed, {na} n/a "
               f"of {len(goals)}")

    print()
    print(render(header, body, markdown=False))
    print(note)
    print()
    for line in goal_lines:
        print(line)
    print(summary)

    # --- files ------------------------------------------------------------------------------------------------
    qdir.mkdir(parents=True, exist_ok=True)
    doc = {
        "config": args.config, "overrides": args.overrides, "seeds": args.seeds, "nproc": args.nproc,
        "tasks": tasks, "goals_kind": args.goals, "prepared_dir": str(shared),
        "columns": {key: title for key, title in cols},
        "per_seed": {str(s): {row: {key: per_seed[s][row].get(key) for key, _ in cols} for row in ROWS}
                     for s in args.seeds},
        "mean": {row: {key: a["mean"] for key, a in r.items()} for row, r in means.items()},
        "std": {row: {key: a["std"] for key, a in r.items()} for row, r in means.items()},
        "goals": [{"goal": g.text, "status": g.status, "detail": g.detail} for g in goals],
        "goals_failed": failed, "goals_na": na,
        "runs": {str(s): {name: {"run_dir": str(r.run_dir), "cmd": r.cmd, "overrides": r.overrides,
                                 "wall_s": r.wall_s if math.isfinite(r.wall_s) else None, "reused": r.reused}
                          for name, r in recs.items()} for s, recs in records.items()},
        "eval_samples_single_task": eval_n,
        "benchmark_wall_s": round(time.perf_counter() - t_start, 1),
    }
    (qdir / "quality.json").write_text(json.dumps(doc, indent=1))
    md = [f"# Quality: {args.config}", "",
          f"Overrides: `{' '.join(args.overrides) or '(none)'}`; seeds {args.seeds}; {args.nproc} rank(s).", "",
          render(header, body, markdown=True), "", note, "", "## Goals", "",
          *[f"- **{g.status}** {g.text}: {g.detail}" for g in goals], "", summary, "", "## Runs", "",
          "| seed | run | wall s | run dir |", "|---:|---|---:|---|",
          *[f"| {s} | {r.name} | {r.wall_s:.0f}{' (reused)' if r.reused else ''} | {r.run_dir} |"
            for s, recs in records.items() for r in recs.values()], ""]
    (qdir / "quality.md").write_text("\n".join(md))
    print(f"[quality] wrote {qdir / 'quality.json'}, {qdir / 'quality.md'} "
          f"({time.perf_counter() - t_start:.0f}s)")


if __name__ == "__main__":
    main()
