"""One prepared check for a GPU machine (issue #14): imports, tests/gpu, Multi-LoRA + fusion vs plain peft LoRA
training throughput on a random Llama-2-7B shape, and the uniform vs gradient-balanced sampler study, inside 8 minutes.

Made for one NVIDIA H200 on a bare machine without network (Python 3.12 with torch, transformers, peft, accelerate,
pyarrow and tensorboard, but no deepspeed, pydantic, hjson, rouge-score or nltk: those travel as wheels).

    bash benchmarks/gpu_wheels.sh                  # here, once: .whl/ (about 7 MB, git-ignored)
    python3 benchmarks/gpu_check.py                # there, with .whl carried: installs it into /tmp/ckf-site first
    python benchmarks/gpu_check.py --dry-run       # CPU (gloo, tiny shapes, one seed): ~95 s on an idle 2-core box

Parts, each time-boxed (a part that cannot start in the time left is skipped with the reason recorded):
  1. imports: what is missing and how to carry it, before anything else runs.
  2. tests: `pytest tests/gpu -m gpu`.
  3. throughput: CKFModel (Multi-LoRA + fusion) vs a plain peft LoRA of the same total rank per module, DeepSpeed
     ZeRO-3 bf16 with activation checkpointing, a randomly initialised Llama-2-7B shape built inside zero.Init (no
     weights offline; throughput does not depend on their values), sequence 2048, interleaved steps, medians.
     Tokens/s, step time, peak memory, MFU (formula in MFU_FORMULA and in the JSON).
  4. sampler study: uniform vs grad_balanced, 5 seeds each, plus uniform at half the steps (does the worst task
     still gain from more of its data, i.e. is it data-limited?), on the tiny model and synthetic data.
One JSON with every field goes to $OUT/gpu_check.json (or --json), and a table is printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SCHEMA = "ckf-dist/gpu_check/1"
DEMO = ROOT / "configs" / "demo.yaml"
H200_PEAK_BF16_TFLOPS = 989.0
"""Dense bf16 peak of an H200 SXM by the vendor's datasheet (the H100's rate); the bf16 matrix product measured on
these machines reached about 790 TFLOP/s (/work/.library/device/KINDS.md), reported beside it as mfu_vs_measured."""
GOAL_MFU = 0.45
GOAL_RATIO = 0.95
MFU_FORMULA = ("MFU = tokens/s x F / peak, F = 4 N_frozen + 6 N_lora + 12 L s d FLOPs per token: the frozen decoder "
               "weights N_frozen (attention + MLP projections of all layers; embeddings and LM head left out, the head "
               "runs on answer positions only) cost 2 N forward + 2 N for the activation gradients in backward (no "
               "weight gradients); the LoRA weights one row uses, N_lora (= the plain peft LoRA's trainable count), "
               "cost 6 N_lora; attention scores and values 12 L s d (L layers, s sequence, d hidden; forward 4 L s d, "
               "backward twice that, causal half not discounted, as in PaLM's MFU). Activation recomputation is not "
               "counted (hardware FLOPs, not model FLOPs). Both sides use the same F, so CKF's extra work (every "
               "task's LoRA on every row, the MetaNet and projectors) is overhead, not credit.")
SAMPLER_MODEL_NOTE = ("tiny random Llama built by the pipeline (configs/demo.yaml sizes) on synthetic data: issue #11 "
                      "(CKF on a real pretrained LLM) has not landed, and SmolLM2's 93 MB GGUF exceeds the 64 MiB a "
                      "device call can carry")

# import name -> pip name. CARRIED: what benchmarks/gpu_wheels.sh puts in .whl/ (absent from the GPU image).
REQUIRED = {"torch": "torch", "transformers": "transformers", "peft": "peft", "accelerate": "accelerate",
            "pyarrow": "pyarrow", "tensorboard": "tensorboard", "yaml": "pyyaml", "safetensors": "safetensors",
            "tokenizers": "tokenizers", "numpy": "numpy", "pandas": "pandas", "sklearn": "scikit-learn",
            "sacrebleu": "sacrebleu", "matplotlib": "matplotlib", "tqdm": "tqdm", "pytest": "pytest",
            "deepspeed": "deepspeed", "pydantic": "pydantic", "pydantic_core": "pydantic-core", "hjson": "hjson",
            "rouge_score": "rouge-score", "nltk": "nltk"}
CARRIED = {"deepspeed", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
           "hjson", "rouge-score", "nltk"}
NOT_NEEDED = "ray, webdataset (data is prepared with CKF_DATA_ENGINE=local; no Ray stage runs)"


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def now() -> float:
    return time.monotonic()


def child_env(dry_run: bool, threads: int | None = None, check_collectives: bool = True) -> dict[str, str]:
    """Environment of every process this script starts: DeepSpeed's accelerator fixed (cpu in the dry run), the
    source tree and the carried wheels on PYTHONPATH, no Ray; CKF_CHECK_COLLECTIVES=1 (ckf_dist/comm.py names a
    collective that bypasses it) except where timings are taken."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, DS_ACCELERATOR="cpu" if dry_run else "cuda", CKF_DATA_ENGINE="local",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), *[p for p in paths if p != str(ROOT)]]))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if check_collectives:
        env["CKF_CHECK_COLLECTIVES"] = "1"
    else:
        env.pop("CKF_CHECK_COLLECTIVES", None)
    return env


