"""Export (MTM + KFM): per task, the shared and the task LoRA folded into ONE standard peft LoRA adapter (rank
r_shared + r_task, scalings and gate folded into B), loadable with `PeftModel.from_pretrained(base, dir/<task>)`; the
fusion modules (MetaNet, projectors, unknown vectors, gate) in safetensors + a JSON; and `load_ckf_model`, which
rebuilds a CKFModel from exactly those files.

    <out_dir>/ckf.json                   format, tasks, configs, CF sizes, per-module ranks
    <out_dir>/fusion.safetensors         fusion.* and gate.* parameters
    <out_dir>/<task>/adapter_config.json + adapter_model.safetensors     (standard peft LoRA)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ckf_dist.config import ModelConfig, MultiLoRAConfig
from ckf_dist.model.ckf import CKFModel, build_ckf_model

FORMAT_VERSION = 1
CKF_JSON = "ckf.json"
FUSION_FILE = "fusion.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"


def _peft_key(module_name: str, part: str) -> str:
    return f"base_model.model.{module_name}.{part}.weight"


@torch.no_grad()
def task_adapter_weights(model: CKFModel, task: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} of the combined adapter of `task`, with unit scaling: B A x equals the Multi-LoRA delta.

    A = [A_shared; A_task] (r_s + r_t, in), B = [s_s g_s(t) B_shared, s_t g_t(t) B_task] (out, r_s + r_t), where s
    are the alpha/r scalings and g the gate multipliers of the task; modules with only one part keep only that part.
    Computed in float32, returned in the parameters' dtype.
    """
    if task not in model.tasks:
        raise ValueError(f"task {task!r} has no adapter in this model; it has {model.tasks}")
    t = model.tasks.index(task)
    g_shared, g_task = model.gate.task_scales()
    out = {}
    for name, layer in model.lora_layers.items():
        As, Bs = [], []
        dtype = layer.base_layer.weight.dtype
        if layer.shared is not None:
            As.append(layer.shared.lora_A.float())
            Bs.append(layer.shared.lora_B.float() * (layer.shared_scaling * float(g_shared[t])))
        if task in layer.tasks:
            ad = layer.task_loras[task]
            As.append(ad.lora_A.float())
            Bs.append(ad.lora_B.float() * (layer.task_scaling * float(g_task[t])))
        if As[0].numel() == 0:
            raise ValueError(f"{name}: LoRA weights are empty (ZeRO-3 partitioned); gather them first, e.g. with "
                             f"deepspeed.zero.GatheredParameters(model.trainable_parameters())")
        out[name] = (torch.cat(As, 0).to(dtype).contiguous(), torch.cat(Bs, 1).to(dtype).contiguous())
    return out


def export_task_adapters(model: CKFModel, out_dir: str | Path, base_model_name_or_path: str) -> dict[str, Path]:
    """Write one peft LoRA adapter per task plus the fusion modules (see the module docstring).

    Args:
        model: the CKFModel (under ZeRO-3: call inside GatheredParameters of its trainable parameters).
        out_dir: target folder (created).
        base_model_name_or_path: recorded in each adapter_config.json (peft's base model pointer).

    Returns:
        {task: adapter folder}.
    """
    from peft import LoraConfig

    out = Path(out_dir)
    ranks: dict[str, dict[str, int]] = {}
    for name, layer in model.lora_layers.items():
        ranks[name] = {"shared": layer.shared.rank if layer.shared is not None else 0,
                       "task": layer.task_loras[layer.tasks[0]].rank if layer.tasks else 0}
    folders = {}
    all_weights = {task: task_adapter_weights(model, task) for task in model.tasks}
    fusion_state = {f"fusion.{k}": v.detach().cpu().contiguous() for k, v in model.fusion.state_dict().items()}
    fusion_state.update({f"gate.{k}": v.detach().cpu().contiguous() for k, v in model.gate.state_dict().items()})
    # Nothing is written when any value is NaN / inf: a diverged run must not leave loadable-looking adapters.
    bad = [f"{task}:{n}" for task, w in all_weights.items() for n, (A, B) in w.items()
           if not (torch.isfinite(A).all() and torch.isfinite(B).all())]
    bad += [k for k, v in fusion_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"refusing to export: non-finite (NaN / inf) values in {len(bad)} tensor(s), e.g. "
                         f"{bad[:5]}; nothing was written to {out}")
    out.mkdir(parents=True, exist_ok=True)
    for task in model.tasks:
        weights = all_weights[task]
        module_rank = {n: A.shape[0] for n, (A, _) in weights.items()}
        r = max(module_rank.values(), key=list(module_rank.values()).count)  # the most common rank
        pattern = {n: k for n, k in module_rank.items() if k != r}
        # lora_alpha == r (per module) makes peft's scaling exactly 1: scalings and gate are already folded into B.
        cfg = LoraConfig(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                         target_modules=sorted(weights), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                         base_model_name_or_path=base_model_name_or_path)
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(folder)
        tensors = {}
        for n, (A, B) in weights.items():
            tensors[_peft_key(n, "lora_A")] = A.cpu()
            tensors[_peft_key(n, "lora_B")] = B.cpu()
        save_file(tensors, folder / ADAPTER_FILE, metadata={"format": "pt"})
        folders[task] = folder
    if any(v.numel() == 0 for v in fusion_state.values()):
        raise ValueError("fusion weights are empty (ZeRO-3 partitioned); gather them before exporting")
    save_file(fusion_state, out / FUSION_FILE, metadata={"format": "pt"})
    layer0 = next(iter(model.lora_layers.values()))
    info = {
        "format": FORMAT_VERSION,
        "tasks": model.tasks,
        "base_model_name_or_path": base_model_name_or_path,
        "model": {"meta_hidden": model.fusion.meta_net.mlp[0].out_features, "pooling": model.fusion.meta_net.pooling},
        "cf": {"dim": model.fusion.dim, "num_users": model.fusion.num_users, "num_items": model.fusion.num_items},
        "gate": model.gate.logits is not None,
        "scaling": {"shared": max((lyr.shared_scaling for lyr in model.lora_layers.values()), default=0.0),
                    "task": layer0.task_scaling},
        "ranks": ranks,
        "note": "Adapters hold shared + task LoRA with scalings and gate folded into lora_B (peft scaling 1). Load "
                "the base LLM with ckf_dist.model.llm.load_llm(base, tokenizer=load_tokenizer(base)) so its "
                "embeddings cover the CF slot tokens; CF prompts also need the fusion modules (load_ckf_model).",
    }
    (out / CKF_JSON).write_text(json.dumps(info, indent=1))
    return folders


