"""A run on one's own ImageFolder, as a script runs it (issue 17 items 3, 7 and 8).

One tiny run through the CLI with ``--no-progress`` on a fake ImageFolder, then the same
command again: run naming from the dataset, plain progress lines, the baseline cache, the
flags of a stage that kept its initialisation, and ``--no-baselines``.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from pdd_ray.cli import main
from pdd_ray.config import load_config
from pdd_ray.evaluation import StageSet, baseline_key, recipe_from_config
from pdd_ray.modelspec import ModelSpec
from pdd_ray.progress import disable_lines

from fakes import write_fake_imagefolder


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        disable_lines()
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def own(ray_session, tmp_path_factory, tiny_overrides):
    base = tmp_path_factory.mktemp("own")
    root = write_fake_imagefolder(base / "flowers", classes=3, per_class=10, size=16, test_per_class=3)
    storage = base / "out"
    ov = [o for o in tiny_overrides(str(storage)) if not o.startswith(("name=", "tracking"))]
    # images that cannot move (lr_img ~ 0, alpha fixed): selection keeps iteration 0 on a tie
    ov += ["data.dataset=imagefolder", f"data.root={root}", "model.depth=2", "distill.num_stages=1",
           "distill.lr_img=1e-12", "distill.lr_lr=0", "evaluation.full_epochs=1"]
    first = _cli(["run", "digits", *ov, "--no-progress"])
    second = _cli(["run", "digits", "--no-progress", *ov])
    return storage, ov, first, second


def test_run_is_named_from_the_dataset(own):
    storage, ov, (code, _, err), _ = own
    assert code == 0, err[-3000:]
    dirs = [p.name for p in (storage / "runs").iterdir() if p.is_dir()]  # not the run's lock file
    assert len(dirs) == 1 and dirs[0].startswith("flowers-"), dirs
    assert load_config("digits", ov).name == "flowers"
    assert load_config("digits", ov + ["name=mine"]).name == "mine"  # an explicit name wins


def test_no_progress_prints_plain_progress_lines(own):
    _, _, (code, _, err), _ = own
    assert code == 0
    for fragment in ("experts: started", "experts: 2/2", "experts: done in", "stage 1/1: started",
                     "stage 1/1: 4/4 it (100%), loss ", "stage 1/1: done in", "evaluation: done in",
                     "baselines: done in", "run 2/2 done"):
        assert fragment in err, (fragment, err[-3000:])
    assert "left" in err  # an estimate of the time left
    assert "%|" not in err  # no progress bar drawn


def test_baselines_are_cached_by_what_they_consume(own):
    storage, _, (_, out1, err1), (code, out2, err2) = own
    assert code == 0, err2[-3000:]
    assert len(list((storage / "baselines").glob("*.json"))) == 2
    assert "evaluate random ipc1 [convnet]: run" in err1
    assert "reused from" in err2 and "evaluate random ipc1 [convnet]: run" not in err2
    assert "evaluate full data [convnet]: run" not in err2
    rows1 = [line for line in out1.splitlines() if line.startswith(("random", "full"))]
    rows2 = [line for line in out2.splitlines() if line.startswith(("random", "full"))]
    assert rows1 == rows2 and len(rows1) == 2  # the same numbers, read back


def test_a_stage_that_kept_its_initialisation_is_flagged(own):
    storage, _, (_, out, err), _ = own
    assert "pdd-ray: warning: stage 1 did not improve on its initialisation" in err
    assert "PDD stage 1 (= initialisation)" in out
    results = json.loads(next((storage / "runs").glob("*/results.json")).read_text())
    assert results["stages"][0]["kept_initialisation"] is True and results["stages"][0]["best_iteration"] == 0
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{storage}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("pdd_ray").experiment_id])
    stage_runs = [r for r in runs if r.data.tags.get("pdd.stage") == "1"]
    assert stage_runs and all(r.data.tags["pdd.kept_initialisation"] == "true" for r in stage_runs)
    parents = [r for r in runs if "pdd.stage" not in r.data.tags]
    assert parents and all("initialisation" in r.data.tags["pdd.warning.stage1"] for r in parents)


def test_no_baselines(own):
    storage, ov, _, _ = own
    code, out, err = _cli(["run", "digits", *ov, "--no-baselines", "--no-progress"])
    assert code == 0, err[-3000:]
    assert "random subset" not in out and "full data" not in out and "PDD stage 1" in out
    results = json.loads(next((storage / "runs").glob("*/results.json")).read_text())
    assert results["random"] is None and results["full"] is None
    assert load_config("digits", ov + ["evaluation.baselines=false"]).evaluation.baselines is False


def test_baseline_key_follows_the_recipe_actually_used():
    spec = ModelSpec(arch="convnet", channels=1, num_classes=2, image_size=8, width=8, depth=2)
    x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 0, 1, 1])
    sets = {"val": (x, y), "test": (x, y)}
    cfg = load_config("digits").evaluation
    recipe = recipe_from_config(cfg, "none")
    stage = StageSet(x, y, lr=0.01)
    key = baseline_key("random ipc2", stage, recipe, spec, sets, 5, 0, "d")
    assert key == baseline_key("random ipc2", StageSet(x.clone(), y.clone(), lr=0.01), recipe, spec, sets, 5, 0, "d")
    changed = [
        baseline_key("random ipc2", StageSet(x, y, lr=0.01, epochs=600), recipe, spec, sets, 5, 0, "d"),  # budget
        baseline_key("random ipc2", stage, recipe_from_config(cfg.model_copy(update={"epochs_per_stage": 7}), "none"),
                     spec, sets, 5, 0, "d"),
        baseline_key("random ipc2", StageSet(x + 1, y, lr=0.01), recipe, spec, sets, 5, 0, "d"),  # other images
        baseline_key("random ipc2", stage, recipe, spec, sets, 4, 0, "d"),  # runs
        baseline_key("random ipc2", stage, recipe, spec, sets, 5, 1, "d"),  # seed
        baseline_key("random ipc2", stage, recipe, spec.with_arch("alexnet"), sets, 5, 0, "d"),  # arch
        baseline_key("random ipc2", stage, recipe, spec, {"val": (x + 1, y), "test": (x, y)}, 5, 0, "d"),  # splits
    ]
    assert key not in changed and len(set(changed)) == len(changed)
