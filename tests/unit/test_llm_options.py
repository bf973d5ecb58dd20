"""model.attn_implementation (model/llm.py) and train.optimizer (train/optim.py): how each choice resolves, on CPU
and with CUDA / flash-attn faked present (the CUDA paths themselves run only in tests/gpu)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ckf_dist.model import llm as llm_mod
from ckf_dist.model.llm import load_llm, resolve_attn_implementation
from ckf_dist.train import optim as optim_mod
from ckf_dist.train.optim import describe_optimizer, make_optimizer


def _fake_gpu(monkeypatch, cuda: bool = True, flash: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash else None) if name == "flash_attn" else real(name, *a))


def test_auto_is_sdpa_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: 'auto' may pick flash-attention (tests/gpu covers it)")
    for dtype in ("float32", "bfloat16"):
        assert resolve_attn_implementation("auto", dtype) == "sdpa"


@pytest.mark.parametrize(("cuda", "flash", "dtype", "expected"), [
    (True, True, "bfloat16", "flash_attention_2"),
    (True, True, "float16", "flash_attention_2"),
    (True, True, "float32", "sdpa"),
    (True, False, "bfloat16", "sdpa"),
    (False, True, "bfloat16", "sdpa"),
])
def test_auto_picks_flash_attention_only_when_it_can_run(monkeypatch, cuda, flash, dtype, expected):
    _fake_gpu(monkeypatch, cuda, flash)
    assert resolve_attn_implementation("auto", dtype) == expected


@pytest.mark.parametrize("name", ["sdpa", "eager"])
def test_explicit_kernels_pass_through(name):
    assert resolve_attn_implementation(name, "float32") == name


@pytest.mark.parametrize(("cuda", "flash", "dtype", "why"), [
    (False, True, "bfloat16", "CUDA is not available"),
    (True, False, "bfloat16", "flash-attn package is not installed"),
    (True, True, "float32", "bfloat16 or float16 only"),
])
def test_flash_attention_where_it_cannot_run_says_why(monkeypatch, cuda, flash, dtype, why):
    _fake_gpu(monkeypatch, cuda, flash)
    with pytest.raises(ValueError, match=r"model\.attn_implementation=flash_attention_2 cannot run here") as e:
        resolve_attn_implementation("flash_attention_2", dtype)
    assert why in str(e.value)


def test_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match=r"model\.attn_implementation must be one of"):
        resolve_attn_implementation("flash_attention_3", "bfloat16")


def test_loaded_model_reports_the_resolved_kernel(tiny_llm_dir, tiny_tokenizer):
    if torch.cuda.is_available():
        pytest.skip("CPU expectation ('auto' -> sdpa)")
    assert load_llm(tiny_llm_dir, "float32", tiny_tokenizer).config._attn_implementation == "sdpa"
    eager = load_llm(tiny_llm_dir, "float32", tiny_tokenizer, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"


def test_load_llm_refuses_flash_attention_on_cpu(tiny_llm_dir):
    if llm_mod.flash_attention_problem("bfloat16") is None:
        pytest.skip("flash-attention can run here")
    with pytest.raises(ValueError, match=r"model\.attn_implementation"):
        load_llm(tiny_llm_dir, "bfloat16", attn_implementation="flash_attention_2")


# --------------------------------------------------------------------------------------------------
# train.optimizer
# --------------------------------------------------------------------------------------------------


def _groups() -> list[dict]:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return [{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 3e-3, "weight_decay": 0.0}]


@pytest.mark.parametrize("kind", ["auto", "torch"])
def test_cpu_gets_plain_torch_adamw_with_the_groups_kept(kind):
    opt = make_optimizer(_groups(), lr=1e-4, weight_decay=0.01, kind=kind, device=torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW
    assert not opt.defaults.get("fused")
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 3e-3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert describe_optimizer(opt).startswith("torch AdamW")


def test_fused_on_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train\.optimizer=fused needs a CUDA device"):
        make_optimizer(_groups(), lr=1e-4, weight_decay=0.0, kind="fused", device=torch.device("cpu"))


def test_unknown_optimizer_kind_is_rejected():
    with pytest.raises(ValueError, match=r"train\.optimizer must be"):
        make_optimizer(_groups(), lr=1e-4, weight_decay=0.0, kind="sgd", device=torch.device("cpu"))


def test_cuda_without_prebuilt_fused_adam_falls_back_to_torch_fused(monkeypatch):
    """A pure-Python DeepSpeed wheel (the GPU check carries one) has no prebuilt fused_adam: no JIT build is tried."""
    import deepspeed.git_version_info as ds_info

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ds_info, "installed_ops", {**ds_info.installed_ops, "fused_adam": False})
    ok, why = optim_mod.deepspeed_fused_adam_status()
    assert not ok and "JIT" in why
    built = {}
    monkeypatch.setattr(torch.optim, "AdamW", lambda groups, **kw: built.update(kw) or torch.optim.SGD(groups, lr=1))
    opt = make_optimizer(_groups(), lr=1e-4, weight_decay=0.0, kind="auto", device=torch.device("cuda", 0))
    assert built["fused"] is True
    assert describe_optimizer(opt).startswith("torch fused AdamW (DeepSpeed FusedAdam skipped:")


def test_describe_any_other_optimizer():
    assert describe_optimizer(torch.optim.SGD(_groups(), lr=0.1)) == "SGD"
