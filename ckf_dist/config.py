"""Typed configuration for every stage (data -> cf -> model -> train -> eval) and `load_config`.

One YAML per experiment plus dotted overrides (`train.lr=2e-4`). Every problem -- unknown keys,
wrong types (checked by pydantic, strictly), values out of range and contradictions between sections
(each section's `problems()`) -- is collected and reported at once in a single `ConfigError`, each
line naming the dotted key and what is allowed.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails, SchemaValidator, core_schema

from ckf_dist.tasks import TASKS


class ConfigError(ValueError):
    """All problems found in a configuration, one per line."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        head = f"invalid configuration{f' ({source})' if source else ''}: {len(problems)} problem(s)"
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


# rule -> "the value breaks it". Written as the negation of the rule, so that NaN (which compares False both ways)
# breaks every rule; non-finite floats are also reported on their own by _nonfinite_problems.
_BREAKS: dict[str, Callable[[Any], bool]] = {
    "> 0": lambda v: not v > 0,
    ">= 0": lambda v: not v >= 0,
    "within [0, 1)": lambda v: not 0 <= v < 1,
}


def _out_of_range(p: str, section: Any, rule: str, *names: str) -> list[str]:
    """`{p}.{name} must be {rule}, got {value}` for each named field of `section` that breaks `rule` (a _BREAKS key)."""
    return [f"{p}.{n} must be {rule}, got {getattr(section, n)}" for n in names if _BREAKS[rule](getattr(section, n))]


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    num_users: int = 200
    """Users in the generated dataset."""
    num_items: int = 120
    """Items in the generated dataset."""
    latent_dim: int = 4
    """Dimension of the hidden user/item factors the ratings and texts are generated from."""
    min_interactions: int = 4
    """Fewest interactions per user (some users stay sparse, i.e. cold)."""
    max_interactions: int = 30
    """Most interactions per user."""
    noise: float = 0.5
    """Std of the Gaussian noise added to the latent affinity before it is cut into ratings 1-5."""

    def problems(self, p: str) -> list[str]:
        out = _out_of_range(p, self, "> 0", "num_users", "num_items", "latent_dim", "min_interactions")
        if self.max_interactions < self.min_interactions:
            out.append(f"{p}.max_interactions ({self.max_interactions}) must be >= min_interactions "
                       f"({self.min_interactions})")
        if self.min_interactions < 3:
            out.append(f"{p}.min_interactions must be >= 3 (leave-last-out needs train, valid and test)")
        if self.max_interactions > self.num_items:
            out.append(f"{p}.max_interactions ({self.max_interactions}) cannot exceed num_items ({self.num_items})")
        return out + _out_of_range(p, self, ">= 0", "noise")


