"""DATM as a base method: learned soft labels, difficulty-aligned windows, honest controls."""

from __future__ import annotations

import argparse

import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.distill import launch
from pdd_ray.distill.artifact import load_distilled
from pdd_ray.distill.driver import distill
from pdd_ray.distill.identity import run_dir
from pdd_ray.distill.launch import FAIL_AT_ENV
from pdd_ray.distill.records import load_stage
from pdd_ray.distill.methods import METHODS, Conditioning, MethodContext, SettingsContext, StageSets
from pdd_ray.distill.methods.datm import DatmMethod, datm_reach, window_bounds, window_upper
from pdd_ray.distill.stage import StageTask
from pdd_ray.errors import PddError
from pdd_ray.evaluation import StageSet, progressive_run
from pdd_ray.modelspec import ModelSpec
from pdd_ray.prepare import prepare
from pdd_ray.seeding import generator
from pdd_ray.training import TrainRecipe


DATM = ["method=datm", "experts.epochs=5", "datm.max_start_epoch_final=3", "datm.stage_shift=1", "datm.lr_labels=5.0"]


# ----------------------------------------------------------------------------------------------
# config and window
# ----------------------------------------------------------------------------------------------


def test_registered_and_window_grows_and_shifts(tmp_path, tiny_overrides):
    assert METHODS["datm"] is DatmMethod
    cfg = load_config("digits", tiny_overrides(str(tmp_path)) + DATM)
    assert window_bounds(cfg, 1) == (0, 2, 3) and window_bounds(cfg, 2) == (1, 3, 4)
    assert datm_reach(cfg) == 5  # stage 2's final upper bound 4 + expert_epochs 1
    p = DatmMethod.stage_settings(SettingsContext(cfg.distill, 10, 1), cfg.datm)
    assert [window_upper(p, it) for it in range(5)] == [2, 2, 2, 2, 3]  # DATM: upper + floor((final - upper) * it / expansion)


@pytest.mark.parametrize("extra, words", [
    (["datm.min_start_epoch=2"], "datm.min_start_epoch"),
    (["datm.max_start_epoch_final=1"], "only grows"),
    (["datm.stage_shift=3"], "experts.epochs"),
    (["distill.unroll=checkpoint"], "unroll"),
])
def test_bad_windows_are_one_line_errors(tmp_path, extra, words, tiny_overrides):
    with pytest.raises(PddError, match=words):
        load_config("digits", tiny_overrides(str(tmp_path)) + DATM + extra)


# ----------------------------------------------------------------------------------------------
# the method on its own
# ----------------------------------------------------------------------------------------------