def run_timed(cmd: list[str], timeout: float, env: dict[str, str], log: Path | None = None) -> dict[str, Any]:
    """Run cmd in its own process group; on timeout kill the group. Returns returncode (None on timeout), output."""
    t0 = now()
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=max(1.0, timeout))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc)
        text, _ = proc.communicate()
        rc = None
    finally:
        if log:
            out.close()
    if log:
        text = log.read_text(errors="replace")
    return {"returncode": rc, "timed_out": rc is None, "wall_s": round(now() - t0, 2), "output": text or ""}


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------------------------------
# Part 1: imports
# --------------------------------------------------------------------------------------------------


def missing_modules() -> list[str]:
    importlib.invalidate_caches()
    return [mod for mod in REQUIRED if importlib.util.find_spec(mod) is None]


def install_wheels(wheels: Path, site: Path) -> dict[str, Any]:
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *files]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode == 0:
        sys.path.insert(0, str(site))
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *paths])
    return {"wheels": [Path(f).name for f in files], "target": str(site), "returncode": res.returncode,
            "output": (res.stdout + res.stderr)[-2000:]}


def install_hint(missing_pips: list[str]) -> str:
    carried = [p for p in missing_pips if p in CARRIED]
    other = [p for p in missing_pips if p not in CARRIED]
    lines = []
    if carried:
        lines.append(f"{', '.join(carried)}: on a machine with pip, in the repo root, run `bash benchmarks/gpu_wheels.sh`"
                     f" (writes .whl/, about 7 MB, git-ignored), name `.whl` in the device call's carry and rerun "
                     f"this script: it installs .whl/*.whl with pip --no-index --no-deps --target /tmp/ckf-site.")
    if other:
        lines.append(f"{', '.join(other)}: not in the GPU image as expected; add each to .whl/ with `python3 -m pip "
                     f"download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform "
                     f"manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "
                     f"NAME==VERSION` (see /work/.library/device/README.md, nvidia-h200 note).")
    lines.append(f"Not needed: {NOT_NEEDED}.")
    return " ".join(lines)


def check_imports(args: argparse.Namespace) -> dict[str, Any]:
    t0 = now()
    out: dict[str, Any] = {"required": sorted(set(REQUIRED.values())), "installed_from_wheels": None}
    miss = missing_modules()
    wheels = Path(args.wheels)
    if miss and not args.no_install and wheels.is_dir() and any(wheels.glob("*.whl")):
        print(f"[gpu_check] missing {[REQUIRED[m] for m in miss]}; installing {wheels}/*.whl into {args.site}",
              flush=True)
        out["installed_from_wheels"] = install_wheels(wheels, Path(args.site))
        miss = missing_modules()
    pips = [REQUIRED[m] for m in miss]
    out["missing"] = pips
    # find_spec only says a package is there; importing the project's entry points in a fresh process (with the
    # environment the parts get) catches version clashes too.
    probe = ("import importlib.metadata as m, json\n"
             "import ckf_dist.pipeline, ckf_dist.train.loop, deepspeed, peft, transformers, torch\n"
             f"names = {sorted(set(REQUIRED.values()))!r}\n"
             "v = {}\n"
             "for n in names:\n"
             "    try:\n        v[n] = m.version(n)\n"
             "    except m.PackageNotFoundError:\n        v[n] = None\n"
             "print('VERSIONS=' + json.dumps(v))\n")
    res = run_timed([sys.executable, "-c", probe], 120, child_env(args.dry_run)) if not pips else None
    out["versions"] = {}
    if res is not None:
        m = re.search(r"^VERSIONS=(.*)$", res["output"], re.MULTILINE)
        out["versions"] = json.loads(m.group(1)) if m else {}
        out["probe_ok"] = res["returncode"] == 0 and m is not None
        if not out["probe_ok"]:
            out["probe_error"] = res["output"][-3000:]
    else:
        out["probe_ok"] = False
    out["ok"] = not pips and out["probe_ok"]
    out["install_hint"] = install_hint(pips) if pips else ""
    out["wall_s"] = round(now() - t0, 2)
    return out