@dataclass
class ColumnMap:
    """Column names of a generic Parquet/CSV interaction table (data.source = 'table')."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str = "rating"
    timestamp: str = "timestamp"
    review: str | None = None
    """Optional review-text column (needed for the explanation task)."""
    title: str | None = None
    """Optional item-title column."""
    label: str | None = None
    """Optional 0/1 feedback column (clicks, implicit feedback) used instead of `rating`: 1 = a positive
    interaction (an interaction the CF model trains on, shown as "liked"), 0 = an explicit negative (a CTR "No"
    sample in place of sampled negatives; never an interaction). Any other value, or only one class, is an error."""


@dataclass
class DataConfig:
    source: Literal["synthetic", "ml-100k", "ml-1m", "amazon", "table", "alpaca"] = "synthetic"
    """Which reader to use. 'synthetic' generates data from `synthetic`; the others read `path`. 'alpaca':
    instruction-format prompt files (JSON list or JSON lines of {instruction, input, output}, as TALLRec and
    LLaMA-Factory use) given as train/valid/test files, for the text-only path (no users, items or CF)."""
    path: str | None = None
    """Raw data location (a folder for MovieLens, a .json/.json.gz file for Amazon, a file for 'table', the train
    file for 'alpaca')."""
    metadata_path: str | None = None
    """Optional Amazon metadata file (JSON lines with asin + title) for readable item titles."""
    columns: ColumnMap = field(default_factory=ColumnMap)
    """Column mapping for source='table'."""
    valid_path: str | None = None
    """source='table': a predefined validation file (same columns as `path`). Set with `test_path`; `path` is then
    the training file, the only one the CF model and every prompt history see, instead of leave-last-out.
    source='alpaca': the validation prompt file (required)."""
    test_path: str | None = None
    """source='table': a predefined test file (same columns as `path`); see `valid_path`. source='alpaca': the test
    prompt file (required)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    prepared_dir: str = "runs/data"
    """Where the prepared interactions, id maps, prompt shards and manifest are written/read."""
    seed: int = 0
    """Seed for negatives, candidates and shuffles: same input + seed -> byte-identical shards."""
    k_core: int = 0
    """Iteratively drop users and items with fewer interactions than this (0 = off)."""
    cold_threshold: int = 5
    """A user with <= this many training interactions is 'cold'."""
    history_len: int = 10
    """Most recent training items shown in a prompt's history (and fed to the MetaNet)."""
    like_threshold: float = 4.0
    """CTR label: rating >= like_threshold is a like."""
    ctr_negatives: int = 1
    """Sampled non-interacted items per positive CTR sample."""
    num_candidates: int = 10
    """Top-K candidates per sample: the target plus num_candidates - 1 sampled non-interacted items."""
    max_explanation_words: int = 30
    """Explanation targets (review text) are cut to this many words."""
    train_windows_per_user: int = 0
    """Training prompts per user and task from sliding windows over the training history (0 = all)."""
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    """Tasks to build prompts for (explanation needs review text)."""
    shard_size: int = 2000
    """Samples per WebDataset shard."""
    ray_num_cpus: int = 8
    """Logical CPUs given to a local Ray (more than physical, or data tasks starve on small machines)."""
    ray_object_store_mb: int = 512
    """Object store cap in MiB (small /dev/shm)."""
    stream: Literal["auto", "local", "ray"] = "auto"
    """How each training rank reads its prompt samples. 'local': `TaskStream` (data/stream.py), every shard of a task
    read into the rank's memory, one full permutation per epoch; the single-process path. 'ray': `RayTaskStream`
    (data/ray_stream.py), the rank's share streamed from the shards through Ray Data in windows of `stream_window`
    samples (bounded memory, exact resume; needs a running Ray). 'auto': 'ray' where Ray is running (a Ray Train
    worker, or RAY_ADDRESS set), else 'local'."""
    stream_window: int = 4096
    """data.stream=ray: samples per shuffle window; a rank holds at most two windows of each task (the one in use and
    the one read ahead). Larger mixes better (a window is shuffled as a whole); the order is shard-level otherwise."""
    max_skip_frac: float = 0.001
    """Input-loss budget: preparation stops, with the skip summary as the error, when more than this fraction of the
    records of any one input file (ratings, items, metadata, each split file) could not be read (malformed lines,
    out-of-range ratings, bad encodings, ...). Checked per file, so a small damaged file is not hidden by a large
    clean one. Protocol drops (duplicates, k-core, users with < 3 interactions, cold items) do not count. 1 = off."""
    allow_truncated: bool = False
    """A truncated or corrupt input file (a .gz cut short or damaged, a CSV the parser cannot continue) is an error
    naming the file; true keeps its readable prefix and reports the lost rest in the skip summary: as
    'corrupt_file_rows_lost' with the rows estimated from the gzip size field when the file is complete but corrupt,
    else as one 'truncated_or_corrupt_file' (a truncated gzip records nowhere how much is missing). The lost rest is
    not charged to max_skip_frac (this opt-in accepts it)."""

    def problems(self, p: str) -> list[str]:
        out = self.synthetic.problems(f"{p}.synthetic") if self.source == "synthetic" else []
        if self.source != "synthetic" and not self.path:
            out.append(f"{p}.path is required when {p}.source={self.source!r}")
        if bad := [t for t in self.tasks if t not in TASKS]:
            out.append(f"{p}.tasks has unknown task(s) {bad}; allowed: {list(TASKS)}")
        if not self.tasks:
            out.append(f"{p}.tasks must name at least one task")
        if dup := sorted({t for t in self.tasks if self.tasks.count(t) > 1}):
            out.append(f"{p}.tasks lists {dup} more than once (each task's samples would be built and trained twice); "
                       f"name each task once")
        if not 0 <= self.max_skip_frac <= 1:
            out.append(f"{p}.max_skip_frac must be within [0, 1] (1 = no input-loss budget), got {self.max_skip_frac}")
        if self.source in ("ml-100k", "ml-1m") and "exp" in self.tasks:
            out.append(f"{p}.tasks contains 'exp' but {p}.source={self.source!r} has no review text; "
                       f"drop 'exp' or use source 'amazon'/'synthetic'")
        out += _out_of_range(p, self, "> 0", "history_len", "num_candidates", "max_explanation_words", "shard_size",
                             "ray_num_cpus", "ray_object_store_mb", "stream_window")
        if self.num_candidates < 2:
            out.append(f"{p}.num_candidates must be >= 2 (target + at least one negative)")
        out += _out_of_range(p, self, ">= 0", "ctr_negatives", "cold_threshold", "k_core", "train_windows_per_user")
        if not 1.0 <= self.like_threshold <= 5.0:
            out.append(f"{p}.like_threshold must be within the rating scale [1, 5], got {self.like_threshold}")
        if self.source not in ("table", "alpaca") and (self.valid_path or self.test_path):
            out.append(f"{p}.valid_path / {p}.test_path need {p}.source='table' or 'alpaca', got {self.source!r}")
        if self.source != "table" and self.columns.label:
            out.append(f"{p}.columns.label needs {p}.source='table', got {self.source!r}")
        if bool(self.valid_path) != bool(self.test_path):
            out.append(f"{p}.valid_path and {p}.test_path must be set together (predefined train/valid/test files)")
        if self.source == "alpaca" and not (self.valid_path and self.test_path):
            out.append(f"{p}.source='alpaca' needs {p}.valid_path and {p}.test_path (the valid and test prompt files)")
        if self.source == "alpaca" and self.tasks not in (["ctr"], ["exp"]):
            out.append(f"{p}.source='alpaca' needs {p}.tasks=['ctr'] (Yes/No outputs, as TALLRec) or ['exp'] (free "
                       f"text outputs), got {self.tasks}")
        if self.columns.label and "rating" in self.tasks:
            out.append(f"{p}.tasks contains 'rating' but {p}.columns.label={self.columns.label!r} is 0/1 feedback "
                       f"with no rating scale; drop 'rating' from {p}.tasks")
        return out


