"""Skip report: every raw line or interaction the data pipeline drops, counted per reason with examples.

Readers and preprocessing never drop anything silently: each drop goes through `SkipReport.add`, and the
report ends up in the prepared dataset's manifest (counts per reason + the first few file:line examples) and on the
console (`summary_lines`). Readers also count the records they read per input file (`SkipReport.seen`), so that
the input-loss budget (`budget_error`, data.max_skip_frac) can stop a preparation that loses too much of a file.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class InputLossError(ValueError):
    """More of an input file could not be read than data.max_skip_frac allows (or a damaged compressed file)."""

MAX_EXAMPLES_PER_REASON = 3
"""Examples kept per reason (file, line, reason detail, a snippet of the offending text)."""


class SkipReport:
    """Counts of skipped raw lines / interactions per reason, with a few examples each.

    Args:
        max_examples: examples kept per reason.

    Example:
        >>> rep = SkipReport()
        >>> rep.add("bad_json", "reviews.json", 12, "Expecting value", '{"asin": ')
        >>> rep.counts["bad_json"]
        1
    """

    def __init__(self, max_examples: int = MAX_EXAMPLES_PER_REASON) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.read: Counter[str] = Counter()
        """Records (non-blank lines, table rows) a reader met per input file name, kept or skipped."""
        self.by_file: Counter[str] = Counter()
        """Skips charged to the input-loss budget per file name (input files and the pseudo-files of preprocessing,
        e.g. 'interactions')."""

    def seen(self, file: str, n: int = 1) -> None:
        """Count `n` records of input file `file` (each record once, whether it is kept or skipped)."""
        self.read[file] += n

    def add(self, reason: str, file: str, line: int | None, detail: str = "", text: str = "", n: int = 1,
            budget: bool = True) -> None:
        """Record `n` skips for `reason`; keeps the example when fewer than max_examples are stored.

        `budget=False`: reported but not charged to the file's input-loss budget (a damaged file's lost tail that
        data.allow_truncated accepted).
        """
        self.counts[reason] += n
        if budget:
            self.by_file[file] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append({"file": file, "line": line, "detail": detail[:200], "text": text[:120]})

    def merge(self, other: SkipReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])
        self.read.update(other.read)
        self.by_file.update(other.by_file)

    def file_stats(self) -> dict[str, dict[str, int]]:
        """{input file: {"read": records, "skipped": skips charged to the budget}} for every file a reader counted
        records of."""
        return {f: {"read": self.read[f], "skipped": self.by_file[f]} for f in sorted(self.read)}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"total", "counts": {reason: n}, "examples": {reason: [...]}} with sorted reasons."""
        reasons = sorted(self.counts)
        return {"total": self.total, "counts": {r: self.counts[r] for r in reasons},
                "examples": {r: self.examples.get(r, []) for r in reasons}}

    def summary(self) -> str:
        if not self.counts:
            return "no lines skipped"
        return ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))


def _example(e: dict[str, Any]) -> str:
    """'u.data:2 expected 4 fields, got 1 '1;1;5;8812'' from one stored example."""
    line = f":{e['line']}" if e.get("line") else ""
    text = f" {e['text']!r}" if e.get("text") else ""
    return f"{e['file']}{line} {e['detail']}{text}"


def summary_lines(report: dict[str, Any], files: dict[str, dict[str, int]] | None = None) -> list[str]:
    """The console form of a skip report (`SkipReport.to_dict()`, or a manifest's "skips"): per input file the
    records read and skipped, then per reason its count and first file:line examples."""
    out = []
    for f, st in (files or {}).items():
        frac = st["skipped"] / st["read"] if st["read"] else 0.0
        out.append(f"{f}: {st['skipped']} of {st['read']} records skipped ({100 * frac:.2f}%)")
    counts = report.get("counts", {})
    if not counts:
        return out + ["no line or interaction skipped"]
    for reason, n in counts.items():
        exs = report.get("examples", {}).get(reason, [])
        where = "; ".join(_example(e) for e in exs)
        out.append(f"skipped {n} [{reason}]" + (f", e.g. {where}" if where else ""))
    return out


def budget_error(report: dict[str, Any], files: dict[str, dict[str, int]], max_frac: float,
                 where: str) -> InputLossError | None:
    """The error to raise when an input file lost more than `max_frac` of its records (data.max_skip_frac), else
    None. The budget is per file: a damaged small file (item titles, a test split) is not hidden by a large one."""
    over = {f: st for f, st in files.items() if st["read"] and st["skipped"] / st["read"] > max_frac}
    if not over:
        return None
    head = ", ".join(f"{st['skipped']} of {st['read']} records of {f} ({100 * st['skipped'] / st['read']:.2f}%)"
                     for f, st in over.items())
    return InputLossError(f"{where}: {head} could not be read, more than data.max_skip_frac={max_frac} allows:\n  "
                          + "\n  ".join(summary_lines(report, files))
                          + "\nFix the input (the examples above show where), or raise data.max_skip_frac to accept "
                            "the loss")
