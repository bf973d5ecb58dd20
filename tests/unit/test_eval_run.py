"""launchers/evaluate.py's path end to end on a fabricated finished run (synthetic data, tiny Llama, exported
adapters, CF tables): the CKF metrics it reports equal an in-memory evaluation of the model before export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ckf_dist.config import load_config


@pytest.mark.slow
def test_evaluate_run_matches_in_memory_model(tmp_path: Path) -> None:
    from ckf_dist.cf.export import save_cf_embeddings
    from ckf_dist.data.preprocess import prepare_data
    from ckf_dist.data.prompts import corpus_texts
    from ckf_dist.data.schema import manifest_sha256
    from ckf_dist.eval.evaluate import evaluate_model
    from ckf_dist.eval.run import eval_samples, evaluate_run
    from ckf_dist.model.ckf import build_ckf_model
    from ckf_dist.model.export import export_task_adapters
    from ckf_dist.model.llm import build_tiny_llm, load_llm, load_tokenizer

    run = tmp_path / "run"
    cfg = load_config(None, [
        f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "data.synthetic.num_users=24",
        "data.synthetic.num_items=30", "data.synthetic.max_interactions=12", "data.num_candidates=4",
        "model.tiny.hidden_size=32", "model.tiny.intermediate_size=64", "model.tiny.vocab_size=400",
        "model.max_length=192", "model.meta_hidden=16", "multi_lora.rank=2", "multi_lora.task_rank=2",
        "cf.dim=8", "eval.max_samples_per_task=6", "eval.batch_size=4", "eval.max_new_tokens=4",
        "eval.ks=[1,3]",  # below data.num_candidates
    ])
    manifest = prepare_data(cfg.data, engine="local")
    build_tiny_llm(cfg.model.tiny, corpus_texts(cfg.data.prepared_dir), run / "base_model")
    U, V = manifest["num_users"], manifest["num_items"]
    g = torch.Generator().manual_seed(0)
    user, item = torch.randn(U, 8, generator=g), torch.randn(V, 8, generator=g)
    save_cf_embeddings(cfg.cf_embeddings_path, user, item,
                       {"d": 8, "model": "mf", "manifest_sha256": manifest_sha256(cfg.data.prepared_dir),
                        "num_users": U, "num_items": V, "idmap_sha256": "test"},
                       torch.zeros(U), torch.zeros(V), torch.full((1,), 3.5))
    tok = load_tokenizer(run / "base_model")
    model = build_ckf_model(load_llm(run / "base_model", "float32", tok), tok, user, item, cfg.model, cfg.multi_lora)
    with torch.no_grad():  # non-zero LoRA B so that a lost adapter would change the metrics
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    export_task_adapters(model, run / "adapters", str(run / "base_model"))

    results = evaluate_run(cfg)
    samples = eval_samples(cfg, "test", 6)
    want = evaluate_model(model, tok, samples, cfg, "cf")
    got = results["CKF"]
    assert set(got) == set(want)
    for k, v in want.items():
        assert (v is None) == (got[k] is None), k
        if v is not None:
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert {"CKF", "CF (mf)"} <= set(results) and len(results) == 3
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["CKF"]["n_ctr"] == got["n_ctr"] > 0
    assert (run / "report.md").is_file() and (run / "plots" / "ctr.png").is_file()
