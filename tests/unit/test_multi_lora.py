"""Multi-LoRA (MTM): per-row routing against an explicit per-row formula, gate, injection errors, and the per-task
shared-LoRA gradient oracle (the per-task pieces sum to .grad and equal each task's own backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ckf_dist.config import MultiLoRAConfig
from ckf_dist.model.ckf import TaskGate
from ckf_dist.model.multi_lora import MultiLoRALinear, TaskRouter, inject_multi_lora

TASKS2 = ["ctr", "rating", "topk"]


def _layer(gate_free: bool = True) -> tuple[MultiLoRALinear, TaskRouter]:
    router = TaskRouter(TASKS2)
    layer = MultiLoRALinear(nn.Linear(16, 8), router, 4, 8.0, 0.0, TASKS2, 2, 6.0, 0.0)
    with torch.no_grad():
        for ad in [layer.shared, *layer.task_loras.values()]:
            ad.lora_B.normal_()
    return layer, router


def test_layer_routes_each_row_like_the_explicit_formula():
    layer, router = _layer()
    x = torch.randn(5, 3, 16)
    task_ids = torch.tensor([2, 0, 1, 0, 2])
    with router.route(task_ids):
        y = layer(x)
    for b in range(5):
        t = TASKS2[int(task_ids[b])]
        sh, ta = layer.shared, layer.task_loras[t]
        ref = (layer.base_layer(x[b]) + 2.0 * x[b] @ sh.lora_A.T @ sh.lora_B.T
               + 3.0 * x[b] @ ta.lora_A.T @ ta.lora_B.T)
        torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=1e-5)


def test_gate_mixes_shared_and_task_parts_and_starts_neutral():
    layer, router = _layer()
    gate = TaskGate(len(TASKS2), True)
    x = torch.randn(3, 2, 16)
    task_ids = torch.tensor([0, 1, 2])
    with router.route(task_ids):
        plain = layer(x)
    with router.route(task_ids, *gate(task_ids)):
        torch.testing.assert_close(layer(x), plain)  # sigmoid(0) = 0.5: both parts scaled by 1
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
    with router.route(task_ids, *gate(task_ids)):
        y = layer(x)
    g = torch.sigmoid(gate.logits.detach())
    for b in range(3):
        t = TASKS2[b]
        sh, ta = layer.shared, layer.task_loras[t]
        ref = (layer.base_layer(x[b]) + 2 * (1 - g[b]) * 2.0 * x[b] @ sh.lora_A.T @ sh.lora_B.T
               + 2 * g[b] * 3.0 * x[b] @ ta.lora_A.T @ ta.lora_B.T)
        torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=1e-5)


def test_zero_b_leaves_the_base_output():
    router = TaskRouter(TASKS2)
    base = nn.Linear(16, 8)
    layer = MultiLoRALinear(base, router, 4, 8.0, 0.0, TASKS2, 2, 6.0, 0.0)
    x = torch.randn(4, 16)
    with router.route(torch.tensor([0, 1, 2, 1])):
        assert torch.equal(layer(x), base(x))


def test_forward_args_are_checked():
    layer, router = _layer()
    with pytest.raises(ValueError, match="without task routing"):
        layer(torch.randn(2, 16))
    with router.route(torch.tensor([0, 1, 2])), pytest.raises(ValueError, match="task_ids has 3 rows, batch has 2"):
        layer(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"), router.route(torch.tensor([0, 3])):
        pass


def test_inject_reports_unmatched_targets_and_bad_config(tiny_llm):
    router = TaskRouter(TASKS2)
    with pytest.raises(ValueError, match=r"\['qq_proj'\] match no nn.Linear.*q_proj"):
        inject_multi_lora(tiny_llm, MultiLoRAConfig(task_targets=["qq_proj"]), TASKS2, router)
    with pytest.raises(ValueError, match="both shared and task-specific"):
        inject_multi_lora(tiny_llm, MultiLoRAConfig(shared_targets=["q_proj"], task_targets=["q_proj"]), TASKS2,
                          router)


def test_module_in_both_target_sets_gets_both_parts(tiny_llm):
    router = TaskRouter(TASKS2)
    layers = inject_multi_lora(tiny_llm, MultiLoRAConfig(shared_targets=["self_attn.q_proj", "gate_proj"],
                                                                 task_targets=["q_proj"]), TASKS2,
                               router)
    q = layers["model.layers.0.self_attn.q_proj"]
    assert q.shared is not None and list(q.task_loras) == TASKS2
    gate_proj = layers["model.layers.0.mlp.gate_proj"]
    assert gate_proj.shared is not None and not gate_proj.tasks
    assert all(p.requires_grad is False for n, p in tiny_llm.named_parameters() if "lora_" not in n)
