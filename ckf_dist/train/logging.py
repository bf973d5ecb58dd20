"""Run observability: TensorBoard scalars + metrics JSON lines (rank 0), a no-op logger elsewhere."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any


class RunLogger:
    """Writes each scalar to TensorBoard under `<run_dir>/tb/<name>` and appends a JSON line to metrics.jsonl.

    Args:
        run_dir: the run directory.
        name: TensorBoard sub-folder (e.g. "ckf", "cf").

    Example:
        >>> log = RunLogger("runs/x", "ckf"); log.log_dict({"train/loss": 1.2}, step=0); log.close()
    """

    def __init__(self, run_dir: str | Path, name: str = "ckf") -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(str(self.dir / "tb" / name))
        # Line-buffered and open for the whole run (closed by close()): a crash loses nothing.
        self.jsonl = open(self.dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115

    def log_dict(self, scalars: dict[str, Any], step: int) -> None:
        """None means "no value this step" (e.g. a task absent from the step) and is left out. A non-finite number
        is never dropped: TensorBoard gets it as is (shown as NaN / inf) and metrics.jsonl the string "nan", "inf"
        or "-inf" (strict JSON has no such numbers; float() reads the strings back), listed under "nonfinite".
        Values that are no numbers at all (e.g. a nested dict of validation details) are not scalars: left out."""
        clean = {k: f for k, v in scalars.items() if (f := _number(v)) is not None}
        for k, v in clean.items():
            self.tb.add_scalar(k, v, step)
        row: dict[str, Any] = {"step": step, "time": time.time()}
        bad = []
        for k, v in clean.items():
            if math.isfinite(v):
                row[k] = v
            else:
                row[k] = repr(v)  # 'nan', 'inf', '-inf'
                bad.append(k)
        if bad:
            row["nonfinite"] = bad
        self.jsonl.write(json.dumps(row, allow_nan=False) + "\n")

    def flush(self) -> None:
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()
        self.jsonl.close()


class NullLogger:
    """The logger of ranks other than 0."""

    def log_dict(self, scalars: dict[str, Any], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass



def _number(v: Any) -> float | None:
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
