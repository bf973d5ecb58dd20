"""The evaluation report of a run: metrics.json, a Markdown table (tasks x models x overall / warm / cold),
PNG plots (per-task warm vs cold bars across models; training curves from the run's TensorBoard logs) and
TensorBoard scalars. An absent metric (no samples in a group, one class only, a task the model cannot do)
is shown as "—", never as 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckf_dist.tasks import TASKS

ABSENT = "—"
TASK_TITLES = {"ctr": "CTR (like / not)", "topk": "Top-K next item", "rating": "Rating", "exp": "Explanation"}
GROUP_NAMES = (("", "overall"), ("/warm", "warm"), ("/cold", "cold"))
LOWER_IS_BETTER = ("rmse", "mae", "unparsed")
_KEY = re.compile(r"^(?P<metric>.+)_(?P<task>[a-z]+)(?P<group>/warm|/cold)?$")


def parse_key(key: str) -> tuple[str, str, str] | None:
    """'auc_ctr/cold' -> ('auc', 'ctr', '/cold'); None for a key that is not '<metric>_<task>[/group]'."""
    m = _KEY.match(key)
    if m is None or m["task"] not in TASKS:
        return None
    return m["metric"], m["task"], m["group"] or ""


def layout(results: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """task -> metric names present in any model's results, tasks in TASKS order, metrics in first-seen order
    ("n", the sample count, first)."""
    found: dict[str, list[str]] = {}
    for metrics in results.values():
        for key in metrics:
            parsed = parse_key(key)
            if parsed is None:
                continue
            metric, task, _ = parsed
            names = found.setdefault(task, [])
            if metric not in names:
                names.append(metric)
    return {t: sorted(found[t], key=lambda m: m != "n") for t in TASKS if t in found}


def fmt(value: Any, count: bool = False) -> str:
    """4 decimals, or an integer for a count; None / missing / NaN as the absent mark."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ABSENT
    return str(int(value)) if count else f"{float(value):.4f}"


def table_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """[task, metric, model, overall, warm, cold] for every task x metric x model (absent as '—')."""
    rows = []
    for task, names in layout(results).items():
        for metric in names:
            for model, metrics in results.items():
                # A key the model does not report (the CF model writes no explanations) is absent too.
                vals = [metrics.get(f"{metric}_{task}{g}") for g, _ in GROUP_NAMES]
                rows.append([task, metric, model, *[fmt(v, count=metric == "n") for v in vals]])
    return rows


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table (task, metric, model, overall, warm, cold) for the end of a run's log."""
    header = ["task", "metric", "model", "overall", "warm", "cold"]
    rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    prev_task = None
    for r in rows:
        if prev_task is not None and r[0] != prev_task:
            out.append("")
        out.append(line(r))
        prev_task = r[0]
    return "\n".join(out)