def _task(tmp_path, frozen_soft: torch.Tensor) -> tuple[MethodContext, ModelSpec]:
    """A stage-2 method context over two fake experts written to a real trajectory store."""
    from pdd_ray.experts.store import TrajectoryStore
    from pdd_ray.models import FlatModel
    from pdd_ray.modelspec import build_seeded

    spec = ModelSpec(arch="convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2)
    store = TrajectoryStore(str(tmp_path / "experts"))
    for j in range(2):
        w = FlatModel(build_seeded(spec, j)).flatten().detach()
        rows = torch.stack([w + 0.01 * e * torch.randn(w.shape, generator=generator(e + 10 * j)) for e in range(6)])
        store.write("k", j, rows.numpy(), meta={})
    g = generator(0)
    task = MethodContext(
        stage=2, seed=0, spec=spec, augment="none",
        settings={"syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2, "max_start_epoch_final": 4,
                  "min_start_epoch": 0, "expansion_iterations": 4, "batch_syn": 6, "unroll": "full",
                  "soft_labels": True, "lr_labels": 1.0, "momentum_labels": 0.9, "label_epoch": None},
        sets=StageSets(frozen_images=torch.randn(3, 1, 8, 8, generator=g), frozen_labels=torch.arange(3),
                       init_images=torch.randn(6, 1, 8, 8, generator=g), new_labels=torch.arange(3).repeat_interleave(2),
                       init_soft_labels=torch.randn(6, 3, generator=g), frozen_soft_labels=frozen_soft),
        conditioning=Conditioning(store.root, "k", [0, 1]),
    )
    return task, spec


def test_soft_label_gradients_reach_only_the_new_stage_logits(tmp_path):
    frozen = torch.randn(3, 3, generator=generator(5)).requires_grad_(True)  # would collect any stray gradient
    frozen_before = frozen.detach().clone()
    task, _ = _task(tmp_path, frozen)
    method = DatmMethod(task, torch.device("cpu"))
    new_x = task.sets.init_images.clone().requires_grad_(True)
    new_s = task.sets.init_soft_labels.clone().requires_grad_(True)
    method.soft_labels = new_s
    alpha = torch.tensor(0.01, requires_grad=True)
    opt = torch.optim.SGD([new_s], lr=1.0, momentum=0.9)
    for it in range(3):  # the stage loop's label steps
        res = method.update(it, 0, new_x, alpha, generator(100 + it))
        assert res.grad_labels is not None and res.grad_labels.shape == new_s.shape
        assert res.grad_labels.abs().sum() > 0
        new_s.grad = res.grad_labels
        opt.step()
    assert frozen.grad is None  # no gradient ever reached the frozen stage's logits
    assert torch.equal(frozen.detach(), frozen_before)
    assert not torch.equal(new_s.detach(), task.sets.init_soft_labels)
    # and the frozen logits are really used: other frozen logits give another loss
    loss_a = method.update(0, 0, new_x, alpha, generator(7)).loss
    task2, _ = _task(tmp_path / "b", frozen_before + 3 * torch.eye(3))
    other = DatmMethod(task2, torch.device("cpu"))
    other.soft_labels = new_s
    assert other.update(0, 0, new_x, alpha, generator(7)).loss != loss_a


def test_soft_labels_train_with_soft_cross_entropy():
    """Evaluation with soft labels differs from hard labels, and equals training on the
    softmax targets (what the artifact's recipe says)."""
    spec = ModelSpec(arch="convnet", channels=1, num_classes=3, image_size=8, width=4, depth=2)
    g = generator(1)
    x, y = torch.randn(6, 1, 8, 8, generator=g), torch.arange(3).repeat(2)
    logits = 4 * torch.randn(6, 3, generator=g)  # mostly disagreeing with y
    recipe = TrainRecipe(epochs=20, lr=0.1, batch_size=6)
    ev = {"test": (x, logits.argmax(1))}  # agreement with the soft labels' top class
    soft = progressive_run(spec, [StageSet(x, y, lr=0.1, soft_labels=logits)], recipe, ev, seed=3)
    hard = progressive_run(spec, [StageSet(x, y, lr=0.1)], recipe, ev, seed=3)
    probs = progressive_run(spec, [StageSet(x, torch.softmax(logits, 1), lr=0.1)], recipe, ev, seed=3)
    assert soft == probs
    assert soft["test"][-1] > hard["test"][-1]


# ----------------------------------------------------------------------------------------------
# end to end on tiny digits
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def twin_runs(ray_session, tmp_path_factory, tiny_overrides):
    """The same 2-stage DATM config twice: once with rank 0 killed at iteration 3 of stage 1
    (resumed from its checkpoint), once uninterrupted. Stage tasks are captured."""
    root = tmp_path_factory.mktemp("datm")
    shared = [f"experts.storage={root / 'experts'}"]
    out = {}
    captured: list[StageTask] = []
    real_task = launch.StageTask

    def capture(*a, **k):
        t = real_task(*a, **k)
        captured.append(t)
        return t

    mp = pytest.MonkeyPatch()
    mp.setattr(launch, "StageTask", capture)
    try:
        for name, fail in (("killed", "3"), ("clean", None)):
            cfg = load_config("digits", tiny_overrides(str(root / name)) + DATM + shared)
            if fail:
                mp.setenv(FAIL_AT_ENV, fail)
            else:
                mp.delenv(FAIL_AT_ENV, raising=False)
            prepared = prepare(cfg)
            out[name] = (cfg, prepared, distill(cfg, prepared, progress=False))
    finally:
        mp.undo()
    out["tasks"] = captured
    return out


def test_killed_worker_resumes_to_the_same_labels(twin_runs):
    cfg, _, killed = twin_runs["killed"]
    _, _, clean = twin_runs["clean"]
    assert (run_dir(cfg) / "injected_failure.marker").read_text() == "3"
    for a, b in zip(killed.outcomes, clean.outcomes):
        assert a.soft_labels is not None
        assert torch.equal(a.soft_labels, b.soft_labels)
        assert torch.equal(a.images, b.images)
        assert a.losses == b.losses


def test_frozen_stage_labels_stay_bit_identical(twin_runs):
    cfg, _, result = twin_runs["killed"]
    recorded = load_stage(result.directory, 1)  # written when stage 1 finished, before stage 2 ran
    stage2 = [t for t in twin_runs["tasks"] if t.stage == 2][0]
    assert torch.equal(stage2.context.sets.frozen_soft_labels, recorded.soft_labels)  # what stage 2 matched against
    assert torch.equal(result.stages[0].soft_labels, recorded.soft_labels)
    art = load_distilled(result.artifact)
    assert torch.equal(art.stages[0].soft_labels, recorded.soft_labels)
    # stage 2 has logits of its own (whether they moved is the unit test's business: selection
    # may keep iteration 0 on these tiny settings)
    assert stage2.context.sets.init_soft_labels.shape == result.stages[1].soft_labels.shape


def test_init_keeps_only_images_the_expert_classifies_correctly(twin_runs):
    for t in twin_runs["tasks"]:
        assert torch.equal(t.context.sets.init_soft_labels.argmax(1), t.context.sets.new_labels)


def test_artifact_round_trips_soft_labels_and_evaluate_uses_them(twin_runs, capsys):
    cfg, prepared, result = twin_runs["clean"]
    art = load_distilled(result.artifact)
    assert art.manifest["evaluation"]["labels"] == "soft"
    assert all(e["soft_labels"] for e in art.manifest["stages"])
    for a, b in zip(art.stages, result.stages):
        assert torch.equal(a.soft_labels, b.soft_labels) and torch.equal(a.labels, b.labels)
    assert torch.equal(art.soft_labels, torch.cat([s.soft_labels for s in result.stages]))
    # `pdd-ray evaluate` trains with the soft labels: its numbers equal a soft-label progressive run
    from pdd_ray.distill.reevaluate import reevaluate_artifact
    from pdd_ray.evaluation import eval_sets_of
    from pdd_ray.seeding import derive_seed

    args = argparse.Namespace(artifact=str(result.artifact), root=None, arch=None, runs=1, json=None,
                              no_progress=True)
    assert reevaluate_artifact(args) == 0
    shown = capsys.readouterr().out
    soft = progressive_run(art.spec, art.stages, art.recipe, eval_sets_of(prepared.bundle),
                           derive_seed(cfg.seed, "eval-run", 0), art.carry_optimizer_state)
    assert f"{soft['test'][-1] * 100:5.2f}" in shown


def test_honest_controls_in_report(twin_runs):
    from pdd_ray.pipeline import RunReport, evaluate_distilled, soft_label_controls

    cfg, prepared, result = twin_runs["clean"]
    hard, rnd = soft_label_controls(cfg, prepared, result, progress=False)
    assert hard.scores["test"].shape == (cfg.evaluation.runs, cfg.distill.num_stages)
    assert rnd.name.endswith("soft labels")
    report = RunReport(result, evaluate_distilled(cfg, prepared, result, False), None, None, pdd_hard=hard,
                       random_soft=rnd)
    methods = [r[0] for r in report.rows()]
    assert "random subset, soft labels" in methods and "PDD stage 2, hard labels" in methods
    d = report.to_dict()
    assert d["pdd_hard_labels"]["scores"]["test"] and d["random_soft_labels"]["scores"]["test"]


def test_without_soft_labels_and_fixed_window_datm_equals_mtt(ray_session, tmp_path, tiny_overrides):
    shared = [f"experts.storage={tmp_path / 'experts'}", "distill.num_stages=1"]
    outs = {}
    fixed = ["datm.soft_labels=false", "datm.min_start_epoch=0", "datm.max_start_epoch=null",
             "datm.max_start_epoch_final=null", "datm.stage_shift=0"]  # the digits preset grows and shifts
    for m, extra in (("mtt", []), ("datm", fixed)):
        cfg = load_config("digits", tiny_overrides(str(tmp_path / m)) + [f"method={m}"] + extra + shared)
        outs[m] = distill(cfg, prepare(cfg), progress=False)
    a, b = outs["mtt"].outcomes[0], outs["datm"].outcomes[0]
    assert outs["mtt"].expert_keys == outs["datm"].expert_keys  # the same experts (same reach)
    assert b.soft_labels is None
    assert a.losses == b.losses
    assert torch.equal(a.images, b.images) and a.alpha == b.alpha