@dataclass
class CFConfig:
    model: Literal["mf", "bpr", "lightgcn"] = "mf"
    """'mf' = biased MF on explicit ratings (MSE); 'bpr' = BPR-MF (implicit); 'lightgcn' = LightGCN (BPR)."""
    dim: int = 8
    """Embedding size d (8 to 256)."""
    epochs: int = 30
    lr: float = 0.01
    weight_decay: float = 0.0
    """L2 regularisation (applied to the embeddings of the batch)."""
    batch_size: int = 1024
    """Global batch size (split over workers)."""
    num_layers: int = 2
    """LightGCN propagation layers."""
    patience: int = 5
    """Early stopping: epochs without validation improvement before stopping."""
    seed: int = 0
    embeddings_path: str | None = None
    """Where the exported CF tables live; default `<run_dir>/cf/embeddings.safetensors`."""
    bias_weight_decay: float | None = None
    """cf.model=mf, cf.solver=sgd: L2 on the user/item biases (per sample, like weight_decay); None = weight_decay.
    On ML-100K's validation hold-outs 0 beats tying it to weight_decay (biases have 1 value per row to fit)."""
    solver: Literal["sgd", "als"] = "sgd"
    """cf.model=mf only. 'sgd': mini-batch Adam (lr, batch_size). 'als': closed-form alternating least squares,
    one epoch = one user sweep + one item sweep, weight_decay = lambda scaled by each row's rating count (lr and
    batch_size unused); data-parallel by all-reducing the per-row normal equations, so N ranks == 1 rank."""

    def problems(self, p: str) -> list[str]:
        out = []
        if self.solver not in ("sgd", "als"):
            out.append(f"{p}.solver must be 'sgd' or 'als', got {self.solver!r}")
        if self.solver == "als" and self.model != "mf":
            out.append(f"{p}.solver='als' needs {p}.model='mf', got {self.model!r}")
        if not 8 <= self.dim <= 256:
            out.append(f"{p}.dim must be within [8, 256], got {self.dim}")
        out += _out_of_range(p, self, "> 0", "epochs", "batch_size", "lr")
        if self.bias_weight_decay is not None and not self.bias_weight_decay >= 0:
            out.append(f"{p}.bias_weight_decay must be >= 0 or null, got {self.bias_weight_decay}")
        out += _out_of_range(p, self, ">= 0", "weight_decay")
        if self.model == "lightgcn" and self.num_layers <= 0:
            out.append(f"{p}.num_layers must be > 0 for lightgcn, got {self.num_layers}")
        return out + _out_of_range(p, self, ">= 0", "patience")


