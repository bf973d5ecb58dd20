"""Skip report: every raw line or interaction the data pipeline drops, counted per reason with examples.

Readers and preprocessing never drop anything silently: each drop goes through `SkipReport.add`, and the
report ends up in the prepared dataset's manifest (counts per reason + the first few file:line examples).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

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

    def add(self, reason: str, file: str, line: int | None, detail: str = "", text: str = "", n: int = 1) -> None:
        """Record `n` skips for `reason`; keeps the example when fewer than max_examples are stored."""
        self.counts[reason] += n
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append({"file": file, "line": line, "detail": detail[:200], "text": text[:120]})

    def merge(self, other: SkipReport) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            ex = self.examples.setdefault(reason, [])
            ex.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(ex))])

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
