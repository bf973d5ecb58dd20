"""Config loading: every problem reported at once, overrides, and every shipped YAML / DeepSpeed JSON is valid."""

from pathlib import Path

import pytest

from ckf_dist.config import ConfigError, RunConfig, load_config, parse_override, save_config
from ckf_dist.train.deepspeed_utils import load_zero_json, make_ds_config

ROOT = Path(__file__).resolve().parents[2]


def test_two_unknown_keys_and_one_wrong_type_are_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n  max_steps: ten\nmodel:\n  poolin: mean\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert len(e.value.problems) == 3, msg
    assert "train.lrr: unknown key" in msg
    assert "model.poolin: unknown key" in msg
    assert "train.max_steps: expected int, got str 'ten'" in msg
    assert str(bad) in msg


def test_range_and_contradiction_problems_are_collected():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["multi_lora.rank=0", "multi_lora.shared_targets=[q_proj]", "cf.dim=4",
                           "data.source=ml-100k", "data.path=/x", "data.tasks=[ctr,exp]"])
    msg = str(e.value)
    assert "multi_lora.rank must be > 0" in msg
    assert "cannot be both shared and task-specific" in msg
    assert "cf.dim must be within [8, 256]" in msg
    assert "'exp' but data.source='ml-100k' has no review text" in msg
    assert len(e.value.problems) == 4


def test_sampler_knobs_are_checked_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.sampler_alpha=-1", "train.sampler_progress=0", "train.sampler_warmup=-3",
                           "train.sampler_temperature=0"])
    msg = str(e.value)
    for field in ("sampler_alpha", "sampler_progress", "sampler_warmup", "sampler_temperature"):
        assert f"train.{field} must be" in msg
    assert len(e.value.problems) == 4


def test_literal_and_list_types_are_checked():
    with pytest.raises(ConfigError, match=r"model.pooling: expected one of \['mean', 'attention'\], got 'max'"):
        load_config(None, ["model.pooling=max"])
    with pytest.raises(ConfigError, match=r"eval.ks\[1\]: expected int"):
        load_config(None, ["eval.ks=[1, 'five']"])


def test_types_are_strict_but_an_int_makes_a_float_and_a_tuple_a_list():
    cfg = load_config(None, ["train.lr=1", "eval.ks=1,5"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.eval.ks == [1, 5]
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_steps=True", "log.progress=1", "data.like_threshold='4'", "eval.ks={1, 5}",
                           "data.synthetic.foo=1", "model.tiny=big", "train.precision=None"])
    assert sorted(e.value.problems) == sorted([
        "train.max_steps: expected int, got bool True",
        "log.progress: expected bool (true/false), got int 1",
        "data.like_threshold: expected float, got str '4'",
        "eval.ks: expected a list, got set {1, 5}",
        ("data.synthetic.foo: unknown key; SyntheticConfig has ['latent_dim', 'max_interactions', 'min_interactions', "
         "'noise', 'num_items', 'num_users']"),
        "model.tiny: expected a mapping of TinyLLMConfig fields, got 'big'",
        "train.precision: expected one of ['fp32', 'bf16', 'fp16'], got None",
    ])


def test_topk_cut_offs_must_be_below_the_number_of_candidates():
    assert all(k < RunConfig().data.num_candidates for k in RunConfig().eval.ks)  # the defaults are informative
    with pytest.raises(ConfigError, match=r"eval.ks has \[5, 7\] >= data.num_candidates \(5\).*HR@K is 1.0 for any "
                                          r"model.*use eval.ks values below 5 or raise data.num_candidates"):
        load_config(None, ["data.num_candidates=5", "eval.ks=[1,5,7]"])
    assert load_config(None, ["data.num_candidates=5", "eval.ks=[1,4]"]).eval.ks == [1, 4]
    # Without the top-K task no K is read against the candidates.
    assert load_config(None, ["data.tasks=[ctr,rating]", "eval.ks=[10]"]).eval.ks == [10]


def test_overrides_parse_python_and_yaml_literals():
    assert parse_override("train.lr=2e-4") == ("train.lr", 2e-4)
    assert parse_override("data.tasks=[ctr,rating]") == ("data.tasks", ["ctr", "rating"])
    assert parse_override("model.base_model=/models/llama") == ("model.base_model", "/models/llama")
    cfg = load_config(None, ["train.lr=2e-4", "data.tasks=[ctr,rating]", "model.base_model=null"])
    assert cfg.train.lr == 2e-4 and cfg.data.tasks == ["ctr", "rating"] and cfg.model.base_model is None


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.train.max_steps == 7


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    assert isinstance(load_config(path), RunConfig)


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_ds_config_resolves(path):
    cfg = load_config(None, [f"train.ds_config={path}", "train.micro_batch_size=4", "train.grad_accum=2"])
    ds = make_ds_config(cfg, world=2, hidden_size=64)
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert "auto" not in str(ds)


def test_ds_json_may_not_set_what_train_owns(tmp_path):
    p = tmp_path / "z.json"
    p.write_text('{"zero_optimization": {"stage": 3}, "gradient_clipping": 5.0}')
    with pytest.raises(ValueError, match=r"\['gradient_clipping'\] are set from the train section"):
        load_zero_json(p)
