"""A diverged stage is reported as such, never as PDD (issue 17 item 3)."""

from __future__ import annotations

import numpy as np
import torch

from pdd_ray.distill.driver import DistillResult
from pdd_ray.distill.records import StageOutcome
from pdd_ray.distill.health import stage_health
from pdd_ray.evaluation import EvalResult, StageSet
from pdd_ray.pipeline import RunReport


def test_kept_initialisation_and_collapse_are_flagged():
    # the case: 71 % -> 3 % on 10 classes, selection keeps iteration 0
    h = stage_health(1, 0, 0.71, [(0, 0.71), (50, 0.20), (100, 0.03)], 10, 100)
    assert h.kept_initialisation and h.validation_collapsed
    assert h.mark == "= initialisation" and "did not improve on its initialisation" in h.warning
    # improved, then fell apart: the kept iterate is real distillation, but the run diverged
    h = stage_health(2, 50, 0.80, [(0, 0.70), (50, 0.80), (100, 0.12)], 10, 100)
    assert not h.kept_initialisation and h.validation_collapsed
    assert h.mark == "diverged, kept it. 50" and "diverged" in h.warning


def test_a_healthy_stage_has_no_flag():
    h = stage_health(1, 100, 0.95, [(0, 0.71), (50, 0.93), (100, 0.95)], 10, 100)
    assert not h.kept_initialisation and not h.validation_collapsed
    assert h.mark == "" and h.warning is None
    # a small dip at the end is noise, not a collapse
    assert not stage_health(1, 50, 0.96, [(0, 0.90), (50, 0.96), (100, 0.93)], 10, 100).validation_collapsed
    # no iterations asked for: iteration 0 is the only candidate, nothing to warn about
    assert stage_health(1, 0, 0.9, [(0, 0.9)], 10, 0).warning is None


def _report(best_iteration: int, history: list[tuple[int, float]]) -> RunReport:
    x, y = torch.zeros(10, 1, 8, 8), torch.arange(10)
    out = StageOutcome(x, y, 0.01, max(a for _, a in history), best_iteration, [1.0], history)
    health = [stage_health(1, best_iteration, out.best_val_acc, history, 10, 100)]
    result = DistillResult(__import__("pathlib").Path("/nonexistent"), __import__("pathlib").Path("/nonexistent/a"),
                           [StageSet(x, y, 0.01)], [out], ["k"], {}, health)
    res = EvalResult("PDD", "convnet", {"test": np.array([[0.5]]), "val": np.array([[0.5]])})
    return RunReport(result, {"convnet": res}, None, None)


def test_table_row_and_results_json_say_initialisation():
    report = _report(0, [(0, 0.71), (100, 0.03)])
    assert report.rows()[0][0] == "PDD stage 1 (= initialisation)"
    stage = report.to_dict()["stages"][0]
    assert stage["kept_initialisation"] is True and stage["validation_collapsed"] is True
    assert "initialisation" in stage["warning"]
    healthy = _report(100, [(0, 0.71), (100, 0.95)])
    assert healthy.rows()[0][0] == "PDD stage 1"
    assert healthy.to_dict()["stages"][0]["kept_initialisation"] is False
