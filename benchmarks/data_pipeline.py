"""Data pipeline throughput: preprocessing rows/s (Ray Data vs a single-process pyarrow run of the same code) on
ML-100K, streaming samples/s (TaskStream, RayTaskStream through Ray Data, an in-memory pandas baseline), and the share
of a training step spent waiting for data with either stream (data.stream=local / ray; goal < 5%), all measured in one
run on one machine.

    python benchmarks/data_pipeline.py [--config configs/ml100k.yaml] [--steps 30] [overrides...]

The training step is the real one minus DeepSpeed: the tiny CKF model of the config (frozen Llama + Multi-LoRA +
fusion, random CF tables) on collated batches of the same shape as the main job's, forward + backward + AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_preprocess(cfg, work: Path) -> dict:
    """Same input, same code: in this process (pyarrow/numpy) vs on Ray Data map_batches."""
    import dataclasses

    import ray

    from ckf_dist.data.preprocess import init_local_ray, prepare_data

    local_cfg = dataclasses.replace(cfg, prepared_dir=str(work / "local"))
    ray_cfg = dataclasses.replace(cfg, prepared_dir=str(work / "ray"))
    m_local, t_local = timed(lambda: prepare_data(local_cfg, force=True, engine="local"))
    _, t_init = timed(lambda: init_local_ray(cfg.ray_num_cpus, cfg.ray_object_store_mb))
    # Cold: the first Ray Data job also starts its worker processes; warm: a second job on the same Ray (what a
    # long-lived cluster sees).
    m_ray, t_cold = timed(lambda: prepare_data(ray_cfg, force=True, engine="ray"))
    m_warm, t_warm = timed(lambda: prepare_data(ray_cfg, force=True, engine="ray"))
    ray.shutdown()
    rows = m_local["raw_rows_read"]
    sums = [{k: v["sha256"] for k, v in m["files"].items()} for m in (m_local, m_ray, m_warm)]
    return {"rows": rows, "local_s": t_local, "ray_cold_s": t_cold, "ray_warm_s": t_warm, "ray_init_s": t_init,
            "local_rows_per_s": rows / t_local, "ray_cold_rows_per_s": rows / t_cold,
            "ray_warm_rows_per_s": rows / t_warm, "ratio_ray_warm_over_local": t_local / t_warm,
            "ratio_ray_cold_over_local": t_local / t_cold, "byte_identical": sums[0] == sums[1] == sums[2],
            "prepared_dir": local_cfg.prepared_dir, "manifest": m_local}


def bench_streaming(prepared_dir: str, tasks: list[str], n: int) -> dict:
    """Samples/s of a shuffled pass: TaskStream vs RayTaskStream (Ray Data reads, incl. start-up) vs pandas in memory."""
    import numpy as np
    import pandas as pd
    import ray

    from ckf_dist.data.preprocess import init_local_ray
    from ckf_dist.data.prompts import load_samples
    from ckf_dist.data.ray_stream import RayTaskStream
    from ckf_dist.data.stream import TaskStream

    out = {}
    streams, t_open = timed(lambda: [TaskStream(prepared_dir, "train", t, 0, 2, seed=0) for t in tasks])
    out["taskstream_open_s"] = t_open
    _, t = timed(lambda: [next(streams[k % len(tasks)]) for k in range(n)])
    out["taskstream_samples_per_s"] = n / t

    def pandas_pass():
        df = pd.DataFrame(load_samples(prepared_dir, "train", tasks))
        order = np.random.default_rng(0).permutation(len(df))
        rows = df.iloc[order[:n]].to_dict("records")
        return len(rows)

    got, t = timed(pandas_pass)
    out["pandas_samples_per_s"] = got / t

    init_local_ray(8, 512)
    try:
        # RayTaskStream (data.stream=ray): Ray Data tasks read the chunks, this process assembles the windows. Windows
        # of 256 so that the timed pass reads many of them (the default 4096 would be read once, at start-up).
        rs = [RayTaskStream(prepared_dir, "train", t, 0, 1, seed=0, window=256) for t in tasks]
        _, t_first = timed(lambda: [next(r) for r in rs])  # start-up: the first window of every task
        _, t = timed(lambda: [next(rs[k % len(rs)]) for k in range(n)])
        for r in rs:
            r.close()
        out["ray_data_first_sample_s"] = t_first
        out["ray_data_samples_per_s"] = n / t
        out["ray_data_samples"] = n
    finally:
        import gc

        gc.collect()
        ray.shutdown()
    return out


def bench_training(cfg, prepared_dir: str, steps: int, work: Path, threads: int) -> dict:
    """Time a training loop fed by TaskStreams, then by RayTaskStreams: data wait (draw + collate) vs the step."""
    import torch

    from ckf_dist.data.collate import Collator
    from ckf_dist.data.preprocess import init_local_ray
    from ckf_dist.data.prompts import corpus_texts
    from ckf_dist.data.ray_stream import RayTaskStream
    from ckf_dist.data.stream import TaskStream
    from ckf_dist.model.ckf import build_ckf_model
    from ckf_dist.model.llm import build_tiny_llm, load_llm, load_tokenizer
    from ckf_dist.train.batches import StepBatches

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    llm_dir = build_tiny_llm(cfg.model.tiny, corpus_texts(prepared_dir), work / "llm", seed=0)
    tok = load_tokenizer(llm_dir)
    llm = load_llm(llm_dir, "float32", tok)
    man = json.loads((Path(prepared_dir) / "manifest.json").read_text())
    d = cfg.cf.dim
    model = build_ckf_model(llm, tok, torch.randn(man["num_users"], d), torch.randn(man["num_items"], d), cfg.model,
                            cfg.multi_lora, cfg.data.tasks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    collator = Collator(tok, cfg.model.max_length, cfg.data.history_len)
    mb = cfg.train.micro_batch_size
    weights = torch.full((len(cfg.data.tasks),), 1 / len(cfg.data.tasks), dtype=torch.float64)

    def step(batch) -> None:
        out = model(batch, text_weight=0.5)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed_loop(prefetch: bool, kind: str = "local") -> tuple[float, float]:
        """The main loop's data path (train/batches.py StepBatches: mixture draw -> data.stream -> collate),
        synchronous or built one step ahead; returns (seconds blocked on data, seconds in steps) after warm-up."""
        if kind == "ray":
            streams = {t: RayTaskStream(prepared_dir, "train", t, 0, 1, seed=0, window=cfg.data.stream_window)
                       for t in cfg.data.tasks}
        else:
            streams = {t: TaskStream(prepared_dir, "train", t, 0, 1, seed=0) for t in cfg.data.tasks}
        batches = StepBatches(streams, collator, cfg.data.tasks, mb, 1, seed=0, rank=0,
                              variants=lambda s: ("text", "cf"), prefetch=prefetch)
        t_wait = t_step = 0.0
        for k in range(steps + 2):
            t0 = time.perf_counter()
            (batch,) = batches.take(k, weights, last_step=steps + 1)
            t1 = time.perf_counter()
            step(batch)
            t2 = time.perf_counter()
            if k >= 2:  # warm-up steps excluded
                t_wait, t_step = t_wait + t1 - t0, t_step + t2 - t1
        batches.close()
        return t_wait, t_step

    # TaskStream alone (no tokenisation) for the breakdown.
    streams = [TaskStream(prepared_dir, "train", t, 0, 1, seed=0) for t in cfg.data.tasks]
    t0 = time.perf_counter()
    for k in range(steps * mb):
        next(streams[k % len(streams)])
    t_stream = time.perf_counter() - t0

    sync_wait, sync_step = timed_loop(prefetch=False)
    pre_wait, pre_step = timed_loop(prefetch=True)
    import ray

    init_local_ray(cfg.data.ray_num_cpus, cfg.data.ray_object_store_mb)
    try:  # data.stream=ray: the first window of every task is read during the warm-up steps, the rest while training
        ray_sync_wait, ray_sync_step = timed_loop(prefetch=False, kind="ray")
        ray_wait, ray_step = timed_loop(prefetch=True, kind="ray")
    finally:
        ray.shutdown()
    res = {"steps": steps, "micro_batch": mb, "threads": threads, "stream_ms_per_step": 1000 * t_stream / steps,
           "collate_ms_per_step": 1000 * (sync_wait - t_stream) / steps, "step_ms": 1000 * sync_step / steps,
           "data_wait_fraction_sync": sync_wait / (sync_wait + sync_step),
           "stream_wait_fraction_sync": t_stream / (sync_wait + sync_step),
           "samples_per_s_sync": steps * mb / (sync_wait + sync_step),
           "prefetch_wait_ms_per_step": 1000 * pre_wait / steps, "prefetch_step_ms": 1000 * pre_step / steps,
           "data_wait_fraction_prefetch": pre_wait / (pre_wait + pre_step),
           "samples_per_s_prefetch": steps * mb / (pre_wait + pre_step),
           "ray_stream_window": cfg.data.stream_window,
           "ray_data_wait_fraction_sync": ray_sync_wait / (ray_sync_wait + ray_sync_step),
           "ray_prefetch_wait_ms_per_step": 1000 * ray_wait / steps,
           "ray_data_wait_fraction_prefetch": ray_wait / (ray_wait + ray_step),
           "ray_samples_per_s_prefetch": steps * mb / (ray_wait + ray_step)}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/ml100k.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--stream-samples", type=int, default=5000)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--skip-preprocess", action="store_true", help="use data.prepared_dir instead of timing preprocessing")
    p.add_argument("--skip-streaming", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the training step (1 = one rank of the 2-rank job on a 2-core machine)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from ckf_dist.config import load_config

    overrides = list(args.overrides)
    if not any(o.startswith("data.path=") for o in overrides):
        overrides.append(f"data.path={ROOT.parent / 'shared/data/ml-100k'}")
    cfg = load_config(args.config, overrides)
    result: dict = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="ckf_bench_") as tmp:
        work = Path(tmp)
        if args.skip_preprocess:  # reuse (or build once, in-process) the config's prepared_dir
            from ckf_dist.data.preprocess import prepare_data

            prepare_data(cfg.data, engine="local")
            prepared = cfg.data.prepared_dir
        else:
            pre = bench_preprocess(cfg.data, work)
            prepared = pre.pop("prepared_dir")
            pre.pop("manifest")
            result["preprocess"] = pre
            print(f"preprocess {pre['rows']} rows: single-process pyarrow {pre['local_s']:.1f}s = "
                  f"{pre['local_rows_per_s']:,.0f} rows/s | Ray Data warm {pre['ray_warm_s']:.1f}s = "
                  f"{pre['ray_warm_rows_per_s']:,.0f} rows/s, ratio {pre['ratio_ray_warm_over_local']:.2f}x | "
                  f"Ray Data cold (first job, starts workers) {pre['ray_cold_s']:.1f}s = "
                  f"{pre['ray_cold_rows_per_s']:,.0f} rows/s, ratio {pre['ratio_ray_cold_over_local']:.2f}x | "
                  f"ray.init {pre['ray_init_s']:.1f}s | byte-identical: {pre['byte_identical']}")
        if not args.skip_streaming:
            st = bench_streaming(prepared, list(cfg.data.tasks), args.stream_samples)
            result["streaming"] = st
            print(f"streaming: TaskStream {st['taskstream_samples_per_s']:,.0f} samples/s (open "
                  f"{st['taskstream_open_s']:.2f}s) | pandas in-memory baseline {st['pandas_samples_per_s']:,.0f} "
                  f"samples/s | RayTaskStream (Ray Data, windows of 256) {st['ray_data_samples_per_s']:,.0f} samples/s "
                  f"after {st['ray_data_first_sample_s']:.1f}s to the first sample of each task | ratio TaskStream/pandas = "
                  f"{st['taskstream_samples_per_s'] / st['pandas_samples_per_s']:.2f}x")
        tr = bench_training(cfg, prepared, args.steps, work, args.threads)
        result["training"] = tr
        print(f"training loop (train.prefetch=false): {tr['stream_ms_per_step']:.2f} ms TaskStream + {tr['collate_ms_per_step']:.1f} ms "
              f"collate + {tr['step_ms']:.1f} ms step -> data wait {100 * tr['data_wait_fraction_sync']:.1f}% "
              f"(stream alone {100 * tr['stream_wait_fraction_sync']:.2f}%), {tr['samples_per_s_sync']:.1f} samples/s")
        print(f"training loop (train.prefetch=true, the default): {tr['prefetch_wait_ms_per_step']:.1f} ms wait + {tr['prefetch_step_ms']:.1f} "
              f"ms step -> data wait {100 * tr['data_wait_fraction_prefetch']:.1f}% (goal < 5%), "
              f"{tr['samples_per_s_prefetch']:.1f} samples/s")
        print(f"training loop, data.stream=ray (RayTaskStream, window {tr['ray_stream_window']}): train.prefetch=false "
              f"data wait {100 * tr['ray_data_wait_fraction_sync']:.1f}% | train.prefetch=true "
              f"{tr['ray_prefetch_wait_ms_per_step']:.1f} ms wait per step -> data wait "
              f"{100 * tr['ray_data_wait_fraction_prefetch']:.1f}% (goal < 5%), "
              f"{tr['ray_samples_per_s_prefetch']:.1f} samples/s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
