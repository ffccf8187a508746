"""A NaN/inf anywhere in a stage is a one-line error, never an artifact (issue 15, defect 4)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pdd_ray.config import load_config
from pdd_ray.distill.driver import distill
from pdd_ray.distill.identity import run_dir
from pdd_ray.distill.stage import STATE_FILE, nonfinite_problem
from pdd_ray.errors import PddError
from pdd_ray.prepare import prepare


def test_nonfinite_problem_names_the_value_stage_iteration_and_cause():
    task = SimpleNamespace(stage=2, method="mtt", optimisation=SimpleNamespace(lr_img=1e12, lr_lr=1e-5))
    ok = nonfinite_problem(task, 7, loss=torch.tensor([0.5]), grad_images=torch.ones(3), alpha=torch.tensor(0.01))
    assert ok is None
    msg = nonfinite_problem(task, 7, loss=torch.tensor([0.5]), grad_images=torch.tensor([1.0, float("nan")]))
    assert "\n" not in msg and msg.startswith("stage 2, iteration 7: the image gradient is not finite (nan)")
    assert "distill.lr_img = 1e+12" in msg
    dm = SimpleNamespace(stage=1, method="dm", optimisation=SimpleNamespace(lr_img=5.0, lr_lr=0.0))
    msg = nonfinite_problem(dm, 0, images=torch.tensor([float("inf")]))
    assert "synthetic images" in msg and "(inf)" in msg and "dm.lr_img = 5" in msg


def test_diverged_images_are_a_problem_too():
    from pdd_ray.distill.stage import DIVERGED_FACTOR, diverged_problem

    task = SimpleNamespace(stage=1, method="mtt", optimisation=SimpleNamespace(lr_img=1e12, lr_lr=1e-5, image_limit=3.0))
    assert diverged_problem(task, 0, torch.full((2, 2), 3.0 * DIVERGED_FACTOR)) is None
    msg = diverged_problem(task, 4, torch.tensor([1.0, -1.5e9]))
    assert "\n" not in msg and msg.startswith("stage 1, iteration 4: the synthetic images diverged")
    assert "1.5e+09" in msg and "distill.lr_img = 1e+12" in msg
    assert diverged_problem(SimpleNamespace(optimisation=SimpleNamespace(image_limit=None)), 0, torch.tensor([1e30])) is None


def test_huge_image_lr_stops_with_one_line_and_writes_no_nan(ray_session, tmp_path, tiny_overrides):
    cfg = load_config("digits", tiny_overrides(str(tmp_path / "out")) + ["distill.lr_img=1e12"])
    with pytest.raises(PddError) as err:
        distill(cfg, prepare(cfg), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("stage 1, iteration ")
    assert "not finite" in msg or "diverged" in msg
    assert "distill.lr_img = 1e+12" in msg
    d = run_dir(cfg)
    assert not (d / "artifact").exists() and not (d / "stage_1" / "manifest.json").exists()
    for path in Path(d, "train").rglob(STATE_FILE):  # every checkpoint kept is finite
        state = torch.load(path, map_location="cpu", weights_only=True)
        for k, v in state.items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert torch.isfinite(v).all(), (path, k)
