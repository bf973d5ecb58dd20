"""CKFModel: the frozen LLM with CF knowledge fused into its input embeddings (KFM) and Multi-LoRA routed per row
(MTM), trained with the text/CF curriculum loss L = w L_text + (1 - w) L_cf on answer tokens (CKF_METHOD.md).
`build_ckf_model` assembles it around an already loaded (possibly ZeRO-3-partitioned) causal LM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ckf_dist.config import ModelConfig, MultiLoRAConfig
from ckf_dist.data.batch import Batch
from ckf_dist.model.fusion import SoftPromptFusion
from ckf_dist.model.multi_lora import MultiLoRALinear, TaskRouter, inject_multi_lora
from ckf_dist.tasks import ITEM_SLOT, TASK_ID, TASKS, USER_SLOT


class CKFOutput(NamedTuple):
    """What CKFModel.forward returns. A NamedTuple (not a dataclass) so that DeepSpeed ZeRO-3 sees the tensors inside
    and attaches its pre-backward hooks to them.

    Attributes:
        loss: scalar training loss (with graph).
        task_loss: (T,) detached mean answer-token loss per task (0 where the task has no tokens in the batch).
        task_tokens: (T,) answer tokens per task in the batch.
        row_loss: (B,) detached mean answer-token loss of each row (0 for rows without answer tokens).
    """

    loss: torch.Tensor
    task_loss: torch.Tensor
    task_tokens: torch.Tensor
    row_loss: torch.Tensor


class TaskGate(nn.Module):
    """Optional learned per-task gate between the shared and the task parts of Multi-LoRA.

    For task t with gate logit g_t (initialised 0): the shared part is scaled by 2 (1 - sigmoid(g_t)) and the task
    part by 2 sigmoid(g_t), so at initialisation both are scaled by 1 and the model equals the ungated one. The gate
    lives in its own module so that ZeRO-3 gathers it whenever routing weights are computed (forward, logits,
    generate), and the layers only ever see plain per-row tensors.

    Args:
        num_tasks: T.
        enabled: False: no parameters; shared weight None (=1) and task weight one-hot.

    Example:
        >>> shared_w, task_w = TaskGate(2, True)(torch.tensor([1, 0]))
        >>> shared_w.tolist(), task_w.tolist()
        ([1.0, 1.0], [[0.0, 1.0], [1.0, 0.0]])
    """

    def __init__(self, num_tasks: int, enabled: bool) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.logits = nn.Parameter(torch.zeros(num_tasks)) if enabled else None

    def task_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) shared-part and (T,) task-part multipliers of each task (ones without gate)."""
        if self.logits is None:
            ones = torch.ones(self.num_tasks)
            return ones, ones
        g = torch.sigmoid(self.logits)
        return 2 * (1 - g), 2 * g

    def forward(self, task_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        one_hot = F.one_hot(task_ids, self.num_tasks).float()  # (B, T)
        if self.logits is None:
            return None, one_hot
        g = torch.sigmoid(self.logits.float())[task_ids]  # (B,)
        return 2 * (1 - g), one_hot * (2 * g)[:, None]


class CKFModel(nn.Module):
    """CF-fused, Multi-LoRA-adapted causal LM (use `build_ckf_model` to create one).

    Args:
        llm: a causal LM whose Linear targets already hold MultiLoRALinear layers (frozen base weights); its logits
            must be `get_output_embeddings()(get_decoder()(...).last_hidden_state)` (Llama, Mistral, Qwen, ...).
        fusion: the SoftPromptFusion module (CF tables, MetaNet, projectors, unknown vectors).
        router: the TaskRouter shared by the MultiLoRALinear layers.
        gate: the TaskGate.
        tasks: task names; local task index i <-> tasks[i].
        pad_token_id / eos_token_id: for generation.

    Example:
        >>> model = build_ckf_model(llm, tok, user_emb, item_emb, ModelConfig(), MultiLoRAConfig())
        >>> out = model(batch, text_weight=0.3)
        >>> out.loss.backward()
    """

    def __init__(self, llm: nn.Module, fusion: SoftPromptFusion, router: TaskRouter, gate: TaskGate,
                 tasks: Sequence[str], pad_token_id: int | None, eos_token_id: int | None) -> None:
        super().__init__()
        self.llm = llm
        self.fusion = fusion
        self.gate = gate
        self.router = router
        self.tasks = list(tasks)
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id
        # Global TASK_ID -> local index (-1: a task this model has no adapter for).
        index = torch.full((len(TASKS),), -1, dtype=torch.long)
        for i, t in enumerate(self.tasks):
            index[TASK_ID[t]] = i
        self.register_buffer("task_index", index, persistent=False)
        self.lora_layers: dict[str, MultiLoRALinear] = {
            n: m for n, m in llm.named_modules() if isinstance(m, MultiLoRALinear)}

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        """LoRAs (+ gate), MetaNet, projectors and unknown vectors; the LLM and CF tables are frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float, fusion_lr: float) -> list[dict]:
        """Optimizer groups: the LoRAs (+ gate) at `lr`, the fusion modules (trained from scratch) at `fusion_lr`."""
        fusion = {id(p) for p in self.fusion.parameters()}
        groups = [{"params": [p for p in self.trainable_parameters() if id(p) not in fusion], "lr": lr},
                  {"params": [p for p in self.fusion.parameters() if p.requires_grad], "lr": fusion_lr}]
        return [g for g in groups if g["params"]]

    def shared_lora_parameters(self) -> list[nn.Parameter]:
        """The shared-LoRA parameters, per shared layer in module order: A, then B (train/task_grads.py's layout)."""
        out = []
        for layer in self.lora_layers.values():
            if layer.shared is not None:
                out += [layer.shared.lora_A, layer.shared.lora_B]
        return out

    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the LLM (non-reentrant), with each recomputation run under the task routing
        of the forward it repeats (the layers need it, and it has ended by the time backward runs)."""
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, "context_fn": self.router.checkpoint_contexts})

    # ------------------------------------------------------------------ forward paths
    def local_task_ids(self, task_ids: torch.Tensor) -> torch.Tensor:
        """Global TASK_ID tensor -> index into self.tasks; ValueError for tasks without an adapter."""
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= len(TASKS)):
            raise ValueError(f"Batch.task_ids must be TASK_ID values in [0, {len(TASKS)}), got {task_ids.tolist()}")
        local = self.task_index[task_ids]
        if bool((local < 0).any()):
            bad = sorted({TASKS[int(t)] for t in task_ids[local < 0]})
            raise ValueError(f"batch holds task(s) {bad} but the model has adapters only for {self.tasks}; "
                             f"build it with tasks including them")
        return local

    def _check_batch(self, batch: Batch) -> None:
        B, L = batch.input_ids.shape
        for name in ("attention_mask", "labels"):
            if getattr(batch, name).shape != (B, L):
                raise ValueError(f"Batch.{name} has shape {tuple(getattr(batch, name).shape)}, expected {(B, L)}")
        for name in ("task_ids", "user_ids", "is_cf"):
            if getattr(batch, name).shape != (B,):
                raise ValueError(f"Batch.{name} has shape {tuple(getattr(batch, name).shape)}, expected ({B},)")
        for name in ("history", "slot_items"):
            v = getattr(batch, name)
            if v.dim() != 2 or v.shape[0] != B:
                raise ValueError(f"Batch.{name} has shape {tuple(v.shape)}, expected ({B}, width)")

    def fuse_embeddings(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with the CF vectors written into the slot positions, (B, L, D), and the fusion anchor."""
        self._check_batch(batch)
        embeds = self.llm.get_input_embeddings()(batch.input_ids)  # (B, L, D)
        return self.fusion(embeds, batch.input_ids, batch.user_ids, batch.history, batch.slot_items)

    def _hidden(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, anchor = self.fuse_embeddings(batch)
        local = self.local_task_ids(batch.task_ids)
        shared_w, task_w = self.gate(local)
        # Positions count real tokens only, so left- and right-padded rows see the same positions.
        position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with self.router.route(local, shared_w, task_w):
            out = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                         position_ids=position_ids, use_cache=False)
        return out.last_hidden_state, anchor  # (B, L, D)

    def logits(self, batch: Batch, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits of the fused and routed model (evaluation scoring).

        Args:
            at: (rows, cols), two (N,) index tensors: the LM head runs only at those positions and (N, V) is
                returned. With a 49k vocabulary the head over every position is a large share of a scoring pass
                (and (B, L, V) floats of memory), while scoring reads one position per row (CTR, rating) or the
                answer tokens (top-K candidates). None: all positions, (B, L, V).
        """
        hidden, _ = self._hidden(batch)
        if at is not None:
            hidden = hidden[at[0].to(hidden.device), at[1].to(hidden.device)]  # (N, D)
        return self.llm.get_output_embeddings()(hidden)

    def forward(self, batch: Batch, text_weight: float = 0.0, loss_norm: str = "token") -> CKFOutput:
        """Curriculum loss on the answer tokens; the LM head only runs on answer positions (memory: no (B, L, V)).

        Args:
            batch: rows of any tasks and both prompt variants.
            text_weight: w in L = w L_text + (1 - w) L_cf; when only one variant has answer tokens, its loss alone.
            loss_norm: "token": each variant's loss is the mean over its answer tokens (a 30-token explanation weighs
                30x a one-token CTR answer); "row": the mean over its rows of each row's mean token loss (every
                sample weighs the same, whatever its answer length).
        """
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError(f"text_weight must be within [0, 1], got {text_weight}")
        if loss_norm not in ("token", "row"):
            raise ValueError(f"loss_norm must be 'token' or 'row', got {loss_norm!r}")
        hidden, anchor = self._hidden(batch)
        B, T = batch.input_ids.shape[0], len(self.tasks)
        labels = batch.labels[:, 1:]  # token l+1 is predicted at position l
        b_idx, l_idx = (labels != -100).nonzero(as_tuple=True)  # (N,)
        logits = self.llm.get_output_embeddings()(hidden[:, :-1][b_idx, l_idx])  # (N, V)
        tok_loss = F.cross_entropy(logits.float(), labels[b_idx, l_idx], reduction="none")  # (N,)

        row_sum = torch.zeros(B, device=tok_loss.device).index_add(0, b_idx, tok_loss)
        row_cnt = torch.zeros(B, device=tok_loss.device).index_add(0, b_idx, torch.ones_like(tok_loss))
        is_cf = batch.is_cf[b_idx]
        loss = anchor.float() + hidden.sum().float() * 0.0  # keeps every trainable parameter in the graph
        n_cf, n_text = int(is_cf.sum()), int((~is_cf).sum())
        if loss_norm == "token":
            l_cf = tok_loss[is_cf].sum() / max(n_cf, 1)
            l_text = tok_loss[~is_cf].sum() / max(n_text, 1)
        else:  # each token weighs 1 / (its row's answer tokens), so every row sums to its mean token loss
            w_tok = 1.0 / row_cnt[b_idx]
            l_cf = (tok_loss * w_tok)[is_cf].sum() / w_tok[is_cf].sum().clamp_min(1e-12)
            l_text = (tok_loss * w_tok)[~is_cf].sum() / w_tok[~is_cf].sum().clamp_min(1e-12)
        if n_cf and n_text:
            loss = loss + text_weight * l_text + (1.0 - text_weight) * l_cf
        elif n_cf:
            loss = loss + l_cf
        elif n_text:
            loss = loss + l_text

        local = self.local_task_ids(batch.task_ids)
        with torch.no_grad():
            task_sum = torch.zeros(T, device=tok_loss.device).index_add(0, local[b_idx], tok_loss.detach())
            task_tokens = torch.zeros(T, device=tok_loss.device).index_add(0, local[b_idx],
                                                                           torch.ones_like(tok_loss))
            task_loss = task_sum / task_tokens.clamp_min(1)
            row_loss = row_sum.detach() / row_cnt.clamp_min(1)
        return CKFOutput(loss=loss, task_loss=task_loss, task_tokens=task_tokens, row_loss=row_loss)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int, num_beams: int = 1, synced_gpus: bool = False
                 ) -> torch.Tensor:
        """Greedy / beam generation from prompt-only, LEFT-padded rows with fusion and per-row routing active.

        Returns:
            (B, <= max_new_tokens) new token ids (rows that stop early are padded with the pad id).

        Raises:
            ValueError: the batch is right-padded (a real token after padding would continue from a pad).
        """
        if max_new_tokens <= 0 or num_beams <= 0:
            raise ValueError(f"max_new_tokens and num_beams must be > 0, got {max_new_tokens}, {num_beams}")
        mask = batch.attention_mask
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("generate needs LEFT-padded prompt-only rows; collate with "
                             "Collator(..., padding_side='left', with_answer=False)")
        embeds, _ = self.fuse_embeddings(batch)
        local = self.local_task_ids(batch.task_ids)
        shared_w, task_w = self.gate(local)
        # generate() repeats each row num_beams times (repeat_interleave); routing must follow.
        expand = (lambda t: t.repeat_interleave(num_beams, dim=0)) if num_beams > 1 else (lambda t: t)
        with self.router.route(expand(local), None if shared_w is None else expand(shared_w), expand(task_w)):
            out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    num_beams=num_beams, do_sample=False, synced_gpus=synced_gpus,
                                    pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id)
        return out


def build_ckf_model(llm: nn.Module, tokenizer, user_emb: torch.Tensor, item_emb: torch.Tensor,
                    model_cfg: ModelConfig, lora_cfg: MultiLoRAConfig, tasks: Sequence[str] = TASKS,
                    token_norm: float | None = None) -> CKFModel:
    """Wrap a loaded causal LM into a CKFModel: freeze it, inject Multi-LoRA, add the fusion modules.

    Args:
        llm: causal LM (Hugging Face), possibly ZeRO-3-partitioned while loading; its embeddings must cover the
            tokenizer (load_llm resizes them).
        tokenizer: holds USER_SLOT and ITEM_SLOT.
        user_emb / item_emb: (U, d) / (V, d) CF tables (frozen copies are kept as buffers).
        model_cfg: MetaNet width and pooling.
        lora_cfg: Multi-LoRA targets, ranks, alphas, dropouts, gate.
        tasks: tasks that get an adapter (default all).
        token_norm: mean norm of the LLM's token embeddings, for model.fusion_init='match_tokens'; default: measured
            on `llm` (pass it when the embeddings are partitioned, e.g. under ZeRO-3).

    Raises:
        ValueError: invalid configs, missing slot tokens, an LLM without decoder / output embeddings, unknown tasks.
    """
    problems = model_cfg.problems("model") + lora_cfg.problems("multi_lora")
    if problems:
        raise ValueError("invalid model configuration:\n" + "\n".join(problems))
    if bad := [t for t in tasks if t not in TASK_ID]:
        raise ValueError(f"unknown task(s) {bad}; expected a subset of {list(TASKS)}")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"tasks must be non-empty and distinct, got {list(tasks)}")
    vocab = tokenizer.get_vocab()
    for tok in (USER_SLOT, ITEM_SLOT):
        if tok not in vocab:
            raise ValueError(f"tokenizer lacks the slot token {tok!r}; load it with ckf_dist.model.llm.load_tokenizer")
    for fn in ("get_decoder", "get_input_embeddings", "get_output_embeddings"):
        if not callable(getattr(llm, fn, None)) or getattr(llm, fn)() is None:
            raise ValueError(f"{type(llm).__name__} has no {fn}(); CKFModel needs a Hugging Face causal LM")
    n_emb = llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_emb:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the LLM embeds {n_emb}; call "
                         f"llm.resize_token_embeddings(len(tokenizer)) (load_llm(path, tokenizer=tok) does)")
    hidden = llm.config.hidden_size
    llm.requires_grad_(False)
    router = TaskRouter(tasks)
    inject_multi_lora(llm, lora_cfg, tasks, router)
    fusion = SoftPromptFusion(user_emb, item_emb, hidden, model_cfg.meta_hidden, model_cfg.pooling,
                              tokenizer.convert_tokens_to_ids(USER_SLOT), tokenizer.convert_tokens_to_ids(ITEM_SLOT))
    if model_cfg.fusion_init == "match_tokens":
        if token_norm is None:
            token_norm = mean_token_norm(llm)
        fusion.match_norm(token_norm)
    dtype = llm.get_input_embeddings().weight.dtype
    fusion.to(dtype)
    gate = TaskGate(len(tasks), lora_cfg.gate)
    return CKFModel(llm, fusion, router, gate, tasks, tokenizer.pad_token_id, tokenizer.eos_token_id)


def mean_token_norm(llm: nn.Module) -> float:
    """Mean L2 norm of the rows of the LLM's input embedding table (the scale the fusion vectors are matched to).

    Raises:
        ValueError: the table is partitioned (empty here); gather it and pass the value instead.
    """
    weight = llm.get_input_embeddings().weight
    if weight.numel() == 0:
        raise ValueError("the input embeddings are partitioned (ZeRO-3); measure their norm inside a gather and pass "
                         "build_ckf_model(..., token_norm=...)")
    return float(weight.detach().float().norm(dim=-1).mean())
