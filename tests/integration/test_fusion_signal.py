"""The fused CF vectors carry the collaborative signal into the answer (the property CKF exists for), measured on the
fusion oracle (ckf_dist/testing/fusion_oracle.py): when only the CF vectors say whether a user likes an item, CKF
learns it and a text-only model cannot; when only the text says it, the text-only model learns it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ckf_dist.testing.fusion_oracle import OracleRun, run_oracle, tiny_llm_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return tiny_llm_dir(tmp_path_factory.mktemp("oracle"))


def test_ckf_learns_a_label_only_the_cf_vectors_carry(llm_dir: Path) -> None:
    ckf = run_oracle(OracleRun(signal="cf", variant="cf"), llm_dir)
    text_only = run_oracle(OracleRun(signal="cf", variant="text", steps=300), llm_dir)
    assert ckf["auc_ctr"] > 0.9, ckf
    assert abs(text_only["auc_ctr"] - 0.5) < 0.05, text_only  # its prompts are all alike: nothing to learn from


def test_text_only_learns_a_label_only_the_text_carries(llm_dir: Path) -> None:
    text_only = run_oracle(OracleRun(signal="text", variant="text", steps=300), llm_dir)
    assert text_only["auc_ctr"] > 0.9, text_only