@dataclass
class TinyLLMConfig:
    """Sizes of the locally built random Llama used when model.base_model is unset."""

    hidden_size: int = 64
    """Model width (token embedding size)."""
    intermediate_size: int = 128
    """Width of each MLP block."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention heads (hidden_size must be divisible by it)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention; num_heads must be divisible by it)."""
    vocab_size: int = 2000
    """Target vocabulary of the BPE tokenizer trained on the dataset's own text."""
    max_position_embeddings: int = 1024
    """Longest sequence the rotary position embedding is set up for (>= model.max_length)."""
    initializer_range: float | None = None
    """Std of the random weights; default 1.6 / sqrt(hidden_size). The LLM is frozen, so its random output head
    must be able to express confident predictions: with the usual 0.02 at hidden 64 the largest reachable logit
    is about 1.3 and even "Yes"/"No" cannot be learnt (loss stays near log(vocab))."""

    def problems(self, p: str) -> list[str]:
        out = []
        if not 16 <= self.hidden_size <= 4096:
            out.append(f"{p}.hidden_size must be within [16, 4096], got {self.hidden_size}")
        if self.num_heads <= 0 or self.hidden_size % max(self.num_heads, 1):
            out.append(f"{p}.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_kv_heads <= 0 or self.num_heads % max(self.num_kv_heads, 1):
            out.append(f"{p}.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        out += _out_of_range(p, self, "> 0", "intermediate_size", "num_layers", "vocab_size", "max_position_embeddings")
        if self.initializer_range is not None and not 0 < self.initializer_range <= 1:
            out.append(f"{p}.initializer_range must be within (0, 1] or null, got {self.initializer_range}")
        if self.vocab_size < 300:
            out.append(f"{p}.vocab_size must be >= 300 (the byte alphabet alone has 256 symbols), got {self.vocab_size}")
        return out


@dataclass
class ModelConfig:
    base_model: str | None = None
    """Path of a Hugging Face causal-LM checkpoint (e.g. a Llama-2-7B folder), or the name of a packaged model
    (`smollm2-135m`: converted once into a cache folder, see ckf_dist/model/hub.py). None: build the tiny model."""
    tiny: TinyLLMConfig = field(default_factory=TinyLLMConfig)
    pooling: Literal["mean", "attention"] = "mean"
    """How the MetaNet pools the history item embeddings into p_u."""
    meta_hidden: int = 64
    """Hidden width of the MetaNet MLP (d -> meta_hidden -> d*d)."""
    max_length: int = 512
    """Prompts longer than this (in tokens) are cut from the left of the history, never the answer."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of the LLM (bfloat16 on GPU)."""
    gradient_checkpointing: bool = False
    """Activation checkpointing in the LLM (saves memory at ~30% more compute)."""
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    """Attention kernel of the LLM (transformers' attn_implementation). 'auto': flash_attention_2 on CUDA when the
    flash-attn package is installed and the dtype is bf16/fp16, else sdpa; naming one that cannot run is an error."""
    fusion_init: Literal["match_tokens", "default"] = "match_tokens"
    """'match_tokens': Proj_U / Proj_V start rescaled so that the projected CF vectors have the mean norm of the LLM's
    token embeddings (a bare nn.Linear from d = 8..64 lands far from it, 3x on the demo's tiny model); 'default':
    nn.Linear's own initialisation. On the fusion oracle (benchmarks/fusion_oracle.py) matching the norm takes a
    seed from CTR AUC 0.76 to 0.97 in 1500 steps."""
    chat_template: Literal["auto", "on", "off"] = "auto"
    """'auto': prompts go through the tokenizer's chat template when it has one (SmolLM2, Llama-2-chat; as
    LLaMA-Factory does): the prompt is the user turn and the answer the assistant turn, the loss still on the answer
    tokens and end-of-turn only. 'on': require a chat template (error if the tokenizer has none); 'off': plain
    prompts even for a chat model."""
    system_prompt: str | None = None
    """The system turn when a chat template is used; None keeps the template's own default (SmolLM2's adds about 20
    tokens to every row), "" sends an empty one."""

    def problems(self, p: str) -> list[str]:
        out = self.tiny.problems(f"{p}.tiny") if self.base_model is None else []
        out += _out_of_range(p, self, "> 0", "meta_hidden")
        if self.max_length < 32:
            out.append(f"{p}.max_length must be >= 32, got {self.max_length}")
        return out


@dataclass
class MultiLoRAConfig:
    rank: int = 16
    """Rank of the shared adapter."""
    alpha: float = 64.0
    """Scale of the shared adapter: its update is multiplied by alpha / rank (peft's lora_alpha)."""
    dropout: float = 0.1
    """Dropout on the shared adapter's input."""
    task_rank: int = 16
    """Rank of every task-specific adapter."""
    task_alpha: float = 64.0
    """Scale of the task adapters (task_alpha / task_rank)."""
    task_dropout: float = 0.1
    """Dropout on the task adapters' input."""
    shared_targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "o_proj"])
    """Module-name suffixes that get the shared LoRA (paper code: k, v, o)."""
    task_targets: list[str] = field(default_factory=lambda: ["q_proj"])
    """Module-name suffixes that get one LoRA per task (paper code: q)."""
    gate: bool = False
    """Learn a per-task scalar gate mixing the shared and task parts."""

    def problems(self, p: str) -> list[str]:
        out = _out_of_range(p, self, "> 0", "rank", "task_rank", "alpha", "task_alpha")
        out += _out_of_range(p, self, "within [0, 1)", "dropout", "task_dropout")
        if not self.shared_targets and not self.task_targets:
            out.append(f"{p}: shared_targets and task_targets are both empty; nothing would be trained")
        if both := set(self.shared_targets) & set(self.task_targets):
            out.append(f"{p}: {sorted(both)} cannot be both shared and task-specific targets")
        return out


