"""The run key (``identity.run_key``) changes exactly when a setting the cached results consume changes.

Finished stages, Ray Train checkpoints and transition experts live under the run directory,
so a key that ignores a consumed setting silently reuses stale stages (the bug this guards:
the whole ``evaluation`` section used to be dropped, though in-loop selection and the
transition warm-up read its optimiser settings).
"""

from __future__ import annotations

import pytest

from pdd_ray.config import load_config
from pdd_ray.distill.identity import run_dir, run_key

#: Settings that alter the distilled images (directly or through selection / conditioning).
CONSUMED = {
    "seed": "seed=1",
    "data.val_fraction": "data.val_fraction=0.3",
    "data.split_seed": "data.split_seed=3",
    "data.zca": "data.zca=true",
    "model.width": "model.width=32",
    "model.norm": "model.norm=batch",
    "model.pooling": "model.pooling=max",
    "data.test_fraction": "data.test_fraction=0.3",
    "augment.strategy": "augment.strategy=none",
    "experts.num_experts": "experts.num_experts=4",
    "experts.epochs": "experts.epochs=12",
    "experts.lr": "experts.lr=0.05",
    "experts.momentum": "experts.momentum=0.5",
    "experts.weight_decay": "experts.weight_decay=0.001",
    "experts.batch_size": "experts.batch_size=64",
    "experts.keep_all_epochs": "experts.keep_all_epochs=true",
    "distill.num_stages": "distill.num_stages=3",
    "distill.ipc_per_stage": "distill.ipc_per_stage=3",
    "distill.iterations": "distill.iterations=7",
    "distill.syn_steps": "distill.syn_steps=9",
    "distill.expert_epochs": "distill.expert_epochs=3",
    "distill.max_start_epoch": "distill.max_start_epoch=4",
    "distill.lr_img": "distill.lr_img=50",
    "distill.lr_lr": "distill.lr_lr=1e-4",
    "distill.lr_init": "distill.lr_init=0.02",
    "distill.batch_syn": "distill.batch_syn=3",
    "distill.batch_syn_policy": "distill.batch_syn_policy=union",
    "distill.unroll": "distill.unroll=checkpoint",
    "distill.eval_every": "distill.eval_every=10",
    "distill.eval_runs": "distill.eval_runs=1",
    "distill.eval_epochs": "distill.eval_epochs=30",
    "distill.num_workers": "distill.num_workers=2",
    "distill.cpus_per_worker": "distill.cpus_per_worker=1",
    "distill.trajectories_per_worker": "distill.trajectories_per_worker=2",
    "distill.transition_syn_epochs": "distill.transition_syn_epochs=3",
    "distill.transition_experts": "distill.transition_experts=2",
    "distill.discard_fraction": "distill.discard_fraction=0.1",
    "distill.deterministic": "distill.deterministic=true",
    # read by the in-loop selection networks and the transition warm-up
    "evaluation.momentum": "evaluation.momentum=0.5",
    "evaluation.weight_decay": "evaluation.weight_decay=0.001",
    "evaluation.batch_size": "evaluation.batch_size=64",
    "evaluation.lr_decay_at_half": "evaluation.lr_decay_at_half=false",
    "evaluation.augment": "evaluation.augment=false",
}

#: Settings that cannot alter the distilled images: bookkeeping, resources that do not change
#: the numbers, evaluation after the fact, and the other methods' sections.
NOT_CONSUMED = {
    "name": "name=renamed",
    "storage": "storage=/tmp/h15-elsewhere",
    "data.download": "data.download=true",
    "data.zca_eps": "data.zca_eps=0.5",  # ZCA is off in the digits preset
    "experts.cpus": "experts.cpus=2",
    "experts.storage": "experts.storage=/tmp/h15-experts",
    "distill.checkpoint_every": "distill.checkpoint_every=7",
    "distill.max_failures": "distill.max_failures=5",
    "distill.collective_timeout_s": "distill.collective_timeout_s=600",
    "distill.discard_from_stage": "distill.discard_from_stage=3",  # not read while discard_fraction = 0
    "distill.discard_min_per_class": "distill.discard_min_per_class=5",  # ditto
    "evaluation.runs": "evaluation.runs=3",
    "evaluation.epochs_per_stage": "evaluation.epochs_per_stage=17",
    "evaluation.lr": "evaluation.lr=0.5",
    "evaluation.carry_optimizer_state": "evaluation.carry_optimizer_state=false",
    "evaluation.full_epochs": "evaluation.full_epochs=3",
    "evaluation.baselines": "evaluation.baselines=false",
    "evaluation.full_batch_size": "evaluation.full_batch_size=32",
    "evaluation.archs": "evaluation.archs=[convnet,resnet18]",
    "evaluation.cpus_per_run": "evaluation.cpus_per_run=2",
    "tracking.enabled": "tracking.enabled=false",
    "tracking.uri": "tracking.uri=http://127.0.0.1:5000",
    "tracking.experiment": "tracking.experiment=other",
    "dm.batch_real": "dm.batch_real=16",  # method is mtt
    "dm.lr_img": "dm.lr_img=3",
    "idc.factor": "idc.factor=2",
    "idc.lr_img": "idc.lr_img=0.5",
}

