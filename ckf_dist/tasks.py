"""The four CKF tasks and the special tokens that mark CF slots in prompts.

Tasks are the string values of `Task`; integer task ids exist only inside tensors (`TASK_ID`).
"""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["ctr", "topk", "rating", "exp"]
TASKS: tuple[str, ...] = get_args(Task)
TASK_ID: dict[str, int] = {t: i for i, t in enumerate(TASKS)}

# Dedicated slot tokens (never <unk>): the fusion module replaces their embeddings with the
# projected CF vectors of the user / of the item the slot stands for (KFM).
USER_SLOT = "<|user_cf|>"
ITEM_SLOT = "<|item_cf|>"
SLOT_TOKENS: tuple[str, str] = (USER_SLOT, ITEM_SLOT)

# Answer vocabularies scored at the answer position (CTR: P(Yes) vs P(No); rating: expectation over digits).
CTR_ANSWERS: tuple[str, str] = ("No", "Yes")
RATING_ANSWERS: tuple[str, ...] = ("1", "2", "3", "4", "5")


def task_id(task: str) -> int:
    """Map a task name to its tensor id.

    Raises:
        ValueError: if `task` is not one of TASKS.
    """
    if task not in TASK_ID:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    return TASK_ID[task]
