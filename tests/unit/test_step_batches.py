"""StepBatches: building a step ahead in a thread changes nothing but the mixture's lag, and resume is exact.

Oracles: prefetching with fixed weights == building synchronously; a run saved after step k and continued in a
fresh builder == the uninterrupted run (with and without prefetch, with weights that change every step).
"""

from __future__ import annotations

import pytest
import torch

from ckf_dist.config import DataConfig, SyntheticConfig

TASKS = ["ctr", "topk", "rating"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> str:
    from ckf_dist.data.preprocess import prepare_data

    d = tmp_path_factory.mktemp("stepbatches") / "data"
    prepare_data(DataConfig(prepared_dir=str(d), tasks=TASKS,
                            synthetic=SyntheticConfig(num_users=24, num_items=30, max_interactions=10)), engine="local")
    return str(d)


def make(prepared, tiny_tokenizer, prefetch: bool):
    from ckf_dist.data.collate import Collator
    from ckf_dist.data.stream import TaskStream
    from ckf_dist.train.batches import StepBatches

    streams = {t: TaskStream(prepared, "train", t, rank=1, world=2, seed=3) for t in TASKS}
    # Variants depend on the step (as under the curriculum), so a step built for the wrong step would show.
    return StepBatches(streams, Collator(tiny_tokenizer, 128, 5), TASKS, micro_batch_size=5, grad_accum=2, seed=7,
                       rank=1, variants=lambda step: ("text",) if step % 3 else ("text", "cf"), prefetch=prefetch)


def weights_after(step: int) -> torch.Tensor:
    """A mixture that moves every step (as grad_balanced does), deterministic in the step."""
    w = torch.tensor([1.0 + step % 4, 1.0, 0.5 + (step % 3)], dtype=torch.float64)
    return w / w.sum()


def run(builder, steps: range, last: int) -> list[tuple]:
    """(keys, input_ids) of every micro-batch; the mixture is 'updated' after each step."""
    out = []
    weights = weights_after(steps.start - 1)
    for step in steps:
        for b in builder.take(step, weights, last_step=last):
            out.append((tuple(b.keys), b.input_ids.clone(), tuple(b.is_cf.tolist())))
        weights = weights_after(step)
    return out


def same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and x[2] == y[2] and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_prefetch_with_fixed_weights_equals_sync(prepared, tiny_tokenizer):
    fixed = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    results = []
    for prefetch in (False, True):
        b = make(prepared, tiny_tokenizer, prefetch)
        results.append([(tuple(m.keys), m.input_ids) for s in range(12) for m in b.take(s, fixed, last_step=11)])
        b.close()
    assert [k for k, _ in results[0]] == [k for k, _ in results[1]]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(results[0], results[1]))


def test_prefetch_draws_with_the_mixture_one_update_older(prepared, tiny_tokenizer):
    from ckf_dist.tasks import TASK_ID

    w_old, w_new = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])  # all ctr -> all rating
    for prefetch, task in ((True, "ctr"), (False, "rating")):
        b = make(prepared, tiny_tokenizer, prefetch)
        b.take(0, w_old, last_step=5)  # with prefetch, step 1 starts building now, with w_old
        step1 = b.take(1, w_new, last_step=5)
        b.close()
        assert {int(t) for m in step1 for t in m.task_ids} == {TASK_ID[task]}


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("stop_after", [0, 4, 9])
def test_resume_is_exact(prepared, tiny_tokenizer, prefetch, stop_after):
    last = 14
    full = make(prepared, tiny_tokenizer, prefetch)
    expected = run(full, range(last + 1), last)
    full.close()

    first = make(prepared, tiny_tokenizer, prefetch)
    head = run(first, range(stop_after + 1), last)
    state = first.state_dict()  # as written in the checkpoint after step `stop_after`
    first.close()  # the process dies; a new one resumes
    second = make(prepared, tiny_tokenizer, prefetch)
    second.load_state_dict(state)
    tail = run(second, range(stop_after + 1, last + 1), last)
    second.close()
    assert same(head + tail, expected)


def test_state_names_missing_task(prepared, tiny_tokenizer):
    b = make(prepared, tiny_tokenizer, prefetch=False)
    state = b.state_dict()
    del state["streams"]["topk"]
    with pytest.raises(ValueError, match="topk"):
        make(prepared, tiny_tokenizer, prefetch=False).load_state_dict(state)