def markdown_report(results: Mapping[str, Mapping[str, Any]], title: str = "Evaluation report") -> str:
    """One Markdown section per task: rows metric x model, columns overall / warm / cold."""
    lines = [f"# {title}", "",
             (f"Models: {', '.join(results)}. Each metric overall and for warm / cold users; {ABSENT} = absent "
              "(no samples in the group, a single class, or a task the model cannot do). "
              "BLEU / ROUGE on a 0-100 scale; top-K ties ranked pessimistically (target after equal scores)."), ""]
    by_task: dict[str, list[list[str]]] = {}
    for row in table_rows(results):
        by_task.setdefault(row[0], []).append(row)
    for task, rows in by_task.items():
        lines += [f"## {TASK_TITLES.get(task, task)}", "", "| metric | model | overall | warm | cold |",
                  "|---|---|---:|---:|---:|"]
        for _, metric, model, *vals in rows:
            arrow = " ↓" if metric.startswith(LOWER_IS_BETTER) else ""
            lines.append(f"| {metric}{arrow} | {model} | {' | '.join(vals)} |")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir: str | Path, results: dict[str, dict[str, Any]], tb_dir: str | None = None,
                 step: int = 0) -> dict[str, Path]:
    """Write metrics.json, report.md, plots/*.png and TensorBoard scalars into the run directory.

    Args:
        run_dir: the run directory.
        results: model name -> metrics dict (keys '<metric>_<task>[/warm|/cold]', values float or None).
        tb_dir: the run's TensorBoard folder; training curves are read from the event files below it
            ('train/*' and 'valid/*' scalars) and the test scalars are written to <tb_dir>/report/<model>.
            None: no curves, and the scalars go to <run_dir>/tb/report.
        step: the global step the TensorBoard test scalars are logged at.

    Returns:
        name -> path of every file written ("metrics_json", "report_md", "plot_<task>", "training_curves",
        "tensorboard").

    Raises:
        ValueError: results is empty or a value is neither a number nor None.
    """
    if not results:
        raise ValueError("write_report: results is empty; pass {'model name': metrics dict}")
    for model, metrics in results.items():
        for k, v in metrics.items():
            if v is not None and not isinstance(v, (int, float)):
                raise ValueError(f"write_report: results[{model!r}][{k!r}] = {v!r} is neither a number nor None")
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    clean = {m: {k: (None if v is None or not math.isfinite(float(v)) else float(v)) for k, v in r.items()}
             for m, r in results.items()}
    paths["metrics_json"] = run_dir / "metrics.json"
    paths["metrics_json"].write_text(json.dumps(clean, indent=1))  # absent -> null, never 0
    paths["report_md"] = run_dir / "report.md"
    paths["report_md"].write_text(markdown_report(clean, f"Evaluation report: {run_dir.name}"))

    for task, names in layout(clean).items():
        paths[f"plot_{task}"] = plot_task(clean, task, [n for n in names if n != "n"], plots / f"{task}.png")
    if tb_dir is not None:
        runs = read_tb_runs(tb_dir, prefixes=("train/", "valid/"))
        if runs:
            paths["training_curves"] = plot_training_curves(runs, plots / "training_curves.png")
    paths["tensorboard"] = write_tb_scalars(clean, Path(tb_dir) if tb_dir else run_dir / "tb", step)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def plot_task(results: Mapping[str, Mapping[str, Any]], task: str, names: list[str], path: Path) -> Path:
    """One panel per metric: for each model, bars for overall / warm / cold; absent values marked 'n/a'."""
    plt = _pyplot()
    names = names[:6]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    models = list(results)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, 4.6 * cols), 3.6 * rows + 0.6), squeeze=False)
    width = 0.8 / len(GROUP_NAMES)
    colors = ("#4C72B0", "#DD8452", "#55A868")
    for ax, metric in zip(axes.flat, names):
        for gi, (suffix, gname) in enumerate(GROUP_NAMES):
            xs = [mi + (gi - 1) * width for mi in range(len(models))]
            vals = [results[m].get(f"{metric}_{task}{suffix}") for m in models]
            ax.bar(xs, [0.0 if v is None else v for v in vals], width, label=gname, color=colors[gi])
            for x, v in zip(xs, vals):
                ax.text(x, 0 if v is None else v, "n/a" if v is None else f"{v:.3g}", ha="center", va="bottom",
                        fontsize=7, rotation=90 if len(models) > 3 else 0)
        arrow = " (lower is better)" if metric.startswith(LOWER_IS_BETTER) else ""
        ax.set_title(f"{metric}{arrow}", fontsize=10)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, fontsize=8, rotation=15 if len(models) > 2 else 0)
        ax.margins(y=0.18)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(f"{TASK_TITLES.get(task, task)}: overall vs warm vs cold users", fontsize=12)
    top = 1 - 0.6 / fig.get_figheight()  # room for the title and, under it, the legend
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, top + 0.05), ncol=3, fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_tb_scalars(tb_dir: str | Path, prefixes: tuple[str, ...] = ("train/",)) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar whose tag starts with one of `prefixes`, from all event files
    below tb_dir merged (later files win on repeated steps, e.g. after a resume)."""
    merged: dict[str, dict[int, float]] = {}
    for curves in read_tb_runs(tb_dir, prefixes, skip=()).values():
        for tag, points in curves.items():
            merged.setdefault(tag, {}).update(points)
    return {t: sorted(v.items()) for t, v in merged.items()}


def read_tb_runs(tb_dir: str | Path, prefixes: tuple[str, ...] = ("train/",), skip: tuple[str, ...] = ("report",)
                 ) -> dict[str, dict[str, dict[int, float]]]:
    """run -> tag -> {step: value}: one run per folder holding event files (e.g. 'ckf' and 'cf', which both log
    'train/loss' and must not be drawn as one curve); folders under `skip` (this report's own scalars) left out."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = Path(tb_dir)
    runs: dict[str, dict[str, dict[int, float]]] = {}
    dirs = {p.parent.relative_to(root).as_posix(): p.parent for p in root.rglob("events.out.tfevents*")}
    for name in sorted(dirs, key=lambda n: (n != "ckf", n)):  # the CKF run on top, then e.g. 'cf'
        d = dirs[name]
        if name.split("/")[0] in skip:
            continue
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefixes):
                for ev in acc.Scalars(tag):
                    runs.setdefault(name, {}).setdefault(tag, {})[ev.step] = ev.value
    return runs