def machine_info(dry_run: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "hostname": platform.node()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda_available"] = torch.cuda.is_available()
        info["cuda_version"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(gpu_name=p.name, gpu_count=torch.cuda.device_count(), gpu_mem_gib=round(p.total_memory / 2**30, 1),
                        gpu_sm_count=p.multi_processor_count)
        else:
            info.update(gpu_name=None, gpu_count=0, gpu_mem_gib=None, gpu_sm_count=None)
    except ImportError as err:
        info["torch"] = f"not importable: {err}"
    return info


# --------------------------------------------------------------------------------------------------
# Part 2: tests/gpu
# --------------------------------------------------------------------------------------------------


def run_tests(args: argparse.Namespace, budget: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("pytest_timeout") is not None:  # pyproject's timeout = 600 needs it too
        cmd += ["--timeout", str(int(max(30, budget)))]
    res = run_timed(cmd, budget, child_env(args.dry_run, threads=4))
    text = res["output"]
    counts = {k: 0 for k in ("passed", "failed", "skipped", "errors", "deselected")}
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail):
        counts["errors" if what.startswith("error") else what] = int(n)
    skips = re.findall(r"^SKIPPED \[\d+\] (.+)$", text, re.MULTILINE)
    failures = re.findall(r"^(?:FAILED|ERROR) (.+)$", text, re.MULTILINE)
    if res["timed_out"]:
        status, reason = "timeout", f"pytest ran past its {budget:.0f} s budget and was killed"
    elif res["returncode"] == 0:
        ran = counts["passed"]
        status = "ok"
        reason = "" if ran else "every GPU test skipped (reasons in skip_reasons)"
    else:
        status, reason = "failed", f"pytest exit {res['returncode']}"
    return {"status": status, "reason": reason, "command": " ".join(cmd[1:]), "returncode": res["returncode"],
            **counts, "summary_line": tail, "skip_reasons": skips, "failures": failures,
            "output_tail": text[-4000:], "wall_s": res["wall_s"], "budget_s": round(budget, 1)}


# --------------------------------------------------------------------------------------------------
# Part 3: throughput (runs in its own process: `--part throughput`)
# --------------------------------------------------------------------------------------------------


def llama_shape(dry_run: bool) -> dict[str, int]:
    if dry_run:
        return {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 2048}
    # Llama-2-7B (meta-llama/Llama-2-7b-hf config.json).
    return {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000}


def frozen_matmul_params(shape: dict[str, int]) -> int:
    d, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * i)  # q, o; k, v; gate, up, down


def measure_matmul_tflops(device: str) -> float:
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def part_throughput(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    import resource

    import deepspeed
    import torch
    import torch.distributed as dist
    from multi_lora_overhead import WORDS, answer_ce, make_samples
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckf_dist.config import ModelConfig, MultiLoRAConfig, load_config
    from ckf_dist.data.collate import Collator
    from ckf_dist.model.ckf import build_ckf_model
    from ckf_dist.model.llm import resolve_attn_implementation, train_tokenizer
    from ckf_dist.netbind import free_port
    from ckf_dist.tasks import TASKS
    from ckf_dist.train.deepspeed_utils import make_ds_config
    from ckf_dist.train.optim import describe_optimizer, make_optimizer

    t_start = now()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = "cuda" if cuda else "cpu"
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    if cuda:
        torch.cuda.set_device(0)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    torch.manual_seed(0)
    shape = llama_shape(args.dry_run)
    seq, rows = args.seq or (128 if args.dry_run else 2048), args.rows or (2 if args.dry_run else 8)
    rank, task_rank = 16, 16
    out: dict[str, Any] = {"device": device, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                           "precision": "bf16", "zero_stage": 3, "activation_checkpointing": True,
                           "model": {"name": "tiny Llama (dry run)" if args.dry_run else "Llama-2-7B shape, random init",
                                     **shape, "n_frozen_matmul": frozen_matmul_params(shape)},
                           "batch": {"rows": rows, "seq": seq}, "lora": {"shared_rank": rank, "task_rank": task_rank,
                                                                          "tasks": len(TASKS)},
                           "mfu_formula": MFU_FORMULA}

    texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(12)) + " Answer: Yes" for i in range(400)]
    tok = train_tokenizer(texts, 1000)
    attn = resolve_attn_implementation("auto", "bfloat16")
    cfg = load_config(None, ["train.ds_config=ds_configs/zero3.json", f"train.micro_batch_size={rows}",
                             "train.precision=bf16", "model.dtype=bfloat16", "train.grad_clip=1.0"])
    ds = make_ds_config(cfg, 1, shape["hidden_size"])
    out["ds_zero_optimization"] = ds["zero_optimization"]

    def new_llm():
        # pad_token_id None: transformers' init zeroes the padding row by indexing the embedding table, which
        # zero.Init has already partitioned (an empty tensor here); the collator pads with the tokenizer's id anyway.
        conf = LlamaConfig(**shape, max_position_embeddings=max(4096, 2 * seq), tie_word_embeddings=False,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
                           rms_norm_eps=1e-5, attn_implementation=attn)
        with deepspeed.zero.Init(config_dict_or_path=ds, dtype=torch.bfloat16):
            llm = LlamaForCausalLM(conf)
        llm.requires_grad_(False)
        llm.config.use_cache = False
        return llm

    t0 = now()
    g = torch.Generator().manual_seed(0)
    num_users, num_items = 100, 200
    lora = MultiLoRAConfig(rank=rank, task_rank=task_rank, dropout=0.0, task_dropout=0.0)
    ckf = build_ckf_model(new_llm(), tok, torch.randn(num_users, 32, generator=g), torch.randn(num_items, 32, generator=g),
                          ModelConfig(), lora, token_norm=1.0)
    ckf.enable_gradient_checkpointing()
    ckf.train()
    out["attn_implementation"] = ckf.llm.config._attn_implementation

    peft_cfg = LoraConfig(r=rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                          target_modules=[*lora.shared_targets, *lora.task_targets],
                          rank_pattern={t: task_rank for t in lora.task_targets},
                          alpha_pattern={t: lora.task_alpha for t in lora.task_targets})
    plain_llm = get_peft_model(new_llm(), peft_cfg)
    plain_llm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain = plain_lora_module(plain_llm, answer_ce).train()
    out["build_s"] = round(now() - t0, 1)

    def count(params) -> int:
        return int(sum(getattr(p, "ds_numel", p.numel()) for p in params))

    n_lora = count(p for p in plain.parameters() if p.requires_grad)
    out["trainable_params"] = {"plain_peft_lora": n_lora, "multi_lora_fusion": count(ckf.trainable_parameters())}

    t0 = now()
    dev = torch.device(device, 0) if cuda else torch.device("cpu")
    lr = 1e-4
    opt_ckf = make_optimizer(ckf.parameter_groups(lr, lr), lr, 0.0, "auto", dev)
    opt_plain = make_optimizer([p for p in plain.parameters() if p.requires_grad], lr, 0.0, "auto", dev)
    out["optimizer"] = describe_optimizer(opt_ckf)
    engines = {"plain_peft_lora": deepspeed.initialize(model=plain, optimizer=opt_plain, config=ds)[0],
               "multi_lora_fusion": deepspeed.initialize(model=ckf, optimizer=opt_ckf, config=ds)[0]}
    out["initialize_s"] = round(now() - t0, 1)

    # Every row longer than seq, left-truncated to exactly seq by the Collator (answer kept): no padding.
    probe = make_samples(1, 10, 0, num_users, num_items, 0)[0]
    per_word = len(tok(" " + " ".join(WORDS * 5))["input_ids"]) / (len(WORDS) * 5)
    filler = int((seq - len(tok(probe["prompt_cf"])["input_ids"])) / per_word) + 32
    batch = Collator(tok, max_length=seq, history_len=10)(make_samples(rows, 10, filler, num_users, num_items, 1),
                                                          ("cf",)).to(dev)
    n_tok = int(batch.attention_mask.sum())
    out["batch"].update(real_tokens=n_tok, padded_shape=list(batch.input_ids.shape))

    peak: dict[str, float] = {k: 0.0 for k in engines}
    resident: dict[str, float] = {}
    losses: dict[str, list[float]] = {k: [] for k in engines}

    def step(name: str) -> float:
        eng = engines[name]
        if cuda:
            resident[name] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t = time.perf_counter()
        res = eng(batch)
        loss = res.loss if hasattr(res, "loss") else res
        eng.backward(loss)
        eng.step()
        sync(device)
        dt = time.perf_counter() - t
        losses[name].append(float(loss))
        if cuda:
            peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**30)
        else:
            peak[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, the process
        return dt

    times: dict[str, list[float]] = {k: [] for k in engines}
    warm, want = (1, 2) if args.dry_run else (2, args.bench_steps)
    t0 = now()
    for _ in range(warm):
        for k in engines:
            step(k)
    out["warmup_s"] = round(now() - t0, 1)
    stopped = ""
    for i in range(want):
        per_round = sum(times[k][-1] for k in engines) if i else 2 * (now() - t0) / max(warm, 1)
        if now() + 1.2 * per_round > deadline:
            stopped = f"stopped after {i} timed rounds: the part's time box ends"
            break
        for k in engines:  # interleaved, so drift hits both sides alike
            times[k].append(step(k))
    out["steps_timed"] = len(times["plain_peft_lora"])
    out["steps_note"] = stopped

    peak_tf = H200_PEAK_BF16_TFLOPS if cuda else None
    measured = measure_matmul_tflops(device)
    out["matmul_tflops_measured"] = round(measured, 2)
    out["peak_tflops"] = peak_tf if peak_tf else round(measured, 2)
    out["peak_source"] = ("H200 SXM dense bf16 datasheet (989 TFLOP/s)" if cuda else
                          "dry run: this CPU's measured fp32 matmul rate (MFU on CPU means little)")
    flops_tok = 4 * frozen_matmul_params(shape) + 6 * n_lora + 12 * shape["num_hidden_layers"] * seq * shape[
        "hidden_size"]
    out["model_flops_per_token"] = flops_tok
    sides = {}
    for k in engines:
        med = median(times[k])
        tps = n_tok / med if med else None
        sides[k] = {"step_s_median": med, "step_s_all": times[k], "tokens_per_s": tps,
                    "peak_mem_gib": round(peak[k], 3),
                    "peak_mem_kind": "torch.cuda.max_memory_allocated during the step (both models resident)"
                    if cuda else "process max RSS (CPU dry run)",
                    "resident_mem_gib": round(resident.get(k, 0.0), 3) if cuda else None,
                    "model_tflops_per_s": tps * flops_tok / 1e12 if tps else None,
                    "mfu": tps * flops_tok / (out["peak_tflops"] * 1e12) if tps else None,
                    "mfu_vs_measured_matmul": tps * flops_tok / (measured * 1e12) if tps else None,
                    "loss_first_last": [losses[k][0], losses[k][-1]] if losses[k] else None}
    out["sides"] = sides
    a, b = sides["multi_lora_fusion"]["tokens_per_s"], sides["plain_peft_lora"]["tokens_per_s"]
    out["ratio_tokens_per_s"] = a / b if a and b else None
    out["wall_s"] = round(now() - t_start, 1)
    return out


def plain_lora_module(peft_model, answer_ce):
    """The plain side as one nn.Module, so DeepSpeed's engine drives it like the CKF model (forward(batch) -> loss)."""
    from torch import nn

    class PlainLoRA(nn.Module):
        """A peft LoRA causal LM trained like CKFModel: decoder, answer-token CE with the LM head on those positions.

        Args:
            peft_model: get_peft_model(llm, LoraConfig(...)).
            answer_ce: benchmarks/multi_lora_overhead.py's loss (the same computation CKFModel does).

        Example:
            >>> loss = plain_lora_module(peft_model, answer_ce)(batch)
        """

        def __init__(self) -> None:
            super().__init__()
            self.peft = peft_model

        def forward(self, batch):
            inner = self.peft.base_model.model
            position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            h = inner.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=position_ids, use_cache=False).last_hidden_state
            return answer_ce(h, inner.get_output_embeddings(), batch.labels)

    return PlainLoRA()