#: Settings deliberately not perturbed here (changing them needs other data or hardware).
UNTESTED = {"data.dataset", "data.root", "data.image_size", "model.arch", "model.depth", "distill.method", "distill.use_gpu",
            "distill.gpus_per_worker",
            "experts.gpus", "evaluation.gpus_per_run"}


def key(*overrides: str) -> str:
    return run_key(load_config("digits", list(overrides)))


@pytest.mark.parametrize("field", sorted(CONSUMED))
def test_consumed_setting_changes_the_key(field):
    assert key(CONSUMED[field]) != key(), f"{field} alters the distilled images but not the run key"


@pytest.mark.parametrize("field", sorted(NOT_CONSUMED))
def test_unconsumed_setting_keeps_the_key(field):
    assert key(NOT_CONSUMED[field]) == key(), f"{field} cannot alter the distilled images but changed the run key"


def test_method_sections_count_only_for_their_method():
    assert key("method=dm", "dm.lr_img=3") != key("method=dm")
    assert key("method=dm", "idc.lr_img=0.5") == key("method=dm")
    assert key("method=idc", "idc.lr_img=0.5") != key("method=idc")
    assert key("method=idc", "dm.batch_real=16") == key("method=idc")
    # DATM's section (soft labels, windows) counts for DATM only
    for override in ("datm.lr_labels=1.0", "datm.soft_labels=false", "datm.max_start_epoch_final=9",
                     "datm.stage_shift=1", "datm.label_epoch=3", "datm.momentum_labels=0.5"):
        assert key("method=datm", override) != key("method=datm"), override
        assert key("method=mtt", override) == key("method=mtt"), override
    # DM does not read MTT's image lr (it has its own)
    assert key("method=dm", "distill.lr_img=50") == key("method=dm")


def test_zca_eps_counts_with_zca_on():
    assert key("data.zca=true", "data.zca_eps=0.5") != key("data.zca=true")


def test_discard_settings_count_once_discarding_is_on():
    on = "distill.discard_fraction=0.2"
    assert key(on, "distill.discard_from_stage=3") != key(on)
    assert key(on, "distill.discard_min_per_class=5") != key(on)


def test_every_config_field_is_classified():
    """A new config key must be put in CONSUMED or NOT_CONSUMED (and so tested) before it lands."""
    d = load_config("digits", []).model_dump(mode="json")
    leaves = {f"{s}.{k}" for s, sec in d.items() if isinstance(sec, dict) for k in sec}
    leaves |= {s for s, sec in d.items() if not isinstance(sec, dict)}
    leaves = {f for f in leaves if f.split(".")[0] not in ("dm", "idc", "datm")}  # see test_method_sections_...
    missing = leaves - set(CONSUMED) - set(NOT_CONSUMED) - UNTESTED
    assert not missing, f"classify these settings in tests/distill/test_run_key.py: {sorted(missing)}"


def test_run_dir_follows_the_key(tmp_path):
    base = ["storage=" + str(tmp_path)]
    assert run_dir(load_config("digits", base + ["evaluation.weight_decay=0.001"])) != run_dir(load_config("digits", base))
    assert run_dir(load_config("digits", base + ["tracking.enabled=false", "evaluation.runs=1"])) == \
        run_dir(load_config("digits", base))
