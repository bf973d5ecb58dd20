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


def _float_fields(tp: type = RunConfig, prefix: str = "") -> list[str]:
    """Dotted names of every float (or float | None) field of the configuration."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(tp):
        ann = typing.get_type_hints(tp)[f.name]
        args = typing.get_args(ann)
        if dataclasses.is_dataclass(ann):
            out += _float_fields(ann, f"{prefix}{f.name}.")
        elif ann is float or (float in args and type(None) in args):
            out.append(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("key", _float_fields())
def test_nan_and_inf_are_rejected_for_every_float_field(key):
    assert len(_float_fields()) >= 20  # the walk found the fields (train.lr, train.grad_clip, cf.lr, ...)
    for raw, shown in ((".nan", "nan"), ("1e309", "inf"), ("-.inf", "-inf")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={raw}"])
        assert e.value.problems == [f"{key} must be a finite number, got {shown}"]


def test_nan_from_yaml_is_rejected_and_breaks_every_range_rule(tmp_path):
    from ckf_dist.config import _BREAKS

    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: .nan\n  grad_clip: .inf\ncf:\n  lr: .nan\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert sorted(e.value.problems) == ["cf.lr must be a finite number, got nan",
                                        "train.grad_clip must be a finite number, got inf",
                                        "train.lr must be a finite number, got nan"]
    assert all(breaks(float("nan")) for breaks in _BREAKS.values())  # NaN compares False both ways


def test_duplicate_tasks_are_rejected():
    with pytest.raises(ConfigError, match=r"data.tasks lists \['ctr'\] more than once"):
        load_config(None, ["data.tasks=[ctr,topk,ctr]"])


@pytest.mark.parametrize("run_dir, why", [("/", "is the filesystem root"), ("''", "must name a folder"),
                                          ("'  '", "must name a folder"), (str(Path.home()), "is the home folder"),
                                          ("..", "is a parent of the working directory")])
def test_run_dirs_that_cannot_be_meant_are_rejected(run_dir, why):
    with pytest.raises(ConfigError, match=f"log.run_dir.* {why}"):
        load_config(None, [f"log.run_dir={run_dir}"])


def test_ordinary_run_dirs_are_accepted(tmp_path):
    for run_dir in ("runs/x", str(tmp_path), str(tmp_path / "new" / "run")):
        assert load_config(None, [f"log.run_dir={run_dir}"]).log.run_dir == run_dir


def test_a_malformed_override_is_a_config_error_naming_it(capsys):
    from ckf_dist.cli import parse_run_args

    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.tasks=[ctr,", "train.lr=1", "eval.ks={1: [2"])
    assert len(e.value.problems) == 2
    assert e.value.problems[0].startswith("override 'data.tasks=[ctr,': the value '[ctr,' is neither a Python "
                                          "literal nor valid YAML")
    assert "override 'eval.ks={1: [2'" in e.value.problems[1]
    with pytest.raises(SystemExit) as ex:
        parse_run_args(["data.tasks=[ctr,"])
    assert ex.value.code == 2
    assert "override 'data.tasks=[ctr,'" in capsys.readouterr().err


def test_prepare_launcher_exits_2_on_a_config_error():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, str(ROOT / "launchers" / "prepare_data.py"), "data.tasks=[ctr,"],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "override 'data.tasks=[ctr,'" in res.stderr and "Traceback" not in res.stderr


def test_missing_base_model_and_ds_config_are_rejected_up_front(tmp_path, monkeypatch):
    from ckf_dist.cli import parse_run_args

    known = ["smollm2-135m"]
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"model.base_model={tmp_path / 'nope'}", "train.ds_config=ds_configs/nope.json"],
                    known_models=known)
    assert len(e.value.problems) == 2
    assert "model.base_model=" in e.value.problems[0] and "is neither a packaged model ['smollm2-135m'] nor an " \
                                                          "existing folder" in e.value.problems[0]
    assert "train.ds_config='ds_configs/nope.json' not found" in e.value.problems[1]
    assert "zero3_cpu.json" in e.value.problems[1]  # what exists
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(None, [f"model.base_model={tmp_path / 'empty'}"], known_models=known)
    # Accepted: a packaged name, a Hugging Face folder relative to the working directory, the shipped ds_config from
    # another working directory (it resolves against the repository root as train/deepspeed_utils.py does).
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["model.base_model=smollm2-135m"], known_models=known).model.base_model == "smollm2-135m"
    assert load_config(None, ["model.base_model=m"], known_models=known).model.base_model == "m"
    # Without known_models (tests, a config written for another machine) paths are not checked.
    assert load_config(ROOT / "configs" / "llama7b_ml1m.yaml").model.base_model == "/models/Llama-2-7b-hf"
    # The launchers check them (exit 2 before any data preparation).
    with pytest.raises(SystemExit) as ex:
        parse_run_args(["model.base_model=/nonexistent/llama"])
    assert ex.value.code == 2