def _check_configs(info: dict, export_dir: Path, model: CKFModel, model_cfg: ModelConfig) -> None:
    problems = []
    if info.get("format") != FORMAT_VERSION:
        problems.append(f"format {info.get('format')} != {FORMAT_VERSION}")
    if info["model"] != {"meta_hidden": model_cfg.meta_hidden, "pooling": model_cfg.pooling}:
        problems.append(f"exported MetaNet {info['model']} != model config meta_hidden={model_cfg.meta_hidden}, "
                        f"pooling={model_cfg.pooling!r}")
    cf = {"dim": model.fusion.dim, "num_users": model.fusion.num_users, "num_items": model.fusion.num_items}
    if info["cf"] != cf:
        problems.append(f"exported CF sizes {info['cf']} != given CF tables {cf}")
    ranks = {n: {"shared": lyr.shared.rank if lyr.shared is not None else 0,
                 "task": lyr.task_loras[lyr.tasks[0]].rank if lyr.tasks else 0}
             for n, lyr in model.lora_layers.items()}
    if info["ranks"] != ranks:
        problems.append("exported Multi-LoRA modules/ranks differ from the multi_lora config (targets or ranks)")
    if info["gate"] != (model.gate.logits is not None):
        problems.append(f"exported gate={info['gate']} but multi_lora.gate={model.gate.logits is not None}")
    if problems:
        raise ValueError(f"{export_dir / CKF_JSON} does not match the given configuration:\n" + "\n".join(problems))


@torch.no_grad()
def load_ckf_model(base_model_dir: str | Path, export_dir: str | Path, user_emb: torch.Tensor,
                   item_emb: torch.Tensor, model_cfg: ModelConfig, lora_cfg: MultiLoRAConfig) -> CKFModel:
    """Rebuild a CKFModel from the base LLM folder and `export_task_adapters` output.

    The Multi-LoRA weights are recovered from the per-task peft adapters (shared part: the first r_shared ranks,
    identical in every task's adapter, which is checked; task part: the rest), with the folded scalings divided out.

    Raises:
        FileNotFoundError: a file of the export is missing.
        ValueError: the export does not match the configs / CF tables, or the adapters disagree on the shared part.
    """
    from ckf_dist.model.llm import load_llm, load_tokenizer

    export_dir = Path(export_dir)
    if not (export_dir / CKF_JSON).is_file():
        raise FileNotFoundError(f"{export_dir / CKF_JSON} not found; is {export_dir} an export_task_adapters folder?")
    info = json.loads((export_dir / CKF_JSON).read_text())
    tokenizer = load_tokenizer(base_model_dir)
    llm = load_llm(base_model_dir, model_cfg.dtype, tokenizer)
    model = build_ckf_model(llm, tokenizer, user_emb, item_emb, model_cfg, lora_cfg, tasks=info["tasks"])
    _check_configs(info, export_dir, model, model_cfg)
    state = load_file(export_dir / FUSION_FILE)
    model.fusion.load_state_dict({k[len("fusion."):]: v for k, v in state.items() if k.startswith("fusion.")})
    model.gate.load_state_dict({k[len("gate."):]: v for k, v in state.items() if k.startswith("gate.")})
    g_shared, g_task = model.gate.task_scales()
    shared_seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for t, task in enumerate(model.tasks):
        path = export_dir / task / ADAPTER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (adapter of task {task!r})")
        tensors = load_file(path)
        for name, layer in model.lora_layers.items():
            A, B = tensors[_peft_key(name, "lora_A")].float(), tensors[_peft_key(name, "lora_B")].float()
            r0 = 0
            if layer.shared is not None:
                r0 = layer.shared.rank
                A_s, B_s = A[:r0], B[:, :r0] / (layer.shared_scaling * float(g_shared[t]))
                if name in shared_seen:
                    A_ref, B_ref = shared_seen[name]
                    if not (torch.allclose(A_s, A_ref, atol=1e-6) and torch.allclose(B_s, B_ref, atol=1e-5)):
                        raise ValueError(f"{path}: the shared part of {name} differs from the other tasks' adapters")
                else:
                    shared_seen[name] = (A_s, B_s)
                    layer.shared.lora_A.copy_(A_s)
                    layer.shared.lora_B.copy_(B_s)
            if task in layer.tasks:
                ad = layer.task_loras[task]
                ad.lora_A.copy_(A[r0:])
                ad.lora_B.copy_(B[:, r0:] / (layer.task_scaling * float(g_task[t])))
    return model
