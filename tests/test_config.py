"""Typed config: presets load, overrides apply, every class of bad input is one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdd_ray.config import PRESET_DIR, absolute_storage, load_config, parse_overrides
from pdd_ray.errors import PddError

PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def test_presets_exist_and_load():
    assert {"digits", "cifar10_ipc10", "cifar10_ipc50", "cifar100_ipc10", "cifar100_ipc50",
            "tiny_ipc10", "tiny_ipc50"} <= set(PRESETS)
    for name in PRESETS:
        if name.startswith(("sweep", "kuberay")):
            continue
        cfg = load_config(name)
        assert cfg.distill.total_ipc == cfg.distill.num_stages * cfg.distill.ipc_per_stage


def test_paper_presets_match_reference_table():
    c10 = load_config("cifar10_ipc10")
    assert (c10.distill.num_stages, c10.distill.ipc_per_stage, c10.distill.syn_steps) == (5, 2, 50)
    assert (c10.distill.expert_epochs, c10.distill.max_start_epoch, c10.distill.lr_lr) == (2, 5, 1e-7)
    assert c10.data.zca and c10.distill.total_ipc == 10
    tiny = load_config("tiny_ipc50")
    assert tiny.model.depth == 4 and not tiny.data.zca and tiny.distill.batch_syn == 64
    assert load_config("cifar100_ipc50").distill.batch_syn == 512


def test_default_is_digits_and_overrides_apply():
    cfg = load_config(None, ["distill.ipc_per_stage=4", "seed=3", "evaluation.archs=[convnet, vgg11]"])
    assert cfg.data.dataset == "digits"
    assert cfg.distill.ipc_per_stage == 4 and cfg.seed == 3
    assert cfg.evaluation.archs == ("convnet", "vgg11")


def test_config_is_immutable():
    cfg = load_config("digits")
    with pytest.raises(Exception):
        cfg.seed = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, fragments",
    [
        (["distill.ipc_per_stagee=3"], ["unknown config key 'distill.ipc_per_stagee'", "distill.ipc_per_stage"]),
        (["distill.ipcc=3"], ["unknown config key 'distill.ipcc'", "did you mean"]),
        (["distill.ipc_per_stage=0"], ["distill.ipc_per_stage", "0", "greater than or equal to 1"]),
        (["distill.num_stages=0"], ["distill.num_stages", "0"]),
        (["experts.lr=-0.1"], ["experts.lr", "-0.1", "greater than 0"]),
        (["distill.iterations=abc"], ["distill.iterations", "'abc'", "integer"]),
        (["distill.unroll=lazy"], ["distill.unroll", "lazy", "checkpoint"]),
        (["model.arch=resnet99"], ["model.arch", "resnet99", "convnet"]),
        (["data.dataset=cifar1"], ["data.dataset", "cifar1", "did you mean 'cifar10'"]),
        (["model.depth=4"], ["model.depth = 4", "8x8", "at most 3"]),
        (["augment.strategy=color_blur"], ["augment.strategy", "blur"]),
        (["distill.max_start_epoch=50"], ["max_start_epoch", "experts.epochs"]),
    ],
)
def test_bad_values_give_one_line_errors(override, fragments):
    with pytest.raises(PddError) as info:
        load_config("digits", override)
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_model_that_cannot_take_dataset_size_is_refused_before_loading():
    with pytest.raises(PddError, match="too deep for 8x8"):
        load_config("digits", ["model.depth=5"])
    # the same depth is fine on 64x64 data
    assert load_config("tiny_ipc10", ["model.depth=5"]).model.depth == 5


def test_bad_override_syntax_and_unknown_preset(tmp_path):
    with pytest.raises(PddError, match="key.sub=value"):
        parse_overrides(["distill.ipc_per_stage"])
    with pytest.raises(PddError, match="did you mean 'digits'"):
        load_config("digit")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [unclosed\n")
    with pytest.raises(PddError, match="not valid YAML"):
        load_config(str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(PddError, match="mapping"):
        load_config(str(scalar))


def test_yaml_file_and_storage_made_absolute(tmp_path, monkeypatch):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstorage: rel/out\ndistill:\n  num_stages: 3\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(path))
    assert cfg.name == "mine" and cfg.distill.num_stages == 3
    assert Path(cfg.storage_root).is_absolute() and cfg.storage_root.endswith("rel/out")
    assert absolute_storage("s3://bucket/x/") == "s3://bucket/x"


def test_flat_dict_has_dotted_keys():
    flat = load_config("digits").to_flat_dict()
    assert flat["distill.ipc_per_stage"] == 5 and flat["data.dataset"] == "digits"


def test_top_level_method_is_a_shortcut_for_distill_method():
    assert load_config("digits", ["method=mtt"]).distill.method == "mtt"
    with pytest.raises(PddError, match="distill.method"):
        load_config("digits", ["method=nope"])
    with pytest.raises(PddError, match="disagree"):
        load_config("digits", ["method=mtt", "distill.method=dm"])


def test_trajectories_per_worker_needs_a_trajectory_matching_method() -> None:
    assert load_config("digits", ["distill.trajectories_per_worker=4"]).distill.trajectories_per_worker == 4
    with pytest.raises(PddError, match="trajectories_per_worker = 2 needs a trajectory-matching method"):
        load_config("digits", ["distill.method=dm", "distill.trajectories_per_worker=2"])
    with pytest.raises(PddError, match="trajectories_per_worker"):
        load_config("digits", ["distill.trajectories_per_worker=0"])