def _curve_panels(curves: Mapping[str, Any]) -> dict[str, list[str]]:
    panels = {
        "training loss": [t for t in curves if t.startswith("train/loss")],
        "validation (overall)": [t for t in curves if t.startswith("valid/") and not t.endswith(("/warm", "/cold"))
                                 and not t.startswith("valid/n_")],
        "curriculum: text-prompt weight": [t for t in curves if t == "train/text_weight"],
        "learning rate": [t for t in curves if t == "train/lr"],
    }
    panels = {k: v for k, v in panels.items() if v}
    return panels or {"scalars": list(curves)[:8]}


def plot_training_curves(runs: Mapping[str, Mapping[str, Mapping[int, float]]], path: Path) -> Path:
    """One row per TensorBoard run (e.g. 'ckf', 'cf'); panels: training losses (total and per task), overall
    validation metrics, the curriculum's text-prompt weight and the learning rate -- whichever the run logged."""
    plt = _pyplot()
    layout_ = {run: _curve_panels(curves) for run, curves in runs.items()}
    cols = max(len(p) for p in layout_.values())
    fig, axes = plt.subplots(len(runs), cols, figsize=(4.8 * cols, 3.4 * len(runs)), squeeze=False)
    for r, (run, panels) in enumerate(layout_.items()):
        for c, (title, tags) in enumerate(panels.items()):
            ax = axes[r, c]
            for tag in sorted(tags)[:10]:
                steps, vals = zip(*sorted(runs[run][tag].items()))
                ax.plot(steps, vals, label=tag.split("/", 1)[1], marker="." if len(steps) < 30 else None)
            ax.set_title(f"{run}: {title}", fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for c in range(len(panels), cols):
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_tb_scalars(results: Mapping[str, Mapping[str, Any]], tb_dir: Path, step: int) -> Path:
    """One TensorBoard run per model under <tb_dir>/report/<model>, tags 'test/<key>' (absent values skipped:
    TensorBoard has no 'absent'), so the models overlay in one chart per metric."""
    from torch.utils.tensorboard import SummaryWriter

    root = tb_dir / "report"
    for model, metrics in results.items():
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"
        writer = SummaryWriter(str(root / slug))
        for k, v in metrics.items():
            if v is not None:
                writer.add_scalar(f"test/{k}", v, step)
        writer.close()
    return root
