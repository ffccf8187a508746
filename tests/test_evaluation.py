"""Progressive evaluator and baselines: same harness, sensible ordering, stage carry-over."""

from __future__ import annotations

import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.evaluation import (
    BaselineSetup,
    EvalPlan,
    StageSet,
    evaluate_full_baseline,
    evaluate_random_baseline,
    eval_sets_of,
    progressive_run,
    random_subset,
    submit_progressive,
)
from pdd_ray.modelspec import ModelSpec
from pdd_ray.prepare import prepare
from pdd_ray.training import TrainRecipe


@pytest.fixture(scope="module")
def digits():
    cfg = load_config("digits", ["model.width=16", "evaluation.runs=2", "evaluation.epochs_per_stage=60",
                                 "evaluation.full_epochs=8"])
    return cfg, prepare(cfg)


def test_random_subset_is_stratified_and_seeded(digits):
    _, p = digits
    x, y = random_subset(p.bundle, 3, seed=1)
    assert x.shape == (30, 1, 8, 8) and torch.bincount(y).tolist() == [3] * 10
    x2, _ = random_subset(p.bundle, 3, seed=1)
    x3, _ = random_subset(p.bundle, 3, seed=2)
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_progressive_run_reports_every_stage_and_learns(digits):
    cfg, p = digits
    b = p.bundle
    s1 = StageSet(*random_subset(b, 2, 0), lr=0.01)
    s2 = StageSet(*random_subset(b, 2, 1), lr=0.01)
    recipe = TrainRecipe(epochs=60, lr=0.01, augment="none")
    scores = progressive_run(p.spec, [s1, s2], recipe, eval_sets_of(b), seed=0)
    assert set(scores) == {"val", "test"} and len(scores["test"]) == 2
    assert scores["test"][0] > 0.4  # far above chance (0.1) from 20 real images
    assert scores["test"][1] >= scores["test"][0] - 0.05  # more data does not hurt much
    # deterministic for a seed, different for another (independent initialisations)
    assert progressive_run(p.spec, [s1, s2], recipe, eval_sets_of(b), seed=0) == scores
    assert progressive_run(p.spec, [s1, s2], recipe, eval_sets_of(b), seed=1) != scores


def test_optimizer_state_carry_over_changes_training(digits):
    _, p = digits
    b = p.bundle
    stages = [StageSet(*random_subset(b, 2, 0), lr=0.01), StageSet(*random_subset(b, 2, 1), lr=0.01)]
    recipe = TrainRecipe(epochs=20, lr=0.01, augment="none")
    sets = {"test": (b.test_x, b.test_y)}
    carried = progressive_run(p.spec, stages, recipe, sets, seed=0, carry_optimizer_state=True)
    fresh = progressive_run(p.spec, stages, recipe, sets, seed=0, carry_optimizer_state=False)
    assert carried["test"][0] == fresh["test"][0]  # stage 1 identical
    assert carried["test"][1] != fresh["test"][1]  # momentum carried into stage 2 matters


def test_init_params_start_from_given_weights(digits):
    from pdd_ray.models import FlatModel
    from pdd_ray.modelspec import build_seeded

    _, p = digits
    b = p.bundle
    flat = FlatModel(build_seeded(p.spec, 123)).flatten()
    stage = StageSet(*random_subset(b, 1, 0), lr=1e-12, epochs=1)  # lr ~ 0: weights stay put
    recipe = TrainRecipe(epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0, augment="none")
    a = progressive_run(p.spec, [stage], recipe, {"test": (b.test_x, b.test_y)}, seed=0, init_params=flat)
    c = progressive_run(p.spec, [stage], recipe, {"test": (b.test_x, b.test_y)}, seed=5, init_params=flat)
    assert a == c  # the run seed no longer matters: both start from (and stay at) `flat`


def test_baselines_through_ray_random_below_full(ray_session, digits):
    cfg, p = digits
    setup = BaselineSetup(p.bundle, p.spec, cfg.evaluation, "none", cfg.seed, progress=False)
    rnd = evaluate_random_baseline(setup, 1)
    full = evaluate_full_baseline(setup)
    assert rnd.scores["test"].shape == (2, 1)
    assert full.final[0] > 75.0  # 8 epochs of a narrow net: well above chance
    assert rnd.final[0] < full.final[0] - 10.0  # one image per class is far from the full set


def test_cross_architecture_spec(ray_session, digits):
    cfg, p = digits
    stage = StageSet(*random_subset(p.bundle, 1, 0), lr=0.01, epochs=5)
    spec = ModelSpec("vgg11", 1, 10, 8)
    res = submit_progressive("x", spec, [stage], EvalPlan(TrainRecipe(epochs=5, lr=0.01), 1, 0),
                             eval_sets_of(p.bundle), progress=False).result()
    assert res.arch == "vgg11" and res.scores["test"].shape == (1, 1)


