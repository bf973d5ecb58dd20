"""The CKF curriculum (MTM): the loss weight moves smoothly from text-only prompts to CF-slot prompts.

w(z) = 1 / (1 + exp(8 (z - T/2) / (T/2))) for step z of T;  L = w L_text + (1 - w) L_cf.
"""

from __future__ import annotations

import math


def curriculum_weight(step: int, total: int) -> float:
    """Weight of the text-only loss at `step` of `total` (about 1 at the start, 0.5 at T/2, about 0 at T).

    Raises:
        ValueError: total <= 0.
    """
    if total <= 0:
        raise ValueError(f"curriculum length must be > 0, got {total}")
    half = total / 2
    x = 8.0 * (step - half) / half
    if x > 700:  # exp overflow; the weight is 0 to double precision anyway
        return 0.0
    return 1.0 / (1.0 + math.exp(x))


def variants_for(weight: float, eps: float = 1e-3) -> tuple[str, ...]:
    """Prompt variants worth computing at this weight: a variant whose loss weight is below eps is skipped
    (it would change the loss by less than eps while doubling the rows)."""
    if weight >= 1 - eps:
        return ("text",)
    if weight <= eps:
        return ("cf",)
    return ("text", "cf")