@dataclass
class TrainConfig:
    lr: float = 1e-4
    loss_norm: Literal["token", "row"] = "token"
    """'token': the loss is the mean over answer tokens (an explanation of 30 tokens weighs 30x a one-token CTR or
    rating answer); 'row': the mean over samples of each sample's mean token loss (every sample weighs the same)."""
    fusion_lr_scale: float = 1.0
    """Learning rate of the fusion modules (MetaNet, Proj_U, Proj_V, unknown vectors) as a multiple of lr; the LoRAs
    use lr. New modules trained from scratch next to small LoRA updates often want more (fusion oracle: 3.3x took a
    seed from CTR AUC 0.76 to 0.97 in 1500 steps)."""
    weight_decay: float = 1e-3
    optimizer: Literal["auto", "torch", "fused"] = "auto"
    """AdamW implementation. 'auto': DeepSpeed's FusedAdam on CUDA when its kernel loads, else torch's fused AdamW on
    CUDA, torch's AdamW on CPU; 'torch': torch.optim.AdamW; 'fused': a fused CUDA kernel or an error naming why not."""
    warmup_ratio: float = 0.05
    """Linear warm-up over this fraction of max_steps, then linear decay to 0."""
    max_steps: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Samples per rank per micro-batch (before the curriculum doubles rows into text + CF variants)."""
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    ds_config: str = "ds_configs/zero3_cpu.json"
    """ZeRO settings only; batch sizes, clipping and precision are filled in from this section."""
    backend: Literal["gloo", "nccl", "auto"] = "auto"
    """Process-group backend; auto = nccl with CUDA, gloo otherwise."""
    prompts: Literal["curriculum", "cf", "text"] = "curriculum"
    """'curriculum': loss weight moves from text-only to CF-slot prompts over training (CKF_METHOD.md);
    'cf': CF-slot prompts only; 'text': text-only prompts (the LLM-without-CF baseline)."""
    curriculum_steps: int | None = None
    """T of the curriculum; default max_steps."""
    sampler: Literal["uniform", "grad_balanced"] = "uniform"
    """Task mixture of the micro-batches."""
    sampler_temperature: float = 1.0
    """grad_balanced: temperature of the GradNorm target (higher = flatter); the rule and its other constants are
    documented in ckf_dist/train/sampler.py."""
    sampler_floor: float = 0.05
    """Smallest share any task can get (no task starves)."""
    sampler_alpha: float = 0.0
    """grad_balanced: exponent of GradNorm's inverse training rate in the target (0 = equal pulls on the shared LoRA)."""
    sampler_progress: float = 0.2
    """grad_balanced: relative drop of the fast vs slow loss average at which a task counts as still learning (a
    learning task never gives share away)."""
    sampler_warmup: int = 20
    """grad_balanced: optimizer steps at the uniform mixture while the statistics are collected."""
    grad_sketch_dim: int = 1024
    """k of the seeded CountSketch each task's shared-LoRA gradient is projected to (ckf_dist/train/task_grads.py):
    the per-step all-reduce is 2 x tasks x k floats whatever the model size; norms and cosines of the task gradients
    are estimated with a relative error of about sqrt(2 / k) (k = 1024: ~4%)."""
    prefetch: bool = True
    """Build the next step's micro-batches in a background thread while this step computes. The next step's task
    draws then use the mixture as it was one update earlier (lag one); resume is exact either way."""
    seed: int = 0
    resume: Literal["never", "auto", "force"] = "auto"
    """'auto' resumes from the newest complete checkpoint in the run directory when the configuration it was written
    with agrees on every field that shapes training (safe changes such as more max_steps or logging are applied and
    logged; others refuse, listing them); 'force' resumes despite such changes, with a warning; 'never' starts
    fresh."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is not finite is skipped (counted and logged); this many in a row stop the
    run with an error."""
    ckpt_every: int = 50
    ckpt_keep: int = 2
    eval_every: int = 0
    """Validation every N steps (0 = only at the end)."""
    collective_timeout_s: int = 300
    """A rank that waits longer than this on a collective fails the job, naming the rank."""

    def problems(self, p: str) -> list[str]:
        out = _out_of_range(p, self, "> 0", "lr", "fusion_lr_scale")
        out += _out_of_range(p, self, ">= 0", "weight_decay")
        out += _out_of_range(p, self, "within [0, 1)", "warmup_ratio")
        out += _out_of_range(p, self, "> 0", "max_steps", "micro_batch_size", "grad_accum", "ckpt_every", "ckpt_keep",
                             "max_nonfinite_steps",
                             "collective_timeout_s")
        if not self.grad_clip >= 0:
            out.append(f"{p}.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.curriculum_steps is not None and self.curriculum_steps <= 0:
            out.append(f"{p}.curriculum_steps must be > 0 or null, got {self.curriculum_steps}")
        out += _out_of_range(p, self, "within [0, 1)", "sampler_floor")
        out += _out_of_range(p, self, "> 0", "sampler_temperature")
        out += _out_of_range(p, self, ">= 0", "sampler_alpha")
        out += _out_of_range(p, self, "> 0", "sampler_progress")
        if not 16 <= self.grad_sketch_dim <= 4096:
            out.append(f"{p}.grad_sketch_dim must be within [16, 4096], got {self.grad_sketch_dim}")
        return out + _out_of_range(p, self, ">= 0", "sampler_warmup", "eval_every")


@dataclass
class EvalConfig:
    max_samples_per_task: int = 0
    """Cap on evaluation samples per task (0 = all): whole users in a random order seeded by data.seed, the same
    subset for CKF and every baseline, on every rank and run (eval.run.cap_per_task); only a single user with more
    samples than the cap is taken whole above it."""
    max_samples_by_task: dict[str, int] = field(default_factory=dict)
    """Per-task caps that replace max_samples_per_task for the tasks named (0 = all), e.g. {topk: 30}: one top-K
    sample is num_candidates scored rows, so on a CPU a cap that suits CTR makes top-K scoring dominate the run."""
    batch_size: int = 16
    split: Literal["valid", "test"] = "test"
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    """HR@K / NDCG@K cut-offs. With the top-K task each must be < data.num_candidates: HR@K with K >= the number of
    candidates is 1.0 whatever the model (the paper reports 1-of-10 accuracy, i.e. HR@1). The CF model's full
    ranking over all items (train-cf) reports the same K."""
    max_new_tokens: int = 32
    """Explanation generation length."""
    num_beams: int = 1
    """1 = greedy decoding for explanations."""
    baselines: list[str] = field(default_factory=lambda: ["cf", "text"])
    """Extra models evaluated on the same samples: 'cf' (the CF model alone), 'text' (LLM, text-only prompts)."""

    def problems(self, p: str) -> list[str]:
        out = _out_of_range(p, self, ">= 0", "max_samples_per_task")
        if bad := sorted(set(self.max_samples_by_task) - set(TASKS)):
            out.append(f"{p}.max_samples_by_task has unknown task(s) {bad}; tasks are {list(TASKS)}")
        if neg := {t: n for t, n in self.max_samples_by_task.items() if n < 0}:
            out.append(f"{p}.max_samples_by_task must be >= 0 (0 = all), got {neg}")
        out += _out_of_range(p, self, "> 0", "batch_size", "max_new_tokens", "num_beams")
        if not self.ks or any(k <= 0 for k in self.ks):
            out.append(f"{p}.ks must be a non-empty list of positive integers, got {self.ks}")
        if bad := [b for b in self.baselines if b not in ("cf", "text")]:
            out.append(f"{p}.baselines has unknown entries {bad}; allowed: ['cf', 'text']")
        return out


@dataclass
class LogConfig:
    run_dir: str = "runs/demo"
    """Everything a run writes: resolved config, checkpoints, TensorBoard logs, metrics, reports."""
    every: int = 5
    """Log training scalars every N steps."""
    progress: bool = True
    """Progress bar with ETA on rank 0."""

    def problems(self, p: str) -> list[str]:
        return _out_of_range(p, self, "> 0", "every") + _run_dir_problems(f"{p}.run_dir", self.run_dir)


def _run_dir_problems(key: str, run_dir: str) -> list[str]:
    """A run directory that cannot be meant: empty, the filesystem root, the home folder or a parent of the working
    directory (a run writes checkpoints, logs and reports there, and prunes old checkpoints)."""
    if not run_dir.strip():
        return [f"{key} must name a folder for the run's outputs, got {run_dir!r}"]
    where = Path(run_dir).resolve()  # as the stages use it: relative to the working directory, no ~ expansion
    if where == Path(where.anchor):
        return [f"{key}={run_dir!r} is the filesystem root; use a folder of its own, e.g. runs/<name>"]
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no home folder known
        home = None
    if where == home:
        return [f"{key}={run_dir!r} is the home folder; use a folder of its own, e.g. ~/runs/<name>"]
    if where in Path.cwd().resolve().parents:
        return [f"{key}={run_dir!r} is a parent of the working directory; use a folder of its own, e.g. runs/<name>"]
    return []


@dataclass
class RunConfig:
    # Read by pydantic in config_from_dict and inherited by every section: an unknown key is an error and no value is
    # coerced (true is no int, "1" is no number), except that an int is taken (as a float) for a float.
    __pydantic_config__ = ConfigDict(extra="forbid", strict=True)

    data: DataConfig = field(default_factory=DataConfig)
    cf: CFConfig = field(default_factory=CFConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    multi_lora: MultiLoRAConfig = field(default_factory=MultiLoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def problems(self) -> list[str]:
        out: list[str] = []
        for f in dataclasses.fields(self):
            out += getattr(self, f.name).problems(f.name)
        # Contradictions across sections.
        if self.data.columns.label and self.cf.model == "mf":
            out.append(f"cf.model='mf' regresses ratings, but data.columns.label={self.data.columns.label!r} is 0/1 "
                       f"feedback (every interaction is a positive): use cf.model='bpr' or 'lightgcn'")
        if self.model.base_model is not None and self.train.precision == "fp32" and self.model.dtype != "float32":
            out.append(f"train.precision='fp32' contradicts model.dtype={self.model.dtype!r}; make them agree")
        if self.train.precision == "bf16" and self.model.dtype == "float16":
            out.append("train.precision='bf16' contradicts model.dtype='float16'")
        if self.model.max_length > self.model.tiny.max_position_embeddings and self.model.base_model is None:
            out.append(f"model.max_length ({self.model.max_length}) exceeds model.tiny.max_position_embeddings "
                       f"({self.model.tiny.max_position_embeddings})")
        if "topk" in self.data.tasks and (bad := [k for k in self.eval.ks if k >= self.data.num_candidates]):
            out.append(f"eval.ks has {bad} >= data.num_candidates ({self.data.num_candidates}): with that many "
                       f"candidates HR@K is 1.0 for any model (NDCG@K no cut-off); use eval.ks values below "
                       f"{self.data.num_candidates} or raise data.num_candidates")
        if self.data.source == "alpaca":
            # Finished text prompts: no users, items or CF vectors, so nothing for the slots or a CF model to see.
            if self.train.prompts != "text":
                out.append(f"data.source='alpaca' gives text-only prompts: set train.prompts='text' "
                           f"(got {self.train.prompts!r})")
            if "cf" in self.eval.baselines:
                out.append("data.source='alpaca' has no interactions for a CF baseline: drop 'cf' from eval.baselines")
        # Not a contradiction: with cf.model != 'mf', the rating task and the 'cf' baseline, a BPR model still
        # ranks; its rating baseline is reported as absent, not an error.
        return out

    @property
    def cf_embeddings_path(self) -> Path:
        return Path(self.cf.embeddings_path or Path(self.log.run_dir) / "cf" / "embeddings.safetensors")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts: pydantic checks the types, every problem becomes one line
# --------------------------------------------------------------------------------------------------


def _yaml_friendly(schema: Any) -> Any:
    """A copy of a strict pydantic core schema that takes what YAML and overrides give where strict mode would not.

    Strict mode takes only an instance for a dataclass (YAML gives a dict) and only a list for a list (an override
    like `eval.ks=1,5` gives a tuple; a set stays an error: its order is random). The values inside stay strict.
    """
    if isinstance(schema, list):
        return [_yaml_friendly(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _yaml_friendly(v) for k, v in schema.items()}
    if schema.get("type") == "dataclass":
        return {**schema, "strict": False}
    if schema.get("type") == "list":
        return core_schema.chain_schema([core_schema.is_instance_schema((list, tuple)), {**schema, "strict": False}])
    return schema


_VALIDATOR = SchemaValidator(_yaml_friendly(TypeAdapter(RunConfig).core_schema))
_EXPECTED = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool (true/false)",
             "is_instance_of": "a list"}  # the only is-instance check is the one _yaml_friendly puts before a list


def _annotation(loc: tuple[int | str, ...]) -> Any:
    """The annotation at `loc` (field names and list indices below RunConfig), `X | None` read as X."""
    tp: Any = RunConfig
    for part in loc:
        tp = get_args(tp)[0] if isinstance(part, int) else get_type_hints(tp)[part]
        tp = next(a for a in get_args(tp) if a is not type(None)) if type(None) in get_args(tp) else tp
    return tp


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('data', 'tasks', 1) -> 'data.tasks[1]'."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:]


def _problem(err: ErrorDetails) -> str:
    """One pydantic error as one line with its dotted key, e.g. `train.lr: expected float, got str 'abc'`."""
    loc, value, kind = err["loc"], err["input"], err["type"]
    if kind in ("unexpected_keyword_argument", "invalid_key"):  # an unknown (or non-string) key of a section
        cls = _annotation(loc[:-1])
        names = sorted(f.name for f in dataclasses.fields(cls))
        return f"{_dotted((*loc[:-1], str(loc[-1])))}: unknown key; {cls.__name__} has {names}"
    key = _dotted(loc)
    if kind == "dataclass_type":
        return f"{key or 'config'}: expected a mapping of {err['ctx']['class_name']} fields, got {value!r}"
    if kind == "literal_error":
        return f"{key}: expected one of {list(get_args(_annotation(loc)))}, got {value!r}"
    if kind in _EXPECTED:
        return f"{key}: expected {_EXPECTED[kind]}, got {type(value).__name__} {value!r}"
    return f"{key}: {err['msg']}"  # no such error is known to come from these field types; pydantic's own words


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError([f"override {dotted!r}: {p!r} is not a section"])
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split 'train.lr=2e-4' into ('train.lr', 2e-4); values are Python/YAML literals, else strings.

    Raises:
        ConfigError: no '=', no key, or a value that is neither a Python literal nor valid YAML (e.g. an unclosed
            list `data.tasks=[ctr,`), naming the override.
    """
    if "=" not in text:
        raise ConfigError([f"override {text!r} must look like section.key=value"])
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError([f"override {text!r} has no key; it must look like section.key=value"])
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            detail = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError([(f"override {text!r}: the value {raw!r} is neither a Python literal nor valid YAML "
                                f"({detail}); quote it, or close its brackets, e.g. data.tasks=[ctr,rating]")]) from None
    return key.strip(), value


def _nonfinite_problems(node: Any, key: str = "") -> list[str]:
    """`{key} must be a finite number, got nan` for every NaN / inf float anywhere in the configuration (fields,
    list items, mapping values): NaN passes every comparison-based range check written as `v < 0`."""
    if dataclasses.is_dataclass(node):
        return [q for f in dataclasses.fields(node)
                for q in _nonfinite_problems(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)]
    if isinstance(node, (list, tuple)):
        return [q for i, v in enumerate(node) for q in _nonfinite_problems(v, f"{key}[{i}]")]
    if isinstance(node, dict):
        return [q for k, v in node.items() for q in _nonfinite_problems(v, f"{key}.{k}")]
    if isinstance(node, float) and not math.isfinite(node):
        return [f"{key} must be a finite number, got {node}"]
    return []


PACKAGE_DIR = Path(__file__).resolve().parent
"""The installed package; its configs/ and ds_configs/ (links to the top-level folders in a checkout, copies in a
wheel) are where a relative config file or train.ds_config is looked up when the working directory lacks it."""


def find_file(path: str | Path) -> Path | None:
    """`path` as given if it is a file (relative: in the working directory), else a relative path's packaged copy
    (PACKAGE_DIR / path), else None."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_absolute() and (PACKAGE_DIR / p).is_file():
        return PACKAGE_DIR / p
    return None


def not_found(label: str, path: str | Path) -> str:
    """'<label> not found' for a file `find_file` did not find, with both places it looked and what the packaged
    folder holds (the names a typo most likely meant)."""
    p = Path(path)
    if p.is_absolute():
        return f"{label} not found"
    folder = (PACKAGE_DIR / p).parent
    have = sorted(x.name for x in folder.glob(f"*{p.suffix}")) if folder.is_dir() else []
    return (f"{label} not found (looked in {Path.cwd() / p} and {PACKAGE_DIR / p})"
            + (f"; {folder} has {have}" if have else ""))


def path_problems(cfg: RunConfig, known_models: Collection[str]) -> list[str]:
    """Paths a run needs that do not exist: model.base_model (unless one of `known_models`, the packaged names of
    ckf_dist/model/hub.py) must be a folder with a config.json, train.ds_config a file. Relative paths resolve
    against the working directory (train.ds_config also against the installed package, `find_file`)."""
    out = []
    bm = cfg.model.base_model
    if bm is not None and bm not in known_models:
        where = Path(bm) if Path(bm).is_absolute() else Path.cwd() / bm
        if not where.is_dir():
            out.append(f"model.base_model={bm!r} is neither a packaged model {sorted(known_models)} nor an existing "
                       f"folder (looked for {where})")
        elif not (where / "config.json").is_file():
            out.append(f"model.base_model={bm!r}: {where} has no config.json (not a Hugging Face checkpoint folder)")
    if find_file(cfg.train.ds_config) is None:
        out.append(not_found(f"train.ds_config={cfg.train.ds_config!r}", cfg.train.ds_config))
    return out


def config_from_dict(data: dict[str, Any], source: str | None = None,
                     known_models: Collection[str] | None = None) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem at once.

    With `known_models` (the packaged model names) the paths are checked too (`path_problems`).
    """
    try:
        cfg = _VALIDATOR.validate_python(data)
    except ValidationError as e:  # range checks need well-typed values, so they wait until these are fixed
        raise ConfigError([_problem(err) for err in e.errors()], source) from None
    problems = _nonfinite_problems(cfg)
    nonfinite = {q.split(" ", 1)[0] for q in problems}  # one line per key: its range checks would repeat it
    problems += [q for q in cfg.problems() if q.split(" ", 1)[0] not in nonfinite]
    if known_models is not None:
        problems += path_problems(cfg, known_models)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                known_models: Collection[str] | None = None) -> RunConfig:
    """Load a YAML experiment file, apply dotted overrides, validate everything at once.

    Args:
        path: YAML file (relative: in the working directory, else the installed package's copy, e.g.
            configs/demo.yaml); None starts from the defaults.
        overrides: strings like 'train.lr=2e-4' or 'data.tasks=[ctr,rating]'.
        known_models: the packaged model names; given (as the launchers do, through cli.parse_run_args), the paths
            model.base_model and train.ds_config must exist too (`path_problems`), so a typo fails before data
            preparation. None (tests, tools that read a config written for another machine): not checked.

    Raises:
        FileNotFoundError: the YAML file is in neither place (the message names both).
        ConfigError: every malformed override, unknown key, wrong type, non-finite number, bad or contradictory
            value (and with known_models every missing path), one per line.
    """
    data: dict[str, Any] = {}
    if path is not None:
        found = find_file(path)
        if found is None:
            raise FileNotFoundError(not_found(f"config file {str(path)!r}", path))
        path = found
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError([f"{path}: not valid YAML: {e}"]) from e
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping of sections"])
    bad: list[str] = []
    for ov in overrides:
        try:
            key, value = parse_override(ov)
            _set_dotted(data, key, value)
        except ConfigError as e:
            bad += e.problems
    if bad:
        raise ConfigError(bad, str(path) if path else None)
    return config_from_dict(data, str(path) if path else None, known_models)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration (every field, defaults included) as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
