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
        clean = {k: float(v) for k, v in scalars.items() if v is not None and _finite(v)}
        for k, v in clean.items():
            self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")

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


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False