# --------------------------------------------------------------------------------------------------
# Part 4: sampler study (runs in its own process: `--part sampler`)
# --------------------------------------------------------------------------------------------------


def sampler_overrides(args: argparse.Namespace) -> list[str]:
    from ckf_dist.testing.jobs import TINY

    base = ["train.ds_config=ds_configs/zero3.json",
            "train.resume=never", "log.progress=false", "eval.baselines=[]", "log.every=5"]
    if args.dry_run:
        return [*base, *TINY, "log.every=1"]
    return [*base, f"train.micro_batch_size={args.sampler_batch}"]


def part_sampler(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    from task_sampling import HEADLINE, normalised

    from ckf_dist.config import load_config
    from ckf_dist.data.preprocess import prepare_data

    t_start = now()
    work = Path(args.work) / "sampler"
    work.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds if args.seeds is not None else ([0] if args.dry_run else [0, 1, 2, 3, 4])
    steps = args.sampler_steps or (4 if args.dry_run else 300)
    half = max(1, steps // 2)
    extra = sampler_overrides(args)
    data_dir = work / "data"
    cfg = load_config(DEMO, [*extra, f"data.prepared_dir={data_dir}"])
    t0 = now()
    prepare_data(cfg.data, engine="local")  # once, before the runs start (they would race on the folder)
    prep_s = round(now() - t0, 1)
    tasks = list(cfg.data.tasks)

    # The CF tables and the tiny base model depend on the seed only, not on the sampler: build them once per seed and
    # let the three arms of that seed load them (cf.embeddings_path, model.base_model) instead of each rebuilding
    # the same thing (the resume tests share them the same way).
    t0 = now()
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        shared = dict(zip(seeds, pool.map(lambda s: build_seed_inputs(extra, data_dir, work / f"shared-seed{s}", s),
                                          seeds)))
    shared_s = round(now() - t0, 1)

    arms = {"uniform": ("uniform", steps), "grad_balanced": ("grad_balanced", steps), "uniform_half": ("uniform", half)}
    jobs = []
    for seed in seeds:
        for arm, (sampler, n) in arms.items():
            run_dir = work / f"{arm}-seed{seed}"
            ov = ["--config", str(DEMO), *extra, f"log.run_dir={run_dir}", f"data.prepared_dir={data_dir}",
                  f"cf.embeddings_path={shared[seed] / 'cf' / 'embeddings.safetensors'}",
                  f"model.base_model={shared[seed] / 'base_model'}", f"train.sampler={sampler}",
                  f"train.seed={seed}", f"train.max_steps={n}", f"train.ckpt_every={n}"]
            jobs.append({"arm": arm, "seed": seed, "steps": n, "run_dir": run_dir,
                         "cmd": [sys.executable, str(ROOT / "launchers" / "train.py"), *ov]})
    env = child_env(args.dry_run, threads=1)
    limit = max(1, min(len(jobs), (os.cpu_count() or 2) - 1 if not args.dry_run else len(jobs)))
    pending, running = list(jobs), []
    while (pending or running) and now() < deadline:
        while pending and len(running) < limit:
            j = pending.pop(0)
            j["log"] = j["run_dir"].with_suffix(".log")
            j["run_dir"].parent.mkdir(parents=True, exist_ok=True)
            with open(j["log"], "w") as f:
                j["proc"] = subprocess.Popen(j["cmd"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            j["t0"] = now()
            running.append(j)
        for j in list(running):
            if j["proc"].poll() is not None:
                j["wall_s"] = round(now() - j["t0"], 1)
                running.remove(j)
        time.sleep(0.5)
    for j in running:
        kill_group(j["proc"])
        j["wall_s"] = round(now() - j["t0"], 1)
        j["killed"] = True

    runs, metrics, shares = [], {a: [] for a in arms}, {a: [] for a in arms}
    for j in jobs:
        rec = {"arm": j["arm"], "seed": j["seed"], "steps": j["steps"], "wall_s": j.get("wall_s")}
        mfile = j["run_dir"] / "metrics.json"
        if "proc" not in j:
            rec.update(status="not_started", reason="the part's time box ended first")
        elif j.get("killed"):
            rec.update(status="timeout", reason="killed when the part's time box ended")
        elif j["proc"].returncode != 0 or not mfile.is_file():
            rec.update(status="failed", reason=f"exit {j['proc'].returncode}",
                       log_tail=j["log"].read_text(errors="replace")[-2000:])
        else:
            rec["status"] = "ok"
            m = json.loads(mfile.read_text())["CKF"]
            rec["metrics"] = {t: m.get(HEADLINE[t][0]) for t in tasks if t in HEADLINE}
            metrics[j["arm"]].append(rec["metrics"])
            shares[j["arm"]].append(mean_shares(j["run_dir"], tasks))
            rec["mean_share"] = shares[j["arm"]][-1]
        runs.append(rec)

    per_task: dict[str, Any] = {}
    for t in tasks:
        if t not in HEADLINE:
            continue
        key, higher = HEADLINE[t]
        row: dict[str, Any] = {"metric": key, "higher_is_better": higher}
        for a in arms:
            vals = [m[t] for m in metrics[a] if m.get(t) is not None]
            sh = [s[t] for s in shares[a] if s.get(t) is not None]
            sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            row[a] = {"values": vals, "mean": statistics.mean(vals) if vals else None, "std": sd,
                      "band": 2 * sd, "n": len(vals), "mean_share": statistics.mean(sh) if sh else None}
        row["delta_balanced_vs_uniform"], row["noise_balanced_vs_uniform"] = gain(row, "grad_balanced", "uniform")
        row["delta_full_vs_half"], row["noise_full_vs_half"] = gain(row, "uniform", "uniform_half")
        row["normalised_uniform"] = normalised(t, row["uniform"]["mean"]) if row["uniform"]["mean"] is not None else None
        per_task[t] = row

    scored = {t: r for t, r in per_task.items() if r["normalised_uniform"] is not None}
    worst = min(scored, key=lambda t: scored[t]["normalised_uniform"]) if scored else None
    out: dict[str, Any] = {"model_note": SAMPLER_MODEL_NOTE, "config": "configs/demo.yaml" + (" + TINY" if args.dry_run
                                                                                              else ""),
                           "overrides": extra, "seeds": seeds, "steps": steps, "half_steps": half,
                           "arms": {a: {"sampler": s, "steps": n} for a, (s, n) in arms.items()},
                           "concurrent_runs": limit, "prepare_s": prep_s, "shared_inputs_s": shared_s, "tasks": per_task, "runs": runs,
                           "runs_ok": sum(r["status"] == "ok" for r in runs), "runs_total": len(runs),
                           "worst_task": worst}
    if worst:
        w = per_task[worst]
        d, noise = w["delta_balanced_vs_uniform"], w["noise_balanced_vs_uniform"]
        dl, nl = w["delta_full_vs_half"], w["noise_full_vs_half"]
        out["worst_task_data_limited"] = bool(dl is not None and dl > nl)
        out["worst_task_share"] = {a: w[a]["mean_share"] for a in arms}
        bigger = (w["grad_balanced"]["mean_share"] or 0) > (w["uniform"]["mean_share"] or 0)
        out["worst_task_got_bigger_share"] = bool(bigger)
        out["worst_task_improves"] = bool(d is not None and d > 0)
        out["worst_task_improves_beyond_noise"] = bool(d is not None and d > noise)
        out["no_task_drops_beyond_noise"] = all(r["delta_balanced_vs_uniform"] is None or
                                                r["delta_balanced_vs_uniform"] >= -r["noise_balanced_vs_uniform"]
                                                for r in per_task.values())
    else:
        out.update(worst_task_data_limited=None, worst_task_share=None, worst_task_got_bigger_share=None,
                   worst_task_improves=None, worst_task_improves_beyond_noise=None, no_task_drops_beyond_noise=None)
    out["wall_s"] = round(now() - t_start, 1)
    return out


def build_seed_inputs(overrides: list[str], data_dir: Path, out: Path, seed: int) -> Path:
    """The CF tables and the tiny base model one seed's runs share, built as the pipeline's stages build them."""
    from ckf_dist.cf.train_cf import train_cf
    from ckf_dist.config import load_config
    from ckf_dist.data.prompts import corpus_texts
    from ckf_dist.model.llm import build_tiny_llm

    cfg = load_config(DEMO, [*overrides, f"data.prepared_dir={data_dir}", f"log.run_dir={out}", f"train.seed={seed}"])
    train_cf(cfg)
    build_tiny_llm(cfg.model.tiny, corpus_texts(data_dir), out / "base_model", seed=seed)
    return out


def gain(row: dict[str, Any], x: str, y: str) -> tuple[float | None, float | None]:
    """Arm x's mean minus arm y's (> 0 = better, whichever way the metric points) and the noise band: 2 x the larger
    seed standard deviation (task_sampling.py's rule)."""
    if row[x]["mean"] is None or row[y]["mean"] is None:
        return None, None
    sign = 1 if row["higher_is_better"] else -1
    return sign * (row[x]["mean"] - row[y]["mean"]), 2 * max(row[x]["std"], row[y]["std"])


def mean_shares(run_dir: Path, tasks: list[str]) -> dict[str, float | None]:
    """Each task's mixture share averaged over the logged steps (train/mixture_<task> in metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {}
    for t in tasks:
        vals = [r[f"train/mixture_{t}"] for r in rows if f"train/mixture_{t}" in r]
        out[t] = statistics.mean(vals) if vals else None
    return out


# --------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------


def run_part(name: str, args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """Run part `name` in a fresh process (its own CUDA context, DeepSpeed accelerator and memory), time-boxed."""
    part_out = Path(args.work) / f"part-{name}.json"
    part_out.unlink(missing_ok=True)
    margin = max(3.0, min(10.0, 0.1 * budget))
    deadline = time.time() + budget - margin  # the child's own stop time; the hard kill follows `margin` later
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(part_out),
           "--deadline", f"{deadline:.1f}", "--work", str(args.work), *passthrough(args)]
    timing = name == "throughput"
    res = run_timed(cmd, budget, child_env(args.dry_run, threads=None if timing else 1, check_collectives=not timing),
                    log=Path(args.work) / f"part-{name}.log")
    if part_out.is_file():
        out = json.loads(part_out.read_text())
        out.setdefault("status", "ok")
    else:
        out = {"status": "timeout" if res["timed_out"] else "failed",
               "reason": (f"killed at its {budget:.0f} s budget" if res["timed_out"] else
                          f"exit {res['returncode']} without a result"),
               "output_tail": res["output"][-4000:]}
    out["budget_s"] = round(budget, 1)
    out["part_wall_s"] = res["wall_s"]
    return out


def passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--dry-run"] if args.dry_run else []
    for flag, val in (("--seq", args.seq), ("--rows", args.rows), ("--bench-steps", args.bench_steps),
                      ("--sampler-steps", args.sampler_steps), ("--sampler-batch", args.sampler_batch)):
        if val:
            out += [flag, str(val)]
    if args.seeds is not None:
        out += ["--seeds", *map(str, args.seeds)]
    return out


def child_main(args: argparse.Namespace) -> None:
    deadline = now() + (args.deadline - time.time())
    try:
        if args.part == "throughput":
            out = part_throughput(args, deadline)
        else:
            out = part_sampler(args, deadline)
        out["status"] = out.get("status", "ok")
        if args.part == "throughput" and out.get("steps_timed", 0) == 0:
            out.update(status="timeout", reason="no timed step fitted in the time box")
        elif args.part == "sampler" and out.get("runs_ok", 0) < out.get("runs_total", 0):
            out.update(status="partial" if out.get("runs_ok") else "failed",
                       reason=f"{out['runs_ok']} of {out['runs_total']} runs finished")
    except Exception as err:  # noqa: BLE001 - recorded in the JSON with its traceback, then the parent goes on
        import traceback

        out = {"status": "failed", "reason": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-4000:]}
    Path(args.part_out).write_text(json.dumps(out, indent=1, default=str))


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    tp = result["parts"].get("throughput", {})
    sides = tp.get("sides") or {}
    ckf, plain = sides.get("multi_lora_fusion", {}), sides.get("plain_peft_lora", {})
    ratio = tp.get("ratio_tokens_per_s")
    sp = result["parts"].get("sampler_study", {})
    tests = result["parts"].get("tests", {})

    def g(name: str, target: str, value, ok) -> dict[str, Any]:
        return {"name": name, "target": target, "value": value, "pass": None if value is None else bool(ok)}

    return [
        g("tests/gpu pass", "0 failed, 0 errors", None if tests.get("status") in (None, "skipped") else
          f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('skipped', 0)} skipped",
          tests.get("status") == "ok"),
        g("MFU Multi-LoRA + fusion (7B shape)", f">= {GOAL_MFU:.0%}", ckf.get("mfu"), (ckf.get("mfu") or 0) >= GOAL_MFU),
        g("MFU plain peft LoRA (7B shape)", f">= {GOAL_MFU:.0%}", plain.get("mfu"), (plain.get("mfu") or 0) >= GOAL_MFU),
        g("tokens/s Multi-LoRA + fusion / plain peft LoRA", f">= {GOAL_RATIO}", ratio, (ratio or 0) >= GOAL_RATIO),
        g("sampler: worst task data-limited (uniform full vs half steps)", "gain > 2 x seed std",
          sp.get("worst_task_data_limited"), sp.get("worst_task_data_limited")),
        g("sampler: grad_balanced gives the worst task a bigger share", "share > uniform's",
          sp.get("worst_task_got_bigger_share"), sp.get("worst_task_got_bigger_share")),
        g("sampler: worst task improves under grad_balanced", "delta > 0", sp.get("worst_task_improves"),
          sp.get("worst_task_improves")),
        g("sampler: no task drops beyond its noise band", "delta >= -2 x seed std",
          sp.get("no_task_drops_beyond_noise"), sp.get("no_task_drops_beyond_noise")),
    ]


def fmt(v, spec: str = ".3f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def print_table(result: dict[str, Any]) -> None:
    m = result["machine"]
    print(f"\n== gpu_check {'(DRY RUN, CPU)' if result['dry_run'] else ''} | {m.get('gpu_name') or 'no GPU'} | torch "
          f"{m.get('torch')} | {result['wall_s']:.0f} s of {result['budget_s']:.0f} s")
    imp = result["imports"]
    print(f"imports: {'ok' if imp['ok'] else 'MISSING ' + ', '.join(imp['missing'])}"
          + (f" (installed {len(imp['installed_from_wheels']['wheels'])} wheels)" if imp.get("installed_from_wheels")
             else ""))
    if imp.get("install_hint"):
        print(f"  how: {imp['install_hint']}")
    for name, p in result["parts"].items():
        print(f"part {name:14s} {p.get('status', '?'):8s} {p.get('part_wall_s', p.get('wall_s', 0)) or 0:6.0f} s "
              f"(budget {p.get('budget_s', 0) or 0:.0f} s) {p.get('reason', '')}")
    t = result["parts"].get("tests", {})
    if t.get("summary_line"):
        print(f"  tests: {t['summary_line']}")
        for r in t.get("skip_reasons", [])[:12]:
            print(f"    skipped: {r}")
        for r in t.get("failures", [])[:12]:
            print(f"    FAILED: {r}")
    tp = result["parts"].get("throughput", {})
    if tp.get("sides"):
        mdl = tp["model"]
        print(f"\nthroughput: {mdl['name']} (d={mdl['hidden_size']}, L={mdl['num_hidden_layers']}), batch "
              f"{tp['batch']['rows']} x {tp['batch']['seq']}, ZeRO-3 bf16, checkpointing, attn "
              f"{tp.get('attn_implementation')}, optimizer {tp.get('optimizer')}, {tp.get('steps_timed')} timed steps")
        print(f"  {'side':20s} {'step s':>8s} {'tokens/s':>10s} {'peak GiB':>9s} {'TFLOP/s':>8s} {'MFU':>7s}")
        for k, s in tp["sides"].items():
            print(f"  {k:20s} {fmt(s['step_s_median'], '.3f'):>8s} {fmt(s['tokens_per_s'], '.0f'):>10s} "
                  f"{fmt(s['peak_mem_gib'], '.2f'):>9s} {fmt(s['model_tflops_per_s'], '.1f'):>8s} "
                  f"{fmt(s['mfu'], '.1%'):>7s}")
        print(f"  ratio tokens/s (Multi-LoRA + fusion / plain) = {fmt(tp.get('ratio_tokens_per_s'))}; peak "
              f"{tp.get('peak_tflops')} TFLOP/s ({tp.get('peak_source')}); measured matmul "
              f"{tp.get('matmul_tflops_measured')} TFLOP/s")
    sp = result["parts"].get("sampler_study", {})
    if sp.get("tasks"):
        print(f"\nsampler study: {sp['runs_ok']}/{sp['runs_total']} runs, seeds {sp['seeds']}, {sp['steps']} steps "
              f"(half {sp['half_steps']}); {sp['model_note']}")
        print(f"  {'task':7s} {'metric':12s} {'uniform':>17s} {'grad_balanced':>17s} {'uniform/2':>17s} "
              f"{'delta':>8s} {'noise':>7s} {'share u/b':>11s}")
        for task, r in sp["tasks"].items():
            cell = {a: f"{fmt(r[a]['mean'], '.4f')}±{fmt(r[a]['std'], '.4f')}" for a in ("uniform", "grad_balanced",
                                                                                        "uniform_half")}
            print(f"  {task:7s} {r['metric']:12s} {cell['uniform']:>17s} {cell['grad_balanced']:>17s} "
                  f"{cell['uniform_half']:>17s} {fmt(r['delta_balanced_vs_uniform'], '+.4f'):>8s} "
                  f"{fmt(r['noise_balanced_vs_uniform'], '.4f'):>7s} "
                  f"{fmt(r['uniform']['mean_share'], '.2f')}/{fmt(r['grad_balanced']['mean_share'], '.2f'):>5s}")
        print(f"  worst task under uniform: {sp.get('worst_task')}")
    print("\ngoals:")
    for g in result["goals"]:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[g["pass"]]
        val = fmt(g["value"], ".3f") if not isinstance(g["value"], float) or "MFU" not in g["name"] else \
            f"{g['value']:.1%}"
        print(f"  [{mark}] {g['name']}: {val} (goal {g['target']})")
    if result["dry_run"]:
        print("  (dry run: CPU values with tiny shapes; the goals are meaningful only on the GPU run)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, gloo, tiny shapes, one seed (~95 s idle)")
    ap.add_argument("--json", default=None, help="result path (default $OUT/gpu_check.json, else runs/gpu_check.json)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="whole-run time box (default 465 on GPU; dry run 150, which takes about 95 s on an idle "
                         "2-core CPU)")
    ap.add_argument("--wheels", default=str(ROOT / ".whl"), help="wheel folder installed when packages are missing")
    ap.add_argument("--site", default="/tmp/ckf-site", help="where the wheels are installed (pip --target)")
    ap.add_argument("--no-install", action="store_true", help="only report missing packages")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "throughput", "sampler_study"])
    ap.add_argument("--work", default=None, help="scratch folder, kept (default: a temporary one, removed)")
    ap.add_argument("--seq", type=int, default=None, help="throughput sequence length (default 2048; dry 128)")
    ap.add_argument("--rows", type=int, default=None, help="throughput rows per step (default 8; dry 2)")
    ap.add_argument("--bench-steps", type=int, default=5, help="timed interleaved steps per side (median)")
    ap.add_argument("--sampler-steps", type=int, default=None, help="sampler study steps (default 300; dry 4)")
    ap.add_argument("--sampler-batch", type=int, default=32, help="sampler study micro-batch (GPU)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="sampler seeds (default 0-4; dry 0)")
    ap.add_argument("--part", choices=["throughput", "sampler"], help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.part:
        child_main(args)
        return 0

    t0 = now()
    budget = args.budget_s or (150.0 if args.dry_run else 465.0)
    deadline = t0 + budget
    scratch = args.work is None  # a temporary work folder is removed at the end; a given one is kept
    if scratch:
        import tempfile

        args.work = tempfile.mkdtemp(prefix="gpu_check-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    out_path = Path(args.json) if args.json else (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT")
                                                  else ROOT / "runs" / "gpu_check.json")
    result: dict[str, Any] = {"schema": SCHEMA, "dry_run": args.dry_run, "budget_s": budget,
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:],
                              "work_dir": args.work, "mfu_formula": MFU_FORMULA, "goal_mfu": GOAL_MFU,
                              "goal_ratio": GOAL_RATIO}
    result["imports"] = check_imports(args)
    result["machine"] = machine_info(args.dry_run)
    print(f"[gpu_check] imports: {'ok' if result['imports']['ok'] else 'missing ' + str(result['imports']['missing'])}"
          f" ({result['imports']['wall_s']:.0f} s)", flush=True)
    if not args.dry_run and not result["machine"].get("cuda_available"):
        print("[gpu_check] warning: no CUDA device; the numbers below are not GPU numbers (use --dry-run on CPU)")

    # (name, share of the time left, smallest useful budget): each part gets the time left in proportion to its share
    # among the parts still to run, so time a part leaves unused goes to the later ones.
    plan = [("tests", 0.38, 30.0), ("throughput", 0.27, 40.0), ("sampler_study", 0.35, 40.0)]
    if args.dry_run:
        plan = [("tests", 0.1, 5.0), ("throughput", 0.25, 15.0), ("sampler_study", 0.65, 25.0)]
    plan = [p for p in plan if p[0] not in args.skip] + [p for p in plan if p[0] in args.skip]
    result["parts"] = {}
    for i, (name, share, least) in enumerate(plan):
        weights = sum(sh for nm, sh, _ in plan[i:] if nm not in args.skip)
        left = deadline - now()
        part_budget = left * share / weights if weights else 0.0
        if name in args.skip:
            result["parts"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        if not result["imports"]["ok"]:
            result["parts"][name] = {"status": "skipped", "reason": "missing packages: " + ", ".join(
                result["imports"]["missing"]) if result["imports"]["missing"] else "the import probe failed"}
            continue
        if part_budget < least:
            result["parts"][name] = {"status": "skipped", "budget_s": round(part_budget, 1),
                                     "reason": f"time ran out: {max(part_budget, 0):.0f} s left for it, needs >= "
                                               f"{least:.0f} s"}
            continue
        print(f"[gpu_check] {name}: budget {part_budget:.0f} s", flush=True)
        if name == "tests":
            result["parts"][name] = run_tests(args, part_budget)
        else:
            result["parts"][name] = run_part("throughput" if name == "throughput" else "sampler", args, part_budget)
        p = result["parts"][name]
        print(f"[gpu_check] {name}: {p.get('status')} in {p.get('part_wall_s', p.get('wall_s'))} s "
              f"{p.get('reason', '')}", flush=True)

    result["wall_s"] = round(now() - t0, 1)
    result["goals"] = goals(result)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str))
    print_table(result)
    print(f"\n[gpu_check] JSON: {out_path}")
    if scratch:
        import shutil

        shutil.rmtree(args.work, ignore_errors=True)
    return 0 if result["imports"]["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
