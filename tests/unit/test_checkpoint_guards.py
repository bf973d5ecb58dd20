"""Resume that checks (train/resume.py) and the non-finite guards (loop.NonfiniteGuard, RunLogger, the export
refusal), on plain values: which config changes are applied, refused or unforceable, with the message checked."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ckf_dist.config import RunConfig
from ckf_dist.train.logging import RunLogger
from ckf_dist.train.loop import NonfiniteError, NonfiniteGuard
from ckf_dist.train.resume import ResumeRefused, check_resume

FP = {"data_manifest_sha256": "aaa", "cf_tables_sha256": "bbb", "base_model": "ccc"}


def _cfgs(**changes) -> tuple[dict, dict]:
    old = RunConfig().to_dict()
    new = json.loads(json.dumps(old))
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        new[section][key] = value
    return old, new


def _check(old, new, mode="auto", fp=FP, steps_done=4):
    return check_resume("step-000004", old, new, FP, fp, steps_done, mode)


def test_unchanged_config_resumes_with_nothing_to_report():
    assert _check(*_cfgs()) == ({}, {})


def test_safe_changes_are_applied():
    old, new = _cfgs(train__max_steps=200, train__ckpt_every=10, train__eval_every=5, train__prefetch=False,
                     train__collective_timeout_s=30)
    new["log"]["every"], new["eval"]["ks"], new["data"]["prepared_dir"] = 1, [1, 2], "elsewhere/data"
    safe, forced = _check(old, new)
    assert forced == {}
    assert safe["train.max_steps"] == (100, 200) and safe["log.every"] == (5, 1) and "eval.ks" in safe
    assert {"train.ckpt_every", "train.eval_every", "train.prefetch", "train.collective_timeout_s",
            "data.prepared_dir"} <= set(safe)


def test_changed_lr_refuses_naming_the_field_and_the_ways_out():
    with pytest.raises(ResumeRefused) as err:
        _check(*_cfgs(train__lr=0.05))
    msg = str(err.value)
    assert "train.lr: 0.0001 -> 0.05" in msg
    assert "train.resume=never" in msg and "log.run_dir" in msg and "train.resume=force" in msg


def test_force_resumes_despite_the_change_and_reports_it():
    safe, forced = _check(*_cfgs(train__lr=0.05, train__max_steps=300), mode="force")
    assert forced == {"train.lr": (1e-4, 0.05)} and safe == {"train.max_steps": (100, 300)}


def test_changed_tasks_refuse_even_with_force():
    for mode in ("auto", "force"):
        with pytest.raises(ResumeRefused, match=r"data.tasks: \['ctr', 'topk', 'rating', 'exp'\] -> \['ctr'\]"):
            _check(*_cfgs(data__tasks=["ctr"]), mode=mode)


def test_changed_lora_rank_refuses_even_with_force():
    with pytest.raises(ResumeRefused, match="(?s)shapes.*multi_lora.rank: 16 -> 8"):
        _check(*_cfgs(multi_lora__rank=8), mode="force")


def test_fewer_max_steps_than_done_or_another_data_refuse():
    with pytest.raises(ResumeRefused, match="train.max_steps: 100 -> 3"):
        _check(*_cfgs(train__max_steps=3))
    with pytest.raises(ResumeRefused, match="inputs.data_manifest_sha256: 'aaa' -> 'zzz'"):
        _check(*_cfgs(), fp={**FP, "data_manifest_sha256": "zzz"})


def test_checkpoint_without_a_recorded_config_refuses():
    with pytest.raises(ResumeRefused, match="records no configuration"):
        check_resume("step-000004", None, RunConfig().to_dict(), None, FP, 4, "auto")


def test_guard_skips_counts_and_stops_after_the_limit_in_a_row():
    guard = NonfiniteGuard(limit=3)
    guard.check(1, 0.7, 1.0, skipped=False, bad_params=0.0, lrs=[0.1])
    guard.check(2, math.nan, math.inf, skipped=True, bad_params=0.0, lrs=[0.1])
    guard.check(3, 0.6, 1.0, skipped=False, bad_params=0.0, lrs=[0.1])  # a good step resets the run of skips
    guard.check(4, math.nan, math.inf, skipped=True, bad_params=0.0, lrs=[0.1])
    guard.check(5, math.nan, math.inf, skipped=True, bad_params=0.0, lrs=[0.1])
    assert guard.total == 3 and guard.in_a_row == 2
    with pytest.raises(NonfiniteError, match=r"step 6: 3 steps in a row \(from step 4\).*max_nonfinite_steps=3"):
        guard.check(6, math.nan, math.inf, skipped=True, bad_params=0.0, lrs=[0.1])


def test_guard_stops_at_once_when_an_update_cannot_be_undone():
    with pytest.raises(NonfiniteError, match="step 1: the optimizer update made trainable parameters non-finite"):
        NonfiniteGuard(3).check(1, 0.7, 1.0, skipped=False, bad_params=1.0, lrs=[math.inf])
    with pytest.raises(NonfiniteError, match="step 2: non-finite loss nan but a finite gradient norm"):
        NonfiniteGuard(3).check(2, math.nan, 1.0, skipped=False, bad_params=0.0, lrs=[0.1])


def test_logger_keeps_non_finite_values(tmp_path):
    log = RunLogger(tmp_path, "ckf")
    log.log_dict({"train/loss": math.nan, "train/grad_norm": math.inf, "train/lr": 0.1, "train/loss_exp": None,
                  "valid/details": {"a": 1}}, step=3)
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["train/loss"] == "nan" and row["train/grad_norm"] == "inf" and row["train/lr"] == 0.1
    assert row["nonfinite"] == ["train/loss", "train/grad_norm"] and "train/loss_exp" not in row
    assert math.isnan(float(row["train/loss"]))


def test_export_refuses_non_finite_adapters_and_writes_nothing(tiny_llm, tiny_tokenizer, tiny_llm_dir, tmp_path):
    from ckf_dist.model.export import export_task_adapters
    from ckf_dist.testing.model_samples import make_model

    model = make_model(tiny_llm, tiny_tokenizer)
    with torch.no_grad():
        next(lyr for lyr in model.lora_layers.values() if lyr.shared is not None).shared.lora_B[0, 0] = math.nan
    with pytest.raises(ValueError, match="refusing to export: non-finite"):
        export_task_adapters(model, tmp_path / "adapters", tiny_llm_dir)
    assert not (tmp_path / "adapters").exists()


def test_deepspeed_zero3_skips_the_update_of_a_non_finite_gradient(monkeypatch):
    """What the loop's guard relies on (DeepSpeed 0.19.8, ZeRO-3, fp32): a NaN loss -> no parameter, optimizer or
    LR-scheduler update, optimizer.overflow set, gradient norm inf; the next finite step trains normally."""
    import deepspeed
    import torch.distributed as dist

    from ckf_dist.train.deepspeed_utils import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
                 "gradient_clipping": 1.0, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    engine, opt, _, sched = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_config,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (s + 1)))
    params = [p for p in engine.module.parameters()]

    def snapshot():
        return [p.ds_tensor.clone() for p in params]

    x = torch.randn(2, 4)
    before, lr_before = snapshot(), sched.get_last_lr()
    loss = engine(x).sum() * torch.tensor(math.nan)
    engine.backward(loss)
    engine.step()
    assert engine.optimizer.overflow and not math.isfinite(engine.get_global_grad_norm())
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))
    assert sched.get_last_lr() == lr_before and engine.skipped_steps == 1
    engine.backward(engine(x).sum())
    engine.step()
    assert not engine.optimizer.overflow and math.isfinite(engine.get_global_grad_norm())
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot()))


def test_preflight_refuses_before_any_stage(tmp_path):
    import dataclasses

    from ckf_dist.train.checkpoint import RUN_FILE, write_manifest
    from ckf_dist.train.resume import preflight

    cfg = RunConfig()
    cfg.log = dataclasses.replace(cfg.log, run_dir=str(tmp_path))
    folder = tmp_path / "checkpoints" / "step-000004"
    folder.mkdir(parents=True)
    (folder / RUN_FILE).write_text(json.dumps({"step": 4, "config": cfg.to_dict()}))
    write_manifest(folder, 4, 1)
    preflight(cfg)  # same config: nothing to say
    cfg.train = dataclasses.replace(cfg.train, lr=0.5)
    with pytest.raises(ResumeRefused, match="train.lr: 0.0001 -> 0.5"):
        preflight(cfg)
    cfg.train = dataclasses.replace(cfg.train, resume="never")
    preflight(cfg)
