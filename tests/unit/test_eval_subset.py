"""eval.max_samples_per_task: a seeded random sample of whole users per task (eval.run.cap_per_task), not the first
keys in string order, the same for every model, rank and run."""

from __future__ import annotations

import random

import pytest

from ckf_dist.config import ConfigError, load_config
from ckf_dist.eval.run import cap_per_task, eval_samples


def _samples(per_user: dict[int, int], task: str = "ctr") -> list[dict]:
    """`per_user[uid]` samples of `task` for each user, keyed like the prompt shards and sorted by key."""
    out = [{"key": f"test/{task}/{u}/{n}", "task": task, "uid": u} for u, k in per_user.items() for n in range(k)]
    return sorted(out, key=lambda s: s["key"])


def _users(samples: list[dict], task: str = "ctr") -> set[int]:
    return {s["uid"] for s in samples if s["task"] == task}


# Users 1 and 10-19 in string order: "test/ctr/1/..." then "test/ctr/10/...": the first 6 keys are all user 1's.
SKEWED = {1: 6, **{u: 2 for u in range(10, 20)}}


def test_not_the_first_keys_in_string_order():
    samples = _samples(SKEWED)
    assert _users(samples[:6]) == {1}  # what the first-N rule took
    picked = [_users(cap_per_task(samples, 6, seed=s)) for s in range(4)]
    assert any(p != {1} for p in picked) and all(p for p in picked)


def test_deterministic_for_a_seed_and_different_for_another():
    samples = _samples({u: 1 + u % 3 for u in range(40)}) + _samples({u: 1 for u in range(40)}, "rating")
    shuffled = random.Random(5).sample(samples, len(samples))  # the input order (rank, shard) does not matter
    a = cap_per_task(samples, 10, seed=0)
    assert a == cap_per_task(shuffled, 10, seed=0) == cap_per_task(samples, 10, seed=0)
    assert [s["key"] for s in a] == sorted(s["key"] for s in a)  # evaluation reads key order
    assert _users(a) != _users(cap_per_task(samples, 10, seed=1))
    # Pinned: the order is a hash of (seed, uid), the same in every process, on every rank and in every run.
    assert sorted(_users(a, "rating")) == [0, 10, 14, 15, 17, 23, 26, 34, 35, 37]


def test_whole_users_and_never_more_than_the_limit():
    per_user = {u: 1 + (u * 7) % 5 for u in range(60)}
    samples = _samples(per_user) + _samples(per_user, "topk")
    for seed in range(5):
        for limit in (1, 4, 9, 25):
            got = cap_per_task(samples, limit, seed=seed)
            for task in ("ctr", "topk"):
                chosen = [s for s in got if s["task"] == task]
                assert 0 < len(chosen) <= limit or len(_users(chosen, task)) == 1, (seed, limit, task)
                if len(chosen) > limit:  # only a single user with more samples than the limit
                    assert per_user[chosen[0]["uid"]] > limit
                for u in _users(chosen, task):  # every chosen user with all of its samples of the task
                    assert sum(s["uid"] == u for s in chosen) == per_user[u]


def test_a_user_alone_over_the_limit_is_taken_whole():
    samples = _samples({u: 5 for u in range(8)})
    got = cap_per_task(samples, 3, seed=0)
    assert len(_users(got)) == 1 and len(got) == 5


def test_eval_samples_caps_with_data_seed(monkeypatch):
    from ckf_dist.data import prompts

    samples = _samples(SKEWED) + _samples({u: 3 for u in range(30)}, "rating")
    monkeypatch.setattr(prompts, "load_samples", lambda d, split, tasks: list(samples))
    cfg = load_config(None, ["data.seed=3", "eval.max_samples_per_task=6"])
    assert eval_samples(cfg, "test", 6) == cap_per_task(samples, 6, seed=3) != cap_per_task(samples, 6, seed=4)
    assert eval_samples(cfg, "test", 0) == samples


def test_per_task_caps_replace_the_common_one_for_the_tasks_named():
    ctr, topk = _samples({u: 1 for u in range(40)}), _samples({u: 1 for u in range(40)}, "topk")
    samples = sorted(ctr + topk, key=lambda s: s["key"])
    got = cap_per_task(samples, 10, seed=0, per_task={"topk": 3})
    assert len(_users(got, "ctr")) == 10 and len(_users(got, "topk")) == 3
    # Users are visited in the same order for every task: the 3 top-K users are among the 10 CTR users.
    assert _users(got, "topk") <= _users(got, "ctr")
    everything = cap_per_task(samples, 0, seed=0, per_task={"topk": 3})  # 0: CTR uncapped
    assert len(_users(everything, "ctr")) == 40 and len(_users(everything, "topk")) == 3
    assert cap_per_task(samples, 10, seed=0, per_task={"topk": 0}) == sorted(
        [s for s in got if s["task"] == "ctr"] + topk, key=lambda s: s["key"])


def test_per_task_caps_config():
    cfg = load_config(None, ["eval.max_samples_by_task={topk: 30}"])
    assert cfg.eval.max_samples_by_task == {"topk": 30}
    with pytest.raises(ConfigError) as e:
        load_config(None, ["eval.max_samples_by_task={tpk: 3, ctr: -1}"])
    assert "unknown task(s) ['tpk']" in str(e.value) and "must be >= 0 (0 = all), got {'ctr': -1}" in str(e.value)