def test_each_stage_trains_with_its_own_alpha_and_restarts_the_decay(digits, monkeypatch):
    """Stage k uses its own lr α_k (not the recipe's), and the x0.1 drop at half of each
    stage restarts from α_k: recorded at every optimiser step."""
    _, p = digits
    b = p.bundle
    s1 = StageSet(*random_subset(b, 1, 0), lr=0.05, epochs=4)
    s2 = StageSet(*random_subset(b, 1, 1), lr=0.02, epochs=6)
    recipe = TrainRecipe(epochs=99, lr=0.01, batch_size=1000, augment="none")  # one step per epoch
    lrs: list[float] = []
    from pdd_ray.sgd import SGD

    step = SGD.step

    def recording_step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(SGD, "step", recording_step)
    progressive_run(p.spec, [s1, s2], recipe, {"test": (b.test_x, b.test_y)}, seed=0)
    expected = [0.05] * 2 + [0.005] * 2 + [0.02] * 3 + [0.002] * 3
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_equal_training_budget_helpers(digits, monkeypatch):
    from pdd_ray import evaluation
    from pdd_ray.errors import PddError

    cfg, p = digits
    ev = cfg.evaluation  # 60 epochs per stage
    assert evaluation.budget_epochs(ev, 1) == 60 and evaluation.budget_epochs(ev, 5) == 300
    assert evaluation.epochs_per_stage_for(600, 1) == 600 and evaluation.epochs_per_stage_for(600, 5) == 120
    with pytest.raises(PddError) as err:
        evaluation.epochs_per_stage_for(600, 7)
    assert "\n" not in str(err.value) and "600" in str(err.value) and "7" in str(err.value)
    seen = []
    class _Submitted:  # what submit_progressive returns, without running anything
        on_result = None

        def result(self):
            return None

    monkeypatch.setattr(evaluation, "submit_progressive",
                        lambda name, spec, stages, *a, **k: seen.append(stages) or _Submitted())
    setup = evaluation.BaselineSetup(p.bundle, p.spec, ev, "none", 0, progress=False)
    evaluation.evaluate_random_baseline(setup, 2, epochs=evaluation.budget_epochs(ev, 3))
    evaluation.evaluate_random_baseline(setup, 2)
    assert [s[0].epochs or ev.epochs_per_stage for s in seen] == [180, 60]


def test_a_failed_run_cancels_the_runs_still_pending(ray_session, digits, monkeypatch):
    """One run failing (or Ctrl-C) must not leave the other runs training on the cluster."""
    import ray

    cfg, p = digits
    cancelled: list[object] = []
    real_cancel = ray.cancel

    def failing_get(ref, *a, **k):
        raise RuntimeError("run failed")

    monkeypatch.setattr(ray, "get", failing_get)
    monkeypatch.setattr(ray, "cancel", lambda ref, **k: cancelled.append(ref) or real_cancel(ref, **k))
    stages = [StageSet(*random_subset(p.bundle, 1, 0), lr=0.01)]
    plan = EvalPlan(TrainRecipe(epochs=3, lr=0.01), runs=3, seed=0)
    with pytest.raises(RuntimeError, match="run failed"):
        submit_progressive("x", p.spec, stages, plan, eval_sets_of(p.bundle), progress=False).result()
    assert len(cancelled) == 2  # the first run to finish failed; the two others were cancelled


def test_baselines_submitted_together_give_the_numbers_they_give_alone_and_fill_the_cache(ray_session, digits,
                                                                                          tmp_path):
    """The pipeline submits both baselines before waiting on any run (the cores stay busy);
    results are the ones each gives alone, and the cache is written when a result is collected."""
    from pdd_ray.evaluation import submit_full_baseline, submit_random_baseline

    cfg, p = digits
    alone = BaselineSetup(p.bundle, p.spec, cfg.evaluation, "none", cfg.seed, progress=False)
    cached = BaselineSetup(p.bundle, p.spec, cfg.evaluation, "none", cfg.seed, progress=False, cache_dir=tmp_path)
    pending = [submit_full_baseline(cached), submit_random_baseline(cached, 2, epochs=30)]
    assert not list(tmp_path.iterdir())  # nothing written before a result is in
    full, rnd = (x.result() for x in pending)
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert (full.scores["test"] == evaluate_full_baseline(alone).scores["test"]).all()
    assert (rnd.scores["test"] == evaluate_random_baseline(alone, 2, epochs=30).scores["test"]).all()
    again = submit_random_baseline(cached, 2, epochs=30)
    assert again.pending == [] and (again.result().scores["test"] == rnd.scores["test"]).all()  # from the cache
